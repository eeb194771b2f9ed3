"""Build an adapted-tokenizer folder for tests and benchmarks, without the tokenizer stage.

It has the tokenizer stage's layout (tokenizer.model, HF files, domain_tokens.json, manifest.json with stage
"tokenizer"): the base pieces unchanged, then frequent domain words appended as NORMAL pieces with scores
below every base score (with the left-to-right prefix chain each word needs, so SentencePiece BPE can reach
it), then reserved ``<extra_id_i>`` pieces up to a multiple of ``multiple``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

WORD = re.compile(r"(?<![A-Za-z0-9_])[A-Za-z_][A-Za-z0-9_]{2,24}")


def frequent_word_pieces(base_model: Path, texts: Iterable[str], count: int) -> list[str]:
    """Up to ``count`` new pieces (``▁word`` and the prefixes it needs), most frequent words first."""
    import sentencepiece as spm

    from dapt.compat import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(base_model).read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    encoder = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    known = {p.piece for p in proto.pieces}
    words = Counter(w for text in texts for w in WORD.findall(text))
    pieces: list[str] = []
    for word, _ in words.most_common():
        split = encoder.encode(" " + word, out_type=str)
        if len(split) < 2:
            continue
        chain = ["".join(split[: i + 1]) for i in range(1, len(split))]
        new = [p for p in chain if p not in known]
        if len(pieces) + len(new) > count:
            break
        pieces.extend(new)
        known.update(new)
    return pieces


def build_adapted_tokenizer(base_model: Path, pieces: list[str], out: Path, multiple: int = 128) -> Path:
    """Write an adapted tokenizer folder at ``out``: base + ``pieces`` + reserved padding."""
    from dapt.artifacts import file_sha256, stage_output, write_json
    from dapt.compat import sentencepiece_model_pb2
    from dapt.tokenizer import write_hf_tokenizer

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(base_model).read_bytes())
    base_size = len(proto.pieces)
    score = min(p.score for p in proto.pieces) - 1.0
    tokens = []
    for i, piece in enumerate(pieces):
        entry = proto.pieces.add(
            piece=piece, score=score - i, type=sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
        )
        tokens.append({"token": entry.piece, "id": base_size + i, "kind": "domain", "domain_count": 0})
    reserved = (-len(proto.pieces)) % multiple
    for i in range(reserved):
        proto.pieces.add(
            piece=f"<extra_id_{i}>",
            score=0.0,
            type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED,
        )
        tokens.append(
            {
                "token": f"<extra_id_{i}>",
                "id": base_size + len(pieces) + i,
                "kind": "reserved",
                "domain_count": 0,
            }
        )
    inputs = {"base_tokenizer": {"path": str(base_model), "sha256": file_sha256(base_model)}}
    with stage_output(out, "tokenizer", {"fixture": True, "pieces": len(pieces)}, inputs) as folder:
        (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
        write_hf_tokenizer(folder)
        write_json(
            folder / "domain_tokens.json",
            {"base_vocab_size": base_size, "vocab_size": len(proto.pieces), "tokens": tokens},
        )
    return Path(out)
