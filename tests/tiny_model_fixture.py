"""A tiny random Llama folder with its own SentencePiece tokenizer (and the HF files for it), for tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def build_tiny_model(folder: Path, texts: Sequence[str], vocab_size: int, seed: int, max_positions: int = 64) -> Path:
    """Train a BPE tokenizer of ``vocab_size`` pieces on ``texts`` and save a random 2-layer Llama beside it."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dapt.tokenizer import write_hf_tokenizer

    folder.mkdir(parents=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(folder / "tokenizer"),
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=0.98,
        remove_extra_whitespaces=False, minloglevel=2,
    )
    write_hf_tokenizer(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder
