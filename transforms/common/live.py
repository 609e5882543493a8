"""What the sink measures beyond counters, kept in this process: post latency, batches in flight.

Beam's metrics have counters, distributions (count, sum, min, max) and gauges, but no
histogram, and its gauges are last-value-wins per step. The launcher's Prometheus endpoint
(``--metrics_port``, runners/metrics.py) wants a latency histogram and a count of batches
being delivered right now, so the sink also records both here, in this process:

- :func:`observe_post`: the seconds one POST of a batch body took, by outcome (``2xx``,
  ``3xx``, ``4xx``, ``5xx``, or ``no_response`` for connection errors and timeouts). Every
  attempt counts: retries, and the halves of a split or bisected batch.
- :func:`delivering`: a context manager around the delivery of one batch (compression,
  every attempt and the waits between them).

Like the in-process tally of :mod:`.counters`, these reach the endpoint only where the
workers run in the launcher's process (moesif-beam's default runners); elsewhere they are
kept and never read. Recording is a lock and a few integer additions: thread-safe, and
cheap next to a POST. Nothing here imports the Prometheus client.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "OUTCOMES",
    "POST_SECONDS_BUCKETS",
    "LatencySnapshot",
    "delivering",
    "forward_from_here",
    "in_flight",
    "in_flight_elsewhere",
    "observe_post",
    "outcome_of",
    "post_latency",
    "take_forwarded",
]

# Upper bounds, in seconds, of the latency histogram's buckets (+Inf is implied). A
# loopback collector answers in milliseconds; Moesif in tens to hundreds; a struggling one
# up to the request timeout (30 s by default).
POST_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OUTCOMES = ("2xx", "3xx", "4xx", "5xx", "no_response")


def outcome_of(status: int | None) -> str:
    """The outcome label of an HTTP status; ``no_response`` for None (no answer)."""
    if status is None or not 200 <= status <= 599:
        return "no_response"
    return f"{status // 100}xx"


@dataclass(frozen=True)
class LatencySnapshot:
    """One outcome's latency histogram at a point in time.

    Attributes:
        buckets: observations per bucket, not cumulative; one more than
            :data:`POST_SECONDS_BUCKETS` (the last is over the largest bound).
        total: the sum of the observed seconds.
    """

    buckets: tuple[int, ...]
    total: float

    @property
    def count(self) -> int:
        """How many observations."""
        return sum(self.buckets)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as Prometheus exposes them, ``+Inf`` last."""
        out, running = [], 0
        for bound, n in zip((*map(str, POST_SECONDS_BUCKETS), "+Inf"), self.buckets, strict=True):
            running += n
            out.append((bound, running))
        return out

    def minus(self, earlier: LatencySnapshot | None) -> LatencySnapshot:
        """What was observed since ``earlier`` (a snapshot of the same histogram)."""
        if earlier is None:
            return self
        buckets = tuple(a - b for a, b in zip(self.buckets, earlier.buckets, strict=True))
        return LatencySnapshot(buckets, self.total - earlier.total)


class _Histogram:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, list[int]] = {}
        self._totals: dict[str, float] = {}

    def observe(self, seconds: float, outcome: str) -> None:
        index = bisect.bisect_left(POST_SECONDS_BUCKETS, seconds)
        with self._lock:
            buckets = self._buckets.get(outcome)
            if buckets is None:
                buckets = self._buckets[outcome] = [0] * (len(POST_SECONDS_BUCKETS) + 1)
            buckets[index] += 1
            self._totals[outcome] = self._totals.get(outcome, 0.0) + seconds

    def snapshot(self) -> dict[str, LatencySnapshot]:
        with self._lock:
            return {
                outcome: LatencySnapshot(tuple(buckets), self._totals[outcome])
                for outcome, buckets in self._buckets.items()
            }


_POST_SECONDS = _Histogram()
_IN_FLIGHT = 0
_IN_FLIGHT_LOCK = threading.Lock()


# In a worker process that delivers for another (transforms/common/in_workers.py): the
# POSTs observed here since that process last took them, for it to observe in its turn.
_FORWARD: list[tuple[float, int | None]] | None = None
_FORWARD_LOCK = threading.Lock()
# Batches in flight in such worker processes, by worker, as they last reported.
_ELSEWHERE: dict[Any, int] = {}


def observe_post(seconds: float, status: int | None) -> None:
    """Record one POST that took ``seconds`` and got ``status`` (None: no answer)."""
    _POST_SECONDS.observe(max(0.0, seconds), outcome_of(status))
    forward = _FORWARD
    if forward is not None:
        with _FORWARD_LOCK:
            forward.append((seconds, status))


def forward_from_here() -> None:
    """Keep this process's POSTs for :func:`take_forwarded` too (a delivering worker's)."""
    global _FORWARD  # noqa: PLW0603 - set once, as the worker starts
    _FORWARD = []


def take_forwarded() -> list[tuple[float, int | None]]:
    """The POSTs observed since the last call, ``(seconds, status)``, oldest first."""
    forward = _FORWARD
    if not forward:
        return []
    with _FORWARD_LOCK:
        taken = forward[:]
        forward.clear()
    return taken


def in_flight_elsewhere(worker: Any, batches: int | None) -> None:
    """What ``worker``, a process delivering for this one, has in flight (None: it ended)."""
    with _IN_FLIGHT_LOCK:
        if batches is None:
            _ELSEWHERE.pop(worker, None)
        else:
            _ELSEWHERE[worker] = batches


def post_latency() -> dict[str, LatencySnapshot]:
    """Every POST this process made so far, by outcome (only outcomes that occurred)."""
    return _POST_SECONDS.snapshot()


@contextlib.contextmanager
def delivering() -> Iterator[None]:
    """Count one batch as in flight while inside, whatever way the delivery ends."""
    global _IN_FLIGHT  # noqa: PLW0603 - one process-wide gauge, under its lock
    with _IN_FLIGHT_LOCK:
        _IN_FLIGHT += 1
    try:
        yield
    finally:
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT -= 1


def in_flight() -> int:
    """Batches being delivered right now, here and in the worker processes delivering for it."""
    with _IN_FLIGHT_LOCK:
        return _IN_FLIGHT + sum(_ELSEWHERE.values())
