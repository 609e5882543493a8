"""Moesif Collector API actions (``/v1/actions``), as servers and moesif-browser-js send them.

A record is one action object of Moesif's Actions API: ``action_name``, a ``request`` holding
``time``, ``uri``, ``ip_address`` and ``user_agent_string``, the optional ids
(``transaction_id``, ``user_id``, ``company_id``, ``subscription_id``, ``session_token``,
``anonymous_id``) and a free-form ``metadata`` object. A line holds one action or, like the
body of ``/v1/actions/batch``, a JSON array of them.

Guarantees of the mapping:

* ``action_name`` is required (a non-empty string); every other field is optional, as the
  Collector API makes it. ``request`` is always sent, ``{}`` when the record has none.
* ``transaction_id`` is the record's own when it has one. Otherwise it is a UUIDv5 of the
  record's canonical JSON, so a replayed or re-run record gets the same id and Moesif's
  deduplication makes re-delivery harmless; records that differ in any value get
  different ids.
* ``request.time``, when present, is parsed leniently (ISO 8601 with or without zone and
  fraction, or epoch seconds/milliseconds) and sent in the canonical
  ``YYYY-MM-DDTHH:MM:SS.mmmZ`` form. When absent the action is still valid: Moesif stamps
  it on arrival, and the returned time is None.
* Ids are strings: numbers are converted with ``str()``, empty strings and nulls count as
  absent, anything else is refused.
* ``metadata`` is always an object, with dots in keys turned into ``_`` as Moesif does.
* Unknown top-level keys are left out of the output (Moesif ignores them); unknown keys
  inside ``request`` (moesif-browser-js sends ``verb``) are kept as they are.

Everything here is a pure function of one parsed record; no Beam, no I/O. The helpers
that build the common action shape are public so sibling formats (``segment``) map to
exactly the same output.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from moesif_beam.transforms.common.errors import InvalidRecord, json_type
from moesif_beam.transforms.common.timefmt import format_time_ms, parse_time_ms
from moesif_beam.transforms.schema.keys import sanitize_keys

__all__ = [
    "ACTIONS_NAMESPACE",
    "ID_FIELDS",
    "assemble_action",
    "content_id",
    "optional_id",
    "optional_object",
    "parse_time",
    "required_string",
    "split",
    "to_moesif_action",
]

# Namespace for ids derived from content when an action has no transaction_id. Fixed
# forever: changing it would give every replayed action a new id and defeat dedup.
ACTIONS_NAMESPACE = uuid.UUID("fa73bd91-9e77-4d80-8f54-3a690ec62f9a")

# Moesif's optional id fields, in the order they appear in an output action.
ID_FIELDS = ("user_id", "company_id", "subscription_id", "session_token", "anonymous_id")

# request members with a known type, in output order after ``time``.
_REQUEST_STRINGS = ("uri", "ip_address", "user_agent_string")
_REQUEST_KNOWN = frozenset({"time", *_REQUEST_STRINGS})


def split(value: Any) -> list[tuple[Any, str]]:
    """Return the actions of one parsed line, each with its field-path prefix.

    An array (the ``/v1/actions/batch`` body) yields its items with prefixes ``[0]``,
    ``[1]``, ...; anything else is one record with the prefix ``""``. Nothing is validated
    here: :func:`to_moesif_action` refuses items that are not objects.
    """
    if isinstance(value, list):
        return [(item, f"[{index}]") for index, item in enumerate(value)]
    return [(value, "")]


def to_moesif_action(
    value: Any, company_id_field: str | None = None
) -> tuple[str, int | None, dict]:
    """Map one Collector API action to the action Moesif will be sent.

    Args:
        value: one parsed action (an item of :func:`split`).
        company_id_field: when set and the action has no ``company_id``, the top-level
            ``metadata`` key whose value (a string, or a number converted with ``str()``)
            becomes ``company_id``. The key stays in metadata.

    Returns:
        ``(transaction_id, request_time_ms, action)``; the time is None when the action
        carries no ``request.time``.

    Raises:
        InvalidRecord: the action is not an object, lacks ``action_name``, has a
            ``request.time`` that is not a time, or has a field of the wrong type. The
            exception names the field (``request.time``, ``metadata``, ...) and the types.
    """
    if not isinstance(value, dict):
        actual = json_type(value)
        msg = f"an action is a JSON object, got {actual}"
        raise InvalidRecord(msg, "", "object", actual)
    action_name = required_string(value.get("action_name"), "action_name")
    request, time_ms = _request(value.get("request"))
    metadata = optional_object(value.get("metadata"), "metadata")
    ids = {key: optional_id(value.get(key), key) for key in ID_FIELDS}
    transaction_id = optional_id(value.get("transaction_id"), "transaction_id")
    if transaction_id is None:
        transaction_id = content_id(ACTIONS_NAMESPACE, value)
    action = assemble_action(transaction_id, action_name, request, ids, metadata, company_id_field)
    return transaction_id, time_ms, action


def assemble_action(
    transaction_id: str,
    action_name: str,
    request: dict[str, Any],
    ids: Mapping[str, str | None],
    metadata: dict[str, Any],
    company_id_field: str | None = None,
) -> dict[str, Any]:
    """Build a Moesif action with its keys in the canonical order.

    Args:
        transaction_id: the action's id.
        action_name: the action's name.
        request: the finished ``request`` object.
        ids: values for :data:`ID_FIELDS`; None (or a missing key) leaves a field out.
        metadata: the action's metadata as the source gave it; keys are sanitized here.
        company_id_field: when set and ``ids`` has no company id, the top-level metadata
            key to take ``company_id`` from.

    Returns:
        ``transaction_id``, ``action_name``, ``request``, the ids present, ``metadata``.
    """
    action: dict[str, Any] = {
        "transaction_id": transaction_id,
        "action_name": action_name,
        "request": request,
    }
    for key in ID_FIELDS:
        value = ids.get(key)
        if value is None and key == "company_id" and company_id_field:
            value = _id_from(metadata.get(company_id_field))
        if value is not None:
            action[key] = value
    action["metadata"] = sanitize_keys(metadata) if metadata else {}
    return action


def required_string(value: Any, field: str) -> str:
    """Return ``value`` when it is a non-empty string.

    Raises:
        InvalidRecord: ``value`` is missing (None or ``""``) or not a string.
    """
    if isinstance(value, str) and value:
        return value
    if value is None or value == "":
        msg = f"missing {field}"
        raise InvalidRecord(msg, field)
    msg = f"{field} must be a string"
    raise InvalidRecord(msg, field, "string", json_type(value))


def optional_id(value: Any, field: str) -> str | None:
    """Return an id as a string, or None when it is absent.

    Strings are kept, numbers (not booleans) are converted with ``str()``, and None and
    ``""`` are absent.

    Raises:
        InvalidRecord: ``value`` is a boolean, an object or an array (expected string).
    """
    if isinstance(value, str):
        return value or None
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    msg = f"{field} must be a string"
    raise InvalidRecord(msg, field, "string", json_type(value))


def optional_object(value: Any, field: str) -> dict[str, Any]:
    """Return ``value`` when it is an object, ``{}`` when it is None.

    Raises:
        InvalidRecord: ``value`` is neither an object nor null (expected object).
    """
    if isinstance(value, dict):
        return value
    if value is None:
        return {}
    msg = f"{field} must be an object"
    raise InvalidRecord(msg, field, "object", json_type(value))


def parse_time(value: Any, field: str) -> int:
    """Parse a time leniently into epoch milliseconds.

    Raises:
        InvalidRecord: ``value`` is not a time in any form :func:`parse_time_ms` accepts.
    """
    try:
        return parse_time_ms(value)
    except ValueError as exc:
        msg = f"{field} is not a time: {exc}"
        raise InvalidRecord(msg, field, "string", json_type(value)) from exc


def content_id(namespace: uuid.UUID, record: Any) -> str:
    """Derive a deterministic transaction id from a record's content.

    The id is the UUIDv5 of the record's canonical JSON (sorted keys, no whitespace, ASCII),
    so equal records get equal ids whatever their key order, and any changed value gives
    a different id.
    """
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return str(uuid.uuid5(namespace, canonical))


def _request(value: Any) -> tuple[dict[str, Any], int | None]:
    raw = optional_object(value, "request")
    out: dict[str, Any] = {}
    time_ms = None
    when = raw.get("time")
    # An empty time is as absent as a missing one: Moesif stamps the arrival time.
    if when is not None and when != "":
        time_ms = parse_time(when, "request.time")
        out["time"] = format_time_ms(time_ms)
    for key in _REQUEST_STRINGS:
        item = raw.get(key)
        if item is None or item == "":
            continue
        if not isinstance(item, str):
            msg = f"request.{key} must be a string"
            raise InvalidRecord(msg, f"request.{key}", "string", json_type(item))
        out[key] = item
    if len(raw) > len(out):
        for key, item in raw.items():
            if key not in _REQUEST_KNOWN:
                out[key] = item
    return out, time_ms


def _id_from(value: Any) -> str | None:
    # A metadata value is the user's data: a value that cannot be an id is not an error.
    if isinstance(value, str):
        return value or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None
