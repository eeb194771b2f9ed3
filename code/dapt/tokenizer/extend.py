"""Recipe steps 4 and 5: merge the selected pieces into the base model, then pad the vocabulary.

Every base piece keeps its id, text, score and type; the selected pieces follow in order. NORMAL pieces get
scores below every base piece, so SentencePiece applies all base merges first. Padding appends reserved
CONTROL pieces up to a multiple of 128 x the largest tensor-parallel size, as Megatron needs.
"""

from __future__ import annotations

import numpy as np

from dapt.compat import sentencepiece_model_pb2 as sp_pb2
from dapt.tokenizer.sentencepiece_model import CONTROL, NORMAL, TokenizerError

RESERVED_TEMPLATE = "<extra_id_{}>"


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
