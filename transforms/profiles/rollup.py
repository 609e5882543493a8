"""Per-user and per-company rollups of API traffic, as pure, mergeable functions.

A normalized Moesif record (an API event or an action) becomes one :class:`Touch` per
profile it belongs to (its user, its company). Touches fold into a :class:`Rollup`
accumulator; accumulators merge. Every field of a rollup is a minimum, a maximum, a sum
or a multiset, and ties are broken by the transaction id, so the result of folding a set
of touches does not depend on their order or on how they were split between workers.

No Beam and no I/O here, except :class:`RollupCombineFn`, which only wraps these
functions in Beam's ``CombineFn`` shape.
"""

from __future__ import annotations

import math
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import apache_beam as beam

from moesif_beam.transforms.common.timefmt import parse_time_ms

__all__ = [
    "DAY_MS",
    "TOP_ROUTES",
    "Rollup",
    "RollupCombineFn",
    "Touch",
    "add_touch",
    "fold",
    "merge_rollups",
    "nearest_rank",
    "route_of",
    "touches_of",
]

DAY_MS = 86_400_000

# How many routes ``top_routes`` lists.
TOP_ROUTES = 5


class Touch(NamedTuple):
    """One record, as it counts toward one profile.

    Attributes:
        time_ms: the request time, epoch milliseconds.
        transaction_id: breaks ties between touches of the same millisecond.
        ip: the client IP, if the record has one.
        user_agent: the client's User-Agent, if the record has one.
        user_id / company_id: the record's user and company (either may be None).
        status: the HTTP status of an API call; None for an action.
        latency_ms: response time minus request time, for API calls with a response.
        route: ``VERB path`` of an API call (see :func:`route_of`); None for an action.
    """

    time_ms: int
    transaction_id: str
    ip: str | None = None
    user_agent: str | None = None
    user_id: str | None = None
    company_id: str | None = None
    status: int | None = None
    latency_ms: int | None = None
    route: str | None = None


# (time_ms, transaction_id, value): the latest wins, ties by transaction id, then value.
_Stamped = tuple[int, str, str]


def _later(a: _Stamped | None, b: _Stamped | None) -> _Stamped | None:
    if a is None:
        return b
    if b is None:
        return a
    # The whole tuple: equal times and ids (not expected after dedup) fall to the value, so
    # the winner is a function of the set, never of the order.
    return a if a >= b else b


def _min(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _max(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


@dataclass
class Rollup:
    """What is known about one user or company, as of some time.

    All-time fields (``first_seen`` ... ``first_success``) cover every touch folded in;
    the window fields (``calls`` ... ``routes``) only the touches inside the window the
    caller chose (see :func:`add_touch`).

    Attributes:
        first_seen / last_seen: the earliest and latest request time, epoch ms.
        ip / user_agent: the latest non-empty value, with its time and transaction id.
        user_id / company_id: the latest user (for a company) or company (for a user).
        first_call / first_success: the earliest API call, and the earliest 2xx one.
        calls: API calls in the window; ``errors``: those answered >= 400 (or with no
            HTTP status at all, as a gateway fault).
        latencies: latency in whole ms -> number of calls in the window.
        routes: route -> number of calls in the window.
    """

    first_seen: int | None = None
    last_seen: int | None = None
    ip: _Stamped | None = None
    user_agent: _Stamped | None = None
    user_id: _Stamped | None = None
    company_id: _Stamped | None = None
    first_call: int | None = None
    first_success: int | None = None
    calls: int = 0
    errors: int = 0
    latencies: Counter[int] = field(default_factory=Counter)
    routes: Counter[str] = field(default_factory=Counter)

    def ttfhw_s(self) -> int | None:
        """Whole seconds from the first API call to the first 2xx one; None before one."""
        if self.first_success is None or self.first_call is None:
            return None
        return (self.first_success - self.first_call) // 1000

    def latency_percentile(self, fraction: float) -> int:
        """The ``fraction`` percentile of the window's latencies (0 when there are none)."""
        return nearest_rank(self.latencies, fraction)

    def top_routes(self, n: int = TOP_ROUTES) -> list[dict[str, Any]]:
        """The ``n`` most called routes in the window, most calls first, ties by route."""
        ranked = sorted(self.routes.items(), key=lambda item: (-item[1], item[0]))
        return [{"route": route, "calls": calls} for route, calls in ranked[:n]]


def nearest_rank(counts: Counter[int], fraction: float) -> int:
    """The nearest-rank percentile of a multiset given as value -> count; 0 if empty.

    The smallest value ``v`` such that at least ``ceil(fraction * n)`` values are <= ``v``
    (at least one), so the result is always one of the values.
    """
    total = sum(counts.values())
    if total == 0:
        return 0
    rank = max(1, math.ceil(fraction * total))
    seen = 0
    for value in sorted(counts):
        seen += counts[value]
        if seen >= rank:
            return value
    return max(counts)  # unreachable: the loop reaches total >= rank


def _is_success(status: int | None) -> bool:
    return status is not None and 200 <= status <= 299


def _is_error(status: int) -> bool:
    # WSO2 writes -1 or 0 for a fault with no backend response: no answer is an error too.
    return status >= 400 or status < 100


def add_touch(rollup: Rollup, touch: Touch, in_window: bool) -> Rollup:
    """Fold one touch into ``rollup`` (mutated and returned).

    ``in_window`` says whether the touch falls in the window the caller computes
    ``last24HourAggResults`` over; all-time fields take every touch.
    """
    t, tid = touch.time_ms, touch.transaction_id
    rollup.first_seen = _min(rollup.first_seen, t)
    rollup.last_seen = _max(rollup.last_seen, t)
    if touch.ip:
        rollup.ip = _later(rollup.ip, (t, tid, touch.ip))
    if touch.user_agent:
        rollup.user_agent = _later(rollup.user_agent, (t, tid, touch.user_agent))
    if touch.user_id:
        rollup.user_id = _later(rollup.user_id, (t, tid, touch.user_id))
    if touch.company_id:
        rollup.company_id = _later(rollup.company_id, (t, tid, touch.company_id))
    if touch.status is None:
        return rollup  # an action: seen, but not an API call
    rollup.first_call = _min(rollup.first_call, t)
    if _is_success(touch.status):
        rollup.first_success = _min(rollup.first_success, t)
    if in_window:
        rollup.calls += 1
        if _is_error(touch.status):
            rollup.errors += 1
        if touch.latency_ms is not None:
            rollup.latencies[touch.latency_ms] += 1
        if touch.route:
            rollup.routes[touch.route] += 1
    return rollup


def merge_rollups(rollups: Any) -> Rollup:
    """One rollup holding everything the given ones hold (a new object)."""
    out = Rollup()
    for r in rollups:
        out.first_seen = _min(out.first_seen, r.first_seen)
        out.last_seen = _max(out.last_seen, r.last_seen)
        out.ip = _later(out.ip, r.ip)
        out.user_agent = _later(out.user_agent, r.user_agent)
        out.user_id = _later(out.user_id, r.user_id)
        out.company_id = _later(out.company_id, r.company_id)
        out.first_call = _min(out.first_call, r.first_call)
        out.first_success = _min(out.first_success, r.first_success)
        out.calls += r.calls
        out.errors += r.errors
        out.latencies.update(r.latencies)
        out.routes.update(r.routes)
    return out


def in_window(time_ms: int, as_of_ms: int) -> bool:
    """Whether a request time falls in the 24 hours ending at ``as_of_ms`` (end included)."""
    return as_of_ms - DAY_MS < time_ms <= as_of_ms


def fold(touches: Any, as_of_ms: int) -> Rollup:
    """The rollup of ``touches`` as of ``as_of_ms``; touches after it are left out."""
    rollup = Rollup()
    for touch in touches:
        if touch.time_ms <= as_of_ms:
            add_touch(rollup, touch, in_window(touch.time_ms, as_of_ms))
    return rollup


def _header(headers: Any, name: str) -> str | None:
    if not isinstance(headers, dict):
        return None
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name and isinstance(value, str) and value:
            return value
    return None


def route_of(record: dict[str, Any]) -> str | None:
    """``VERB path`` of an API event: the route ``top_routes`` counts.

    The path is the gateway's resource template where the record names one (WSO2's
    ``apiContext`` + ``apiResourceTemplate`` in metadata, so ``/items/{itemId}`` is one
    route; API Gateway's ``resourcePath``, ``/orders/{id}``), else the request URI's path
    without host or query.
    """
    request = record.get("request")
    if not isinstance(request, dict):
        return None
    verb = request.get("verb")
    metadata = record.get("metadata")
    path = None
    if isinstance(metadata, dict):
        context = metadata.get("apiContext")
        template = metadata.get("apiResourceTemplate")
        if isinstance(context, str) and isinstance(template, str) and context and template:
            path = context.rstrip("/") + "/" + template.lstrip("/")
        resource = metadata.get("resourcePath")
        if path is None and isinstance(resource, str) and resource.startswith("/"):
            path = resource
    if path is None:
        uri = request.get("uri")
        if not isinstance(uri, str) or not uri:
            return None
        path = urllib.parse.urlsplit(uri).path or "/"
    return f"{verb} {path}" if isinstance(verb, str) and verb else path


def _time(value: Any) -> int | None:
    try:
        return parse_time_ms(value)
    except ValueError:
        return None


def _string(value: Any) -> str | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) and value else None


def touches_of(transaction_id: str, time_ms: int, record: dict[str, Any]) -> Touch:
    """The touch of one normalized Moesif event or action (``time_ms`` its request time).

    API events (records with a ``response``) carry a status, latency and route; actions
    carry none of them.
    """
    request = record.get("request")
    request = request if isinstance(request, dict) else {}
    response = record.get("response")
    status = latency = route = None
    if isinstance(response, dict):
        raw_status = response.get("status")
        if isinstance(raw_status, int) and not isinstance(raw_status, bool):
            status = raw_status
        answered = _time(response.get("time"))
        if answered is not None:
            latency = max(0, answered - time_ms)
        route = route_of(record)
    user_agent = _string(request.get("user_agent_string")) or _header(
        request.get("headers"), "user-agent"
    )
    return Touch(
        time_ms=time_ms,
        transaction_id=transaction_id,
        ip=_string(request.get("ip_address")),
        user_agent=user_agent,
        user_id=_string(record.get("user_id")),
        company_id=_string(record.get("company_id")),
        status=status if isinstance(response, dict) else None,
        latency_ms=latency,
        route=route,
    )


class RollupCombineFn(beam.CombineFn):
    """``(Touch, in_window)`` pairs to one :class:`Rollup` per key; order-independent."""

    def create_accumulator(self) -> Rollup:
        return Rollup()

    def add_input(self, accumulator: Rollup, element: tuple[Touch, bool]) -> Rollup:
        touch, inside = element
        return add_touch(accumulator, touch, inside)

    def merge_accumulators(self, accumulators: Any) -> Rollup:
        return merge_rollups(accumulators)

    def extract_output(self, accumulator: Rollup) -> Rollup:
        return accumulator
