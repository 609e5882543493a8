"""The broker's settings (:class:`KafkaConfig`), the Kafka release we run, and our error."""

from __future__ import annotations

import dataclasses
import re
from typing import Final

KAFKA_VERSION: Final = "4.4.0"
"""The Apache Kafka release we run: the newest 4.x on Maven Central whose broker runs on Java 17.

Its classes are Java 17 bytecode (class file version 61); Kafka 4.x brokers require Java 17+.
"""

MIN_JAVA_VERSION: Final = 17
"""Kafka 4.x brokers need Java 17 or newer."""

_HEAP_RE: Final = re.compile(r"^[1-9][0-9]*[kKmMgG]?$")


class LocalKafkaError(RuntimeError):
    """The local broker cannot be had: no suitable Java, jars not fetched, or it did not start.

    The message says what is wrong and, for a broker that failed, ends with its log tail.
    """


@dataclasses.dataclass(frozen=True)
class KafkaConfig:
    """Settings of one local broker. Validated at construction (``ValueError`` if invalid).

    Attributes:
        data_dir: Directory for the broker's storage, configuration and ``broker.log``; created
            if missing. Reusing it keeps topics, records and committed offsets.
        port: PLAINTEXT listener port clients connect to; 0 picks a free port at the first
            :meth:`LocalKafka.start` (kept across restarts of that instance).
        host: Address the client listener binds and advertises. A wildcard address binds every
            interface but advertises ``127.0.0.1``.
        controller_port: KRaft controller listener port (always on ``127.0.0.1``); 0 picks a
            free port.
        heap: Maximum Java heap, as for ``-Xmx`` (e.g. ``512m``, ``1g``).
        version: Apache Kafka version; anything other than :data:`KAFKA_VERSION` needs ``mvn``.
        partitions: ``num.partitions``: partitions of auto-created topics.
    """

    data_dir: str
    port: int = 9092
    host: str = "127.0.0.1"
    controller_port: int = 0
    heap: str = "512m"
    version: str = KAFKA_VERSION
    partitions: int = 1

    def __post_init__(self) -> None:
        for name in ("port", "controller_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                msg = f"{name} must be between 0 and 65535, got {value}"
                raise ValueError(msg)
        if self.port and self.port == self.controller_port:
            msg = f"port and controller_port must differ, both are {self.port}"
            raise ValueError(msg)
        if self.partitions < 1:
            msg = f"partitions must be at least 1, got {self.partitions}"
            raise ValueError(msg)
        if not _HEAP_RE.match(self.heap):
            msg = f"heap must look like 512m or 2g, got {self.heap!r}"
            raise ValueError(msg)
        if not re.fullmatch(r"[0-9][0-9A-Za-z.\-]*", self.version):
            msg = f"version must be a Kafka release such as {KAFKA_VERSION}, got {self.version!r}"
            raise ValueError(msg)
        if not self.data_dir:
            msg = "data_dir must not be empty"
            raise ValueError(msg)
