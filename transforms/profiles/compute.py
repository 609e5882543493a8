"""Profiles of a bounded run: every user's and company's rollup as of one time.

Input: the unique records of a run (``(transaction_id, Record)``, after dedup), so a
replayed event is counted once. Output: one :class:`~.traits.Profile` per user and per
company. "As of" is ``as_of_ms`` when given, else the newest request time in the input,
so a backfill of the same input always gives the same profiles.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import apache_beam as beam
import orjson
from apache_beam import pvalue

from moesif_beam.transforms.common.counters import counter
from moesif_beam.transforms.profiles.rollup import (
    RollupCombineFn,
    Touch,
    in_window,
    touches_of,
)
from moesif_beam.transforms.profiles.traits import Profile
from moesif_beam.transforms.records import Keyed
from moesif_beam.transforms.schema.rule import NO_TIME

__all__ = [
    "OUTPUTS",
    "PROFILE_COUNTERS",
    "ComputeProfiles",
    "Touches",
    "keyed_touches",
    "profiles_summary",
]

# Counters of the profiles pipeline besides the contract's, for the summary and
# --metrics_out. ``sent`` there counts the records the rollups took in (each once, however
# many profiles it feeds); the first three break it down (records that fed no profile),
# the rest count deliveries per output: users, companies and segment.
_DELIVERY = (
    "sent",
    "batches",
    "bytes_sent",
    "retries",
    "retries_exhausted",
    "collector_rejected",
    "too_large",
    "timeouts",
)
OUTPUTS = ("users", "companies", "segment")
PROFILE_COUNTERS = (
    "unattributed",
    "untimed",
    "after_as_of",
    *(f"{output}_{name}" for output in OUTPUTS for name in _DELIVERY),
    "upsert_dead_letters",
)


def profiles_summary(counters: dict[str, int]) -> str:
    """The profiles part of a run's summary: what fed no profile, and each output."""
    get = counters.get
    lines = [
        f"  of sent: unattributed {get('unattributed', 0):,} (no user_id or company_id), "
        f"untimed {get('untimed', 0):,}, after_as_of {get('after_as_of', 0):,}",
    ]
    for output in OUTPUTS:
        lines.append(
            f"  {output:<10}{get(f'{output}_sent', 0):>10,} delivered in "
            f"{get(f'{output}_batches', 0):,} batches, {get(f'{output}_bytes_sent', 0):,} "
            f"bytes; retries {get(f'{output}_retries', 0):,}, rejected "
            f"{get(f'{output}_collector_rejected', 0):,}, retries_exhausted "
            f"{get(f'{output}_retries_exhausted', 0):,}, too_large "
            f"{get(f'{output}_too_large', 0):,}"
        )
    lines.append(f"  upsert dead letters {get('upsert_dead_letters', 0):,}")
    return "\n".join(lines)


# Tag of the acknowledgement tokens of records the rollups took in (streaming).
ACKS = "acks"


def keyed_touches(
    transaction_id: str, time_ms: int, body: bytes
) -> list[tuple[tuple[str, str], Touch]]:
    """The touches of one record, keyed by ``("users", id)`` and ``("companies", id)``.

    Empty when the record names neither a user nor a company.
    """
    record = orjson.loads(body)
    touch = touches_of(transaction_id, time_ms, record)
    keyed = []
    if touch.user_id:
        keyed.append((("users", touch.user_id), touch))
    if touch.company_id:
        keyed.append((("companies", touch.company_id), touch))
    return keyed


class _TouchesFn(beam.DoFn):
    """Records to keyed touches; counts each record once, in ``sent`` or a break-down.

    Every record is ``sent`` (taken by the rollups); ``unattributed`` ones name no user or
    company, ``untimed`` ones have no request time, ``after_as_of`` ones are newer than the
    run's "as of" (bounded runs with ``--as_of``): those three feed no profile.
    """

    def __init__(self, acks: bool) -> None:
        self._acks = acks
        self._sent = counter("sent")
        self._unattributed = counter("unattributed")
        self._untimed = counter("untimed")
        self._after = counter("after_as_of")

    def process(self, element: Keyed, as_of: Any = None) -> Iterator[Any]:
        transaction_id, record = element
        self._sent.inc()
        if self._acks and record.ack is not None:
            yield pvalue.TaggedOutput(ACKS, record.ack)
        if record.time_ms == NO_TIME:
            self._untimed.inc()
            return
        if as_of is not None and record.time_ms > as_of:
            self._after.inc()
            return
        keyed = keyed_touches(transaction_id, record.time_ms, record.body)
        if not keyed:
            self._unattributed.inc()
            return
        for key, touch in keyed:
            if as_of is None:
                yield key, touch
            else:
                yield key, (touch, in_window(touch.time_ms, as_of))


class TouchesOut(NamedTuple):
    """Outputs of :class:`Touches`."""

    touches: beam.PCollection  # ((kind, id), Touch) or ((kind, id), (Touch, in_window))
    acks: beam.PCollection  # Kafka tokens of the records taken in (streaming)


class Touches(beam.PTransform):
    """Unique records to keyed touches; with an ``as_of`` side input, marked in/out of window.

    Each record is counted once in ``sent``; its acknowledgement token (if any) is output
    when ``acks`` is set, since its fate (taken by the rollups) is final here.
    """

    def __init__(self, *, acks: bool = False, as_of: Any = None) -> None:
        super().__init__()
        self._acks = acks
        self._as_of = as_of

    def expand(self, records: beam.PCollection) -> TouchesOut:
        fn = _TouchesFn(self._acks)
        if self._as_of is None:
            out = records | "Touches" >> beam.ParDo(fn).with_outputs(ACKS, main="touches")
        else:
            out = records | "Touches" >> beam.ParDo(
                fn, as_of=pvalue.AsSingleton(self._as_of)
            ).with_outputs(ACKS, main="touches")
        return TouchesOut(out.touches, out[ACKS])


def _newest(times: Any) -> int | None:
    return max(times, default=None)


def _profile(item: tuple[tuple[str, str], Any], as_of: int) -> Profile:
    (kind, key), rollup = item
    return Profile(kind, key, as_of, rollup)


class ComputeProfiles(beam.PTransform):
    """Unique records to every user's and company's :class:`~.traits.Profile` (bounded).

    ``as_of_ms`` None: "as of" is the newest request time among the records (none: no
    profiles). Records after "as of" are counted in ``after_as_of`` and left out. The
    rollups are combined per key with :class:`~.rollup.RollupCombineFn`, whose result
    does not depend on the order of records or how they are split between workers.
    """

    def __init__(self, as_of_ms: int | None = None) -> None:
        super().__init__()
        if as_of_ms is not None and not isinstance(as_of_ms, int):
            msg = f"as_of_ms must be epoch milliseconds, got {as_of_ms!r}"
            raise ValueError(msg)
        self._as_of_ms = as_of_ms

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        if self._as_of_ms is None:
            as_of = (
                records
                | "Times" >> beam.Map(lambda kv: kv[1].time_ms)
                | "Timed" >> beam.Filter(lambda t: t != NO_TIME)
                | "Newest" >> beam.CombineGlobally(_newest)
            )
        else:
            as_of = records.pipeline | "AsOf" >> beam.Create([self._as_of_ms])
        touches = records | "Touches" >> Touches(as_of=as_of)
        return (
            touches.touches
            | "Rollup" >> beam.CombinePerKey(RollupCombineFn())
            | "Profile" >> beam.Map(_profile, as_of=pvalue.AsSingleton(as_of))
        )
