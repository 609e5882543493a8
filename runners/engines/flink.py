"""Beam's Flink job server, provisioned from Maven Central and run as our own child process.

Beam's shaded ``beam-runners-flink-*-job-server`` jars are not served from Maven Central, but
the runner module is, with every dependency, at one version: ``beam-runners-flink-1.19``
2.62.0 (the newest that resolves whole; see the README's runner section). Its jar holds the
job server's main class, so on first use ``mvn dependency:copy-dependencies`` (a generated
POM) resolves that classpath into ``~/.cache/moesif-beam/flink-jobserver-2.62.0/``, showing
Maven's download on stderr, and the job server runs from it.

One line of Beam is changed first, as for Prism: Beam's gRPC servers (the job service, the
artifact service, and in every Flink task manager the workers' control, data, state,
logging and provisioning servers) bind every interface, unauthenticated, whatever host they
are given. Provisioning fetches Beam's source of ``ServerFactory`` at the same version,
makes it bind the address it was asked for (loopback), compiles it and puts it first on the
classpath. Flink's own endpoints are bound to 127.0.0.1 by the configuration written here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path
from typing import Final

from moesif_beam.runners.engines.children import (
    child_options,
    free_port,
    log_tail,
    stop_process,
)
from moesif_beam.runners.locks import exclusive_lock

__all__ = [
    "FLINK_JOBSERVER_VERSION",
    "JAVA_FLAGS",
    "LOCAL_MASTERS",
    "FlinkError",
    "FlinkJobServer",
    "ensure_flink_jobserver",
    "flink_cache_root",
    "java_executable",
    "local_cluster_file",
    "local_worker_pool",
    "loopback_bind",
    "start_flink_job_server",
    "unbounded_sdk_send_queues",
]

FLINK_JOBSERVER_VERSION: Final = "2.62.0"
"""The Beam version of the Flink runner: the newest whose classpath Maven Central serves whole."""

_RUNNER: Final = f"org.apache.beam:beam-runners-flink-1.19:{FLINK_JOBSERVER_VERSION}"
# The runner logs through slf4j 1.7 and ships no binding: without one its log is empty.
_LOG_BINDING: Final = "org.slf4j:slf4j-simple:1.7.30"
_SOURCES: Final = f"org.apache.beam:beam-sdks-java-core:{FLINK_JOBSERVER_VERSION}:jar:sources"
_DEPENDENCY_PLUGIN: Final = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
MAIN_CLASS: Final = "org.apache.beam.runners.flink.FlinkJobServerDriver"
LOCAL_MASTERS: Final = frozenset({"[local]", "[auto]"})
"""``--flink_master`` values that run an embedded Flink inside the job server."""

# The class whose servers bind every interface, and the one line that makes them bind the
# address asked for (loopback: every caller asks for 127.0.0.1 or localhost).
_SERVER_FACTORY: Final = "org/apache/beam/sdk/fn/server/ServerFactory.java"
_BIND_ANY: Final = "NettyServerBuilder.forPort(socket.getPort())"
_BIND_ASKED: Final = "NettyServerBuilder.forAddress(socket)"
_PATCH_JAR: Final = "beam-loopback-servers.jar"
_FETCH_PREFIX: Final = "fetch-"

MIN_JAVA_VERSION: Final = 17
# Flink 1.19 on Java 17: the module openings its own launch scripts pass (env.java.opts.all).
JAVA_FLAGS: Final = (
    "--add-exports=java.base/sun.net.util=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports=java.security.jgss/sun.security.krb5=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.net=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/java.nio=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.invoke=ALL-UNNAMED",
    "--add-opens=java.base/java.text=ALL-UNNAMED",
    "--add-opens=java.base/java.time=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent.locks=ALL-UNNAMED",
)


class FlinkError(RuntimeError):
    """The Flink job server or cluster cannot be had: no Java or Maven, a failed fetch, a start."""


def flink_cache_root() -> Path:
    """``$XDG_CACHE_HOME/moesif-beam`` (when absolute), else ``~/.cache/moesif-beam``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return root / "moesif-beam"


def jobserver_dir(version: str = FLINK_JOBSERVER_VERSION) -> Path:
    """Where the job server's classpath is cached."""
    return flink_cache_root() / f"flink-jobserver-{version}"


def java_executable() -> str:
    """``$JAVA_HOME/bin/java`` if set, else the PATH's ``java``, checked to be Java 17+.

    Raises:
        FlinkError: no ``java``, or an older one.
    """
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        msg = f"Flink needs Java {MIN_JAVA_VERSION}+; no `java` on PATH or in JAVA_HOME"
        raise FlinkError(msg)
    probe = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    match = re.search(r'version "(\d+)', probe.stderr + probe.stdout)
    if match is None or int(match.group(1)) < MIN_JAVA_VERSION:
        msg = f"Flink needs Java {MIN_JAVA_VERSION}+; {java} is {probe.stderr.strip()[:80]!r}"
        raise FlinkError(msg)
    return java


def loopback_bind(source: str) -> str:
    """Beam's ``ServerFactory.java`` with its servers bound to the address they are given.

    Raises:
        FlinkError: the source does not have the one line this expects (another Beam
            version): a job server that listens everywhere would be silently worse.
    """
    if source.count(_BIND_ANY) != 1:
        msg = f"cannot bind Beam's servers to loopback: {_BIND_ANY} is not in the source once"
        raise FlinkError(msg)
    return source.replace(_BIND_ANY, _BIND_ASKED)


def _complete(directory: Path) -> bool:
    libs = directory / "libs"
    return (directory / _PATCH_JAR).is_file() and any(libs.glob("beam-runners-flink-1.19-*.jar"))


def _classpath(directory: Path) -> str:
    # The patched class first: the JVM (and Flink's child-first user class loader, which
    # gets these jars in this order) loads it instead of Beam's.
    return f"{directory / _PATCH_JAR}{os.pathsep}{directory / 'libs'}{os.sep}*"


def ensure_flink_jobserver(version: str = FLINK_JOBSERVER_VERSION) -> str:
    """Return the job server's Java classpath, resolving it from Maven Central on first use.

    The cache is published by an atomic rename of a finished fetch, so an interrupted one
    leaves nothing half done; once cached, nothing touches the network.

    Raises:
        FlinkError: no Java 17+, no ``mvn``, or Maven could not resolve the runner.
    """
    target = jobserver_dir(version)
    if _complete(target):
        return _classpath(target)
    java_executable()
    mvn = shutil.which("mvn")
    if mvn is None:
        msg = "the Flink runner's classpath is resolved with Maven: install `mvn` (3.6+)"
        raise FlinkError(msg)
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.parent / f".flink-jobserver-{version}.lock"):
        if _complete(target):  # another process finished while we waited
            return _classpath(target)
        for stale in target.parent.glob(f"{_FETCH_PREFIX}flink-jobserver-*"):
            shutil.rmtree(stale, ignore_errors=True)  # killed fetches; we hold the lock
        print(
            f"moesif-beam: fetching Beam's Flink runner {version} and its dependencies "
            f"(about 160 jars, 150 MB) from Maven Central into {target} (first use only)...",
            file=sys.stderr,
            flush=True,
        )
        with tempfile.TemporaryDirectory(
            prefix=f"{_FETCH_PREFIX}flink-jobserver-", dir=target.parent
        ) as work:
            staging = Path(work) / "jobserver"
            (staging / "libs").mkdir(parents=True)
            _resolve(mvn, version, Path(work), staging / "libs")
            _build_patch(mvn, Path(work), staging)
            if not _complete(staging):
                msg = f"fetching Beam's Flink runner {version} produced an incomplete classpath"
                raise FlinkError(msg)
            if target.exists():
                shutil.rmtree(target)  # damaged after publication
            staging.rename(target)
    print(f"moesif-beam: Flink job server {version} ready.", file=sys.stderr, flush=True)
    return _classpath(target)


def _maven(mvn: str, args: list[str], work: Path, what: str) -> None:
    """Run Maven with its download lines going to our stderr (the user sees the fetch)."""
    command = [mvn, "-B", "-Dstyle.color=never", *args]
    try:
        result = subprocess.run(
            command,
            cwd=work,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=1800,
            check=False,
            **child_options(),  # an orphaned Maven would keep writing into a dead fetch
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        msg = f"Maven could not fetch {what}: {exc}"
        raise FlinkError(msg) from exc
    for line in result.stdout.splitlines():
        if line.startswith(("Downloaded from", "[ERROR]")):
            print(f"  {line}", file=sys.stderr, flush=True)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.strip().splitlines()[-20:])
        msg = f"Maven could not fetch {what} (exit {result.returncode}):\n{tail}"
        raise FlinkError(msg)


def _resolve(mvn: str, version: str, work: Path, libs: Path) -> None:
    dependencies = "".join(
        textwrap.dedent(f"""
            <dependency>
              <groupId>{group}</groupId>
              <artifactId>{artifact}</artifactId>
              <version>{release}</version>
            </dependency>""")
        for group, artifact, release in (
            (*_RUNNER.split(":")[:2], version),
            tuple(_LOG_BINDING.split(":")),
        )
    )
    pom = textwrap.dedent("""\
        <project xmlns="http://maven.apache.org/POM/4.0.0">
          <modelVersion>4.0.0</modelVersion>
          <groupId>moesif-beam</groupId>
          <artifactId>flink-jobserver-classpath</artifactId>
          <version>1</version>
          <packaging>pom</packaging>
          <dependencies>{dependencies}
          </dependencies>
        </project>
        """).format(dependencies=textwrap.indent(dependencies, "    "))
    (work / "pom.xml").write_text(pom, encoding="utf-8")
    _maven(
        mvn,
        [
            "-f",
            str(work / "pom.xml"),
            f"{_DEPENDENCY_PLUGIN}:copy-dependencies",
            f"-DoutputDirectory={libs}",
            "-DincludeScope=runtime",
        ],
        work,
        f"Beam's Flink runner {version}",
    )


def _build_patch(mvn: str, work: Path, staging: Path) -> None:
    """Fetch Beam's ``ServerFactory`` source, bind it to loopback, compile it into a jar."""
    sources = work / "sources"
    _maven(
        mvn,
        [
            f"{_DEPENDENCY_PLUGIN}:copy",
            f"-Dartifact={_SOURCES}",
            f"-DoutputDirectory={sources}",
        ],
        work,
        "Beam's Java SDK source",
    )
    javac = shutil.which("javac")
    jar = shutil.which("jar")
    if javac is None or jar is None:
        msg = "binding the Flink job server to loopback compiles one class: install a JDK 17"
        raise FlinkError(msg)
    source_jar = next(sources.glob("*-sources.jar"))
    with zipfile.ZipFile(source_jar) as archive:
        text = archive.read(_SERVER_FACTORY).decode("utf-8")
    java_file = work / "src" / _SERVER_FACTORY
    java_file.parent.mkdir(parents=True)
    java_file.write_text(loopback_bind(text), encoding="utf-8")
    classes = work / "classes"
    compile_args = [str(classes), str(java_file)]
    for command in (
        [
            javac,
            "-nowarn",
            "--release",
            "11",
            "-cp",
            f"{staging / 'libs'}{os.sep}*",
            "-d",
            *compile_args,
        ],
        [jar, "cf", str(staging / _PATCH_JAR), "-C", str(classes), "."],
    ):
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            msg = f"building the loopback patch failed: {result.stderr[-2000:]}"
            raise FlinkError(msg)


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    """Wait until ``port`` accepts on 127.0.0.1; raise if ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            msg = f"{what} exited at start (code {process.returncode})"
            raise FlinkError(msg)
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    msg = f"{what} did not listen on port {port} within {timeout:.0f}s"
    raise FlinkError(msg)


# The embedded Flink's endpoints on loopback, its memory sized for a small machine.
_EMBEDDED_CONF: Final = """\
jobmanager.bind-host: 127.0.0.1
jobmanager.rpc.address: 127.0.0.1
taskmanager.bind-host: 127.0.0.1
taskmanager.host: 127.0.0.1
rest.bind-address: 127.0.0.1
rest.address: 127.0.0.1
"""


class FlinkJobServer:
    """Beam's Flink job server as our child: loopback only, in its own session, dying with us.

    ``flink_master`` is ``[local]`` (an embedded Flink in the job server's JVM) or the
    ``host:port`` of a cluster's REST endpoint. Its log and its staged artifacts go to
    ``work_dir`` (the run's private directory).
    """

    def __init__(self, classpath: str, flink_master: str, work_dir: str) -> None:
        self._classpath = classpath
        self._master = "[local]" if flink_master in LOCAL_MASTERS else flink_master
        self._work = Path(work_dir)
        self.log_path = str(self._work / "flink-jobserver.log")
        self._process: subprocess.Popen[bytes] | None = None
        self.endpoint = ""

    def start(self, timeout: float = 60.0) -> str:
        """Start the job server and return its job endpoint once it listens."""
        conf = self._work / "flink-conf"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "flink-conf.yaml").write_text(_EMBEDDED_CONF, encoding="utf-8")
        job_port, artifact_port = free_port(), free_port()
        command = [
            java_executable(),
            *JAVA_FLAGS,
            "-Djava.net.preferIPv4Stack=true",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
            "-Dorg.slf4j.simpleLogger.log.org.apache.beam=info",
            "-cp",
            self._classpath,
            MAIN_CLASS,
            "--flink-master",
            self._master,
            "--flink-conf-dir",
            str(conf),
            "--job-host",
            "127.0.0.1",
            "--job-port",
            str(job_port),
            "--artifact-port",
            str(artifact_port),
            "--expansion-port",
            "-1",  # no cross-language transforms: no expansion service
            "--artifacts-dir",
            str(self._work / "flink-artifacts"),
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=dict(os.environ, FLINK_CONF_DIR=str(conf)),
            **child_options(),  # its own session, and it dies if we are killed
        )
        log.close()
        try:
            wait_for_port(job_port, self._process, timeout, "the Flink job server")
        except FlinkError as exc:
            self.stop()
            msg = f"{exc}{log_tail(self.log_path)}"
            raise FlinkError(msg) from None
        self.endpoint = f"127.0.0.1:{job_port}"
        return self.endpoint

    def stop(self) -> None:
        """Stop the job server (SIGTERM, then SIGKILL after 15 s)."""
        process, self._process = self._process, None
        stop_process(process)


def _flink_flags(beam_args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in (
        "--runner",
        "--flink_master",
        "--job_endpoint",
        "--environment_type",
        "--parallelism",
        "--sdk_worker_parallelism",
    ):
        parser.add_argument(flag)
    known, _ = parser.parse_known_args(beam_args)
    return known


def local_cluster_file(port: int) -> Path:
    """Where ``moesif-beam flink-local`` on REST port ``port`` says where its workers are."""
    return flink_cache_root() / "flink-local" / f"127.0.0.1-{port}.json"


def local_worker_pool(flink_master: str) -> str | None:
    """The Python worker pool of a running ``flink-local`` at ``flink_master``, if there is one."""
    host, _, port = flink_master.removeprefix("http://").rstrip("/").rpartition(":")
    if host not in {"127.0.0.1", "localhost"} or not port.isdigit():
        return None
    try:
        found = json.loads(local_cluster_file(int(port)).read_text())
        os.kill(int(found["pid"]), 0)  # a file left by a killed flink-local is no answer
    except (OSError, ValueError, KeyError, TypeError):
        return None
    pool = found.get("worker_pool")
    return str(pool) if pool else None


def start_flink_job_server(
    beam_args: list[str], work_dir: str
) -> tuple[FlinkJobServer | None, list[str]]:
    """For ``--runner FlinkRunner``, start our job server and point the run at it.

    With ``--flink_master [local]`` (or Beam's default ``[auto]``) Flink runs embedded in the
    job server and the Python workers in this process (LOOPBACK). With ``host:port`` the job
    goes to that cluster; its Python workers are the worker pool of a ``moesif-beam
    flink-local`` there, or the one ``--environment_type EXTERNAL --environment_config``
    names. A run that gave ``--job_endpoint`` uses that job server instead.

    Returns:
        The started job server (None when the run does not need one) and the Beam flags.

    Raises:
        FlinkError: the job server could not be provisioned or started, or the workers of a
            cluster run are not known.
    """
    flags = _flink_flags(beam_args)
    if (flags.runner or "").rsplit(".", 1)[-1] != "FlinkRunner" or flags.job_endpoint:
        return None, beam_args
    master = (flags.flink_master or "[auto]").strip()
    extra: list[str] = []
    if master not in LOCAL_MASTERS and not flags.environment_type:
        pool = local_worker_pool(master)
        if pool is None:
            msg = (
                f"--flink_master {master}: say where the cluster's Python workers are: "
                "--environment_type EXTERNAL --environment_config HOST:PORT of a worker pool "
                "(python -m apache_beam.runners.worker.worker_pool_main) started from this "
                "environment beside each task manager (moesif-beam flink-local starts one)"
            )
            raise FlinkError(msg)
        extra = pool_worker_flags(beam_args, pool)
    if master in LOCAL_MASTERS:
        unbounded_sdk_send_queues()  # the LOOPBACK workers run in this process
    server = FlinkJobServer(ensure_flink_jobserver(), master, work_dir)
    endpoint = server.start()
    return server, [*beam_args, f"--job_endpoint={endpoint}", *extra]


def pool_worker_flags(beam_args: list[str], pool: str) -> list[str]:
    """The flags that run a job's Python work on the worker pool at ``pool``.

    Two Python workers per subtask (``--parallelism``, 2 if not given), unless the user
    gave ``--sdk_worker_parallelism``; a ``--parallelism`` that is not a positive whole
    number is left for Beam to refuse.
    """
    flags = _flink_flags(beam_args)
    extra = ["--environment_type=EXTERNAL", f"--environment_config={pool}"]
    parallelism = str(flags.parallelism or "2")
    if not flags.sdk_worker_parallelism and parallelism.isdigit() and int(parallelism) > 0:
        # Beam's default is one Python worker per task manager, which every slot's
        # subtasks then share: one core's worth of Python (measured: one worker at 100%
        # through a 1M-event job). The runner ties each stage's subtask to a worker in
        # the order subtasks open, round robin, so two workers per slot make it unlikely
        # that both subtasks of the busiest stage land on one. (Its bundle load
        # balancing, which would decide per bundle, deadlocked a batch job: a stage's
        # bundle holds its worker while it waits on the next stage's.)
        extra.append(f"--sdk_worker_parallelism={2 * int(parallelism)}")
    return extra


def unbounded_sdk_send_queues() -> bool:
    """Let this process's SDK workers queue a bundle's outputs without bound; True if done.

    Beam's Python SDK bounds its outbound data queues since 2.7x (100 MB, 10,000 messages;
    apache/beam#38407), and blocks a bundle's processing when they are full. The Flink
    runner 2.62 takes a bundle's outputs off the wire only as fast as its operator drains
    them, and its operator waits for the bundle's end before draining the rest (fixed in
    the runner only later, apache/beam#38581). A bundle with more output than both queues
    hold therefore never ends: measured, a bounded 1M-event job on Flink stalled with both
    sides idle (a Flink batch bundle is a whole partition), and ran to the end in 202 s
    with the queues unbounded, as SDKs before 2.7x had them. The price is memory: the
    worker may hold a bundle's undelivered outputs (about 2 GB at 1M events, p=2).
    """
    from apache_beam.runners.worker import data_plane  # noqa: PLC0415

    names = ("_DEFAULT_SEND_QUEUE_MAX_ELEMENTS", "_DEFAULT_SEND_QUEUE_MAX_BYTES")
    if not all(hasattr(data_plane, name) for name in names):
        return False  # another SDK: nothing of the kind to undo
    for name in names:
        setattr(data_plane, name, 0)  # 0: no limit (ByteLimitedQueue, queue.Queue)
    return True
