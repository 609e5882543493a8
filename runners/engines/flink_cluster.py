"""``moesif-beam flink-local``: a real single-machine Flink 1.19 cluster, and its Python workers.

Flink comes from PyPI: the ``apache-flink==1.19.0`` wheel holds ``bin/`` and ``conf/`` and no
jars; the ``apache-flink-libraries==1.19.0`` sdist (about 230 MB) holds ``lib/`` (the
distribution's jars) and ``bin/bash-java-utils.jar``. ``pip download --no-deps`` fetches
both once into ``~/.cache/moesif-beam/flink-1.19.0/`` and they are assembled into a
FLINK_HOME there. The JobManager and the TaskManager run as two processes (Flink's own
``start-foreground`` scripts), every endpoint bound to 127.0.0.1, with the memory settings
measured on a 2-core machine; beside them runs Beam's Python worker pool from this
environment (runners/engines/flink_worker_pool.py), which ``--runner FlinkRunner
--flink_master 127.0.0.1:PORT`` finds by itself. SIGTERM or Ctrl-C stops all three.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any, Final

from moesif_beam.runners.engines.children import child_options, free_port, log_tail, stop_process
from moesif_beam.runners.engines.flink import (
    FlinkError,
    flink_cache_root,
    java_executable,
    local_cluster_file,
    wait_for_port,
)
from moesif_beam.runners.locks import exclusive_lock

__all__ = ["FLINK_VERSION", "FlinkCluster", "ensure_flink_home", "main"]

FLINK_VERSION: Final = "1.19.0"
_WHEEL: Final = f"apache-flink=={FLINK_VERSION}"
_LIBRARIES: Final = f"apache-flink-libraries=={FLINK_VERSION}"

# Measured on a 2-core, 24 GiB machine (see the README): smaller network memory failed with
# "Insufficient number of network buffers", smaller task off-heap with "Direct buffer memory".
# The task heap is what bounds a batch job's size here: runner 2.62 holds a whole bundle's
# outputs (in batch, a subtask's whole partition) on the heap until the bundle ends, so a
# 4096m TaskManager (681 MB of heap) failed at 400k events. Managed memory (Flink's sort
# buffers, which spill) gets a quarter instead of Flink's 40%, and the heap the rest.
_MEMORY: Final = {
    "jobmanager.memory.process.size": "1024m",
    "taskmanager.memory.managed.fraction": "0.25",
    "taskmanager.memory.network.min": "384mb",
    "taskmanager.memory.network.max": "384mb",
    "taskmanager.memory.task.off-heap.size": "768m",
    "taskmanager.memory.framework.off-heap.size": "256m",
    "taskmanager.numberOfTaskSlots": "2",
}


def flink_home(version: str = FLINK_VERSION) -> Path:
    """Where the assembled FLINK_HOME is cached."""
    return flink_cache_root() / f"flink-{version}" / "home"


def _complete(home: Path) -> bool:
    return (home / "lib" / f"flink-dist-{FLINK_VERSION}.jar").is_file() and (
        home / "bin" / "jobmanager.sh"
    ).is_file()


def _pip_download(requirement: str, dest: Path, *extra: str) -> Path:
    print(f"moesif-beam: pip download {requirement}", file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), *extra]
    result = subprocess.run(
        [*command, requirement], stdout=sys.stderr, stderr=sys.stderr, check=False
    )
    if result.returncode != 0:
        msg = f"pip could not download {requirement} (exit {result.returncode})"
        raise FlinkError(msg)
    name = requirement.split("==", maxsplit=1)[0].replace("-", "_")
    found = [p for p in dest.iterdir() if p.name.replace("-", "_").startswith(name)]
    if not found:
        msg = f"pip download {requirement} left no file in {dest}"
        raise FlinkError(msg)
    return found[0]


def ensure_flink_home(version: str = FLINK_VERSION) -> Path:
    """Return a FLINK_HOME for Flink ``version``, downloading it from PyPI on first use.

    Raises:
        FlinkError: pip could not download the wheel or the sdist, or they lack Flink's parts.
    """
    home = flink_home(version)
    if _complete(home):
        return home
    base = home.parent
    base.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(base / ".lock"):
        if _complete(home):
            return home
        print(
            f"moesif-beam: fetching Flink {version} from PyPI (apache-flink wheel for bin/ and "
            f"conf/, apache-flink-libraries sdist, about 230 MB, for the jars) into {base} "
            "(first use only)...",
            file=sys.stderr,
            flush=True,
        )
        with tempfile.TemporaryDirectory(prefix="fetch-", dir=base) as work:
            staging = Path(work) / "home"
            wheel = _pip_download(
                _WHEEL,
                Path(work),
                # bin/ and conf/ are the same in every wheel: take one that always exists.
                "--only-binary=:all:",
                "--python-version=3.11",
                "--platform=manylinux1_x86_64",
            )
            with zipfile.ZipFile(wheel) as archive:
                for member in archive.namelist():
                    if member.startswith(("pyflink/bin/", "pyflink/conf/")):
                        archive.extract(member, work)
            shutil.move(str(Path(work) / "pyflink"), staging)
            sdist = _pip_download(_LIBRARIES, Path(work), "--no-binary=:all:")
            with tarfile.open(sdist) as archive:
                for entry in archive.getmembers():
                    parts = entry.name.split("/", 2)
                    if len(parts) == 3 and parts[1] == "deps" and entry.isfile():
                        relative = parts[2]
                        if relative.startswith(("lib/", "bin/", "plugins/")):
                            entry.name = relative
                            archive.extract(entry, staging, filter="data")
            for script in (staging / "bin").iterdir():
                script.chmod(0o755)
            (staging / "log").mkdir(exist_ok=True)
            if not _complete(staging):
                msg = f"the PyPI packages of Flink {version} did not make a FLINK_HOME"
                raise FlinkError(msg)
            if home.exists():
                shutil.rmtree(home)
            staging.rename(home)
    return home


_MIN_TASKMANAGER_MB: Final = 4096
_MAX_TASKMANAGER_MB: Final = 16384


def _memory_mb() -> int | None:
    """This machine's memory in MiB, or its container's limit (cgroup v2) if lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return int(total)
    return int(min(total, int(limit) // 2**20)) if limit.isdigit() else int(total)


def default_taskmanager_mb() -> int:
    """A third of this machine's (or container's) memory, 4 to 16 GiB (8 GiB on 24 GiB)."""
    total = _memory_mb()
    if total is None:
        return _MIN_TASKMANAGER_MB
    return max(_MIN_TASKMANAGER_MB, min(_MAX_TASKMANAGER_MB, total // 3))


def parse_memory_mb(text: str) -> int:
    """``4096m``, ``8g`` or ``8192`` (MiB) as MiB.

    Raises:
        ValueError: not such a size, or below what the TaskManager's fixed parts need.
    """
    match = re.fullmatch(r"(\d+)\s*(g|gb|m|mb)?", text.strip().lower())
    if match is None:
        msg = f"--taskmanager_memory must be a size like 8g or 6144m, got {text!r}"
        raise ValueError(msg)
    mb = int(match.group(1)) * (1024 if (match.group(2) or "m").startswith("g") else 1)
    if mb < 3072:
        msg = f"--taskmanager_memory must be at least 3g (its fixed parts need 2.4g), got {text}"
        raise ValueError(msg)
    return mb


def _config(port: int, data_dir: Path, home: Path, taskmanager_mb: int) -> str:
    java_opts = ""
    for line in (home / "conf" / "config.yaml").read_text().splitlines():
        if line.strip().startswith("all: --add-"):  # Flink's own Java 17 module openings
            java_opts = line.strip().removeprefix("all: ")
    settings = {
        "env.java.opts.all": java_opts,
        "jobmanager.rpc.address": "127.0.0.1",
        "jobmanager.rpc.port": str(free_port()),
        "jobmanager.bind-host": "127.0.0.1",
        "taskmanager.bind-host": "127.0.0.1",
        "taskmanager.host": "127.0.0.1",
        "rest.address": "127.0.0.1",
        "rest.bind-address": "127.0.0.1",
        "rest.port": str(port),
        "parallelism.default": "2",
        "io.tmp.dirs": str(data_dir / "tmp"),
        "web.tmpdir": str(data_dir / "tmp"),
        "jobmanager.execution.failover-strategy": "region",
        "taskmanager.memory.process.size": f"{taskmanager_mb}m",
        **_MEMORY,
    }
    return "".join(f"{key}: {value}\n" for key, value in settings.items())


class FlinkCluster:
    """A JobManager, a TaskManager and a Python worker pool, each our child process."""

    def __init__(self, port: int, data_dir: str, taskmanager_mb: int | None = None) -> None:
        self.port = port
        self.taskmanager_mb = taskmanager_mb or default_taskmanager_mb()
        self.data_dir = Path(data_dir).resolve()
        self._processes: list[subprocess.Popen[bytes]] = []
        self.worker_pool = ""

    def start(self, timeout: float = 120.0) -> None:
        """Start the cluster; return once its REST API and the worker pool answer."""
        java = java_executable()
        home = ensure_flink_home()
        conf = self.data_dir / "conf"
        logs = self.data_dir / "log"
        for directory in (conf, logs, self.data_dir / "tmp"):
            directory.mkdir(parents=True, exist_ok=True)
        (conf / "config.yaml").write_text(
            _config(self.port, self.data_dir, home, self.taskmanager_mb)
        )
        for name in ("log4j.properties", "log4j-console.properties"):
            shutil.copyfile(home / "conf" / name, conf / name)
        env = dict(
            os.environ,
            FLINK_HOME=str(home),
            FLINK_CONF_DIR=str(conf),
            FLINK_LOG_DIR=str(logs),
            JAVA_HOME=str(Path(java).resolve().parent.parent),
        )
        pool_port = free_port()
        commands = {
            "jobmanager": [str(home / "bin" / "jobmanager.sh"), "start-foreground"],
            "taskmanager": [str(home / "bin" / "taskmanager.sh"), "start-foreground"],
            "worker-pool": [
                sys.executable,
                "-m",
                "moesif_beam.runners.engines.flink_worker_pool",
                str(pool_port),
                str(self.data_dir / "tmp"),  # where its workers' launcher script goes
            ],
        }
        for name, command in commands.items():
            with open(logs / f"{name}.out", "ab") as log:
                self._processes.append(
                    subprocess.Popen(
                        command,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        env=env,
                        cwd=self.data_dir,
                        **child_options(),
                    )
                )
        try:
            wait_for_port(self.port, self._processes[0], timeout, "Flink's JobManager")
            wait_for_port(pool_port, self._processes[2], timeout, "the Python worker pool")
        except FlinkError as exc:
            self.stop()
            msg = f"{exc}{log_tail(str(logs / 'jobmanager.out'))}"
            raise FlinkError(msg) from None
        self.worker_pool = f"127.0.0.1:{pool_port}"
        found = local_cluster_file(self.port)
        found.parent.mkdir(parents=True, exist_ok=True)
        found.write_text(json.dumps({"pid": os.getpid(), "worker_pool": self.worker_pool}))

    def stop(self) -> None:
        """Stop the worker pool, the TaskManager and the JobManager, in that order."""
        with contextlib.suppress(OSError):
            found = local_cluster_file(self.port)
            if json.loads(found.read_text()).get("pid") == os.getpid():
                found.unlink()
        processes, self._processes = self._processes, []
        for process in reversed(processes):
            stop_process(process)


def main(argv: list[str]) -> int:
    """``moesif-beam flink-local --port P --data_dir D``: run until SIGTERM or Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="moesif-beam flink-local",
        description="A real single-machine Flink 1.19 cluster (JobManager and TaskManager "
        "processes, Python workers from this environment), on 127.0.0.1.",
        allow_abbrev=False,
    )
    parser.add_argument("--port", type=int, default=8081, help="REST API port (default 8081)")
    parser.add_argument("--data_dir", required=True, help="configuration, logs, temporary files")
    parser.add_argument(
        "--taskmanager_memory",
        default="",
        help="the TaskManager's total memory, e.g. 8g (default: a third of this machine's, "
        "4g to 16g); a batch job's heap need grows with its input, see the README",
    )
    args = parser.parse_args(argv)
    taskmanager_mb = None
    try:
        if args.taskmanager_memory:
            taskmanager_mb = parse_memory_mb(args.taskmanager_memory)
    except ValueError as exc:
        print(f"moesif-beam flink-local: {exc}", file=sys.stderr, flush=True)
        return 2
    stopping = threading.Event()

    def stop(_signum: int, _frame: Any) -> None:
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    cluster = FlinkCluster(args.port, args.data_dir, taskmanager_mb)
    try:
        cluster.start()
        print(
            f"flink listening on 127.0.0.1:{args.port} (workers {cluster.worker_pool}, "
            f"TaskManager {cluster.taskmanager_mb} MiB, data in {cluster.data_dir})",
            flush=True,
        )
        while not stopping.wait(1.0):
            if any(p.poll() is not None for p in cluster._processes):
                print("moesif-beam flink-local: a cluster process exited", file=sys.stderr)
                return 1
        return 0
    except FlinkError as exc:
        print(f"moesif-beam flink-local: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        cluster.stop()
