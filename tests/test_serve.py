"""dapt.serve: the port it listens on, and that the server reported up is the one it started.

The end-to-end tests against a real `transformers serve` are in test_export.py (they need .venv-serve).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dapt.cli import main
from dapt.errors import UserInputError
from dapt.serve import _wait_until_healthy, check_address, free_port, listens_on


@contextlib.contextmanager
def impostor() -> Iterator[int]:
    """Another program on a loopback port that answers every GET (/health included) with 200."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            body = b'{"status": "ok"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def model_folder(tmp_path) -> Path:
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def test_a_port_another_process_listens_on_is_refused_before_the_server_starts(model_folder, capsys):
    with impostor() as port:
        status = main(["serve", "--model", str(model_folder), "--port", str(port), "--python", "/nonexistent"])
    error = capsys.readouterr().err
    assert status == 2, error
    assert f"--port {port}: another process already listens on 127.0.0.1:{port}" in error
    assert "serving" not in capsys.readouterr().out


def test_another_process_answering_on_the_port_is_not_taken_for_the_started_server(tmp_path):
    # the race a free port leaves open: between choosing it and the server binding it, another program takes it
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with impostor() as port, pytest.raises(UserInputError, match="another process, not the server started here"):
            _wait_until_healthy(child, f"http://127.0.0.1:{port}/health", tmp_path / "log", 10, port)
    finally:
        child.kill()
        child.wait()


def test_a_server_that_exits_is_reported_with_its_log(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("OSError: [Errno 98] address already in use\n")
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    child.wait()  # as the server does when its port is taken
    with impostor() as port, pytest.raises(UserInputError, match="(?s)exited with status 1.*address already in use"):
        _wait_until_healthy(child, f"http://127.0.0.1:{port}/health", log, 10, port)


def test_listens_on_names_the_process_that_holds_the_port():
    if listens_on(os.getpid(), 1) is None:
        pytest.skip("no /proc on this system: the server check falls back to the process being alive")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert listens_on(os.getpid(), port) is True
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            assert listens_on(child.pid, port) is False
        finally:
            child.kill()
            child.wait()
    assert listens_on(os.getpid(), port) is False  # closed


@pytest.mark.parametrize(("arguments", "expected"), [
    (["--port", "70000"], "--port 70000: give a TCP port from 1 to 65535, or 0 for a free one"),
    (["--port", "-1"], "--port -1"),
    (["--start-timeout-s", "0"], "--start-timeout-s 0"),
    (["--start-timeout-s", "nan"], "--start-timeout-s nan"),
    (["--host", ""], "--host ''"),
])
def test_values_that_cannot_work_are_refused_with_the_users_value(arguments, expected, model_folder, capsys):
    status = main(["serve", "--model", str(model_folder), "--python", "/nonexistent", *arguments])
    error = capsys.readouterr().err
    assert status == 2 and expected in error, error


def test_a_free_port_is_free_and_a_given_free_port_passes():
    port = free_port()
    check_address("127.0.0.1", port)  # nobody listens there: accepted
    check_address("127.0.0.1", 0)
