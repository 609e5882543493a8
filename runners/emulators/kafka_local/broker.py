"""The broker process: :class:`LocalKafka`, one KRaft broker and controller in ``java``.

Storage is formatted on first use only and keeps its cluster id, so a restart on the same
``data_dir`` keeps topics, records and committed offsets; the process never outlives us.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import logging
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Final

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata

from moesif_beam.runners.emulators.kafka_local.client import _admin, create_topic
from moesif_beam.runners.emulators.kafka_local.config import KafkaConfig, LocalKafkaError
from moesif_beam.runners.emulators.kafka_local.jars import (
    _java_executable,
    ensure_kafka_libs,
    java_version,
)
from moesif_beam.runners.engines.children import child_options

# One logger for the package; its clients log to the child logger ``client``.
_LOG = logging.getLogger(__package__)

_NODE_ID: Final = 1
_START_TIMEOUT_S: Final = 60.0
_LOG_DIR_NAME: Final = "kraft-combined-logs"
_BROKER_LOG: Final = "broker.log"
# broker.log is appended to across restarts; past this size it is rotated once at start so a
# long-lived data_dir does not grow without bound.
_BROKER_LOG_ROTATE_BYTES: Final = 50 * 1024 * 1024
_LOG_TAIL_LINES: Final = 40
_WILDCARD_HOSTS: Final = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 - names, not binds


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
