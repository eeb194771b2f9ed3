"""The sanity check of an extended checkpoint: it loads, original logits are unchanged, held-out text scores.

Small models only (the stage skips it above ``--sanity-max-bytes``): both models are loaded whole.

Reading its held-out numbers: before any training the extended model usually scores BETTER on domain text
than the base model. That is the adapted tokenizer, not learning: a new token's output row starts at zero
(or a mean), so its logit is about 0 in every context, above most base logits; the new tokens together take
a large share of the probability mass, spread almost evenly over them. The adapted tokenizer writes domain
text with fewer tokens, many of them new, and one flat guess among the new tokens costs fewer bits than the
base model's spelling of the same bytes in several sub-tokens. On the base model's own tokens the extended
model is worse (``heldout_bits_per_byte_extended_on_base_tokens``): that share of the mass is lost on every
base token. ``docs/embeddings.md`` has the measured decomposition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def sanity_check(
    base_folder: Path, extended_folder: Path, base_sp: Any, adapted_sp: Any, texts: list[str]
) -> dict:
    """Load the extended model, score held-out text, and compare original-token logits with the base model."""
    import torch
    from transformers import LlamaForCausalLM

    from dapt.evaluate import bits_per_byte

    extended = LlamaForCausalLM.from_pretrained(str(extended_folder)).float().eval()
    base = LlamaForCausalLM.from_pretrained(str(base_folder)).float().eval()
    base_vocab = base.config.vocab_size
    probe = ([base_sp.bos_id()] + list(base_sp.encode(texts[0] if texts else "hello world")))[:128]
    with torch.no_grad():
        old = base(input_ids=torch.tensor([probe])).logits[0]
        new = extended(input_ids=torch.tensor([probe])).logits[0]
    new_mass = torch.softmax(new, dim=-1)[:, base_vocab:].sum(dim=-1).mean()
    result = {
        "loads": True,
        "original_logits_max_abs_diff": float((new[:, :base_vocab] - old).abs().max()),
        "new_token_probability_mass_on_base_text": round(float(new_mass), 6),
        "heldout_documents": len(texts),
    }
    if texts:
        result["heldout_bits_per_byte_base"] = round(bits_per_byte(base, base_sp, texts), 4)
        result["heldout_bits_per_byte_extended"] = round(bits_per_byte(extended, adapted_sp, texts), 4)
        result["heldout_bits_per_byte_extended_on_base_tokens"] = round(bits_per_byte(extended, base_sp, texts), 4)
        adapted_ids = [i for t in texts for i in adapted_sp.encode(t)]
        result["heldout_tokens_base"] = sum(len(base_sp.encode(t)) for t in texts)
        result["heldout_tokens_extended"] = len(adapted_ids)
        result["heldout_new_token_share"] = round(sum(i >= base_vocab for i in adapted_ids) / len(adapted_ids), 4)
        result["reading"] = (
            "before training, extended < base on domain text comes from the adapted tokenizer, not from "
            "learning: see the docstring of dapt/embeddings/sanity.py and docs/embeddings.md"
        )
    return result


def heldout_texts(source: Path, limit: int) -> list[str]:
    """The first ``limit`` documents of a held-out JSONL file or folder."""
    from dapt.corpus import iter_documents

    texts = []
    for doc in iter_documents(source):
        texts.append(doc.text)
        if len(texts) >= limit:
            break
    return texts
