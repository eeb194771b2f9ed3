"""The corpus passes of the recipe: each corpus is streamed in batches through the worker processes.

The domain corpus is read once for the training lines (:func:`training_lines`), then segmented with the
base model (:func:`base_pass`: tokens per document, word counts for guided BPE) and with adapted models
(:func:`adapted_pass`: uses of the added ids, the report's counts); the general corpus likewise, and once
for the candidates' rarity (:func:`document_frequency`). The parent reads the JSONL files and keeps a
small corpus in memory; the workers (:mod:`.workers`) mask blobs and encode. Memory stays bounded by the
batch size, the chunk cache, the training-line cap and the distinct words, not by the corpus size, and a
long document is taken in pieces of :data:`~.chunked_encoding.SEGMENT_CHARS` that give the exact ids of the
whole (:func:`measured_pieces`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from dapt.compat import sentencepiece_model_pb2 as sp_pb2
from dapt.corpus import CorpusCounter, iter_batches, mask_blobs_by_line
from dapt.tokenizer import chunked_encoding
from dapt.tokenizer.candidates import DocumentFrequency
from dapt.tokenizer.chunked_encoding import ChunkEncoder, chunk_aligned, line_slices
from dapt.tokenizer.domain_tokenizer import TrainingLines
from dapt.tokenizer.guided_bpe import WordCounter
from dapt.tokenizer.report import CorpusSums
from dapt.tokenizer.sentencepiece_model import parse_proto
from dapt.tokenizer.workers import InlinePool, WorkerPool

BATCH_CHARS = 1_000_000  # characters of documents the parent sends a worker at once
PREPARE_CHARS = 2_000_000  # characters whose chunks a worker encodes in one call


@dataclass(frozen=True)
class Item:
    """What a worker needs of a document: its text and the groups the report counts it in."""

    text: str
    source: str
    file_type: str


class StreamedCorpus:
    """A JSONL corpus read in batches as often as needed; ``mask``: its blobs are masked before measuring.

    The first pass counts documents and bytes (:attr:`counter`); a corpus of at
    most ``keep_chars`` characters is kept in memory after it, larger ones are read
    again on every pass, so memory stays bounded whatever the corpus size.
    """

    def __init__(self, path: Path, name: str, text_keys: tuple[str, ...], mask: bool,
                 keep_chars: int = 64_000_000, batch_chars: int = BATCH_CHARS):
        self.path, self.name, self.text_keys, self.mask = path, name, text_keys, mask
        self.keep_chars, self.batch_chars = keep_chars, batch_chars
        self.counter = CorpusCounter(name, path)
        self._kept: list[list[Item]] | None = None
        self._passes = 0

    def batches(self) -> Iterator[list[Item]]:
        """Lists of documents in corpus order."""
        if self._kept is not None:
            yield from self._kept
            return
        first = self._passes == 0
        self._passes += 1
        kept: list | None = [] if first else None
        size = 0
        progress = tqdm(desc=f"reading {self.name}", unit=" docs", leave=False)
        for docs in iter_batches(self.path, self.text_keys, self.batch_chars):
            if first:
                for doc in docs:
                    self.counter.add(doc)
            batch = [Item(d.text, d.source, d.file_type) for d in docs]
            if kept is not None:
                size += sum(len(item.text) for item in batch)
                kept = kept + [batch] if size <= self.keep_chars else None
            progress.update(len(docs))
            yield batch
        progress.close()
        if first:
            self.counter.summary()  # an empty corpus is an error
            self._kept = kept


Pool = InlinePool | WorkerPool


# --- the measured text: masked, in exact pieces ----------------------------------------------------


def measured_pieces(text: str, mask: bool, whole: bool = False) -> Iterator[str]:
    """The text a pass measures (blobs masked if asked), in pieces cut at chunk starts.

    A document of at most :data:`~.chunked_encoding.SEGMENT_CHARS` characters is one piece; a longer one is masked line
    slice by line slice (no blob crosses a line break) and re-cut at chunk starts, so encoding the pieces
    one by one (the first with the dummy prefix) gives the ids of the whole. ``whole``: one piece always
    (for a model whose pieces may span chunks).
    """
    if len(text) <= chunked_encoding.SEGMENT_CHARS:
        yield mask_blobs_by_line(text) if mask else text
        return
    slices = line_slices(text)
    masked = map(mask_blobs_by_line, slices) if mask else slices
    if whole:
        yield "".join(masked)
    else:
        yield from chunk_aligned(masked)


def _prepared_groups(encoder: ChunkEncoder, items: list[Item], mask: bool) -> Iterator[list[tuple]]:
    """(item index, piece, units) for every measured piece of ``items``, in groups whose units are prepared.

    Consume a group (its lengths) before anything else uses the encoder: the next group may empty its cache.
    """
    group: list[tuple] = []
    size = 0
    for index, item in enumerate(items):
        for number, piece in enumerate(measured_pieces(item.text, mask, whole=not encoder.chunked)):
            group.append((index, piece, encoder.units(piece, first=number == 0)))
            size += len(piece)
            if size >= PREPARE_CHARS:
                encoder.prepare(u for _, _, units in group for u in units)
                yield group
                group, size = [], 0
    if group:
        encoder.prepare(u for _, _, units in group for u in units)
        yield group


class _UnitTally:
    """Counts of encoding units, turned into per-token results in bounded chunks."""

    def __init__(self, encoder: ChunkEncoder, consume) -> None:
        self.encoder, self.consume = encoder, consume
        self.pending: Counter = Counter()

    def add(self, units: list[list[str]]) -> None:
        for per_piece in units:
            self.pending.update(per_piece)
        if len(self.pending) > self.encoder.max_cached // 2:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.encoder.prepare(self.pending)
            cache = self.encoder.cache
            self.consume((cache[unit], count) for unit, count in self.pending.items())
            self.pending.clear()


# --- the jobs the workers run ----------------------------------------------------------------------


@dataclass
class TrainingLinesJob:
    """The first pass over the domain corpus: each batch's sample of training lines (blobs masked)."""

    limit: int
    mask: bool

    def start(self) -> None:
        pass

    def batch(self, items: list[Item], cutoff: tuple[int, str] | None) -> TrainingLines:
        sample = TrainingLines(self.limit, cutoff)
        for item in items:
            if len(item.text) <= chunked_encoding.SEGMENT_CHARS:
                sample.add(mask_blobs_by_line(item.text) if self.mask else item.text)
            else:
                for piece in line_slices(item.text):
                    sample.add(mask_blobs_by_line(piece) if self.mask else piece)
        return sample.compact()

    def finish(self) -> None:
        return None


@dataclass
class BasePassJob:
    """Tokens per document with the base model, and (``count_words``) the word counts guided BPE learns on."""

    model: bytes
    mask: bool
    count_words: bool

    def start(self) -> None:
        self.encoder = ChunkEncoder(parse_proto(self.model), threads=1)
        self.words = WordCounter(self.encoder.pieces) if self.count_words else None
        self.tally = _UnitTally(self.encoder, self._count) if self.words else None

    def _count(self, weighted) -> None:
        for ids, n in weighted:
            self.words.add(ids, n)

    def batch(self, items: list[Item], extra: None) -> list[int]:
        lengths = [0] * len(items)
        for group in _prepared_groups(self.encoder, items, self.mask):
            for index, _, units in group:
                lengths[index] += self.encoder.length(units)
            if self.tally is not None:
                self.tally.add([units for _, _, units in group])
        return lengths

    def finish(self) -> Counter | None:
        if self.tally is None:
            return None
        self.tally.flush()
        return self.words.counts


@dataclass
class AdaptedPassJob:
    """Uses of the added ids (``id >= first_new``) with an extended model; with ``stats`` per document the
    measured text's bytes and words and its token count."""

    model: bytes
    mask: bool
    first_new: int
    stats: bool

    def start(self) -> None:
        self.encoder = ChunkEncoder(parse_proto(self.model), threads=1)
        self.produced: Counter = Counter()
        self.tally = _UnitTally(self.encoder, self._count)

    def _count(self, weighted) -> None:
        first_new, produced = self.first_new, self.produced
        for ids, n in weighted:
            for token_id in ids:
                if token_id >= first_new:
                    produced[token_id] += n

    def batch(self, items: list[Item], extra: None) -> list[tuple[int, int, int]] | None:
        counts = [[0, 0, 0] for _ in items] if self.stats else None
        for group in _prepared_groups(self.encoder, items, self.mask):
            if counts is not None:
                for index, piece, units in group:
                    row = counts[index]
                    row[0] += len(piece.encode("utf-8"))
                    row[1] += len(piece.split())
                    row[2] += self.encoder.length(units)
            self.tally.add([units for _, _, units in group])
        return [tuple(row) for row in counts] if counts is not None else None

    def finish(self) -> Counter:
        self.tally.flush()
        return self.produced


@dataclass
class DocumentFrequencyJob:
    """In how many documents each piece occurs (raw text, see :class:`~.candidates.DocumentFrequency`)."""

    pieces: list[str]

    def start(self) -> None:
        self.counter = DocumentFrequency(self.pieces)

    def batch(self, items: list[Item], extra: None) -> None:
        for item in items:
            self.counter.add(item.text)

    def finish(self) -> Counter:
        return self.counter.counts


# --- the passes ------------------------------------------------------------------------------------


def _sum(counters: list[Counter | None]) -> Counter | None:
    if counters[0] is None:
        return None
    total = counters[0]
    for other in counters[1:]:
        total.update(other)
    return total


def training_lines(corpus: StreamedCorpus, pool: Pool, limit: int) -> TrainingLines:
    """The domain tokenizer's training lines (the corpus's first pass: read, blobs masked, counted)."""
    lines = TrainingLines(limit)
    pool.run(TrainingLinesJob(limit, corpus.mask), corpus.batches(), lines.merge,
             extra=lambda: lines.cutoff if lines.keyed is not None else None)
    return lines


def base_pass(corpus: StreamedCorpus, pool: Pool, base: sp_pb2.ModelProto,
              count_words: bool) -> tuple[list[int], Counter | None]:
    """One pass with the base model: tokens per document, and (``count_words``) word counts for guided BPE."""
    lengths: list[int] = []
    totals = pool.run(BasePassJob(base.SerializeToString(), corpus.mask, count_words), corpus.batches(),
                      lengths.extend)
    return lengths, _sum(totals)


def adapted_pass(corpus: StreamedCorpus, pool: Pool, model: sp_pb2.ModelProto, first_new: int,
                 before: list[int] | None = None) -> tuple[Counter, dict | None]:
    """One pass with an extended model: uses of the added ids, and the report's statistics given ``before``
    (tokens per document with the base model)."""
    sums = CorpusSums() if before is not None else None
    items: list[list[Item]] = []
    position = [0]

    def batches() -> Iterator[list[Item]]:
        for batch in corpus.batches():
            if sums is not None:
                items.append([Item("", i.source, i.file_type) for i in batch])  # groups only, no text
            yield batch

    def collect(counts) -> None:
        if sums is None:
            return
        for item, (num_bytes, words, after) in zip(items.pop(0), counts):
            sums.add(item.source, item.file_type, num_bytes, words, before[position[0]], after)
            position[0] += 1

    job = AdaptedPassJob(model.SerializeToString(), corpus.mask, first_new, stats=sums is not None)
    produced = _sum(pool.run(job, batches(), collect))
    return produced, (sums.stats() if sums is not None else None)


def document_frequency(corpus: StreamedCorpus, pool: Pool, pieces: list[str]) -> Counter:
    """In how many documents of ``corpus`` each piece occurs as a substring (one pass)."""
    return _sum(pool.run(DocumentFrequencyJob(pieces), corpus.batches(), lambda _: None))
