"""Events throughput: the moesif-beam pipeline against a plain loop and Moesif's client.

Run by hand (``make bench`` or ``python benchmarks/events_throughput.py --events 100000``).
Every side gets the same generated WSO2 input (about 1 KB per event, 2% repeated
correlationIds, 5% faults) and posts to the same collector emulator, started as its own
process in count-only mode so it costs every side the same. Each side runs in its own
process, so peak memory (RSS and PSS of the side's whole process tree) is its own. The sides:

* reference: a plain single-process loop: read, parse, map (the pipeline's own mapping
  function), drop repeated ids, batch 500, gzip, POST;
* client (``--client``): the same loop handing batches of 100 ``EventModel`` objects to
  Moesif's Python client (``moesifapi``, ``create_events_batch``), installed into its own
  virtualenv under ``~/.cache/moesif-beam/bench-client`` on first use;
* pipeline: ``moesif-beam events`` with its defaults (plus any flags given after ``--``).

It prints events/s, the ratios, peak memory, and every side's counts, which must agree.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import requests  # noqa: E402

from benchmarks._support import APP_ID, start_collector  # noqa: E402
from moesif_beam.transforms.common.errors import InvalidRecord  # noqa: E402
from moesif_beam.transforms.formats.normalize import parse_json  # noqa: E402
from moesif_beam.transforms.formats.wso2 import extract_json, to_moesif_event  # noqa: E402
from samples.generate_wso2 import generate  # noqa: E402


def unique_events(input_path: str, counts: dict) -> Iterator[tuple[str, dict]]:
    """The work every side shares: read, parse, map, drop repeated ids; counts as it goes."""
    seen: set[str] = set()
    with open(input_path, "rb") as handle:
        for text in handle:
            line = text.rstrip(b"\r\n")
            if not line.strip():
                continue
            counts["read"] += 1
            try:
                tid, _, event = to_moesif_event(parse_json(extract_json(line)))
            except (ValueError, InvalidRecord):
                counts["dead_letters"] += 1
                continue
            if tid in seen:
                counts["duplicates"] += 1
                continue
            seen.add(tid)
            yield tid, event


def reference(input_path: str, url: str, batch_size: int) -> dict:
    """The plain loop: read, parse, map, drop repeated ids, batch 500, gzip, POST.

    It uses the same mapping function as the pipeline, so the comparison measures what
    the pipeline adds around the work, not a different mapping.
    """
    session = requests.Session()
    session.headers.update(
        {
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "X-Moesif-Application-Id": APP_ID,
        }
    )
    endpoint = f"{url}/v1/events/batch"
    batch: list[bytes] = []
    counts = {"read": 0, "sent": 0, "duplicates": 0, "dead_letters": 0}
    encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)

    def flush() -> None:
        body = gzip.compress(b"[" + b",".join(batch) + b"]", compresslevel=6, mtime=0)
        response = session.post(endpoint, data=body, timeout=60)
        response.raise_for_status()
        counts["sent"] += len(batch)
        batch.clear()

    for _, event in unique_events(input_path, counts):
        batch.append(encoder.encode(event).encode("utf-8"))
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
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
    counts = {"read": 0, "sent": 0, "duplicates": 0, "dead_letters": 0}

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


def _tree_memory(root: int) -> tuple[int, int]:
    """``(rss, pss)`` bytes of a process and all its descendants, from /proc (Linux).

    RSS counts a page shared by several processes (forked workers share their parent's
    pages until they write to them) once per process; PSS splits it between them, so the
    tree's PSS is the memory the run really holds.
    """
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
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
    total_rss = total_pss = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        total_rss += rss.get(pid, 0)
        total_pss += _pss(pid)
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


def _timed(cmd: list[str], env: dict) -> tuple[float, tuple[int, int], subprocess.CompletedProcess]:
    """Run one side; returns seconds, the peak (RSS, PSS) of its process tree, the result.

    The tree is sampled every 0.1 s: with worker processes, the largest single process
    (``ru_maxrss``) would understate what the run holds.
    """
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak_rss = peak_pss = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_rss, peak_pss
        while not stop.wait(0.1):
            rss, pss = _tree_memory(proc.pid)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{cmd[2:4]} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return seconds, (peak_rss, peak_pss), subprocess.CompletedProcess(cmd, 0, stdout, stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--input", help="reuse this input file instead of generating one")
    parser.add_argument("--client", action="store_true", help="also time moesifapi's client")
    parser.add_argument("--reference_only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client_only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument(
        "pipeline_args",
        nargs="*",
        help="extra flags for moesif-beam (after --), e.g. "
        "--direct_num_workers 2 --direct_running_mode multi_processing",
    )
    args = parser.parse_args()

    if args.reference_only:  # the child process that runs the reference loop
        print(json.dumps(reference(args.input, args.url, args.batch_size)))
        return 0
    if args.client_only:  # the child process that runs the client loop
        print(json.dumps(client_loop(args.input, args.url)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="moesif-bench-"))
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
    env = dict(os.environ, MOESIF_APPLICATION_ID=APP_ID)

    results = {}
    sides = ("reference", "client", "pipeline") if args.client else ("reference", "pipeline")
    for side in sides:
        collector, url = start_collector(str(work / f"collector-{side}"))
        try:
            if side == "reference":
                cmd = [
                    sys.executable,
                    __file__,
                    "--reference_only",
                    "--input",
                    input_path,
                    "--url",
                    url,
                    "--batch_size",
                    str(args.batch_size),
                ]
                seconds, memory, proc = _timed(cmd, env)
                counts = json.loads(proc.stdout)
            elif side == "client":
                cmd = [
                    _client_python(),
                    __file__,
                    "--client_only",
                    "--input",
                    input_path,
                    "--url",
                    url,
                ]
                seconds, memory, proc = _timed(cmd, env)
                counts = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                metrics = work / "metrics.json"
                cmd = [
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
                    str(metrics),
                    *args.pipeline_args,
                ]
                seconds, memory, proc = _timed(cmd, env)
                counts = json.loads(metrics.read_text())
        finally:
            collector.terminate()
            collector.wait()
        results[side] = {"seconds": seconds, "memory": memory, "counts": counts}

    ref, pipe = results["reference"], results["pipeline"]
    keys = ("read", "sent", "duplicates", "dead_letters")
    agree = all(ref["counts"][k] == pipe["counts"][k] for k in keys)
    print(f"\nmachine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(f"{'':<12}{'events/s':>12}{'seconds':>10}{'peak RSS':>12}{'peak PSS':>12}   counts")
    for side in sides:
        r = results[side]
        rate = r["counts"]["read"] / r["seconds"]
        counts = ", ".join(f"{k} {r['counts'][k]:,}" for k in keys)
        rss, pss = (f"{b / 2**20:>9.0f}MiB" for b in r["memory"])
        print(f"{side:<12}{rate:>12,.0f}{r['seconds']:>10.1f}{rss}{pss}   {counts}")
    agree = agree and all(
        results[side]["counts"][k] == ref["counts"][k] for side in sides for k in keys
    )
    ratio = ref["seconds"] / pipe["seconds"]
    print(f"\npipeline / reference throughput: {ratio:.2f}x   counts agree: {agree}")
    if "client" in results:
        print(
            f"pipeline / client throughput: {results['client']['seconds'] / pipe['seconds']:.2f}x"
        )
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
