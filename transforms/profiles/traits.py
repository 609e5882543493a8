"""From a rollup to what is sent: Moesif user/company upserts and Segment identify/group calls.

Pure functions. The traits are the ones the Segment source pages for Moesif list
(``firstSeenTime``, ``lastSeenTime``, ``last24HourAggResults``, company ``ttfhw_s`` ...);
the keys inside ``last24HourAggResults`` are this project's own, since Moesif publishes
none. In Moesif, the derived traits live under one metadata key, :data:`METADATA_KEY`,
so Moesif's recursive merge leaves the customer's own metadata alone.
"""

from __future__ import annotations

import uuid
from typing import Any, NamedTuple

import orjson

from moesif_beam import __version__
from moesif_beam.transforms.common.timefmt import format_time_ms
from moesif_beam.transforms.profiles.rollup import Rollup

__all__ = [
    "KINDS",
    "MESSAGE_NAMESPACE",
    "METADATA_KEY",
    "Profile",
    "aggregates",
    "company_traits",
    "company_upsert",
    "group_call",
    "identify_call",
    "message_id",
    "user_upsert",
]

# The metadata key the derived traits live under in Moesif.
METADATA_KEY = "moesif_beam"

# The two kinds of profile, as Moesif's batch endpoints name them.
KINDS = ("users", "companies")

# Namespace of Segment messageIds: uuid5 of the call's canonical JSON. Fixed forever, so a
# re-run sends the same ids and Segment's dedup drops the repeats.
MESSAGE_NAMESPACE = uuid.UUID("0f6b8f1e-5d0a-4c55-9a43-6b3f2a8e7d11")

_LIBRARY = {"name": "moesif-beam", "version": __version__}


class Profile(NamedTuple):
    """One user's or company's rollup as of ``as_of_ms``."""

    kind: str  # "users" or "companies"
    id: str
    as_of_ms: int
    rollup: Rollup


def aggregates(rollup: Rollup) -> dict[str, Any]:
    """``last24HourAggResults``: the API calls of the 24 hours ending at "as of".

    ``calls`` counts them, ``errors`` those answered >= 400 or not answered; latencies are
    nearest-rank percentiles in whole milliseconds (0 when there were no calls);
    ``top_routes`` lists up to five ``{"route", "calls"}``, most calls first.
    """
    return {
        "calls": rollup.calls,
        "errors": rollup.errors,
        "latency_p50_ms": rollup.latency_percentile(0.5),
        "latency_p90_ms": rollup.latency_percentile(0.9),
        "top_routes": rollup.top_routes(),
    }


def _value(stamped: tuple[int, str, str] | None) -> str | None:
    return None if stamped is None else stamped[2]


def _seen(rollup: Rollup) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    if rollup.first_seen is not None:
        seen["firstSeenTime"] = format_time_ms(rollup.first_seen)
    if rollup.last_seen is not None:
        seen["lastSeenTime"] = format_time_ms(rollup.last_seen)
    return seen


def _derived(profile: Profile) -> dict[str, Any]:
    derived = _seen(profile.rollup)
    if profile.kind == "companies":
        ttfhw = profile.rollup.ttfhw_s()
        if ttfhw is not None:
            derived["ttfhw_s"] = ttfhw
    derived["last24HourAggResults"] = aggregates(profile.rollup)
    derived["asOfTime"] = format_time_ms(profile.as_of_ms)
    return derived


def user_upsert(profile: Profile) -> dict[str, Any]:
    """The ``/v1/users/batch`` item of a user profile."""
    rollup = profile.rollup
    item: dict[str, Any] = {"user_id": profile.id}
    company_id = _value(rollup.company_id)
    if company_id:
        item["company_id"] = company_id
    if rollup.ip:
        item["ip_address"] = _value(rollup.ip)
    if rollup.user_agent:
        item["user_agent_string"] = _value(rollup.user_agent)
    item["modified_time"] = format_time_ms(profile.as_of_ms)
    item["metadata"] = {METADATA_KEY: _derived(profile)}
    return item


def company_upsert(profile: Profile) -> dict[str, Any]:
    """The ``/v1/companies/batch`` item of a company profile (companies have no user agent)."""
    rollup = profile.rollup
    item: dict[str, Any] = {"company_id": profile.id}
    if rollup.ip:
        item["ip_address"] = _value(rollup.ip)
    item["modified_time"] = format_time_ms(profile.as_of_ms)
    item["metadata"] = {METADATA_KEY: _derived(profile)}
    return item


def company_traits(profile: Profile) -> dict[str, Any]:
    """The seed documents' company object: ``id``, seen times, ``ipAddress``, ``ttfhw_s``..."""
    rollup = profile.rollup
    traits: dict[str, Any] = {"id": profile.id, **_seen(rollup)}
    if rollup.ip:
        traits["ipAddress"] = _value(rollup.ip)
    ttfhw = rollup.ttfhw_s()
    if ttfhw is not None:
        traits["ttfhw_s"] = ttfhw
    traits["modifiedTime"] = format_time_ms(profile.as_of_ms)
    return traits


def message_id(call: dict[str, Any]) -> str:
    """A deterministic messageId: the uuid5 of the call's canonical JSON (without one).

    The same profile as of the same time gives the same id, so a re-run or a retried
    bundle collapses in Segment's dedup; a changed profile gets a new id. The library's
    name and version in ``context`` are left out: a re-run after an upgrade is a re-run.
    """
    kept = {k: v for k, v in call.items() if k != "messageId"}
    context = kept.get("context")
    if isinstance(context, dict) and "library" in context:
        kept["context"] = {k: v for k, v in context.items() if k != "library"}
    canonical = orjson.dumps(kept, option=orjson.OPT_SORT_KEYS)
    return str(uuid.uuid5(MESSAGE_NAMESPACE, canonical.decode("utf-8")))


def _context(rollup: Rollup) -> dict[str, Any]:
    context: dict[str, Any] = {"library": dict(_LIBRARY)}
    if rollup.ip:
        context["ip"] = _value(rollup.ip)
    if rollup.user_agent:
        context["userAgent"] = _value(rollup.user_agent)
    return context


def identify_call(user: Profile, company: Profile | None) -> dict[str, Any]:
    """Segment ``identify`` for a user, shaped as the Moesif source sends it.

    ``traits.company`` is the full company object when the user's company has a profile
    in the same update, else ``{"id": ...}`` alone; absent without a company.
    """
    rollup = user.rollup
    traits: dict[str, Any] = {"id": user.id, **_seen(rollup)}
    company_id = _value(rollup.company_id)
    if company is not None:
        traits["company"] = company_traits(company)
    elif company_id:
        traits["company"] = {"id": company_id}
    traits["last24HourAggResults"] = aggregates(rollup)
    if rollup.user_agent:
        traits["userAgent"] = {"userAgentString": _value(rollup.user_agent)}
    traits["modifiedTime"] = format_time_ms(user.as_of_ms)
    call: dict[str, Any] = {
        "type": "identify",
        "userId": user.id,
        "timestamp": format_time_ms(user.as_of_ms),
        "context": _context(rollup),
        "traits": traits,
    }
    call["messageId"] = message_id(call)
    return call


def group_call(company: Profile) -> dict[str, Any]:
    """Segment ``group`` for a company: ``groupId`` and the company object as traits.

    Segment needs a user or an anonymous id on every call: the company's latest user,
    else ``anonymousId`` ``company:<id>``.
    """
    rollup = company.rollup
    traits = company_traits(company)
    traits["last24HourAggResults"] = aggregates(rollup)
    call: dict[str, Any] = {"type": "group", "groupId": company.id}
    user_id = _value(rollup.user_id)
    if user_id:
        call["userId"] = user_id
    else:
        call["anonymousId"] = f"company:{company.id}"
    call["timestamp"] = format_time_ms(company.as_of_ms)
    call["context"] = _context(rollup)
    call["traits"] = traits
    call["messageId"] = message_id(call)
    return call
