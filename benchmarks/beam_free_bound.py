"""How fast the events pipeline's own work runs on two processes without Beam's runner.

A measurement for issue 15, not a way to run moesif-beam. It calls the pipeline's own
DoFns (the file reader, normalize, the dedup spill, the partition dedup, the schema check
and the HTTP batching sink, with the defaults of ``moesif-beam events``) by hand, in two
forked processes, in the pipeline's two phases: each process reads and normalizes half of
the file's ranges into the spill; then each deduplicates half of the partitions and posts
them. What is left out is only what Beam's runner adds: its per-element steps between
the DoFns, its bundles, the gRPC control and data planes, the launcher's work. So its
rate is about the ceiling any runner could give this work on this machine.

    .venv/bin/python benchmarks/beam_free_bound.py --input FILE [--url URL]

Without ``--url`` it starts the count-only collector emulator as the benchmarks do and
prints events/s, the CPU of the processes and the emulator, and what the emulator stored.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._support import (
    APP_ID,
    collector_stats,
    cpu_seconds,
    start_collector,
)
from moesif_beam.transforms.dedup.bounded import (
    _KeepFirstInPartitionFn,
    _SpillFn,
    spill_partitions,
)
from moesif_beam.transforms.delivery import PostToMoesif
from moesif_beam.transforms.delivery.transport import Secret
from moesif_beam.transforms.formats.normalize import _NormalizeFn
from moesif_beam.transforms.records import Line
from moesif_beam.transforms.schema.bounded import _CheckFn
from moesif_beam.transforms.sources.files import _ReadFn, plan_ranges

_MAX_LINE = 16 << 20


def _values(outputs: object) -> list:
    """Plain values of a DoFn's outputs (WindowedValues unwrapped, tagged ones kept)."""
    if outputs is None:
        return []
    return [getattr(o, "value", o) for o in outputs]  # type: ignore[attr-defined]


def _phase_one(ranges: list, spill_dir: str, partitions: int, out: multiprocessing.Queue) -> None:
    read = _ReadFn("events", _MAX_LINE)
    normalize = _NormalizeFn("events", "wso2", None, 1 << 20, "name", False, _MAX_LINE)
    normalize.setup()
    spill = _SpillFn(spill_dir, partitions)
    spill.start_bundle()
    records = 0
    for file_range in ranges:
        normalize.start_bundle()
        for line in read.process(file_range):
            if not isinstance(line, Line):
                continue
            for value in normalize.process(line):
                if isinstance(value, tuple) and len(value) == 2:
                    spill.process(value)
                    records += 1
        list(normalize.finish_bundle())
    paths = [wv.value for wv in spill.finish_bundle()]
    out.put((records, paths, time.process_time()))


def _phase_two(groups: list, url: str, out: multiprocessing.Queue) -> None:
    keep = _KeepFirstInPartitionFn()
    check = _CheckFn("events")
    sink = PostToMoesif("events", url, Secret(APP_ID), "events")._batching()
    sink.setup()
    sink.start_bundle()
    emitted = 0
    for group in groups:
        for element in keep.process(group):
            for checked in check.process(element, {}):
                emitted += 1
                for _ in sink.process(checked):
                    pass
    dead = _values(sink.finish_bundle())
    sink.teardown()
    out.put((emitted, len(dead), time.process_time()))


def run(input_path: str, url: str, work: Path) -> dict:
    """Both phases on two forked processes; seconds and counts."""
    ranges = plan_ranges(input_path)
    partitions = spill_partitions(os.path.getsize(input_path))
    spill_dir = str(work / "spill")
    os.makedirs(spill_dir, exist_ok=True)
    ctx = multiprocessing.get_context("fork")
    started = time.perf_counter()
    queue: multiprocessing.Queue = ctx.Queue()

    def on_two(target: Any, work: list, *rest: Any) -> list:
        """``target`` on two forked processes, each given half of ``work``; their results."""
        procs = [ctx.Process(target=target, args=(work[i::2], *rest, queue)) for i in range(2)]
        for proc in procs:
            proc.start()
        results = [queue.get() for _ in procs]
        for proc in procs:
            proc.join()
        return results

    firsts = on_two(_phase_one, ranges, spill_dir, partitions)
    phase_one = time.perf_counter() - started
    by_partition: dict[int, list[str]] = defaultdict(list)
    for _, paths, _ in firsts:
        for part, path in paths:
            by_partition[part].append(path)
    groups = sorted(by_partition.items())
    seconds = on_two(_phase_two, groups, url)
    total = time.perf_counter() - started
    return {
        "seconds": total,
        "phase_one_seconds": phase_one,
        "records": sum(first[0] for first in firsts),
        "unique": sum(second[0] for second in seconds),
        "dead_letters": sum(second[1] for second in seconds),
        "cpu": sum(first[2] for first in firsts) + sum(second[2] for second in seconds),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--input", required=True)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moesif-bound-"))
    collector, url = start_collector(str(work / "collector"))
    try:
        before = cpu_seconds(collector.pid)
        result = run(args.input, url, work)
        result["collector_cpu"] = cpu_seconds(collector.pid) - before
        result["stored"] = collector_stats(url)["items_stored"]["events"]
    finally:
        collector.terminate()
        collector.wait()
        shutil.rmtree(work, ignore_errors=True)
    result["events_per_second"] = result["records"] / result["seconds"]
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
