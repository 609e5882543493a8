"""How fast the events pipeline's own work runs on two processes without Beam's runner.

A measurement for issue 15, not a way to run moesif-beam. It calls the pipeline's own
DoFns (the file reader, normalize, the dedup spill, the partition dedup, the schema check
and the HTTP batching sink, with the defaults of ``moesif-beam events``) by hand, in two
forked processes, in the pipeline's two phases: each process reads and normalizes half of
the file's ranges into the spill; then each deduplicates half of the partitions and posts
them. What is left out is only what Beam's runner adds: its per-element steps between
the DoFns, its bundles, the gRPC control and data planes, the launcher's work. So its
rate is about the ceiling any runner could give this work on this machine.

    .venv/bin/python benchmarks/beam_free_bound.py --input FILE

It starts its own count-only collector emulator, as the benchmarks do, and prints (as
JSON) events/s, the CPU of the processes and of the emulator, and what the emulator
stored.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._stages import Poster, normalized
from benchmarks._support import bound_main, on_two
from moesif_beam.transforms.dedup.bounded import (
    _KeepFirstInPartitionFn,
    _SpillFn,
    spill_partitions,
)
from moesif_beam.transforms.schema.bounded import _CheckFn
from moesif_beam.transforms.sources.files import plan_ranges


def _phase_one(ranges: list, spill_dir: str, partitions: int, out: multiprocessing.Queue) -> None:
    spill = _SpillFn(spill_dir, partitions)
    spill.start_bundle()
    records = 0
    for value in normalized(ranges):
        spill.process(value)
        records += 1
    paths = [wv.value for wv in spill.finish_bundle()]
    out.put((records, paths, time.process_time()))


def _phase_two(groups: list, url: str, out: multiprocessing.Queue) -> None:
    keep = _KeepFirstInPartitionFn()
    check = _CheckFn("events")
    poster = Poster(url)
    emitted = 0
    for group in groups:
        for element in keep.process(group):
            for checked in check.process(element, {}):
                emitted += 1
                poster.post(checked)
    poster.close()
    out.put((emitted, poster.dead_letters, time.process_time()))


def run(input_path: str, url: str) -> dict:
    """Both phases on two forked processes; seconds and counts."""
    spill_dir = tempfile.mkdtemp(prefix="moesif-bound-spill-")
    try:
        return _run(input_path, url, spill_dir)
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)


def _run(input_path: str, url: str, spill_dir: str) -> dict:
    ranges = plan_ranges(input_path)
    partitions = spill_partitions(os.path.getsize(input_path))
    started = time.perf_counter()
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


if __name__ == "__main__":
    raise SystemExit(bound_main(run, __doc__ or ""))
