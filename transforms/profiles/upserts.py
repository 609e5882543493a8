"""Segment identify/group calls (``--format segment``) to one Moesif upsert per user/company.

Moesif merges upserts recursively, so the order in which a user's upserts arrive decides
what wins. A bounded run therefore merges every call's upsert for one id itself, in the
calls' time order (ties by transaction id), with Moesif's own rule, and sends the result
once: the outcome does not depend on input order, parallelism or batching. A stream sends
each call's upserts as they come (Moesif merges them in arrival order).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import apache_beam as beam
import orjson
from apache_beam import pvalue

from moesif_beam.transforms.common.counters import counter
from moesif_beam.transforms.records import Keyed
from moesif_beam.transforms.schema.rule import NO_TIME

__all__ = ["MergeUpserts", "SplitUpserts", "UpsertCombineFn", "merge_upserts", "recursive_merge"]

ACKS = "acks"

# (time_ms, transaction_id, upsert)
_Stamped = tuple[int, str, dict[str, Any]]


def recursive_merge(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Moesif's upsert rule: ``new`` wins, nested objects merge, arrays are replaced.

    A null in ``new`` keeps the old value (SDKs send null for "not set").
    """
    merged = dict(old)
    for key, value in new.items():
        if value is None and key in merged:
            continue
        previous = merged.get(key)
        if isinstance(value, dict) and isinstance(previous, dict):
            merged[key] = recursive_merge(previous, value)
        else:
            merged[key] = value
    return merged


def merge_upserts(stamped: list[_Stamped]) -> dict[str, Any]:
    """Merge one id's upserts in time order (ties by transaction id), oldest first.

    Calls without a time come first, as the oldest: nothing says they are recent. Equal
    times and ids (not expected after dedup) are ordered by content, so the result is
    still a function of the set.
    """
    result: dict[str, Any] = {}
    ordered = sorted(
        stamped, key=lambda s: (s[0], s[1], orjson.dumps(s[2], option=orjson.OPT_SORT_KEYS))
    )
    for _, _, upsert in ordered:
        result = recursive_merge(result, upsert)
    return result


class UpsertCombineFn(beam.CombineFn):
    """Stamped upserts of one id to the merged upsert; order-independent."""

    def create_accumulator(self) -> list[_Stamped]:
        return []

    def add_input(self, accumulator: list[_Stamped], element: _Stamped) -> list[_Stamped]:
        accumulator.append(element)
        return accumulator

    def merge_accumulators(self, accumulators: Any) -> list[_Stamped]:
        return [item for acc in accumulators for item in acc]

    def extract_output(self, accumulator: list[_Stamped]) -> dict[str, Any]:
        return merge_upserts(accumulator)


_ID_FIELD = {"users": "user_id", "companies": "company_id"}


class _SplitFn(beam.DoFn):
    def __init__(self, acks: bool) -> None:
        self._acks = acks
        self._sent = counter("sent")

    def process(self, element: Keyed) -> Iterator[Any]:
        transaction_id, record = element
        self._sent.inc()
        if self._acks and record.ack is not None:
            yield pvalue.TaggedOutput(ACKS, record.ack)
        when = -1 if record.time_ms == NO_TIME else record.time_ms
        upserts = orjson.loads(record.body)
        for kind, id_field in _ID_FIELD.items():
            for upsert in upserts.get(kind, ()):
                yield (kind, upsert[id_field]), (when, transaction_id, upsert)


class Split(NamedTuple):
    """Outputs of :class:`SplitUpserts`."""

    upserts: beam.PCollection  # ((kind, id), (time_ms, transaction_id, upsert))
    acks: beam.PCollection


class SplitUpserts(beam.PTransform):
    """Records of ``--format segment`` to stamped upserts keyed by ``(kind, id)``.

    Every record is counted once in ``sent`` (taken in); with ``acks``, its Kafka token is
    output then.
    """

    def __init__(self, *, acks: bool = False) -> None:
        super().__init__()
        self._acks = acks

    def expand(self, records: beam.PCollection) -> Split:
        out = records | "Split" >> beam.ParDo(_SplitFn(self._acks)).with_outputs(
            ACKS, main="upserts"
        )
        return Split(out.upserts, out[ACKS])


class MergeUpserts(beam.PTransform):
    """Stamped upserts to one merged upsert per ``(kind, id)``: ``(kind, upsert)``."""

    def expand(self, upserts: beam.PCollection) -> beam.PCollection:
        return (
            upserts
            | "MergePerId" >> beam.CombinePerKey(UpsertCombineFn())
            | "Kind" >> beam.MapTuple(lambda key, upsert: (key[0], upsert))
        )
