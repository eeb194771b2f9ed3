"""The ``base-tokenizer`` stage: the tiny profile's miniature base, trained like Llama 2's tokenizer.

The tiny profile has no Llama 2 download: it trains a small SentencePiece model on the general sample with
Llama 2's own trainer settings (BPE, byte fallback, split digits, dummy prefix, the same special ids), so
the adaptation runs on a base of the same kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dapt.artifacts import stage_output
from dapt.config import DEFAULT_GENERAL_DATA, DEFAULT_OUTPUTS, param
from dapt.corpus import load_corpus
from dapt.tokenizer.domain_tokenizer import LLAMA2_TRAINER_SETTINGS, MIN_VOCAB_SIZE, WHY_MIN, train_sentencepiece
from dapt.tokenizer.sentencepiece_model import TOKENIZER_FILE, TokenizerError


@dataclass
class BaseTokenizerConfig:
    """The tiny profile's miniature base tokenizer: Llama 2's trainer settings on the general sample."""

    general_data: Path = param(DEFAULT_GENERAL_DATA, "general JSONL corpus to train on")
    output: Path = param(DEFAULT_OUTPUTS / "tiny" / "base_tokenizer", "output folder")
    vocab_size: int = param(2048, "vocabulary size of the miniature base")
    text_keys: tuple[str, ...] = param(("text",), "JSON keys that may hold the text")


def train_base_tokenizer(config: BaseTokenizerConfig) -> Path:
    """Train the miniature base tokenizer and write ``tokenizer.model`` into the output folder."""
    if config.vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(f"--vocab-size {config.vocab_size}: must be at least {MIN_VOCAB_SIZE} {WHY_MIN}.")
    corpus = load_corpus(config.general_data, "general", config.text_keys)
    inputs = {"general_data": corpus.summary()}
    with stage_output(config.output, "base-tokenizer", config, inputs) as tmp:
        model = train_sentencepiece([d.text for d in corpus.documents], config.vocab_size, LLAMA2_TRAINER_SETTINGS)
        (tmp / TOKENIZER_FILE).write_bytes(model.SerializeToString())
    print(f"base tokenizer: {config.vocab_size} pieces -> {Path(config.output) / TOKENIZER_FILE}")
    return Path(config.output) / TOKENIZER_FILE
