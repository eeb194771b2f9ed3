"""Domain-adapted tokenizer: train a domain SentencePiece model, pick the domain tokens Llama 2 lacks,
merge them into the base model, pad for tensor parallelism, and write SentencePiece + HF files.

Two merge methods:

* ``guided-bpe`` (default): new NORMAL pieces learned as continued BPE merges over the base
  model's own segmentation of the domain data, scored by domain use minus a penalty for general
  use, with a bonus for pieces the trained domain tokenizer proposes. Every new piece is reachable,
  no text gets longer, and transformers' fast tokenizer gives the same ids as SentencePiece.
* ``chipnemo``: the original recipe with its defects fixed: the domain tokenizer's pieces that
  contain a letter, are absent from the base vocabulary and occur in at most ``occur_limit`` general
  documents, extended as USER_DEFINED pieces, and the most used ones kept up to ``freq_threshold``
  of all uses (a correct cumulative cut).
"""

from __future__ import annotations

import json
import multiprocessing
import re
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Literal

import numpy as np
import sentencepiece as spm
from tqdm.auto import tqdm

from dapt import guided_bpe
from dapt.artifacts import file_sha256, stage_output, write_json
from dapt.compat import sentencepiece_model_pb2 as sp_pb2
from dapt.config import DEFAULT_GENERAL_DATA, DEFAULT_OUTPUTS, param
from dapt.corpus import (
    DEFAULT_HELDOUT,
    Corpus,
    CorpusCounter,
    Document,
    find_jsonl_files,
    iter_batches,
    load_corpus,
    looks_like_blob,
    mask_blobs_by_line,
)
from dapt.errors import UserInputError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
RESERVED_TEMPLATE = "<extra_id_{}>"
TOKENIZER_FILE = "tokenizer.model"
DOMAIN_TOKENS_FILE = "domain_tokens.json"

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


class TokenizerError(UserInputError):
    """A tokenizer file or parameter cannot be used."""


# --- SentencePiece model files ---------------------------------------------------------------------


def resolve_sp_model(path: str | Path) -> Path:
    """A SentencePiece model file, given the file or a folder holding ``tokenizer.model``."""
    path = Path(path)
    candidate = path / TOKENIZER_FILE if path.is_dir() else path
    if not candidate.is_file():
        raise TokenizerError(
            f"no SentencePiece model at {path}: pass a .model file or a model folder holding {TOKENIZER_FILE} "
            "(for example a Llama-2-7b-hf download)."
        )
    return candidate


def load_proto(path: str | Path) -> sp_pb2.ModelProto:
    """Parse a SentencePiece model file into its protobuf."""
    model = sp_pb2.ModelProto()
    path = resolve_sp_model(path)
    try:
        model.ParseFromString(path.read_bytes())
    except Exception as error:  # protobuf raises DecodeError, a plain Exception subclass
        raise TokenizerError(f"{path} is not a SentencePiece model ({error}).") from None
    if not model.pieces:
        raise TokenizerError(f"{path} is not a SentencePiece model (no pieces).")
    return model


def processor(model: sp_pb2.ModelProto) -> spm.SentencePieceProcessor:
    """A SentencePiece processor for an in-memory model."""
    return spm.SentencePieceProcessor(model_proto=model.SerializeToString())


def without_dummy_prefix(model: sp_pb2.ModelProto) -> spm.SentencePieceProcessor:
    """A processor that encodes a piece's surface text as it appears inside a text (no leading '▁' added)."""
    copy = sp_pb2.ModelProto()
    copy.CopyFrom(model)
    copy.normalizer_spec.add_dummy_prefix = False
    return processor(copy)


def surface(piece: str) -> str:
    """The text a piece stands for ('▁' is a space)."""
    return piece.replace("▁", " ")


_CHUNK = re.compile(r" +[^ ]*|[^ ]+")


def chunk_safe(model: sp_pb2.ModelProto) -> bool:
    """True when encoding a text equals encoding its space-delimited chunks one by one.

    That holds when the normaliser is the identity and keeps spaces, and no piece
    holds a space ('▁') after another character: then no piece can span the start
    of a run of spaces, so chunks starting there are independent.
    """
    spec = model.normalizer_spec
    if spec.name != "identity" or spec.remove_extra_whitespaces or model.trainer_spec.treat_whitespace_as_suffix:
        return False
    return not any(re.search(r"[^▁]▁", p.piece) for p in model.pieces)


class ChunkEncoder:
    """Exact SentencePiece ids of texts, each distinct space-delimited chunk encoded once.

    A text is cut into units: its space-delimited chunks when :func:`chunk_safe`
    holds (the first one with the dummy prefix), else the whole text. Units are
    encoded in batches and cached across calls; the cache is emptied when it would
    exceed ``max_cached`` units, so memory stays bounded on any corpus.
    """

    def __init__(self, model: sp_pb2.ModelProto, max_cached: int = 500_000):
        self.chunked = chunk_safe(model)
        self.prefix = " " if model.normalizer_spec.add_dummy_prefix else ""
        self.sp = without_dummy_prefix(model) if self.chunked else processor(model)
        self.max_cached = max_cached
        self.pieces = [p.piece for p in model.pieces]
        self.cache: dict[str, list[int]] = {}

    def units(self, text: str) -> list[str]:
        """The pieces of ``text`` that are encoded independently."""
        if not self.chunked:
            return [text]
        chunks = _CHUNK.findall(text)
        if chunks:
            chunks[0] = self.prefix + chunks[0]
        return chunks

    def prepare(self, units: Iterable[str]) -> None:
        """Encode every unit not cached yet, in one multi-threaded call."""
        cache = self.cache
        distinct = set(units)
        missing = [u for u in distinct if u not in cache]
        if len(cache) + len(missing) > self.max_cached:
            cache.clear()
            missing = list(distinct)
        if missing:
            cache.update(zip(missing, self.sp.encode(missing, num_threads=2)))

    def length(self, units: list[str]) -> int:
        """Number of tokens of a text given its (prepared) units."""
        return sum(map(len, map(self.cache.__getitem__, units)))

    def ids(self, units: list[str]) -> list[int]:
        """The ids of a text given its (prepared) units."""
        result: list[int] = []
        for unit in units:
            result.extend(self.cache[unit])
        return result

    def encode(self, texts: list[str]) -> list[list[int]]:
        """SentencePiece ids of ``texts``."""
        per_text = [self.units(t) for t in texts]
        if not self.chunked:
            return self.sp.encode(texts, num_threads=2)
        self.prepare(u for units in per_text for u in units)
        return [self.ids(units) for units in per_text]


def encode_texts(model: sp_pb2.ModelProto, texts: list[str]) -> list[list[int]]:
    """SentencePiece ids of many texts, each distinct space-delimited chunk encoded once.

    Gives exactly what ``SentencePieceProcessor.encode`` gives (see :func:`chunk_safe`;
    other models are encoded whole), several times faster on real corpora, where
    most chunks repeat.
    """
    return ChunkEncoder(model).encode(texts)


# --- training --------------------------------------------------------------------------------------


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
    model = sp_pb2.ModelProto()
    model.ParseFromString(buffer.data)
    return model


def _train_serialized(lines: list[str], vocab_size: int, settings: dict) -> bytes:
    """Child-process entry: train on ``lines`` and return the serialised model."""
    return train_sentencepiece((), vocab_size, settings, lines=lines).SerializeToString()


class _BytesSink:
    """Receives the trained model from SentencePiece instead of a file."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


@dataclass
class BaseTokenizerConfig:
    """The tiny profile's miniature base tokenizer: Llama 2's trainer settings on the general sample."""

    general_data: Path = param(DEFAULT_GENERAL_DATA, "general JSONL corpus to train on")
    output: Path = param(DEFAULT_OUTPUTS / "tiny" / "base_tokenizer", "output folder")
    vocab_size: int = param(2048, "vocabulary size of the miniature base")
    text_keys: tuple[str, ...] = param(("text",), "JSON keys that may hold the text")


def train_base_tokenizer(config: BaseTokenizerConfig) -> Path:
    """Train the miniature base tokenizer and write ``tokenizer.model`` into the output folder."""
    corpus = load_corpus(config.general_data, "general", config.text_keys)
    inputs = {"general_data": corpus.summary()}
    with stage_output(config.output, "base-tokenizer", config, inputs) as tmp:
        model = train_sentencepiece([d.text for d in corpus.documents], config.vocab_size, LLAMA2_TRAINER_SETTINGS)
        (tmp / TOKENIZER_FILE).write_bytes(model.SerializeToString())
    print(f"base tokenizer: {config.vocab_size} pieces -> {Path(config.output) / TOKENIZER_FILE}")
    return Path(config.output) / TOKENIZER_FILE


# --- candidates ------------------------------------------------------------------------------------


@dataclass
class Candidates:
    """Domain pieces the base lacks, with why the others were dropped."""

    pieces: list[str]
    general_doc_freq: dict[str, int]
    dropped: dict[str, int]


def _texts_of(corpus: Corpus | Iterable[str]) -> Iterable[str]:
    return (d.text for d in corpus.documents) if isinstance(corpus, Corpus) else corpus


def general_document_frequency(pieces: list[str], general: Corpus | Iterable[str]) -> Counter:
    """In how many general documents each piece occurs as a substring, in one pass over the corpus.

    ``general`` is a loaded corpus or any iterable of document texts (a stream).
    Text is compared in SentencePiece's normalised form (spaces as '▁', a leading
    '▁'), so a piece matches wherever SentencePiece could see it. One Aho-Corasick
    automaton scans each document once, whatever the number of pieces.
    """
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for index, piece in enumerate(pieces):
        automaton.add_word(piece, index)
    automaton.make_automaton()
    doc_freq: Counter = Counter()
    for text in _texts_of(general):
        normalised = "▁" + text.replace(" ", "▁")
        doc_freq.update({pieces[index] for _, index in automaton.iter(normalised)})
    return doc_freq


def find_candidates(
    domain_model: sp_pb2.ModelProto,
    base_vocab: set[str],
    general: Corpus | Iterable[str],
    occur_limit: int,
    require_letter: bool = True,
) -> Candidates:
    """Domain pieces absent from the base, not blob fragments, occurring in at most ``occur_limit`` general docs."""
    dropped: Counter = Counter()
    shaped = []
    for entry in domain_model.pieces:
        piece = entry.piece
        reason = None
        if entry.type != NORMAL:
            reason = "special"
        elif piece in base_vocab:
            reason = "in base vocabulary"
        elif len(piece.strip("▁")) == 0:
            reason = "whitespace only"
        elif require_letter and not any(c.isalpha() for c in piece):
            reason = "no letter"
        elif looks_like_blob(piece):
            reason = "blob fragment"
        if reason:
            dropped[reason] += 1
        else:
            shaped.append(piece)
    doc_freq = general_document_frequency(shaped, general) if shaped else Counter()
    kept = [p for p in shaped if doc_freq[p] <= occur_limit]
    if len(kept) < len(shaped):
        dropped["frequent in general data"] = len(shaped) - len(kept)
    return Candidates(pieces=kept, general_doc_freq={p: doc_freq[p] for p in kept}, dropped=dict(dropped))


def cumulative_cut(counts: list[int], threshold: float) -> int:
    """Smallest k such that the k largest counts reach ``threshold`` of the total (counts sorted descending)."""
    total = sum(counts)
    if total == 0:
        return 0
    cumulative = np.cumsum(np.asarray(counts, dtype=np.float64)) / total
    return int(min(np.searchsorted(cumulative, threshold - 1e-12) + 1, len(counts)))


# --- building models -------------------------------------------------------------------------------


def extend_model(base: sp_pb2.ModelProto, pieces: list[str], piece_type: int) -> sp_pb2.ModelProto:
    """The base model plus ``pieces`` appended in order.

    NORMAL pieces are scored below every base piece and strictly decreasing, with
    scores that stay distinct in float32 (SentencePiece and the HF converter order
    merges by score).
    """
    model = sp_pb2.ModelProto()
    model.CopyFrom(base)
    floor = min(p.score for p in base.pieces)
    step = max(1.0, abs(floor) * 1e-6)
    existing = {p.piece for p in base.pieces}
    for rank, piece in enumerate(pieces, start=1):
        if piece in existing:
            raise TokenizerError(f"piece {piece!r} is already in the base vocabulary")
        entry = model.pieces.add()
        entry.piece = piece
        entry.type = piece_type
        entry.score = floor - step * rank if piece_type == NORMAL else 0.0
    scores = np.asarray([p.score for p in model.pieces[len(base.pieces):]], dtype=np.float32)
    if piece_type == NORMAL and len(scores) > 1 and not np.all(np.diff(scores) < 0):
        raise TokenizerError("new piece scores collide in float32; too many pieces for this base")
    return model


def pad_vocabulary(model: sp_pb2.ModelProto, max_tensor_parallel: int, min_reserved: int) -> int:
    """Append reserved CONTROL pieces until the size is a multiple of 128 x max TP (at least ``min_reserved``)."""
    multiple = 128 * max_tensor_parallel
    size = len(model.pieces) + min_reserved
    target = -(-size // multiple) * multiple
    existing = {p.piece for p in model.pieces}
    index = 0
    added = 0
    while len(model.pieces) < target:
        name = RESERVED_TEMPLATE.format(index)
        index += 1
        if name in existing:
            continue
        entry = model.pieces.add()
        entry.piece, entry.type, entry.score = name, CONTROL, 0.0
        added += 1
    return added


# --- streamed corpora ------------------------------------------------------------------------------


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
    from dapt.tokenizer_report import CorpusSums

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


# --- the two methods -------------------------------------------------------------------------------


@dataclass
class Selection:
    """The pieces a method adds (in id order), their domain use, and method-specific facts."""

    pieces: list[str]
    piece_type: int
    domain_use: dict[str, int]
    details: dict


def select_chipnemo(
    base: sp_pb2.ModelProto, candidates: Candidates, domain: StreamedCorpus | list[str], threshold: float,
    max_added: int | None,
) -> Selection:
    """The original recipe, fixed: extend with all candidates as USER_DEFINED, keep the most used."""
    extended = extend_model(base, candidates.pieces, USER_DEFINED)
    first_new = len(base.pieces)
    if isinstance(domain, StreamedCorpus):
        uses, _ = adapted_pass(domain, ChunkEncoder(extended), first_new)
    else:
        uses = Counter(i for ids in encode_texts(extended, domain) for i in ids if i >= first_new)
    ranked = sorted(((uses[first_new + k], p) for k, p in enumerate(candidates.pieces) if uses[first_new + k] > 0),
                    key=lambda item: (-item[0], item[1]))
    keep = cumulative_cut([count for count, _ in ranked], threshold)
    if max_added is not None:
        keep = min(keep, max_added)
    chosen = ranked[:keep]
    return Selection(
        pieces=[p for _, p in chosen],
        piece_type=USER_DEFINED,
        domain_use={p: c for c, p in chosen},
        details={"used_candidates": len(ranked), "kept_by_threshold": keep},
    )


def select_guided_bpe(
    base: sp_pb2.ModelProto, candidates: Candidates, pairs: guided_bpe.PairStats, config: TokenizerConfig,
) -> Selection:
    """Continued BPE over the base segmentation (as :func:`guided_bpe.pair_statistics`), guided by the domain
    tokenizer."""
    vocab = {p.piece for p in base.pieces}
    started = time.perf_counter()
    guide = {c[i:j] for c in candidates.pieces for i in range(len(c)) for j in range(i + 2, len(c) + 1)}
    budget = config.max_added_tokens or len(candidates.pieces)
    result = guided_bpe.learn_merges(
        pairs, vocab, max_merges=budget,
        general_penalty=config.general_penalty, min_domain_count=config.min_domain_count,
        guide=guide, guide_bonus=config.guide_bonus, split_digits=base.trainer_spec.split_digits,
    )
    kept = guided_bpe.select_by_use(result, config.freq_threshold, config.max_added_tokens)
    candidate_set = set(candidates.pieces)
    return Selection(
        pieces=[m.piece for m in kept],
        piece_type=NORMAL,
        domain_use={m.piece: result.final_use.get(m.piece, 0) for m in kept},
        details={
            "merges_learned": len(result.merges),
            "merges_kept": len(kept),
            "guided_pieces": sum(1 for m in kept if m.piece in guide),
            "candidate_pieces_added": sum(1 for m in kept if m.piece in candidate_set),
            "bpe_seconds": round(time.perf_counter() - started, 2),
        },
    )


# --- verification ----------------------------------------------------------------------------------


def reachability(model: sp_pb2.ModelProto, first_new: int, count: int, produced: Counter) -> dict:
    """Which added pieces SentencePiece produces: on the domain data (``produced``: id -> uses), or from their text."""
    alone = without_dummy_prefix(model)
    unreachable = []
    for offset in range(count):
        token_id = first_new + offset
        if produced[token_id]:
            continue
        piece = model.pieces[token_id].piece
        if alone.encode(surface(piece)) != [token_id]:
            unreachable.append(piece)
    return {
        "added": count,
        "seen_in_domain_data": sum(1 for k in range(count) if produced[first_new + k]),
        "reachable": count - len(unreachable),
        "unreachable": unreachable,
    }


def prune_unused(model: sp_pb2.ModelProto, base_size: int, keep_pieces: list[str], produced: Counter,
                 piece_type: int) -> list[str]:
    """Drop added pieces SentencePiece never produces on the domain data and no kept piece is built from.

    ``produced`` counts the added ids in the domain data's segmentation. A NORMAL
    piece that is never produced may still be an intermediate merge of a produced
    one (SentencePiece merges pairwise), so only pieces that are no substring-building
    step of a produced piece are dropped: that costs no compression.
    """
    used = {model.pieces[i].piece for i, n in produced.items() if n and i >= base_size}
    if piece_type != NORMAL:
        return [p for p in keep_pieces if p in used]
    needed = set(used)
    for piece in used:
        needed.update(piece[i:j] for i in range(len(piece)) for j in range(i + 2, len(piece) + 1))
    return [p for p in keep_pieces if p in needed]


# --- the stage -------------------------------------------------------------------------------------


@dataclass
class TokenizerConfig:
    """Parameters of the tokenizer adaptation (``python -m dapt tokenizer``)."""

    base_tokenizer: Path = param(DEFAULT_OUTPUTS / "tiny" / "base_tokenizer",
                                 "base SentencePiece model, or a model folder holding tokenizer.model")
    domain_data: Path = param(DEFAULT_GENERAL_DATA.parent / "data", "domain JSONL corpus (any folder depth)")
    general_data: Path = param(DEFAULT_GENERAL_DATA, "general JSONL corpus (any folder depth)")
    output: Path = param(DEFAULT_OUTPUTS / "tiny" / "tokenizer", "output folder")
    method: Literal["guided-bpe", "chipnemo"] = param("guided-bpe", "how domain tokens join the base model")
    domain_vocab_size: int = param(16000, "vocabulary size of the domain SentencePiece tokenizer")
    occur_limit: int = param(3, "candidates may occur in at most this many general documents")
    freq_threshold: float = param(0.98, "keep the most used new tokens up to this share of all their uses")
    max_added_tokens: int | None = param(None, "cap on added tokens before padding; None: no cap")
    general_penalty: float = param(4.0, "guided-bpe: a merge's general-text count is weighted by this")
    guide_bonus: float = param(1.0, "guided-bpe: score bonus for pieces the domain tokenizer proposes")
    min_domain_count: int = param(3, "guided-bpe: a merge must occur at least this often in the domain data")
    max_tensor_parallel: int = param(8, "pad the vocabulary to a multiple of 128 x this")
    min_reserved: int = param(3, "at least this many reserved tokens for later fine-tuning")
    text_keys: tuple[str, ...] = param(("text",), "JSON keys that may hold the text")
    heldout_domain: Path | None = param(DEFAULT_HELDOUT / "domain", "held-out domain JSONL for the report")
    heldout_general: Path | None = param(DEFAULT_HELDOUT / "general", "held-out general JSONL for the report")
    max_training_lines: int = param(
        1_000_000, "cap on the domain tokenizer's training lines (a fixed hash-chosen sample beyond it)")
    workers: int = param(2, "processes: with 2 the domain tokenizer trains in a child process meanwhile")


def _validate(config: TokenizerConfig) -> None:
    checks = [
        (config.domain_vocab_size >= 100, "domain_vocab_size must be at least 100"),
        (0 < config.freq_threshold <= 1, "freq_threshold must be in (0, 1]"),
        (config.occur_limit >= 0, "occur_limit must be >= 0"),
        (config.max_added_tokens is None or config.max_added_tokens > 0, "max_added_tokens must be positive"),
        (config.max_tensor_parallel >= 1, "max_tensor_parallel must be >= 1"),
        (config.min_reserved >= 0, "min_reserved must be >= 0"),
        (config.general_penalty >= 0 and config.guide_bonus >= 0, "general_penalty and guide_bonus must be >= 0"),
        (config.max_training_lines >= 1, "max_training_lines must be >= 1"),
        (config.workers >= 1, "workers must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise TokenizerError(f"bad parameter: {message}.")


class _StageClock:
    """Wall and CPU seconds per stage of this process."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.wall[name] = round(wall - self._wall, 2)
        self.cpu[name] = round(cpu - self._cpu, 2)
        self._wall, self._cpu = wall, cpu


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _train_in_child(connection, lines: list[str], vocab_size: int, settings: dict) -> None:
    """Child-process entry: send back the serialised model, or the error."""
    try:
        connection.send((True, _train_serialized(lines, vocab_size, settings)))
    except BaseException as error:  # noqa: BLE001 - the parent re-raises it
        connection.send((False, error))
    finally:
        connection.close()


class _Trainer:
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
        return self.process is not None and not self.connection.poll()

    def result(self) -> sp_pb2.ModelProto:
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
        model = sp_pb2.ModelProto()
        model.ParseFromString(data)
        return model

    def close(self) -> None:
        """Wait for the child process, stopping it first if its result is no longer wanted."""
        if self.process is not None:
            if self.process.is_alive() and not self.connection.poll():
                self.process.terminate()
            self.process.join()
            self.connection.close()
            self.process = None


def _preload_matplotlib() -> None:
    """Import the plotting library (half a second of CPU) while the main process waits for the training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def adapt_tokenizer(config: TokenizerConfig) -> Path:
    """Run the whole adaptation and write the tokenizer folder; returns its path.

    The corpora are streamed in batches: memory stays bounded by the batch size, the
    training-line cap and the distinct words, not by the corpus size.
    """
    from dapt import tokenizer_report

    _validate(config)
    clock = _StageClock()
    children_cpu = _children_cpu()
    base_path = resolve_sp_model(config.base_tokenizer)
    base = load_proto(base_path)
    base_vocab = {p.piece for p in base.pieces}
    for path in (config.domain_data, config.general_data):
        find_jsonl_files(path)  # a missing or empty folder fails before any work
    domain = StreamedCorpus(config.domain_data, "domain", config.text_keys, mask=True)
    general = StreamedCorpus(config.general_data, "general", config.text_keys, mask=False)
    guided = config.method == "guided-bpe"

    lines = training_lines(domain, config.max_training_lines)
    clock.lap("read domain data")
    settings = dict(LLAMA2_TRAINER_SETTINGS, character_coverage=base.trainer_spec.character_coverage or 0.99995)
    trainer = _Trainer(lines.result(), config.domain_vocab_size, settings, config.workers)
    try:  # while the domain tokenizer trains: everything that needs only the base model
        encoder = ChunkEncoder(base)
        words = {name: guided_bpe.WordCounter(encoder.pieces) if guided else None for name in ("domain", "general")}
        before = {"domain": base_pass(domain, encoder, words["domain"])}
        clock.lap("domain pass (base segmentation)")
        before["general"] = base_pass(general, encoder, words["general"])
        del encoder
        clock.lap("general pass (base segmentation)")
        pairs = guided_bpe.pair_statistics(words["domain"].counts, words["general"].counts) if guided else None
        del words
        clock.lap("pair statistics")
        if trainer.running():
            _preload_matplotlib()
            clock.lap("import matplotlib")
        domain_model = trainer.result()
    finally:
        trainer.close()
    clock.lap("train domain tokenizer (wait)")
    candidates = find_candidates(domain_model, base_vocab, general.texts(), config.occur_limit)
    clock.lap("candidates")
    if not candidates.pieces:
        raise TokenizerError(
            f"no candidate domain tokens: every piece of the {config.domain_vocab_size}-piece domain tokenizer is "
            f"in the base vocabulary or frequent in {config.general_data}; raise --domain-vocab-size or --occur-limit."
        )
    if guided:
        selection = select_guided_bpe(base, candidates, pairs, config)
    else:
        selection = select_chipnemo(base, candidates, domain, config.freq_threshold, config.max_added_tokens)
    del pairs
    clock.lap("select tokens")

    first_new = len(base.pieces)
    model = extend_model(base, selection.pieces, selection.piece_type)
    produced, domain_stats = adapted_pass(domain, ChunkEncoder(model), first_new, before["domain"])
    pieces = prune_unused(model, first_new, selection.pieces, produced, selection.piece_type)
    if len(pieces) != len(selection.pieces):
        model = extend_model(base, pieces, selection.piece_type)
        produced, domain_stats = adapted_pass(domain, ChunkEncoder(model), first_new, before["domain"])
    reach = reachability(model, first_new, len(pieces), produced)
    added_count = len(pieces)
    reserved = pad_vocabulary(model, config.max_tensor_parallel, config.min_reserved)
    _, general_stats = adapted_pass(general, ChunkEncoder(model), len(model.pieces), before["general"])
    clock.lap("merge, prune, pad (adapted segmentation)")

    inputs = {
        "base_tokenizer": {"path": str(base_path), "sha256": file_sha256(base_path)},
        "domain_data": domain.counter.summary(),
        "general_data": general.counter.summary(),
    }
    with stage_output(config.output, "tokenizer", config, inputs) as tmp:
        (tmp / TOKENIZER_FILE).write_bytes(model.SerializeToString())
        (tmp / "domain_tokenizer.model").write_bytes(domain_model.SerializeToString())
        write_hf_tokenizer(tmp)
        write_json(tmp / DOMAIN_TOKENS_FILE, {
            "base_vocab_size": len(base.pieces),
            "vocab_size": len(model.pieces),
            "method": config.method,
            "tokens": [
                {"token": p, "id": len(base.pieces) + k, "kind": "domain",
                 "domain_count": int(selection.domain_use.get(p, 0))}
                for k, p in enumerate(pieces)
            ] + [
                {"token": model.pieces[i].piece, "id": i, "kind": "reserved", "domain_count": 0}
                for i in range(len(base.pieces) + added_count, len(model.pieces))
            ],
        })
        clock.lap("write files")
        report = tokenizer_report.build_report(
            base=base, adapted=model, folder=tmp,
            train={"domain_train": domain_stats, "general_train": general_stats},
            heldout={"domain_heldout": config.heldout_domain, "general_heldout": config.heldout_general},
            text_keys=config.text_keys,
        )
        report.update({
            "method": config.method,
            "base_vocab_size": len(base.pieces),
            "added_tokens": added_count,
            "reserved_tokens": reserved,
            "vocab_size": len(model.pieces),
            "vocab_multiple": 128 * config.max_tensor_parallel,
            "candidates": {"kept": len(candidates.pieces), "dropped": candidates.dropped},
            "selection": selection.details,
            "reachability": reach,
        })
        clock.lap("report")
        report["training_lines"] = {"seen": lines.seen, "used": len(lines.result())}
        tokenizer_report.plot_cumulative_use(selection.domain_use, config.freq_threshold, tmp / "cumulative_use.png")
        tokenizer_report.plot_compression(report, tmp / "compression_by_file_type.png")
        clock.lap("plots")
        report["seconds"] = clock.wall
        report["cpu_seconds"] = dict(clock.cpu, **{
            "train domain tokenizer (child process)": round(_children_cpu() - children_cpu, 2)})
        write_json(tmp / "report.json", report)
    print(tokenizer_report.summary_line(report, config.output))
    return Path(config.output)


# The fast tokenizer of a Llama-style SentencePiece BPE model, as tokenizers >= 0.19 and transformers >= 4.41
# describe it: SentencePiece's dummy prefix is one "▁" before the first word (none after a special token),
# spaces become "▁", unknown characters fall back to <0xNN> bytes, BOS is added in front.
_HF_PRE_TOKENIZER = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
_HF_DECODER = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
    {"type": "ByteFallback"},
    {"type": "Fuse"},
    {"type": "Strip", "content": " ", "start": 1, "stop": 0},
]}
_HF_TOKEN_FLAGS = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
HF_MAX_LENGTH = int(1e30)  # transformers' "no limit" for model_max_length


def bpe_merges(model: sp_pb2.ModelProto) -> list[str]:
    """The fast tokenizer's BPE merges ("left right") of a SentencePiece BPE model.

    Every way to split a piece into two pieces of the vocabulary is a merge; merges rank by the score of
    the piece they build (SentencePiece applies the highest-scoring one first), then longer left part, then
    longer right part, then the built piece's id: the order of transformers' Llama converter (4.41 and later).
    """
    ids = {p.piece: i for i, p in enumerate(model.pieces)}
    merges = []
    for piece_id, piece in enumerate(model.pieces):
        text = piece.piece
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in ids and right in ids:
                merges.append((-piece.score, -len(left), -len(right), piece_id, left, right))
    merges.sort(key=lambda merge: merge[:4])
    return [f"{left} {right}" for *_, left, right in merges]


def hf_tokenizer_files(model: sp_pb2.ModelProto) -> dict[str, dict]:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` of a Llama-style model.

    Written from the SentencePiece model alone (no transformers, no conversion): the files read the same in
    tokenizers 0.19 / transformers 4.40 (the NeMo 24.07 container) and in newer releases. Merges are
    ``"left right"`` strings, the form every tokenizers release reads (SentencePiece pieces hold no space).
    """
    pieces = model.pieces
    special = {UNKNOWN: True, CONTROL: True, USER_DEFINED: False}
    added = [{"id": i, "content": p.piece, **_HF_TOKEN_FLAGS, "special": special[p.type]}
             for i, p in enumerate(pieces) if p.type in special]
    unk, bos, eos = (pieces[i].piece for i in (model.trainer_spec.unk_id, model.trainer_spec.bos_id,
                                                model.trainer_spec.eos_id))
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": _HF_PRE_TOKENIZER,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [model.trainer_spec.bos_id], "tokens": [bos]}},
        },
        "decoder": _HF_DECODER,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": {p.piece: i for i, p in enumerate(pieces)}, "merges": bpe_merges(model),
        },
    }
    config = {
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(t["id"]): {k: t[k] for k in sorted(t) if k != "id"} for t in added},
        "bos_token": bos, "clean_up_tokenization_spaces": False, "eos_token": eos, "legacy": False,
        "model_max_length": HF_MAX_LENGTH, "pad_token": None, "sp_model_kwargs": {},
        "spaces_between_special_tokens": False, "tokenizer_class": "LlamaTokenizer", "unk_token": unk,
        "use_default_system_prompt": False,
    }
    flags = {k: _HF_TOKEN_FLAGS[k] for k in sorted(_HF_TOKEN_FLAGS)}
    special_map = {name: {"content": text, **flags} for name, text in
                   (("bos_token", bos), ("eos_token", eos), ("unk_token", unk))}
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config, "special_tokens_map.json": special_map}


def write_hf_tokenizer(folder: Path) -> None:
    """Write the HF fast-tokenizer files for ``folder/tokenizer.model`` (see :func:`hf_tokenizer_files`)."""
    for name, content in hf_tokenizer_files(load_proto(folder / TOKENIZER_FILE)).items():
        (folder / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


