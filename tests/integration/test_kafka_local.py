"""Integration tests of runners/emulators/kafka_local/ against the real Apache Kafka broker it runs.

The round trip runs on the session broker (``kafka_broker`` from tests/kafka_support.py, any
real Kafka); tests of LocalKafka's own lifecycle (restart, stop, the CLI) start their own
LocalKafka, because they take the broker down.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from moesif_beam.runners.emulators.kafka_local import (
    KAFKA_VERSION,
    KafkaConfig,
    LocalKafka,
    LocalKafkaError,
    create_topic,
    ensure_kafka_libs,
    kafka_cache_dir,
)
from moesif_beam.runners.emulators.kafka_local.jars import _parse_java_version

if TYPE_CHECKING:  # registered by conftest's pytest_plugins, after assertion rewriting
    from tests.kafka_support import KafkaBroker

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CLIENT_LOG = logging.getLogger("moesif_beam.runners.emulators.kafka_local.client")


# ---- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def broker_java_pids(data_dir: Path) -> list[int]:
    """Live ``kafka.Kafka`` java processes whose command line names ``data_dir``.

    Other sessions may run their own brokers on this machine, so we only look for ours. A zombie
    has an empty command line and is not counted (it holds no ports, files or memory).
    """
    marker = str(data_dir.resolve())
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [arg.decode("utf-8", "replace") for arg in args]
        if "kafka.Kafka" in text and any(marker in arg for arg in text):
            pids.append(int(entry.name))
    return pids


def admin_client(bootstrap: str) -> AdminClient:
    config: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": CLIENT_LOG}
    return AdminClient(config)


def position(msg: Message) -> tuple[int, int]:
    partition, offset = msg.partition(), msg.offset()
    assert partition is not None
    assert offset is not None
    return partition, offset


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def produce(bootstrap: str, topic: str, count: int, prefix: str) -> dict[bytes, tuple[int, int]]:
    """Produces ``count`` keyed records; returns value -> (partition, offset) as acknowledged."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "logger": CLIENT_LOG})
    acked: dict[bytes, tuple[int, int]] = {}
    errors: list[str] = []

    def on_delivery(err: object, msg: Message) -> None:
        if err is not None:
            errors.append(str(err))
            return
        value = msg.value()
        assert value is not None
        acked[value] = position(msg)

    for i in range(count):
        producer.produce(
            topic, key=f"key-{i}".encode(), value=f"{prefix}-{i}".encode(), on_delivery=on_delivery
        )
    assert producer.flush(30) == 0, "records still in flight after 30 s"
    assert errors == []
    assert len(acked) == count
    return acked


def consumer(bootstrap: str, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "logger": CLIENT_LOG,
        }
    )


def consume(
    client: Consumer, topic: str, count: int, timeout: float = 30.0
) -> dict[bytes, tuple[int, int]]:
    """Subscribes and polls until ``count`` records arrived: value -> (partition, offset)."""
    client.subscribe([topic])
    seen: dict[bytes, tuple[int, int]] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < count and time.monotonic() < deadline:
        msg = client.poll(0.5)
        if msg is None:
            continue
        assert msg.error() is None, msg.error()
        value = msg.value()
        assert value is not None
        assert value not in seen, f"{value!r} delivered twice"
        seen[value] = position(msg)
    assert len(seen) == count, f"got {len(seen)} of {count} records within {timeout} s"
    return seen


# ---- pure parts (cheap)


def test_cache_dir_follows_xdg_cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kafka_cache_dir("9.9.9") == tmp_path / "moesif-beam" / "kafka-9.9.9"
    # The XDG spec says relative values are invalid; they must not scatter caches into the cwd.
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")
    assert kafka_cache_dir() == Path.home() / ".cache" / "moesif-beam" / f"kafka-{KAFKA_VERSION}"


def test_java_version_parsing() -> None:
    assert _parse_java_version('openjdk version "17.0.15" 2025-04-15') == 17
    assert _parse_java_version('java version "1.8.0_292"') == 8
    assert _parse_java_version('openjdk version "21" 2023-09-19') == 21
    assert _parse_java_version("no version here") is None


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="partitions"):
        KafkaConfig(data_dir="d", partitions=0)
    with pytest.raises(ValueError, match="heap"):
        KafkaConfig(data_dir="d", heap="lots")
    with pytest.raises(ValueError, match="differ"):
        KafkaConfig(data_dir="d", port=9500, controller_port=9500)


def test_busy_port_fails_fast_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = LocalKafka(KafkaConfig(port=port, data_dir=str(tmp_path / "kafka")))
        with pytest.raises(LocalKafkaError, match=f"client port {port}"):
            broker.start()
    assert not broker.running
    assert broker_java_pids(tmp_path / "kafka") == []


# ---- the session broker


def test_broker_serves_metadata(kafka_broker: KafkaBroker) -> None:
    admin = admin_client(kafka_broker.bootstrap_servers)
    metadata = admin.list_topics(timeout=10)
    assert metadata.cluster_id
    assert len(metadata.brokers) >= 1
    if isinstance(kafka_broker, LocalKafka):
        # Our own broker: the one advertised endpoint is ours, and the cluster is data_dir's.
        [(node_id, described)] = metadata.brokers.items()
        assert node_id == 1
        assert f"{described.host}:{described.port}" == kafka_broker.bootstrap_servers
        assert metadata.cluster_id == kafka_broker.cluster_id
        assert kafka_broker.running
        properties = (kafka_broker.data_dir / "server.properties").read_text()
        assert "process.roles=broker,controller" in properties


def test_jar_cache_is_reused_without_fetching(
    kafka_broker: KafkaBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    del kafka_broker  # the session broker has populated the cache, whichever broker it is
    ensure_kafka_libs()
    capsys.readouterr()

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"fetched {args[0] if args else kwargs} with the cache full")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(urllib.request, "urlopen", no_network)
        libs = ensure_kafka_libs()
    assert "fetching" not in capsys.readouterr().err
    names = {path.name for path in libs.iterdir()}
    assert f"kafka_2.13-{KAFKA_VERSION}.jar" in names
    assert f"kafka-clients-{KAFKA_VERSION}.jar" in names
    assert any(name.startswith("log4j-slf4j-impl-") for name in names)  # the logging backend
    assert not any(p.name.startswith("libs-fetch-") for p in libs.parent.iterdir())


def test_produce_and_consume_100_records_on_two_partitions(
    kafka_broker: KafkaBroker, kafka_topic: Callable[..., str]
) -> None:
    topic = kafka_topic(partitions=2)
    bootstrap = kafka_broker.bootstrap_servers
    admin = admin_client(bootstrap)
    described = admin.list_topics(topic=topic, timeout=10).topics[topic]
    assert sorted(described.partitions) == [0, 1]
    assert all(p.leader >= 0 for p in described.partitions.values())

    acked = produce(bootstrap, topic, 100, "record")
    # The keys spread over both partitions (the default partitioner hashes them).
    assert {partition for partition, _ in acked.values()} == {0, 1}

    client = consumer(bootstrap, f"group-{uuid.uuid4().hex}")
    try:
        seen = consume(client, topic, 100)
    finally:
        client.close()
    # Every record came back exactly once, at the partition and offset it was acknowledged at.
    assert seen == acked
    for partition in (0, 1):
        offsets = sorted(off for part, off in seen.values() if part == partition)
        assert offsets == list(range(len(offsets)))


# ---- our own brokers: lifecycle


def test_offsets_and_records_survive_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "kafka"
    with LocalKafka(KafkaConfig(port=0, data_dir=str(data_dir))) as broker:
        bootstrap, cluster_id, first_pid = broker.bootstrap_servers, broker.cluster_id, broker.pid
        topic = "durable"
        broker.create_topic(topic, partitions=2)
        acked = produce(bootstrap, topic, 20, "before")

        group = "restart-group"
        client = consumer(bootstrap, group)
        try:
            consume(client, topic, 20)
            committed = client.commit(asynchronous=False)
        finally:
            client.close()
        assert committed is not None
        expected = {tp.partition: tp.offset for tp in committed}
        assert sum(expected.values()) == 20

        broker.restart()
        assert broker.bootstrap_servers == bootstrap  # same port after a restart
        assert broker.cluster_id == cluster_id  # same storage, not re-formatted
        assert broker.pid != first_pid

        # Committed offsets were read back from the restarted broker.
        client = consumer(bootstrap, group)
        try:
            partitions = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
            after = client.committed(partitions, timeout=30)
            assert {tp.partition: tp.offset for tp in after} == expected
            # ...and the group resumes there: it sees only what is produced after the restart.
            fresh = produce(bootstrap, topic, 5, "after")
            assert consume(client, topic, 5) == fresh
        finally:
            client.close()

        # Every record from before the restart is still there, where it was.
        reader = consumer(bootstrap, f"reader-{uuid.uuid4().hex}")
        try:
            everything = consume(reader, topic, 25)
        finally:
            reader.close()
        assert {k: v for k, v in everything.items() if k.startswith(b"before-")} == acked


def test_stop_is_clean_and_leaves_no_java(tmp_path: Path) -> None:
    data_dir = tmp_path / "kafka"
    broker = LocalKafka(KafkaConfig(port=0, data_dir=str(data_dir))).start()
    pid = broker.pid
    assert pid is not None
    assert broker_java_pids(data_dir) == [pid]

    code = broker.stop()
    # 143 = 128 + SIGTERM: the JVM runs Kafka's shutdown hook (a full, orderly shutdown) and
    # then exits with the signal's status; that is what Kafka 4.4 does (measured). 0 is also
    # clean: it is what a broker whose main thread calls exit(0) first would return.
    assert code in (0, 143)
    assert not broker.running
    # Kafka writes this marker only at the end of an orderly shutdown of its log manager.
    assert (broker.log_dir / ".kafka_cleanshutdown").is_file()
    assert broker_java_pids(data_dir) == []
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert broker.stop() is None  # stopping again is harmless


# ---- the command line


def _start_cli(data_dir: Path, port: int, stderr_path: Path) -> subprocess.Popen[str]:
    with stderr_path.open("w") as stderr:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "moesif_beam.runners.emulators.kafka_local"),
                *("--port", str(port), "--data_dir", str(data_dir), "--partitions", "2"),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )


def _first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        pytest.fail(f"no output from the CLI within {timeout} s")


def test_cli_serves_and_exits_zero_on_sigterm(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "kafka", free_port()
    proc = _start_cli(data_dir, port, tmp_path / "stderr.txt")
    try:
        line = _first_line(proc, timeout=120)
        assert line == f"kafka listening on 127.0.0.1:{port} (data in {data_dir.resolve()})\n"
        [java_pid] = broker_java_pids(data_dir)

        bootstrap = f"127.0.0.1:{port}"
        create_topic(bootstrap, "cli-topic", partitions=2)
        acked = produce(bootstrap, "cli-topic", 10, "cli")
        client = consumer(bootstrap, "cli-group")
        try:
            assert consume(client, "cli-topic", 10) == acked
        finally:
            client.close()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stdout is not None
    assert proc.stdout.read() == ""  # the listening line is the CLI's only output
    assert broker_java_pids(data_dir) == []
    with pytest.raises(ProcessLookupError):
        os.kill(java_pid, 0)
    assert (data_dir / "kraft-combined-logs" / ".kafka_cleanshutdown").is_file()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_broker_dies_with_a_killed_parent(tmp_path: Path) -> None:
    data_dir = tmp_path / "kafka"
    proc = _start_cli(data_dir, free_port(), tmp_path / "stderr.txt")
    try:
        # No need to wait for the broker to be ready: once java runs, the parent may die.
        wait_until(lambda: len(broker_java_pids(data_dir)) == 1, 60, "the broker's java process")
        [java_pid] = broker_java_pids(data_dir)
        proc.kill()  # SIGKILL: no atexit, no signal handler, only the kernel can clean up
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_until(lambda: broker_java_pids(data_dir) == [], 10, f"java {java_pid} to die")
