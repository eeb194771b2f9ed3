"""An HF Llama checkpoint folder as the embeddings stage sees it: its config and where each tensor lives.

Only ``config.json`` and the safetensors headers are read (one ``model.safetensors``, or shards listed by
``model.safetensors.index.json``); tensor data is read later, one tensor at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapt.embeddings.safetensors_io import SafetensorsFile, TensorEntry, read_safetensors_header
from dapt.errors import UserInputError

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class EmbeddingsError(UserInputError):
    """The base checkpoint or the adapted tokenizer cannot be combined; the message says why."""


@dataclass
class Checkpoint:
    """An HF Llama checkpoint folder: its config and where each tensor lives."""

    folder: Path
    config: dict
    files: dict[str, SafetensorsFile]  # file name -> parsed header
    weight_map: dict[str, str]  # tensor name -> file name
    index: dict | None

    @property
    def tied(self) -> bool:
        """True when input and output embeddings are one matrix (no separate ``lm_head.weight``)."""
        return bool(self.config.get("tie_word_embeddings", False)) or LM_HEAD not in self.weight_map

    def entry(self, tensor: str) -> TensorEntry:
        """Where ``tensor`` lives: its dtype, shape and byte range."""
        return self.files[self.weight_map[tensor]].tensors[tensor]

    def file_of(self, tensor: str) -> SafetensorsFile:
        """The parsed safetensors file that holds ``tensor``."""
        return self.files[self.weight_map[tensor]]


def read_json_file(path: Path, what: str) -> Any:
    """A JSON file's content; unreadable JSON is a clear error naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EmbeddingsError(f"{what} {path} is not valid JSON ({error}); restore or rebuild it.") from None


def open_checkpoint(folder: Path) -> Checkpoint:
    """Read ``config.json`` and the safetensors headers (single file or sharded with an index)."""
    folder = Path(folder)
    _check_folder(folder)
    config_path = folder / "config.json"
    config = read_json_file(config_path, "model config")
    if not isinstance(config, dict) or config.get("model_type") != "llama":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise EmbeddingsError(
            f"--base-model {folder}: {config_path} has model_type {kind!r}; this stage extends Llama "
            "checkpoints only (model_type 'llama')."
        )
    index = None
    if (folder / INDEX).is_file():
        index = read_json_file(folder / INDEX, "shard index")
        weight_map = dict((index.get("weight_map") if isinstance(index, dict) else None) or {})
        if not weight_map:
            raise EmbeddingsError(
                f"--base-model {folder}: {folder / INDEX} has an empty weight_map; restore the index file "
                "or save the checkpoint again."
            )
    elif (folder / SINGLE).is_file():
        weight_map = {}
    else:
        found = sorted(p.name for p in folder.glob("*.bin")) + sorted(
            p.name for p in folder.glob("*.safetensors")
        )
        raise EmbeddingsError(
            f"--base-model {folder} has neither {SINGLE} nor {INDEX} (found: {found or 'no weights'}); "
            "only safetensors checkpoints are supported: convert .bin weights with save_pretrained first."
        )
    files: dict[str, SafetensorsFile] = {}
    for name in sorted(set(weight_map.values())) or [SINGLE]:
        path = folder / name
        if not path.is_file():
            raise EmbeddingsError(f"shard {path} listed in {folder / INDEX} is missing; download it again.")
        files[name] = read_safetensors_header(path)
    if index is None:
        weight_map = dict.fromkeys(files[SINGLE].tensors, SINGLE)
    for tensor, name in weight_map.items():
        if tensor not in files[name].tensors:
            raise EmbeddingsError(
                f"{folder / INDEX} maps {tensor} to {name}, which does not hold it; restore the index file "
                "or save the checkpoint again."
            )
    if EMBED not in weight_map:
        raise EmbeddingsError(
            f"--base-model {folder} has no tensor {EMBED}; pass an HF Llama checkpoint folder."
        )
    return Checkpoint(folder, config, files, weight_map, index)


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise EmbeddingsError(
            f"--base-model {folder} does not exist; check the path (an HF Llama checkpoint folder, or "
            "`python -m dapt base-model` to build the tiny one)."
        )
    if not folder.is_dir():
        hint = (
            f" (its folder {folder.parent} holds config.json: pass that)"
            if (folder.parent / "config.json").is_file()
            else ""
        )
        raise EmbeddingsError(
            f"--base-model {folder} is a file, not a checkpoint folder{hint}; pass the folder holding "
            "config.json and the safetensors weights."
        )
    if not (folder / "config.json").is_file():
        raise EmbeddingsError(
            f"--base-model {folder} has no config.json; pass the folder of an HF Llama checkpoint "
            "(config.json and *.safetensors)."
        )
