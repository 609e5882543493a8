"""Unbounded sources that can be drained: the drain flag, open ranges and a ticker.

A streaming run ends by draining: sources stop, every stage flushes what it holds, and the
run finishes. For workers in this process (the local Prism runner with LOOPBACK) the CLI
sets :data:`DRAIN` on SIGTERM or SIGINT (:func:`start_drain`), with a deadline
(``--drain_timeout``) past which stages stop waiting (:func:`check_drain_deadline`); runners
with remote workers (Flink, Dataflow) drain through their own controls.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.utils.timestamp import Duration, Timestamp

__all__ = [
    "DRAIN",
    "OPEN_END",
    "CheckpointOnlyTracker",
    "DrainTimedOut",
    "Ticks",
    "check_drain_deadline",
    "drain_sleep",
    "drain_timed_out",
    "start_drain",
]

# Set to drain the unbounded sources running in this process: they stop claiming work and
# finish their restrictions, the watermark reaches the end, and downstream stages flush.
DRAIN = threading.Event()

# When a drain started with a time limit must be over (time.monotonic()), and whether a
# stage gave up on it.
_deadline: float | None = None
_timed_out = threading.Event()


class DrainTimedOut(Exception):
    """A drain's time is up and a stage still holds undelivered records.

    Raised instead of waiting longer: it fails the bundle, so those records are neither
    acknowledged nor dead-lettered, their offsets are not committed, and a restarted run
    reads them again.
    """

    MARKER = "moesif-beam drain timed out"


def start_drain(timeout: float | None = None) -> None:
    """Drain the sources in this process; with ``timeout``, stages stop waiting after it.

    Only the first call sets the deadline: a second SIGTERM does not extend it.
    """
    global _deadline  # noqa: PLW0603 - one drain per process, read by every stage
    if timeout is not None and _deadline is None:
        _deadline = time.monotonic() + timeout
    DRAIN.set()


def check_drain_deadline(wait: float = 0.0) -> None:
    """Raise :class:`DrainTimedOut` if a drain's deadline passes within ``wait`` seconds.

    A stage about to wait (before a retry) or to start work it cannot finish in time calls
    this, so that it gives up when the drain's time is up rather than after its own budget.
    Does nothing outside a drain with a time limit.
    """
    if _deadline is not None and time.monotonic() + wait >= _deadline:
        _timed_out.set()
        msg = f"{DrainTimedOut.MARKER}: undelivered records were not acknowledged"
        raise DrainTimedOut(msg)


def drain_sleep(seconds: float) -> None:
    """``time.sleep`` for stages that wait to retry: a drain's deadline cuts it short.

    Wakes when a drain starts; raises :class:`DrainTimedOut` (at once, not at the end of
    the wait) if the drain's deadline passes before ``seconds`` are over.
    """
    end = time.monotonic() + seconds
    while True:
        remaining = end - time.monotonic()
        check_drain_deadline(max(remaining, 0.0))
        if remaining <= 0:
            return
        if DRAIN.is_set():  # and the deadline is after the end of the wait
            time.sleep(remaining)
            return
        DRAIN.wait(remaining)


def drain_timed_out() -> bool:
    """Whether a stage gave up on the drain, or its deadline has passed."""
    return _timed_out.is_set() or (_deadline is not None and time.monotonic() >= _deadline)


# The stop of an open (unbounded) offset range.
OPEN_END = sys.maxsize


class CheckpointOnlyTracker(OffsetRestrictionTracker):
    """An open range can only be checkpointed, never split by a fraction.

    Half of "up to the end of time" is not a meaningful place to cut a live source, and for
    Kafka a cut between offsets would break the previous-offset chain the commit stage
    follows; a checkpoint resumes right after the last claimed position, which keeps it.
    """

    def try_split(self, fraction_of_remainder: float) -> Any:
        if fraction_of_remainder != 0:
            return None
        return super().try_split(0)


class _TickRanges(RestrictionProvider):
    def initial_restriction(self, element: Any) -> OffsetRange:
        return OffsetRange(0, OPEN_END)

    def create_tracker(self, restriction: OffsetRange) -> OffsetRestrictionTracker:
        return CheckpointOnlyTracker(restriction)

    def restriction_size(self, element: Any, restriction: OffsetRange) -> int:
        return 1


_TICKS = _TickRanges()
_WATERMARKS = ManualWatermarkEstimator.default_provider()


# A waiting tick source wakes at least this often to see whether a drain started, so that
# a drain is not held up by a long interval (Kafka's partition discovery: 30 s).
_WAKE_S = 1.0


class _TickFn(beam.DoFn):
    """Element: when the ticks started (epoch seconds); tick ``n`` is due ``n`` intervals on."""

    def __init__(self, interval: float) -> None:
        self._interval = interval

    @beam.DoFn.unbounded_per_element()
    def process(
        self,
        element: float,
        tracker: Any = beam.DoFn.RestrictionParam(_TICKS),
        watermark: Any = beam.DoFn.WatermarkEstimatorParam(_WATERMARKS),
    ) -> Iterator[int]:
        restriction = tracker.current_restriction()
        if DRAIN.is_set():
            tracker.try_claim(restriction.stop - 1)
            return
        now = time.time()
        due = element + restriction.start * self._interval
        if now < due:
            tracker.defer_remainder(Duration.of(min(due - now, _WAKE_S)))
            return
        # The latest tick due: after a stall, the missed ones are skipped, not burst out.
        tick = max(restriction.start, int((now - element) // self._interval))
        if not tracker.try_claim(tick):
            return
        stamp = Timestamp.of(now)
        if watermark.current_watermark() is None or stamp > watermark.current_watermark():
            watermark.set_watermark(stamp)
        yield tick
        following = element + (tick + 1) * self._interval
        tracker.defer_remainder(Duration.of(max(0.0, min(following - now, _WAKE_S))))


class Ticks(beam.PTransform):
    """Emit increasing tick numbers (0, 1, 2...) every ``interval`` seconds until drained.

    Processing time. A tick that falls due while the runner is stalled is skipped rather
    than emitted late with the next one. A drain ends the ticks within about a second,
    however long the interval. Beam's PeriodicImpulse never stops, and a drained run must
    finish.
    """

    def __init__(self, interval: float) -> None:
        super().__init__()
        if interval <= 0:
            msg = f"interval must be positive, got {interval}"
            raise ValueError(msg)
        self._interval = interval

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (
            pbegin
            | "Start" >> beam.Impulse()
            | "StartTime" >> beam.Map(lambda _: time.time())
            | "Tick" >> beam.ParDo(_TickFn(self._interval))
        )
