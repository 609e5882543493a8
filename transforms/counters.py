"""Counter names shared by every stage, the end-of-run summary and ``--metrics_out``.

A completed bounded run satisfies ``read == sent + duplicates + dead_letters``.
"""

from __future__ import annotations

from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import Metrics as _MetricsType

__all__ = ["COUNTERS", "EXTRA_COUNTERS", "NAMESPACE", "counter"]

NAMESPACE = "moesif_beam"

# The contract (DESIGN.md): these keys always appear in --metrics_out, zero or not.
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
# Break-downs of dead_letters that have no contract counter of their own.
EXTRA_COUNTERS = ("too_large", "retries_exhausted")


def counter(name: str) -> _MetricsType.DelegatingCounter:
    """Return the Beam counter ``name`` in the moesif-beam namespace."""
    return Metrics.counter(NAMESPACE, name)
