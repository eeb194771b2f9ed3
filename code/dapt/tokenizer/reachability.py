"""Recipe check: which added pieces SentencePiece really produces, and pruning of the ones it never does.

A piece that the adapted model never produces on the domain data wastes an embedding row, unless a produced
piece is built from it (SentencePiece BPE merges pairwise, so intermediate merges must stay).
"""

from __future__ import annotations

from collections import Counter

from dapt.compat import sentencepiece_model_pb2 as sp_pb2
from dapt.tokenizer.sentencepiece_model import NORMAL, surface, without_dummy_prefix


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
