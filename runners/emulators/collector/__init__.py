"""A local emulator of Moesif's Collector API, for tests, benchmarks and offline runs.

Moesif itself cannot be reached from our machines, so the pipeline's HTTP sink is exercised
against this emulator instead. It follows the facts collected in
``reference/moesif-collector-api.md`` and, where Moesif documents nothing, the choices in §7 of
that file:

* Routes: ``POST /v1/{events,actions,users,companies,subscriptions}`` and their ``/batch``
  variants, ``GET /v1/config`` and ``GET /v1/rules``. Every ``/v1`` route requires a non-empty
  ``X-Moesif-Application-Id`` (401 otherwise); the id is never echoed, printed or logged.
* Bodies: ``Content-Type: application/json``; ``Content-Encoding`` gzip, deflate (zlib-wrapped
  or raw) or identity. Limits: 50,000,000 bytes per request (15,000,000 for
  ``/v1/actions/batch``), compressed or decompressed, and 1,000,000 bytes per event or action;
  over a limit the answer is 413.
* Validation: the required fields and types of §2 of the reference. A batch is all-or-nothing:
  one invalid item rejects the whole request with 400 and ``{"error", "index", "field"}``, and
  nothing from it is stored.
* Metadata of events and actions, Moesif's rules (§5 of the reference and Moesif's "User
  Actions" page), applied after validation:

  - A dot in a key becomes ``_`` at every depth, objects inside arrays included; values are
    untouched. If two keys collide after the change, the later one wins. The converted keys
    are what is type-checked and stored.
  - The first JSON type seen for a key *name* wins, at any depth (``{"a": {"id": 1}}`` and
    ``{"id": "x"}`` name the same key), in one schema shared by events and actions. Types
    are string, number (ints and floats alike), boolean (never a number), object and array;
    null matches any type and establishes none. Only ``metadata`` is checked: not bodies,
    and not the metadata of users, companies or subscriptions.
  - Moesif's docs call such metadata invalid without saying how the API answers; the emulator
    refuses it, so that conflicts surface in tests. Items are checked in order, depth first
    in key order, and each value's type is known to the values after it, in the same item
    or in later items of the same request. The first conflict refuses the whole request with
    400 and ``{"error", "index", "field", "key", "expected_type", "actual_type"}`` (``field``
    is the converted dotted path, e.g. ``metadata.tags.0.id``); it stores nothing and
    teaches no type. A request's new keys enter the schema only when it is accepted, in the
    same transaction as its records, and deciding them is atomic across concurrent requests.
  - The schema persists in ``collector.db`` (table ``metadata_schema``) and is cleared by a
    reset. ``metadata_types="off"`` checks and learns no types but still converts dots.
* Storage: SQLite (``collector.db`` under ``data_dir``, or in memory). Events and actions are
  deduplicated by ``transaction_id`` across batches; users, companies and subscriptions are
  upserts with a recursive merge.
* Faults for retry tests, on ingestion POSTs only: latency, dropped connections and error
  statuses (with ``Retry-After`` for 429/503), deterministic (``latency_first``,
  ``drop_first``, ``fail_first``) or random with a seed. A faulted request stores nothing.
  ``redirect_to`` answers every ``/v1`` request (``GET /v1/config`` too) with a 307 to
  another base URL, for the client's never-follow-a-redirect rule.
* HTTPS with ``tls_cert`` and ``tls_key`` (for the client's certificate checks).
* ``store="count"`` validates, deduplicates and enforces metadata types like SQLite but keeps
  no bodies (its schema lives in memory): for benchmarks. With ``validation="off"`` and
  ``metadata_types="off"`` as well it is the fast count-only mode: a body must still
  authorize, inflate and parse as JSON of the right shape (a list of objects for batches),
  and items are still counted and deduplicated, but fields are not checked.
* Inspection without auth: ``GET /_emulator/stats`` (with ``metadata_schema``,
  ``type_conflicts`` and ``arrival_lag_ms``: how long after its ``request.time`` each
  accepted event or action arrived, which is the produce-to-2xx latency when a producer
  stamps records as it sends them), ``GET /_emulator/records``, ``POST /_emulator/reset``, and
  ``POST /_emulator/schema`` with ``{"key": "type", ...}`` to seed the schema (keys it does
  not know yet are added; it answers with the resulting schema).

Typical use in a test::

    with start_in_thread(CollectorConfig(application_id="app")) as collector:
        post_batches(collector.url)
        assert collector.stats()["records"]["events"] == 10

From the command line:
``python -m moesif_beam.runners.emulators.collector --port 9500 --data_dir ./collector-data``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hmac
import json
import logging
import random
import re
import signal
import socket
import socketserver
import sqlite3
import ssl
import sys
import threading
import urllib.parse
import urllib.request
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Final, Literal, Protocol

__all__ = [
    "ACTIONS_BATCH_LIMIT_BYTES",
    "BODY_LIMIT_BYTES",
    "ITEM_LIMIT_BYTES",
    "KINDS",
    "METADATA_TYPES",
    "CollectorConfig",
    "MetadataTypeConflict",
    "RunningCollector",
    "ValidationError",
    "main",
    "parse_iso8601",
    "start_in_thread",
    "validate_payload",
    "validate_record",
]

_LOG = logging.getLogger(__name__)

#: Record kinds, in the order they are reported.
KINDS: Final = ("events", "actions", "users", "companies", "subscriptions")
#: Largest request body, compressed or decompressed, on every route but ``/v1/actions/batch``.
BODY_LIMIT_BYTES: Final = 50_000_000
#: Largest ``/v1/actions/batch`` body, compressed or decompressed (15 MB since Nov 2024).
ACTIONS_BATCH_LIMIT_BYTES: Final = 15_000_000
#: Largest single event or action, measured as compact UTF-8 JSON.
ITEM_LIMIT_BYTES: Final = 1_000_000

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
_DEFAULT_RECORDS_LIMIT: Final = 100
_DIRECTIONS: Final = frozenset({"Incoming", "Outgoing", "Internal"})
# CollectorConfig.metadata_types: refuse type changes, or only convert dots in keys.
_METADATA_MODES: Final = ("enforce", "off")
# CollectorConfig.validation: check every item's fields, or only the body's shape.
_VALIDATION_MODES: Final = ("full", "off")
_PROFILE_KEYS: Final = {
    "users": "user_id",
    "companies": "company_id",
    "subscriptions": "subscription_id",
}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CollectorConfig:
    """Settings of one emulator instance; validated on construction.

    Attributes:
        host: Interface to listen on.
        port: TCP port; 0 picks a free one (read it back from ``RunningCollector.url``).
        data_dir: Directory for ``collector.db`` (created with its parents); None keeps the
            data in memory.
        application_id: When set, the only ``X-Moesif-Application-Id`` accepted; when None, any
            non-empty id is. Never shown in ``repr``.
        fail_rate: Probability that an ingestion POST fails with ``fail_status``.
        fail_status: Status of injected failures (400-599).
        fail_first: The first N ingestion POSTs that are not dropped fail, deterministically.
        retry_after: Seconds sent in ``Retry-After`` on injected 429 and 503 answers.
        latency_ms: Delay added before an ingestion POST is handled. The request is still
            handled (and stored) after the delay, even if the client has given up by then:
            that is how a client timeout turns into a redelivery for dedup to absorb.
        latency_first: When > 0, only the first N ingestion POSTs are delayed; 0 delays all.
        drop_connection_rate: Probability that an ingestion POST's connection is closed with
            no answer at all.
        drop_first: The first N ingestion POSTs have their connection dropped.
        seed: Seed of the random generator behind the fault rates (None: unpredictable).
        store: ``"sqlite"`` keeps every record; ``"count"`` validates, deduplicates in memory
            and counts, keeping no bodies (the fast mode for benchmarks).
        reject_older_than_days: When set, events and actions whose ``request.time`` is older
            are rejected with 400, as Moesif does past 30 days without backfill.
        metadata_types: ``"enforce"`` refuses event and action metadata that sends a key with
            another JSON type than the first one seen (see the module docstring); ``"off"``
            checks no types and learns none, but still converts dots in keys.
        validation: ``"full"`` checks every item's fields (the 400s above); ``"off"`` only
            requires the body to parse into items of the right shape (the fast count-only
            mode for benchmarks, so the collector costs the clients it compares little).
        redirect_to: When set, every ``/v1`` request (the config read and ingestion alike)
            is answered ``307`` with ``Location: <redirect_to><path>``, before any auth,
            as a hostile or misconfigured proxy would: a client must not follow it.
        tls_cert: PEM certificate chain to serve HTTPS with (``tls_key`` required too);
            ``RunningCollector.url`` then starts with ``https://``.
        tls_key: PEM private key of ``tls_cert``.
    """

    host: str = "127.0.0.1"
    port: int = 0
    data_dir: str | None = None
    application_id: str | None = dataclasses.field(default=None, repr=False)
    fail_rate: float = 0.0
    fail_status: int = 503
    fail_first: int = 0
    retry_after: float | None = None
    latency_ms: int = 0
    latency_first: int = 0
    drop_connection_rate: float = 0.0
    drop_first: int = 0
    seed: int | None = None
    store: str = "sqlite"
    reject_older_than_days: int | None = None
    metadata_types: str = "enforce"
    validation: str = "full"
    redirect_to: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if not self.host:
            msg = "host must be a non-empty host name or address"
            raise ValueError(msg)
        if not 0 <= self.port <= 65535:
            msg = f"port must be in 0..65535 (0 picks a free port), got {self.port}"
            raise ValueError(msg)
        if self.application_id is not None and not self.application_id.strip():
            # The value itself is a secret, so the message never contains it.
            msg = "application_id must be non-empty when set (None accepts any id)"
            raise ValueError(msg)
        for name in ("fail_rate", "drop_connection_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                msg = f"{name} must be in [0, 1], got {rate}"
                raise ValueError(msg)
        if not 400 <= self.fail_status <= 599:
            msg = f"fail_status must be an HTTP error status in 400..599, got {self.fail_status}"
            raise ValueError(msg)
        for name in ("fail_first", "drop_first", "latency_ms", "latency_first"):
            value = getattr(self, name)
            if value < 0:
                msg = f"{name} must be >= 0, got {value}"
                raise ValueError(msg)
        if self.retry_after is not None and self.retry_after < 0:
            msg = f"retry_after must be >= 0 seconds, got {self.retry_after}"
            raise ValueError(msg)
        if self.store not in ("sqlite", "count"):
            msg = f"store must be 'sqlite' or 'count', got {self.store!r}"
            raise ValueError(msg)
        if self.reject_older_than_days is not None and self.reject_older_than_days < 1:
            msg = f"reject_older_than_days must be >= 1, got {self.reject_older_than_days}"
            raise ValueError(msg)
        if self.metadata_types not in _METADATA_MODES:
            msg = f"metadata_types must be 'enforce' or 'off', got {self.metadata_types!r}"
            raise ValueError(msg)
        if self.validation not in _VALIDATION_MODES:
            msg = f"validation must be 'full' or 'off', got {self.validation!r}"
            raise ValueError(msg)
        if self.redirect_to is not None and not self.redirect_to.startswith(
            ("http://", "https://")
        ):
            msg = f"redirect_to must be an http(s) URL, got {self.redirect_to!r}"
            raise ValueError(msg)
        if (self.tls_cert is None) != (self.tls_key is None):
            msg = "tls_cert and tls_key go together"
            raise ValueError(msg)


# --------------------------------------------------------------------------------------------
# Validation (pure functions)
# --------------------------------------------------------------------------------------------


class ValidationError(ValueError):
    """A request body or record that Moesif would reject with 400.

    Attributes:
        message: What is wrong, in words.
        field: Dotted path of the offending field (``"request.verb"``), or None.
        index: Position of the offending item in a batch, or None.
    """

    def __init__(self, message: str, field: str | None = None, index: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.index = index

    def to_json(self) -> dict[str, Any]:
        """Returns the 400 body: ``error``, plus ``index`` and ``field`` when known."""
        body: dict[str, Any] = {"error": self.message}
        if self.index is not None:
            body["index"] = self.index
        if self.field is not None:
            body["field"] = self.field
        return body


_ISO_RE: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?"
    r"(?:([Zz])|([+-])(\d{2})(?::?(\d{2}))?)?"
)


def parse_iso8601(value: str) -> datetime:
    """Parses an ISO 8601 date-time the way the emulator accepts it.

    Accepted: ``YYYY-MM-DDTHH:MM[:SS[.f]]`` with 0 to 9 fractional digits, then an optional zone
    (``Z``, ``+HH``, ``+HHMM`` or ``+HH:MM``). The SDKs send all of these shapes (reference §2.1).

    Args:
        value: The text to parse.

    Returns:
        A timezone-aware datetime; a time without a zone is read as UTC. Digits beyond
        microseconds are truncated.

    Raises:
        ValueError: If the text is not such a date-time or names an impossible date or time.
    """
    match = _ISO_RE.fullmatch(value)
    if match is None:
        msg = f"not an ISO 8601 date-time: {value[:64]!r}"
        raise ValueError(msg)
    # The regex fixed the accepted shapes; the C parser is ~10x faster than building the
    # datetime by hand and handles all of them except a lowercase "t" or "z".
    with contextlib.suppress(ValueError):
        parsed = datetime.fromisoformat(value)
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    tz = UTC
    if sign is not None:
        offset = timedelta(hours=int(off_h), minutes=int(off_m or 0))
        if offset >= timedelta(hours=24) or int(off_m or 0) >= 60:
            msg = f"not a valid date-time: {value[:64]!r} (impossible UTC offset)"
            raise ValueError(msg)
        tz = timezone(-offset if sign == "-" else offset)
    del zulu  # "Z" and no zone both mean UTC.
    micros = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        return datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second or 0), micros, tz
        )
    except ValueError as exc:
        msg = f"not a valid date-time: {value[:64]!r} ({exc})"
        raise ValueError(msg) from None


def _type_ok(value: Any, expected: str) -> bool:
    if expected == "a string":
        return isinstance(value, str)
    if expected == "an object":
        return isinstance(value, dict)
    if expected == "an array":
        return isinstance(value, list)
    # JSON has one number type; bool is excluded because Python's bool is an int.
    return isinstance(value, int) and not isinstance(value, bool)


def _required(container: Mapping[str, Any], key: str, path: str, expected: str) -> Any:
    value = container.get(key)
    if value is None:
        msg = f"{path} is required"
        raise ValidationError(msg, path)
    if not _type_ok(value, expected):
        msg = f"{path} must be {expected}"
        raise ValidationError(msg, path)
    return value


def _required_id(container: Mapping[str, Any], key: str) -> None:
    if not _required(container, key, key, "a string"):
        msg = f"{key} must be a non-empty string"
        raise ValidationError(msg, key)


def _optional(container: Mapping[str, Any], key: str, path: str, expected: str) -> None:
    value = container.get(key)
    if value is not None and not _type_ok(value, expected):
        msg = f"{path} must be {expected} or null"
        raise ValidationError(msg, path)


def _time(
    container: Mapping[str, Any],
    key: str,
    path: str,
    *,
    required: bool,
    cutoff: datetime | None = None,
) -> None:
    value = container.get(key)
    if value is None:
        if required:
            msg = f"{path} is required"
            raise ValidationError(msg, path)
        return
    if not isinstance(value, str):
        msg = f"{path} must be an ISO 8601 date-time string"
        raise ValidationError(msg, path)
    try:
        parsed = parse_iso8601(value)
    except ValueError as exc:
        msg = f"{path} is {exc}"
        raise ValidationError(msg, path) from None
    if cutoff is not None and parsed < cutoff:
        msg = f"{path} is older than the accepted window (before {cutoff.isoformat()})"
        raise ValidationError(msg, path)


def _object(container: Mapping[str, Any], key: str, path: str, *, required: bool) -> Any:
    value = container.get(key)
    if value is None:
        if required:
            msg = f"{path} is required"
            raise ValidationError(msg, path)
        return None
    if not isinstance(value, dict):
        msg = f"{path} must be an object"
        raise ValidationError(msg, path)
    return value


def _check_event_options(item: Mapping[str, Any]) -> None:
    """Type rules shared by events and actions for their optional top-level fields."""
    _optional(item, "transaction_id", "transaction_id", "a string")
    for key in ("user_id", "company_id", "subscription_id", "session_token", "action_name"):
        _optional(item, key, key, "a string")
    _optional(item, "metadata", "metadata", "an object")
    _optional(item, "weight", "weight", "an integer")
    direction = item.get("direction")
    if direction is not None and not (isinstance(direction, str) and direction in _DIRECTIONS):
        msg = "direction must be one of Incoming, Outgoing, Internal, or null"
        raise ValidationError(msg, "direction")


# Fast paths. Events and actions arrive by the hundred thousand, and the detailed checks below
# cost a function call per field. These predicates answer "is it valid?" with inline exact-type
# tests (json.loads only ever builds dict, list, str, int, float, bool and None). They never
# accept what the detailed checks reject; when they say no, the detailed checks run to name the
# problem (and accept, e.g., dict subclasses handed in by direct callers).
_EVENT_STRING_OPTIONS: Final = (
    "transaction_id",
    "user_id",
    "company_id",
    "subscription_id",
    "session_token",
    "action_name",
)


def _time_ok(value: Any, cutoff: datetime | None) -> bool:
    if value.__class__ is not str or _ISO_RE.fullmatch(value) is None:
        return False
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return False
    if cutoff is None:
        return True
    return (parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)) >= cutoff


def _event_options_ok(item: dict[str, Any]) -> bool:
    for key in _EVENT_STRING_OPTIONS:
        value = item.get(key)
        if value is not None and value.__class__ is not str:
            return False
    metadata = item.get("metadata")
    if metadata is not None and metadata.__class__ is not dict:
        return False
    weight = item.get("weight")
    if weight is not None and weight.__class__ is not int:  # bool's class is bool, not int
        return False
    direction = item.get("direction")
    return direction is None or (direction.__class__ is str and direction in _DIRECTIONS)


def _event_ok(item: dict[str, Any], cutoff: datetime | None) -> bool:
    request = item.get("request")
    if (
        request.__class__ is not dict
        or not _time_ok(request.get("time"), cutoff)
        or request.get("uri").__class__ is not str
        or request.get("verb").__class__ is not str
        or request.get("headers").__class__ is not dict
    ):
        return False
    response = item.get("response")
    if response is not None and (
        response.__class__ is not dict
        or not _time_ok(response.get("time"), None)
        or response.get("status").__class__ is not int
        or response.get("headers").__class__ is not dict
    ):
        return False
    return _event_options_ok(item)


def _action_ok(item: dict[str, Any], cutoff: datetime | None) -> bool:
    name = item.get("action_name")
    request = item.get("request")
    if name.__class__ is not str or not name or request.__class__ is not dict:
        return False
    time_value = request.get("time")
    if time_value is not None and not _time_ok(time_value, cutoff):
        return False
    uri = request.get("uri")
    if uri is not None and uri.__class__ is not str:
        return False
    return _event_options_ok(item)


# Detailed checks: each raises ValidationError naming the first offending field.


def _validate_event(item: Mapping[str, Any], cutoff: datetime | None) -> None:
    request = _object(item, "request", "request", required=True)
    _time(request, "time", "request.time", required=True, cutoff=cutoff)
    _required(request, "uri", "request.uri", "a string")
    _required(request, "verb", "request.verb", "a string")
    _required(request, "headers", "request.headers", "an object")
    # A response may be absent, e.g. when the call timed out; when sent, it must be complete.
    response = _object(item, "response", "response", required=False)
    if response is not None:
        _time(response, "time", "response.time", required=True)
        _required(response, "status", "response.status", "an integer")
        _required(response, "headers", "response.headers", "an object")
    _check_event_options(item)


def _validate_action(item: Mapping[str, Any], cutoff: datetime | None) -> None:
    _required_id(item, "action_name")
    request = _object(item, "request", "request", required=True)
    # Moesif's own action guides send requests without a uri, so uri is optional (ref. §2.2).
    _time(request, "time", "request.time", required=False, cutoff=cutoff)
    _optional(request, "uri", "request.uri", "a string")
    _check_event_options(item)


def _validate_user(item: Mapping[str, Any]) -> None:
    _required_id(item, "user_id")
    for key in ("company_id", "session_token", "ip_address", "user_agent_string"):
        _optional(item, key, key, "a string")
    _time(item, "modified_time", "modified_time", required=False)
    _optional(item, "campaign", "campaign", "an object")
    _optional(item, "metadata", "metadata", "an object")


def _validate_company(item: Mapping[str, Any]) -> None:
    _required_id(item, "company_id")
    for key in ("company_domain", "session_token", "ip_address"):
        _optional(item, key, key, "a string")
    _time(item, "modified_time", "modified_time", required=False)
    _optional(item, "campaign", "campaign", "an object")
    _optional(item, "metadata", "metadata", "an object")


def _validate_subscription(item: Mapping[str, Any]) -> None:
    _required_id(item, "subscription_id")
    _required_id(item, "company_id")
    _required_id(item, "status")
    _time(item, "current_period_start", "current_period_start", required=False)
    _time(item, "current_period_end", "current_period_end", required=False)
    _optional(item, "metadata", "metadata", "an object")
    _optional(item, "items", "items", "an array")
    for position, sub_item in enumerate(item.get("items") or ()):
        path = f"items.{position}"
        if not isinstance(sub_item, dict):
            msg = f"{path} must be an object"
            raise ValidationError(msg, path)
        _required(sub_item, "plan_id", f"{path}.plan_id", "a string")


def _cutoff(now: datetime | None, reject_older_than_days: int | None) -> datetime | None:
    if reject_older_than_days is None:
        return None
    return (now or datetime.now(UTC)) - timedelta(days=reject_older_than_days)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        msg = f"kind must be one of {', '.join(KINDS)}, got {kind!r}"
        raise ValueError(msg)


def validate_record(
    kind: str,
    item: Any,
    *,
    now: datetime | None = None,
    reject_older_than_days: int | None = None,
) -> None:
    """Checks one record against the Collector API's required fields and types.

    Unknown extra fields and explicit nulls for optional fields are accepted, as Moesif's SDKs
    send both (reference §2).

    Args:
        kind: One of ``KINDS``.
        item: The decoded JSON value of one record.
        now: The current time, for the age check (default: the real clock).
        reject_older_than_days: When set, an event or action whose ``request.time`` is older
            than this many days before ``now`` is invalid.

    Raises:
        ValidationError: If the record is invalid; ``field`` names the offending field and
            ``index`` is None.
        ValueError: If ``kind`` is unknown.
    """
    _check_kind(kind)
    _validate(kind, item, _cutoff(now, reject_older_than_days))


def _validate(kind: str, item: Any, cutoff: datetime | None) -> None:
    if item.__class__ is dict:
        if kind == "events" and _event_ok(item, cutoff):
            return
        if kind == "actions" and _action_ok(item, cutoff):
            return
    elif not isinstance(item, dict):
        msg = "each record must be a JSON object"
        raise ValidationError(msg)
    if kind == "events":
        _validate_event(item, cutoff)
    elif kind == "actions":
        _validate_action(item, cutoff)
    elif kind == "users":
        _validate_user(item)
    elif kind == "companies":
        _validate_company(item)
    else:
        _validate_subscription(item)


def _as_items(payload: Any, *, batch: bool) -> list[Any]:
    if batch:
        if not isinstance(payload, list):
            msg = "a batch body must be a JSON array"
            raise ValidationError(msg)
        for index, item in enumerate(payload):
            if not isinstance(item, dict):
                msg = f"item {index} must be a JSON object"
                raise ValidationError(msg, index=index)
        return payload
    if not isinstance(payload, dict):
        msg = "the body must be a JSON object (use the /batch route for arrays)"
        raise ValidationError(msg)
    return [payload]


def validate_payload(
    kind: str,
    payload: Any,
    *,
    batch: bool,
    now: datetime | None = None,
    reject_older_than_days: int | None = None,
) -> list[dict[str, Any]]:
    """Checks a whole decoded request body, all-or-nothing.

    Args:
        kind: One of ``KINDS``.
        payload: The decoded JSON body.
        batch: True for a ``/batch`` route (a JSON array, possibly empty), False for a single
            route (one JSON object).
        now: The current time, for the age check.
        reject_older_than_days: See ``validate_record``.

    Returns:
        The records, in order (a single object becomes a one-element list).

    Raises:
        ValidationError: At the first invalid record; for a batch, ``index`` is its position.
        ValueError: If ``kind`` is unknown.
    """
    _check_kind(kind)
    items = _as_items(payload, batch=batch)
    # One clock reading per request, so every item is judged against the same cutoff.
    cutoff = _cutoff(now, reject_older_than_days)
    for index, item in enumerate(items):
        try:
            _validate(kind, item, cutoff)
        except ValidationError as exc:
            if batch:
                exc.index = index
            raise
    return items


# Built once: json.dumps with non-default arguments would build a new encoder per call.
_compact: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _find_oversized(items: list[Any]) -> tuple[int, int] | None:
    for index, item in enumerate(items):
        size = len(_compact(item).encode("utf-8"))
        if size > ITEM_LIMIT_BYTES:
            return index, size
    return None


def _merge(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merges ``new`` into ``old``: new values win, nested objects merge.

    A null in ``new`` keeps the old value, because the SDKs send null for "not set"
    (reference §2), not for "erase".
    """
    merged = dict(old)
    for key, value in new.items():
        if value is None and key in merged:
            continue
        previous = merged.get(key)
        if isinstance(value, dict) and isinstance(previous, dict):
            merged[key] = _merge(previous, value)
        else:
            merged[key] = value
    return merged


# --------------------------------------------------------------------------------------------
# Metadata rules (reference §5): dots in keys become "_"; the first JSON type of a key wins
# --------------------------------------------------------------------------------------------

#: The JSON types the metadata schema records. Null has none: it matches every type.
METADATA_TYPES: Final = ("string", "number", "boolean", "object", "array")
_STRING, _NUMBER, _BOOLEAN, _OBJECT, _ARRAY = METADATA_TYPES
# Keyed by exact class, as json.loads builds values: one dict lookup per value, and bool has
# its own entry, so True is never taken for a number although Python's bool is an int.
_JSON_TYPES: Final[dict[type, str]] = {
    str: _STRING,
    int: _NUMBER,
    float: _NUMBER,
    bool: _BOOLEAN,
    dict: _OBJECT,
    list: _ARRAY,
}


class MetadataTypeConflict(ValidationError):
    """Metadata that sends a key with another JSON type than the schema holds for it.

    Attributes:
        key: The key name (after dot conversion), wherever it was found.
        expected_type: The type the schema (or an earlier item or value of the same request)
            established for the key.
        actual_type: The type this value has.
    """

    def __init__(
        self,
        key: str,
        expected_type: str,
        actual_type: str,
        field: str | None = None,
        index: int | None = None,
    ) -> None:
        message = f"metadata type conflict: key {key!r} is {expected_type}, got {actual_type}"
        super().__init__(message, field, index)
        self.key = key
        self.expected_type = expected_type
        self.actual_type = actual_type

    def to_json(self) -> dict[str, Any]:
        """Returns the 400 body: the base fields, ``key``, ``expected_type``, ``actual_type``."""
        body = super().to_json()
        body["key"] = self.key
        body["expected_type"] = self.expected_type
        body["actual_type"] = self.actual_type
        return body


class _Conflict(Exception):
    """Raised deep in a metadata walk; each level it passes adds its key to ``path``."""

    def __init__(self, key: str, expected: str, actual: str) -> None:
        super().__init__(key)
        self.key = key
        self.expected = expected
        self.actual = actual
        # Innermost first: the walk appends while the exception travels outwards, so the hot
        # path never builds a path string for values that are fine.
        self.path: list[str] = [key]


def _json_type(value: Any) -> str:
    """The JSON type of a value json.loads did not build (subclasses from direct callers)."""
    if isinstance(value, bool):
        return _BOOLEAN
    if isinstance(value, int | float):
        return _NUMBER
    if isinstance(value, dict):
        return _OBJECT
    if isinstance(value, list):
        return _ARRAY
    return _STRING  # a str subclass: nothing else comes out of a JSON parser


# A verdict per object *shape*: its keys, in order, and the classes of its values. A shape
# is cached once every non-null value in it was found in the committed schema with its
# type and no key had a dot; building and hashing the shape runs in C, so a record of a
# known shape costs a fraction of a key-by-key walk. Verdicts stay true because schema
# entries never change; reset() starts a new cache along with the new schema.
_Shapes = dict[tuple[Any, ...], tuple[str, ...]]
# Bounds the cache's memory when keys vary endlessly; a full cache starts over.
_SHAPE_CACHE_LIMIT: Final = 4096


def _walk_object(
    obj: dict[str, Any], schema: Mapping[str, str], learned: dict[str, str], shapes: _Shapes
) -> dict[str, Any]:
    """Converts dots in the keys of ``obj`` and checks value types, depth first in key order.

    Args:
        obj: A metadata object or an object nested in one. Nested objects and arrays are
            rewritten in place when their keys change.
        schema: The committed schema, only read.
        learned: Types first seen in this request, in the order they were seen; new keys
            are added to it.
        shapes: Shapes known to pass against ``schema``; read and extended.

    Returns:
        ``obj`` itself, or a new dict when one of its own keys had a dot.

    Raises:
        _Conflict: At the first value whose type differs from its key's known type.
    """
    shape = (*obj, *map(type, obj.values()))
    nested = shapes.get(shape)
    if nested is not None:
        for key in nested:  # only the objects and arrays inside still need a look
            _walk_child(obj, key, schema, learned, shapes)
        return obj
    # One C-speed scan answers "any dot in any key?" (a dot in the joined keys came from one).
    cacheable = "." not in "".join(obj)
    if not cacheable:
        # Converted before any check, so on a collision only the surviving value (the later
        # one, as when a JSON parser meets a repeated key) is type-checked and stored.
        obj = {key.replace(".", "_"): value for key, value in obj.items()}
    known = schema.get
    children: list[str] = []
    for key, value in obj.items():
        kind = _JSON_TYPES.get(value.__class__)
        if kind is None:
            if value is None:
                continue  # null matches every type, and establishes none
            kind = _json_type(value)
        if known(key) != kind:
            cacheable = False
            expected = known(key) or learned.setdefault(key, kind)
            if expected != kind:
                raise _Conflict(key, expected, kind)
        if kind is _OBJECT or kind is _ARRAY:
            children.append(key)
            _walk_child(obj, key, schema, learned, shapes)
    if cacheable:
        if len(shapes) >= _SHAPE_CACHE_LIMIT:
            shapes.clear()
        shapes[shape] = tuple(children)
    return obj


def _walk_child(
    obj: dict[str, Any],
    key: str,
    schema: Mapping[str, str],
    learned: dict[str, str],
    shapes: _Shapes,
) -> None:
    """Walks the object or array at ``obj[key]``, adding ``key`` to the path of a conflict."""
    value = obj[key]
    try:
        if isinstance(value, dict):
            converted = _walk_object(value, schema, learned, shapes)
            if converted is not value:
                obj[key] = converted  # replaces a value, never adds a key: safe mid-iteration
        else:
            _walk_array(value, schema, learned, shapes)
    except _Conflict as exc:
        exc.path.append(key)
        raise


def _walk_array(
    values: list[Any], schema: Mapping[str, str], learned: dict[str, str], shapes: _Shapes
) -> None:
    """Walks the objects (and arrays) inside an array; scalars in arrays have no key."""
    for position, value in enumerate(values):
        try:
            if isinstance(value, dict):
                converted = _walk_object(value, schema, learned, shapes)
                if converted is not value:
                    values[position] = converted
            elif isinstance(value, list):
                _walk_array(value, schema, learned, shapes)
        except _Conflict as exc:
            exc.path.append(str(position))
            raise


_SCALAR_CLASSES: Final = frozenset({str, int, float, bool, type(None)})


def _convert_keys(value: Any) -> Any:
    """Converts dots in object keys at every depth, in place where it can (no type checks).

    Returns:
        ``value``, or a new dict when it is an object with a dotted key of its own.
    """
    if isinstance(value, dict):
        if "." in "".join(value):
            value = {key.replace(".", "_"): item for key, item in value.items()}
        # Most objects hold scalars only; a set of their classes, built in C, tells.
        if not _SCALAR_CLASSES.issuperset(map(type, value.values())):
            for key, item in value.items():
                if isinstance(item, dict | list):
                    converted = _convert_keys(item)
                    if converted is not item:
                        value[key] = converted
    elif isinstance(value, list):
        for position, item in enumerate(value):
            if isinstance(item, dict | list):
                value[position] = _convert_keys(item)
    return value


def _apply_metadata_rules(
    items: list[dict[str, Any]],
    schema: Mapping[str, str],
    learned: dict[str, str] | None,
    shapes: _Shapes | None,
    *,
    batch: bool,
) -> None:
    """Applies Moesif's metadata rules to the ``metadata`` of validated events or actions.

    Dots in keys are converted in place (``records()`` shows the converted keys), and, unless
    ``learned`` is None, every non-null value is checked against the first type known for its
    key name: from ``schema``, else from earlier in this request (earlier items, or earlier
    values of the same item), in which case it lands in ``learned``.

    Args:
        items: Validated records; ``metadata`` is an object or absent.
        schema: The committed schema, only read.
        learned: Collects the types this request would add to the schema; None only
            converts keys.
        shapes: The shape cache that goes with ``schema`` (None with ``learned`` None).
        batch: Whether the request was a batch, so the error carries the item's index.

    Raises:
        MetadataTypeConflict: At the first conflicting value, in item order, then depth first
            in key order; ``field`` is its dotted path (``metadata.tags.0.id``).
    """
    for index, item in enumerate(items):
        metadata = item.get("metadata")
        if not metadata:
            continue
        if learned is None or shapes is None:
            item["metadata"] = _convert_keys(metadata)
            continue
        try:
            converted = _walk_object(metadata, schema, learned, shapes)
        except _Conflict as exc:
            field = ".".join(["metadata", *reversed(exc.path)])
            raise MetadataTypeConflict(
                exc.key, exc.expected, exc.actual, field, index if batch else None
            ) from None
        if converted is not metadata:
            item["metadata"] = converted


def _clean_schema(types: Any) -> dict[str, str]:
    """Checks a schema to seed (``{"key": "type"}``); keys get the dot conversion.

    Raises:
        ValueError: If it is not an object of known type names; nothing is then seeded.
    """
    if not isinstance(types, Mapping):
        msg = 'a schema must be a JSON object of {"key": "type"}'
        raise ValueError(msg)
    cleaned: dict[str, str] = {}
    for key, kind in types.items():
        if not isinstance(key, str) or kind not in METADATA_TYPES:
            allowed = ", ".join(METADATA_TYPES)
            msg = (
                f"schema entry {str(key)[:100]!r} must map to one of {allowed}, "
                f"got {repr(kind)[:100]}"
            )
            raise ValueError(msg)
        cleaned[key.replace(".", "_")] = kind
    return cleaned


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


class _Store(Protocol):
    def insert_unique(
        self, kind: str, items: list[dict[str, Any]], new_types: Mapping[str, str] | None = None
    ) -> int: ...
    def load_schema(self) -> dict[str, str]: ...
    def add_types(self, new_types: Mapping[str, str]) -> None: ...
    def upsert(self, kind: str, items: list[dict[str, Any]]) -> None: ...
    def counts(self) -> dict[str, int]: ...
    def records(self, kind: str, limit: int | None, offset: int) -> list[Any]: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


# First wins here too: a key already in the table keeps its type.
_SCHEMA_INSERT: Final = "INSERT OR IGNORE INTO metadata_schema (key, type) VALUES (?, ?)"


def _transaction_id(item: Mapping[str, Any]) -> str | None:
    # An empty id cannot identify anything, so such items are stored like items without one.
    return item.get("transaction_id") or None


class _SqliteStore:
    """All records in SQLite; one connection, one lock, one transaction per request."""

    def __init__(self, data_dir: str | None) -> None:
        if data_dir is None:
            target = ":memory:"
        else:
            Path(data_dir).mkdir(parents=True, exist_ok=True)
            target = str(Path(data_dir) / "collector.db")
        # Handler threads share this connection; self._lock serialises every use of it.
        # isolation_level=None lets us issue BEGIN/COMMIT ourselves, one pair per request.
        self._conn = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        if data_dir is not None:
            # WAL lets `sqlite3 collector.db` read while we write. Without fsyncs the file
            # still survives a crash of this process intact; only an OS crash could lose the
            # last writes, which is irrelevant for test evidence and halves the write cost.
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=OFF")
        # The transaction_id index is random-access; a 64 MiB page cache keeps it in memory.
        self._conn.execute("PRAGMA cache_size=-65536")
        for kind in ("events", "actions"):
            self._conn.execute(
                f"CREATE TABLE IF NOT EXISTS {kind} ("  # table names come from KINDS only
                " seq INTEGER PRIMARY KEY, transaction_id TEXT UNIQUE, body TEXT NOT NULL)"
            )
        for kind in _PROFILE_KEYS:
            self._conn.execute(
                f"CREATE TABLE IF NOT EXISTS {kind} ("
                " seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, body TEXT NOT NULL)"
            )
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS metadata_schema (key TEXT PRIMARY KEY, type TEXT)"
        )

    def insert_unique(
        self, kind: str, items: list[dict[str, Any]], new_types: Mapping[str, str] | None = None
    ) -> int:
        """Stores new records and, in the same transaction, the schema keys they establish."""
        rows = [(_transaction_id(item), _compact(item)) for item in items]
        # NULL never collides with a UNIQUE column, so items without an id are always stored;
        # OR IGNORE drops repeats, both across batches and within one.
        sql = f"INSERT OR IGNORE INTO {kind} (transaction_id, body) VALUES (?, ?)"  # noqa: S608
        stored = 0

        def work() -> None:
            nonlocal stored
            before = self._conn.total_changes
            self._conn.executemany(sql, rows)
            stored = self._conn.total_changes - before
            if new_types:
                self._conn.executemany(_SCHEMA_INSERT, new_types.items())

        with self._lock:
            self._transaction(work)
        return stored

    def load_schema(self) -> dict[str, str]:
        with self._lock:
            return dict(self._conn.execute("SELECT key, type FROM metadata_schema").fetchall())

    def add_types(self, new_types: Mapping[str, str]) -> None:
        with self._lock:
            self._transaction(lambda: self._conn.executemany(_SCHEMA_INSERT, new_types.items()))

    def upsert(self, kind: str, items: list[dict[str, Any]]) -> None:
        key = _PROFILE_KEYS[kind]
        ids = list(dict.fromkeys(str(item[key]) for item in items))
        select = f"SELECT id, body FROM {kind} WHERE id IN "  # noqa: S608
        write = (
            f"INSERT INTO {kind} (id, body) VALUES (?, ?)"  # noqa: S608
            " ON CONFLICT(id) DO UPDATE SET body = excluded.body"
        )

        def work() -> None:
            current: dict[str, dict[str, Any]] = {}
            # Stay well under SQLite's limit on bound parameters per statement.
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for row_id, body in self._conn.execute(f"{select}({marks})", chunk):
                    current[row_id] = json.loads(body)
            for item in items:
                item_id = str(item[key])
                current[item_id] = _merge(current.get(item_id, {}), item)
            self._conn.executemany(write, [(i, _compact(current[i])) for i in ids])

        with self._lock:
            self._transaction(work)

    def _transaction(self, work: Callable[[], object]) -> None:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            work()
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                kind: self._conn.execute(f"SELECT COUNT(*) FROM {kind}").fetchone()[0]  # noqa: S608
                for kind in KINDS
            }

    def records(self, kind: str, limit: int | None, offset: int) -> list[Any]:
        sql = f"SELECT body FROM {kind} ORDER BY seq LIMIT ? OFFSET ?"  # noqa: S608
        with self._lock:
            rows = self._conn.execute(sql, (-1 if limit is None else limit, offset)).fetchall()
        return [json.loads(body) for (body,) in rows]

    def reset(self) -> None:
        def work() -> None:
            for kind in KINDS:
                self._conn.execute(f"DELETE FROM {kind}")  # noqa: S608
            self._conn.execute("DELETE FROM metadata_schema")

        with self._lock:
            self._transaction(work)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _CountStore:
    """Validates and deduplicates like the SQLite store but keeps only ids and counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, set[str]] = {kind: set() for kind in KINDS}
        self._anonymous: dict[str, int] = dict.fromkeys(KINDS, 0)

    def insert_unique(
        self, kind: str, items: list[dict[str, Any]], new_types: Mapping[str, str] | None = None
    ) -> int:
        del new_types  # this mode's schema lives only in _Collector's memory
        seen = self._seen[kind]
        stored = 0
        with self._lock:
            for item in items:
                transaction_id = _transaction_id(item)
                if transaction_id is None:
                    self._anonymous[kind] += 1
                    stored += 1
                elif transaction_id not in seen:
                    seen.add(transaction_id)
                    stored += 1
        return stored

    def upsert(self, kind: str, items: list[dict[str, Any]]) -> None:
        key = _PROFILE_KEYS[kind]
        with self._lock:
            self._seen[kind].update(str(item[key]) for item in items)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {kind: len(self._seen[kind]) + self._anonymous[kind] for kind in KINDS}

    def records(self, kind: str, limit: int | None, offset: int) -> list[Any]:
        del kind, limit, offset  # No bodies are kept in this mode.
        return []

    def load_schema(self) -> dict[str, str]:
        return {}  # nothing persists in this mode

    def add_types(self, new_types: Mapping[str, str]) -> None:
        del new_types  # this mode's schema lives only in _Collector's memory

    def reset(self) -> None:
        with self._lock:
            for kind in KINDS:
                self._seen[kind].clear()
                self._anonymous[kind] = 0

    def close(self) -> None:
        """Nothing to release."""


# --------------------------------------------------------------------------------------------
# The emulator's state, independent of HTTP
# --------------------------------------------------------------------------------------------

_Fault = Literal["drop", "fail"]


class _Collector:
    """Store, metadata schema, counters and fault schedule of one emulator; thread-safe.

    The metadata schema (key name -> JSON type) only ever gains keys, short of ``reset``: a
    key found with a type keeps it. So a request whose every key/type pair is already known
    is judged without the schema lock, while a request that would add keys decides and
    commits them (with its records) under the lock, so that two concurrent requests cannot
    establish different types for the same key.
    """

    def __init__(self, config: CollectorConfig) -> None:
        self.config = config
        self.store: _Store = (
            _CountStore() if config.store == "count" else _SqliteStore(config.data_dir)
        )
        self._lock = threading.Lock()
        # Lock order: _schema_lock, then the store's lock; never the other way round.
        self._schema_lock = threading.Lock()
        try:
            schema = self.store.load_schema()
        except BaseException:
            self.store.close()
            raise
        # The schema and its shape cache, swapped as one pair by reset(): a request reads
        # the attribute once, so it never judges against one and caches into the other.
        self._schema_state: tuple[dict[str, str], _Shapes] = (schema, {})
        self._reset_counters()

    def _reset_counters(self) -> None:
        with self._lock:
            self._requests: defaultdict[str, defaultdict[str, int]] = defaultdict(
                lambda: defaultdict(int)
            )
            self._received = dict.fromkeys(KINDS, 0)
            self._encodings: defaultdict[str, int] = defaultdict(int)
            self._accepted = dict.fromkeys(KINDS, 0)
            self._stored = dict.fromkeys(KINDS, 0)
            self._duplicates = {"events": 0, "actions": 0}
            self._dropped = 0
            self._failed = 0
            self._type_conflicts = 0
            self._lags: dict[str, list[int]] = {"events": [], "actions": []}
            # The fault schedule restarts too, so a reset emulator behaves like a fresh one.
            self._latency_candidates = 0
            self._drop_candidates = 0
            self._fail_candidates = 0
            self._rng = random.Random(self.config.seed)

    def next_latency(self) -> float:
        """Seconds to delay the next ingestion POST (latency_ms, within latency_first)."""
        config = self.config
        if not config.latency_ms:
            return 0.0
        with self._lock:
            self._latency_candidates += 1
            if config.latency_first and self._latency_candidates > config.latency_first:
                return 0.0
        return config.latency_ms / 1000

    def next_fault(self) -> _Fault | None:
        """Decides the fault for the next ingestion POST: drop first, then fail."""
        config = self.config
        with self._lock:
            self._drop_candidates += 1
            if self._drop_candidates <= config.drop_first or (
                config.drop_connection_rate > 0 and self._rng.random() < config.drop_connection_rate
            ):
                self._dropped += 1
                return "drop"
            # fail_first counts the requests that got this far, so drop_first=1, fail_first=1
            # gives: dropped, failed, accepted.
            self._fail_candidates += 1
            if self._fail_candidates <= config.fail_first or (
                config.fail_rate > 0 and self._rng.random() < config.fail_rate
            ):
                self._failed += 1
                return "fail"
        return None

    def count_request(self, route: str, status: int) -> None:
        with self._lock:
            self._requests[route][str(status)] += 1

    def count_received(self, kind: str, count: int, encoding: str) -> None:
        with self._lock:
            self._received[kind] += count
            self._encodings[encoding] += 1

    def ingest(
        self, kind: str, items: list[dict[str, Any]], *, batch: bool = True
    ) -> tuple[int, int]:
        """Stores validated records, applying the metadata rules to events and actions first.

        Args:
            kind: One of ``KINDS``.
            items: Records that passed ``validate_payload``. Dotted metadata keys are
                converted in place.
            batch: Whether they came from a ``/batch`` route (errors then carry the index).

        Returns:
            (stored, duplicates dropped).

        Raises:
            MetadataTypeConflict: If a metadata value contradicts its key's known type (with
                ``metadata_types="enforce"``). Nothing is then stored and no type is learned.
        """
        if kind in _PROFILE_KEYS:
            self.store.upsert(kind, items)
            stored, duplicates = len(items), 0
        else:
            try:
                stored = self._insert_events(kind, items, batch=batch)
            except MetadataTypeConflict:
                with self._lock:
                    self._type_conflicts += 1
                raise
            duplicates = len(items) - stored
        lags = _arrival_lags(items) if kind in ("events", "actions") else []
        with self._lock:
            self._accepted[kind] += len(items)
            self._stored[kind] += stored
            if kind in self._duplicates:
                self._duplicates[kind] += duplicates
            if lags and len(self._lags[kind]) < _MAX_LAGS:
                self._lags[kind].extend(lags)
        return stored, duplicates

    def _insert_events(self, kind: str, items: list[dict[str, Any]], *, batch: bool) -> int:
        if self.config.metadata_types == "off":
            _apply_metadata_rules(items, {}, None, None, batch=batch)
            return self.store.insert_unique(kind, items)
        # First pass without the lock. Schema entries never change once made, so a verdict
        # of "conflict" or "all known" stays true; only the new keys need a second look.
        # (A request racing reset() is judged against the schema from before the reset.)
        learned: dict[str, str] = {}
        schema, shapes = self._schema_state
        _apply_metadata_rules(items, schema, learned, shapes, batch=batch)
        if not learned:
            return self.store.insert_unique(kind, items)
        with self._schema_lock:
            schema, shapes = self._schema_state
            if any(schema.get(key, kind_) != kind_ for key, kind_ in learned.items()):
                # A concurrent request committed one of these keys with another type in the
                # meantime: judge again, against the schema as it is now (keys are already
                # converted, so this pass changes nothing but the verdict).
                learned = {}
                _apply_metadata_rules(items, schema, learned, shapes, batch=batch)
            # Records and new keys go in one transaction, so a failed write learns nothing.
            stored = self.store.insert_unique(kind, items, learned)
            schema.update(learned)
        return stored

    def metadata_schema(self) -> dict[str, str]:
        """The metadata schema, sorted by key."""
        with self._schema_lock:
            return dict(sorted(self._schema_state[0].items()))

    def seed_schema(self, types: Any) -> dict[str, str]:
        """Adds the keys of ``types`` that the schema does not know yet (first type wins).

        Returns:
            The resulting schema, sorted by key.

        Raises:
            ValueError: If ``types`` is not an object of key -> type name; nothing is added.
        """
        cleaned = _clean_schema(types)
        with self._schema_lock:
            schema = self._schema_state[0]
            new = {key: kind for key, kind in cleaned.items() if key not in schema}
            if new:
                self.store.add_types(new)
                schema.update(new)
            return dict(sorted(schema.items()))

    def stats(self) -> dict[str, Any]:
        records = self.store.counts()
        schema = self.metadata_schema()
        with self._lock:
            return {
                "store": self.config.store,
                "records": records,
                "requests": {
                    route: dict(sorted(by_status.items()))
                    for route, by_status in sorted(self._requests.items())
                },
                "items_received": dict(self._received),
                "content_encodings": dict(sorted(self._encodings.items())),
                "items_accepted": dict(self._accepted),
                "items_stored": dict(self._stored),
                "duplicates": dict(self._duplicates),
                "faults": {"dropped": self._dropped, "failed": self._failed},
                "metadata_schema": schema,
                "type_conflicts": self._type_conflicts,
                "arrival_lag_ms": {kind: _percentiles(lags) for kind, lags in self._lags.items()},
            }

    def records(self, kind: str, limit: int | None = None, offset: int = 0) -> list[Any]:
        _check_kind(kind)
        return self.store.records(kind, limit, offset)

    def reset(self) -> None:
        with self._schema_lock:
            self.store.reset()
            # New objects rather than clear(): a request still in flight keeps the old schema
            # and shape cache, so its verdicts cannot leak into the fresh ones.
            self._schema_state = ({}, {})
        self._reset_counters()

    def close(self) -> None:
        self.store.close()


# Arrival lags kept per kind (8 bytes each as Python ints in a list: 5M is about 200 MB at
# worst, and a benchmark run is far below it).
_MAX_LAGS = 5_000_000


def _arrival_lags(items: list[dict[str, Any]]) -> list[int]:
    """Milliseconds between each item's ``request.time`` and now; items without one skipped."""
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    lags = []
    for item in items:
        request = item.get("request")
        text = request.get("time") if isinstance(request, dict) else None
        if not isinstance(text, str):
            continue
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            continue
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        lags.append(now_ms - int(when.timestamp() * 1000))
    return lags


def _percentiles(values: list[int]) -> dict[str, int]:
    """Count, p50, p90, p99 and max of ``values`` (nearest rank); only count when empty."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    last = len(ordered) - 1
    return {
        "count": len(ordered),
        "p50": ordered[round(0.50 * last)],
        "p90": ordered[round(0.90 * last)],
        "p99": ordered[round(0.99 * last)],
        "max": ordered[last],
    }


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


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


class _HttpError(Exception):
    """An error answer, raised from deep inside request handling."""

    def __init__(
        self,
        status: int,
        body: Mapping[str, Any] | str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status)
        self.status = status
        self.body: Mapping[str, Any] = {"error": body} if isinstance(body, str) else body
        self.headers = dict(headers or {})


def _decompress(raw: bytes, wbits: int, limit: int, *, multi_member: bool) -> bytes:
    """Inflates ``raw`` without ever producing more than ``limit + 1`` bytes (bomb guard)."""
    parts: list[bytes] = []
    total = 0
    data = raw
    while True:
        inflater = zlib.decompressobj(wbits)
        # Asking for at most one byte past the limit is enough to know the limit was crossed.
        chunk = inflater.decompress(data, limit - total + 1)
        total += len(chunk)
        if total > limit:
            msg = f"decompressed body exceeds the limit of {limit:,} bytes"
            raise _HttpError(413, msg)
        parts.append(chunk)
        if not inflater.eof:
            # All input was consumed (output stayed under max_length) but the stream never
            # ended: the body was cut short.
            msg = "compressed stream is truncated"
            raise zlib.error(msg)
        data = inflater.unused_data
        # gzip allows several members back to back; anything else after the end is garbage.
        if not data or (multi_member and data.startswith(b"\x1f\x8b")):
            if not data:
                return b"".join(parts)
            continue
        if data.strip(b"\x00"):
            msg = "unexpected bytes after the compressed stream"
            raise zlib.error(msg)
        return b"".join(parts)


def _decode_body(raw: bytes, content_encoding: str | None, limit: int) -> bytes:
    coding = (content_encoding or "identity").strip().lower()
    try:
        if coding in ("", "identity"):
            return raw
        if coding in ("gzip", "x-gzip"):
            return _decompress(raw, 16 + zlib.MAX_WBITS, limit, multi_member=True)
        if coding == "deflate":
            # HTTP's "deflate" means zlib-wrapped, but many clients send raw deflate; accept both.
            try:
                return _decompress(raw, zlib.MAX_WBITS, limit, multi_member=False)
            except zlib.error:
                return _decompress(raw, -zlib.MAX_WBITS, limit, multi_member=False)
    except zlib.error as exc:
        msg = f"body could not be decoded as {coding}: {exc}"
        raise _HttpError(400, msg) from None
    msg = f"unsupported Content-Encoding {coding[:40]!r}; use gzip, deflate or identity"
    raise _HttpError(400, msg)


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (and Moesif) does not.
    msg = f"{name} is not valid JSON"
    raise ValueError(msg)


# A \uD800-\uDFFF escape: the only way JSON text can smuggle in an unpaired surrogate.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")


def _parse_json(body: bytes) -> Any:
    """Decodes a request body as JSON text, which RFC 8259 requires to be UTF-8."""
    try:
        # utf-8-sig tolerates a byte order mark, which RFC 8259 lets parsers ignore.
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        msg = f"body is not valid JSON: not UTF-8 ({exc.reason} at byte {exc.start})"
        raise _HttpError(400, msg) from None
    try:
        payload = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        msg = f"body is not valid JSON: {str(exc)[:200]}"
        raise _HttpError(400, msg) from None
    if _SURROGATE_ESCAPE.search(text):
        # Escaped pairs decode to one character; a lone half is not Unicode and could not
        # be stored or measured as UTF-8 later, so it is refused here.
        try:
            _compact(payload).encode("utf-8")
        except UnicodeEncodeError:
            msg = "body is not valid JSON: it escapes an unpaired UTF-16 surrogate"
            raise _HttpError(400, msg) from None
    return payload


def _format_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


def _status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return f"status {status}"


class _CollectorServer(ThreadingHTTPServer):
    """The HTTP server; tracks connections and requests in flight for a clean ``stop()``."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, collector: _Collector, *, verbose: bool) -> None:
        self.collector = collector
        self.verbose = verbose
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        # Set by stop(): wakes handlers sleeping for injected latency and quiets late errors.
        self.stopping = threading.Event()
        self._active = 0
        self._idle = threading.Condition()
        config = collector.config
        self.tls: ssl.SSLContext | None = None
        if config.tls_cert is not None:
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(config.tls_cert, config.tls_key)
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        super().__init__((config.host, config.port), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        # The handshake runs here, on the connection's own thread, so a client that
        # never completes it (or refuses our certificate) holds up no one else.
        request.settimeout(10)
        try:
            connection = self.tls.wrap_socket(request, server_side=True)
        except OSError:
            _LOG.debug("TLS handshake with %s failed", client_address, exc_info=True)
            return
        try:
            super().finish_request(connection, client_address)
        finally:
            connection.close()

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on reverse DNS;
        # the plain TCP bind is all we need.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that vanish mid-request are routine in fault tests; never print tracebacks.
        _LOG.debug("connection from %s ended with an error", client_address, exc_info=True)

    def track(self, connection: socket.socket, *, add: bool) -> None:
        with self._connections_lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        """Marks one request as being handled, for ``wait_idle``."""
        with self._idle:
            self._active += 1
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> None:
        """Waits until no request is being handled, or ``timeout`` seconds pass."""
        with self._idle:
            self._idle.wait_for(lambda: self._active == 0, timeout)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the client
                connection.shutdown(socket.SHUT_RDWR)


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
        redirect_to = self.server.collector.config.redirect_to
        if redirect_to is not None and path.startswith("/v1/"):
            location = redirect_to.rstrip("/") + path
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
            self._send(200, self._records())
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

    def _records(self) -> list[Any]:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        kind = query.get("kind", ["events"])[-1]
        try:
            limit = int(query.get("limit", [str(_DEFAULT_RECORDS_LIMIT)])[-1])
            offset = int(query.get("offset", ["0"])[-1])
        except ValueError:
            msg = "limit and offset must be integers"
            raise _HttpError(400, msg) from None
        if limit < 0 or offset < 0:
            msg = "limit and offset must be >= 0"
            raise _HttpError(400, msg)
        try:
            return self.server.collector.records(kind, limit, offset)
        except ValueError as exc:
            raise _HttpError(400, str(exc)) from None

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
            headers: dict[str, str] = {}
            if config.retry_after is not None and config.fail_status in (429, 503):
                headers["Retry-After"] = _format_seconds(config.retry_after)
            fault_body = {"error": f"injected fault: {_status_phrase(config.fail_status)}"}
            self._send(config.fail_status, fault_body, headers)
            return

        content_type = self.headers.get("Content-Type", "")
        if content_type.split(";", 1)[0].strip().lower() != "application/json":
            msg = f"Content-Type must be application/json, got {content_type[:80]!r}"
            raise _HttpError(400, msg)
        body = _decode_body(raw, self.headers.get("Content-Encoding"), route.limit)
        payload = _parse_json(body)
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


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


class RunningCollector:
    """An emulator serving in a background thread; also a context manager that stops it.

    Attributes:
        config: The configuration it runs with.
        url: Base URL without a trailing slash, e.g. ``http://127.0.0.1:54321``; append
            ``/v1/events/batch`` and so on.
    """

    def __init__(
        self, server: _CollectorServer, thread: threading.Thread, collector: _Collector
    ) -> None:
        self._server = server
        self._thread = thread
        self._collector = collector
        self._stopped = False
        self._stop_lock = threading.Lock()
        self.config = collector.config
        host, port = server.server_address[:2]
        text = host.decode() if isinstance(host, bytes) else str(host)
        shown = f"[{text}]" if ":" in text else text
        scheme = "https" if server.tls is not None else "http"
        self.url = f"{scheme}://{shown}:{port}"

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with ``port=0``)."""
        return int(self._server.server_address[1])

    def stats(self) -> dict[str, Any]:
        """Returns the same counters as ``GET /_emulator/stats``.

        Returns:
            ``records`` (stored records per kind), ``requests`` (per route, per status),
            ``items_received`` (items in every well-formed body), ``content_encodings``
            (well-formed bodies per Content-Encoding), ``items_accepted`` (items in 201
            answers), ``items_stored`` (new records; upserts count each item),
            ``duplicates`` (events and actions dropped by transaction_id), ``faults``
            (``dropped``, ``failed``), ``store``, ``metadata_schema`` (key -> JSON type,
            sorted by key) and ``type_conflicts`` (requests refused for a metadata type
            conflict).
        """
        return self._collector.stats()

    def seed_schema(self, types: Mapping[str, str]) -> dict[str, str]:
        """Adds metadata keys to the schema, as if records had sent them first.

        Like ``POST /_emulator/schema``. Keys the schema already knows keep their type (first
        wins); dots in keys are converted. Persisted like learned keys.

        Args:
            types: Key name -> one of ``METADATA_TYPES``.

        Returns:
            The resulting schema, sorted by key.

        Raises:
            ValueError: If a type name is unknown; nothing is then added.
        """
        return self._collector.seed_schema(types)

    def records(self, kind: str) -> list[dict[str, Any]]:
        """Returns every stored record of one kind, as parsed JSON, in arrival order.

        Upserted profiles are returned merged, in the order they were first created. With
        ``store="count"`` no bodies are kept and the list is empty.

        Args:
            kind: One of ``events``, ``actions``, ``users``, ``companies``, ``subscriptions``.

        Raises:
            ValueError: If ``kind`` is unknown.
        """
        return self._collector.records(kind)

    def reset(self) -> None:
        """Drops every record, counter and metadata schema key; restarts the fault schedule."""
        self._collector.reset()

    def stop(self) -> None:
        """Stops serving, closes open connections and the store; safe to call twice."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self._server.stopping.set()
        self._server.shutdown()
        # Let requests in flight finish writing to the store before it is closed; idle
        # keep-alive connections are then woken by shutting their sockets down.
        self._server.wait_idle(timeout=5)
        self._server.close_connections()
        self._server.server_close()
        self._thread.join(timeout=10)
        self._collector.close()

    def __enter__(self) -> RunningCollector:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def start_in_thread(config: CollectorConfig, *, verbose: bool = False) -> RunningCollector:
    """Starts an emulator in a daemon thread.

    Args:
        config: What to emulate and which faults to inject.
        verbose: Log one INFO line per request (method, path, status, item count; never
            headers) to this module's logger.

    Returns:
        The running emulator. Its socket is already listening, so requests to ``url`` succeed
        at once.

    Raises:
        OSError: If the address cannot be bound.
    """
    collector = _Collector(config)
    try:
        server = _CollectorServer(collector, verbose=verbose)
    except BaseException:
        collector.close()
        raise
    # A short poll interval makes stop() return quickly.
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name=f"moesif-collector:{server.server_address[1]}",
        daemon=True,
    )
    thread.start()
    return RunningCollector(server, thread, collector)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moesif-beam collector",
        description="Local emulator of Moesif's Collector API (validation, dedup, faults).",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    add("--port", type=int, default=9500, help="port; 0 picks a free one (default 9500)")
    add(
        "--data_dir",
        default="./collector-data",
        help="directory for collector.db (default ./collector-data); ':memory:' keeps no file",
    )
    add("--application_id", default=None, help="the only application id accepted (secret)")
    add("--fail_rate", type=float, default=0.0, help="probability an ingestion POST fails")
    add("--fail_status", type=int, default=503, help="status of injected failures (503)")
    add("--fail_first", type=int, default=0, help="the first N ingestion POSTs fail")
    add("--retry_after", type=float, default=None, help="Retry-After seconds on 429/503 faults")
    add("--latency_ms", type=int, default=0, help="delay added to ingestion POSTs")
    add("--latency_first", type=int, default=0, help="delay only the first N POSTs (0: all)")
    add("--drop_connection_rate", type=float, default=0.0, help="probability of a dropped socket")
    add("--drop_first", type=int, default=0, help="the first N ingestion POSTs are dropped")
    add("--seed", type=int, default=None, help="seed for the fault rates")
    add("--store", choices=("sqlite", "count"), default="sqlite", help="keep bodies, or count")
    add("--reject_older_than_days", type=int, default=None, help="reject events older than this")
    add(
        "--metadata_types",
        choices=_METADATA_MODES,
        default="enforce",
        help="enforce: refuse metadata whose key changes JSON type (default); off: no checks",
    )
    add(
        "--validation",
        choices=_VALIDATION_MODES,
        default="full",
        help="full: check every item's fields (default); off: only parse and count "
        "(with --store count --metadata_types off: the fast count-only mode)",
    )
    add("--redirect_to", default=None, help="answer every /v1 request 307 to this base URL")
    add("--tls_cert", default=None, help="serve HTTPS with this PEM certificate chain")
    add("--tls_key", default=None, help="the PEM private key of --tls_cert")
    add("--verbose", action="store_true", help="log one line per request to stderr")
    add("--inspect", metavar="URL", default=None, help="print a running emulator's stats, exit")
    add("--kind", choices=KINDS, default="events", help="with --inspect: records to show")
    add("--limit", type=int, default=20, help="with --inspect: how many records (default 20)")
    return parser


def _fetch_json(url: str) -> Any:
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        msg = f"only http(s) URLs can be inspected, got {url[:100]!r}"
        raise ValueError(msg)
    # The scheme was checked above, so urlopen cannot be pointed at file: or similar.
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
        return json.load(response)


def _inspect(base_url: str, kind: str, limit: int) -> int:
    base = base_url.rstrip("/")
    query = urllib.parse.urlencode({"kind": kind, "limit": max(limit, 0)})
    try:
        report = {
            "url": base,
            "stats": _fetch_json(f"{base}/_emulator/stats"),
            "kind": kind,
            "records": _fetch_json(f"{base}/_emulator/records?{query}"),
        }
    except (OSError, ValueError) as exc:
        print(f"cannot inspect {base}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2, ensure_ascii=False), flush=True)
    return 0


def _config_from_args(args: argparse.Namespace) -> CollectorConfig:
    in_memory = args.store == "count" or args.data_dir in ("", ":memory:")
    return CollectorConfig(
        host=args.host,
        port=args.port,
        data_dir=None if in_memory else args.data_dir,
        application_id=args.application_id,
        fail_rate=args.fail_rate,
        fail_status=args.fail_status,
        fail_first=args.fail_first,
        retry_after=args.retry_after,
        latency_ms=args.latency_ms,
        latency_first=args.latency_first,
        drop_connection_rate=args.drop_connection_rate,
        drop_first=args.drop_first,
        seed=args.seed,
        store=args.store,
        reject_older_than_days=args.reject_older_than_days,
        metadata_types=args.metadata_types,
        validation=args.validation,
        redirect_to=args.redirect_to,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )


def main(argv: list[str] | None = None) -> int:
    """Runs the emulator in the foreground, or inspects a running one with ``--inspect``.

    Serving prints exactly one line to stdout, ``collector listening on URL (data in DIR)``,
    then runs until SIGTERM or SIGINT and stops cleanly. The application id is never printed.

    Args:
        argv: Command-line arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        0 after a clean stop or a successful inspection, 1 if the port cannot be bound or the
        emulator cannot be reached, 2 for invalid arguments.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.inspect:
        return _inspect(args.inspect, args.kind, args.limit)
    try:
        config = _config_from_args(args)
    except ValueError as exc:
        print(f"moesif-beam collector: {exc}", file=sys.stderr)
        return 2
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        _LOG.setLevel(logging.INFO)

    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        stop.set()

    previous: dict[int, Any] = {}
    # Signal handlers can only be installed from the main thread (tests may call main()
    # elsewhere, e.g. for --inspect).
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, request_stop)
    try:
        try:
            running = start_in_thread(config, verbose=args.verbose)
        except OSError as exc:
            print(f"cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
            return 1
        where = "memory" if config.data_dir is None else str(Path(config.data_dir).resolve())
        print(f"collector listening on {running.url} (data in {where})", flush=True)
        try:
            # A timed wait keeps the main thread responsive to signals on every platform.
            while not stop.wait(0.5):
                pass
        finally:
            running.stop()
        if args.verbose:
            _LOG.info("collector stopped")
        return 0
    finally:
        for restored, handler in previous.items():
            signal.signal(restored, handler)

