"""Parsing and delivery in worker processes, deciding here: every line's fate, once."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import pytest
from apache_beam import pvalue
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import GlobalWindow, TimestampedValue

from moesif_beam.transforms.common.counters import tally_snapshot
from moesif_beam.transforms.common.in_workers import InWorkers
from moesif_beam.transforms.common.in_workers_decide import decide_range
from moesif_beam.transforms.common.in_workers_worker import _Worker
from moesif_beam.transforms.deadletters.letters import ACK_FIELD, DEAD_LETTER
from moesif_beam.transforms.dedup.streaming import NEW_FIELDS, DedupAndCheckInProcess
from moesif_beam.transforms.delivery.sinks import ACKS, WriteBatchFiles
from moesif_beam.transforms.formats.normalize import SIGNATURES, NormalizeRecords
from moesif_beam.transforms.records import Ack, Line, new_ack, new_line
from moesif_beam.transforms.sources.kafka_topic import KafkaSourceConfig
from tests.helpers import make_pipeline, read_batches, run

TAGS = (DEAD_LETTER, SIGNATURES, ACKS, NEW_FIELDS)


def _action(tid: str, metadata: Any) -> dict:
    return {
        "action_name": "Did",
        "transaction_id": tid,
        "request": {"time": "2026-11-05T00:00:00Z"},
        "metadata": metadata,
    }


def _raws() -> tuple[list[bytes], list[str], dict[str, str]]:
    """Lines, the ids that must be delivered, and the reason each rejected id is rejected."""
    raws: list[bytes] = []
    kept: list[str] = []
    for i in range(300):
        raws.append(json.dumps(_action(f"a{i}", {"n": i})).encode())
        kept.append(f"a{i}")
        if i % 15 == 7:  # a copy of an id already seen: a duplicate
            raws.append(json.dumps(_action(f"a{i - 3}", {"n": 0})).encode())
    # "n" is a number by then: a string is a type conflict.
    raws.append(json.dumps(_action("conflict", {"n": "text"})).encode())
    # One line holding two records: both must be done before its offset is.
    raws.append(json.dumps([_action("pair-0", {"n": 1}), _action("pair-1", {"n": 2})]).encode())
    kept += ["pair-0", "pair-1"]
    raws += [b"{not json", b"\xff\xfe"]
    return raws, kept, {"conflict": "type_conflict"}


def _stages(batch_dir: str, max_events: int = 40) -> tuple[beam.DoFn, beam.DoFn, beam.DoFn]:
    parse = NormalizeRecords("actions", "moesif", inline_signatures=True).stage()
    decide = DedupAndCheckInProcess(3600, {}, "actions").stage()
    sink = WriteBatchFiles("actions", batch_dir, max_events=max_events, max_in_flight=2)
    deliver = sink.stream_stage(1.0)
    return parse, decide, deliver


def _covered(acks: list[Ack]) -> dict[int, set[int]]:
    """Offset -> parts done, from acks (a run of offsets counts for every one in it)."""
    done: dict[int, set[int]] = {}
    for ack in acks:
        if ack.parts > 1:
            done.setdefault(ack.offset, set()).add(ack.part)
            continue
        for offset in range(ack.previous + 1, ack.offset + 1):
            done.setdefault(offset, set()).add(0)
    return done


class _Collect(beam.DoFn):
    """Keeps what reaches it (the FnApiRunner runs it in this process)."""

    seen: list[Ack] = []  # noqa: RUF012 - read by the test after the run

    def process(self, element: Ack) -> None:
        _Collect.seen.append(element)


@pytest.mark.parametrize("threads", [1, 3])
def test_every_line_is_delivered_duplicate_or_dead_lettered_and_acknowledged(tmp_path, threads):
    # With three threads, bundles run at once, each with its own copy of the DoFn, all
    # sharing the process's one pool (as Prism does with several partitions).
    raws, kept, rejected = _raws()
    lines = [Line(raw, f"t/0@{i}", Ack("t/0", i, i - 1)) for i, raw in enumerate(raws)]
    p = (
        make_pipeline()
        if threads == 1
        else TestPipeline(
            options=PipelineOptions(
                [
                    "--runner=FnApiRunner",
                    f"--direct_num_workers={threads}",
                    "--direct_running_mode=multi_threading",
                ]
            )
        )
    )
    source = beam.Create([TimestampedValue(line, i) for i, line in enumerate(lines)])
    out = p | source | InWorkers(*_stages(str(tmp_path / "batches")), 2, TAGS, chunk=32)
    _Collect.seen = []
    _ = out[ACKS] | "acks" >> beam.ParDo(_Collect())
    _ = (
        out[DEAD_LETTER]
        | "letter acks" >> beam.Map(lambda letter: letter[ACK_FIELD])
        | "collect" >> beam.ParDo(_Collect())
    )
    assert_that(
        out[DEAD_LETTER] | beam.Map(lambda letter: letter["reason"]),
        equal_to(["type_conflict", "parse_error", "parse_error"]),
        label="dead letters",
    )
    assert_that(out[NEW_FIELDS], equal_to([("n", "number")]), label="new fields")
    assert_that(out.main, equal_to([]), label="nothing on the main output")
    counters = run(p)

    delivered = [
        event["transaction_id"]
        for batch in read_batches(str(tmp_path / "batches"))
        for event in batch
    ]
    assert sorted(delivered) == sorted(kept)
    assert "conflict" not in delivered and len(rejected) == 1
    # Every offset is done, the two-record line in both its parts.
    done = _covered(_Collect.seen)
    assert set(done) == set(range(len(lines)))
    assert done[len(lines) - 3] == {0, 1}
    duplicates = len(raws) - len(kept) - 3 + 1  # the pair's line holds two records
    assert counters["duplicates"] == duplicates
    # dead_letters is the writer's count (no writer here): its parts, then.
    rejects = counters["parse_errors"] + counters["type_conflicts"]
    assert (counters["parse_errors"], counters["type_conflicts"]) == (2, 1)
    assert counters["read"] == counters["sent"] + counters["duplicates"] + rejects
    assert counters["sent"] == len(kept)


class _DieOn(beam.DoFn):
    """Parses nothing: ends its process on one line (in a worker only)."""

    def __init__(self, fatal: bytes) -> None:
        self._fatal = fatal
        self._parent = os.getpid()

    def process(self, line: Line) -> Iterator[Any]:
        if line.raw == self._fatal and os.getpid() != self._parent:
            os._exit(3)
        return iter(())


def test_a_worker_that_dies_fails_the_bundle(tmp_path):
    _, decide, deliver = _stages(str(tmp_path / "batches"))
    lines = [Line(f"l{i}".encode(), f"f:{i}") for i in range(200)]
    p = make_pipeline()
    _ = p | beam.Create(lines) | InWorkers(_DieOn(b"l150"), decide, deliver, 1, TAGS, chunk=20)
    with pytest.raises(Exception, match="worker process"):
        run(p)


class _Raises(beam.DoFn):
    def process(self, line: Line) -> Iterator[Any]:
        raise ValueError(f"cannot take {line.raw!r}")


def test_work_that_raises_in_a_worker_fails_the_bundle_with_its_reason(tmp_path):
    _, decide, deliver = _stages(str(tmp_path / "batches"))
    p = make_pipeline()
    _ = p | beam.Create([Line(b"x", "f:1")]) | InWorkers(_Raises(), decide, deliver, 1, TAGS)
    with pytest.raises(Exception, match="cannot take"):
        run(p)


class _Bundled(beam.DoFn):
    def start_bundle(self) -> None:
        pass

    def process(self, element: Any) -> Iterator[Any]:
        yield element


def test_the_stages_and_sizes_are_checked(tmp_path):
    parse, decide, deliver = _stages(str(tmp_path / "batches"))
    with pytest.raises(ValueError, match="decide must work per element"):
        InWorkers(parse, _Bundled(), deliver, 1, TAGS)
    with pytest.raises(ValueError, match="processes must be at least 1"):
        InWorkers(parse, decide, deliver, 0, TAGS)
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        InWorkers(parse, decide, deliver, 1, TAGS, chunk=0)
    with pytest.raises(ValueError, match="takes DoFns"):
        InWorkers(parse, decide, print, 1, TAGS)  # type: ignore[arg-type]
    kafka = KafkaSourceConfig("127.0.0.1:9", "t", "g")
    with pytest.raises(TypeError, match="decide must offer verdicts and letter"):
        InWorkers(parse, _Drop(), deliver, 1, TAGS, kafka=kafka)
    InWorkers(parse, decide, deliver, 1, TAGS, kafka=kafka)  # the dedup stage offers both


class _SlowFirst(beam.DoFn):
    """Parses a line into a bare record; the first line takes half a second (in a worker)."""

    def process(self, line: Line) -> Iterator[Any]:
        import time

        from moesif_beam.transforms.records import new_record

        if line.raw == b"l0":
            time.sleep(0.5)
        yield line.raw.decode(), new_record((0, b"{}", line.raw, line.source, b"", (), None, -1))


class _Order(beam.DoFn):
    """Keeps every record, noting the order it decided them in (in this process)."""

    seen: list[str] = []  # noqa: RUF012 - read by the test after the run

    def process(self, element: Any, timestamp: Any = beam.DoFn.TimestampParam) -> Iterator[Any]:
        _Order.seen.append(element[0])
        yield element


class _Drop(beam.DoFn):
    def process(self, element: Any) -> Iterator[Any]:
        return iter(())


def test_decide_sees_records_in_the_order_of_their_lines():
    # The first chunk's worker is slow, so the second chunk's questions come back first.
    lines = [Line(f"l{i}".encode(), f"f:{i}") for i in range(64)]
    _Order.seen = []
    p = make_pipeline()
    _ = (
        p
        | beam.Create(lines, reshuffle=False)
        | InWorkers(_SlowFirst(), _Order(), _Drop(), 2, TAGS, chunk=8)
    )
    run(p)
    assert _Order.seen == [f"l{i}" for i in range(64)]


class _DecideRaises(beam.DoFn):
    def process(self, element: Any, timestamp: Any = beam.DoFn.TimestampParam) -> Iterator[Any]:
        raise RuntimeError(f"no decision on {element[0]}")


def test_a_decision_that_raises_fails_the_bundle_with_its_reason():
    lines = [Line(f"l{i}".encode(), f"f:{i}") for i in range(20)]
    p = make_pipeline()
    _ = p | beam.Create(lines) | InWorkers(_SlowFirst(), _DecideRaises(), _Drop(), 1, TAGS)
    with pytest.raises(Exception, match="no decision on l"):
        run(p)


def _next(conn: Any, kind: str) -> tuple:
    """The worker's next message of ``kind`` (its now-and-then "L" reports skipped)."""
    while True:
        message = pickle.loads(conn.recv_bytes())
        if message[0] == kind:
            return message
        assert message[0] == "L", message


def test_a_range_message_of_several_records_ends_each_its_own_way(tmp_path, monkeypatch):
    # The worker's side of a Kafka range, without the broker (tests/integration covers
    # the read): one message holds three records that end three ways, delivered,
    # duplicate and type conflict, and the message is done only once all three are.
    parse, decide, deliver = _stages(str(tmp_path / "batches"))
    decide.setup()
    here, there = multiprocessing.Pipe()
    # No now-and-then reports: a thread that would outlive the test.
    monkeypatch.setattr(_Worker, "_report", lambda self: None)
    worker = _Worker(there)
    worker.start(parse, deliver)
    three = [_action("kept", {"n": 2}), _action("first", {"n": 3}), _action("clash", {"n": "x"})]
    raws = [json.dumps(_action("first", {"n": 1})).encode(), json.dumps(three).encode(), b"{no"]
    lines = [
        new_line((raw, f"t/0@{10 + i}", new_ack(("t/0", 10 + i, 9 + i, 1, 0)), -1))
        for i, raw in enumerate(raws)
    ]
    gap = new_ack(("t/0", 14, 12, 1, 0))  # offsets 13 and 14 hold no record
    before = tally_snapshot()
    worker._parsed(1, lines, [1_000, 1_001, 1_002], gap)

    _, _, asked, tagged, finished, _, _ = _next(here, "Q")
    assert asked[0] == ["first", "kept", "first", "clash"]  # ids: a column, in order
    assert finished == []
    keep = bytearray(len(asked[0]))
    letters: dict[int, dict] = {}
    outputs: list[Any] = []
    decide_range(decide, asked, (0, GlobalWindow()), keep, letters, outputs)
    assert list(keep) == [1, 1, 0, 2]
    assert [out.value.value for out in outputs if out.tag == NEW_FIELDS] == [("n", "number")]
    assert not letters[3]["payload"]  # the worker holds the input bytes, not this side
    worker._delivered(1, bytes(keep), letters)
    _, _, delivered, _, _ = _next(here, "R")
    ended = list(worker._deliver.finish_bundle())

    by_tag: dict[str, list[Any]] = {}
    for out in [*(pvalue.TaggedOutput(tag, value) for _, tag, value in tagged), *delivered]:
        by_tag.setdefault(out.tag, []).append(out.value)
    for out in ended:
        by_tag.setdefault(out.tag, []).append(out.value.value)
    parse_error, conflict = by_tag[DEAD_LETTER]
    assert parse_error["reason"] == "parse_error" and parse_error["payload"] == b"{no"
    assert conflict["reason"] == "type_conflict"
    # The conflicting record's own bytes and place, not the whole message's.
    assert json.loads(conflict["payload"]) == three[2]
    assert conflict["source"].startswith("t/0@11") and conflict["source"] != "t/0@11"
    assert conflict[ACK_FIELD] == Ack("t/0", 11, 10, 3, 2)
    done = _covered([*by_tag[ACKS], parse_error[ACK_FIELD], conflict[ACK_FIELD]])
    assert done == {10: {0}, 11: {0, 1, 2}, 12: {0}, 13: {0}, 14: {0}}
    delivered_ids = [
        e["transaction_id"] for b in read_batches(str(tmp_path / "batches")) for e in b
    ]
    assert delivered_ids == ["first", "kept"]
    counted = {k: n - before.get(k, 0) for k, n in tally_snapshot().items()}
    assert (counted["read"], counted["parse_errors"], counted["sent"]) == (5, 1, 2)
    for stage in (deliver, parse, decide):
        stage.teardown()
    here.close()  # ends the worker's reading thread
    there.close()
