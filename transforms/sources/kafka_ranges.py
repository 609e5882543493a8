"""Kafka offset ranges: claimed by the stream's reader, read by whoever holds them.

The fused stream (``InWorkers`` with ``kafka``) does not fetch messages in the stream's
process: its reader claims ranges of offsets up to each partition's end offset
(:class:`KafkaRange`), and a worker process reads each range with its own consumer
(:class:`RangeReader`). Only the reader tracks progress through the runner, so the
worker must account for every offset of a range, records and gaps alike.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

from moesif_beam.transforms.records import new_ack, new_line

__all__ = ["KafkaRange", "RangeReader", "range_reader_settings", "refresh_metadata"]

_LOG = logging.getLogger(__name__)

# Offsets in one claimed range: about a consumer batch, a worker's 50 ms of work.
MAX_RANGE = 1000
# How long a range's read waits before it asks again when the broker moved its start
# out of range without the records having expired (a broker restarting, a leader moving).
_RETRY_S = 0.5
# How long a range's read may get nothing at all from its consumer before the consumer
# is replaced (see RangeReader.read).
_STALLED_S = 10.0


class KafkaRange(NamedTuple):
    """Offsets ``[start, end)`` of one partition, claimed by the reader for another to read.

    Claimed means no other range of the run holds them; whoever reads the range must
    acknowledge every offset in it (records, and the offsets without one) for the
    partition's commits to pass it.
    """

    topic: str
    partition: int
    start: int
    end: int


def range_reader_settings(consumer_settings: dict[str, Any], sticky: bool) -> dict[str, Any]:
    """The librdkafka settings of a :class:`RangeReader`'s consumers.

    Offsets out of range are reported, never silently reset, whatever the user set (as
    the partition's end is reported, and nothing is committed by these consumers): a
    consumer that jumped to the log's end would make the read end a range whose records
    it never handed over (a reset is the reader's to decide, see :meth:`RangeReader.read`).
    When a partition's ranges do not all go to one consumer (``sticky`` false), each one
    seeks, and whatever it fetched past its range is dropped: it fetches about one range
    ahead, not the default 100,000 messages.
    """
    settings = {
        **consumer_settings,
        "auto.offset.reset": "error",
        # The range's end is known only by the partition's end, when it holds no records.
        "enable.partition.eof": True,
        # These consumers read for others; only the stream commits, what was delivered.
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
    }
    if not sticky:
        settings["queued.min.messages"] = MAX_RANGE
    return settings


class RangeReader:
    """Reads claimed ranges, with one consumer per partition, kept between ranges.

    A partition's consumer stays assigned from one range to the next, so that it goes on
    prefetching; it is assigned afresh when a range does not start where its last one
    ended (another reader took the ranges between). Not thread-safe: one per process.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = settings
        # (topic, partition) -> [its consumer, the offset it hands over next or -1, the
        # messages it already handed over from there]
        self._consumers: dict[tuple[str, int], list[Any]] = {}
        self._warned = 0.0  # when a warning was last logged (monotonic)

    def read(self, kafka_range: KafkaRange) -> tuple[list[Any], list[int], Any]:
        """The range's messages as lines, their Kafka times in ms, and the gap's ack.

        Guarantees:
        - every record of the range is in the lines, once, in offset order, each with an
          ack that covers it and the offsets since the previous line (or the range's
          start);
        - the gap's ack covers the offsets after the last line, which hold no record
          (transaction markers, compacted or expired records); None when the range's last
          offset is a line's;
        - an offset is passed as holding no record only on the broker's word: the
          consumer reported the partition's end at or past it, stands past it, or the
          log now starts after it (expired by retention). A broker that is away, or
          says an offset is out of range while the log still holds it, is waited for,
          however long that takes.

        Raises:
            RuntimeError: Kafka reported an error other than those above (the partition
                or topic gone, authorization).
        """
        from confluent_kafka import Consumer, KafkaError, TopicPartition  # noqa: PLC0415

        topic, partition, start, end = kafka_range
        slot = self._consumers.get((topic, partition))
        if slot is None:
            slot = self._consumers[(topic, partition)] = [Consumer(self._settings), -1, []]
        consumer = slot[0]
        tp = TopicPartition(topic, partition)
        # Messages the last read took from the consumer past its range, if this range
        # starts where that one ended; the consumer stands after them.
        pending: list[Any] = slot[2] if slot[1] == start else []
        # Whether the consumer's position can be believed: not right after an assign,
        # until the new assignment has handed something over (librdkafka resets the
        # position on another thread, when the old fetch has stopped).
        trusted = slot[1] == start
        if slot[1] != start:
            consumer.assign([TopicPartition(topic, partition, start)])
        slot[1], slot[2] = -1, []  # unknown until this read ends where its range does
        name = f"{topic}/{partition}"
        previous = start - 1
        lines: list[Any] = []
        times: list[int] = []
        ended = False  # the rest of the range holds no record
        left: list[Any] = []  # messages taken past the range's end, for the next range
        stands_after = True  # the consumer stands at the range's end, or after ``left``
        heard = time.monotonic()  # when the consumer last handed over a message or error
        while previous < end - 1 and not ended:
            if pending:
                messages, pending = pending, []
            else:
                messages = consumer.consume(num_messages=min(1000, end - 1 - previous), timeout=1.0)
            read = False
            now_ms = 0
            for index, message in enumerate(messages):
                error = message.error()
                if error is not None:
                    code = error.code()
                    if code == KafkaError._PARTITION_EOF:
                        trusted = True
                        if message.offset() >= end:
                            # Everything up to the partition's end was handed over (the
                            # consumer never jumps: settings) and the end is at or past
                            # the range's: the rest of it holds no records.
                            ended = True
                            left = messages[index + 1 :]
                            break
                        continue
                    if code == KafkaError._AUTO_OFFSET_RESET:
                        ended = self._after_reset(consumer, tp, previous, end)
                        stands_after = not ended
                    elif _transient(error):
                        self._wait_out(consumer, tp, name, error, previous)
                    else:
                        msg = f"Kafka read of {name} failed: {error}"
                        raise RuntimeError(msg)
                    # Assigned again (or done): the rest of the batch is not to be used,
                    # nor the position until the new assignment hands something over.
                    trusted = False
                    read = True  # not a quiet consumer: skip the position check
                    break
                trusted = True
                offset = message.offset()
                if offset >= end:
                    ended = True  # the consumer now stands past the range
                    left = messages[index:]
                    break
                if offset <= previous:
                    continue  # handed over already (never expected: a guard for the acks)
                kind, stamp = message.timestamp()
                if not kind or stamp < 0:
                    now_ms = now_ms or int(time.time() * 1000)
                    stamp = now_ms
                ack = new_ack((name, offset, previous, 1, 0))
                lines.append(new_line((message.value() or b"", f"{name}@{offset}", ack, -1)))
                times.append(stamp)
                previous = offset
                read = True
            # Nothing came, or only the partition's end before the range's: the rest may
            # hold no records (the consumer moves past transaction markers).
            if not read and not ended and trusted:
                ended = consumer.position([tp])[0].offset >= end
            if messages:
                heard = time.monotonic()
            elif not ended and time.monotonic() - heard > _STALLED_S:
                # Seen after a broker restart: an assigned consumer handed over nothing
                # for minutes, no error either, while the range's records were in the log.
                # A new consumer, assigned after the last line, fetches from nothing.
                self._say("Kafka read of %s: nothing for %.0f s; reconnecting", name, _STALLED_S)
                consumer.close()
                consumer = slot[0] = Consumer(self._settings)
                consumer.assign([TopicPartition(topic, partition, previous + 1)])
                trusted = False
                heard = time.monotonic()
        if stands_after:
            slot[1], slot[2] = end, left
        gap = new_ack((name, end - 1, previous, 1, 0)) if previous < end - 1 else None
        return lines, times, gap

    def _after_reset(self, consumer: Any, tp: Any, previous: int, end: int) -> bool:
        """Go on after the broker said the offset after ``previous`` is out of range.

        Returns True when the rest of the range expired (retention moved the log's start
        past it). Else the consumer is assigned again: at the log's start when the records
        after ``previous`` expired, or after a pause at the offset after ``previous``, when
        they did not (the broker is restarting, or a new leader has not caught up). The
        next line's ack, or the gap's, covers the expired offsets.
        """
        from confluent_kafka import KafkaException, TopicPartition  # noqa: PLC0415

        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=5, cached=False)
        except KafkaException:
            low = high = -1  # no answer: nothing is known to have expired
        if low >= end:
            return True
        if low > previous + 1:
            resume = low
        else:
            if 0 <= high <= previous:
                # The log ends before what was claimed: a topic deleted and made again,
                # or a log cut short. Nothing is acknowledged meanwhile.
                self._say(
                    "Kafka read of %s/%s: the log ends at %d, before offset %d, which was "
                    "claimed (topic recreated or truncated?); waiting for it",
                    tp.topic,
                    tp.partition,
                    high,
                    previous + 1,
                )
            time.sleep(_RETRY_S)
            resume = previous + 1
        consumer.assign([TopicPartition(tp.topic, tp.partition, resume)])
        return False

    def _wait_out(self, consumer: Any, tp: Any, name: str, error: Any, previous: int) -> None:
        """After a transient error (a broker away, a leader moving): wait, then go on."""
        from confluent_kafka import TopicPartition  # noqa: PLC0415

        self._say("Kafka read of %s: %s (reading on when it clears)", name, error)
        time.sleep(_RETRY_S)
        refresh_metadata(consumer, tp.topic)
        consumer.assign([TopicPartition(tp.topic, tp.partition, previous + 1)])

    def _say(self, message: str, *args: Any) -> None:
        """Log a warning, at most once a minute: a wait repeats it twice a second."""
        now = time.monotonic()
        if now - self._warned > 60:
            self._warned = now
            _LOG.warning(message, *args)

    def close(self) -> None:
        """Close every consumer; the reader is not used after."""
        for consumer, *_ in self._consumers.values():
            consumer.close()
        self._consumers.clear()


def _transient(error: Any) -> bool:
    """Whether a read error passes by itself: a broker away or restarting, a leader moving.

    A restarting broker reports its partitions unknown for a moment; so would a topic
    deleted for good, which the read then waits out, saying so once a minute.
    """
    from confluent_kafka import KafkaError  # noqa: PLC0415

    if error.fatal():
        return False
    return error.retriable() or error.code() in (
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.OFFSET_NOT_AVAILABLE,
    )


def refresh_metadata(consumer: Any, topic: str) -> None:
    """Ask the broker for ``topic``'s partitions and leaders again, now; never raises.

    Measured: a client that is assigned nothing keeps what a restarting broker first told
    it (the partition unknown, or led by nobody) until its metadata ages out, 15 minutes
    by default, and fails every end-offset request meanwhile. Asking for the topic
    replaces it. Waits up to a second, which also spaces the requests out.
    """
    from confluent_kafka import KafkaException  # noqa: PLC0415

    try:
        consumer.list_topics(topic, timeout=1.0)
    except KafkaException:
        time.sleep(0.2)  # the broker is away: asking again at once would only spin
