"""Recipe step 1: train a domain SentencePiece tokenizer with Llama 2's own trainer settings.

SentencePiece trains on lines. The domain corpus's non-blank lines are the training text, at most
``limit`` of them (:class:`TrainingLines`: a fixed, order-independent hash sample beyond the cap, so the
training's memory and time stay bounded whatever the corpus size). The training runs in a child process
(a worker process, :class:`TrainDomainTokenizer`) while the other workers segment the corpora with the base
model. SentencePiece's BPE trainer gives other pieces with another thread count, so it always runs with
:data:`TRAINING_THREADS`, whatever the number of cores.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import repeat

import sentencepiece as spm

from dapt.compat import sentencepiece_model_pb2 as sp_pb2
from dapt.tokenizer.sentencepiece_model import TokenizerError, parse_proto

# Llama 2's SentencePiece trainer settings, read from the real model's trainer_spec
# (../shared/models/llama2-tokenizer/tokenizer.model); tests compare them with it.
LLAMA2_TRAINER_SETTINGS = {
    "model_type": "bpe",
    "character_coverage": 0.99995,
    "split_digits": True,
    "byte_fallback": True,
    "allow_whitespace_only_pieces": True,
    "split_by_unicode_script": True,
    "split_by_number": True,
    "split_by_whitespace": True,
    "treat_whitespace_as_suffix": False,
    "max_sentencepiece_length": 16,
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": False,
    "normalization_rule_name": "identity",
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
}


TRAINING_THREADS = 2  # SentencePiece's trainer: 1, 2 and 4 threads give three different models
MIN_VOCAB_SIZE = 260  # with byte fallback: 256 byte pieces, <unk>, <s>, </s>, and at least one more
WHY_MIN = "(256 byte-fallback pieces and 3 special pieces come first)"


def _training_lines(texts: Iterable[str]) -> list[str]:
    """SentencePiece trains on lines: split documents, drop blank lines."""
    return [line for text in texts for line in text.split("\n") if line.strip()]


class TrainingLines:
    """The domain tokenizer's training lines, at most ``limit`` of them, chosen independently of order.

    Below the limit every non-blank line is kept in corpus order. Above it, the
    lines with the smallest (CRC-32, text) keys are kept, in key order: the same
    sample whatever order the documents come in, and memory bounded by the limit.
    Samples of consecutive parts of a corpus (its batches, in worker processes)
    :meth:`merge` into the sample of the whole; a part's sample can start from the
    whole's current ``cutoff`` so that it keeps only lines that may still be chosen.
    """

    def __init__(self, limit: int, cutoff: tuple[int, str] | None = None):
        self.limit = limit
        self.seen = 0
        self.lines: list[str] = []
        self.keyed: list[tuple[int, str]] | None = None if cutoff is None else []
        self.cutoff = cutoff or (1 << 32, "")

    def add(self, text: str) -> None:
        """Add the non-blank lines of ``text`` (whole lines: it ends at a line break or at a document's end)."""
        lines = [line for line in text.split("\n") if line.strip()]
        self.seen += len(lines)
        if self.keyed is None:
            self.lines.extend(lines)
            if len(self.lines) > self.limit:
                self._start_keying()
        else:
            self._add_keyed(_keyed(lines))

    def merge(self, part: TrainingLines) -> None:
        """Add the sample of the next part of the corpus."""
        self.seen += part.seen
        if self.keyed is None and part.keyed is None:
            self.lines.extend(part.lines)
            if len(self.lines) > self.limit:
                self._start_keying()
            return
        if self.keyed is None:
            self._start_keying()
        self._add_keyed(part.keyed if part.keyed is not None else _keyed(part.lines))

    def _start_keying(self) -> None:
        self.keyed = []
        self._add_keyed(_keyed(self.lines))
        self.lines = []

    def _add_keyed(self, pairs: list[tuple[int, str]]) -> None:
        cut_key = self.cutoff[0]
        self.keyed.extend(pair for pair in pairs if pair[0] <= cut_key)
        if len(self.keyed) > self.limit + self.limit // 2:
            self._shrink()

    def _shrink(self) -> None:
        self.keyed.sort()
        del self.keyed[self.limit:]
        if self.keyed:
            self.cutoff = self.keyed[-1]

    def compact(self) -> TrainingLines:
        """Drop the lines that can no longer be chosen (before sending a part's sample on)."""
        if self.keyed is not None and len(self.keyed) > self.limit:
            self._shrink()
        return self

    def result(self) -> list[str]:
        """The kept lines."""
        if self.keyed is None:
            return self.lines
        self._shrink()
        return [line for _, line in self.keyed]


def _keyed(lines: list[str]) -> list[tuple[int, str]]:
    """(CRC-32 of the UTF-8 bytes, line) for each line."""
    encoded = map(str.encode, lines, repeat("utf-8", len(lines)), repeat("surrogatepass", len(lines)))
    return list(zip(map(zlib.crc32, encoded), lines))


def train_sentencepiece(texts: Iterable[str], vocab_size: int, settings: dict, threads: int = TRAINING_THREADS,
                        lines: list[str] | None = None) -> sp_pb2.ModelProto:
    """Train a SentencePiece model in memory on the lines of ``texts`` (or on ``lines`` as given)."""
    lines = _training_lines(texts) if lines is None else lines
    if not lines:
        raise TokenizerError("no training text: the corpus holds only blank lines.")
    buffer = _BytesSink()
    options = {k: v for k, v in settings.items() if k not in ("add_dummy_prefix", "remove_extra_whitespaces")}
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buffer,
            vocab_size=vocab_size,
            num_threads=threads,
            max_sentence_length=16384,
            add_dummy_prefix=settings.get("add_dummy_prefix", True),
            remove_extra_whitespaces=settings.get("remove_extra_whitespaces", False),
            minloglevel=2,
            **options,
        )
    except RuntimeError as error:
        raise TokenizerError(f"SentencePiece training failed with vocab_size={vocab_size}: {error}") from None
    return parse_proto(buffer.data)


class _BytesSink:
    """Receives the trained model from SentencePiece instead of a file."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def _train_serialized(lines: list[str], vocab_size: int, settings: dict) -> bytes:
    """Train on ``lines`` and return the serialised model."""
    return train_sentencepiece((), vocab_size, settings, lines=lines).SerializeToString()


@dataclass
class TrainDomainTokenizer:
    """The training as a task for a worker process (see :mod:`dapt.tokenizer.workers`): returns the model's bytes."""

    lines: list[str]
    vocab_size: int
    settings: dict

    def run(self) -> bytes:
        return _train_serialized(self.lines, self.vocab_size, self.settings)
