"""Recipe step 2: candidates, the domain tokenizer's pieces that the base lacks and general text rarely uses.

A candidate is a NORMAL piece of the domain tokenizer that is not in the base vocabulary, not whitespace
only, holds a letter, is no fragment of an encoded blob, and occurs (as a substring) in at most
``occur_limit`` general documents. :class:`Selection` is what a merge method keeps of them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dapt.compat import sentencepiece_model_pb2 as sp_pb2
from dapt.corpus import Corpus, looks_like_blob
from dapt.tokenizer.chunked_encoding import line_slices
from dapt.tokenizer.sentencepiece_model import NORMAL


@dataclass
class Candidates:
    """Domain pieces the base lacks, with why the others were dropped."""

    pieces: list[str]
    general_doc_freq: dict[str, int]
    dropped: dict[str, int]


@dataclass
class Selection:
    """The pieces a method adds (in id order), their domain use, and method-specific facts (``details``, for
    the report); for the plot, how the count came about: the pieces ranked by use (``ranking``), those kept
    for their own use (``chosen``, in rank order; the rest of ``pieces`` are building blocks), and whether
    the ``max_added_tokens`` cap decided (``capped``)."""

    pieces: list[str]
    piece_type: int
    domain_use: dict[str, int]
    details: dict
    ranking: list[tuple[str, int]] = field(default_factory=list)
    chosen: list[str] = field(default_factory=list)
    capped: bool = False


def _texts_of(corpus: Corpus | Iterable[str]) -> Iterable[str]:
    return (d.text for d in corpus.documents) if isinstance(corpus, Corpus) else corpus


class DocumentFrequency:
    """In how many documents each piece occurs as a substring: a running count, one document at a time.

    Text is compared in SentencePiece's normalised form (spaces as '▁', a leading '▁'), so a piece matches
    wherever SentencePiece could see it. One Aho-Corasick automaton scans each document once, whatever the
    number of pieces; a long document is scanned in slices that overlap by one piece length less one, so
    a piece that spans two slices is found too.
    """

    def __init__(self, pieces: list[str]):
        import ahocorasick

        self.pieces = pieces
        self.automaton = ahocorasick.Automaton()
        for index, piece in enumerate(pieces):
            self.automaton.add_word(piece, index)
        self.automaton.make_automaton()
        self.overlap = max(map(len, pieces), default=1) - 1
        self.counts: Counter = Counter()

    def add(self, text: str) -> None:
        """Count the pieces that occur in one document."""
        found: set[int] = set()
        context = "▁"
        for piece in line_slices(text):
            normalised = context + piece.replace(" ", "▁")
            found.update(index for _, index in self.automaton.iter(normalised))
            context = normalised[-self.overlap:] if self.overlap else ""
        self.counts.update(self.pieces[index] for index in found)


def general_document_frequency(pieces: list[str], general: Corpus | Iterable[str]) -> Counter:
    """In how many documents of ``general`` (a loaded corpus or document texts) each piece occurs."""
    counter = DocumentFrequency(pieces)
    for text in _texts_of(general):
        counter.add(text)
    return counter.counts


def find_candidates(
    domain_model: sp_pb2.ModelProto,
    base_vocab: set[str],
    general_frequency: Callable[[list[str]], Counter],
    occur_limit: int,
    require_letter: bool = True,
) -> Candidates:
    """Domain pieces absent from the base, not blob fragments, occurring in at most ``occur_limit`` general docs.

    ``general_frequency(pieces)`` counts the general documents holding each piece (one pass over the corpus).
    """
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
    doc_freq = general_frequency(shaped) if shaped else Counter()
    kept = [p for p in shaped if doc_freq[p] <= occur_limit]
    if len(kept) < len(shaped):
        dropped["frequent in general data"] = len(shaped) - len(kept)
    return Candidates(pieces=kept, general_doc_freq={p: doc_freq[p] for p in kept}, dropped=dict(dropped))
