"""What the benchmarks share: the collector emulator, its stats, a process tree's CPU and memory."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
APP_ID = "benchmark-app"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_collector(data_dir: str, *, arrival_lags: bool = False) -> tuple[subprocess.Popen, str]:
    """The emulator in its fast count-only mode, in its own process, costing every side alike.

    ``arrival_lags`` keeps each event's lag behind its ``request.time`` for the stats (the
    streaming benchmark's latency); the throughput benchmarks do not read it.
    """
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moesif_beam.runners.emulators.collector",
            "--port",
            str(port),
            "--data_dir",
            data_dir,
            # The fast count-only mode: parse, count and dedup, no field checks.
            "--store",
            "count",
            "--metadata_types",
            "off",
            "--validation",
            "off",
            "--arrival_lags",
            "on" if arrival_lags else "off",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # "collector listening on ..."
    return proc, f"http://127.0.0.1:{port}"


def collector_stats(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/_emulator/stats", timeout=30) as response:
        return dict(json.load(response))


def reset_collector(url: str) -> None:
    request = urllib.request.Request(f"{url}/_emulator/reset", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=30):
        pass


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a live process has used so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        fields = handle.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_memory(root: int, cpu: dict[int, float] | None = None) -> tuple[int, int]:
    """``(rss, pss)`` bytes of a process and all its descendants, from /proc (Linux).

    RSS counts a page shared by several processes (forked workers share their parent's
    pages until they write to them) once per process; PSS splits it between them, so the
    tree's PSS is the memory the run really holds. With ``cpu``, each process's CPU
    seconds so far are recorded in it by pid.
    """
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)  # fields[1]: the parent pid
        rss[pid] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # fields[21]: rss pages
        ticks[pid] = int(fields[11]) + int(fields[12])  # utime + stime
    total_rss = total_pss = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        total_rss += rss.get(pid, 0)
        total_pss += _pss(pid)
        if cpu is not None and pid in ticks:
            cpu[pid] = ticks[pid] / os.sysconf("SC_CLK_TCK")
        todo.extend(children.get(pid, []))
    return total_rss, total_pss


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
            for line in handle:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass  # gone meanwhile, or no smaps_rollup (kernels before 4.14)
    return 0


class PeakMemory:
    """Samples a process tree's RSS and PSS every ``interval`` seconds; keeps the peaks.

    Each sample reads every process's ``smaps_rollup``, about 10 ms of CPU for a pipeline's
    tree: at 10 samples a second that took a tenth of a core from the side being measured,
    so it samples twice a second.

    With worker processes, the largest single process (``ru_maxrss``) would understate what
    the run holds, so the whole tree is summed at each sample. ``cpu`` is the CPU seconds
    of every process seen in the tree, as last sampled: it misses at most the last
    ``interval`` of each process, but counts processes nobody waits for (forked workers),
    which ``RUSAGE_CHILDREN`` would not.
    """

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.rss = self.pss = 0
        self.cpu_by_pid: dict[int, float] = {}
        self._pid = pid
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def cpu(self) -> float:
        return sum(self.cpu_by_pid.values())

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            rss, pss = tree_memory(self._pid, self.cpu_by_pid)
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)


def bound_against_collector(run: Callable[[str, str], dict], input_path: str) -> dict:
    """``run(input_path, url)`` against a fresh count-only emulator; its result, measured.

    Adds the emulator's CPU seconds, what it stored and the events/s over the run's own
    ``seconds`` and ``records``; the emulator and its directory are gone afterwards.
    """
    work = Path(tempfile.mkdtemp(prefix="moesif-bound-"))
    collector, url = start_collector(str(work / "collector"))
    try:
        before = cpu_seconds(collector.pid)
        result = run(input_path, url)
        result["collector_cpu"] = cpu_seconds(collector.pid) - before
        result["stored"] = collector_stats(url)["items_stored"]["events"]
    finally:
        collector.terminate()
        collector.wait()
        shutil.rmtree(work, ignore_errors=True)
    result["events_per_second"] = result["records"] / result["seconds"]
    return result


def bound_main(run: Callable[[str, str], dict], doc: str) -> int:
    """The command line of a bound prototype: ``--input FILE``, its result printed as JSON."""
    parser = argparse.ArgumentParser(description=doc.split("\n", 1)[0])
    parser.add_argument("--input", required=True)
    args = parser.parse_args()
    print(json.dumps(bound_against_collector(run, args.input), indent=1))
    return 0


def on_two(target: Callable[..., None], work: list, *rest: Any) -> list:
    """``target(half of work, *rest, queue)`` on two forked processes; what each put on the queue.

    Forked, so the processes inherit what this one holds (and its string hash seed).
    """
    ctx = multiprocessing.get_context("fork")
    queue: Any = ctx.Queue()
    procs = [ctx.Process(target=target, args=(work[i::2], *rest, queue)) for i in range(2)]
    for proc in procs:
        proc.start()
    results = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    return results


def drain_parser(doc: str) -> argparse.ArgumentParser:
    """The flags every backlog drainer takes from ``streaming_latency.py``'s ``drain_by``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--total", type=int, required=True)
    return parser
