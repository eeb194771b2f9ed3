"""Recipe step 1: train a domain SentencePiece tokenizer with Llama 2's own trainer settings.

SentencePiece trains on lines. The domain corpus's non-blank lines are the training text, at most
``limit`` of them (:class:`TrainingLines`: a fixed, order-independent hash sample beyond the cap, so the
training's memory and time stay bounded whatever the corpus size). The training runs in a child process
(:class:`DomainTrainer`) while the main process segments the corpora with the base model.
"""

from __future__ import annotations

import multiprocessing
import zlib
from collections.abc import Iterable
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


def _training_lines(texts: Iterable[str]) -> list[str]:
    """SentencePiece trains on lines: split documents, drop blank lines."""
    return [line for text in texts for line in text.split("\n") if line.strip()]


class TrainingLines:
    """The domain tokenizer's training lines, at most ``limit`` of them, chosen independently of order.

    Below the limit every non-blank line is kept in corpus order. Above it, the
    lines with the smallest (CRC-32, text) keys are kept, in key order: the same
    sample whatever order the documents come in, and memory bounded by the limit.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.seen = 0
        self.lines: list[str] = []
        self.keyed: list[tuple[int, str]] | None = None
        self.cutoff = (1 << 32, "")

    def add(self, text: str) -> None:
        lines = [line for line in text.split("\n") if line.strip()]
        self.seen += len(lines)
        if self.keyed is None:
            self.lines.extend(lines)
            if len(self.lines) > self.limit:
                self.keyed = []
                self._add_keyed(self.lines)
                self.lines = []
        else:
            self._add_keyed(lines)

    def _add_keyed(self, lines: list[str]) -> None:
        keys = map(zlib.crc32, map(str.encode, lines, repeat("utf-8", len(lines)), repeat("surrogatepass", len(lines))))
        cut_key = self.cutoff[0]
        self.keyed.extend((k, line) for k, line in zip(keys, lines) if k <= cut_key)
        if len(self.keyed) > self.limit + self.limit // 2:
            self._shrink()

    def _shrink(self) -> None:
        self.keyed.sort()
        del self.keyed[self.limit:]
        self.cutoff = self.keyed[-1]

    def result(self) -> list[str]:
        """The kept lines."""
        if self.keyed is None:
            return self.lines
        self._shrink()
        return [line for _, line in self.keyed]


def train_sentencepiece(texts: Iterable[str], vocab_size: int, settings: dict, threads: int = 2,
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


def _train_in_child(connection, lines: list[str], vocab_size: int, settings: dict) -> None:
    """Child-process entry: send back the serialised model, or the error."""
    try:
        connection.send((True, _train_serialized(lines, vocab_size, settings)))
    except BaseException as error:  # noqa: BLE001 - the parent re-raises it
        connection.send((False, error))
    finally:
        connection.close()


class DomainTrainer:
    """Trains the domain tokenizer in a child process (``workers`` >= 2) or, when asked for, in this one."""

    def __init__(self, lines: list[str], vocab_size: int, settings: dict, workers: int):
        self.args = (lines, vocab_size, settings)
        self.process = None
        if workers >= 2:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            context = multiprocessing.get_context(method)
            self.connection, child_end = context.Pipe(duplex=False)
            self.process = context.Process(target=_train_in_child, args=(child_end, *self.args), daemon=True)
            self.process.start()
            child_end.close()

    def running(self) -> bool:
        """True while the child process has not sent its result."""
        return self.process is not None and not self.connection.poll()

    def result(self) -> sp_pb2.ModelProto:
        """The trained model (waits for the child process)."""
        if self.process is None:
            data = _train_serialized(*self.args)
        else:
            try:
                ok, data = self.connection.recv()
            except EOFError:
                raise TokenizerError("the domain tokenizer's training process died (out of memory?).") from None
            self.process.join()
            self.close()
            if not ok:
                raise data
        return parse_proto(data)

    def close(self) -> None:
        """Wait for the child process, stopping it first if its result is no longer wanted."""
        if self.process is not None:
            if self.process.is_alive() and not self.connection.poll():
                self.process.terminate()
            self.process.join()
            self.connection.close()
            self.process = None
