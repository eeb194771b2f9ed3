"""Stage ``smoke-test``: completion and chat requests to an OpenAI-compatible endpoint (NIM, or ``dapt serve``).

The answers' shape is checked (a ``choices`` list with the generated text, streamed chunks that end with a
``finish_reason``), and, given the exported folder (``--tokenizer``), that the exported tokenizer round-trips the
generated text and counts the prompt's tokens as the server does. Whatever the server sends, a broken answer
(not JSON, not UTF-8, a JSON list, a stream that breaks off, an answer that trickles in slower than
``--timeout-s``) is reported in one message (exit 2), never as a traceback: each request, from connecting to its
last byte, ends within ``--timeout-s`` seconds, and an answer larger than :data:`MAX_ANSWER_BYTES` is refused.

What to expect: the default prompt is the start of a SystemVerilog module header, sent greedily with a mild
repetition penalty. A 7B DAPT model continues it as a real module would. The ``tiny`` profile's model (2.7 M
parameters, 100 steps on CPU over the embedded CV32E40P/mor1kx sample) writes code-shaped fragments of that
sample (signal names such as ``data_ex``, ``logic [1:0]``, ``begin``, ``= {``, bits of its licence header)
that mean nothing; without the penalty it repeats a newline. The checks are about the served form, not quality.
"""

from __future__ import annotations

import http.client
import json
import math
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dapt.artifacts import stage_output, write_json
from dapt.config import param
from dapt.errors import UserInputError

REQUEST_KINDS = ("completion", "chat")
# The answers of a smoke test are a few hundred bytes; a server that sends more than this is refused.
MAX_ANSWER_BYTES = 16 * 2**20
_READ_CHUNK = 64 * 1024
DEFAULT_PROMPT = "module counter (\n  input  logic clk,\n  input  logic rst_n,\n"


class SmokeTestError(UserInputError):
    """The endpoint's answers fail the smoke test's checks."""


class EndpointUnreachable(SmokeTestError):
    """No server answers at the given address."""


@dataclass
class SmokeTestConfig:
    """Where the OpenAI-compatible endpoint is and what to send it."""

    base_url: str = param("http://127.0.0.1:8000/v1", "endpoint root, ending in /v1 (NIM's port is 8000)")
    model: str | None = param(None, "served model name (NIM_SERVED_MODEL_NAME); default: the first one "
                                    "GET /v1/models lists")
    tokenizer: Path | None = param(None, "exported folder: checks the tokenizer round trip and that the "
                                         "server counts prompt tokens as this tokenizer does")
    requests: tuple[str, ...] = param(REQUEST_KINDS, "requests to send: completion and/or chat")
    stream: bool = param(False, "ask for server-sent-event streaming")
    prompt: str = param(DEFAULT_PROMPT, "completion prompt and chat question; the default is the start of "
                                        "a SystemVerilog module, which even the tiny model continues")
    max_tokens: int = param(32, "tokens to generate per request (at least 1)")
    frequency_penalty: float = param(
        0.5, "OpenAI frequency_penalty sent with each (greedy) request, from -2 to 2; transformers serve applies "
        "it as repetition_penalty 1 + value (1.5, as the export's generation check), NIM as OpenAI's additive "
        "penalty; it keeps a small model from repeating one token (0: none)")
    timeout_s: float = param(120.0, "seconds each HTTP request may take, connecting to last byte (above 0)")
    api_key: str | None = param(None, "bearer token, where the endpoint needs one (never written to disk)")
    output: Path | None = param(None, "folder for smoke_test.json (none: print only)")


# --------------------------------------------------------------------------------------------------
# checks of the user's values
# --------------------------------------------------------------------------------------------------


def check_config(config: SmokeTestConfig) -> None:
    """Refuse values that cannot work, naming the user's own value."""
    parts = urllib.parse.urlsplit(config.base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SmokeTestError(f"--base-url {config.base_url!r} is not an http:// or https:// address; pass the "
                             "endpoint root, for example http://127.0.0.1:8000/v1.")
    if any(char.isspace() or ord(char) < 32 or ord(char) == 127 for char in config.base_url):
        raise SmokeTestError(f"--base-url {config.base_url!r} holds spaces or control characters.")
    unknown = sorted(set(config.requests) - set(REQUEST_KINDS))
    if unknown or not config.requests:
        raise SmokeTestError(f"--requests takes completion and/or chat; got {list(config.requests)}.")
    if isinstance(config.max_tokens, bool) or not isinstance(config.max_tokens, int) or config.max_tokens < 1:
        raise SmokeTestError(f"--max-tokens {config.max_tokens!r}: the server must generate at least 1 token.")
    if not (isinstance(config.timeout_s, (int, float)) and math.isfinite(config.timeout_s) and config.timeout_s > 0):
        raise SmokeTestError(f"--timeout-s {config.timeout_s!r}: give a number of seconds above 0.")
    penalty = config.frequency_penalty
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not -2 <= penalty <= 2:
        raise SmokeTestError(f"--frequency-penalty {penalty!r}: OpenAI-compatible servers take -2 to 2.")
    if not config.prompt:
        raise SmokeTestError("--prompt is empty; give the text to send.")
    if config.model is not None and not config.model.strip():
        raise SmokeTestError(f"--model {config.model!r} is empty; pass the served model name or leave it out.")


# --------------------------------------------------------------------------------------------------
# HTTP with one deadline per request
# --------------------------------------------------------------------------------------------------


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) addresses only (urllib would also follow ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            return None  # urllib then reports the redirect status itself
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HTTPOnlyRedirects)


def _read_body(response: Any, stop: threading.Event, url: str) -> bytes:
    """The body, read as it arrives, until it ends, ``stop`` is set or it outgrows MAX_ANSWER_BYTES."""
    read = getattr(response, "read1", response.read)
    chunks, size = [], 0
    while not stop.is_set():
        chunk = read(_READ_CHUNK)
        if not chunk:
            break
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise SmokeTestError(f"{url} sent more than {MAX_ANSWER_BYTES} bytes; a smoke-test answer is a few "
                                 "hundred. Is --base-url an OpenAI-compatible endpoint?")
        chunks.append(chunk)
    missing = getattr(response, "length", None)  # http.client's count of announced bytes still to come
    if not stop.is_set() and isinstance(missing, int) and missing > 0:
        raise SmokeTestError(f"{url} broke off its answer: {size} of the {size + missing} bytes it announced "
                             "arrived.")
    return b"".join(chunks)


def _exchange(request: urllib.request.Request, timeout_s: float, stop: threading.Event,
              outcome: dict[str, Any]) -> None:
    """Send ``request`` and read its answer into ``outcome`` (``value`` or ``error``); runs in a thread."""
    url = request.full_url
    try:
        try:
            response = _OPENER.open(request, timeout=timeout_s)
        except urllib.error.HTTPError as error:
            response = error  # an HTTP error status still carries a body worth quoting
        except urllib.error.URLError as error:
            outcome["error"] = EndpointUnreachable(
                f"cannot reach {url}: {error.reason}. Is the server running, and does --base-url point to it "
                "(scheme, host, port, ending in /v1)?")
            return
        with response:
            status = response.status if hasattr(response, "status") else response.code
            outcome["value"] = (status, response.headers.get("Content-Type", ""), _read_body(response, stop, url))
    except SmokeTestError as error:
        outcome["error"] = error
    except TimeoutError:
        outcome["error"] = _too_slow(request.get_method(), url, timeout_s)
    except (OSError, http.client.HTTPException) as error:
        outcome["error"] = SmokeTestError(
            f"{url} broke off or did not answer in HTTP ({type(error).__name__}: {error}).")


def _too_slow(method: str, url: str, timeout_s: float) -> SmokeTestError:
    return SmokeTestError(f"{method} {url} did not finish within --timeout-s {timeout_s:g} s (connecting to "
                          "last byte); the server is too slow or stalled.")


def http_request(method: str, url: str, payload: dict | None, timeout_s: float,
                 api_key: str | None = None) -> tuple[int, str, bytes]:
    """One HTTP request; returns (status, content type, body).

    The whole exchange (connecting, headers, body) must end within ``timeout_s`` seconds: a server that
    trickles its answer byte by byte is cut off at the deadline (SmokeTestError). An unreachable server
    raises :class:`EndpointUnreachable`.
    """
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    headers = {"Accept": "application/json, text/event-stream"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    if api_key:  # never sent on to where a redirect points
        request.add_unredirected_header("Authorization", f"Bearer {api_key}")
    outcome: dict[str, Any] = {}
    stop = threading.Event()
    worker = threading.Thread(target=_exchange, args=(request, timeout_s, stop, outcome), daemon=True,
                              name="dapt-smoke-test-request")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        stop.set()  # the worker stops reading at its next chunk; as a daemon it never blocks the exit
        raise _too_slow(method, url, timeout_s)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# --------------------------------------------------------------------------------------------------
# answers
# --------------------------------------------------------------------------------------------------


def _shape(value: Any) -> str:
    return {dict: "a JSON object", list: "a JSON list", str: "a JSON string", bool: "a JSON boolean",
            type(None): "JSON null"}.get(type(value), "a JSON number")


def decode_json_object(body: bytes, source: str) -> dict:
    """The JSON object in ``body``; SmokeTestError for anything else (not UTF-8, not JSON, a list ...)."""
    try:
        value = json.loads(body)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise SmokeTestError(f"{source} answered with something that is not JSON ({error}): {body[:200]!r}") from None
    if not isinstance(value, dict):
        raise SmokeTestError(f"{source} answered with {_shape(value)}, not an object: {json.dumps(value)[:200]}")
    return value


def parse_event_stream(body: bytes, source: str = "the event stream") -> list[dict]:
    """The JSON payloads of a server-sent-event body (``data: {...}`` lines; ``[DONE]`` ends it)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SmokeTestError(f"{source} is not UTF-8 text (byte {error.start}: "
                             f"{body[error.start:error.start + 8]!r})") from None
    events = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            break
        if not data:
            continue
        try:
            event = json.loads(data)
        except json.JSONDecodeError as error:
            raise SmokeTestError(f"line {number} of {source} is not JSON ({error.msg}): {data[:200]!r}") from None
        if not isinstance(event, dict):
            raise SmokeTestError(f"line {number} of {source} holds {_shape(event)}, not an event object: "
                                 f"{data[:200]!r}")
        events.append(event)
    return events


def _choices(where: str, value: dict) -> list[dict]:
    choices = value.get("choices")
    if choices is None:
        return []
    if not isinstance(choices, list) or not all(isinstance(choice, dict) for choice in choices):
        raise SmokeTestError(f"{where}: 'choices' is not a list of objects: {json.dumps(value)[:300]}")
    return choices


def _text_piece(where: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SmokeTestError(f"{where}: the generated text is {_shape(value)}, not a string: {json.dumps(value)[:200]}")
    return value


def merge_stream(kind: str, events: list[dict]) -> dict:
    """Fold streamed chunks into one answer of the non-streaming shape."""
    text, role, finish, usage = [], None, None, None
    for number, event in enumerate(events, start=1):
        if "error" in event:  # a server that fails mid-stream says so in an event (HTTP status is already 200)
            raise SmokeTestError(f"the {kind} stream broke off after {len(text)} chunks with the server's "
                                 f"error: {json.dumps(event['error'])[:500]}")
        where = f"event {number} of the {kind} stream"
        usage = event.get("usage") if isinstance(event.get("usage"), dict) else usage
        for choice in _choices(where, event):
            if kind == "completion":
                text.append(_text_piece(where, choice.get("text")))
            else:
                delta = choice.get("delta") or {}
                if not isinstance(delta, dict):
                    raise SmokeTestError(f"{where}: 'delta' is not an object: {json.dumps(choice)[:300]}")
                role = delta.get("role") or role
                text.append(_text_piece(where, delta.get("content")))
            finish = choice.get("finish_reason") or finish
    if finish is None:
        raise SmokeTestError(f"the {kind} stream ended without a final chunk (no finish_reason in "
                             f"{len(events)} events)")
    if kind == "completion":
        choice = {"text": "".join(text), "finish_reason": finish}
    else:
        choice = {"message": {"role": role, "content": "".join(text)}, "finish_reason": finish}
    return {"object": events[0].get("object") if events else None, "choices": [choice], "usage": usage,
            "streamed_chunks": len(events)}


def answer_text(kind: str, answer: dict) -> str:
    """The generated text of a completion or chat answer; SmokeTestError when its shape is wrong."""
    if not isinstance(answer, dict):
        raise SmokeTestError(f"{kind} answer is {_shape(answer)}, not an object: {json.dumps(answer)[:500]}")
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise SmokeTestError(f"{kind} answer has no choices list: {json.dumps(answer)[:500]}")
    choice = choices[0]
    if kind == "completion":
        text = choice.get("text")
    else:
        message = choice.get("message")
        if not isinstance(message, dict) or message.get("role") != "assistant":
            raise SmokeTestError(f"chat answer's message is not the assistant's: {json.dumps(choice)[:500]}")
        text = message.get("content")
    if not isinstance(text, str):
        raise SmokeTestError(f"{kind} answer carries no generated text: {json.dumps(choice)[:500]}")
    if not text and choice.get("finish_reason") != "stop":
        raise SmokeTestError(f"{kind} answer is empty, yet generation did not stop: "
                             f"{json.dumps(choice)[:500]}")
    return text


# --------------------------------------------------------------------------------------------------
# requests
# --------------------------------------------------------------------------------------------------


def _request_payload(kind: str, model: str, config: SmokeTestConfig) -> tuple[str, dict, Any]:
    common = {"model": model, "max_tokens": config.max_tokens, "temperature": 0.0, "stream": config.stream}
    if config.frequency_penalty:
        common["frequency_penalty"] = config.frequency_penalty
    if kind == "completion":
        return "completions", {**common, "prompt": config.prompt}, config.prompt
    messages = [{"role": "user", "content": config.prompt}]
    return "chat/completions", {**common, "messages": messages}, messages


def _send(kind: str, model: str, config: SmokeTestConfig) -> tuple[dict, Any]:
    route, payload, prompt = _request_payload(kind, model, config)
    url = f"{config.base_url.rstrip('/')}/{route}"
    status, content_type, body = http_request("POST", url, payload, config.timeout_s, config.api_key)
    if status != 200:
        raise SmokeTestError(f"POST {url} answered HTTP {status}: {body[:300].decode('utf-8', 'replace')}")
    if content_type.startswith("text/event-stream"):
        answer = merge_stream(kind, parse_event_stream(body, f"the {kind} stream of POST {url}"))
    else:
        answer = decode_json_object(body, f"POST {url}")
    return answer, prompt


def served_models(config: SmokeTestConfig) -> tuple[list[str], str | None]:
    """The model names GET /v1/models lists, and why the list is unusable (None when it is fine)."""
    url = f"{config.base_url.rstrip('/')}/models"
    status, _, body = http_request("GET", url, None, config.timeout_s, config.api_key)
    if status != 200:
        return [], f"GET {url} answered HTTP {status}"
    try:
        listing = decode_json_object(body, f"GET {url}")
    except SmokeTestError as error:
        return [], str(error)
    entries = listing.get("data")
    if not isinstance(entries, list):
        return [], f"GET {url} answered without a 'data' list: {json.dumps(listing)[:200]}"
    names = [entry["id"] for entry in entries if isinstance(entry, dict) and isinstance(entry.get("id"), str)]
    return names, None if names else f"GET {url} lists no model"


def _round_trip(tokenizer: Any, text: str, context: str = "") -> dict:
    """Encode ``context + text`` and decode it back: the same string, or the tokenizer loses text.

    Generated text is checked after its context (the prompt), as it stands in the conversation: on its own, a
    text that starts with a space would lose it to SentencePiece's dummy-prefix rule, which is no fault.
    """
    whole = context + text
    ids = tokenizer.encode(whole, add_special_tokens=False)
    back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    result = {"passed": back == whole, "tokens": len(ids), "text": text, "decoded": back[len(context):]
              if back.startswith(context) else back}
    if context:
        result["context_chars"] = len(context)
    if not result["passed"]:
        result["error"] = "the exported tokenizer does not give this text back after encoding it"
    return result


def _prompt_text(kind: str, prompt: Any) -> str:
    """The text the answer follows: the completion prompt, or the chat's last message."""
    if kind == "completion":
        return str(prompt)
    return str(prompt[-1]["content"]) + "\n" if prompt else ""


def _prompt_tokens(tokenizer: Any, kind: str, prompt: Any) -> int:
    if kind == "completion":
        return len(tokenizer.encode(prompt))
    return len(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True))


def _check_answer(kind: str, answer: dict, prompt: Any, tokenizer: Any, max_tokens: int) -> dict:
    text = answer_text(kind, answer)
    result: dict[str, Any] = {"passed": True, "text": text,
                              "finish_reason": answer["choices"][0].get("finish_reason"),
                              "streamed_chunks": answer.get("streamed_chunks")}
    usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else None
    result["usage"] = usage
    if usage and isinstance(usage.get("completion_tokens"), int) and usage["completion_tokens"] > max_tokens:
        result["passed"] = False
        result["error"] = f"server generated {usage['completion_tokens']} tokens > --max-tokens {max_tokens}"
    if tokenizer is None:
        return result
    result["round_trip"] = _round_trip(tokenizer, text, context=_prompt_text(kind, prompt))
    result["passed"] &= result["round_trip"]["passed"]
    if not result["round_trip"]["passed"]:
        result["error"] = result["round_trip"]["error"]
    if usage and isinstance(usage.get("prompt_tokens"), int):
        local = _prompt_tokens(tokenizer, kind, prompt)
        result["prompt_tokens"] = {"server": usage["prompt_tokens"], "exported_tokenizer": local,
                                   "passed": usage["prompt_tokens"] == local}
        result["passed"] &= result["prompt_tokens"]["passed"]
    else:
        result["prompt_tokens"] = {"skipped": "the server reported no usage"}
    return result


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    if not (Path(folder) / "tokenizer_config.json").is_file():
        raise SmokeTestError(f"--tokenizer {folder} holds no tokenizer_config.json; pass the export folder.")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise SmokeTestError(f"--tokenizer {folder} does not load as an HF tokenizer: {error}") from None


def smoke_test(config: SmokeTestConfig) -> dict:
    """Send completion and/or chat requests to an OpenAI-compatible endpoint and check the answers."""
    check_config(config)
    tokenizer = _load_tokenizer(config.tokenizer) if config.tokenizer is not None else None
    served, listing_problem = served_models(config)
    model = config.model or (served[0] if served else None)
    if not model:
        raise SmokeTestError(f"{listing_problem}; pass --model with the served model name.")
    report: dict[str, Any] = {"base_url": config.base_url, "model": model, "served_models": served,
                              "model_listed": model in served, "checks": {}}
    if listing_problem:
        report["models_listing"] = listing_problem
    if tokenizer is not None:
        report["checks"]["prompt_round_trip"] = _round_trip(tokenizer, config.prompt)
    for kind in config.requests:
        try:
            answer, prompt = _send(kind, model, config)
            report["checks"][kind] = _check_answer(kind, answer, prompt, tokenizer, config.max_tokens)
        except EndpointUnreachable:
            raise
        except SmokeTestError as error:
            report["checks"][kind] = {"passed": False, "error": str(error)}
    report["passed"] = all(check["passed"] for check in report["checks"].values())
    print(json.dumps(report, indent=2, ensure_ascii=False))
    if config.output is not None:
        recorded = replace(config, api_key="(given, not recorded)" if config.api_key else None)
        with stage_output(config.output, "smoke-test", recorded, {"base_url": config.base_url}) as folder:
            write_json(folder / "smoke_test.json", report)
    if not report["passed"]:
        failed = "; ".join(f"{name}: {check.get('error', 'see the report above')}"
                           for name, check in report["checks"].items() if not check["passed"])
        raise SmokeTestError(f"smoke test of {config.base_url} failed: {failed[:1500]}")
    return report
