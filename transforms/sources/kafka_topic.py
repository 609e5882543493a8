"""A Kafka topic's partitions, and the offsets a read of each starts and stops at.

Resolved before a run, in the launching process: a backfill (``--kafka_stop``) needs both
ends of every partition as offsets, and a misspelt topic or an unreachable broker must be
one clear line before anything starts, not a failure inside a worker. The reader
(:mod:`moesif_beam.transforms.sources.kafka`) takes the partitions from here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moesif_beam.transforms.common.timefmt import parse_time_ms
from moesif_beam.transforms.sources.drain import OPEN_END

__all__ = [
    "CLIENT_LOG",
    "KafkaPartition",
    "KafkaSourceConfig",
    "committed_offsets",
    "partitions_of",
    "resolve_partitions",
    "retry_transient",
]

# librdkafka's own log lines while partitions are resolved before a run. An unreachable
# broker gives hundreds of them; the command reports the failure in one line, and shows
# these only with --log_level DEBUG. Named after the reader's module, where it was first:
# a logging setup that names it keeps working.
CLIENT_LOG = logging.getLogger("moesif_beam.transforms.sources.kafka.client")


@dataclass(frozen=True)
class KafkaSourceConfig:
    """Where and how to read.

    Attributes:
        bootstrap_servers: ``host:port[,host:port]``.
        topic: the topic to read.
        group_id: the consumer group whose committed offsets say where to resume.
        start: where a partition without a committed offset starts: ``earliest``,
            ``latest`` or an ISO 8601 time (the first record at or after it).
        stop: None for an unbounded read; ``now`` or an ISO 8601 time for a bounded one
            (records before it).
        consumer_config: extra librdkafka settings (security, timeouts...).
        discovery_interval: in unbounded reads, how often to look for new partitions.
    """

    bootstrap_servers: str
    topic: str
    group_id: str
    start: str = "earliest"
    stop: str | None = None
    consumer_config: Mapping[str, str] = field(default_factory=dict)
    discovery_interval: float = 30.0

    def __post_init__(self) -> None:
        for name in ("bootstrap_servers", "topic", "group_id"):
            if not getattr(self, name):
                msg = f"--kafka_{name} is required with --source kafka"
                raise ValueError(msg)
        if self.start not in ("earliest", "latest"):
            _time_ms(self.start, "--kafka_start")
        if self.stop not in (None, "now"):
            _time_ms(self.stop, "--kafka_stop")
        if self.discovery_interval <= 0:
            msg = f"--kafka_discovery_interval must be positive, got {self.discovery_interval}"
            raise ValueError(msg)

    @property
    def bounded(self) -> bool:
        """True for a backfill (a stop was given)."""
        return self.stop is not None

    def consumer_settings(self) -> dict[str, Any]:
        """Librdkafka settings for a reader: no auto-commit, no auto offset store."""
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "group.id": self.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            **self.consumer_config,
        }


def _time_ms(text: str, flag: str) -> int:
    try:
        return parse_time_ms(text)
    except ValueError as exc:
        msg = f"{flag} must be earliest, latest, now or an ISO 8601 time, got {text!r}"
        raise ValueError(msg) from exc


@dataclass(frozen=True)
class KafkaPartition:
    """One partition's offset range: ``[start, stop)``, ``stop == OPEN_END`` if unbounded."""

    topic: str
    partition: int
    start: int
    stop: int


def resolve_partitions(config: KafkaSourceConfig, timeout: float = 30.0) -> list[KafkaPartition]:
    """Resolve every partition of the topic to an offset range, before the run.

    Start: the group's committed offset when it has one (so a restarted job resumes where
    its deliveries were confirmed), else ``config.start``. Stop: ``now`` is the partition's
    current end; a time is the first offset at or after it; none means unbounded.

    Raises:
        ValueError: the topic does not exist, or Kafka does not answer in time.
    """
    from confluent_kafka import KafkaException  # noqa: PLC0415 - optional at import

    try:
        return _resolve(config, timeout)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else exc
        reason = error.str() if hasattr(error, "str") else str(error)
        msg = (
            f"cannot read Kafka at {config.bootstrap_servers} ({reason}); check "
            "--kafka_bootstrap_servers and that the broker is up"
        )
        raise ValueError(msg) from None


def partitions_of(consumer: Any, topic: str, timeout: float) -> list[Any] | None:
    """``topic``'s partitions as ``TopicPartition``s in order; None if the broker lists none."""
    from confluent_kafka import TopicPartition  # noqa: PLC0415

    found = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        return None
    return [TopicPartition(topic, p) for p in sorted(found.partitions)]


def _resolve(config: KafkaSourceConfig, timeout: float) -> list[KafkaPartition]:
    from confluent_kafka import Consumer  # noqa: PLC0415

    consumer = Consumer(config.consumer_settings(), logger=CLIENT_LOG)
    try:
        partitions = partitions_of(consumer, config.topic, timeout)
        if partitions is None:
            msg = f"Kafka topic {config.topic!r} not found at {config.bootstrap_servers}"
            raise ValueError(msg)
        committed = {
            tp.partition: tp.offset for tp in committed_offsets(consumer, partitions, timeout)
        }
        start_ms = None if config.start in ("earliest", "latest") else _time_ms(config.start, "")
        stop_ms = None if config.stop in (None, "now") else _time_ms(config.stop, "")
        ranges = []
        for tp in partitions:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout)
            start = committed.get(tp.partition, -1)
            if start < 0:
                start = _offset_at(consumer, tp, config.start, start_ms, low, high, timeout)
            if config.stop is None:
                stop = OPEN_END
            elif stop_ms is None:
                stop = high
            else:
                stop = _offset_at(consumer, tp, "time", stop_ms, low, high, timeout)
            ranges.append(KafkaPartition(config.topic, tp.partition, start, max(start, stop)))
        return ranges
    finally:
        consumer.close()


def retry_transient(call: Any, timeout: float) -> Any:
    """Call ``call()``, retrying Kafka's transient errors until ``timeout`` seconds pass.

    A broker that just started (or moved the group) answers NOT_COORDINATOR or
    COORDINATOR_LOAD_IN_PROGRESS for a moment; those are retriable by Kafka's own rules.
    """
    from confluent_kafka import KafkaError, KafkaException  # noqa: PLC0415

    # librdkafka does not flag these retriable on this call, though Kafka's protocol does.
    transient = {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
    }
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            retriable = error is not None and (error.retriable() or error.code() in transient)
            if not retriable or time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def committed_offsets(consumer: Any, partitions: list[Any], timeout: float) -> list[Any]:
    """The group's committed offsets, retrying while the group coordinator is not ready."""
    return list(retry_transient(lambda: consumer.committed(partitions, timeout=timeout), timeout))


def _offset_at(
    consumer: Any,
    tp: Any,
    where: str,
    time_ms: int | None,
    low: int,
    high: int,
    timeout: float,
) -> int:
    from confluent_kafka import TopicPartition  # noqa: PLC0415

    if where == "earliest":
        return int(low)
    if where == "latest" or time_ms is None:
        return int(high)
    found = consumer.offsets_for_times(
        [TopicPartition(tp.topic, tp.partition, time_ms)], timeout=timeout
    )[0]
    # -1: no record at or after that time, so the answer is the end of the partition.
    return int(high) if found.offset < 0 else int(found.offset)
