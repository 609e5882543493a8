"""Profiles of a stream: each user's and company's rollup, updated every interval of event time.

Keyed state per profile holds the touches of the last 24 hours (what the window traits
need) and a rollup of everything older (what first seen, latest IP and ``ttfhw_s`` need).
An event-time timer per profile fires at the end of each interval in which the profile
had activity; it emits the profile as of that boundary, with the same pure functions as
a bounded run (:mod:`.rollup`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    BagStateSpec,
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)
from apache_beam.transforms.window import GlobalWindow, TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from moesif_beam.transforms.common.errors import require_positive
from moesif_beam.transforms.profiles.rollup import (
    DAY_MS,
    Rollup,
    Touch,
    add_touch,
    fold,
    merge_rollups,
)
from moesif_beam.transforms.profiles.traits import Profile, group_call, identify_call

__all__ = [
    "SegmentCallsInStream",
    "UpdateProfilesInStream",
    "next_boundary",
    "split_due",
    "update_at",
]


def next_boundary(time_ms: int, interval_ms: int) -> int:
    """The first interval boundary at or after ``time_ms`` (boundaries are multiples)."""
    return -(-time_ms // interval_ms) * interval_ms


def update_at(time_ms: int, interval_ms: int, last_emitted: int | None) -> int:
    """When a touch at ``time_ms`` is reported: its interval's end, never a reported one.

    A touch that arrives after its interval was already reported goes into the next
    update, so a profile is never sent again "as of" an earlier time than before.
    """
    boundary = next_boundary(time_ms, interval_ms)
    if last_emitted is not None and boundary <= last_emitted:
        return last_emitted + interval_ms
    return boundary


def split_due(
    touches: list[Touch], archive: Rollup, as_of_ms: int
) -> tuple[Rollup, list[Touch], Rollup]:
    """The profile as of ``as_of_ms``, the touches to keep, and the new archive.

    Touches at or before "as of" are reported; those older than 24 hours before it move
    into the archive (their all-time part), the rest stay for later windows.
    """
    due = [t for t in touches if t.time_ms <= as_of_ms]
    profile = merge_rollups([archive, fold(due, as_of_ms)])
    keep = [t for t in touches if t.time_ms > as_of_ms - DAY_MS]
    new_archive = merge_rollups([archive])
    for touch in touches:
        if touch.time_ms <= as_of_ms - DAY_MS:
            add_touch(new_archive, touch, in_window=False)
    return profile, keep, new_archive


def _timestamp(ms: int) -> Timestamp:
    return min(Timestamp(micros=ms * 1000), GlobalWindow().max_timestamp())


class _UpdateFn(beam.DoFn):
    TOUCHES = BagStateSpec("touches", PickleCoder())
    ARCHIVE = ReadModifyWriteStateSpec("archive", PickleCoder())
    # (next update due, last update emitted), epoch ms or None.
    CLOCK = ReadModifyWriteStateSpec("clock", PickleCoder())
    UPDATE = TimerSpec("update", TimeDomain.WATERMARK)

    def __init__(self, interval_ms: int) -> None:
        self._interval_ms = interval_ms

    def process(
        self,
        element: tuple[str, Touch],
        touches: Any = beam.DoFn.StateParam(TOUCHES),
        clock: Any = beam.DoFn.StateParam(CLOCK),
        update: Any = beam.DoFn.TimerParam(UPDATE),
    ) -> None:
        _, touch = element
        touches.add(touch)
        due, last = clock.read() or (None, None)
        at = update_at(touch.time_ms, self._interval_ms, last)
        if due is None or at < due:
            update.set(_timestamp(at))
            clock.write((at, last))

    @on_timer(UPDATE)
    def _update(
        self,
        key: Any = beam.DoFn.KeyParam,
        fired: Any = beam.DoFn.TimestampParam,
        touches: Any = beam.DoFn.StateParam(TOUCHES),
        archive: Any = beam.DoFn.StateParam(ARCHIVE),
        clock: Any = beam.DoFn.StateParam(CLOCK),
        update: Any = beam.DoFn.TimerParam(UPDATE),
    ) -> Iterator[Any]:
        due, _ = clock.read() or (None, None)
        as_of = due if due is not None else fired.micros // 1000
        held = list(touches.read())
        rollup, keep, new_archive = split_due(held, archive.read() or Rollup(), as_of)
        touches.clear()
        for touch in keep:
            touches.add(touch)
        archive.write(new_archive)
        later = [t.time_ms for t in keep if t.time_ms > as_of]
        next_due = update_at(min(later), self._interval_ms, as_of) if later else None
        if next_due is not None:
            update.set(_timestamp(next_due))
        clock.write((next_due, as_of))
        if rollup.first_seen is None:
            return  # nothing at or before this boundary yet
        kind, _, profile_id = key.partition("\x00")
        yield TimestampedValue(Profile(kind, profile_id, as_of, rollup), as_of / 1000)


def _key(item: tuple[tuple[str, str], Touch]) -> tuple[str, Touch]:
    (kind, profile_id), touch = item
    return f"{kind}\x00{profile_id}", touch


class UpdateProfilesInStream(beam.PTransform):
    """Keyed touches to profile updates, one per profile per interval with activity.

    Input: ``((kind, id), Touch)``. Output: :class:`~.traits.Profile` values stamped with
    their "as of" time, which is the end of an ``interval_s`` interval of event time (a
    multiple of it since the epoch). An update is emitted once the watermark passes the
    boundary, and covers every touch at or before it; a touch that arrives after its
    interval was reported is included in the next update instead, so "as of" never goes
    back. Profiles with no activity in an interval are not re-sent.
    """

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        require_positive("profile_interval", interval_s)
        self._interval_ms = max(1, int(interval_s * 1000))

    def expand(self, touches: beam.PCollection) -> beam.PCollection:
        return (
            touches
            # A str key, declared: Beam then encodes it deterministically for the state.
            | "ByProfile" >> beam.Map(_key).with_output_types(tuple[str, Any])
            | "Update" >> beam.ParDo(_UpdateFn(self._interval_ms))
        )


class _SegmentCallsFn(beam.DoFn):
    """Keyed by company id: group calls for its updates, identify calls for its users'."""

    COMPANY = ReadModifyWriteStateSpec("company", PickleCoder())

    def process(
        self,
        element: tuple[str, tuple[str, Profile]],
        company: Any = beam.DoFn.StateParam(COMPANY),
    ) -> Iterator[dict[str, Any]]:
        _, (role, profile) = element
        if role == "company":
            latest = company.read()
            if latest is None or profile.as_of_ms >= latest.as_of_ms:
                company.write(profile)
            yield group_call(profile)
        else:
            yield identify_call(profile, company.read())


def _by_company(profile: Profile) -> tuple[str, tuple[str, Profile]]:
    if profile.kind == "companies":
        return profile.id, ("company", profile)
    company = profile.rollup.company_id
    return ("" if company is None else company[2]), ("user", profile)


class SegmentCallsInStream(beam.PTransform):
    """Profile updates to Segment calls: a group per company update, an identify per user's.

    A user's ``traits.company`` is the latest update of its company this stage has seen:
    when the user's update of a boundary arrives before its company's, the company traits
    are those of the company's previous update (the group call of the same boundary carries
    the new ones). Users without a company get no ``traits.company``.
    """

    def expand(self, profiles: beam.PCollection) -> beam.PCollection:
        return (
            profiles
            | "ByCompany" >> beam.Map(_by_company).with_output_types(tuple[str, Any])
            | "Calls" >> beam.ParDo(_SegmentCallsFn())
        )
