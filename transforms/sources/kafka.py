"""Read a Kafka topic with confluent-kafka as a splittable DoFn: one restriction per partition.

Each partition is an offset range. A backfill (``--kafka_stop``) resolves both ends to
offsets before the run, so the read is bounded and finishes by itself; without a stop the
range is open and the read is unbounded (streaming). Every record leaves as a
:class:`~moesif_beam.transforms.records.Line` whose ``ack`` is
``Ack("topic/partition", offset, previous)``, ``previous`` being the offset of the record
the reader emitted before it in the same partition. A commit stage can therefore advance a
partition's committed offset over gaps (transaction markers, compacted offsets) without
guessing: an offset is committed only once every record before it is done.

The reader never commits offsets itself: reading is not delivering.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Duration, Timestamp

from moesif_beam.transforms.common.garbage import collect_garbage_less_often
from moesif_beam.transforms.common.worker_memory import worker_memory
from moesif_beam.transforms.records import Ack, Line
from moesif_beam.transforms.sources.drain import DRAIN, OPEN_END, CheckpointOnlyTracker, Ticks
from moesif_beam.transforms.sources.kafka_ranges import MAX_RANGE, KafkaRange, refresh_metadata
from moesif_beam.transforms.sources.kafka_topic import (
    CLIENT_LOG,
    KafkaPartition,
    KafkaSourceConfig,
    committed_offsets,
    resolve_partitions,
    retry_transient,
)

__all__ = [
    "CLIENT_LOG",
    "DRAIN",
    "OPEN_END",
    "KafkaPartition",
    "KafkaRead",
    "KafkaSourceConfig",
    "ReadKafka",
    "resolve_partitions",
    "retry_transient",
]

_LOG = logging.getLogger(__name__)


# Messages taken from the consumer at once.
_MAX_MESSAGES = 1000


class _PartitionRanges(RestrictionProvider):
    def initial_restriction(self, element: KafkaPartition) -> OffsetRange:
        return OffsetRange(element.start, element.stop)

    def create_tracker(self, restriction: OffsetRange) -> OffsetRestrictionTracker:
        if restriction.stop == OPEN_END:
            return CheckpointOnlyTracker(restriction)
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, element: KafkaPartition, restriction: OffsetRange) -> int:
        return min(restriction.size(), 2**31)


_RANGES = _PartitionRanges()
_WATERMARKS = ManualWatermarkEstimator.default_provider()


class _ConsumerFn(beam.DoFn):
    """A DoFn that owns one Kafka consumer (of ``config``'s group), opened in ``setup``."""

    def __init__(self, config: KafkaSourceConfig) -> None:
        self._config = config

    def setup(self) -> None:
        from confluent_kafka import Consumer  # noqa: PLC0415

        self._consumer = Consumer(self._config.consumer_settings())

    def teardown(self) -> None:
        consumer = getattr(self, "_consumer", None)
        if consumer is not None:
            consumer.close()


# How long a reader's end-offset requests may fail before its client is replaced.
_FRESH_CLIENT_AFTER_S = 10.0


class _PartitionConsumer:
    """One partition's consumer, kept assigned between bundles so it goes on prefetching."""

    def __init__(self) -> None:
        self.consumer: Any = None
        self.next_offset = -1  # the offset the consumer reads next, as far as we know
        self.lock = threading.Lock()
        self.warned = 0.0  # when a failed end-offset request was last logged (monotonic)
        self.failing_since = 0.0  # when end-offset requests began failing (monotonic; 0: not)


class _PartitionConsumers:
    """A worker's consumers of one reader stage, one per partition (see _ReadPartitionFn)."""

    def __init__(self) -> None:
        self._slots: dict[tuple[str, int], _PartitionConsumer] = {}
        self._lock = threading.Lock()

    def slot(self, topic: str, partition: int) -> _PartitionConsumer:
        with self._lock:
            return self._slots.setdefault((topic, partition), _PartitionConsumer())

    def close(self, wait: float = 10.0) -> None:
        """Close every consumer; one whose read does not end within ``wait`` s is left."""
        with self._lock:
            slots, self._slots = list(self._slots.values()), {}
        for slot in slots:
            # A read still holding its slot ends within its poll window; one that never
            # ends (an abandoned bundle) must not hang the shutdown: its consumer is left
            # to the process's exit.
            if not slot.lock.acquire(timeout=wait):
                continue
            try:
                if slot.consumer is not None:
                    slot.consumer.close()
                    slot.consumer = None
            finally:
                slot.lock.release()


class _ReadPartitionFn(beam.DoFn):
    """Reads one partition's range; yields ``Line(value, source, Ack)`` with Kafka's timestamp.

    Each partition has one consumer per worker, shared by the stage's DoFn instances and
    kept assigned from one bundle to the next: a stream's read of a partition is a chain
    of one-second bundles, and a consumer assigned afresh for each would drop what it had
    prefetched and wait for the broker again (measured: up to 40% of a bundle).
    """

    def __init__(
        self,
        config: KafkaSourceConfig,
        poll_seconds: float,
        idle_lag: float,
        backlog_seconds: float | None = None,
        ranges: bool = False,
    ) -> None:
        self._config = config
        self._ranges = ranges
        self._poll_seconds = poll_seconds
        self._backlog_seconds = poll_seconds if backlog_seconds is None else backlog_seconds
        self._idle_lag = idle_lag
        # Names this stage's consumers in the worker; fixed when the pipeline is built.
        self._stage_id = uuid.uuid4().hex

    def setup(self) -> None:
        collect_garbage_less_often()  # a stream's process: see transforms/common/garbage.py
        self._consumers = worker_memory(f"{self._stage_id}/consumers", _PartitionConsumers)

    def teardown(self) -> None:
        consumers = getattr(self, "_consumers", None)
        if consumers is not None:
            consumers.close()

    def _read(self, element: KafkaPartition, tracker: Any, watermark: Any) -> Iterator[Any]:
        slot = self._consumers.slot(element.topic, element.partition)
        with slot.lock:
            yield from self._read_with(slot, element, tracker, watermark)

    def _read_with(
        self,
        slot: _PartitionConsumer,
        element: KafkaPartition,
        tracker: Any,  # Beam's thread-safe wrapper of OffsetRestrictionTracker
        watermark: ManualWatermarkEstimator,
    ) -> Iterator[Any]:
        from confluent_kafka import Consumer, TopicPartition  # noqa: PLC0415

        restriction = tracker.current_restriction()
        if restriction.start >= restriction.stop:
            return
        if self._ranges:
            yield from self._claim_ranges(slot, element, tracker, watermark)
            return
        tp = TopicPartition(element.topic, element.partition, restriction.start)
        if slot.consumer is None:
            slot.consumer = Consumer(self._config.consumer_settings())
        if slot.next_offset != restriction.start:
            slot.consumer.assign([tp])  # first use, or a retried range: start over there
        consumer = slot.consumer
        slot.next_offset = -1  # unknown until this read ends cleanly
        name = f"{element.topic}/{element.partition}"
        previous = restriction.start - 1
        started = time.monotonic()
        deadline = started + self._poll_seconds
        # Each bundle's length is drawn around backlog_seconds: partitions whose bundles
        # started together would otherwise keep ending together, and the stream stalls
        # while all of them wait at their ends at once.
        longest = started + self._backlog_seconds * random.uniform(0.8, 1.2)
        unbounded = restriction.stop == OPEN_END
        while True:
            if unbounded and DRAIN.is_set():
                # Claim the rest of the open range so the restriction is done; nothing
                # unread is acknowledged, so the next run resumes right here.
                tracker.try_claim(restriction.stop - 1)
                return
            messages = consumer.consume(num_messages=_MAX_MESSAGES, timeout=0.2)
            got = len(messages)
            caught_up = False
            for message in messages:
                error = message.error()
                if error is not None:
                    _end_of_partition(error, name)
                    caught_up = True
                    continue
                offset = message.offset()
                if not tracker.try_claim(offset):
                    return
                kind, stamp = message.timestamp()
                seconds = stamp / 1000 if kind and stamp >= 0 else time.time()
                _advance(watermark, Timestamp.of(seconds))
                value = message.value() or b""
                yield TimestampedValue(
                    Line(value, f"{name}@{offset}", Ack(name, offset, previous)), seconds
                )
                previous = offset
                if offset == restriction.stop - 1:
                    return  # the range is done
            if not got or caught_up:
                position = consumer.position([tp])[0].offset
                if not unbounded and position >= restriction.stop:
                    # Only non-data offsets (transaction markers) are left in the range:
                    # claim its end so the tracker knows the range is done.
                    tracker.try_claim(restriction.stop - 1)
                    return
                if unbounded and caught_up:
                    # An idle partition must not hold the watermark back: nothing older
                    # than now - idle_lag can still arrive from it.
                    _advance(watermark, Timestamp.of(time.time() - self._idle_lag))
            if unbounded and time.monotonic() >= deadline:
                if got == _MAX_MESSAGES and time.monotonic() < longest:
                    # A backlog (the consumer had a full batch ready): the bundle goes on,
                    # up to backlog_seconds. Each bundle's end costs its partition about
                    # 0.4 s without reading (delivery of its last batches, the runner's
                    # rescheduling), measured as over a quarter of a one-second bundle.
                    continue
                # A backlog resumes at once; a partition with little to read waits a moment.
                backlog = got == _MAX_MESSAGES
                tracker.defer_remainder(Duration.of(0.0 if backlog else 0.2 if got else 1.0))
                # The residual starts right after the last claimed offset, where the
                # consumer stands: the next bundle goes on without a new assignment.
                slot.next_offset = previous + 1
                return

    def _claim_ranges(
        self, slot: _PartitionConsumer, element: KafkaPartition, tracker: Any, watermark: Any
    ) -> Iterator[Any]:
        """Claim ranges up to the partition's end offset as it grows, without fetching.

        Each range is timestamped with the time it was claimed, and the watermark follows
        those times: the records' own times are seen only by whoever reads the range.
        A broker that does not answer (restarting, a leader moving) is asked again.
        """
        from confluent_kafka import Consumer, KafkaException, TopicPartition  # noqa: PLC0415

        if slot.consumer is None:
            slot.consumer = Consumer(self._config.consumer_settings())
        consumer = slot.consumer
        restriction = tracker.current_restriction()
        tp = TopicPartition(element.topic, element.partition)
        position = restriction.start
        unbounded = restriction.stop == OPEN_END
        started = time.monotonic()
        deadline = started + self._poll_seconds
        longest = started + self._backlog_seconds * random.uniform(0.8, 1.2)
        pause = 0.05
        while True:
            if unbounded and DRAIN.is_set():
                tracker.try_claim(restriction.stop - 1)
                return
            bound = min(restriction.stop, tracker.current_restriction().stop)
            if position >= bound:
                return
            try:
                low, high = consumer.get_watermark_offsets(tp, timeout=5)
                slot.failing_since = 0.0
            except KafkaException as exc:
                now_s = time.monotonic()
                # Said once a minute, not twenty times a second.
                if now_s - slot.warned > 60:
                    slot.warned = now_s
                    name = f"{element.topic}/{element.partition}"
                    _LOG.warning("end offset of %s: %s (asking again)", name, exc)
                slot.failing_since = slot.failing_since or now_s
                if now_s - slot.failing_since > _FRESH_CLIENT_AFTER_S:
                    # Seen after a broker restart: a client kept failing with
                    # _UNKNOWN_PARTITION for minutes although the broker was back and its
                    # metadata asked for again; a new client asks from nothing.
                    consumer.close()
                    consumer = slot.consumer = Consumer(self._config.consumer_settings())
                    slot.failing_since = now_s
                else:
                    refresh_metadata(consumer, element.topic)
                low, high = position, position  # nothing to claim now; the bundle waits
            # Offsets below the log's start are gone (retention): one range covers them
            # all, which its worker acknowledges at once, not a thousand at a time.
            end = min(high, bound, max(position + MAX_RANGE, low))
            if end > position:
                claimed = tracker.try_claim(end - 1)
                if not claimed:
                    end = min(end, tracker.current_restriction().stop)
                now = time.time()
                _advance(watermark, Timestamp.of(now))
                if end > position:
                    yield TimestampedValue(
                        KafkaRange(element.topic, element.partition, position, end), now
                    )
                position = end
                if not claimed:
                    return
            caught_up = position >= high
            if 0 <= high < position and time.monotonic() - slot.warned > 60:
                # Said once a minute; nothing is claimed until the log reaches the read.
                slot.warned = time.monotonic()
                _LOG.warning(
                    "%s/%s ends at offset %d, before the read's %d (topic recreated or "
                    "truncated?); waiting for it",
                    element.topic,
                    element.partition,
                    high,
                    position,
                )
            if unbounded and caught_up:
                # An idle partition must not hold the watermark back: nothing it claims
                # later can be older than now.
                _advance(watermark, Timestamp.of(time.time() - self._idle_lag))
            if unbounded and time.monotonic() >= deadline:
                if not caught_up and time.monotonic() < longest:
                    continue
                tracker.defer_remainder(Duration.of(0.0 if not caught_up else 0.2))
                return
            if caught_up:
                # Asking in a tight loop costs the broker: the pause doubles, from 50 ms
                # to 200 ms, while nothing new comes (about 6 requests a second on an
                # idle partition, and at most 200 ms added to a quiet stream's latency).
                time.sleep(pause)
                pause = min(pause * 2, 0.2)
            else:
                pause = 0.05


def _advance(watermark: Any, stamp: Timestamp) -> None:
    """Move ``watermark`` to ``stamp`` if that is later: a watermark never goes back."""
    current = watermark.current_watermark()
    if current is None or stamp > current:
        watermark.set_watermark(stamp)


def _end_of_partition(error: Any, name: str) -> None:
    """Return if a message's ``error`` only marks the partition's end; raise otherwise."""
    from confluent_kafka import KafkaError  # noqa: PLC0415

    if error.code() != KafkaError._PARTITION_EOF:
        msg = f"Kafka read of {name} failed: {error}"
        raise RuntimeError(msg)


class _BoundedReadFn(_ReadPartitionFn):
    def process(
        self,
        element: KafkaPartition,
        tracker: Any = beam.DoFn.RestrictionParam(_RANGES),
        watermark: Any = beam.DoFn.WatermarkEstimatorParam(_WATERMARKS),
    ) -> Iterator[Any]:
        yield from self._read(element, tracker, watermark)


class _UnboundedReadFn(_ReadPartitionFn):
    @beam.DoFn.unbounded_per_element()
    def process(
        self,
        element: KafkaPartition,
        tracker: Any = beam.DoFn.RestrictionParam(_RANGES),
        watermark: Any = beam.DoFn.WatermarkEstimatorParam(_WATERMARKS),
    ) -> Iterator[Any]:
        yield from self._read(element, tracker, watermark)


class _DiscoverFn(_ConsumerFn):
    """Keyed by topic: lists its partitions on every tick and emits each new one once."""

    KNOWN = ReadModifyWriteStateSpec("known", PickleCoder())

    def __init__(self, config: KafkaSourceConfig, initial: frozenset[int]) -> None:
        super().__init__(config)
        self._initial = initial

    def process(
        self, element: tuple[str, int], known_state: Any = beam.DoFn.StateParam(KNOWN)
    ) -> Iterator[KafkaPartition]:
        from confluent_kafka import KafkaException, TopicPartition  # noqa: PLC0415

        topic, _tick = element
        known = known_state.read() or set(self._initial)
        try:
            metadata = self._consumer.list_topics(topic, timeout=10)
        except KafkaException as exc:
            _LOG.warning("partition discovery for %s: %s", topic, exc)
            return
        found = metadata.topics.get(topic)
        current = set(found.partitions) if found is not None and found.partitions else set()
        for partition in sorted(current - known):
            tp = TopicPartition(topic, partition)
            committed = committed_offsets(self._consumer, [tp], 10)[0].offset
            # A partition that appeared during the run holds only new records: from its
            # beginning, unless the group already committed there.
            low, _ = self._consumer.get_watermark_offsets(tp, timeout=10)
            start = committed if committed >= 0 else low
            _LOG.info("discovered %s/%d from offset %d", topic, partition, start)
            yield KafkaPartition(topic, partition, int(start), OPEN_END)
        known_state.write(known | current)


class KafkaRead(NamedTuple):
    """Outputs of :class:`ReadKafka`."""

    records: beam.PCollection  # Line(value_bytes, "topic/partition@offset", Ack), or KafkaRange
    partitions: beam.PCollection  # every KafkaPartition read, initial and discovered


class ReadKafka(beam.PTransform):
    """Read a topic's partitions as ``Line(value_bytes, "topic/partition@offset", Ack)`` s.

    Partitions are the unit of parallelism; each is read in offset order. Values are
    untouched bytes (a poison record is the parser's to dead-letter). Bounded when every
    partition's range has a stop; unbounded otherwise, and then partitions added to the
    topic during the run are discovered every ``config.discovery_interval`` seconds and read from
    their beginning. Elements carry Kafka's timestamps, and the watermark follows them,
    moving to "now minus ``idle_lag``" on a caught-up partition so an idle partition does
    not stall the pipeline. A stream's bundle reads a partition for ``poll_seconds``, and
    for up to ``backlog_seconds`` while the consumer keeps returning full batches. With
    ``ranges``, the read fetches nothing: each element is a
    :class:`~moesif_beam.transforms.sources.kafka_ranges.KafkaRange` of up to 1,000
    offsets claimed up to the partition's end offset, timestamped when claimed, the
    watermark following those times, for workers to read
    (:class:`~moesif_beam.transforms.common.in_workers.InWorkers`).
    """

    def __init__(
        self,
        config: KafkaSourceConfig,
        partitions: list[KafkaPartition],
        poll_seconds: float = 1.0,
        idle_lag: float = 2.0,
        backlog_seconds: float = 5.0,
        *,
        ranges: bool = False,
    ) -> None:
        super().__init__()
        self._ranges = ranges
        if not 0 < poll_seconds <= backlog_seconds:
            msg = (
                f"need 0 < poll_seconds <= backlog_seconds, "
                f"got {poll_seconds} and {backlog_seconds}"
            )
            raise ValueError(msg)
        if not partitions:
            msg = "no partitions to read"
            raise ValueError(msg)
        self._config = config
        self._partitions = partitions
        self._poll_seconds = poll_seconds
        self._backlog_seconds = backlog_seconds
        self._idle_lag = idle_lag

    def expand(self, pbegin: beam.pvalue.PBegin) -> KafkaRead:
        unbounded = any(p.stop == OPEN_END for p in self._partitions)
        partitions = pbegin | "Partitions" >> beam.Create(self._partitions)
        if unbounded:
            initial = frozenset(p.partition for p in self._partitions)
            discovered = (
                pbegin
                | "Tick" >> Ticks(self._config.discovery_interval)
                | "ByTopic" >> beam.Map(lambda tick, topic: (topic, tick), self._config.topic)
                | "Discover"
                >> beam.ParDo(_DiscoverFn(self._config, initial)).with_input_types(tuple[str, int])
            )
            partitions = (partitions, discovered) | "AllPartitions" >> beam.Flatten()
        fn_class = _UnboundedReadFn if unbounded else _BoundedReadFn
        read = beam.ParDo(
            fn_class(
                self._config,
                self._poll_seconds,
                self._idle_lag,
                self._backlog_seconds,
                ranges=self._ranges,
            )
        )
        records = partitions | "Spread" >> beam.Reshuffle() | "ReadPartition" >> read
        return KafkaRead(records, partitions)
