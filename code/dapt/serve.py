"""Serve an exported model locally behind an OpenAI-compatible API, on CPU, to smoke-test it without NIM.

NIM serves the export on GPUs. Here the server is ``transformers serve`` (transformers 5.24 has both
``/v1/completions`` and ``/v1/chat/completions``), run by the interpreter of its own environment
(``.venv-serve``, built by ``bash scripts/setup_env.sh serve``): the model that this project's transformers
exported is then loaded by another transformers release, as NIM's own stack would load it. The server listens
on loopback only, works offline, and is stopped when the ``with`` block (or the ``serve`` stage) ends.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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
    port: int = param(8000, "port to listen on (0: any free port)")
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
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _log_tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def _wait_until_healthy(process: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserInputError(f"the server exited with status {process.returncode} before answering; "
                                 f"its log ({log}) ends with:\n{_log_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise UserInputError(f"the server did not answer {url} within {timeout_s:.0f} s (raise --start-timeout-s "
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
    python = find_serving_python(python)
    check_serving_python(python)
    port = port or free_port(host)
    with tempfile.TemporaryDirectory(prefix="dapt-serve-") as scratch:
        log = Path(log) if log is not None else Path(scratch) / "server.log"
        with open(log, "wb") as handle:
            process = subprocess.Popen(server_command(python, model, host, port), stdout=handle,
                                       stderr=subprocess.STDOUT, env={**os.environ, **_OFFLINE_ENV})
        try:
            _wait_until_healthy(process, f"http://{host}:{port}/health", log, start_timeout_s)
            yield f"http://{host}:{port}/v1"
        finally:
            _stop(process)


def serve(config: ServeConfig) -> None:
    """Serve ``config.model`` in the foreground until interrupted (Ctrl-C), printing the smoke-test command."""
    with local_server(config.model, config.python, config.host, config.port, config.start_timeout_s,
                      log=config.log) as base_url:
        print(f"serving {config.model} at {base_url} (OpenAI-compatible; Ctrl-C stops it; "
              f"server log: {config.log or 'a temporary file'})\n"
              f"check it with: {Path(sys.executable).name} -m dapt smoke-test --base-url {base_url} "
              f"--model {config.model} --tokenizer {config.model}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping the server")
