"""Segment ``identify`` and ``group`` calls to Moesif user and company upserts.

The mapping Moesif's own Segment destination documents for identify, and the natural one
for group (which Moesif documents nothing for):

* identify: ``userId`` -> ``user_id`` (required: Moesif users need one, so a call with only
  an ``anonymousId`` is refused); ``traits`` -> ``metadata`` (``firstName``/``lastName``
  become Moesif's reserved ``first_name``/``last_name``); the company is
  ``traits.company.id``, else ``traits.company_id``, else ``context.groupId``.
* group: ``groupId`` -> ``company_id`` (required); ``traits`` -> ``metadata``;
  ``traits.website`` -> ``company_domain``; with a ``userId``, the user is linked to the
  company by a user upsert ``{user_id, company_id}`` as well.
* both: ``context.ip`` -> ``ip_address``; ``context.userAgent`` -> ``user_agent_string``
  (users only); ``context.campaign.{source,medium,name,term,content}`` ->
  ``campaign.utm_{source,medium,campaign,term,content}``, ``context.page.referrer`` ->
  ``campaign.referrer``; the call's time (``timestamp``, else ``originalTimestamp``,
  ``sentAt``, ``receivedAt``) -> ``modified_time``.
* Track, page, screen and alias calls are refused (``invalid_record`` naming ``type``):
  ``moesif-beam actions`` delivers track calls.

A call becomes one record ``{"users": [...], "companies": [...]}`` keyed by the
``transaction_id`` the actions' Segment format derives from ``messageId``, so a replayed
call is a duplicate. Pure functions; no Beam, no I/O.
"""

from __future__ import annotations

from typing import Any

from moesif_beam.transforms.common.errors import InvalidRecord, json_type
from moesif_beam.transforms.common.timefmt import format_time_ms
from moesif_beam.transforms.formats import segment
from moesif_beam.transforms.formats.moesif_actions import (
    optional_id,
    optional_object,
    parse_time,
)
from moesif_beam.transforms.schema.keys import sanitize_keys

__all__ = ["to_profile_upserts"]

_TIME_FIELDS = ("timestamp", "originalTimestamp", "sentAt", "receivedAt")

_CAMPAIGN = {
    "source": "utm_source",
    "medium": "utm_medium",
    "name": "utm_campaign",
    "term": "utm_term",
    "content": "utm_content",
}

# Segment's reserved traits whose Moesif counterpart is a reserved metadata key.
_RESERVED = {"firstName": "first_name", "lastName": "last_name"}


def to_profile_upserts(
    value: Any, company_id_field: str | None = None
) -> tuple[str, int | None, dict[str, Any]]:
    """Map one Segment identify or group call to Moesif upserts.

    Args:
        value: one parsed Segment call (an item of the Segment format's ``split``).
        company_id_field: for identify calls naming no company, the trait whose value
            (a string or number) becomes ``company_id``.

    Returns:
        ``(transaction_id, time_ms or None, {"users": [...], "companies": [...]})``.

    Raises:
        InvalidRecord: not an object, not an identify or group call, no ``userId`` on an
            identify, no ``groupId`` on a group, or a field of the wrong type.
    """
    if not isinstance(value, dict):
        actual = json_type(value)
        msg = f"a Segment call is a JSON object, got {actual}"
        raise InvalidRecord(msg, "", "object", actual)
    kind = value.get("type")
    if not isinstance(kind, str) or kind.lower() not in ("identify", "group"):
        shown = kind if isinstance(kind, str) else json_type(kind)
        msg = (
            f"only identify and group calls become users and companies; this is {shown!r} "
            "(track calls go to moesif-beam actions)"
        )
        raise InvalidRecord(msg, "type")
    traits = optional_object(value.get("traits"), "traits")
    context = optional_object(value.get("context"), "context")
    time_ms = _time(value)
    common = _common(context, time_ms)
    user_id = optional_id(value.get("userId"), "userId")
    upserts: dict[str, Any] = {"users": [], "companies": []}
    if kind.lower() == "identify":
        if user_id is None:
            msg = "an identify call without userId (Moesif users need a user_id)"
            raise InvalidRecord(msg, "userId")
        user: dict[str, Any] = {"user_id": user_id}
        company_id = _company_of(traits, context, company_id_field)
        if company_id is not None:
            user["company_id"] = company_id
        user.update(common)
        agent = _string(context.get("userAgent"), "context.userAgent")
        if agent:
            user["user_agent_string"] = agent
        user["metadata"] = _metadata(traits)
        upserts["users"].append(user)
    else:
        group_id = optional_id(value.get("groupId"), "groupId")
        if group_id is None:
            msg = "a group call without groupId"
            raise InvalidRecord(msg, "groupId")
        company: dict[str, Any] = {"company_id": group_id}
        website = _string(traits.get("website"), "traits.website")
        if website:
            company["company_domain"] = website
        company.update(common)
        company["metadata"] = _metadata(traits)
        upserts["companies"].append(company)
        if user_id is not None:
            upserts["users"].append({"user_id": user_id, "company_id": group_id})
    # The id rule of the Segment actions format: a replayed call keeps its id.
    return segment._transaction_id(value), time_ms, upserts


def _time(call: dict[str, Any]) -> int | None:
    for field in _TIME_FIELDS:
        when = call.get(field)
        if when is not None and when != "":
            return parse_time(when, field)
    return None


def _string(value: Any, field: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        msg = f"{field} must be a string"
        raise InvalidRecord(msg, field, "string", json_type(value))
    return value


def _common(context: dict[str, Any], time_ms: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ip = _string(context.get("ip"), "context.ip")
    if ip:
        out["ip_address"] = ip
    campaign = {}
    raw = optional_object(context.get("campaign"), "context.campaign")
    for key, target in _CAMPAIGN.items():
        text = _string(raw.get(key), f"context.campaign.{key}")
        if text:
            campaign[target] = text
    page = optional_object(context.get("page"), "context.page")
    referrer = _string(page.get("referrer"), "context.page.referrer")
    if referrer:
        campaign["referrer"] = referrer
    if campaign:
        out["campaign"] = campaign
    if time_ms is not None:
        out["modified_time"] = format_time_ms(time_ms)
    return out


def _company_of(
    traits: dict[str, Any], context: dict[str, Any], company_id_field: str | None
) -> str | None:
    company = traits.get("company")
    if isinstance(company, dict):
        found = optional_id(company.get("id"), "traits.company.id")
        if found is not None:
            return found
    found = optional_id(traits.get("company_id"), "traits.company_id")
    if found is not None:
        return found
    found = optional_id(context.get("groupId"), "context.groupId")
    if found is not None:
        return found
    if company_id_field:
        value = traits.get(company_id_field)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    return None


def _metadata(traits: dict[str, Any]) -> dict[str, Any]:
    metadata = {_RESERVED.get(key, key): value for key, value in traits.items()}
    return sanitize_keys(metadata) if metadata else {}
