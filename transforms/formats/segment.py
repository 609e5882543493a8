"""Segment ``track`` calls to Moesif actions, as Moesif's own Segment destination maps them.

A record is one call of Segment's spec (``type``, ``event``, ``properties``, ``userId``,
``anonymousId``, ``messageId``, ``timestamp``/``originalTimestamp``/``sentAt``/
``receivedAt``, ``context``, ``integrations``). A line holds one call, a JSON array of
calls, or a body of Segment's batch API (``{"batch": [...], "context": {...}}``).

Guarantees of the mapping:

* Only track calls become actions: ``type`` absent or ``track`` (any case). Identify, page,
  screen, group and alias calls are refused, naming ``type``; they are not actions.
* ``event`` becomes ``action_name`` and is required; ``properties`` become ``metadata``
  (dots in keys turned into ``_``). ``context`` and ``integrations`` are not metadata.
* ``transaction_id`` is stable across replays: a UUID ``messageId`` is kept (in
  lowercase canonical form), any other ``messageId`` is hashed to a UUIDv5, and a call
  without one gets the UUIDv5 of its canonical JSON.
* ``request.time`` is the first of ``timestamp``, ``originalTimestamp``, ``sentAt`` and
  ``receivedAt`` that is present, parsed leniently and sent canonically; a call with none
  of them is still valid (Moesif stamps the arrival time) and its returned time is None.
* ``context.page.url``, ``context.ip`` and ``context.userAgent`` become ``request.uri``,
  ``request.ip_address`` and ``request.user_agent_string``; ``userId`` and
  ``anonymousId`` become ``user_id`` and ``anonymous_id``; the company is
  ``context.groupId``, else ``context.traits.company.id``, else
  ``context.traits.company_id``, else a top-level ``groupId``.
* A batch body's top-level ``context`` applies to every call in it, as in Segment's batch
  API; a call's own context keys win.

The output has exactly the shape of :mod:`moesif_beam.transforms.formats.moesif_actions`. Everything
here is a pure function of one parsed call; no Beam, no I/O.
"""

from __future__ import annotations

import uuid
from typing import Any

from moesif_beam.transforms.common.errors import InvalidRecord, json_type
from moesif_beam.transforms.common.timefmt import format_time_ms
from moesif_beam.transforms.formats.moesif_actions import (
    assemble_action,
    content_id,
    optional_id,
    optional_object,
    parse_time,
    required_string,
)

__all__ = ["SEGMENT_NAMESPACE", "split", "to_moesif_action"]

# Namespace for ids derived from a non-UUID messageId or from a call's content. Fixed
# forever: changing it would give every replayed call a new id and defeat dedup.
SEGMENT_NAMESPACE = uuid.UUID("a6ea4d4e-a99c-4222-bf36-73f53e4d811e")

# Segment's time fields, most to least faithful to when the user acted.
_TIME_FIELDS = ("timestamp", "originalTimestamp", "sentAt", "receivedAt")

_UUID_CHARS = frozenset("0123456789abcdefABCDEF-")


def split(value: Any) -> list[tuple[Any, str]]:
    """Return the calls of one parsed line, each with its field-path prefix.

    A batch body (an object whose ``batch`` is an array) yields its items with prefixes
    ``batch[0]``, ``batch[1]``, ...; the body's ``context``, when an object, is merged
    under each object item's own context. An array yields its items with prefixes
    ``[0]``, ...; anything else is one call with the prefix ``""``. Nothing is validated
    here: :func:`to_moesif_action` refuses items that are not objects.
    """
    if isinstance(value, dict):
        batch = value.get("batch")
        if not isinstance(batch, list):
            return [(value, "")]
        shared = value.get("context")
        if isinstance(shared, dict) and shared:
            return [
                (_with_context(item, shared), f"batch[{index}]") for index, item in enumerate(batch)
            ]
        return [(item, f"batch[{index}]") for index, item in enumerate(batch)]
    if isinstance(value, list):
        return [(item, f"[{index}]") for index, item in enumerate(value)]
    return [(value, "")]


def to_moesif_action(
    value: Any, company_id_field: str | None = None
) -> tuple[str, int | None, dict]:
    """Map one Segment track call to a Moesif action.

    Args:
        value: one parsed Segment call (an item of :func:`split`).
        company_id_field: when set and the call names no company, the top-level
            ``properties`` key whose value (a string, or a number converted with ``str()``)
            becomes ``company_id``. The key stays in metadata.

    Returns:
        ``(transaction_id, request_time_ms, action)``; the time is None when the call
        carries none of Segment's time fields.

    Raises:
        InvalidRecord: the call is not an object, is not a track call (``type``), lacks
            ``event``, has a time that is not a time (named by its field, e.g.
            ``timestamp``), or has a field of the wrong type (``properties``,
            ``context.page.url``, ``userId``, ...). The exception names the field and types.
    """
    if not isinstance(value, dict):
        actual = json_type(value)
        msg = f"a Segment call is a JSON object, got {actual}"
        raise InvalidRecord(msg, "", "object", actual)
    _require_track(value.get("type"))
    action_name = required_string(value.get("event"), "event")
    metadata = optional_object(value.get("properties"), "properties")
    context = optional_object(value.get("context"), "context")
    request, time_ms = _request(value, context)
    ids = {
        "user_id": optional_id(value.get("userId"), "userId"),
        "company_id": _company_id(value, context),
        "anonymous_id": optional_id(value.get("anonymousId"), "anonymousId"),
    }
    transaction_id = _transaction_id(value)
    action = assemble_action(transaction_id, action_name, request, ids, metadata, company_id_field)
    return transaction_id, time_ms, action


def _with_context(item: Any, shared: dict[str, Any]) -> Any:
    if not isinstance(item, dict):
        return item
    own = item.get("context")
    if own is None:
        merged = shared
    elif isinstance(own, dict):
        merged = {**shared, **own}
    else:
        return item  # the mapper names the malformed context
    return {**item, "context": merged}


def _require_track(kind: Any) -> None:
    if kind is None or kind == "":
        return
    if not isinstance(kind, str):
        msg = "type must be a string"
        raise InvalidRecord(msg, "type", "string", json_type(kind))
    if kind.lower() != "track":
        msg = f"only track calls become actions; this is a {kind!r} call"
        raise InvalidRecord(msg, "type")


def _request(call: dict[str, Any], context: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    request: dict[str, Any] = {}
    time_ms = None
    for field in _TIME_FIELDS:
        when = call.get(field)
        if when is not None and when != "":
            time_ms = parse_time(when, field)
            request["time"] = format_time_ms(time_ms)
            break
    page = optional_object(context.get("page"), "context.page")
    _copy_string(request, "uri", page.get("url"), "context.page.url")
    _copy_string(request, "ip_address", context.get("ip"), "context.ip")
    _copy_string(request, "user_agent_string", context.get("userAgent"), "context.userAgent")
    return request, time_ms


def _copy_string(target: dict[str, Any], key: str, value: Any, field: str) -> None:
    if value is None or value == "":
        return
    if not isinstance(value, str):
        msg = f"{field} must be a string"
        raise InvalidRecord(msg, field, "string", json_type(value))
    target[key] = value


def _company_id(call: dict[str, Any], context: dict[str, Any]) -> str | None:
    company_id = optional_id(context.get("groupId"), "context.groupId")
    if company_id is not None:
        return company_id
    traits = optional_object(context.get("traits"), "context.traits")
    if traits:
        company = traits.get("company")
        # Some sources send the company's name as a plain string; that is not an id.
        if isinstance(company, dict):
            company_id = optional_id(company.get("id"), "context.traits.company.id")
        if company_id is None:
            company_id = optional_id(traits.get("company_id"), "context.traits.company_id")
        if company_id is not None:
            return company_id
    return optional_id(call.get("groupId"), "groupId")


def _transaction_id(call: dict[str, Any]) -> str:
    message_id = optional_id(call.get("messageId"), "messageId")
    if message_id is None:
        return content_id(SEGMENT_NAMESPACE, call)
    if (
        len(message_id) == 36
        and message_id[8] == message_id[13] == message_id[18] == message_id[23] == "-"
        and _UUID_CHARS.issuperset(message_id)
    ):
        try:
            return str(uuid.UUID(message_id))
        except ValueError:
            pass  # a hyphen where a hex digit belongs
    # Any other messageId is still unique per call within its source: hash it, so the id
    # is a UUID as Moesif asks and stays the same when Segment retries the call.
    return str(uuid.uuid5(SEGMENT_NAMESPACE, message_id))
