"""Does the adapted tokenizer extend the checkpoint's vocabulary? The rows to append, or a clear refusal.

The adapted tokenizer (tokenizer stage) must keep every base piece at its id and append the new ones:
domain tokens, then reserved padding tokens, listed in its ``domain_tokens.json``. The checkpoint must have
exactly one embedding row per base piece (an unpadded checkpoint of the base tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapt.embeddings.checkpoint import EMBED, LM_HEAD, Checkpoint, EmbeddingsError


@dataclass
class TokenizerFiles:
    """The files the stage reads besides the checkpoint, and how the user named them."""

    base: Path  # the base SentencePiece model
    base_given: bool  # True: --base-tokenizer; False: the base model folder's tokenizer.model
    adapted_folder: Path  # --tokenizer
    adapted: Path  # its tokenizer.model
    added: Path  # its domain_tokens.json (the list of appended tokens)

    @property
    def base_label(self) -> str:
        """How to name the base tokenizer in a message."""
        if self.base_given:
            return f"--base-tokenizer {self.base}"
        return f"base tokenizer {self.base} (the --base-model folder's tokenizer.model; or pass --base-tokenizer)"


@dataclass
class NewToken:
    """One appended vocabulary entry."""

    id: int
    token: str
    kind: str  # "domain" or "reserved"


def load_sentencepiece_proto(path: Path, what: str) -> Any:
    """The model proto of a SentencePiece file; a missing or foreign file is a clear error naming ``what``."""
    from dapt.compat import sentencepiece_model_pb2

    if not Path(path).is_file():
        raise EmbeddingsError(f"{what}: {path} does not exist.")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception:  # noqa: BLE001 - protobuf raises its own DecodeError type
        raise EmbeddingsError(f"{what}: {path} is not a SentencePiece model.") from None
    if not proto.pieces:
        raise EmbeddingsError(f"{what}: {path} is not a SentencePiece model (no pieces).")
    return proto


def check_compatibility(
    checkpoint: Checkpoint,
    base_proto: Any,
    adapted_proto: Any,
    added: Any,
    files: TokenizerFiles,
    vocab_multiple: int,
) -> list[NewToken]:
    """Refuse a checkpoint/tokenizer pair that does not fit; return the appended tokens in id order."""
    base_size, new_size = len(base_proto.pieces), len(adapted_proto.pieces)
    rows = checkpoint.entry(EMBED).shape[0]
    config_vocab = checkpoint.config.get("vocab_size")
    if rows != base_size or config_vocab != base_size:
        raise EmbeddingsError(
            f"vocabulary mismatch: --base-model {checkpoint.folder} has vocab_size {config_vocab} and {rows} "
            f"embedding rows, its {files.base_label} has {base_size} pieces; pass the tokenizer this "
            "checkpoint was trained with (--base-tokenizer) or an unpadded checkpoint."
        )
    if not checkpoint.tied and checkpoint.entry(LM_HEAD).shape != checkpoint.entry(EMBED).shape:
        raise EmbeddingsError(
            f"--base-model {checkpoint.folder}: {LM_HEAD} {checkpoint.entry(LM_HEAD).shape} and {EMBED} "
            f"{checkpoint.entry(EMBED).shape} have different shapes; the checkpoint is damaged."
        )
    if new_size <= base_size:
        raise EmbeddingsError(
            f"--tokenizer {files.adapted_folder}: {files.adapted.name} has {new_size} pieces, no more than "
            f"the base's {base_size}: it adds no tokens (or belongs to another model)."
        )
    for i in range(base_size):
        old, new = base_proto.pieces[i], adapted_proto.pieces[i]
        if old.piece != new.piece or old.type != new.type:
            raise EmbeddingsError(
                f"adapted tokenizer {files.adapted} is not an extension of the model's tokenizer "
                f"{files.base}: id {i} is {new.piece!r} there but {old.piece!r} in the base. "
                "Build the adapted tokenizer from this model's tokenizer.model."
            )
    if not isinstance(added, dict):
        raise EmbeddingsError(
            f"{files.added} is not the tokenizer stage's token list (a JSON object); rerun the tokenizer stage."
        )
    if added.get("base_vocab_size") != base_size or added.get("vocab_size") != new_size:
        raise EmbeddingsError(
            f"{files.added}: base_vocab_size {added.get('base_vocab_size')} / vocab_size "
            f"{added.get('vocab_size')} do not match the base ({base_size}) and adapted ({new_size}) "
            "tokenizers; rerun the tokenizer stage."
        )
    if new_size % vocab_multiple:
        raise EmbeddingsError(
            f"adapted vocabulary {new_size} (--tokenizer {files.adapted_folder}) is not a multiple of "
            f"--vocab-multiple {vocab_multiple}; NeMo would add padding rows of its own. Pad the tokenizer "
            "(the tokenizer stage's --max-tensor-parallel) or pass the --vocab-multiple it was padded to "
            "(1 accepts any size)."
        )
    tokens = _listed_tokens(added, files)
    if [t.id for t in tokens] != list(range(base_size, new_size)):
        raise EmbeddingsError(
            f"{files.added}: tokens must list every id from {base_size} to {new_size - 1}; "
            "rerun the tokenizer stage."
        )
    for token in tokens:
        if adapted_proto.pieces[token.id].piece != token.token or token.kind not in ("domain", "reserved"):
            raise EmbeddingsError(
                f"{files.added}: entry {token} does not match piece "
                f"{adapted_proto.pieces[token.id].piece!r} of the adapted tokenizer; rerun the tokenizer stage."
            )
    return tokens


def _listed_tokens(added: dict, files: TokenizerFiles) -> list[NewToken]:
    try:
        tokens = [
            NewToken(int(t["id"]), str(t["token"]), str(t.get("kind", "domain")))
            for t in added.get("tokens", [])
        ]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise EmbeddingsError(
            f"{files.added}: every entry of 'tokens' needs an integer 'id' and a 'token'; "
            "rerun the tokenizer stage."
        ) from None
    return sorted(tokens, key=lambda t: t.id)
