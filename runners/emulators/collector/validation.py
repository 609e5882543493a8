"""Request and record validation: the required fields and types of the Collector API.

Pure functions: :func:`validate_record` checks one record, :func:`validate_payload` a whole
decoded body (all-or-nothing); both raise :class:`ValidationError`, whose ``to_json()`` is the
400 body. Events and actions, which arrive by the hundred thousand, take a fast path first.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final

from moesif_beam.runners.emulators.collector.config import ITEM_LIMIT_BYTES, KINDS

_DIRECTIONS: Final = frozenset({"Incoming", "Outgoing", "Internal"})


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
    (``Z``, ``+HH``, ``+HHMM`` or ``+HH:MM``). The SDKs send all of these shapes
    (docs/design.md, Collector API §2.1).

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
    # Moesif's own action guides send requests without a uri, so uri is optional
    # (docs/design.md, Collector API §2.2).
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
    send both (docs/design.md, Collector API §2).

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
