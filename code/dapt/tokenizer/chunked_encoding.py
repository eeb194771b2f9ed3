"""Exact SentencePiece ids, fast and in bounded memory: each distinct space-delimited chunk is encoded once.

Every corpus pass of the recipe (the base segmentation, the adapted segmentation, the selection's use
counts) encodes millions of documents whose chunks (a run of spaces and the word after it) repeat. When
:func:`chunk_safe` holds, encoding a text equals encoding its chunks one by one, so a cache of chunk ids
gives the exact ids several times faster than encoding whole documents. For the same reason a long
document can be taken in bounded pieces: :func:`line_slices` cuts it after line breaks (where blob
masking may cut it too), :func:`chunk_aligned` re-cuts any stream of pieces at chunk starts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from dapt.compat import sentencepiece_model_pb2 as sp_pb2
from dapt.tokenizer.sentencepiece_model import processor, without_dummy_prefix

_CHUNK = re.compile(r" +[^ ]*|[^ ]+")
SEGMENT_CHARS = 1_000_000  # a document longer than this is taken in pieces of about this size


def line_slices(text: str, size: int | None = None) -> Iterator[str]:
    """``text`` in consecutive slices of about ``size`` (default :data:`SEGMENT_CHARS`) characters, each
    ending just after a line break. A slice is longer only where one line is; their concatenation is ``text``.
    """
    size = size or SEGMENT_CHARS
    start, end = 0, len(text)
    while end - start > size:
        cut = text.rfind("\n", start, start + size) + 1
        if cut <= start:
            cut = text.find("\n", start + size) + 1 or end
        yield text[start:cut]
        start = cut
    if start < end:
        yield text[start:]


def _last_chunk_start(piece: str) -> int:
    """Position of the last run of spaces in ``piece`` (its first space), or -1."""
    position = piece.rfind(" ")
    while position > 0 and piece[position - 1] == " ":
        position -= 1
    return position


def chunk_aligned(pieces: Iterable[str]) -> Iterator[str]:
    """The concatenation of ``pieces`` cut only at chunk starts (the first space of a run of spaces).

    Each piece yielded holds whole chunks of the concatenated text, so encoding the pieces one by one, the
    first with the dummy prefix, gives the text's ids (see :func:`chunk_safe`).
    """
    carry: list[str] = []
    last = ""  # the last character of the text carried so far
    for piece in pieces:
        if not piece:
            continue
        cut = _last_chunk_start(piece)
        if cut > 0 or (cut == 0 and last not in ("", " ")):
            carry.append(piece[:cut])
            yield "".join(carry)
            carry = [piece[cut:]]
        else:
            carry.append(piece)
        last = piece[-1]
    if carry:
        yield "".join(carry)


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

    def __init__(self, model: sp_pb2.ModelProto, max_cached: int = 500_000, threads: int = 2):
        self.chunked = chunk_safe(model)
        self.prefix = " " if model.normalizer_spec.add_dummy_prefix else ""
        self.sp = without_dummy_prefix(model) if self.chunked else processor(model)
        self.max_cached = max_cached
        self.threads = threads
        self.pieces = [p.piece for p in model.pieces]
        self.cache: dict[str, list[int]] = {}

    def units(self, text: str, first: bool = True) -> list[str]:
        """The pieces of ``text`` that are encoded independently (``first``: the text starts a document)."""
        if not self.chunked:
            return [text]
        chunks = _CHUNK.findall(text)
        if chunks and first:
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
            cache.update(zip(missing, self.sp.encode(missing, num_threads=self.threads)))

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
            return self.sp.encode(texts, num_threads=self.threads)
        self.prepare(u for units in per_text for u in units)
        return [self.ids(units) for units in per_text]


def encode_texts(model: sp_pb2.ModelProto, texts: list[str]) -> list[list[int]]:
    """SentencePiece ids of many texts, each distinct space-delimited chunk encoded once.

    Gives exactly what ``SentencePieceProcessor.encode`` gives (see :func:`chunk_safe`;
    other models are encoded whole), several times faster on real corpora, where
    most chunks repeat.
    """
    return ChunkEncoder(model).encode(texts)
