"""The smoke test against small hostile or broken servers on loopback (http.server in a thread).

Every case must end in exit status 2 with one message that says what the server sent, never a traceback, and a
server that trickles its answer must be cut off at --timeout-s.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dapt.cli import main
from dapt.smoke_test import SmokeTestConfig, SmokeTestError, parse_event_stream, smoke_test

GOOD_COMPLETION = {"object": "text_completion", "usage": {"prompt_tokens": 3, "completion_tokens": 2},
                   "choices": [{"index": 0, "text": " x;", "finish_reason": "length"}]}
GOOD_CHAT = {"object": "chat.completion", "usage": {"prompt_tokens": 9, "completion_tokens": 2},
             "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}


@contextlib.contextmanager
def stub_server(answer: Callable[[BaseHTTPRequestHandler], None]) -> Iterator[str]:
    """Serve ``answer(handler)`` for every GET and POST on a free loopback port; yield the /v1 base URL."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            answer(self)

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            answer(self)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def send(handler: BaseHTTPRequestHandler, body: bytes, content_type: str = "application/json",
         length: int | None = None) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    handler.end_headers()
    handler.wfile.write(body)
    handler.wfile.flush()


def json_everywhere(value) -> Callable[[BaseHTTPRequestHandler], None]:
    return lambda handler: send(handler, json.dumps(value).encode())


def good_models_then(post: Callable[[BaseHTTPRequestHandler], None]) -> Callable[[BaseHTTPRequestHandler], None]:
    """A server whose GET /v1/models lists model "m" and whose POSTs are answered by ``post``."""

    def answer(handler: BaseHTTPRequestHandler) -> None:
        if handler.command == "GET":
            send(handler, json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode())
        else:
            post(handler)

    return answer


def run_cli(base_url: str, capsys, *extra: str) -> tuple[int, str]:
    status = main(["smoke-test", "--base-url", base_url, "--timeout-s", "5", *extra])
    return status, capsys.readouterr().err


def test_a_good_stub_passes(capsys):
    def post(handler):
        send(handler, json.dumps(GOOD_CHAT if "chat" in handler.path else GOOD_COMPLETION).encode())

    with stub_server(good_models_then(post)) as url:
        status, error = run_cli(url, capsys)
    assert status == 0, error


@pytest.mark.parametrize(("listing", "expected"), [
    ([1, 2], "answered with a JSON list, not an object"),
    ({"data": 5}, "without a 'data' list"),
    ({"data": []}, "lists no model"),
])
def test_a_useless_model_listing_is_one_clear_message(listing, expected, capsys):
    with stub_server(json_everywhere(listing)) as url:
        status, error = run_cli(url, capsys)
    assert status == 2 and expected in error and "pass --model" in error, error
    assert error.count("\n") == 1 and error.startswith("error: ")


@pytest.mark.parametrize(("answer", "expected"), [
    ([{"text": "x"}], "answered with a JSON list, not an object"),
    ({"data": 5}, "has no choices list"),
    ({"choices": [{"text": 5, "finish_reason": "stop"}]}, "carries no generated text"),
    ("just a string", "answered with a JSON string, not an object"),
])
def test_answers_of_the_wrong_shape_fail_with_the_servers_words(answer, expected, capsys):
    with stub_server(good_models_then(lambda handler: send(handler, json.dumps(answer).encode()))) as url:
        status, error = run_cli(url, capsys, "--requests", "completion")
    assert status == 2 and "smoke test of" in error and expected in error, error


@pytest.mark.parametrize(("body", "expected"), [
    (b"data: {\"choices\": [{\"text\": \"\xff\xfe\"}]}\n\n", "is not UTF-8 text (byte"),
    (b"data: {\"choices\": [{\"text\": \"x\"\n\n", "line 1 of the completion stream of POST"),
    (b"data: [1, 2]\n\n", "holds a JSON list, not an event object"),
    (b"data: {\"choices\": {\"text\": \"x\"}}\n\ndata: [DONE]\n\n", "'choices' is not a list of objects"),
    (b"data: {\"choices\": [{\"text\": \"x\"}]}\n\ndata: [DONE]\n\n", "ended without a final chunk"),
])
def test_broken_event_streams_fail_cleanly(body, expected, capsys):
    with stub_server(good_models_then(lambda handler: send(handler, body, "text/event-stream"))) as url:
        status, error = run_cli(url, capsys, "--requests", "completion", "--stream")
    assert status == 2 and expected in error, error


def test_a_body_that_breaks_off_fails_cleanly(capsys):
    def post(handler):  # promises 1000 bytes, sends 20 and closes the connection
        send(handler, b'{"choices": [{"text"', length=1000)
        handler.close_connection = True

    with stub_server(good_models_then(post)) as url:
        status, error = run_cli(url, capsys, "--requests", "completion")
    assert status == 2 and "broke off its answer: 20 of the 1000 bytes" in error, error


def test_non_json_and_non_utf8_answers_fail_cleanly(capsys):
    with stub_server(good_models_then(lambda handler: send(handler, b"\xff\xfe\x00garbage"))) as url:
        status, error = run_cli(url, capsys, "--requests", "completion")
    assert status == 2 and "not JSON" in error, error
    with stub_server(lambda handler: send(handler, b"<html>not an API</html>", "text/html")) as url:
        status, error = run_cli(url, capsys)
    assert status == 2 and "not JSON" in error and "pass --model" in error, error


def trickle(handler: BaseHTTPRequestHandler) -> None:
    """One byte per second, starting with the status line, for a minute."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n" + b" " * 40
    with contextlib.suppress(OSError):
        for byte in answer[:60]:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(1)
    handler.close_connection = True


def test_a_server_that_sends_one_byte_per_second_is_cut_off_at_the_timeout(capsys):
    with stub_server(trickle) as url:
        started = time.monotonic()
        status = main(["smoke-test", "--base-url", url, "--model", "m", "--timeout-s", "2",
                       "--requests", "completion"])
        elapsed = time.monotonic() - started
        error = capsys.readouterr().err
        # the model listing and the completion: two requests, each cut off at 2 s
        assert status == 2 and "did not finish within --timeout-s 2 s" in error, error
        assert elapsed < 2 * 2 + 2, elapsed


def test_a_server_that_never_answers_is_cut_off_at_the_timeout():
    with stub_server(lambda handler: time.sleep(30)) as url:
        started = time.monotonic()
        with pytest.raises(SmokeTestError, match="did not finish within --timeout-s 1 s"):
            smoke_test(SmokeTestConfig(base_url=url, model="m", timeout_s=1, requests=("completion",)))
        assert time.monotonic() - started < 1 * 2 + 2


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("--max-tokens", "0", "--max-tokens 0"),
    ("--max-tokens", "-3", "--max-tokens -3"),
    ("--timeout-s", "0", "--timeout-s 0"),
    ("--timeout-s", "nan", "--timeout-s nan"),
    ("--timeout-s", "-1", "--timeout-s -1"),
    ("--base-url", "file:///etc/passwd", "--base-url 'file:///etc/passwd' is not an http"),
    ("--base-url", "localhost:8000/v1", "--base-url 'localhost:8000/v1' is not an http"),
    ("--base-url", "http://127.0.0.1:8000/v1\nHost: x", "spaces or control characters"),
    ("--requests", "embeddings", "got ['embeddings']"),
])
def test_values_that_cannot_work_are_refused_with_the_users_value(option, value, expected, capsys):
    arguments = ["smoke-test", "--model", "m", option, value]
    if option != "--base-url":
        arguments += ["--base-url", "http://127.0.0.1:9/v1"]
    status = main(arguments)
    error = capsys.readouterr().err
    assert status == 2 and expected in error, error
    assert "cannot reach" not in error  # refused before any request


def test_event_stream_parsing_keeps_the_events_in_order():
    events = parse_event_stream(b'data: {"a": 1}\n\n: comment\ndata: {"b": 2}\n\ndata: [DONE]\n\ndata: {"c": 3}\n')
    assert events == [{"a": 1}, {"b": 2}]


def redirect_to(location: str) -> Callable[[BaseHTTPRequestHandler], None]:
    """Redirect GETs to ``location``; answer POSTs with a good completion (urllib never redirects a POST)."""

    def answer(handler: BaseHTTPRequestHandler) -> None:
        if handler.command == "POST":
            send(handler, json.dumps(GOOD_COMPLETION).encode())
            return
        handler.send_response(307)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return answer


def test_redirects_go_to_http_only_and_never_carry_the_api_key(capsys):
    seen: list[str | None] = []

    def record(handler):
        seen.append(handler.headers.get("Authorization"))
        send(handler, json.dumps({"data": [{"id": "m"}]} if handler.command == "GET" else GOOD_COMPLETION).encode())

    with stub_server(record) as target, stub_server(redirect_to(target + "/models")) as url:
        status = main(["smoke-test", "--base-url", url, "--api-key", "s3cret", "--requests", "completion",
                       "--timeout-s", "5"])
    assert status == 0, capsys.readouterr().err
    capsys.readouterr()
    assert seen and all(header is None for header in seen)  # the redirected request went out without the bearer token
    with stub_server(redirect_to("ftp://127.0.0.1/etc/passwd")) as url:
        status = main(["smoke-test", "--base-url", url, "--model", "m", "--requests", "completion", "--timeout-s", "5"])
    printed = capsys.readouterr()
    # the ftp:// redirect is not followed: the listing is reported unusable, the given --model is used
    assert status == 0, printed.err
    assert json.loads(printed.out)["models_listing"].endswith("/models answered HTTP 307")


def test_the_api_key_is_never_written_to_disk(tmp_path, capsys):
    def post(handler):
        assert handler.headers["Authorization"] == "Bearer s3cret"
        send(handler, json.dumps(GOOD_COMPLETION).encode())

    with stub_server(good_models_then(post)) as url:
        status = main(["smoke-test", "--base-url", url, "--api-key", "s3cret", "--requests", "completion",
                       "--output", str(tmp_path / "smoke")])
    assert status == 0, capsys.readouterr().err
    written = "".join(path.read_text() for path in (tmp_path / "smoke").iterdir())
    assert "s3cret" not in written and "(given, not recorded)" in written
