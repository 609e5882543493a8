"""Counter names shared by every stage, the end-of-run summary and ``--metrics_out``.

A completed bounded run satisfies ``read == sent + duplicates + dead_letters``.

Each counter is a Beam metric and, in addition, a tally kept in this process. Runners
report the Beam metrics (committed values exclude retried bundles). The in-process tally
is exact when every worker runs in this process, as in moesif-beam's default streaming
setup (Prism with LOOPBACK workers), where the runner's final metrics were measured to
miss a bundle now and then. Where a local run's workers are processes of their own, each
publishes its tally for the launcher to sum (:mod:`.worker_tallies`), from a thread that
starts when the worker makes its first counter: counting itself is the same either way.
"""

from __future__ import annotations

import threading
from collections import Counter

from apache_beam.metrics import Metrics

__all__ = [
    "COUNTERS",
    "EXTRA_COUNTERS",
    "NAMESPACE",
    "PROGRESS_COUNTERS",
    "counter",
    "local_tally",
    "tally_names",
    "tally_snapshot",
]

NAMESPACE = "moesif_beam"

# The contract (docs/design.md, Contracts): these keys always appear in --metrics_out, zero or not.
COUNTERS = (
    "read",
    "parse_errors",
    "invalid",
    "type_conflicts",
    "duplicates",
    "sent",
    "batches",
    "bytes_sent",
    "retries",
    "collector_rejected",
    "dead_letters",
)
# Break-downs of dead_letters that have no contract counter of their own,
# ``timeouts``: requests that got no answer within --http_timeout after their body was sent
# (delivery unknown; re-posted with the same transaction ids), and ``skipped``: lines that
# hold no records and are no error (CloudWatch Logs control messages), not in ``read``.
EXTRA_COUNTERS = (
    "too_large",
    "retries_exhausted",
    "internal_errors",
    "unreadable_inputs",
    "timeouts",
    "skipped",
)

# Counted for the progress line only: in neither the summary nor --metrics_out.
PROGRESS_COUNTERS = ("bytes_read",)

_TALLY: Counter[str] = Counter()
_TALLY_LOCK = threading.Lock()


class _Counter:
    """A Beam counter that also adds to this process's tally."""

    __slots__ = ("_beam", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._beam = Metrics.counter(NAMESPACE, name)
        # In a worker process of a run that reads its workers' tallies, the first counter
        # starts the publisher; elsewhere, and after that, a comparison of pids.
        from moesif_beam.transforms.common.worker_tallies import (  # noqa: PLC0415 - cycle
            publish_from_this_worker,
        )

        publish_from_this_worker()

    def __reduce__(self) -> tuple[object, tuple[str]]:
        # Made anew where it is unpickled (a worker), so that __init__ runs there.
        return (counter, (self._name,))

    def inc(self, n: int = 1) -> None:
        self._beam.inc(n)
        with _TALLY_LOCK:
            _TALLY[self._name] += n


def counter(name: str) -> _Counter:
    """Return the counter ``name`` in the moesif-beam namespace."""
    return _Counter(name)


def local_tally(*extra: str) -> dict[str, int]:
    """What this process's workers counted, every counter present (and ``extra`` ones)."""
    with _TALLY_LOCK:
        return {name: _TALLY.get(name, 0) for name in (*COUNTERS, *EXTRA_COUNTERS, *extra)}


def tally_snapshot() -> dict[str, int]:
    """Every counter this process's workers have counted so far, with its count."""
    with _TALLY_LOCK:
        return dict(_TALLY)


def tally_names() -> tuple[str, ...]:
    """Every counter this process's workers have counted so far, sorted."""
    with _TALLY_LOCK:
        return tuple(sorted(_TALLY))
