"""Stage output folders: atomic writes, manifests, locks, permissions and stale-artifact checks.

Every stage writes one folder. The folder is built under a temporary name beside
the final one and renamed into place only when the stage succeeds, so a failed or
interrupted stage never leaves a half-written folder for the next one. Each folder
holds ``manifest.json``: the stage name, its parameters and fingerprints of its
inputs, so later stages can refuse artifacts built from other inputs.

While a stage writes, it holds an exclusive lock on its output (a second command
into the same output is refused, never interleaved); stale temporary folders of a
killed run are removed by the next run; finished artifacts follow the user's umask
like any other file (0755/0644 under the usual 022), so other users and a NIM
container running as another user can read them; a full disk or a read-only
output folder is reported as a clean :class:`StageError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dapt.errors import UserInputError

MANIFEST = "manifest.json"
# errors of the output file system (not of the stage's logic): reported as StageError, not a traceback
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


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


# --- permissions -------------------------------------------------------------------------------------------


def current_umask() -> int:
    """The process's umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything below it) the modes a plain file would get.

    Temporary files and folders are created private (0600/0700); once finished, an artifact gets
    ``0666 & ~umask`` (executables and folders ``0777 & ~umask``), as if written with ``open()``.
    Hard-linked files (shared with their source, e.g. unchanged model shards) and links are left alone.
    """
    mask = current_umask()
    root = Path(path)
    entries = [root] + (list(root.rglob("*")) if root.is_dir() and not root.is_symlink() else [])
    for entry in entries:
        info = entry.lstat()
        if stat.S_ISLNK(info.st_mode) or (stat.S_ISREG(info.st_mode) and info.st_nlink > 1):
            continue
        executable = stat.S_ISDIR(info.st_mode) or info.st_mode & stat.S_IXUSR
        wanted = (0o777 if executable else 0o666) & ~mask
        if stat.S_IMODE(info.st_mode) != wanted:
            os.chmod(entry, wanted)


# --- writing -----------------------------------------------------------------------------------------------


def storage_error(error: OSError, target: str | os.PathLike) -> StageError:
    """A clean message for a full disk, a quota, a read-only or a forbidden output location."""
    where = error.filename or target
    reason = {
        errno.ENOSPC: "the file system is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the file system is read-only",
    }.get(error.errno, "permission denied")
    return StageError(
        f"cannot write {where} ({reason}); nothing was changed in {target}. "
        "Free space or choose an output folder you can write to, then run the stage again."
    )


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename), readable like a plain file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as tmp:
        try:
            json.dump(jsonable(data), tmp, indent=2, ensure_ascii=False)
            tmp.write("\n")
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    make_readable(tmp.name)
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


# --- locks and leftovers -----------------------------------------------------------------------------------


def lock_path(final: str | os.PathLike) -> Path:
    """The lock file guarding an output (a folder or a file prefix): ``.<name>.lock`` beside it."""
    final = Path(final).absolute()
    return final.with_name(f".{final.name}.lock")


# Outputs this process holds locked: POSIX record locks do not conflict within one process, so a second
# writer of the same output in this process (a notebook kernel, a test) is refused through this set.
_HELD_LOCKS: set[Path] = set()


def _busy(final: Path, stage: str, holder: str) -> StageError:
    return StageError(
        f"output {final} is being written right now by another `python -m dapt {stage}` ({holder}); "
        "wait for it to finish, or choose another output."
    )


def _acquire(path: Path, final: Path, stage: str) -> Any:
    """Open and lock ``path``; retried when another run removed or replaced the file meanwhile."""
    while True:
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                handle.close()
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise _busy(final, stage, holder) from None
        try:
            same_file = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            return handle
        handle.close()  # the previous holder removed this file as it finished: lock the current one


@contextlib.contextmanager
def output_lock(final: str | os.PathLike, stage: str, leftovers: list[str] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the output ``final`` while a stage writes it.

    A second command writing the same output at the same time is refused with a clear message
    (exit 2) instead of interleaving its files with the first one's. The lock is a POSIX record lock
    on ``.<name>.lock`` beside the output: the operating system releases it when the process ends,
    however it ends, so a killed run never blocks the next, and worker processes forked meanwhile
    (which may outlive the stage, such as torch's compile workers) do not inherit it. The lock file is
    removed when the stage finishes. Once the lock is held, a killed run's leftovers are removed
    (:func:`remove_leftovers`, ``leftovers`` are its patterns).
    """
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    if final in _HELD_LOCKS:
        raise _busy(final, stage, f"this process, pid {os.getpid()}")
    path = lock_path(final)
    handle = _acquire(path, final, stage)
    _HELD_LOCKS.add(final)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        remove_leftovers(final, leftovers)
        yield
    finally:
        _HELD_LOCKS.discard(final)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        handle.close()


def remove_leftovers(final: str | os.PathLike, patterns: list[str] | None = None) -> list[Path]:
    """Remove what a killed run of the stage writing ``final`` left beside it (call with the lock held).

    By default those are the temporary ``.<name>.XXXXXXXX.partial`` folders of :func:`stage_output` and
    the ``.<name>.old-<pid>`` folders of a replacement that did not finish; a stage that writes files
    under other temporary names passes its own glob ``patterns`` (relative to ``final``'s folder).
    Returns what was removed.
    """
    final = Path(final).absolute()
    if patterns is None:
        patterns = [f".{final.name}.{'?' * 8}.partial", f".{final.name}.old-[0-9]*"]
    removed = []
    for pattern in patterns:
        for leftover in final.parent.glob(pattern):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
            removed.append(leftover)
    return removed


@contextlib.contextmanager
def storage_errors_reported(target: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk, a read-only or a forbidden location while writing ``target`` into a StageError."""
    try:
        yield
    except OSError as error:
        if error.errno in STORAGE_ERRNOS:
            raise storage_error(error, target) from None
        raise


@contextlib.contextmanager
def stage_output(final: str | os.PathLike, stage: str, parameters: Any, inputs: dict[str, Any]) -> Iterator[Path]:
    """Build a stage's output folder atomically.

    Yields a temporary folder to write into. On success the manifest is added and
    the folder replaces ``final`` (an earlier run of the same stage is replaced
    whole, so nothing is ever appended twice). On failure the temporary folder is
    removed and ``final`` is left as it was. The output is locked meanwhile
    (:func:`output_lock`), and a full or read-only file system gives a :class:`StageError`.
    """
    final = Path(final).absolute()
    _check_replaceable(final, stage)
    with storage_errors_reported(final), output_lock(final, stage):
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
        try:
            yield tmp
            write_json(
                tmp / MANIFEST,
                {"stage": stage, "parameters": jsonable(parameters), "inputs": jsonable(inputs)},
            )
            make_readable(tmp)
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
