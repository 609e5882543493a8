"""A prototype of another bounded design, measured without Beam: find repeated ids first.

A measurement for issue 15, not a way to run moesif-beam. Today's bounded run spills
every record to files partitioned by transaction id and posts nothing until every file
is written (``beam_free_bound.py`` measures that design without Beam's runner). This
prototype tries the other order, on two forked processes:

1. **pre-scan**: each process reads half of the file's planned ranges and reads only each
   WSO2 line's ``correlationId`` (msgspec, skipping the other fields), keeping a 64-bit
   hash of it; a line without a usable one is mapped in full to learn its id. The parent
   finds the hashes seen more than once: the candidates;
2. **deliver**: each process reads its ranges again and runs the pipeline's own normalize
   DoFn on every line; a record whose id hash is not a candidate cannot have a copy
   anywhere, so it goes straight to the pipeline's own HTTP batching sink; a candidate is
   kept aside (in memory here; 2 to 4% of records);
3. **resolve**: the parent picks each candidate id's winner with the pipeline's own rule
   (``pick_first``: earliest time, then the serialized record) and posts the winners.

A hash collision only makes a unique record a candidate, never the reverse, so the
result is exact. What it leaves out: the metadata schema check (the emulator's schema
is empty and nothing conflicts), dead letters (the input has none), and formats other
than WSO2, which would each need an id reader that agrees with their mapping.

    .venv/bin/python benchmarks/prescan_bound.py --input FILE
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec
import numpy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._stages import Poster, lines, normalized
from benchmarks._support import bound_main, on_two
from moesif_beam.transforms.dedup.bounded import pick_first
from moesif_beam.transforms.formats.auto import wso2_event
from moesif_beam.transforms.formats.gateway import DEFAULT_OPTIONS
from moesif_beam.transforms.formats.normalize import parse_json
from moesif_beam.transforms.formats.wso2 import extract_json
from moesif_beam.transforms.sources.files import plan_ranges


class _Id(msgspec.Struct):
    correlationId: Any = None  # WSO2's own field name


_IDS = msgspec.json.Decoder(_Id)


def _line_id(raw: bytes) -> str | None:
    """The transaction id the mapping will give this line, or None if it gives none."""
    try:
        found = _IDS.decode(extract_json(raw)).correlationId
        if type(found) is str and found:
            return found
    except (msgspec.DecodeError, UnicodeDecodeError):
        pass
    try:  # no usable correlationId: the mapping derives one from the content
        return wso2_event(parse_json(extract_json(raw)), DEFAULT_OPTIONS)[0]
    except Exception:
        return None  # a dead letter in the delivery pass: it has no id to repeat


def _prescan(ranges: list, out: Any) -> None:
    hashes = [hash(tid) for r in ranges for line in lines(r) if (tid := _line_id(line.raw))]
    out.put((numpy.array(hashes, dtype=numpy.int64), time.process_time()))


def _deliver(ranges: list, candidates: frozenset, url: str, out: Any) -> None:
    poster = Poster(url)
    kept: list = []
    records = sent = 0
    for value in normalized(ranges):
        records += 1
        if hash(value[0]) in candidates:
            kept.append(value)
        else:
            sent += 1
            poster.post(value)
    poster.close()
    out.put((records, sent, kept, time.process_time()))


def run(input_path: str, url: str) -> dict:
    ranges = plan_ranges(input_path)
    started = time.perf_counter()
    scans = on_two(_prescan, ranges)
    hashes = numpy.concatenate([scan[0] for scan in scans])
    values, counts = numpy.unique(hashes, return_counts=True)
    # Forked after this: both delivering processes inherit the set (and the hash seed).
    candidates = frozenset(values[counts > 1].tolist())
    prescan_seconds = time.perf_counter() - started
    delivered = on_two(_deliver, ranges, candidates, url)
    by_id: dict[str, list] = defaultdict(list)
    for _, _, kept, _ in delivered:
        for transaction_id, record in kept:
            by_id[transaction_id].append(record)
    poster = Poster(url)
    duplicates = 0
    for transaction_id in sorted(by_id):
        winner, dropped = pick_first(by_id[transaction_id])
        duplicates += dropped
        poster.post((transaction_id, winner))
    poster.close()
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "prescan_seconds": prescan_seconds,
        "records": sum(d[0] for d in delivered),
        "sent_unchecked": sum(d[1] for d in delivered),
        "candidates": len(candidates),
        "candidate_records": sum(len(d[2]) for d in delivered),
        "duplicates": duplicates,
        "cpu": sum(s[1] for s in scans) + sum(d[3] for d in delivered) + time.process_time(),
    }


if __name__ == "__main__":
    raise SystemExit(bound_main(run, __doc__ or ""))
