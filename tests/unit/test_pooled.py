"""A stage's work in worker processes: the same outputs, times, order and counts as in-process."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
from apache_beam import pvalue
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from moesif_beam.transforms.common import pooled
from moesif_beam.transforms.common.counters import counter
from moesif_beam.transforms.common.garbage import YOUNG_THRESHOLD
from moesif_beam.transforms.deadletters.letters import ACK_FIELD
from moesif_beam.transforms.formats.normalize import NormalizeRecords, _NormalizeWire
from moesif_beam.transforms.records import Ack, Line
from tests.helpers import make_pipeline, run

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def _lines(name: str, acked: bool) -> list[Line]:
    """A sample's lines, then the cases that are not records, each with an ack or not."""
    raws = (SAMPLES / name).read_bytes().splitlines()[:40]
    raws += [b"{not json", b"[]", b"\xff\xfe", b'{"a":1}', b"x" * 2_000_000, b"[1, 2]"]
    return [
        Line(raw, f"t/0@{i}", Ack("t/0", i, i - 1) if acked else None) for i, raw in enumerate(raws)
    ]


def _in_process(normalize: NormalizeRecords, lines: list[Line]) -> list[list[Any]]:
    fn = normalize.stage()
    fn.setup()
    fn.start_bundle()
    return [list(fn.process(line)) for line in lines]


def _comparable(outputs: list[list[Any]]) -> list[list[Any]]:
    """Dead letters without their time of writing."""
    out = []
    for line_outputs in outputs:
        out.append(
            [
                (o.tag, {k: v for k, v in o.value.items() if k != "failed_at"})
                if isinstance(o, pvalue.TaggedOutput)
                else o
                for o in line_outputs
            ]
        )
    return out


@pytest.mark.parametrize(
    ("pipeline", "fmt", "sample"),
    [
        ("events", "wso2", "wso2_sample.jsonl"),
        ("events", "kong", "kong_sample.jsonl"),
        ("actions", "moesif", "actions_moesif.jsonl"),  # lines holding arrays: parts
    ],
)
@pytest.mark.parametrize("acked", [True, False])
def test_the_wire_gives_back_what_the_stage_gives_in_process(pipeline, fmt, sample, acked):
    normalize = NormalizeRecords(pipeline, fmt, inline_signatures=True)
    lines = _lines(sample, acked)
    expected = _in_process(normalize, lines)
    # As the pool does it: each side's payload through pickle, the worker set up from one.
    pooled._start_worker(pickle.dumps(normalize.stage()), _NormalizeWire, os.getpid())
    sent = pickle.loads(pickle.dumps(_NormalizeWire.to_worker(lines)))
    payload, finished, counts = pickle.loads(pickle.dumps(pooled._run_chunk(sent)))
    got = _NormalizeWire.restore(payload, lines)
    assert _comparable(got) == _comparable(expected)
    assert finished == []
    assert counts["read"] == sum(len(o) for o in expected)
    if acked:
        # Every output carries its own line's ack, with its parts, as a record or a letter.
        for line, outputs in zip(lines, got, strict=True):
            for index, output in enumerate(outputs):
                ack = (
                    output.value[ACK_FIELD]
                    if isinstance(output, pvalue.TaggedOutput)
                    else output[1].ack
                )
                assert (ack.partition, ack.offset, ack.previous) == tuple(line.ack[:3])
                assert ack.part == (index if ack.parts > 1 else 0)
    if pipeline == "actions":
        assert any(len(o) > 1 for o in got)  # the parts were exercised


def _keyed_times(normalize: NormalizeRecords, lines: list[Line]) -> tuple[Any, Any, Any]:
    """Each record's transaction id and element time, dead letters' sources; the counters."""
    p = make_pipeline()
    out = (
        p
        | beam.Create([TimestampedValue(line, 1_000 + i) for i, line in enumerate(lines)])
        | normalize
    )
    records = out.records | "Times" >> beam.Map(
        lambda kv, t=beam.DoFn.TimestampParam: (kv[0], kv[1].source, int(t))
    )
    letters = out.dead_letters | "Letters" >> beam.Map(
        lambda d, t=beam.DoFn.TimestampParam: (d["reason"], d["source"], int(t))
    )
    return p, records, letters


def test_pooled_normalize_in_a_pipeline_matches_in_process():
    lines = _lines("wso2_sample.jsonl", acked=True) * 10  # several chunks of 256
    results = []
    for processes in (0, 2):
        normalize = NormalizeRecords("events", "wso2", inline_signatures=True, processes=processes)
        p, records, letters = _keyed_times(normalize, lines)
        expected_records = []
        expected_letters = []
        for outputs, (i, _line) in zip(
            _in_process(NormalizeRecords("events", "wso2", inline_signatures=True), lines),
            enumerate(lines),
            strict=True,
        ):
            for o in outputs:
                if isinstance(o, pvalue.TaggedOutput):
                    expected_letters.append((o.value["reason"], o.value["source"], 1_000 + i))
                else:
                    expected_records.append((o[0], o[1].source, 1_000 + i))
        assert_that(records, equal_to(expected_records), label="records")
        assert_that(letters, equal_to(expected_letters), label="letters")
        counters = run(p)
        results.append({k: counters[k] for k in ("read", "parse_errors", "invalid", "too_large")})
    assert results[0] == results[1]
    assert results[1]["read"] == len(lines)


class _DieOn(beam.DoFn):
    """Passes elements on; the worker process that gets ``fatal`` dies."""

    def __init__(self, fatal: str) -> None:
        self._fatal = fatal
        self._parent = os.getpid()
        self._seen = counter("pooled_test_seen")

    def process(self, element: str) -> Iterator[str]:
        self._seen.inc()
        if element == self._fatal and os.getpid() != self._parent:
            os._exit(3)
        yield element


def test_a_worker_that_dies_fails_the_bundle():
    p = make_pipeline()
    _ = (
        p
        | beam.Create([f"e{i}" for i in range(600)])
        | beam.ParDo(pooled.in_processes(_DieOn("e500"), 1, chunk=100))
    )
    with pytest.raises(Exception, match=r"(?i)process|terminated|broken"):
        run(p)


class _Arrivals(beam.DoFn):
    """Notes the order elements arrive in (the FnApiRunner runs it in this process)."""

    seen: list[str] = []  # noqa: RUF012 - read by the test after the run

    def process(self, element: str) -> None:
        _Arrivals.seen.append(element)


def test_counts_once_and_keeps_the_order_through_a_pool():
    p = make_pipeline()
    words = [f"w{i}" for i in range(1_000)]
    _Arrivals.seen = []
    _ = (
        p
        | beam.Create(words, reshuffle=False)
        | beam.ParDo(pooled.in_processes(_DieOn("never"), 2, chunk=64))
        | beam.ParDo(_Arrivals())
    )
    counters = run(p)
    assert _Arrivals.seen == words
    # Counted in the workers, added here once: not also published by the workers.
    assert counters["pooled_test_seen"] == len(words)


class _Threshold(beam.DoFn):
    """The young generation's threshold of the process it runs in."""

    def __init__(self) -> None:
        self._stage_pid = os.getpid()

    def process(self, element: str) -> Iterator[tuple[str, int, bool]]:
        import gc

        yield element, gc.get_threshold()[0], os.getpid() == self._stage_pid


def test_workers_collect_garbage_less_often():
    p = make_pipeline()
    _ = (
        p
        | beam.Create(["a", "b"], reshuffle=False)
        | beam.ParDo(pooled.in_processes(_Threshold(), 1, chunk=1))
        | beam.ParDo(_Arrivals())
    )
    _Arrivals.seen = []
    run(p)
    assert [(word, here) for word, _, here in _Arrivals.seen] == [("a", False), ("b", False)]
    assert {threshold for _, threshold, _ in _Arrivals.seen} == {YOUNG_THRESHOLD}


@pytest.mark.parametrize(("processes", "chunk"), [(0, 10), (1, 0), (-1, 5)])
def test_a_pool_needs_a_process_and_a_chunk(processes, chunk):
    with pytest.raises(ValueError, match="at least 1"):
        pooled.in_processes(_DieOn("x"), processes, chunk=chunk)


def test_normalize_refuses_negative_processes():
    with pytest.raises(ValueError, match="0 or more"):
        NormalizeRecords("events", "wso2", processes=-1)


_ORPHANING = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a draining stream takes its Ctrl-C
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from moesif_beam.transforms.common import pooled
from tests.unit.test_pooled import _DieOn
fn = pooled.in_processes(_DieOn("never"), 2, chunk=8)
fn.setup()
fn.start_bundle()
for i in range(64):
    fn.process(str(i), Timestamp(i), GlobalWindow())
list(fn.finish_bundle())
print(" ".join(str(pid) for pid in fn._pool._processes), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone but for its parent's wait: not alive.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


def test_workers_outlive_a_ctrl_c_and_end_when_the_stage_process_is_killed_outright():
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", _ORPHANING],
        cwd=repo,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal gives a command
    )
    try:
        workers = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(workers) == 2
        assert all(_alive(pid) for pid in workers)
        # Ctrl-C goes to the terminal's process group: the stage's, not its workers'.
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(1.5)
        assert all(_alive(pid) for pid in workers)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)
