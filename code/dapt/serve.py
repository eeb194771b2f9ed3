"""Serve an exported model locally behind an OpenAI-compatible API, on CPU, to smoke-test it without NIM.

NIM serves the export on GPUs. Here the server is ``transformers serve`` (transformers 5.24 has both
``/v1/completions`` and ``/v1/chat/completions``), run by the interpreter of its own environment
(``.venv-serve``, built by ``bash scripts/setup_env.sh serve``): the model that this project's transformers
exported is then loaded by another transformers release, as NIM's own stack would load it. The server listens
on loopback only, works offline, and is stopped when the ``with`` block (or the ``serve`` stage) ends.

The port is a free one unless ``--port`` names one; a named port that another process already listens on is
refused before the server starts, and the server is reported up only when the process started here is the
one that answers (it is alive, and on Linux it holds the listening socket), never another program that
happens to listen on the same port.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dapt.artifacts import storage_errors_reported
from dapt.config import param
from dapt.errors import UserInputError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SERVE_VENV = REPO_ROOT / ".venv-serve"
SERVE_PYTHON_ENV = "DAPT_SERVE_PYTHON"
SETUP_HINT = "build it with `bash scripts/setup_env.sh serve` (or pass the interpreter of an environment " \
             "with transformers[serving]>=5.24)"
# Printed by the serving interpreter: its transformers version, or why it cannot serve completions.
_PROBE = (
    "import transformers, transformers.cli.serve, transformers.cli.serving.completion\n"
    "from transformers.utils.import_utils import is_serve_available\n"
    "assert is_serve_available(), 'transformers[serving] extras (fastapi, uvicorn, openai, ...) missing'\n"
    "print(transformers.__version__)\n"
)
# The server must not reach for a hub or check for updates.
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1"}


@dataclass
class ServeConfig:
    """What to serve and with which interpreter."""

    model: Path = param(help="exported folder to serve (the export stage's output)")
    python: Path | None = param(None, f"interpreter of the serving environment; default: ${SERVE_PYTHON_ENV}, "
                                      "else .venv-serve/bin/python in this repository")
    host: str = param("127.0.0.1", "address to listen on (loopback by default)")
    port: int = param(0, "port to listen on; 0 (the default): a free port, printed when the server is up")
    start_timeout_s: float = param(240.0, "seconds to wait for the server to load the model and answer")
    log: Path | None = param(None, "file for the server's output; None: a temporary file")


def find_serving_python(python: Path | None = None) -> Path | None:
    """The serving interpreter: ``python``, else ``$DAPT_SERVE_PYTHON``, else ``.venv-serve``'s; None if none."""
    if python is not None:
        return Path(python)
    if os.environ.get(SERVE_PYTHON_ENV):
        return Path(os.environ[SERVE_PYTHON_ENV])
    default = DEFAULT_SERVE_VENV / "bin" / "python"
    return default if default.exists() else None


def check_serving_python(python: Path | None) -> str:
    """The transformers version of a usable serving interpreter; UserInputError saying what to do otherwise."""
    if python is None:
        raise UserInputError(f"no serving environment: {DEFAULT_SERVE_VENV} does not exist and "
                             f"${SERVE_PYTHON_ENV} is not set; {SETUP_HINT}.")
    if not Path(python).exists():
        raise UserInputError(f"--python {python}: no such interpreter; {SETUP_HINT}.")
    probe = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=300,
                           env={**os.environ, **_OFFLINE_ENV})
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserInputError(f"--python {python} cannot run an OpenAI-compatible server with /v1/completions "
                             f"({reason}); {SETUP_HINT}.")
    return probe.stdout.strip()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_address(host: str, port: int) -> None:
    """Refuse an address the server could not listen on, above all a port another process already uses."""
    if not host or any(char.isspace() for char in host):
        raise UserInputError(f"--host {host!r} is not an address to listen on; use 127.0.0.1 (the default).")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UserInputError(f"--port {port!r}: give a TCP port from 1 to 65535, or 0 for a free one.")
    if port == 0:
        return
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise UserInputError(f"--port {port}: another process already listens on {host}:{port}; pass "
                                     "another --port, or leave it out for a free one.") from None
            raise UserInputError(f"cannot listen on --host {host} --port {port}: {error.strerror}.") from None


def _listening_inodes(port: int) -> set[str] | None:
    """Inodes of the TCP sockets listening on ``port`` (IPv4 and IPv6); None where /proc/net cannot tell."""
    inodes, readable = set(), False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for row in rows:
            fields = row.split()  # sl local_address rem_address st ... inode (column 10)
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes if readable else None


def listens_on(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds a socket listening on TCP ``port``; None where /proc cannot tell (not Linux)."""
    listening = _listening_inodes(port)
    if listening is None:
        return None
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return None
    sockets = set()
    for descriptor in descriptors:
        with contextlib.suppress(OSError):  # closed meanwhile (the listing's own descriptor, for one)
            link = os.readlink(descriptor)
            if link.startswith("socket:["):
                sockets.add(link[len("socket:["):-1])
    return bool(sockets & listening)


def _log_tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _wait_until_healthy(process: subprocess.Popen, url: str, log: Path, timeout_s: float, port: int) -> None:
    """Wait until the server started here answers ``url``; refuse another process answering on its port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is None and _answers(url):
            owner = listens_on(process.pid, port)
            if process.poll() is None and owner is not False:
                return
            if process.poll() is None:
                raise UserInputError(
                    f"another process, not the server started here (pid {process.pid}), answers {url}; pass "
                    "another --port, or leave it out for a free one.")
        if process.poll() is not None:
            raise UserInputError(f"the server exited with status {process.returncode} before answering; "
                                 f"its log ({log}) ends with:\n{_log_tail(log)}")
        time.sleep(0.5)
    raise UserInputError(f"the server did not answer {url} within --start-timeout-s {timeout_s:g} s (raise it "
                         f"on a slow machine); its log ({log}) ends with:\n{_log_tail(log)}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=20)


def server_command(python: Path, model: Path, host: str, port: int) -> list[str]:
    """The ``transformers serve`` command line: one preloaded model, CPU, float32, this address."""
    return [str(python), "-m", "transformers.cli.transformers", "serve", str(model),
            "--host", host, "--port", str(port), "--device", "cpu", "--dtype", "float32"]


@contextmanager
def local_server(model: Path, python: Path | None = None, host: str = "127.0.0.1", port: int = 0,
                 start_timeout_s: float = 240.0, log: Path | None = None) -> Iterator[str]:
    """Start ``transformers serve`` on ``model``; yield its base URL (``http://HOST:PORT/v1``); stop it after.

    The model is loaded before the URL is yielded, so the first request is answered at once. ``log`` (default:
    a temporary file) receives the server's output; errors quote its end.
    """
    model = Path(model)
    if not (model / "config.json").is_file():
        raise UserInputError(f"--model {model} holds no config.json; pass the export stage's output folder.")
    check_address(host, port)
    if not (isinstance(start_timeout_s, (int, float)) and math.isfinite(start_timeout_s) and start_timeout_s > 0):
        raise UserInputError(f"--start-timeout-s {start_timeout_s!r}: give a number of seconds above 0.")
    python = find_serving_python(python)
    check_serving_python(python)
    port = port or free_port(host)
    with tempfile.TemporaryDirectory(prefix="dapt-serve-") as scratch:
        log = Path(log) if log is not None else Path(scratch) / "server.log"
        with storage_errors_reported(log):  # a log in a full or read-only folder: a clean refusal
            log.parent.mkdir(parents=True, exist_ok=True)
            handle = open(log, "wb")  # noqa: SIM115 - closed right after the server inherited it
        with handle:
            process = subprocess.Popen(server_command(python, model, host, port), stdout=handle,
                                       stderr=subprocess.STDOUT, env={**os.environ, **_OFFLINE_ENV})
        try:
            _wait_until_healthy(process, f"http://{host}:{port}/health", log, start_timeout_s, port)
            yield f"http://{host}:{port}/v1"
        finally:
            _stop(process)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through local_server, which stops the server process


def serve(config: ServeConfig) -> None:
    """Serve ``config.model`` in the foreground until interrupted (Ctrl-C or SIGTERM), printing the smoke-test command.

    Either way the server process is stopped too (a ``kill`` of this command leaves no server behind).
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm) if in_main_thread else None
    try:
        with local_server(config.model, config.python, config.host, config.port, config.start_timeout_s,
                          log=config.log) as base_url:
            check = [Path(sys.executable).name, "-m", "dapt", "smoke-test", "--base-url", base_url,
                     "--model", str(config.model), "--tokenizer", str(config.model)]
            print(f"serving {config.model} at {base_url} (OpenAI-compatible; Ctrl-C stops it; "
                  f"server log: {config.log or 'a temporary file'})\n"
                  f"check it with: {shlex.join(check)}", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                print("stopping the server", flush=True)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
