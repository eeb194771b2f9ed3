"""Training checkpoints that are never unpickled from disk.

The HF Trainer keeps part of its state in pickle files (``optimizer.pt``, ``scheduler.pt``,
``rng_state.pth``, ``training_args.bin``) and unpickles them on resume. Under torch < 2.6 (the
NeMo 24.07 container has 2.3) it does so without ``weights_only``, and even ``weights_only`` is not
safe there (CVE-2025-32434): a crafted file in a checkpoint folder runs code.

So this project never loads a pickle from a checkpoint folder. Right after the Trainer saves a
checkpoint, :func:`seal_checkpoint` converts every pickle it wrote into safetensors (the tensors)
plus JSON (the structure: dicts, lists, tuples, numbers, strings), deletes the pickles, and writes
``dapt_checkpoint.json`` last, with the SHA-256 of every file. On resume, :func:`checkpoint_problem`
refuses a checkpoint whose files are not exactly the recorded ones, and :func:`materialised`
rebuilds the pickles from the safe files in a private scratch folder for the Trainer to read: the
only pickles it ever loads are bytes this process has just written from tensors and JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dapt.artifacts import file_sha256, write_json

RECORD = "dapt_checkpoint.json"
STATE_TENSORS = "training_state.safetensors"
STATE_STRUCTURE = "training_state.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle")
# Written by the Trainer for the record and never read on resume: dropped instead of converted.
DROPPED = ("training_args.bin",)
NUMPY_DTYPES = ("uint32", "int64", "int32", "float64", "float32", "uint8", "bool")
FORMAT = 1


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds state that cannot be stored without pickle (a type this module does not know)."""


def encode(value: Any, tensors: dict[str, Any], name: str = "s") -> Any:
    """A JSON node for ``value``; its tensors and NumPy arrays go into ``tensors`` under fresh keys."""
    import numpy as np
    import torch

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().cpu().contiguous().clone()
        return {"tensor": name}
    if isinstance(value, np.ndarray):
        if value.dtype.name not in NUMPY_DTYPES:
            raise UnsafeCheckpointError(f"NumPy array of dtype {value.dtype} at {name}")
        tensors[name] = torch.from_numpy(np.ascontiguousarray(value.astype(np.int64) if value.dtype.kind == "u"
                                                              else value))
        return {"ndarray": name, "dtype": value.dtype.name}
    if isinstance(value, np.generic):
        return encode(value.item(), tensors, name)
    if isinstance(value, (list, tuple)):
        items = [encode(item, tensors, f"{name}.{i}") for i, item in enumerate(value)]
        return {"tuple" if isinstance(value, tuple) else "list": items}
    if isinstance(value, dict):
        if not all(isinstance(key, (str, int)) and not isinstance(key, bool) for key in value):
            raise UnsafeCheckpointError(f"dict with keys of other types than str and int at {name}")
        return {"dict": [[key, encode(item, tensors, f"{name}.{i}")] for i, (key, item) in enumerate(value.items())]}
    raise UnsafeCheckpointError(f"value of type {type(value).__name__} at {name}")


def decode(node: Any, tensors: dict[str, Any]) -> Any:
    """The value :func:`encode` turned into ``node``; builds only plain containers, numbers, tensors and arrays."""

    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if not isinstance(node, dict) or len(node) not in (1, 2):
        raise ValueError(f"unexpected node {str(node)[:80]}")
    if "tensor" in node:
        return tensors[node["tensor"]].clone()
    if "ndarray" in node:
        if node.get("dtype") not in NUMPY_DTYPES:
            raise ValueError(f"unexpected NumPy dtype {node.get('dtype')!r}")
        return tensors[node["ndarray"]].numpy().astype(node["dtype"])
    if "tuple" in node:
        return tuple(decode(item, tensors) for item in node["tuple"])
    if "list" in node:
        return [decode(item, tensors) for item in node["list"]]
    if "dict" in node:
        return {key: decode(item, tensors) for key, item in node["dict"]}
    raise ValueError(f"unexpected node {str(node)[:80]}")


def _is_pickle_name(path: Path) -> bool:
    return path.suffix in PICKLE_SUFFIXES


def seal_checkpoint(folder: Path) -> None:
    """Replace the pickles the Trainer just wrote in ``folder`` by safetensors + JSON; record every file.

    Called in the training process right after the Trainer saved ``folder`` (the checkpoint folder is
    under this stage's lock), so the pickles read here are the ones this process wrote a moment ago.
    """
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    structure: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    pickles = sorted(p for p in folder.iterdir() if p.is_file() and _is_pickle_name(p) and p.name not in DROPPED)
    for index, path in enumerate(pickles):
        state = torch.load(path, map_location="cpu", weights_only=False)  # written by this process just now
        structure[path.name] = encode(state, tensors, f"f{index}")
    save_file(tensors, str(folder / STATE_TENSORS))
    write_json(folder / STATE_STRUCTURE, {"format": FORMAT, "files": structure})
    for path in pickles:
        path.unlink()
    for name in DROPPED:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    files = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != RECORD}
    write_json(folder / RECORD, {"format": FORMAT, "files": files})


def is_sealed(folder: Path) -> bool:
    """Whether the save of ``folder`` finished (its record, written last, is there)."""
    return (Path(folder) / RECORD).is_file()


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from safely, or None when it holds exactly the files it recorded."""
    folder = Path(folder)
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
        recorded = dict(record["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{folder} has no readable {RECORD} (it was not written by `python -m dapt train`)"
    present = {p.name for p in folder.iterdir()} - {RECORD}
    extra = sorted(present - set(recorded))
    if extra:
        return f"{folder} holds files that `python -m dapt train` did not write there: {', '.join(extra)}"
    missing = sorted(set(recorded) - present)
    if missing:
        return f"{folder} lacks {', '.join(missing)}"
    changed = sorted(name for name, sha in recorded.items() if file_sha256(folder / name) != sha)
    if changed:
        return f"{folder}: {', '.join(changed)} changed after the checkpoint was written"
    pickled = sorted(name for name in recorded if _is_pickle_name(folder / name))
    if pickled:
        return f"{folder} records pickle files ({', '.join(pickled)}), which this project never loads"
    return None


@contextlib.contextmanager
def materialised(folder: Path, scratch_parent: Path) -> Iterator[Path]:
    """A private copy of the sealed checkpoint ``folder`` with the Trainer's pickles rebuilt from safe files.

    The copy lives in a 0700 scratch folder under ``scratch_parent`` (whose name does not look like a
    checkpoint) and is removed afterwards. Call :func:`checkpoint_problem` first.
    """
    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    scratch = Path(tempfile.mkdtemp(prefix=".resume-", dir=scratch_parent))
    try:
        copy = scratch / folder.name
        copy.mkdir()
        for path in folder.iterdir():
            if path.name in (RECORD, STATE_TENSORS, STATE_STRUCTURE):
                continue
            try:
                os.link(path, copy / path.name)
            except OSError:
                shutil.copy2(path, copy / path.name)
        tensors = load_file(str(folder / STATE_TENSORS))
        structure = json.loads((folder / STATE_STRUCTURE).read_text(encoding="utf-8"))
        for name, node in structure["files"].items():
            if Path(name).name != name or not _is_pickle_name(Path(name)):
                raise ValueError(f"{folder / STATE_STRUCTURE} names an unexpected file {name!r}")
            torch.save(decode(node, tensors), copy / name)
        yield copy
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
