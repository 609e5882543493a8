"""Consumer lag per partition, as Kafka's own tools report it: log end offset minus committed.

moesif-beam commits a partition's offset only past records that are done (delivered,
duplicate or dead-lettered; transforms/sources/offsets.py), so this lag counts every record
that is not done yet: unread, and read but in flight. It is what a restart would read
again, and it is the lag ``kafka-consumer-groups.sh --describe`` shows for the group.

The launcher asks the broker itself, from a thread of its own: it needs no worker to say
anything, so it is the same on every runner, and a stuck pipeline shows as a lag that
grows. A partition the group has not committed on yet counts from where the run started
reading it (its resolved start), or from its first offset when it was discovered during
the run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moesif_beam.transforms.sources.kafka_topic import CLIENT_LOG, KafkaSourceConfig, partitions_of

__all__ = ["LAG_INTERVAL_S", "KafkaLag", "PartitionLag", "consumer_lag"]

_LOG = logging.getLogger(__name__)

# Seconds between two looks at the broker; Prometheus scrapes every 15 s by default.
LAG_INTERVAL_S = 5.0


def consumer_lag(end: int, committed: int, start: int) -> int:
    """Records of a partition not done yet.

    Args:
        end: the log end offset (the high watermark: the next offset to be written).
        committed: the group's committed offset (the next offset to read), negative when
            the group has none.
        start: where the run began reading the partition, used when nothing is committed.

    Returns:
        ``end - position``, never negative (a log truncated below the position has no lag).
    """
    position = committed if committed >= 0 else start
    return max(0, end - position)


@dataclass(frozen=True)
class PartitionLag:
    """One partition at the last look: log end offset, committed offset (-1: none), lag."""

    end: int
    committed: int
    lag: int


class KafkaLag:
    """Polls the topic's partitions every ``interval`` seconds while started; thread-safe.

    :meth:`start` takes the first look before it returns, so the lag is known as soon as
    the endpoint serves (a broker that does not answer then leaves it unknown, and it is
    retried at the next interval). A failed look keeps the last values; the time of the
    last successful look is :attr:`polled_at`.
    """

    def __init__(
        self,
        config: KafkaSourceConfig,
        starts: Mapping[int, int],
        *,
        interval: float = LAG_INTERVAL_S,
        timeout: float = 10.0,
    ) -> None:
        if interval <= 0 or timeout <= 0:
            msg = f"interval and timeout must be positive, got {interval}, {timeout}"
            raise ValueError(msg)
        self.topic = config.topic
        self._config = config
        self._starts = dict(starts)
        self._interval = interval
        self._timeout = timeout
        self._lock = threading.Lock()
        self._latest: dict[int, PartitionLag] = {}
        self._polled_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Any = None
        self._failing = False

    @property
    def polled_at(self) -> float | None:
        """Unix time of the last successful look; None before the first."""
        with self._lock:
            return self._polled_at

    def partitions(self) -> dict[int, PartitionLag]:
        """Every partition at the last successful look, by partition number."""
        with self._lock:
            return dict(self._latest)

    def poll(self) -> None:
        """Look at the broker once; logs (once per failing spell) and keeps the old values."""
        try:
            latest = self._look()
        except Exception as exc:  # a broker that is away: say so once, keep serving
            if not self._failing:
                _LOG.warning("consumer lag of %s: the broker did not answer: %s", self.topic, exc)
            self._failing = True
            return
        self._failing = False
        with self._lock:
            self._latest = latest
            self._polled_at = time.time()

    def _look(self) -> dict[int, PartitionLag]:
        from confluent_kafka import Consumer  # noqa: PLC0415

        if self._consumer is None:
            # Never subscribes, so it never joins the group: it only reads its offsets.
            self._consumer = Consumer(self._config.consumer_settings(), logger=CLIENT_LOG)
        consumer = self._consumer
        tps = partitions_of(consumer, self.topic, self._timeout)
        if tps is None:
            msg = f"topic {self.topic!r} not found"
            raise RuntimeError(msg)
        committed = {
            tp.partition: tp.offset for tp in consumer.committed(tps, timeout=self._timeout)
        }
        latest = {}
        for tp in tps:
            low, high = consumer.get_watermark_offsets(tp, timeout=self._timeout, cached=False)
            done = int(committed.get(tp.partition, -1))
            start = self._starts.get(tp.partition, int(low))
            latest[tp.partition] = PartitionLag(
                int(high), max(done, -1), consumer_lag(int(high), done, start)
            )
        return latest

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.poll()

    def start(self) -> KafkaLag:
        """Take the first look, then go on looking in a daemon thread."""
        self.poll()
        self._thread = threading.Thread(target=self._run, name="kafka-lag", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop looking and close the consumer (waits for a look under way)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
