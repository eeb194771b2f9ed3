"""Recipe step 3, the original method (``--method chipnemo``): every candidate as a USER_DEFINED piece,
the most used ones kept up to ``freq_threshold`` of all their uses (a correct cumulative cut).

USER_DEFINED pieces are matched greedily in the raw text before BPE, anywhere, even inside ordinary words:
some general documents get longer and Hugging Face's fast tokenizer disagrees with SentencePiece. The
method is kept to measure that against the default (see docs/tokenizer.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np

from dapt.compat import sentencepiece_model_pb2 as sp_pb2
from dapt.tokenizer.candidates import Candidates, Selection
from dapt.tokenizer.extend import extend_model
from dapt.tokenizer.sentencepiece_model import USER_DEFINED


def cumulative_cut(counts: list[int], threshold: float) -> int:
    """Smallest k such that the k largest counts reach ``threshold`` of the total (counts sorted descending)."""
    total = sum(counts)
    if total == 0:
        return 0
    cumulative = np.cumsum(np.asarray(counts, dtype=np.float64)) / total
    return int(min(np.searchsorted(cumulative, threshold - 1e-12) + 1, len(counts)))


def select_chipnemo(
    base: sp_pb2.ModelProto, candidates: Candidates, count_uses: Callable[[sp_pb2.ModelProto], Counter],
    threshold: float, max_added: int | None,
) -> Selection:
    """The original recipe, fixed: extend with all candidates as USER_DEFINED, keep the most used.

    ``count_uses(model)`` counts each id's uses in the domain data's segmentation with ``model`` (one pass).
    """
    extended = extend_model(base, candidates.pieces, USER_DEFINED)
    first_new = len(base.pieces)
    uses = count_uses(extended)
    ranked = sorted(((uses[first_new + k], p) for k, p in enumerate(candidates.pieces) if uses[first_new + k] > 0),
                    key=lambda item: (-item[0], item[1]))
    keep = cumulative_cut([count for count, _ in ranked], threshold)
    by_threshold = keep
    if max_added is not None:
        keep = min(keep, max_added)
    chosen = ranked[:keep]
    return Selection(
        pieces=[p for _, p in chosen],
        piece_type=USER_DEFINED,
        domain_use={p: c for c, p in chosen},
        details={"used_candidates": len(ranked), "kept_by_threshold": keep},
        ranking=[(p, c) for c, p in ranked],
        chosen=[p for _, p in chosen],
        capped=keep < by_threshold,
    )
