"""Recipe step 2: candidates, the domain tokenizer's pieces that the base lacks and general text rarely uses.

A candidate is a NORMAL piece of the domain tokenizer that is not in the base vocabulary, not whitespace
only, holds a letter, is no fragment of an encoded blob, and occurs (as a substring) in at most
``occur_limit`` general documents. :class:`Selection` is what a merge method keeps of them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from dapt.compat import sentencepiece_model_pb2 as sp_pb2
from dapt.corpus import Corpus, looks_like_blob
from dapt.tokenizer.sentencepiece_model import NORMAL


@dataclass
class Candidates:
    """Domain pieces the base lacks, with why the others were dropped."""

    pieces: list[str]
    general_doc_freq: dict[str, int]
    dropped: dict[str, int]


@dataclass
class Selection:
    """The pieces a method adds (in id order), their domain use, and method-specific facts."""

    pieces: list[str]
    piece_type: int
    domain_use: dict[str, int]
    details: dict


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
