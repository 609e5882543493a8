"""The Segment Tracking API emulator: routes, checks, storage and inspection, in one server.

What it checks, as Segment's HTTP Tracking API documents it
(reference: profiles-and-segment.md, section 4):

* ``POST /v1/batch`` and the single-call routes ``/v1/{identify,group,track,page,screen,alias}``.
* HTTP basic auth with the source's write key as the user name and an empty password;
  a missing or wrong key is 401. The key is never echoed, printed or logged.
* ``Content-Type: application/json``; ``Content-Encoding: gzip`` accepted.
* Limits: a call over 32 KB, or a batch request over 500 KB, is 400 (read as 1,000-byte
  kilobytes, the stricter reading). Invalid JSON is 400. Segment answers 200 otherwise,
  and so does the emulator, after it checks what Segment's own pipeline would drop
  (a call without ``type``, or without ``userId`` and ``anonymousId``): those are 400 here,
  so that tests see them.
* A batch's top-level ``context`` and ``integrations`` are merged into each call.
* Dedup by ``messageId``, as Segment's (about 99%) dedup does: a repeat is counted in
  ``duplicates`` and not stored again.

Inspection without auth: ``GET /_emulator/messages``, ``GET /_emulator/stats``,
``POST /_emulator/reset``. Faults for retry tests: the first ``fail_first`` ingestion
requests are answered ``fail_status`` (with ``Retry-After`` for 429 and 503).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import gzip
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = [
    "BATCH_LIMIT_BYTES",
    "CALL_LIMIT_BYTES",
    "RunningSegment",
    "SegmentConfig",
    "calls_of",
    "start_in_thread",
]

CALL_LIMIT_BYTES = 32_000
BATCH_LIMIT_BYTES = 500_000
_TYPES = ("identify", "group", "track", "page", "screen", "alias")
_INGEST = {"/v1/batch", *(f"/v1/{kind}" for kind in _TYPES)}


@dataclasses.dataclass(frozen=True)
class SegmentConfig:
    """Settings of one emulator; ``write_key`` None accepts any non-empty key.

    Attributes:
        write_key: the only write key accepted (never shown in ``repr``).
        host / port: where to listen (port 0 picks a free one).
        fail_first: the first N ingestion requests fail with ``fail_status``.
        fail_status: the status of injected failures.
        retry_after: seconds in ``Retry-After`` on injected 429/503 answers.
    """

    write_key: str | None = dataclasses.field(default=None, repr=False)
    host: str = "127.0.0.1"
    port: int = 0
    fail_first: int = 0
    fail_status: int = 503
    retry_after: float = 0.1

    def __post_init__(self) -> None:
        if self.write_key == "":
            msg = "write_key must be None (any key) or non-empty"
            raise ValueError(msg)
        if not 400 <= self.fail_status <= 599:
            msg = f"fail_status must be 400-599, got {self.fail_status}"
            raise ValueError(msg)


class _State:
    """What the emulator has accepted and seen, behind one lock."""

    def __init__(self, config: SegmentConfig) -> None:
        self.config = config
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.ids: set[str] = set()
        self.duplicates = 0
        self.requests: Counter[str] = Counter()
        self.request_bytes: list[int] = []
        self.failed = 0

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "messages": len(self.messages),
                "by_type": dict(Counter(m.get("type") for m in self.messages)),
                "duplicates": self.duplicates,
                "requests": dict(self.requests),
                "largest_request_bytes": max(self.request_bytes, default=0),
            }


class _Refused(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _authorized(header: str | None, key: str | None) -> bool:
    if not header or not header.startswith("Basic "):
        return False
    try:
        decoded = base64.b64decode(header[6:], validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    user, _, _ = decoded.partition(":")
    return bool(user) and (key is None or user == key)


def _size(call: Any) -> int:
    return len(json.dumps(call, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def calls_of(path: str, body: bytes) -> list[dict[str, Any]]:
    """The calls of one request body, checked as Segment checks them.

    Raises:
        ValueError: a 400 (its ``status``) with a Segment-like message.
    """
    limit = BATCH_LIMIT_BYTES if path == "/v1/batch" else CALL_LIMIT_BYTES
    if len(body) > limit:
        raise _Refused(400, f"request body is {len(body)} bytes; the limit is {limit}")
    try:
        payload = json.loads(body)
    except ValueError:
        raise _Refused(400, "invalid JSON") from None
    if not isinstance(payload, dict):
        raise _Refused(400, "the body must be a JSON object")
    if path == "/v1/batch":
        batch = payload.get("batch")
        if not isinstance(batch, list):
            raise _Refused(400, "batch must be an array")
        shared = {
            k: payload[k] for k in ("context", "integrations") if isinstance(payload.get(k), dict)
        }
        calls = []
        for item in batch:
            if not isinstance(item, dict):
                raise _Refused(400, "every batch item must be an object")
            merged = dict(item)
            for key, value in shared.items():
                own = item.get(key)
                merged[key] = {**value, **own} if isinstance(own, dict) else value
            calls.append(merged)
    else:
        calls = [{**payload, "type": payload.get("type") or path.rsplit("/", 1)[-1]}]
    for index, call in enumerate(calls):
        if _size(call) > CALL_LIMIT_BYTES:
            raise _Refused(400, f"call {index} is over {CALL_LIMIT_BYTES} bytes")
        if call.get("type") not in _TYPES:
            raise _Refused(400, f"call {index} has no valid type")
        if not call.get("userId") and not call.get("anonymousId"):
            raise _Refused(400, f"call {index} has neither userId nor anonymousId")
    return calls


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """Quiet: request lines would go to stderr."""

    def _answer(self, status: int, document: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(document).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length)
        if (self.headers.get("Content-Encoding") or "").lower() == "gzip":
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError):
                raise _Refused(400, "the gzip body does not inflate") from None
        return data

    def do_GET(self) -> None:
        state = self.server.state
        if self.path.startswith("/_emulator/messages"):
            with state.lock:
                messages = list(state.messages)
            self._answer(200, messages)
        elif self.path.startswith("/_emulator/stats"):
            self._answer(200, state.stats())
        else:
            self._answer(404, {"error": "not found"})

    def do_POST(self) -> None:
        state = self.server.state
        path = self.path.split("?", 1)[0]
        if path == "/_emulator/reset":
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with state.lock:
                state.reset()
            self._answer(200, {"success": True})
            return
        if path not in _INGEST:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._answer(404, {"error": "not found"})
            return
        status, document, headers = self._ingest(path)
        with state.lock:
            state.requests[f"{path} {status}"] += 1
        self._answer(status, document, headers)

    def _ingest(self, path: str) -> tuple[int, Any, dict[str, str]]:
        state = self.server.state
        config = state.config
        try:
            body = self._body()
        except _Refused as exc:
            return exc.status, {"error": str(exc)}, {}
        if not _authorized(self.headers.get("Authorization"), config.write_key):
            return 401, {"error": "invalid write key"}, {}
        with state.lock:
            state.request_bytes.append(len(body))
            if state.failed < config.fail_first:
                state.failed += 1
                headers = {}
                if config.fail_status in (429, 503):
                    headers["Retry-After"] = f"{config.retry_after:g}"
                return config.fail_status, {"error": "injected failure"}, headers
        try:
            calls = calls_of(path, body)
        except _Refused as exc:
            return exc.status, {"error": str(exc)}, {}
        with state.lock:
            for call in calls:
                message_id = call.get("messageId")
                if isinstance(message_id, str) and message_id in state.ids:
                    state.duplicates += 1
                    continue
                if isinstance(message_id, str):
                    state.ids.add(message_id)
                state.messages.append(call)
        return 200, {"success": True}, {}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: _State) -> None:
        self.state = state
        super().__init__((state.config.host, state.config.port), _Handler)


class RunningSegment:
    """A Segment emulator serving in a thread; a context manager that stops it."""

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.url = f"http://{server.state.config.host}:{server.server_address[1]}"

    def messages(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The calls accepted (repeats of a messageId dropped), of one ``type`` if given."""
        with self._server.state.lock:
            messages = list(self._server.state.messages)
        return [m for m in messages if kind is None or m.get("type") == kind]

    def stats(self) -> dict[str, Any]:
        """Messages, types, duplicates, requests by route and status, largest request."""
        return self._server.state.stats()

    def reset(self) -> None:
        """Forget every message, id and count; restart the fault schedule."""
        with self._server.state.lock:
            self._server.state.reset()

    def stop(self) -> None:
        """Stop serving; safe to call twice."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> RunningSegment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def start_in_thread(config: SegmentConfig) -> RunningSegment:
    """Start an emulator in a daemon thread; it listens when this returns."""
    server = _Server(_State(config))
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name=f"segment-emulator:{server.server_address[1]}",
        daemon=True,
    )
    thread.start()
    return RunningSegment(server, thread)
