"""Stage output folders: atomic writes, manifests, and stale-artifact checks.

Every stage writes one folder. The folder is built under a temporary name beside
the final one and renamed into place only when the stage succeeds, so a failed or
interrupted stage never leaves a half-written folder for the next one. Each folder
holds ``manifest.json``: the stage name, its parameters and fingerprints of its
inputs, so later stages can refuse artifacts built from other inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dapt.errors import UserInputError

MANIFEST = "manifest.json"


class StageError(UserInputError):
    """A stage refused its input or its output folder; the message says what to do."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def jsonable(value: Any) -> Any:
    """Turn dataclasses, paths and tuples into plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as tmp:
        json.dump(jsonable(data), tmp, indent=2, ensure_ascii=False)
        tmp.write("\n")
    os.replace(tmp.name, path)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a stage folder, or None when the folder has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def require_stage(folder: str | os.PathLike, stage: str, what: str) -> dict[str, Any]:
    """Return the manifest of ``folder`` or fail clearly if it was not written by ``stage``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StageError(f"{what}: folder {folder} does not exist; run `python -m dapt {stage}` first.")
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("stage") != stage:
        raise StageError(
            f"{what}: {folder} was not written by `python -m dapt {stage}` (no matching {MANIFEST}); "
            f"point to the output folder of that stage."
        )
    return manifest


def _check_replaceable(final: Path, stage: str) -> None:
    if not final.exists():
        return
    if not final.is_dir():
        raise StageError(f"output {final} exists and is not a folder; choose another output path.")
    if not any(final.iterdir()):
        return
    manifest = read_manifest(final)
    if manifest is None or manifest.get("stage") != stage:
        raise StageError(
            f"output folder {final} already holds files not written by `python -m dapt {stage}`; "
            "choose another output folder or delete it yourself."
        )


@contextlib.contextmanager
def stage_output(final: str | os.PathLike, stage: str, parameters: Any, inputs: dict[str, Any]) -> Iterator[Path]:
    """Build a stage's output folder atomically.

    Yields a temporary folder to write into. On success the manifest is added and
    the folder replaces ``final`` (an earlier run of the same stage is replaced
    whole, so nothing is ever appended twice). On failure the temporary folder is
    removed and ``final`` is left as it was.
    """
    final = Path(final).absolute()
    _check_replaceable(final, stage)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        write_json(
            tmp / MANIFEST,
            {"stage": stage, "parameters": jsonable(parameters), "inputs": jsonable(inputs)},
        )
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
