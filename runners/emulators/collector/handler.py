"""HTTP routes and the request handler: the Collector API and the emulator's own routes.

Every method goes through one router: ingestion ``POST /v1/{kind}[/batch]``, ``GET
/v1/config`` and ``GET /v1/rules`` (all with auth), and the inspection routes under
``/_emulator/`` (without). Answers are JSON with ``Content-Length``, so keep-alive
connections stay usable, and bodies of rejected requests are drained when they are small.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import logging
import socket
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any, Final

import msgspec
import orjson

from moesif_beam.runners.emulators.collector.body import _decode_body, _HttpError, _parse_json
from moesif_beam.runners.emulators.collector.config import (
    ACTIONS_BATCH_LIMIT_BYTES,
    BODY_LIMIT_BYTES,
    ITEM_LIMIT_BYTES,
    KINDS,
)
from moesif_beam.runners.emulators.collector.faults import _fault_answer, _redirect_location
from moesif_beam.runners.emulators.collector.inspection import _records_page
from moesif_beam.runners.emulators.collector.validation import (
    ValidationError,
    _as_items,
    _find_oversized,
    validate_payload,
)

if TYPE_CHECKING:
    from moesif_beam.runners.emulators.collector.config import CollectorConfig
    from moesif_beam.runners.emulators.collector.server import _CollectorServer

# One logger for the whole emulator, named after its package.
_LOG = logging.getLogger(__package__)

_APP_ID_HEADER: Final = "X-Moesif-Application-Id"
_AUTH_ERROR: Final = "missing or invalid X-Moesif-Application-Id"
# A constant tag is enough: the emulator's config never changes, so SDKs never refetch it.
_CONFIG_ETAG: Final = "emulator-config-1"
_RULES_TAG: Final = "emulator-rules-1"
_CONFIG_BODY: Final[dict[str, Any]] = {
    "org_id": "emulator",
    "app_id": "emulator",
    "sample_rate": 100,
    "user_sample_rate": {},
    "company_sample_rate": {},
    "regex_config": [],
    "ip_addresses_blocked_by_name": {},
}
# Bodies of rejected requests up to this size are read and thrown away so the client sees our
# answer and can keep its connection; larger ones get the answer and a closed connection.
_DRAIN_CAP_BYTES: Final = 256 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class _IngestRoute:
    kind: str
    batch: bool
    limit: int


_INGEST_ROUTES: Final[dict[str, _IngestRoute]] = {
    f"/v1/{kind}{suffix}": _IngestRoute(
        kind,
        bool(suffix),
        ACTIONS_BATCH_LIMIT_BYTES if (kind, suffix) == ("actions", "/batch") else BODY_LIMIT_BYTES,
    )
    for kind in KINDS
    for suffix in ("", "/batch")
}
_GET_ROUTES: Final = frozenset(
    {"/v1/config", "/v1/rules", "/_emulator/stats", "/_emulator/records"}
)
_EMULATOR_POST_ROUTES: Final = frozenset({"/_emulator/reset", "/_emulator/schema"})


def _count_only(config: CollectorConfig) -> bool:
    """The fast count-only mode of the benchmarks: no bodies kept, no fields or types checked."""
    return config.store == "count" and config.validation == "off" and config.metadata_types == "off"


class _FastRequest(msgspec.Struct):
    time: Any = None


class _FastItem(msgspec.Struct):
    """What the count-only mode reads of an item: its id and its request's time."""

    transaction_id: Any = None
    request: _FastRequest | None = None


class _FastId(msgspec.Struct):
    """What the count-only mode reads of an item when it keeps no arrival lags: its id."""

    transaction_id: Any = None


_FAST_ITEMS: Final = msgspec.json.Decoder(list[_FastItem])
_FAST_IDS: Final = msgspec.json.Decoder(list[_FastId])
_FAST_KINDS: Final = frozenset({"events", "actions"})


def _count_only_items(body: bytes, *, times: bool = True) -> list[dict[str, Any]] | None:
    """The count-only mode's items, reading only what it keeps; None to parse in full.

    The emulator shares the benchmark machine's cores with the side it measures, while
    Moesif's collector costs that machine nothing; parsing every field cost about 16 µs
    per event (orjson), this about 2 µs (msgspec skips what it does not read, UTF-8 is
    checked over the whole body first), and without ``times`` (no arrival lags kept) a
    little less again: only the id is read, into a one-key item. Anything it does not
    accept as plainly valid (an item that is not an object, a ``request`` that is not
    one, a byte-order mark, invalid JSON, NaN) returns None, and the body gets the full
    parse and its exact answer. What it does not check is the range of numbers in fields
    it skips, and without ``times`` the type of ``request``.
    """
    try:
        body.decode("utf-8")
        if not times:
            return [{"transaction_id": item.transaction_id} for item in _FAST_IDS.decode(body)]
        items = _FAST_ITEMS.decode(body)
    # ValidationError is a DecodeError; msgspec recurses into deeply nested values, which
    # the full parse answers as invalid JSON.
    except (UnicodeDecodeError, msgspec.DecodeError, RecursionError):
        return None
    return [
        {
            "transaction_id": item.transaction_id,
            "request": None if item.request is None else {"time": item.request.time},
        }
        for item in items
    ]


def _parse_fast(body: bytes) -> Any:
    """Parse a body with orjson (about 3x the standard library's speed), as strictly.

    Only for the count-only mode: orjson reads integers beyond 64 bits as doubles, which
    matters only where values are kept. What orjson refuses (a byte-order mark, an escaped
    lone surrogate, anything invalid) goes to :func:`_parse_json`, which accepts it or
    answers in its own words, as every other mode does. Measured per 1.4 KB event in
    batches of 500: 31 µs with the standard library, 10.5 µs with orjson.
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return _parse_json(body)


class _Handler(BaseHTTPRequestHandler):
    """One connection; serves requests until the client or the emulator closes it."""

    server: _CollectorServer
    protocol_version = "HTTP/1.1"  # keep-alive, so clients can reuse connections
    server_version = "moesif-collector-emulator/1"
    sys_version = ""
    disable_nagle_algorithm = True  # headers and body go out at once, no 40 ms ACK stalls
    timeout = 60  # seconds an idle keep-alive connection is kept

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, add=False)

    def log_message(self, fmt: str, /, *args: Any) -> None:
        """Silences http.server's access log; ``_dispatch`` logs when verbose."""

    def do_GET(self) -> None:
        self._dispatch()

    # Every method goes through one router, so a known path with the wrong method gets 405.
    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = do_GET

    # ---- plumbing ---------------------------------------------------------------------------

    def _dispatch(self) -> None:
        self._body_pending = bool(
            self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length", "0") != "0"
        )
        self._items = 0
        self._answered = False
        # Exact paths: the query is split off, nothing else is normalised.
        self._route_path = path = self.path.split("?", 1)[0]
        with self.server.in_flight():
            try:
                self._route(path)
            except _HttpError as exc:
                self._send(exc.status, exc.body, exc.headers)
            except Exception:
                if self.server.stopping.is_set():
                    # The store may already be closed under a request that outlived stop().
                    _LOG.debug("request ended by stop(): %s %s", self.command, path, exc_info=True)
                else:
                    _LOG.exception("emulator error on %s %s", self.command, path)
                if not self._answered:
                    self._send(500, {"error": "internal emulator error"})
        if not self._answered and self.server.verbose:
            _LOG.info("%s %s -> dropped (%d items)", self.command, path, self._items)

    def _account(self, status: int) -> None:
        """Counts and logs an answer.

        Runs before the answer is written, so a client that has read the answer and then asks
        for stats always finds it counted.
        """
        path = self._route_path
        # Counters cover the Collector API routes only, so inspecting never changes them.
        if path in _INGEST_ROUTES or path in ("/v1/config", "/v1/rules"):
            self.server.collector.count_request(path, status)
        if self.server.verbose:
            _LOG.info("%s %s -> %d (%d items)", self.command, path, status, self._items)

    def _send(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        """Counts, then writes a JSON answer with Content-Length (keep-alive stays usable)."""
        self._answered = True
        self._account(status)
        if self._body_pending:
            self._discard_body()
        payload = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        try:
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
        except OSError:
            # The client gave up (e.g. timed out during injected latency); the request was
            # still handled, so it stays counted.
            self.close_connection = True

    def _content_length(self) -> int:
        if self.headers.get("Transfer-Encoding"):
            # Only Content-Length framing is accepted; _send drains the chunks first, so the
            # client gets to read the 411 instead of a broken pipe.
            msg = "Content-Length is required (chunked bodies are not supported)"
            raise _HttpError(411, msg)
        value = self.headers.get("Content-Length")
        if value is None:
            msg = "Content-Length is required"
            raise _HttpError(411, msg)
        if not value.strip().isdigit():
            self.close_connection = True
            self._body_pending = False
            msg = "Content-Length must be a non-negative integer"
            raise _HttpError(400, msg)
        return int(value)

    def _discard_body(self) -> None:
        """Reads and drops an unread body so the connection stays usable, or closes it."""
        self._body_pending = False
        coding = self.headers.get("Transfer-Encoding", "").strip().lower()
        if coding:
            if coding != "chunked" or not self._drain_chunked():
                self.close_connection = True
            return
        value = self.headers.get("Content-Length", "")
        if not value.strip().isdigit():
            self.close_connection = True
            return
        remaining = int(value)
        if remaining > _DRAIN_CAP_BYTES:
            self.close_connection = True
            return
        try:
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                remaining -= len(chunk)
        except OSError:
            pass  # The client is gone; the answer below will fail quietly too.
        if remaining > 0:
            self.close_connection = True

    def _drain_chunked(self) -> bool:
        """Reads and drops a chunked body; False if it was malformed, too big or cut short."""
        total = 0
        try:
            while True:
                line = self.rfile.readline(1024)
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while True:  # optional trailer fields, then the blank line
                        trailer = self.rfile.readline(8192)
                        if trailer in (b"\r\n", b"\n"):
                            return True
                        if not trailer:
                            return False
                total += size
                if total > _DRAIN_CAP_BYTES:
                    return False
                remaining = size + 2  # the data and its CRLF
                while remaining > 0:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        return False
                    remaining -= len(chunk)
        except (OSError, ValueError):
            return False

    def _authorize(self) -> None:
        given = self.headers.get(_APP_ID_HEADER, "").strip()
        expected = self.server.collector.config.application_id
        ok = bool(given) and (
            expected is None
            or hmac.compare_digest(given.encode("utf-8"), expected.strip().encode("utf-8"))
        )
        if not ok:
            raise _HttpError(401, _AUTH_ERROR)

    def _drop_connection(self) -> None:
        """Closes the socket without writing a byte, like a crashed or reset server."""
        self.close_connection = True
        with contextlib.suppress(OSError):  # the client is already gone
            self.connection.shutdown(socket.SHUT_RDWR)

    # ---- routes -----------------------------------------------------------------------------

    def _route(self, path: str) -> None:
        method = self.command
        location = _redirect_location(self.server.collector.config, path)
        if location is not None:
            raise _HttpError(307, "moved", headers={"Location": location})
        ingest = _INGEST_ROUTES.get(path)
        if ingest is not None or path in _EMULATOR_POST_ROUTES:
            if method != "POST":
                raise _HttpError(405, f"use POST for {path}", headers={"Allow": "POST"})
            if path == "/_emulator/schema":
                self._seed_schema()
            elif ingest is None:
                self.server.collector.reset()
                self._send(200, {"reset": True})
            else:
                self._ingest(path, ingest)
            return
        if path in _GET_ROUTES:
            if method not in ("GET", "HEAD"):
                raise _HttpError(405, f"use GET for {path}", headers={"Allow": "GET"})
            self._get(path)
            return
        raise _HttpError(404, f"no such endpoint: {path[:200]}")

    def _get(self, path: str) -> None:
        collector = self.server.collector
        if path == "/_emulator/stats":
            self._send(200, collector.stats())
        elif path == "/_emulator/records":
            try:
                page = _records_page(collector, self.path)
            except ValueError as exc:
                raise _HttpError(400, str(exc)) from None
            self._send(200, page)
        else:
            self._authorize()
            if path == "/v1/config":
                self._send(200, _CONFIG_BODY, {"X-Moesif-Config-ETag": _CONFIG_ETAG})
            else:
                self._send(200, [], {"X-Moesif-Rules-Tag": _RULES_TAG})

    def _seed_schema(self) -> None:
        length = self._content_length()
        if length > ITEM_LIMIT_BYTES:
            msg = f"a schema body is limited to {ITEM_LIMIT_BYTES:,} bytes, got {length:,}"
            raise _HttpError(413, msg)
        raw = self.rfile.read(length)
        self._body_pending = False
        body = _decode_body(raw, self.headers.get("Content-Encoding"), ITEM_LIMIT_BYTES)
        try:
            schema = self.server.collector.seed_schema(_parse_json(body))
        except ValueError as exc:
            raise _HttpError(400, str(exc)) from None
        self._send(200, schema)

    def _ingest(self, path: str, route: _IngestRoute) -> None:
        collector = self.server.collector
        config = collector.config
        self._authorize()
        length = self._content_length()
        if length > route.limit:
            msg = f"body of {length:,} bytes exceeds the limit of {route.limit:,} bytes for {path}"
            raise _HttpError(413, msg)
        raw = self.rfile.read(length)
        self._body_pending = False
        if len(raw) < length:
            self.close_connection = True  # The client hung up mid-body; nobody to answer.
            return

        # Faults, in the documented order: latency, then dropped connection, then failure.
        delay = collector.next_latency()
        if delay and self.server.stopping.wait(delay):
            self._drop_connection()  # stopping: give up the request rather than block stop()
            return
        fault = collector.next_fault()
        if fault == "drop":
            self._drop_connection()
            return
        if fault == "fail":
            self._send(*_fault_answer(config))
            return

        content_type = self.headers.get("Content-Type", "")
        if content_type.split(";", 1)[0].strip().lower() != "application/json":
            msg = f"Content-Type must be application/json, got {content_type[:80]!r}"
            raise _HttpError(400, msg)
        fast = _count_only(config)
        body = _decode_body(raw, self.headers.get("Content-Encoding"), route.limit, fast=fast)
        payload = None
        # Events and actions only: user and company upserts are keyed by other fields.
        if fast and route.batch and route.kind in _FAST_KINDS and len(body) <= ITEM_LIMIT_BYTES:
            payload = _count_only_items(body, times=config.arrival_lags)
        if payload is None:
            payload = _parse_fast(body) if fast else _parse_json(body)
        try:
            items = _as_items(payload, batch=route.batch)
        except ValidationError as exc:
            raise _HttpError(400, exc.to_json()) from None
        self._items = len(items)
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        collector.count_received(route.kind, len(items), encoding)

        # Measuring costs a serialization per item. An item's compact form is (short of
        # contrived number spellings) no longer than its text in the body, so a body under
        # the per-item limit is taken to hold no item over it, and only big bodies pay.
        if route.kind in ("events", "actions") and len(body) > ITEM_LIMIT_BYTES:
            oversized = _find_oversized(items)
            if oversized is not None:
                index, size = oversized
                error: dict[str, Any] = {
                    "error": f"item {index} is {size:,} bytes; the limit per "
                    f"{route.kind[:-1]} is {ITEM_LIMIT_BYTES:,} bytes",
                }
                if route.batch:
                    error["index"] = index
                raise _HttpError(413, error)
        try:
            if config.validation == "full":
                validate_payload(
                    route.kind,
                    payload,
                    batch=route.batch,
                    reject_older_than_days=config.reject_older_than_days,
                )
        except ValidationError as exc:
            raise _HttpError(400, exc.to_json()) from None

        try:
            collector.ingest(route.kind, items, batch=route.batch)
        except ValidationError as exc:  # a metadata type conflict: nothing was stored
            raise _HttpError(400, exc.to_json()) from None
        self._send(
            201,
            {},
            {"X-Moesif-Config-ETag": _CONFIG_ETAG, "X-Moesif-Rules-Tag": _RULES_TAG},
        )
