"""Exact SentencePiece ids of long texts, encoded in bounded pieces.

SentencePiece's encoder holds about 110 bytes per input byte while it encodes one text
(a 200 MB document needed 22.8 GB). A long text is therefore cut into pieces of about
:data:`PIECE_CHARS` (16 Ki) characters, each encoded on its own, and the ids are concatenated.
They are exactly the ids of the whole text when every cut is at a *safe* position ``p``
(between ``text[p-1]`` and ``text[p]``), which for a BPE model with the identity
normaliser (Llama 2's and every model this project writes) means:

* no vocabulary piece contains the two characters around the cut next to each other
  (after the normaliser's ' ' -> '▁'). BPE only ever merges two adjacent symbols into a
  piece of the vocabulary (user-defined pieces too are matched only where they occur), so
  no symbol can then span the cut: the merges on each side are the ones of that side alone,
  in the same order (SentencePiece orders them by score, then by position);
* without byte fallback, not both characters are unknown (SentencePiece joins a run of
  unknown characters into one ``<unk>``);
* with ``remove_extra_whitespaces`` (stories260K's ``tok512.model``), neither character is a
  space nor a literal '▁': runs of spaces are collapsed and a text's leading spaces dropped, and
  its trailing ones too, after the ' ' -> '▁' step, so that a literal '▁' at the end of a piece
  would be dropped as well; away from spaces this happens the same way in the pieces as in the
  whole text.

The first piece is encoded with the model as it is (it gets the dummy-prefix '▁'), the others
with ``add_dummy_prefix`` off (with ``treat_whitespace_as_suffix`` the dummy '▁' goes at the end,
so the last piece gets it instead). Unigram models (a Viterbi search whose float sums are not
guaranteed to split exactly) and other normalisers (a character map whose rules may span any
cut) are encoded whole, as SentencePiece itself does.

For Llama 2 a cut before a space that follows a non-space character is always safe (no piece
holds '▁' after another character), as is a cut next to a newline or a digit (no piece holds
'\\n', digits are split), so a safe cut is found within a few characters of the target.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

from dapt.compat import sentencepiece_model_pb2 as sp_pb2
from dapt.errors import UserInputError

# SentencePiece's BPE also gets slower per byte on long inputs (a 4 MB text: 1 MiB pieces took about twice
# as long as 16 KiB pieces here), so pieces are small; the hard limit bounds memory at about 1 GB.
PIECE_CHARS = 1 << 14
MAX_PIECE_CHARS = 1 << 23  # no safe cut in this many characters: refused, not encoded whole
BPE = 2
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class UncuttableTextError(UserInputError):
    """A long text has no safe cut within :data:`MAX_PIECE_CHARS` characters."""


@dataclass(frozen=True)
class CutRule:
    """Where a model's input can be cut without changing its ids (see the module docstring)."""

    cuttable: bool
    why_not: str
    bigrams: frozenset[str]
    known: frozenset[str]
    byte_fallback: bool
    collapses_spaces: bool
    space: str
    dummy_at_end: bool

    @classmethod
    def of(cls, model: sp_pb2.ModelProto) -> CutRule:
        """The rule for a SentencePiece model."""
        spec = model.normalizer_spec
        why_not = ""
        if model.trainer_spec.model_type != BPE:
            why_not = "not a BPE model"
        elif spec.precompiled_charsmap or spec.name not in ("identity", ""):
            why_not = f"normaliser {spec.name!r} is not the identity"
        space = "▁" if spec.escape_whitespaces else " "
        merged = [p.piece for p in model.pieces if p.type in (NORMAL, USER_DEFINED, UNUSED)]
        bigrams = frozenset(piece[i:i + 2] for piece in merged for i in range(len(piece) - 1))
        known = frozenset(piece for piece in merged if len(piece) == 1)
        return cls(cuttable=not why_not, why_not=why_not, bigrams=bigrams, known=known,
                   byte_fallback=model.trainer_spec.byte_fallback,
                   collapses_spaces=spec.remove_extra_whitespaces, space=space,
                   dummy_at_end=model.trainer_spec.treat_whitespace_as_suffix)

    def _normal(self, char: str) -> str:
        return self.space if char == " " else char

    def is_safe(self, text: str, position: int) -> bool:
        """True when ``text`` may be cut before ``text[position]`` without changing its ids."""
        if not 0 < position < len(text):
            return False
        left, right = text[position - 1], text[position]
        # the normaliser drops trailing spaces of its *output*, where a literal '▁' is one too
        if self.collapses_spaces and (left in (" ", self.space) or right in (" ", self.space)):
            return False
        left, right = self._normal(left), self._normal(right)
        if left + right in self.bigrams:
            return False
        return self.byte_fallback or left in self.known or right in self.known

    def cuts(self, text: str, piece_chars: int = PIECE_CHARS,
             max_piece_chars: int = MAX_PIECE_CHARS) -> list[int]:
        """Safe cut positions splitting ``text`` into pieces of about ``piece_chars`` characters.

        Each cut is the safe position nearest below ``start + piece_chars`` (down to half of it),
        else the first one above; a stretch of ``max_piece_chars`` without one raises
        :class:`UncuttableTextError`. Texts of at most ``piece_chars``, and texts of models that
        cannot be cut, are not cut.
        """
        if not self.cuttable or len(text) <= piece_chars:
            return []
        cuts, start = [], 0
        while len(text) - start > piece_chars:
            target = start + piece_chars
            cut = next((p for p in range(target, start + piece_chars // 2, -1) if self.is_safe(text, p)), None)
            if cut is None:
                limit = min(len(text), start + max_piece_chars)
                cut = next((p for p in range(target + 1, limit) if self.is_safe(text, p)), None)
                if cut is None:
                    if limit == len(text):
                        break  # the rest is shorter than the hard limit: one last, longer piece
                    raise UncuttableTextError(
                        f"no place to cut in the {max_piece_chars:,} characters from character {start:,} "
                        "where SentencePiece's ids would stay the same (a run of letters without spaces, "
                        "newlines or digits?); encoding it whole would need about "
                        f"{110 * (len(text) - start) / 1e9:.1f} GB. Split the document at a line break."
                    )
            cuts.append(cut)
            start = cut
        return cuts


class PieceEncoder:
    """SentencePiece ids of texts, long ones encoded in safe pieces; equal to ``encode`` of each text."""

    def __init__(self, model_path: str | os.PathLike, piece_chars: int = PIECE_CHARS,
                 max_piece_chars: int = MAX_PIECE_CHARS):
        self.model = sp_pb2.ModelProto()
        with open(model_path, "rb") as handle:
            self.model.ParseFromString(handle.read())
        self.piece_chars, self.max_piece_chars = piece_chars, max_piece_chars

    @cached_property
    def rule(self) -> CutRule:
        """Where this model's input may be cut."""
        return CutRule.of(self.model)

    @cached_property
    def whole(self):
        """The model as it is (dummy prefix as configured)."""
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_proto=self.model.SerializeToString())

    @cached_property
    def inner(self):
        """The model without the dummy prefix, for pieces that do not start (or end) the text."""
        import sentencepiece as spm

        copy = sp_pb2.ModelProto()
        copy.CopyFrom(self.model)
        copy.normalizer_spec.add_dummy_prefix = False
        return spm.SentencePieceProcessor(model_proto=copy.SerializeToString())

    def pieces(self, text: str) -> Iterator[tuple[str, bool, bool]]:
        """``(piece, is_first, is_last)`` of ``text`` cut at safe positions (one piece for short texts)."""
        bounds = [0, *self.rule.cuts(text, self.piece_chars, self.max_piece_chars), len(text)]
        for index in range(len(bounds) - 1):
            yield text[bounds[index]:bounds[index + 1]], index == 0, index == len(bounds) - 2

    def processor_for(self, is_first: bool, is_last: bool):
        """The processor for a piece: the dummy '▁' belongs to the text's first (suffix mode: last) piece."""
        if is_first and is_last:
            return self.whole
        return self.whole if (is_last if self.rule.dummy_at_end else is_first) else self.inner

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, exactly ``SentencePieceProcessor.encode(text)``, with bounded memory."""
        ids: list[int] = []
        for piece, is_first, is_last in self.pieces(text):
            ids.extend(self.processor_for(is_first, is_last).encode(piece))
        return ids
