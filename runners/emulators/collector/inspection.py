"""Inspection without auth: what the emulator saw, for tests and benchmarks.

Arrival lags and their percentiles (``arrival_lag_ms`` in the stats), the page of stored
records ``GET /_emulator/records`` answers, and the ``--inspect`` client that prints a running
emulator's stats and records.
"""

from __future__ import annotations

import json
import sys
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from moesif_beam.runners.emulators.collector.state import _Collector


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


_DEFAULT_RECORDS_LIMIT: Final = 100


def _records_page(collector: _Collector, path: str) -> list[Any]:
    """The stored records ``GET /_emulator/records?kind=&limit=&offset=`` asks for.

    Raises:
        ValueError: If the query is invalid (the message is the 400 answer's error).
    """
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
    kind = query.get("kind", ["events"])[-1]
    try:
        limit = int(query.get("limit", [str(_DEFAULT_RECORDS_LIMIT)])[-1])
        offset = int(query.get("offset", ["0"])[-1])
    except ValueError:
        msg = "limit and offset must be integers"
        raise ValueError(msg) from None
    if limit < 0 or offset < 0:
        msg = "limit and offset must be >= 0"
        raise ValueError(msg)
    return collector.records(kind, limit, offset)


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
