"""Pytest plugin: how tests get a real Apache Kafka broker (register with ``pytest_plugins``).

The session's broker is the first of:

1. ``KAFKA_BOOTSTRAP_SERVERS`` from the environment (an external broker; it must answer);
2. a testcontainers Kafka in KRaft mode, where a Docker engine answers a ping (checked quickly
   and quietly: no engine means this option is skipped without a word);
3. the project's own :class:`moesif_beam.runners.emulators.kafka_local.LocalKafka`, with its
   data under pytest's temporary directory (jars from Maven Central, cached after the first
   run).

Fixtures:

* ``kafka_broker`` (session): an object with ``.bootstrap_servers``. When it is our own
  ``LocalKafka`` it also has ``.restart()``, ``.kill()``, ``.start()`` and ``.stop()``; tests that
  need those call :func:`local_broker_or_skip`, which skips (visibly, with the reason) on an
  external broker. A test that kills or stops the session broker must start it again; the
  ``kafka_topic`` factory also restarts a session broker a previous test left down.
* ``kafka_topic`` (function): a factory ``kafka_topic(partitions=1) -> str`` creating a uniquely
  named topic that is ready for producers and consumers; the topics are deleted afterwards.

Nothing is skipped silently: when no broker can be had at all, the fixture fails with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import pytest

from moesif_beam.runners.emulators.kafka_local import (
    KAFKA_VERSION,
    KafkaConfig,
    LocalKafka,
    LocalKafkaError,
    create_topic,
    delete_topics,
)
from moesif_beam.transforms.sources.kafka_topic import committed_offsets

# The image testcontainers' KafkaContainer is built and tested for (Confluent Platform 7.x,
# Kafka 3.x); its KRaft start script relies on that image's layout.
TESTCONTAINERS_IMAGE = os.environ.get("KAFKA_TEST_IMAGE", "confluentinc/cp-kafka:7.6.0")
DOCKER_PING_TIMEOUT_S = 2.0


class KafkaBroker(Protocol):
    """What every broker the fixture yields offers."""

    @property
    def bootstrap_servers(self) -> str: ...


@dataclass(frozen=True)
class ExternalKafka:
    """A broker this test session does not control (environment or container)."""

    bootstrap_servers: str
    source: str


def local_broker_or_skip(broker: KafkaBroker) -> LocalKafka:
    """Returns ``broker`` if it is our own ``LocalKafka``; skips the test (with why) otherwise."""
    if isinstance(broker, LocalKafka):
        return broker
    source = getattr(broker, "source", "an external broker")
    pytest.skip(f"needs the project's own LocalKafka to restart or kill; the broker is {source}")


def _check_answers(bootstrap_servers: str, source: str, timeout: float = 15.0) -> None:
    from confluent_kafka.admin import AdminClient

    # The logger kafka_local gives its own clients: librdkafka's connection errors go
    # to logging, not to the test run's stderr.
    client_log = logging.getLogger("moesif_beam.runners.emulators.kafka_local.client")
    config: dict[str, Any] = {"bootstrap.servers": bootstrap_servers, "logger": client_log}
    admin = AdminClient(config)
    try:
        metadata = admin.list_topics(timeout=timeout)
    except Exception as exc:
        pytest.fail(
            f"Kafka from {source} ({bootstrap_servers}) does not answer: {exc}", pytrace=False
        )
    if not metadata.brokers:
        pytest.fail(f"Kafka from {source} ({bootstrap_servers}) lists no brokers", pytrace=False)


def docker_engine_answers(timeout: float = DOCKER_PING_TIMEOUT_S) -> bool:
    """Whether a Docker engine answers a ping within ``timeout`` seconds; never raises or prints."""
    try:
        import docker
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=timeout)
    except Exception:  # no socket, bad DOCKER_HOST, no permission: all mean "no engine"
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            client.close()


@contextlib.contextmanager
def _testcontainers_kafka() -> Iterator[ExternalKafka]:
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:  # older testcontainers layouts
        from testcontainers.kafka import KafkaContainer

    with KafkaContainer(TESTCONTAINERS_IMAGE).with_kraft() as container:
        yield ExternalKafka(
            container.get_bootstrap_server(), f"testcontainers ({TESTCONTAINERS_IMAGE})"
        )


def pytest_report_header(config: pytest.Config) -> str:
    """Says where the Kafka for integration tests will come from (without probing anything)."""
    del config
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip():
        return f"kafka: KAFKA_BOOTSTRAP_SERVERS={os.environ['KAFKA_BOOTSTRAP_SERVERS'].strip()}"
    return (
        "kafka: testcontainers where a Docker engine answers, else "
        "moesif_beam.runners.emulators.kafka_local "
        f"(Apache Kafka {KAFKA_VERSION})"
    )


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """The session's real Kafka broker: environment, testcontainers, or our own LocalKafka."""
    from_env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if from_env:
        _check_answers(from_env, "KAFKA_BOOTSTRAP_SERVERS")
        yield ExternalKafka(from_env, "KAFKA_BOOTSTRAP_SERVERS")
        return

    container_problem = "no Docker engine answers"
    if docker_engine_answers():
        # Entered by hand so that a failure to *start* (e.g. the image cannot be pulled
        # offline) falls through to the local broker, while errors in tests propagate normally.
        stack = contextlib.ExitStack()
        try:
            broker: KafkaBroker = stack.enter_context(_testcontainers_kafka())
        except Exception as exc:
            stack.close()
            container_problem = f"the testcontainers Kafka did not start ({exc})"
            warnings.warn(
                f"a Docker engine answers but the Kafka container did not start ({exc}); "
                "using moesif_beam.runners.emulators.kafka_local instead",
                stacklevel=1,
            )
        else:
            with stack:
                yield broker
            return

    data_dir = tmp_path_factory.mktemp("kafka")
    local = LocalKafka(KafkaConfig(port=0, data_dir=str(data_dir)))
    try:
        local.start()
    except LocalKafkaError as exc:
        pytest.fail(
            "no Kafka broker for the tests: KAFKA_BOOTSTRAP_SERVERS is not set, "
            f"{container_problem}, and the local broker did not start: {exc}",
            pytrace=False,
        )
    try:
        yield local
    finally:
        local.stop()


def _topic_slug(text: str) -> str:
    # Kafka topic names allow [A-Za-z0-9._-] up to 249 characters.
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:80] or "topic"


@pytest.fixture
def kafka_topic(
    kafka_broker: KafkaBroker, request: pytest.FixtureRequest
) -> Iterator[Callable[..., str]]:
    """Factory ``kafka_topic(partitions=1, config=None) -> name`` of fresh topics, deleted after.

    Each topic has every partition led before the factory returns.
    """
    created: list[str] = []

    def make(partitions: int = 1, config: Mapping[str, str] | None = None) -> str:
        if isinstance(kafka_broker, LocalKafka) and not kafka_broker.running:
            kafka_broker.start()  # an earlier test stopped or killed the session broker
        name = f"{_topic_slug(request.node.name)}-{uuid.uuid4().hex[:10]}"
        create_topic(
            kafka_broker.bootstrap_servers,
            name,
            partitions,
            config=config,
        )
        created.append(name)
        return name

    yield make
    if isinstance(kafka_broker, LocalKafka) and not kafka_broker.running:
        return  # the test took the broker down; its data dir goes with the session
    try:
        delete_topics(kafka_broker.bootstrap_servers, created, timeout=15)
    except LocalKafkaError as exc:
        warnings.warn(f"could not delete test topics {created}: {exc}", stacklevel=1)


def produce(bootstrap: str, topic: str, values: list[bytes], partitions: int = 1) -> None:
    """Write ``values`` to ``topic``, round-robin over its first ``partitions`` partitions.

    Every value is written once: a value Kafka reports as not written for a reason that
    means it was never stored (see :data:`_NOT_WRITTEN`) is sent again, for up to 60 s,
    and any other failure fails the test. A broker just restarted can briefly describe a
    topic without all of its partitions, and a message sent to a partition it does not
    list then fails at once; the test must not start from records that were never
    written and blame the pipeline.
    """
    from confluent_kafka import Producer

    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 5, "message.max.bytes": 2_000_000}
    )
    pending = [(value, i % partitions) for i, value in enumerate(values)]
    # flush() only says the queue is empty: a message that failed for good leaves it too,
    # reported to this callback alone.
    again: list[tuple[bytes, int]] = []
    failed: list[str] = []

    def delivered(error: Any, message: Any) -> None:
        if error is None:
            return
        if error.code() in _NOT_WRITTEN:
            again.append((message.value(), message.partition()))
        else:
            failed.append(f"partition {message.partition()}: {error}")

    deadline = time.monotonic() + 60
    while True:
        for i, (value, partition) in enumerate(pending):
            producer.produce(topic, value=value, partition=partition, on_delivery=delivered)
            if i % 500 == 499:
                producer.flush()
        assert producer.flush(30) == 0
        assert not failed, f"{len(failed)} of {len(values)} records not written: {failed[:3]}"
        if not again:
            return
        assert time.monotonic() < deadline, f"{len(again)} records still refused after 60 s"
        time.sleep(0.5)
        pending, again[:] = list(again), []


def _not_written() -> frozenset[int]:
    from confluent_kafka import KafkaError

    # Refused before or by the partition's leader: the message was not stored.
    return frozenset(
        {
            KafkaError._UNKNOWN_PARTITION,
            KafkaError._UNKNOWN_TOPIC,
            KafkaError.UNKNOWN_TOPIC_OR_PART,
            KafkaError.NOT_LEADER_FOR_PARTITION,
            KafkaError.LEADER_NOT_AVAILABLE,
        }
    )


_NOT_WRITTEN = _not_written()


def committed(bootstrap: str, group: str, topic: str, partitions: int = 1) -> list[int]:
    """The offsets ``group`` has committed on ``topic``'s partitions, in partition order.

    A group the broker is still placing on a coordinator answers with a retriable error
    (``NOT_COORDINATOR``, ``COORDINATOR_LOAD_IN_PROGRESS``): asked again, for up to 15 s,
    as the pipeline itself asks (:func:`committed_offsets`).
    """
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return [tp.offset for tp in committed_offsets(consumer, tps, 15)]
    finally:
        consumer.close()
