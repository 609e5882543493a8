"""Streaming dedup: a transaction id is dropped within its TTL of event time, then forgotten."""

from __future__ import annotations

import random
import time

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream as EventStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from moesif_beam.transforms.common.counters import local_tally, tally_snapshot
from moesif_beam.transforms.dedup.streaming import DedupAndCheckInProcess, DedupInStream, _SeenIds
from moesif_beam.transforms.records import Record
from tests.helpers import run

TTL = 60


def _record(tid: str, seconds: float, ack: object = None) -> TimestampedValue:
    value = Record(int(seconds * 1000), b"{}", b"raw", f"src:{tid}", ack=ack)
    return TimestampedValue((tid, value), seconds)


@pytest.mark.parametrize("shape", ["keyed", "single_process"])
def test_repeats_within_the_ttl_are_dropped_and_acknowledged_then_forgotten(shape):
    stream = (
        EventStream()
        .add_elements([_record("a", 0), _record("b", 1), _record("a", 2, ack="ack-a2")])
        .add_elements([_record("a", 50, ack="ack-a50"), _record("c", 30), _record("d", 95)])
        # Ids are filed in 10 s buckets of event time and forgotten once the watermark (in
        # one process: the newest event time seen) passes the bucket's end plus the TTL: a
        # and b (bucket 0-10 s) at 70 s, c (30-40 s) at 100 s, d (90-100 s) only at 160 s.
        .advance_watermark_to(100)
        .add_elements([_record("a", 101), _record("b", 102), _record("c", 103)])
        .add_elements([_record("d", 104, ack="ack-d104")])
        .advance_watermark_to_infinity()
    )
    options = PipelineOptions(["--runner=BundleBasedDirectRunner"])
    options.view_as(StandardOptions).streaming = True
    pipeline = beam.Pipeline(options=options)
    if shape == "keyed":
        out = pipeline | stream | DedupInStream(TTL, shards=3)
    else:
        out = pipeline | stream | DedupAndCheckInProcess(TTL, {}, "events")
    assert_that(
        out.records | beam.Map(lambda kv: (kv[0], kv[1][0] // 1000)),
        equal_to([("a", 0), ("b", 1), ("c", 30), ("d", 95), ("a", 101), ("b", 102), ("c", 103)]),
        label="records",
    )
    assert_that(out.acks, equal_to(["ack-a2", "ack-a50", "ack-d104"]), label="acks")
    before = local_tally()["duplicates"]
    run(pipeline)
    # The in-process tally, not the runner's metrics: the direct runner's streaming mode
    # reports only part of a keyed stage's counter (seen: 1 of 3), while every worker here
    # runs in this process, as with moesif-beam's own streaming setup.
    assert local_tally()["duplicates"] - before == 3


def test_seen_ids_forget_whole_buckets():
    seen = _SeenIds()
    assert seen.add("x", 1_000)
    assert not seen.add("x", 9_000)
    assert seen.add("y", 15_000)
    assert seen.oldest_bucket_end() == 10_000
    seen.forget_before(10_000)
    assert seen.add("x", 20_000)
    assert not seen.add("y", 20_000)
    seen.forget_before(30_000)
    assert seen.ids == {}
    assert seen.oldest_bucket_end() is None


def test_dedup_validates():
    with pytest.raises(ValueError, match="dedup_ttl"):
        DedupInStream(0)
    with pytest.raises(ValueError, match="dedup_ttl"):
        DedupAndCheckInProcess(0, {}, "events")
    with pytest.raises(ValueError, match="unknown types"):
        DedupAndCheckInProcess(60, {"k": "text"}, "events")
    with pytest.raises(ValueError, match="shards"):
        DedupInStream(60, shards=0)


def test_buckets_scale_with_a_short_ttl():
    # A TTL of 2 s with 10 s buckets would keep an id for up to 12 s.
    assert _SeenIds.for_ttl(2_000).bucket_ms == 500
    assert _SeenIds.for_ttl(3_600_000).bucket_ms == _SeenIds.BUCKET_MS
    assert _SeenIds.for_ttl(2).bucket_ms == 1
    with pytest.raises(ValueError, match="bucket_ms"):
        _SeenIds(0)


def test_seen_ids_schedule_and_expire_track_the_oldest_due_bucket():
    seen = _SeenIds(1_000)
    seen.add("a", 2_500)
    assert seen.schedule(2_500, 60_000) == 63_000  # bucket 2-3 s, due a TTL after its end
    seen.add("b", 5_100)
    assert seen.schedule(5_100, 60_000) is None  # a later bucket: the earlier one is due first
    assert seen.expire(63_000, 60_000) == 66_000  # "a" forgotten; "b" falls due next
    assert set(seen.ids) == {"b"}
    assert seen.expire(70_000, 60_000) is None
    assert seen.ids == {}


# -- Keys that move: the shard's state is the truth, the worker's memory only mirrors it --


class _Runner:
    """A runner's view of one shard's state: bundles see committed state plus their own
    writes, and a failed bundle's writes are dropped (as Flink and Dataflow do)."""

    def __init__(self) -> None:
        self.committed: dict[str, object] = {"ids": [], "generation": None}

    def bundle(self) -> _Bundle:
        return _Bundle(self)


class _Bundle:
    def __init__(self, runner: _Runner) -> None:
        self._runner = runner
        self.ids = list(runner.committed["ids"])
        self.generation_value = runner.committed["generation"]
        self.timer_at = None

    def commit(self) -> None:
        self._runner.committed = {"ids": self.ids, "generation": self.generation_value}


class _Bag:
    def __init__(self, bundle: _Bundle) -> None:
        self._b = bundle

    def read(self):
        return list(self._b.ids)

    def add(self, value) -> None:
        self._b.ids.append(value)

    def clear(self) -> None:
        self._b.ids = []


class _Cell:
    def __init__(self, bundle: _Bundle) -> None:
        self._b = bundle

    def read(self):
        return self._b.generation_value

    def write(self, value) -> None:
        self._b.generation_value = value


class _Timer:
    def __init__(self, bundle: _Bundle) -> None:
        self._b = bundle

    def set(self, at) -> None:
        self._b.timer_at = at


def _worker(journal: str | None = None):
    """A DoFn with a memory of its own, as on another worker process."""
    import uuid as _uuid

    from moesif_beam.transforms.dedup.streaming import _DedupFn

    fn = _DedupFn(_uuid.uuid4().hex, TTL, 1, journal)
    fn.setup()
    return fn


def _process(fn, runner: _Runner, tids: list[str], commit: bool = True) -> list[str]:
    """One bundle of shard 0 on ``fn``'s worker; the ids it lets through."""
    from apache_beam.utils.timestamp import Timestamp

    bundle = runner.bundle()
    fn.start_bundle()
    passed = []
    for tid in tids:
        value = Record(1_000, b"{}", b"raw", f"src:{tid}")
        for out in fn.process(
            (0, (tid, value)),
            timestamp=Timestamp(1),
            ids=_Bag(bundle),
            generation=_Cell(bundle),
            expire=_Timer(bundle),
        ):
            if isinstance(out, tuple):
                passed.append(out[0])
    if commit:
        bundle.commit()
    return passed


def test_a_shard_that_moves_between_workers_keeps_its_ids():
    runner = _Runner()
    a, b = _worker(), _worker()
    assert _process(a, runner, ["x"]) == ["x"]
    # The shard moves to worker b, which has never seen it: its ids come from state.
    assert _process(b, runner, ["x", "y"]) == ["y"]
    # And back to a, whose memory missed y: the generation tells it to reload.
    assert _process(a, runner, ["y", "z"]) == ["z"]


def test_a_failed_bundle_forgets_what_it_saw():
    runner = _Runner()
    a = _worker()
    assert _process(a, runner, ["x"]) == ["x"]
    # The bundle that saw y failed: the runner drops its state, and y was never
    # delivered. Its retry (on the same worker) must deliver y, not drop it as a copy.
    assert _process(a, runner, ["y"], commit=False) == ["y"]
    assert _process(a, runner, ["y", "x"]) == ["y"]


def test_a_restored_checkpoint_rolls_the_ids_back_with_it():
    runner = _Runner()
    a = _worker()
    _process(a, runner, ["x"])
    checkpoint = dict(runner.committed)
    _process(a, runner, ["y"])
    runner.committed = checkpoint  # the job restarts from the checkpoint, y re-read
    assert _process(a, runner, ["y", "x"]) == ["y"]


# -- A new job: the state is gone, the journal of delivered ids is not --


def test_a_new_job_drops_copies_of_ids_the_journal_says_were_delivered(tmp_path):
    from moesif_beam.transforms.delivery.journal import DeliveredIds

    journal = str(tmp_path / "delivered")
    first_job = _Runner()
    assert _process(_worker(journal), first_job, ["x", "y"]) == ["x", "y"]
    now = int(time.time() * 1000)
    DeliveredIds(journal, TTL * 1000).write([("x", now), ("y", now)])  # what delivery wrote
    # A restart without a checkpoint: a new job, empty state, a fresh worker.
    assert _process(_worker(journal), _Runner(), ["x", "z", "y"]) == ["z"]
    # Without the journal, that job delivers both copies again (the old behaviour).
    assert _process(_worker(), _Runner(), ["x", "z", "y"]) == ["x", "z", "y"]


def test_a_moved_shard_also_learns_what_was_delivered_after_its_state_rolled_back(tmp_path):
    from moesif_beam.transforms.delivery.journal import DeliveredIds

    journal = str(tmp_path / "delivered")
    runner = _Runner()
    a = _worker(journal)
    _process(a, runner, ["x"])
    checkpoint = dict(runner.committed)
    _process(a, runner, ["y"])
    DeliveredIds(journal, TTL * 1000).write([("y", int(time.time() * 1000))])
    # y was delivered before the job went back to the checkpoint: its copy is dropped.
    runner.committed = checkpoint
    assert _process(_worker(journal), runner, ["y", "w"]) == ["w"]


def test_the_single_process_stream_starts_from_the_journal(tmp_path):
    import uuid as _uuid

    from apache_beam.utils.timestamp import Timestamp

    from moesif_beam.transforms.dedup.streaming import _DedupAndCheckFn
    from moesif_beam.transforms.delivery.journal import DeliveredIds

    journal = str(tmp_path / "delivered")
    DeliveredIds(journal, TTL * 1000).write([("x", int(time.time() * 1000))])
    fn = _DedupAndCheckFn(_uuid.uuid4().hex, TTL, {}, "events", journal=journal)
    fn.setup()
    passed = [
        out[0]
        for tid in ("x", "y")
        for out in fn.process((tid, Record(1_000, b"{}", b"raw", "s")), Timestamp(2))
        if isinstance(out, tuple)
    ]
    assert passed == ["y"]


def test_verdicts_on_columns_decide_as_verdict_does_one_by_one():
    # Two copies of one stage, each with its own memory: one decides record by record,
    # the other a column at a time. Ids repeat, times move past due buckets (so ids
    # are forgotten mid-column), and signatures agree, add keys and conflict.
    rng = random.Random(7)
    number, text = ((("n", "number"),), b"n-number"), ((("n", "string"),), b"n-string")
    wide = ((("n", "number"), ("m", "boolean")), b"nm")
    columns: list[tuple[str, int, bytes, tuple]] = []
    clock = 0
    for _ in range(3_000):
        clock += rng.choice((0, 1, 50, 9_000))
        signature, sig_id = rng.choice((number, text, wide, ((), b"")))
        columns.append((f"t{rng.randrange(400)}", clock, sig_id, signature))
    one, many = (DedupAndCheckInProcess(TTL, {}, "events").stage() for _ in range(2))
    one.setup()
    many.setup()
    before = tally_snapshot()
    expected: tuple[list, list, list] = ([], [], [])
    for position, (tid, time_ms, sig_id, signature) in enumerate(columns):
        new, conflict, fields = one.verdict(tid, time_ms, sig_id, signature)
        if new:
            expected[2].extend(fields)
            if conflict is None:
                expected[0].append(position)
            else:
                expected[1].append((position, conflict))
    one_counted = _counted(before)
    before = tally_snapshot()
    got: tuple[list, list, list] = ([], [], [])
    for start in range(0, len(columns), 700):
        chunk = list(zip(*columns[start : start + 700], strict=True))
        deliver, refused, fields = many.verdicts(*chunk)
        got[0].extend(start + p for p in deliver)
        got[1].extend((start + p, c) for p, c in refused)
        got[2].extend(fields)
    assert got == expected
    assert _counted(before) == one_counted
    assert one_counted["duplicates"] > 0 and one_counted["type_conflicts"] > 0
    assert expected[1] and expected[2]  # some conflicts, some keys decided
    assert len(expected[0]) + len(expected[1]) < len(columns)  # and some duplicates


def _counted(before: dict[str, int]) -> dict[str, int]:
    return {name: n - before.get(name, 0) for name, n in tally_snapshot().items()}


class _StoreAway:
    """A schema whose store fails on its second signature."""

    def __init__(self, schema: object) -> None:
        self._schema = schema
        self.calls = 0

    def check(self, sig_id: bytes, signature: tuple) -> tuple:
        self.calls += 1
        if self.calls == 2:
            raise OSError("the schema store is away")
        return self._schema.check(sig_id, signature)  # type: ignore[attr-defined]


@pytest.mark.parametrize("columns", [True, False])
def test_ids_whose_decision_failed_are_not_remembered(columns):
    # Nothing of a range whose deciding failed was decided: read again, its records
    # are new, not duplicates (one by one, the record that failed).
    stage = DedupAndCheckInProcess(TTL, {}, "events").stage()
    stage.setup()
    working = stage._schema
    stage._schema = _StoreAway(working)
    ids, times = ["a", "b", "c", "d"], [1_000, 2_000, 3_000, 4_000]
    sigs = [((("n", "number"),), b"n"), ((("m", "string"),), b"m")] * 2
    sig_ids, signatures = [s[1] for s in sigs], [s[0] for s in sigs]
    with pytest.raises(OSError, match="away"):
        if columns:
            stage.verdicts(ids, times, sig_ids, signatures)
        else:
            for i in range(4):
                stage.verdict(ids[i], times[i], sig_ids[i], signatures[i])
    stage._schema = working
    remembered = {"a"} if not columns else set()  # one by one, "a" was decided
    assert set(stage._seen.ids) == remembered
    assert all(set(bucket) <= remembered for bucket in stage._seen.buckets.values())
    deliver, refused, _ = stage.verdicts(ids, times, sig_ids, signatures)
    assert [ids[p] for p in deliver] == [i for i in ids if i not in remembered]
    assert refused == []
