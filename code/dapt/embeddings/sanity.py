"""The sanity check of an extended checkpoint: it loads, original logits are unchanged, held-out text scores.

Small models only (the stage skips it above ``--sanity-max-bytes``): both models are loaded whole.
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
        tokens_base = sum(len(base_sp.encode(t)) for t in texts)
        tokens_new = sum(len(adapted_sp.encode(t)) for t in texts)
        result["heldout_tokens_base"], result["heldout_tokens_extended"] = tokens_base, tokens_new
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
