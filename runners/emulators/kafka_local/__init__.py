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
"""

from __future__ import annotations

import argparse
import atexit
import base64
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Final

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

from moesif_beam.runners.engines.children import child_options

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

KAFKA_VERSION: Final = "4.4.0"
"""The Apache Kafka release we run: the newest 4.x on Maven Central whose broker runs on Java 17.

Its classes are Java 17 bytecode (class file version 61); Kafka 4.x brokers require Java 17+.
"""

MIN_JAVA_VERSION: Final = 17
"""Kafka 4.x brokers need Java 17 or newer."""

_SCALA_BINARY: Final = "2.13"
# Kafka 4.x logs through slf4j 1.7 (slf4j-api 1.7.36) onto log4j2 but leaves the binding to the
# distribution; this is the binding its tarball ships, at the log4j2 version Kafka 4.4.0 uses.
_LOG4J_SLF4J_BINDING: Final = "org.apache.logging.log4j:log4j-slf4j-impl:2.25.5"
_DEPENDENCY_PLUGIN: Final = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
_MAVEN_CENTRAL: Final = "https://repo1.maven.org/maven2"
_FETCH_PREFIX: Final = "libs-fetch-"

# The runtime classpath of kafka_2.13 plus the binding above, exactly as Maven resolves it
# (`dependency:copy-dependencies -DincludeScope=runtime`), for downloads without Maven. Only
# the pinned version has a list; other versions need `mvn`.
_PINNED_ARTIFACTS: Final[Mapping[str, str]] = {
    "4.4.0": """
        at.yawk.lz4:lz4-java:1.11.2
        com.dynatrace.hash4j:hash4j:0.22.0
        com.fasterxml.jackson.core:jackson-annotations:2.21
        com.fasterxml.jackson.core:jackson-core:2.21.7
        com.fasterxml.jackson.core:jackson-databind:2.21.7
        com.fasterxml.jackson.dataformat:jackson-dataformat-yaml:2.21.7
        com.fasterxml.jackson.datatype:jackson-datatype-jdk8:2.21.7
        com.github.ben-manes.caffeine:caffeine:3.2.0
        com.github.luben:zstd-jni:1.5.7-17
        com.google.re2j:re2j:1.8
        com.typesafe.scala-logging:scala-logging_2.13:3.9.6
        com.yammer.metrics:metrics-core:2.2.0
        commons-beanutils:commons-beanutils:1.11.0
        commons-collections:commons-collections:3.2.2
        commons-digester:commons-digester:2.1
        commons-logging:commons-logging:1.3.5
        commons-validator:commons-validator:1.10.1
        net.sf.jopt-simple:jopt-simple:5.0.4
        net.sourceforge.argparse4j:argparse4j:0.7.0
        org.apache.kafka:kafka-clients:4.4.0
        org.apache.kafka:kafka-coordinator-common:4.4.0
        org.apache.kafka:kafka-group-coordinator-api:4.4.0
        org.apache.kafka:kafka-group-coordinator:4.4.0
        org.apache.kafka:kafka-metadata:4.4.0
        org.apache.kafka:kafka-raft:4.4.0
        org.apache.kafka:kafka-server-common:4.4.0
        org.apache.kafka:kafka-server:4.4.0
        org.apache.kafka:kafka-share-coordinator:4.4.0
        org.apache.kafka:kafka-storage-api:4.4.0
        org.apache.kafka:kafka-storage:4.4.0
        org.apache.kafka:kafka-tools-api:4.4.0
        org.apache.kafka:kafka-transaction-coordinator:4.4.0
        org.apache.kafka:kafka_2.13:4.4.0
        org.apache.logging.log4j:log4j-api:2.25.5
        org.apache.logging.log4j:log4j-core:2.25.5
        org.apache.logging.log4j:log4j-slf4j-impl:2.25.5
        org.bitbucket.b_c:jose4j:0.9.6
        org.hdrhistogram:HdrHistogram:2.2.2
        org.jspecify:jspecify:1.0.0
        org.pcollections:pcollections:4.0.2
        org.scala-lang:scala-library:2.13.18
        org.scala-lang:scala-reflect:2.13.18
        org.slf4j:slf4j-api:1.7.36
        org.xerial.snappy:snappy-java:1.1.10.7
        org.yaml:snakeyaml:2.5
    """,
}

_NODE_ID: Final = 1
_START_TIMEOUT_S: Final = 60.0
_LOG_DIR_NAME: Final = "kraft-combined-logs"
_BROKER_LOG: Final = "broker.log"
# broker.log is appended to across restarts; past this size it is rotated once at start so a
# long-lived data_dir does not grow without bound.
_BROKER_LOG_ROTATE_BYTES: Final = 50 * 1024 * 1024
_LOG_TAIL_LINES: Final = 40
_HEAP_RE: Final = re.compile(r"^[1-9][0-9]*[kKmMgG]?$")
_WILDCARD_HOSTS: Final = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 - names, not binds

_LOG = logging.getLogger(__name__)
# librdkafka's own log lines (e.g. "Connect to ... failed" while a broker is starting or after
# it stopped) go here instead of stderr. The NullHandler keeps Python's last-resort handler from
# printing them when the application configured no logging; they still propagate to any handler
# the application did configure.
_CLIENT_LOG = logging.getLogger(f"{__name__}.client")
_CLIENT_LOG.addHandler(logging.NullHandler())


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


# --------------------------------------------------------------------------------------------
# Java and the jar cache


def _java_executable() -> str:
    """The ``java`` that runs the broker: ``$JAVA_HOME/bin/java`` if set, else the PATH's."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if found is None:
        msg = (
            f"Java {MIN_JAVA_VERSION}+ is needed to run the local Kafka broker, but no `java` "
            "was found on PATH or in JAVA_HOME; install a JDK/JRE 17 or newer"
        )
        raise LocalKafkaError(msg)
    return found


def _parse_java_version(text: str) -> int | None:
    """The feature version from ``java -version`` output (``1.8.0_1`` -> 8, ``17.0.2`` -> 17)."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    if match is None:
        return None
    major = int(match.group(1))
    if major == 1 and match.group(2) is not None:  # Java 8 and older report "1.x"
        return int(match.group(2))
    return major


@functools.cache
def java_version(java: str | None = None) -> int:
    """Returns the feature version (e.g. 17) of ``java``, checked once per executable.

    Raises:
        LocalKafkaError: If there is no ``java``, it cannot run, or it is older than
            :data:`MIN_JAVA_VERSION`.
    """
    java = java or _java_executable()
    try:
        probe = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        msg = f"cannot run {java} -version: {exc}"
        raise LocalKafkaError(msg) from exc
    version = _parse_java_version(probe.stderr + probe.stdout)
    if version is None:
        msg = f"cannot tell the version of {java} from: {(probe.stderr + probe.stdout).strip()!r}"
        raise LocalKafkaError(msg)
    if version < MIN_JAVA_VERSION:
        msg = (
            f"the local Kafka broker needs Java {MIN_JAVA_VERSION} or newer, but {java} is "
            f"Java {version}; install a newer JDK or point JAVA_HOME at one"
        )
        raise LocalKafkaError(msg)
    return version


def kafka_cache_dir(version: str = KAFKA_VERSION) -> Path:
    """Where the jars of Kafka ``version`` are cached (``.../moesif-beam/kafka-<version>``).

    ``$XDG_CACHE_HOME`` is used when it is set to an absolute path (relative values are invalid
    per the XDG spec and ignored), else ``~/.cache``.
    """
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return root / "moesif-beam" / f"kafka-{version}"


def _libs_complete(libs: Path, version: str) -> bool:
    # The directory only appears through an atomic rename of a finished download, so these
    # checks guard against later tampering (someone deleting jars), not against half downloads.
    required = (f"kafka_{_SCALA_BINARY}-{version}.jar", f"kafka-clients-{version}.jar")
    return all((libs / name).is_file() for name in required) and any(
        libs.glob("log4j-slf4j*-impl-*.jar")
    )


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive advisory lock on ``path`` (a no-op where ``fcntl`` is missing).

    Two processes starting a broker at once (e.g. pytest-xdist workers) then download once.
    """
    try:
        import fcntl  # noqa: PLC0415 - POSIX only; Windows simply goes without the lock
    except ImportError:
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def ensure_kafka_libs(version: str = KAFKA_VERSION) -> Path:
    """Returns the directory holding every jar the broker of ``version`` needs, fetching once.

    Guarantees: the returned directory is complete (it is published by renaming a finished
    download, so an interrupted fetch leaves no partial cache); when it is already cached,
    nothing touches the network; the first fetch prints one line to stderr.

    Raises:
        LocalKafkaError: If the jars cannot be fetched (no ``mvn`` for an unpinned version,
            Maven Central unreachable, a checksum mismatch), with the reason.
    """
    base = kafka_cache_dir(version)
    libs = base / "libs"
    if _libs_complete(libs, version):
        return libs
    base.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(base / ".lock"):
        if _libs_complete(libs, version):  # another process finished while we waited
            return libs
        if libs.exists():
            shutil.rmtree(libs)  # damaged after publication; fetch again
        # Leftovers of fetches that were killed before they could clean up; we hold the lock,
        # so no live fetch owns them.
        for stale in base.glob(f"{_FETCH_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        mvn = shutil.which("mvn")
        if mvn is None and version not in _PINNED_ARTIFACTS:
            msg = (
                f"cannot fetch Apache Kafka {version}: Maven (`mvn`) is not installed, and only "
                f"Kafka {', '.join(_PINNED_ARTIFACTS)} can be downloaded without it"
            )
            raise LocalKafkaError(msg)
        print(
            f"moesif-beam: fetching Apache Kafka {version} from Maven Central into {libs} "
            "(first use only)...",
            file=sys.stderr,
            flush=True,
        )
        with tempfile.TemporaryDirectory(prefix=_FETCH_PREFIX, dir=base) as work:
            staging = Path(work) / "libs"
            staging.mkdir()
            if mvn is not None:
                _fetch_with_maven(mvn, version, Path(work), staging)
            else:
                _fetch_pinned_over_https(version, staging)
            if not _libs_complete(staging, version):
                msg = f"fetching Apache Kafka {version} produced an incomplete set of jars"
                raise LocalKafkaError(msg)
            staging.rename(libs)  # atomic publication: the cache is all or nothing
    return libs


def _fetch_with_maven(mvn: str, version: str, work: Path, dest: Path) -> None:
    """Resolves the broker's runtime classpath with Maven and copies the jars into ``dest``."""
    group, artifact, binding_version = _LOG4J_SLF4J_BINDING.split(":")
    pom = textwrap.dedent(f"""\
        <project xmlns="http://maven.apache.org/POM/4.0.0">
          <modelVersion>4.0.0</modelVersion>
          <groupId>moesif-beam</groupId>
          <artifactId>kafka-local-classpath</artifactId>
          <version>1</version>
          <packaging>pom</packaging>
          <dependencies>
            <dependency>
              <groupId>org.apache.kafka</groupId>
              <artifactId>kafka_{_SCALA_BINARY}</artifactId>
              <version>{version}</version>
            </dependency>
            <dependency>
              <groupId>{group}</groupId>
              <artifactId>{artifact}</artifactId>
              <version>{binding_version}</version>
            </dependency>
          </dependencies>
        </project>
        """)
    (work / "pom.xml").write_text(pom, encoding="utf-8")
    command = [
        mvn,
        "-q",
        "-B",
        "-Dstyle.color=never",
        "-f",
        str(work / "pom.xml"),
        # A pinned plugin version: the same resolution on every Maven installation.
        f"{_DEPENDENCY_PLUGIN}:copy-dependencies",
        f"-DoutputDirectory={dest}",
        "-DincludeScope=runtime",
    ]
    try:
        result = subprocess.run(
            command,
            cwd=work,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
            **child_options(),  # an orphaned Maven would keep writing into a dead fetch
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        msg = f"Maven could not fetch Apache Kafka {version}: {exc}"
        raise LocalKafkaError(msg) from exc
    if result.returncode != 0:
        output = _strip_ansi(result.stdout + result.stderr).strip().splitlines()
        detail = "\n".join(output[-25:])
        msg = f"Maven could not fetch Apache Kafka {version} (exit {result.returncode}):\n{detail}"
        raise LocalKafkaError(msg)


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _fetch_pinned_over_https(version: str, dest: Path) -> None:
    """Downloads the pinned artifact list from Maven Central, each checked against its SHA-1."""
    coordinates = _PINNED_ARTIFACTS[version].split()
    repo = os.environ.get("MOESIF_BEAM_MAVEN_REPO", _MAVEN_CENTRAL).rstrip("/")
    # A few parallel downloads: ~45 files, most of the time is latency, not bandwidth.
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(_download_artifact, repo, c, dest) for c in coordinates]
        for future in concurrent.futures.as_completed(futures):
            future.result()


def _download_artifact(repo: str, coordinate: str, dest: Path) -> None:
    group, artifact, version = coordinate.split(":")
    name = f"{artifact}-{version}.jar"
    url = f"{repo}/{group.replace('.', '/')}/{artifact}/{version}/{name}"
    if not url.startswith(("https://", "http://")):
        msg = f"MOESIF_BEAM_MAVEN_REPO must be an http(s) URL, got {repo!r}"
        raise LocalKafkaError(msg)
    # SHA-1 because that is what Maven Central publishes; it guards against corrupt transfers.
    digest = hashlib.sha1(usedforsecurity=False)
    try:
        # The scheme is checked above: only http(s) URLs are opened.
        with urllib.request.urlopen(url + ".sha1", timeout=60) as response:  # noqa: S310
            expected = response.read().decode("ascii", "replace").split()[0].lower()
        with (
            urllib.request.urlopen(url, timeout=60) as response,  # noqa: S310
            (dest / name).open("wb") as out,
        ):
            while chunk := response.read(1 << 16):
                digest.update(chunk)
                out.write(chunk)
    except OSError as exc:
        msg = f"cannot download {url}: {exc}"
        raise LocalKafkaError(msg) from exc
    if digest.hexdigest() != expected:
        msg = f"checksum mismatch for {url}: expected SHA-1 {expected}, got {digest.hexdigest()}"
        raise LocalKafkaError(msg)


# --------------------------------------------------------------------------------------------
# Clients and topics


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


# --------------------------------------------------------------------------------------------
# The broker process


def _new_cluster_id() -> str:
    """A random Kafka cluster id, as ``kafka-storage random-uuid`` makes them.

    Kafka's Uuid is URL-safe base64 of 16 bytes without padding; like Kafka we never use an id
    that starts with ``-`` (it would read as a command-line flag).
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")
        if not text.startswith("-"):
            return text


def _free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct ports free on ``host`` right now (held together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(_family(host), socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _check_port_free(host: str, port: int, what: str) -> None:
    # SO_REUSEADDR as Java's ServerSocket sets it, so that the TIME_WAIT connections a previous
    # run of this broker left behind do not count as "in use"; a live listener still does.
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            msg = f"{what} port {port} on {host} is not available ({exc.strerror or exc})"
            raise LocalKafkaError(msg) from exc


def _read_properties(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "!")) and "=" in stripped:
            key, _, value = stripped.partition("=")
            values[key.strip()] = value.strip()
    return values


_LOG4J2_PROPERTIES: Final = """\
# Written by moesif-beam kafka-local. The broker logs to its stdout, which goes to broker.log.
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.target = SYSTEM_OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
# As in Kafka's own log4j2.yaml: per-request and authorizer logs are noise at INFO.
logger.request.name = kafka.request.logger
logger.request.level = warn
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = warn
"""

_RUNNING: set[LocalKafka] = set()
_RUNNING_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    """Stops brokers still running when the interpreter exits; never raises."""
    with _RUNNING_LOCK:
        brokers = list(_RUNNING)
    for broker in brokers:
        with contextlib.suppress(Exception):
            broker.stop(timeout=15)


atexit.register(_stop_all_at_exit)


class LocalKafka:
    """One single-node Apache Kafka broker (KRaft, combined roles) in a ``java`` subprocess.

    Guarantees:

    * :meth:`start` returns only when the broker on :attr:`bootstrap_servers` answers metadata
      requests with this ``data_dir``'s cluster id (not another broker that owns the port).
    * State in ``data_dir`` survives :meth:`stop`, :meth:`kill` and :meth:`restart`: topics,
      records and committed consumer-group offsets. Ports chosen with 0 stay the same for the
      life of this object.
    * The java process does not outlive its owner: :meth:`stop`, interpreter exit (atexit),
      and on Linux the kernel (``PR_SET_PDEATHSIG``, when started from the main thread: the
      signal fires when the starting *thread* exits) all end it.

    ``start``, ``stop``, ``kill`` and ``restart`` are serialized by an internal lock, so they
    may be called from several threads.
    """

    def __init__(self, config: KafkaConfig, *, start_timeout: float = _START_TIMEOUT_S) -> None:
        self.config = config
        self.start_timeout = start_timeout
        self.data_dir = Path(config.data_dir).resolve()
        self._port: int | None = config.port or None
        self._controller_port: int | None = config.controller_port or None
        self._proc: subprocess.Popen[bytes] | None = None
        self._cluster_id: str | None = None
        self._log_offset = 0
        self._lock = threading.RLock()

    # ---- properties

    @property
    def port(self) -> int:
        """The client (PLAINTEXT) port; known before start unless configured as 0."""
        if self._port is None:
            msg = "the port is chosen at start(); start the broker first"
            raise LocalKafkaError(msg)
        return self._port

    @property
    def controller_port(self) -> int:
        """The KRaft controller port; known before start unless configured as 0."""
        if self._controller_port is None:
            msg = "the controller port is chosen at start(); start the broker first"
            raise LocalKafkaError(msg)
        return self._controller_port

    @property
    def advertised_host(self) -> str:
        """The host clients are told to connect to."""
        return "127.0.0.1" if self.config.host in _WILDCARD_HOSTS else self.config.host

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for clients' ``bootstrap.servers``, e.g. ``127.0.0.1:9092``."""
        host = self.advertised_host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def cluster_id(self) -> str | None:
        """The KRaft cluster id of ``data_dir``, once formatted."""
        if self._cluster_id is None:
            meta = self.log_dir / "meta.properties"
            if meta.is_file():
                self._cluster_id = _read_properties(meta).get("cluster.id")
        return self._cluster_id

    @property
    def log_dir(self) -> Path:
        """Kafka's ``log.dirs`` (records and KRaft metadata), inside ``data_dir``."""
        return self.data_dir / _LOG_DIR_NAME

    @property
    def log_path(self) -> Path:
        """``broker.log``: the broker's stdout and stderr, appended across runs."""
        return self.data_dir / _BROKER_LOG

    @property
    def pid(self) -> int | None:
        """The java process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        """Whether the java process is alive (it may still be starting or stopping)."""
        return self._proc is not None and self._proc.poll() is None

    # ---- lifecycle

    def start(self) -> LocalKafka:
        """Starts the broker and waits until it serves metadata; a no-op if already running.

        Fetches the jars on first use, formats ``data_dir`` on first use only, and writes
        ``server.properties`` for the current ports.

        Returns:
            This broker, for chaining.

        Raises:
            LocalKafkaError: No suitable Java, jars unavailable, a port taken, or the broker
                did not come up within ``start_timeout`` (the message ends with the log tail).
                The java process is stopped before the error is raised.
        """
        with self._lock:
            if self.running:
                return self
            java = _java_executable()
            java_version(java)
            libs = ensure_kafka_libs(self.config.version)
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if self._port is None:
                self._port = _free_ports(self.config.host, 1)[0]
            if self._controller_port is None:
                # The controller listens on loopback; of two distinct free ports there, at least
                # one differs from the client port.
                loopback = _free_ports("127.0.0.1", 2)
                self._controller_port = next(p for p in loopback if p != self._port)
            _check_port_free(self.config.host, self.port, "client")
            _check_port_free("127.0.0.1", self.controller_port, "controller")
            properties = self._write_configuration()
            self._format_storage_once(java, libs)
            self._launch(java, libs, properties)
            try:
                self._wait_until_serving()
            except BaseException:
                # Never leave a half-started broker behind, whatever interrupted us.
                self.kill()
                raise
            return self

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stops the broker cleanly: SIGTERM, then SIGKILL if it is still alive after ``timeout``.

        A clean stop lets Kafka flush and close its logs, so the next start needs no recovery.

        Returns:
            The java process's exit status (143 after a clean SIGTERM shutdown, -9 if it had to
            be killed), or None if it was not running.
        """
        with self._lock:
            proc = self._proc
            if proc is None:
                return None
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    _LOG.warning("kafka broker did not stop within %.0f s; killing it", timeout)
                    proc.kill()
                    proc.wait()
            self._forget(proc)
            return proc.returncode

    def kill(self) -> int | None:
        """Kills the broker with SIGKILL, as a crash would; ``data_dir`` stays recoverable.

        The next :meth:`start` recovers the logs and takes about 10 s longer than usual: the
        restarted controller first waits out the dead broker's session (Kafka's
        ``broker.session.timeout.ms``, 9 s) before it accepts the new registration.

        Returns:
            The exit status (-9), or None if it was not running.
        """
        with self._lock:
            proc = self._proc
            if proc is None:
                return None
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self._forget(proc)
            return proc.returncode

    def restart(self, timeout: float = 30.0) -> LocalKafka:
        """Stops (cleanly, see :meth:`stop`) and starts again on the same ports and data_dir."""
        with self._lock:
            self.stop(timeout)
            return self.start()

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        *,
        config: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Creates a topic on this broker and waits until it is usable; see :func:`create_topic`."""
        create_topic(self.bootstrap_servers, name, partitions, config=config, timeout=timeout)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines ``broker.log`` got from the current (or last) run."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(self._log_offset)
                data = handle.read()
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        ports = f"{self._port or '?'}/{self._controller_port or '?'}"
        state = "running" if self.running else "stopped"
        return f"LocalKafka({self.data_dir}, ports {ports}, {state})"

    # ---- internals

    def _forget(self, proc: subprocess.Popen[bytes]) -> None:
        if self._proc is proc:
            self._proc = None
        with _RUNNING_LOCK:
            _RUNNING.discard(self)

    def _server_properties(self, log_dirs: Path) -> str:
        host, port, cport = self.config.host, self.port, self.controller_port
        settings = {
            "process.roles": "broker,controller",
            "node.id": str(_NODE_ID),
            # A static quorum (controller.quorum.voters): voters are named by id, so the
            # controller port may differ between runs on the same data_dir, unlike a dynamic
            # quorum whose voter endpoints are stored in the metadata log.
            "controller.quorum.voters": f"{_NODE_ID}@127.0.0.1:{cport}",
            "controller.listener.names": "CONTROLLER",
            "listeners": f"PLAINTEXT://{_bracket(host)}:{port},CONTROLLER://127.0.0.1:{cport}",
            "advertised.listeners": f"PLAINTEXT://{_bracket(self.advertised_host)}:{port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(log_dirs),
            "num.partitions": str(self.config.partitions),
            "auto.create.topics.enable": "true",
            "default.replication.factor": "1",
            # A single node cannot hold the production defaults (3 replicas, min ISR 2).
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # One partition per internal topic instead of 50: the first consumer group and
            # transaction then start in well under a second. Written identically every run,
            # so existing groups keep their coordinator partition.
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.num.partitions": "1",
            # Consumers in tests and local runs join one at a time; do not wait 3 s for more.
            "group.initial.rebalance.delay.ms": "0",
        }
        lines = [f"{key}={value}" for key, value in settings.items()]
        return "# Written by moesif-beam kafka-local at every start.\n" + "\n".join(lines) + "\n"

    def _write_configuration(self) -> Path:
        properties = self.data_dir / "server.properties"
        _write_atomically(properties, self._server_properties(self.log_dir))
        _write_atomically(self.data_dir / "log4j2.properties", _LOG4J2_PROPERTIES)
        return properties

    def _java_command(self, java: str, libs: Path, main_class: str, *args: str) -> list[str]:
        return [
            java,
            f"-Xmx{self.config.heap}",
            # Kafka's own choice of collector and pause target (kafka-run-class.sh).
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            # A broker out of memory should die visibly, not limp along.
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            # log4j2 would stop logging in its own shutdown hook, racing Kafka's: without it the
            # whole clean shutdown is in broker.log (the console appender needs no flushing).
            "-Dlog4j2.shutdownHookEnabled=false",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-cp",
            str(libs / "*"),
            main_class,
            *args,
        ]

    def _format_storage_once(self, java: str, libs: Path) -> None:
        """Formats ``log_dir`` with a new cluster id unless it already holds a formatted store.

        Formatting goes to a sibling directory that is renamed into place when complete, so an
        interrupted format is redone rather than mistaken for a formatted store.
        """
        if (self.log_dir / "meta.properties").is_file():
            return
        staging = self.data_dir / f"{_LOG_DIR_NAME}.formatting"
        if staging.exists():
            shutil.rmtree(staging)
        properties = self.data_dir / "format.properties"
        _write_atomically(properties, self._server_properties(staging))
        cluster_id = _new_cluster_id()
        command = self._java_command(
            java,
            libs,
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            cluster_id,
            "--config",
            str(properties),
        )
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=120,
                check=False,
                **child_options(),
            )
        properties.unlink(missing_ok=True)
        if result.returncode != 0 or not (staging / "meta.properties").is_file():
            msg = (
                f"formatting Kafka storage in {staging} failed (exit {result.returncode}); "
                f"last lines of {self.log_path}:\n{self.log_tail()}"
            )
            raise LocalKafkaError(msg)
        staging.rename(self.log_dir)
        self._cluster_id = cluster_id

    def _launch(self, java: str, libs: Path, properties: Path) -> None:
        log_path = self.log_path
        if log_path.exists() and log_path.stat().st_size > _BROKER_LOG_ROTATE_BYTES:
            log_path.replace(log_path.with_name(_BROKER_LOG + ".1"))
        self._log_offset = log_path.stat().st_size if log_path.exists() else 0
        command = self._java_command(java, libs, "kafka.Kafka", str(properties))
        with log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                **child_options(),
            )
        with _RUNNING_LOCK:
            _RUNNING.add(self)
        _LOG.info("started kafka broker pid %s on %s", self._proc.pid, self.bootstrap_servers)

    def _wait_until_serving(self) -> None:
        """Returns once the broker answers metadata requests with our cluster id."""
        proc = self._proc
        assert proc is not None
        expected_cluster = self.cluster_id
        deadline = time.monotonic() + self.start_timeout
        admin: AdminClient | None = None
        last = "the port is not open yet"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                msg = (
                    f"the Kafka broker exited with status {proc.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
                raise LocalKafkaError(msg)
            # Poll the TCP port first: a client pointed at a closed port logs connection
            # errors and backs off, which would slow the start down.
            if admin is None:
                try:
                    socket.create_connection((self.advertised_host, self.port), 0.5).close()
                except OSError:
                    time.sleep(0.1)
                    continue
                admin = _admin(self.bootstrap_servers)
            try:
                metadata: ClusterMetadata = admin.list_topics(timeout=2.0)
            except KafkaException as exc:
                last = str(exc)
                continue
            if expected_cluster is not None and metadata.cluster_id != expected_cluster:
                msg = (
                    f"{self.bootstrap_servers} is served by another Kafka cluster "
                    f"({metadata.cluster_id}, expected {expected_cluster})"
                )
                raise LocalKafkaError(msg)
            if metadata.brokers:
                return
            last = "no broker registered yet"
        msg = (
            f"the Kafka broker did not serve metadata on {self.bootstrap_servers} within "
            f"{self.start_timeout:.0f} s ({last}); last lines of {self.log_path}:\n"
            f"{self.log_tail()}"
        )
        raise LocalKafkaError(msg)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


# --------------------------------------------------------------------------------------------
# Command line


class _StopRequested(Exception):
    """Raised by the signal handler when SIGTERM/SIGINT arrives while the broker starts."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moesif-beam kafka-local",
        description=(
            "Run a real single-node Apache Kafka broker (KRaft) in the foreground until SIGTERM "
            f"or Ctrl-C. Kafka {KAFKA_VERSION} is fetched from Maven Central on first use."
        ),
    )
    parser.add_argument("--port", type=int, default=9092, help="client port (0 = a free port)")
    parser.add_argument(
        "--data_dir", default="kafka-data", help="storage directory, kept across runs"
    )
    parser.add_argument(
        "--partitions", type=int, default=1, help="partitions of auto-created topics"
    )
    parser.add_argument("--heap", default="512m", help="maximum Java heap, e.g. 512m or 1g")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--controller_port", type=int, default=0, help="KRaft controller port (0 = a free port)"
    )
    parser.add_argument("--version", default=KAFKA_VERSION, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the broker in the foreground: ``moesif-beam kafka-local --port P --data_dir D``.

    Prints exactly one line to stdout once the broker serves clients,
    ``kafka listening on HOST:PORT (data in DIR)``, then runs until SIGTERM or SIGINT and stops
    the broker cleanly.

    Args:
        argv: Command-line arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        0 after a clean stop (also when stopped while still starting), 1 if the broker cannot
        start or dies on its own, 2 for invalid arguments.
    """
    args = _build_parser().parse_args(argv)
    try:
        config = KafkaConfig(
            data_dir=args.data_dir,
            port=args.port,
            host=args.host,
            controller_port=args.controller_port,
            heap=args.heap,
            version=args.version,
            partitions=args.partitions,
        )
    except ValueError as exc:
        print(f"moesif-beam kafka-local: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()
    starting = True

    def request_stop(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        stop.set()
        if starting:
            # Interrupt a start that may take up to a minute; start() kills its half-started
            # broker on the way out.
            raise _StopRequested

    previous: dict[int, Any] = {}
    # Signal handlers can only be installed from the main thread.
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, request_stop)
    broker = LocalKafka(config)
    try:
        try:
            broker.start()
        except _StopRequested:
            return 0
        except LocalKafkaError as exc:
            print(f"moesif-beam kafka-local: {exc}", file=sys.stderr)
            return 1
        finally:
            starting = False
        print(
            f"kafka listening on {broker.bootstrap_servers} (data in {broker.data_dir})",
            flush=True,
        )
        try:
            # A timed wait keeps the main thread responsive to signals and notices a broker
            # that dies on its own.
            while not stop.wait(0.5):
                if not broker.running:
                    print(
                        "moesif-beam kafka-local: the broker exited unexpectedly; last lines of "
                        f"{broker.log_path}:\n{broker.log_tail()}",
                        file=sys.stderr,
                    )
                    return 1
        finally:
            broker.stop()
        return 0
    finally:
        broker.kill()  # no-op after a clean stop; covers every other way out
        for restored, handler in previous.items():
            signal.signal(restored, handler)

