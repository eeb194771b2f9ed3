"""SentencePiece model files: piece types, loading and saving the model proto, processors.

Every step of the recipe works on the model's protobuf (``ModelProto``): the base model is read once, the
domain model comes back from training, the adapted model is the base plus appended pieces. Import the proto
module from :mod:`dapt.compat`, never from ``sentencepiece`` directly (see there why).
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from dapt.compat import sentencepiece_model_pb2 as sp_pb2
from dapt.errors import UserInputError

# SentencePiece's piece types (sentencepiece_model.proto, ModelProto.SentencePiece.Type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TOKENIZER_FILE = "tokenizer.model"


class TokenizerError(UserInputError):
    """A tokenizer file or parameter cannot be used."""


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


def parse_proto(data: bytes) -> sp_pb2.ModelProto:
    """A model proto from its serialised bytes (as training and worker processes pass it on)."""
    model = sp_pb2.ModelProto()
    model.ParseFromString(data)
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
