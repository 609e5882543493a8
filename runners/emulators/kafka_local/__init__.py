"""A real single-node Apache Kafka broker (KRaft, combined broker and controller) on this machine.

Tests, benchmarks and laptop runs need a Kafka that behaves like production Kafka, not a mock.
This module runs the genuine Apache Kafka broker in a ``java`` subprocess, with no Docker and no
ZooKeeper:

* **Jars** come from Maven Central: ``org.apache.kafka:kafka_2.13:<version>``, its runtime
  dependencies (transitively) and the log4j2 binding for slf4j, so that the broker's own logs
  are written to a file. They are resolved once per version into
  ``$XDG_CACHE_HOME/moesif-beam/kafka-<version>/libs`` (``~/.cache/...`` by default), with
  ``mvn`` when it is installed (honouring the user's Maven settings, mirrors and ``~/.m2``)
  and otherwise over HTTPS from a pinned list of artifacts (only for :data:`KAFKA_VERSION`),
  each checked against Maven Central's SHA-1. The cache is published with an atomic rename, so
  an interrupted download never leaves a half cache; later runs never touch the network. The
  first download prints one line to stderr.
* **Storage** lives in ``data_dir``: it is formatted on first use only and keeps its cluster
  id, so a restart on the same ``data_dir`` keeps topics, records and committed consumer-group
  offsets. ``server.properties``, ``log4j2.properties`` and ``broker.log`` (the broker's
  stdout and stderr) are written there too.
* **Lifecycle**: :meth:`LocalKafka.start` returns only once the broker serves metadata for our
  cluster id; :meth:`LocalKafka.stop` shuts it down cleanly (SIGTERM, SIGKILL only after a
  timeout). The java process never outlives us: it is stopped by ``stop()``, at interpreter
  exit, and, on Linux, killed by the kernel if the Python process dies
  (``PR_SET_PDEATHSIG``).

Typical use in a test::

    with LocalKafka(KafkaConfig(port=0, data_dir=str(tmp_path))) as kafka:
        kafka.create_topic("events", partitions=2)
        produce(kafka.bootstrap_servers)

From the command line: ``moesif-beam kafka-local --port 9092 --data_dir ./kafka-data`` or
``python -m moesif_beam.runners.emulators.kafka_local --port 9092 --data_dir ./kafka-data``.

The package, by concern: ``config`` (:class:`KafkaConfig`, the release we run), ``jars`` (Java
and the jars from Maven Central or the cache), ``broker`` (:class:`LocalKafka`, the process),
``client`` (topic helpers for any broker; its clients log to
``moesif_beam.runners.emulators.kafka_local.client``) and ``cli`` (the command line).
"""

from moesif_beam.runners.emulators.kafka_local.broker import LocalKafka
from moesif_beam.runners.emulators.kafka_local.cli import main
from moesif_beam.runners.emulators.kafka_local.client import create_topic, delete_topics
from moesif_beam.runners.emulators.kafka_local.config import (
    KAFKA_VERSION,
    MIN_JAVA_VERSION,
    KafkaConfig,
    LocalKafkaError,
)
from moesif_beam.runners.emulators.kafka_local.jars import (
    ensure_kafka_libs,
    java_version,
    kafka_cache_dir,
)

__all__ = [
    "KAFKA_VERSION",
    "MIN_JAVA_VERSION",
    "KafkaConfig",
    "LocalKafka",
    "LocalKafkaError",
    "create_topic",
    "delete_topics",
    "ensure_kafka_libs",
    "java_version",
    "kafka_cache_dir",
    "main",
]
