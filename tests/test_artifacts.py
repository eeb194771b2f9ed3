"""Stage output folders under faults and sharing: locks, leftovers of killed runs, permissions, full disks."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dapt.artifacts import StageError, make_readable, output_lock, stage_output, write_json

REPO = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_second_writer_of_the_same_output_is_refused(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with stage_output(final, "demo", {}, {}) as folder:
        (folder / "a.txt").write_text("first")
        with pytest.raises(StageError, match="being written right now by another `python -m dapt demo`"), \
                stage_output(final, "demo", {}, {}):
            pass
    assert (final / "a.txt").read_text() == "first"
    with stage_output(final, "demo", {}, {}) as folder:  # released: the next run goes through
        (folder / "a.txt").write_text("second")
    assert (final / "a.txt").read_text() == "second"


def test_concurrent_cli_runs_into_one_output_never_interleave(tmp_path: Path) -> None:
    """A process holding the lock (as a running stage does) makes the CLI refuse with exit 2, no traceback."""
    output = tmp_path / "base_tokenizer"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dapt.artifacts import output_lock\n"
         f"with output_lock({str(output)!r}, 'base-tokenizer'):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        result = subprocess.run([sys.executable, "-m", "dapt", "base-tokenizer", "--output", str(output)],
                                capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stderr
    assert "being written right now" in result.stderr and f"pid {holder.pid}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not output.exists()


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tmp_path: Path) -> None:
    final = tmp_path / "tokenizer"
    stale = [tmp_path / ".tokenizer.k3j9x0qa.partial", tmp_path / ".tokenizer.old-4242"]
    for folder in stale:
        folder.mkdir()
        (folder / "tokenizer.model").write_bytes(b"half")
    other = tmp_path / ".tokenizer_chipnemo.k3j9x0qa.partial"  # another output's: not ours to remove
    other.mkdir()
    with stage_output(final, "tokenizer", {}, {}) as folder:
        (folder / "x").write_text("x")
    assert not any(path.exists() for path in stale)
    assert other.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tokenizer_chipnemo.k3j9x0qa.partial", "tokenizer"]


def test_a_failed_stage_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), stage_output(tmp_path / "out", "demo", {}, {}) as folder:
        (folder / "half").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_forked_worker_that_outlives_the_stage_does_not_keep_the_lock(tmp_path: Path) -> None:
    """torch's compile workers, forked while a stage runs, live as long as the process that forked them."""
    final = tmp_path / "out"
    with output_lock(final, "demo"):
        pid = os.fork()
        if pid == 0:  # the worker: sleeps on, holding every descriptor it inherited
            import time

            time.sleep(30)
            os._exit(0)
    try:
        with output_lock(final, "demo"):  # the next run in the same process (a notebook kernel)
            pass
        holder = subprocess.run(
            [sys.executable, "-c", f"from dapt.artifacts import output_lock\nwith output_lock({str(final)!r}, 'x'):"
             "\n    print('ok')"], capture_output=True, text=True, timeout=60)
        assert holder.stdout.strip() == "ok", holder.stderr
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_finished_artifacts_follow_the_umask(tmp_path: Path, umask_022: None) -> None:
    source = tmp_path / "shared_shard.bin"
    source.write_bytes(b"weights")
    source.chmod(0o600)
    final = tmp_path / "export"
    with stage_output(final, "export", {}, {}) as folder:
        (folder / "sub").mkdir(mode=0o700)
        with tempfile.NamedTemporaryFile(dir=folder / "sub", delete=False) as handle:  # created 0600
            handle.write(b"x")
        script = folder / "commands.sh"
        script.write_text("#!/bin/bash\n")
        script.chmod(0o700)
        os.link(source, folder / "linked.bin")
    assert _mode(final) == 0o755 and _mode(final / "sub") == 0o755
    assert _mode(final / "sub" / Path(handle.name).name) == 0o644
    assert _mode(final / "manifest.json") == 0o644
    assert _mode(final / "commands.sh") == 0o755
    assert _mode(final / "linked.bin") == 0o600, "a hard link shares its source's mode: left alone"
    write_json(tmp_path / "record.json", {"a": 1})
    assert _mode(tmp_path / "record.json") == 0o644


def test_make_readable_respects_a_strict_umask(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir(mode=0o700)
    (folder / "a").write_text("a")
    old = os.umask(0o077)
    try:
        make_readable(folder)
    finally:
        os.umask(old)
    assert _mode(folder) == 0o700 and _mode(folder / "a") == 0o600


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="reading as another user id needs root and setpriv")
def test_export_like_folder_is_readable_by_another_user(umask_022: None) -> None:
    base = Path(tempfile.mkdtemp(prefix="dapt-perm-"))
    try:
        base.chmod(0o755)
        with stage_output(base / "export", "export", {}, {}) as folder:
            write_json(folder / "config.json", {"vocab_size": 1})
            (folder / "weights").mkdir()
            (folder / "weights" / "model.safetensors").write_bytes(b"w")
        for name in ("config.json", "weights/model.safetensors", "manifest.json"):
            result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat",
                                     str(base / "export" / name)], capture_output=True)
            assert result.returncode == 0, (name, result.stderr)
    finally:
        shutil.rmtree(base)


def _namespace_mount_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _namespace_mount_works(),
                                 reason="mounting a small tmpfs in a private mount namespace (unshare -rm) is not "
                                        "permitted here")


def _in_small_filesystem(mount: Path, options: str, command: list[str]) -> subprocess.CompletedProcess:
    """Run ``command`` with a tmpfs mounted at ``mount``, private to the command (nothing to clean up)."""
    mount.mkdir(parents=True, exist_ok=True)
    inner = f"mount -t tmpfs -o {options} tmpfs {mount} && exec \"$@\""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(["unshare", "-rm", "sh", "-c", inner, "sh", *command], capture_output=True, text=True,
                          env=env, timeout=300)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dapt", *args]


@needs_mount
def test_full_file_system_is_a_clean_refusal(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    # 16 KiB: room for the folder and the lock file, not for the trained tokenizer.model (about 30 KB)
    result = _in_small_filesystem(mount, "size=16k", _cli("base-tokenizer", "--output", str(mount / "tok")))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "the file system is full" in result.stderr and "Traceback" not in result.stderr
    assert "nothing was changed in" in result.stderr


@needs_mount
def test_read_only_output_is_a_clean_refusal(tmp_path: Path) -> None:
    mount = tmp_path / "ro"
    result = _in_small_filesystem(mount, "ro,size=1m", _cli("base-tokenizer", "--output", str(mount / "tok")))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "the file system is read-only" in result.stderr and "Traceback" not in result.stderr


def test_manifest_is_plain_json(tmp_path: Path) -> None:
    with stage_output(tmp_path / "o", "demo", {"path": tmp_path}, {"n": (1, 2)}):
        pass
    assert json.loads((tmp_path / "o" / "manifest.json").read_text()) == {
        "stage": "demo", "parameters": {"path": str(tmp_path)}, "inputs": {"n": [1, 2]}}


def test_output_lock_is_reentrant_across_runs(tmp_path: Path) -> None:
    for _ in range(2):
        with output_lock(tmp_path / "prefix", "data"):
            pass
