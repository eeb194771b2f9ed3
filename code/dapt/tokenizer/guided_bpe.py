"""Recipe step 3, the default method (``--method guided-bpe``): continued BPE merges on top of the base
model's own segmentation, guided by the domain tokenizer.

The base model segments the domain (and general) corpus; its final pieces become
the starting symbols. New merges are learned over those symbols, word by word, and
scored by how many domain tokens they save minus a penalty for how often they would
also fire on general text. Merges whose result the trained domain tokenizer also
proposes (a domain piece, or a building block of one) get a bonus: the domain
tokenizer guides the choice, the base segmentation guarantees that every new piece
is reachable by SentencePiece's own merge procedure.

Because every new piece is a NORMAL piece scored below every base piece,
SentencePiece first reproduces the base segmentation exactly and only then applies
new merges, each of which removes a token: no text can get longer.

The module is longer than its siblings and reads best whole, in order: the word
model (symbols, words, counts), the pair statistics, the merge loop, the cut by use
and the selection share one argument (every new piece is a merge of two pieces that
the base segmentation, or an earlier new piece, already produces), which splitting
them would scatter.
"""

from __future__ import annotations

import heapq
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from dapt.compat import sentencepiece_model_pb2 as sp_pb2
from dapt.tokenizer.candidates import Candidates, Selection
from dapt.tokenizer.sentencepiece_model import NORMAL

WORD_START = "▁"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def pieces_to_symbols(pieces: Sequence[str]) -> list[str]:
    """Undo byte fallback: runs of ``<0xNN>`` pieces become the characters they encode.

    SentencePiece merges characters first and falls back to bytes only for the
    symbols left unknown at the end, so these characters are the symbols its merge
    loop actually sees.
    """
    symbols: list[str] = []
    pending = bytearray()
    for piece in pieces:
        match = _BYTE_PIECE.match(piece)
        if match:
            pending.append(int(match.group(1), 16))
            continue
        if pending:
            symbols.extend(pending.decode("utf-8", errors="replace"))
            pending.clear()
        symbols.append(piece)
    if pending:
        symbols.extend(pending.decode("utf-8", errors="replace"))
    return symbols


def split_words(symbols: Sequence[str], vocab: set[str]) -> Iterable[tuple[str, ...]]:
    """Group symbols into words: a word starts at every piece that starts with '▁'.

    Symbols outside the base vocabulary (characters that end as byte fallback, such
    as newlines and tabs) stand alone and never merge: a fast tokenizer converted
    by transformers falls back to bytes before merging, so a merge that used them
    would be produced by SentencePiece but not by the HF tokenizer.
    """
    word: list[str] = []
    for symbol in symbols:
        known = symbol in vocab
        if symbol.startswith(WORD_START) or not known:
            if word:
                yield tuple(word)
            word = [symbol]
            if not known:
                yield tuple(word)
                word = []
        else:
            word.append(symbol)
    if word:
        yield tuple(word)


def count_words(segmentations: Iterable[Sequence[str]], vocab: set[str]) -> Counter:
    """Count word types over many documents' base segmentations."""
    counts: Counter = Counter()
    for pieces in segmentations:
        counts.update(split_words(pieces_to_symbols(pieces), vocab))
    return counts


class WordCounter:
    """Word types of base segmentations given as ids, counted fast; only words BPE can merge (2+ symbols).

    ``add(ids, n)`` for the distinct space-delimited chunks of a corpus with their counts equals
    :func:`count_words` on the whole documents (a chunk starts a word), restricted to words of two or more
    symbols: single-symbol words never hold a pair, so learning merges ignores them. Segmentations without
    byte pieces (almost all) take a fast path that splits ids at word starts; the others go through
    :func:`pieces_to_symbols`.
    """

    def __init__(self, pieces: Sequence[str]):
        self.pieces = list(pieces)
        self.vocab = set(self.pieces)
        self.starts_word = [piece.startswith(WORD_START) for piece in self.pieces]
        self.byte_ids = frozenset(i for i, piece in enumerate(self.pieces) if _BYTE_PIECE.match(piece))
        self.counts: Counter = Counter()

    def add(self, ids: Sequence[int], multiplicity: int) -> None:
        """Count the words of one segmentation ``multiplicity`` times."""
        if len(ids) < 2:
            return
        counts, pieces = self.counts, self.pieces
        if not self.byte_ids.isdisjoint(ids):
            for word in split_words(pieces_to_symbols([pieces[i] for i in ids]), self.vocab):
                if len(word) > 1:
                    counts[word] += multiplicity
            return
        starts, start = self.starts_word, 0
        for k in range(1, len(ids)):
            if starts[ids[k]]:
                if k - start > 1:
                    counts[tuple(pieces[i] for i in ids[start:k])] += multiplicity
                start = k
        if len(ids) - start > 1:
            counts[tuple(pieces[i] for i in ids[start:])] += multiplicity


@dataclass(frozen=True)
class Merge:
    """One learned merge: ``left + right -> piece``, with the counts that chose it."""

    left: str
    right: str
    domain_count: int
    general_count: int

    @property
    def piece(self) -> str:
        return self.left + self.right


@dataclass
class BPEResult:
    """The merges in order and the domain corpus's use of each new piece at the end."""

    merges: list[Merge]
    final_use: Counter  # piece -> occurrences in the final domain segmentation


def _has_adjacent_digits(text: str) -> bool:
    return any(a.isdigit() and b.isdigit() for a, b in zip(text, text[1:]))


class PairStats:
    """Pair counts over word types, with an index from pair to the words that may hold it.

    The index is kept lazily (a word stays listed under pairs it no longer holds);
    :meth:`apply` skips such words. Updates touch only the neighbours of a merge.
    """

    def __init__(self, words: list[list[str]], domain: list[int], general: list[int]):
        self.words, self.domain, self.general = words, domain, general
        self.dcount: dict[tuple[str, str], int] = defaultdict(int)
        self.gcount: dict[tuple[str, str], int] = defaultdict(int)
        self.where: dict[tuple[str, str], set[int]] = defaultdict(set)
        dcount, gcount, where = self.dcount, self.gcount, self.where
        for index, word in enumerate(words):
            d, g = domain[index], general[index]
            for pair in zip(word, word[1:]):
                dcount[pair] += d
                gcount[pair] += g
                where[pair].add(index)

    def _move(self, index: int, old: tuple[str, str], new: tuple[str, str], d: int, g: int) -> None:
        self.dcount[old] -= d
        self.gcount[old] -= g
        self.dcount[new] += d
        self.gcount[new] += g
        self.where[new].add(index)

    def apply(self, pair: tuple[str, str]) -> set[tuple[str, str]]:
        """Merge ``pair`` in every word holding it; return the new pairs it created."""
        left, right = pair
        merged = left + right
        created: set[tuple[str, str]] = set()
        for index in self.where.pop(pair, ()):
            word = self.words[index]
            hits = [i for i, symbol in enumerate(word[:-1]) if symbol == left and word[i + 1] == right]
            if not hits:
                continue
            d, g = self.domain[index], self.general[index]
            if len(hits) == 1:
                i = hits[0]
                if i > 0:
                    new = (word[i - 1], merged)
                    self._move(index, (word[i - 1], left), new, d, g)
                    created.add(new)
                if i + 2 < len(word):
                    new = (merged, word[i + 2])
                    self._move(index, (right, word[i + 2]), new, d, g)
                    created.add(new)
                word[i:i + 2] = [merged]
            else:
                self._merge_all(index, word, pair, merged, created)
        self.dcount.pop(pair, None)
        self.gcount.pop(pair, None)
        return created

    def _merge_all(self, index: int, word: list[str], pair: tuple[str, str], merged: str,
                   created: set[tuple[str, str]]) -> None:
        out: list[str] = []
        i = 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                out.append(merged)
                i += 2
            else:
                out.append(word[i])
                i += 1
        old, new = Counter(zip(word, word[1:])), Counter(zip(out, out[1:]))
        d, g = self.domain[index], self.general[index]
        for changed in old.keys() | new.keys():
            delta = new[changed] - old[changed]
            if delta and changed != pair:
                self.dcount[changed] += delta * d
                self.gcount[changed] += delta * g
                if delta > 0:
                    self.where[changed].add(index)
                    created.add(changed)
        self.words[index] = out


def pair_statistics(domain_words: Counter, general_words: Counter) -> PairStats:
    """Pair counts over the word types that merges can change; the input of :func:`learn_merges`.

    A general-only word holding no pair of adjacent symbols that some domain word holds is left out: a
    merge needs a pair with domain uses, so such a word can never change and its pairs never score.
    """
    domain_pairs = {pair for word in domain_words if len(word) > 1 for pair in zip(word, word[1:])}
    words = [list(w) for w in domain_words if len(w) > 1]
    words += [list(w) for w in general_words
              if len(w) > 1 and w not in domain_words and not domain_pairs.isdisjoint(zip(w, w[1:]))]
    return PairStats(words, [domain_words.get(tuple(w), 0) for w in words],
                      [general_words.get(tuple(w), 0) for w in words])


def learn_merges(
    stats: PairStats,
    base_vocab: set[str],
    max_merges: int,
    general_penalty: float = 4.0,
    min_domain_count: int = 3,
    guide: set[str] | None = None,
    guide_bonus: float = 1.0,
    split_digits: bool = True,
    progress: bool = True,
) -> BPEResult:
    """Learn up to ``max_merges`` new pieces over the base segmentation, given as :func:`pair_statistics`.

    ``stats`` is consumed. A merge's score is ``(domain - general_penalty * general) * (1 + guide_bonus)``
    when its result is in ``guide`` and without the bonus otherwise; merges with a score <= 0 or a domain
    count below ``min_domain_count`` are never taken. With ``split_digits`` no piece holds two adjacent digits
    (Llama 2 splits numbers).
    """
    guide = guide or set()
    known = set(base_vocab)

    dcount, gcount = stats.dcount, stats.gcount
    verdicts: dict[str, bool] = {}

    def score(pair: tuple[str, str]) -> float:
        d = dcount.get(pair, 0)
        if d < min_domain_count:
            return 0.0
        value = d - general_penalty * gcount.get(pair, 0)
        return value * (1.0 + guide_bonus) if pair[0] + pair[1] in guide else value

    def allowed(pair: tuple[str, str]) -> bool:
        merged = pair[0] + pair[1]
        verdict = verdicts.get(merged)
        if verdict is None:
            verdict = verdicts[merged] = not (split_digits and _has_adjacent_digits(merged))
        return verdict and merged not in known

    heap = [(-s, pair) for pair in list(dcount) if allowed(pair) and (s := score(pair)) > 0]
    heapq.heapify(heap)
    merges: list[Merge] = []
    bar = tqdm(total=max_merges, desc="learning merges", unit=" merges", disable=not progress, leave=False)
    while heap and len(merges) < max_merges:
        negative, pair = heapq.heappop(heap)
        current = score(pair)
        if current <= 0 or not allowed(pair):
            continue
        if current != -negative:
            heapq.heappush(heap, (-current, pair))
            continue
        merges.append(Merge(pair[0], pair[1], dcount[pair], gcount[pair]))
        known.add(pair[0] + pair[1])
        for grown in stats.apply(pair):
            if allowed(grown) and (s := score(grown)) > 0:
                heapq.heappush(heap, (-s, grown))
        bar.update(1)
    bar.close()
    final_use: Counter = Counter()
    new_pieces = {m.piece for m in merges}
    for word, d in zip(stats.words, stats.domain):
        if d:
            for symbol in word:
                if symbol in new_pieces:
                    final_use[symbol] += d
    return BPEResult(merges=merges, final_use=final_use)


def ancestors(merges: Sequence[Merge]) -> dict[str, tuple[str, str]]:
    """Map each new piece to the two pieces it was merged from."""
    return {m.piece: (m.left, m.right) for m in merges}


@dataclass
class UseCut:
    """What :func:`cut_by_use` kept and why: the pieces ranked by use, the ones kept for their own use (in
    rank order), and how many of those were passed over because their building blocks did not fit the cap."""

    kept: list[Merge]
    ranking: list[tuple[str, int]]
    chosen: list[str]
    skipped: int


def cut_by_use(result: BPEResult, threshold: float, max_pieces: int | None = None) -> UseCut:
    """Keep the most-used pieces up to ``threshold`` of all uses, plus every piece they are built from.

    The cut is the smallest prefix of pieces sorted by use whose cumulative share
    reaches the threshold; pieces needed as intermediate merges are added back so
    every kept piece stays reachable. The merge order is preserved. With
    ``max_pieces`` the kept set (intermediates included) never exceeds that many.
    """
    parents = ancestors(result.merges)
    by_use = sorted(result.final_use.items(), key=lambda item: (-item[1], item[0]))
    total = sum(use for _, use in by_use)
    keep: set[str] = set()
    chosen: list[str] = []
    skipped = 0
    covered = 0
    for piece, use in by_use:
        if total and covered / total >= threshold:
            break
        closure = _closure(piece, parents) - keep
        if max_pieces is not None and len(keep) + len(closure) > max_pieces:
            skipped += 1
            continue
        keep |= closure
        chosen.append(piece)
        covered += use
    return UseCut([m for m in result.merges if m.piece in keep], by_use, chosen, skipped)


def select_by_use(result: BPEResult, threshold: float, max_pieces: int | None = None) -> list[Merge]:
    """The merges :func:`cut_by_use` keeps, in merge order."""
    return cut_by_use(result, threshold, max_pieces).kept


def _closure(piece: str, parents: dict[str, tuple[str, str]]) -> set[str]:
    needed, stack = set(), [piece]
    while stack:
        current = stack.pop()
        if current in parents and current not in needed:
            needed.add(current)
            stack.extend(parents[current])
    return needed


def select_guided_bpe(
    base: sp_pb2.ModelProto, candidates: Candidates, pairs: PairStats, threshold: float, max_added: int | None,
    general_penalty: float, min_domain_count: int, guide_bonus: float,
) -> Selection:
    """Continued BPE over the base segmentation (``pairs``: :func:`pair_statistics`), guided by the candidates:
    learn up to ``max_added`` merges (or as many as there are candidates), keep them by :func:`select_by_use`."""
    vocab = {p.piece for p in base.pieces}
    started = time.perf_counter()
    guide = {c[i:j] for c in candidates.pieces for i in range(len(c)) for j in range(i + 2, len(c) + 1)}
    budget = max_added or len(candidates.pieces)
    result = learn_merges(
        pairs, vocab, max_merges=budget, general_penalty=general_penalty, min_domain_count=min_domain_count,
        guide=guide, guide_bonus=guide_bonus, split_digits=base.trainer_spec.split_digits,
    )
    cut = cut_by_use(result, threshold, max_added)
    kept = cut.kept
    candidate_set = set(candidates.pieces)
    return Selection(
        pieces=[m.piece for m in kept],
        piece_type=NORMAL,
        domain_use={m.piece: result.final_use.get(m.piece, 0) for m in kept},
        ranking=cut.ranking,
        chosen=cut.chosen,
        capped=cut.skipped > 0 or len(result.merges) == max_added,
        details={
            "merges_learned": len(result.merges),
            "merges_kept": len(kept),
            "guided_pieces": sum(1 for m in kept if m.piece in guide),
            "candidate_pieces_added": sum(1 for m in kept if m.piece in candidate_set),
            "bpe_seconds": round(time.perf_counter() - started, 2),
        },
    )
