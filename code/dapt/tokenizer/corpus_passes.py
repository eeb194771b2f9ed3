"""The corpus passes of the recipe: each corpus is streamed in batches, never held whole.

The domain corpus is read once for the training lines (:func:`training_lines`), then segmented with the
base model (:func:`base_pass`: tokens per document, word counts for guided BPE) and with the adapted model
(:func:`adapted_pass`: uses of the added ids, the report's counts); the general corpus likewise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from dapt.corpus import CorpusCounter, Document, iter_batches, mask_blobs_by_line
from dapt.tokenizer import guided_bpe
from dapt.tokenizer.chunked_encoding import ChunkEncoder
from dapt.tokenizer.domain_tokenizer import TrainingLines


class StreamedCorpus:
    """A JSONL corpus read in batches as often as needed, with blobs masked if asked.

    The first pass counts documents and bytes (:attr:`counter`); a corpus of at
    most ``keep_chars`` characters is kept in memory after it, larger ones are read
    again on every pass, so memory stays bounded whatever the corpus size.
    """

    def __init__(self, path: Path, name: str, text_keys: tuple[str, ...], mask: bool,
                 keep_chars: int = 64_000_000, batch_chars: int = 4_000_000):
        self.path, self.name, self.text_keys, self.mask = path, name, text_keys, mask
        self.keep_chars, self.batch_chars = keep_chars, batch_chars
        self.counter = CorpusCounter(name, path)
        self._kept: list[list[tuple[Document, str]]] | None = None
        self._passes = 0

    def batches(self) -> Iterator[list[tuple[Document, str]]]:
        """Lists of (document, text to measure) in corpus order."""
        if self._kept is not None:
            yield from self._kept
            return
        first = self._passes == 0
        self._passes += 1
        kept: list | None = [] if first else None
        size = 0
        progress = tqdm(desc=f"reading {self.name}", unit=" docs", leave=False)
        for docs in iter_batches(self.path, self.text_keys, self.batch_chars):
            batch = [(d, mask_blobs_by_line(d.text) if self.mask else d.text) for d in docs]
            if first:
                for doc in docs:
                    self.counter.add(doc)
            if kept is not None:
                size += sum(len(text) for _, text in batch)
                kept = kept + [batch] if size <= self.keep_chars else None
            progress.update(len(docs))
            yield batch
        progress.close()
        if first:
            self.counter.summary()  # an empty corpus is an error
            self._kept = kept

    def texts(self) -> Iterator[str]:
        """The texts to measure, one document after the other."""
        for batch in self.batches():
            for _, text in batch:
                yield text


def _units_of(encoder: ChunkEncoder, batch: list[tuple[Document, str]]) -> list[list[str]]:
    units = [encoder.units(text) for _, text in batch]
    encoder.prepare(u for per_text in units for u in per_text)
    return units


class _UnitTally:
    """Counts of encoding units over a corpus, turned into per-token results in bounded chunks."""

    def __init__(self, encoder: ChunkEncoder, consume) -> None:
        self.encoder, self.consume = encoder, consume
        self.pending: Counter = Counter()

    def add(self, units: list[list[str]]) -> None:
        for per_text in units:
            self.pending.update(per_text)
        if len(self.pending) > self.encoder.max_cached // 2:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.encoder.prepare(self.pending)
            cache = self.encoder.cache
            self.consume((cache[unit], count) for unit, count in self.pending.items())
            self.pending.clear()


def base_pass(corpus: StreamedCorpus, encoder: ChunkEncoder, words: guided_bpe.WordCounter | None) -> list[int]:
    """One pass with the base model: tokens per document, and word counts for guided BPE."""
    tally = _UnitTally(encoder, lambda weighted: [words.add(ids, n) for ids, n in weighted]) if words else None
    lengths: list[int] = []
    for batch in corpus.batches():
        units = _units_of(encoder, batch)
        lengths.extend(map(encoder.length, units))
        if tally is not None:
            tally.add(units)
    if tally is not None:
        tally.flush()
    return lengths


def training_lines(corpus: StreamedCorpus, limit: int) -> TrainingLines:
    """The domain tokenizer's training lines (the corpus's first pass: read, blobs masked, counted)."""
    lines = TrainingLines(limit)
    for batch in corpus.batches():
        for _, text in batch:
            lines.add(text)
    return lines


def adapted_pass(corpus: StreamedCorpus, encoder: ChunkEncoder, first_new: int,
                 before: list[int] | None = None) -> tuple[Counter, dict | None]:
    """One pass with an extended model: uses of the added ids, and report statistics given ``before``."""
    from dapt.tokenizer.report import CorpusSums

    produced: Counter = Counter()

    def count(weighted) -> None:
        for ids, n in weighted:
            for token_id in ids:
                if token_id >= first_new:
                    produced[token_id] += n

    tally = _UnitTally(encoder, count)
    sums = CorpusSums() if before is not None else None
    index = 0
    for batch in corpus.batches():
        units = _units_of(encoder, batch)
        if sums is not None:
            for (doc, text), per_text in zip(batch, units):
                sums.add(doc, text, before[index], encoder.length(per_text))
                index += 1
        tally.add(units)
    tally.flush()
    return produced, (sums.stats() if sums is not None else None)
