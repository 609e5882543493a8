"""Client helpers that work against any broker: creating and deleting topics.

The admin clients made here log through the logger
``moesif_beam.runners.emulators.kafka_local.client``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from moesif_beam.runners.emulators.kafka_local.config import LocalKafkaError

if TYPE_CHECKING:
    from collections.abc import Mapping


# librdkafka's own log lines (e.g. "Connect to ... failed" while a broker is starting or after
# it stopped) go here instead of stderr. The NullHandler keeps Python's last-resort handler from
# printing them when the application configured no logging; they still propagate to any handler
# the application did configure.
_CLIENT_LOG = logging.getLogger(__name__)
_CLIENT_LOG.addHandler(logging.NullHandler())


def _admin(bootstrap_servers: str) -> AdminClient:
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap_servers,
        "logger": _CLIENT_LOG,
        "log.connection.close": False,
    }
    return AdminClient(config)


def create_topic(
    bootstrap_servers: str,
    name: str,
    partitions: int = 1,
    *,
    config: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> None:
    """Creates topic ``name`` and returns once every partition has a leader.

    Works against any broker. An existing topic with the same partition count is accepted as
    is, so the call is idempotent.

    Args:
        bootstrap_servers: ``host:port[,host:port...]`` of the cluster.
        name: Topic name.
        partitions: Number of partitions.
        config: Topic-level configuration (e.g. ``{"retention.ms": "-1"}``).
        timeout: Seconds to wait for the whole operation.

    Raises:
        LocalKafkaError: If the topic cannot be created, exists with another partition count,
            or has no leader for every partition within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    admin = _admin(bootstrap_servers)
    topic = NewTopic(name, partitions, 1, config=dict(config or {}))
    future = admin.create_topics([topic], operation_timeout=timeout, request_timeout=timeout)[name]
    try:
        future.result(timeout=timeout)
    except KafkaException as exc:
        if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
            msg = f"cannot create topic {name!r}: {exc}"
            raise LocalKafkaError(msg) from exc
    # Creation returns when the controller committed the topic; producers and consumers need the
    # broker's metadata to show a leader for every partition.
    last = "no metadata yet"
    while time.monotonic() < deadline:
        try:
            metadata = admin.list_topics(topic=name, timeout=max(0.5, deadline - time.monotonic()))
        except KafkaException as exc:
            last = str(exc)
            continue
        described = metadata.topics.get(name)
        if described is not None and described.error is None:
            leaders = [p.leader for p in described.partitions.values()]
            if len(leaders) != partitions and len(leaders) > 0:
                msg = f"topic {name!r} exists with {len(leaders)} partitions, not {partitions}"
                raise LocalKafkaError(msg)
            if len(leaders) == partitions and all(leader >= 0 for leader in leaders):
                return
            last = f"leaders {leaders}"
        elif described is not None:
            last = str(described.error)
        time.sleep(0.05)
    msg = f"topic {name!r} was not usable within {timeout:.0f} s ({last})"
    raise LocalKafkaError(msg)


def delete_topics(bootstrap_servers: str, names: list[str], *, timeout: float = 30.0) -> None:
    """Deletes topics ``names``; topics that do not exist are ignored.

    Raises:
        LocalKafkaError: If a deletion fails for another reason.
    """
    if not names:
        return
    admin = _admin(bootstrap_servers)
    futures = admin.delete_topics(list(names), operation_timeout=timeout, request_timeout=timeout)
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
        except KafkaException as exc:
            if exc.args[0].name() != "UNKNOWN_TOPIC_OR_PART":
                msg = f"cannot delete topic {name!r}: {exc}"
                raise LocalKafkaError(msg) from exc
