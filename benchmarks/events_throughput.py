"""Events throughput: the moesif-beam pipeline against a plain loop and Moesif's client.

Run by hand (``make bench`` or ``python benchmarks/events_throughput.py --events 100000``).
Every side gets the same generated WSO2 input (about 1.2 KB per event, 2% repeated
correlationIds, 5% faults) and posts to the same collector emulator, started afresh for
each side as its own process in count-only mode. Each side runs in its own process, so
its peak memory (RSS and PSS of its whole process tree) and CPU time are its own. The sides:

* reference: the fastest single-core loop we could write, on purpose, so that the ratio
  does not flatter the pipeline: read in large blocks, parse with orjson, map with the
  pipeline's own mapping (header masking included), drop repeated ids with a set,
  serialize with orjson, batches of 500, gzip with the pipeline's compressor at
  ``--ref_gzip_level`` (default: the pipeline's default level), POST over keep-alive
  ``http.client`` connections, from four threads so the loop need not wait for the
  collector;
* client (``--client``): the same work handing batches of 100 ``EventModel`` objects to
  Moesif's Python client (``moesifapi``, ``create_events_batch``), installed into its own
  virtualenv under ``~/.cache/moesif-beam/bench-client`` on first use;
* pipeline: ``moesif-beam events`` with its defaults (plus any flags given after ``--``).

Before it is timed, every side is warmed up alike (:func:`warm_up`): its input read once
and the side run on the input's first 10 lines, so that none of them pays for the page
cache these VMs drop after a minute (``--cold`` leaves that out).

It prints events/s, the ratios, CPU seconds (the side's and the collector's), peak memory,
and every side's counts and the collector's, which must all agree. ``--runs 3`` repeats the
whole comparison, for the "3 of 3 consecutive runs" targets.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import queue
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._support import (  # noqa: E402
    APP_ID,
    PeakMemory,
    collector_stats,
    cpu_seconds,
    start_collector,
)
from moesif_beam.transforms.common.errors import InvalidRecord  # noqa: E402
from moesif_beam.transforms.formats.auto import wso2_event  # noqa: E402
from moesif_beam.transforms.formats.gateway import DEFAULT_OPTIONS  # noqa: E402
from moesif_beam.transforms.formats.normalize import parse_json  # noqa: E402
from moesif_beam.transforms.formats.wso2 import extract_json  # noqa: E402
from samples.generate_wso2 import generate  # noqa: E402

KEYS = ("read", "sent", "duplicates", "dead_letters")


def unique_events(input_path: str, counts: dict) -> Iterator[tuple[str, dict]]:
    """The work every side shares: read, parse, map, drop repeated ids; counts as it goes.

    The parse and the mapping are the pipeline's own for ``--format wso2`` with its default
    options (identity rules and header masking included), so every side sends the same
    records.
    """
    with open(input_path, "rb", buffering=1 << 20) as handle:
        yield from unique_of(handle, counts, set())


def unique_of(lines: Iterable[bytes], counts: dict, seen: set[str]) -> Iterator[tuple[str, dict]]:
    """:func:`unique_events` of any lines (a file's, Kafka values), ``seen`` kept across calls."""
    for line in lines:
        if line.isspace():
            continue
        counts["read"] += 1
        try:
            tid, _, event = wso2_event(parse_json(extract_json(line)), DEFAULT_OPTIONS)
        except (ValueError, InvalidRecord):
            counts["dead_letters"] += 1
            continue
        if tid in seen:
            counts["duplicates"] += 1
            continue
        seen.add(tid)
        yield tid, event


# Threads the loop's POSTs wait on, each with a keep-alive connection of its own. With one,
# the loop itself waited on the collector (its answers come after a few GIL hand-overs
# on both sides): 7.5 to 20 s of a 67 to 84 s run on the Intel VM of session 17.
POST_THREADS = 4


class Poster:
    """POSTs gzip batches over keep-alive connections, without a client library.

    With ``thread``, up to :data:`POST_THREADS` POSTs are on their way (and as many
    batches queued) while the loop goes on: it waits only when all of them are.
    """

    def __init__(self, url: str, gzip_level: int, *, thread: bool) -> None:
        parts = urlsplit(url)
        self._failed = ""
        self._queue: queue.Queue | None = queue.Queue(maxsize=POST_THREADS) if thread else None
        self._threads = [
            threading.Thread(target=self._run, args=(self._connect(parts),), daemon=True)
            for _ in range(POST_THREADS if thread else 0)
        ]
        for worker in self._threads:
            worker.start()
        # The loop's own connection, used without threads (it connects on first use).
        self._connection = self._connect(parts)
        self._level = gzip_level
        # The pipeline's own compressor (igzip at levels 1 to 3, zlib otherwise), imported
        # here: the client's virtualenv runs this file too, without it.
        from moesif_beam.transforms.delivery.http import gzip_body
        from moesif_beam.transforms.delivery.sinks import DEFAULT_GZIP_LEVEL

        self._compress = gzip_body
        if gzip_level < 0:
            self._level = DEFAULT_GZIP_LEVEL
        self._headers = {
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "X-Moesif-Application-Id": APP_ID,
        }

    def post(self, records: list[bytes]) -> None:
        """Compress and POST one batch; with a poster thread, the POST overlaps the next batch."""
        body = self._compress(b"[" + b",".join(records) + b"]", self._level)
        if self._queue is None:
            self._send(body, self._connection)
            return
        self._queue.put(body)  # waits only while every thread has a POST on its way

    def close(self) -> None:
        if self._queue is not None:
            for _ in self._threads:
                self._queue.put(None)
            for worker in self._threads:
                worker.join()
            if self._failed:
                sys.exit(self._failed)

    @staticmethod
    def _connect(parts: Any) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)

    def _run(self, connection: http.client.HTTPConnection) -> None:
        assert self._queue is not None
        while (body := self._queue.get()) is not None:
            try:
                self._send(body, connection)
            except BaseException as exc:  # reported by close()
                self._failed = f"reference: {exc}"

    def _send(self, body: bytes, connection: http.client.HTTPConnection) -> None:
        connection.request("POST", "/v1/events/batch", body, self._headers)
        response = connection.getresponse()
        response.read()
        if response.status >= 300:
            msg = f"the collector answered {response.status}"
            raise RuntimeError(msg)


def reference(
    input_path: str, url: str, batch_size: int, gzip_level: int, *, post_thread: bool = True
) -> dict:
    """The plain loop: read, parse, map, drop repeated ids, batch, gzip, POST, on one core.

    It uses the same parse and mapping functions as the pipeline, so the comparison
    measures what the pipeline adds around the work (and what it gains from a second
    core), not a different mapping. Everything else is as lean as we could make it; with
    ``post_thread`` (the default, measured faster) one batch's POST waits for the collector
    on a second thread while the loop goes on with the next batch: still one core of work.
    """
    # The pipeline's garbage-collection setting, so the loop has every advantage the
    # pipeline has (measured on the loop alone: no clear change, within this VM's noise).
    from moesif_beam.transforms.common.garbage import collect_garbage_less_often

    collect_garbage_less_often()
    poster = Poster(url, gzip_level, thread=post_thread)
    dumps = orjson.dumps
    counts = dict.fromkeys(KEYS, 0)
    batch: list[bytes] = []
    for _, event in unique_events(input_path, counts):
        batch.append(dumps(event))
        if len(batch) >= batch_size:
            poster.post(batch)
            counts["sent"] += len(batch)
            batch = []
    if batch:
        poster.post(batch)
        counts["sent"] += len(batch)
    poster.close()
    return counts


CLIENT_VERSION = "1.5.5"


def client_loop(input_path: str, url: str) -> dict:
    """The reference loop, posting through moesifapi's create_events_batch (batches of 100)."""
    from moesifapi.configuration import Configuration
    from moesifapi.models.event_model import EventModel
    from moesifapi.models.event_request_model import EventRequestModel
    from moesifapi.models.event_response_model import EventResponseModel
    from moesifapi.moesif_api_client import MoesifAPIClient

    Configuration.BASE_URI = url
    api = MoesifAPIClient(APP_ID).api
    batch: list = []
    counts = dict.fromkeys(KEYS, 0)

    def flush() -> None:
        api.create_events_batch(batch)
        counts["sent"] += len(batch)
        batch.clear()

    for tid, event in unique_events(input_path, counts):
        request, response = event["request"], event["response"]
        batch.append(
            EventModel(
                request=EventRequestModel(
                    time=request["time"],
                    uri=request["uri"],
                    verb=request["verb"],
                    headers=request["headers"],
                    api_version=request.get("api_version"),
                    ip_address=request.get("ip_address"),
                ),
                response=EventResponseModel(
                    time=response["time"],
                    status=response["status"],
                    headers=response["headers"],
                ),
                user_id=event.get("user_id"),
                company_id=event.get("company_id"),
                direction=event.get("direction"),
                metadata=event["metadata"],
                transaction_id=tid,
            )
        )
        if len(batch) >= 100:
            flush()
    if batch:
        flush()
    return counts


def _client_python() -> str:
    """A virtualenv with moesifapi, beside (not inside) the project's environment."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    venv = root / "moesif-beam" / f"bench-client-{CLIENT_VERSION}"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"installing moesifapi {CLIENT_VERSION} into {venv} (first use only)...")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                f"moesifapi=={CLIENT_VERSION}",
                "-e",
                str(REPO),
            ],
            check=True,
        )
    return str(python)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(cmd: list[str], env: dict) -> dict:
    """Run one side; its wall seconds, CPU seconds, peak (RSS, PSS) and stdout.

    CPU is the side's whole process tree (every descendant its parent waited for, or as
    sampled from /proc where that is more).
    """
    cpu_before = _children_cpu()
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    with PeakMemory(proc.pid) as peak:
        stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{cmd[2:4]} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {
        "seconds": seconds,
        # Reaped descendants' CPU, or the sampled tree's where that is more (unreaped
        # forked workers).
        "cpu": max(_children_cpu() - cpu_before, peak.cpu),
        "memory": (peak.rss, peak.pss),
        "stdout": stdout,
    }


def _command(side: str, args: argparse.Namespace, input_path: str, url: str, work: Path) -> list:
    if side == "reference":
        return [
            sys.executable,
            __file__,
            "--reference_only",
            "--input",
            input_path,
            "--url",
            url,
            "--batch_size",
            str(args.batch_size),
            "--ref_gzip_level",
            str(args.ref_gzip_level),
            *(["--ref_no_post_thread"] if args.ref_no_post_thread else []),
        ]
    if side == "client":
        return [_client_python(), __file__, "--client_only", "--input", input_path, "--url", url]
    return [
        sys.executable,
        "-m",
        "moesif_beam.runners.cli",
        "events",
        "--input",
        input_path,
        "--moesif_base_url",
        url,
        "--output_dir",
        str(work / "out"),
        "--batch_max_events",
        str(args.batch_size),
        "--metrics_out",
        str(work / "metrics.json"),
        *args.pipeline_args,
    ]


def warm_up(side: str, args: argparse.Namespace, input_path: str, work: Path) -> None:
    """Bring a side's input and code into the page cache before it is timed.

    These VMs page out file pages idle for about a minute (DAMON's ``pageout`` scheme, seen
    in ``/sys/kernel/mm/damon``), and their disk is slow: a run of 10 lines took 14.7 s
    with the page cache dropped against 1.6 s warm, and a 1M run's workers once waited
    6 s for its input. Which side found what still cached depended on the order and the
    gaps between runs, so every side now starts alike, as on a machine that keeps its page
    cache: its whole input read once, and the side itself run on the input's first 10
    lines against a collector of its own (so that collector's counts stay the timed run's).
    Cold start is what ``--first_record`` measures, not this.
    """
    with open(input_path, "rb", buffering=0) as handle:
        while handle.read(16 << 20):
            pass
    head = work / f"warm-{side}.jsonl"
    with open(input_path, "rb") as handle, open(head, "wb") as out:
        out.writelines(itertools.islice(handle, 10))
    env = dict(os.environ, MOESIF_APPLICATION_ID=APP_ID)
    collector, url = start_collector(str(work / f"collector-warm-{side}"))
    try:
        subprocess.run(
            _command(side, args, str(head), url, work / "warm"),
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
        )
    finally:
        collector.terminate()
        collector.wait()


def run_side(side: str, args: argparse.Namespace, input_path: str, work: Path) -> dict:
    """One side against a fresh collector: timings, counts, and what the collector stored.

    The side is warmed up first (:func:`warm_up`), unless ``--cold``.
    """
    if not args.cold:
        warm_up(side, args, input_path, work)
    env = dict(os.environ, MOESIF_APPLICATION_ID=APP_ID)
    collector, url = start_collector(str(work / f"collector-{side}"))
    try:
        collector_before = cpu_seconds(collector.pid)
        result = _timed(_command(side, args, input_path, url, work), env)
        result["collector_cpu"] = cpu_seconds(collector.pid) - collector_before
        result["stored"] = collector_stats(url)["items_stored"]["events"]
    finally:
        collector.terminate()
        collector.wait()
    if side == "pipeline":
        result["counts"] = json.loads((work / "metrics.json").read_text())
    else:
        result["counts"] = json.loads(result["stdout"].strip().splitlines()[-1])
    return result


def first_record(work: Path) -> None:
    """Time to first record: a 10-line input, from the command's start to the first 2xx.

    The collector is polled every 10 ms for its first stored event; the run's own wall
    time is printed beside it.
    """
    path = work / "ten.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in generate(10, seed=7, fault_rate=0.0)))
    env = dict(os.environ, MOESIF_APPLICATION_ID=APP_ID)
    collector, url = start_collector(str(work / "collector-first"))
    try:
        started = time.perf_counter()
        args = argparse.Namespace(batch_size=500, pipeline_args=[])
        proc = subprocess.Popen(
            _command("pipeline", args, str(path), url, work),
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        first = None
        while first is None and proc.poll() is None:
            if collector_stats(url)["items_stored"]["events"]:
                first = time.perf_counter() - started
            time.sleep(0.01)
        proc.wait()
        total = time.perf_counter() - started
        stored = collector_stats(url)["items_stored"]["events"]
    finally:
        collector.terminate()
        collector.wait()
    shown = "never" if first is None else f"{first:.2f}s"
    print(f"first record at the collector: {shown}; the run took {total:.2f}s; stored {stored}")


def report(results: dict[str, dict]) -> bool:
    """Print one comparison; True when every side's counts (and the collector's) agree."""
    ref = results["reference"]
    print(f"\nmachine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(
        f"{'':<16}{'events/s':>10}{'seconds':>9}{'CPU s':>8}{'coll. CPU':>10}"
        f"{'peak RSS':>10}{'peak PSS':>10}   counts (collector stored)"
    )
    agree = True
    for side, r in results.items():
        rate = r["counts"]["read"] / r["seconds"]
        counts = ", ".join(f"{k} {r['counts'][k]:,}" for k in KEYS)
        rss, pss = (f"{b / 2**20:>7.0f}MiB" for b in r["memory"])
        print(
            f"{side:<16}{rate:>10,.0f}{r['seconds']:>9.1f}{r['cpu']:>8.1f}"
            f"{r['collector_cpu']:>10.1f}{rss}{pss}   {counts} ({r['stored']:,})"
        )
        agree = agree and r["stored"] == r["counts"]["sent"]
        agree = agree and all(r["counts"][k] == ref["counts"][k] for k in KEYS)
    if "pipeline" in results:
        pipe = results["pipeline"]["seconds"]
        print(f"\npipeline / reference throughput: {ref['seconds'] / pipe:.2f}x")
        if "reference again" in results:
            again = results["reference again"]["seconds"]
            print(
                f"pipeline / reference run again after it: {again / pipe:.2f}x; "
                f"/ the mean of both references' times: {(ref['seconds'] + again) / 2 / pipe:.2f}x"
            )
        if "client" in results:
            print(f"pipeline / client throughput: {results['client']['seconds'] / pipe:.2f}x")
    print(f"counts agree: {agree}")
    return agree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument(
        "--ref_gzip_level",
        type=int,
        default=-1,
        help="the reference's gzip level (default: the pipeline's)",
    )
    parser.add_argument(
        "--ref_no_post_thread", action="store_true", help="the reference waits for each POST"
    )
    parser.add_argument("--input", help="reuse this input file instead of generating one")
    parser.add_argument("--client", action="store_true", help="also time moesifapi's client")
    parser.add_argument("--runs", type=int, default=1, help="repeat the comparison N times")
    parser.add_argument(
        "--sides", default="", help="only these sides, comma-separated (reference always runs)"
    )
    parser.add_argument(
        "--first_record", action="store_true", help="only time the first record of 10 lines"
    )
    parser.add_argument(
        "--bracket",
        action="store_true",
        help="run the reference right before and again right after the pipeline (the "
        "client, if any, first): the VM's speed drifts within minutes",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="no warm-up: time each side with whatever the page cache still holds",
    )
    parser.add_argument("--reference_only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client_only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument(
        "pipeline_args",
        nargs="*",
        help="extra flags for moesif-beam (after --), e.g. --fork_workers",
    )
    args = parser.parse_args()

    if args.reference_only:  # the child process that runs the reference loop
        counts = reference(
            args.input,
            args.url,
            args.batch_size,
            args.ref_gzip_level,
            post_thread=not args.ref_no_post_thread,
        )
        print(json.dumps(counts))
        return 0
    if args.client_only:  # the child process that runs the client loop
        print(json.dumps(client_loop(args.input, args.url)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="moesif-bench-"))
    try:
        return _compare(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # 12 GB of input at 10M events


def _compare(args: argparse.Namespace, work: Path) -> int:
    if args.first_record:
        for _ in range(args.runs):
            first_record(work)
        return 0
    input_path = args.input or str(work / "wso2.jsonl")
    if not args.input:
        started = time.perf_counter()
        with open(input_path, "wb") as out:
            for line in generate(args.events, seed=2026, fault_rate=0.05, dup_rate=0.02):
                out.write(line + b"\n")
        print(
            f"generated {args.events:,} events ({os.path.getsize(input_path) / 1e6:.0f} MB) "
            f"in {time.perf_counter() - started:.1f}s"
        )
    sides = ["reference", "client", "pipeline"] if args.client else ["reference", "pipeline"]
    if args.sides:
        wanted = set(args.sides.split(",")) | {"reference"}
        sides = [side for side in ("reference", "client", "pipeline") if side in wanted]
    agree = True
    for run in range(1, args.runs + 1):
        if args.runs > 1:
            print(f"\n=== run {run} of {args.runs}, {time.strftime('%H:%M:%S')} UTC ===")
        if args.bracket and "pipeline" in sides:
            # The client (two to three minutes) first, then the reference on either side of
            # the pipeline: a drift of the machine's speed shows as the two references'
            # difference instead of landing on one side of the ratio.
            order = [*(s for s in sides if s == "client"), "reference", "pipeline"]
            results = {side: run_side(side, args, input_path, work) for side in order}
            results["reference again"] = run_side("reference", args, input_path, work)
            results = {"reference": results.pop("reference"), **results}
        else:
            results = {side: run_side(side, args, input_path, work) for side in sides}
        agree = report(results) and agree
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
