"""The metadata type rule in streaming: first arrival wins, decided in keyed stages or, for
a stream whose workers are one process, in that process's memory (both shapes run here)."""

from __future__ import annotations

import json

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream as EventStream
from apache_beam.testing.util import assert_that, equal_to

from moesif_beam.transforms.dedup.streaming import DedupAndCheckInProcess
from moesif_beam.transforms.formats.normalize import NormalizeRecords
from moesif_beam.transforms.records import Line
from moesif_beam.transforms.schema import EnforceMetadataSchemaInStream, InProcessSchema


def _line(tid: str, day: int, metadata: dict | None) -> Line:
    action = {
        "action_name": "Did",
        "transaction_id": tid,
        "request": {"time": f"2026-11-{day:02d}T00:00:00Z"},
    }
    if metadata is not None:
        action["metadata"] = metadata
    return Line(json.dumps(action).encode(), f"stream:{tid}")


def _streaming_pipeline() -> beam.Pipeline:
    # The bundle-based direct runner supports TestStream and keyed state in streaming mode.
    options = PipelineOptions(["--runner=BundleBasedDirectRunner"])
    options.view_as(StandardOptions).streaming = True
    return beam.Pipeline(options=options)


@pytest.fixture(params=["keyed", "single_process"])
def shape(request):
    return request.param


def _check(stream: EventStream, shape: str, stored=None, shards=4):
    pipeline = _streaming_pipeline()
    inline = shape == "single_process"
    normalized = pipeline | stream | NormalizeRecords("actions", "moesif", inline_signatures=inline)
    if inline:
        checked = normalized.records | DedupAndCheckInProcess(3600, stored or {}, "actions")
    else:
        checked = (normalized.records, normalized.signatures) | EnforceMetadataSchemaInStream(
            stored or {}, "actions", shards=shards
        )
    return pipeline, checked


def test_first_arrival_wins_even_against_an_earlier_event_time(shape):
    stream = (
        EventStream()
        .add_elements([_line("first", 5, {"some_string": "I am a string", "n": 1})])
        .advance_processing_time(1)
        # arrives later, although its event time is earlier: in a stream, arrival decides
        .add_elements([_line("second", 1, {"some_object": {"some_string": 23}})])
        .advance_processing_time(1)
        .add_elements([_line(f"same-shape-{i}", 6, {"n": i}) for i in range(20)])
        .add_elements([_line("no-metadata", 6, None)])
        .advance_watermark_to_infinity()
    )
    pipeline, checked = _check(stream, shape)
    accepted = ["first", "no-metadata", *(f"same-shape-{i}" for i in range(20))]
    assert_that(checked.records | beam.Keys(), equal_to(accepted), label="accepted")
    assert_that(
        checked.dead_letters
        | beam.Map(
            lambda d: (d["transaction_id"], d["field"], d["expected_type"], d["actual_type"])
        ),
        equal_to([("second", "some_string", "string", "number")]),
        label="conflicts",
    )
    assert_that(
        checked.new_fields,
        equal_to([("some_string", "string"), ("n", "number"), ("some_object", "object")]),
        label="new keys, each once",
    )
    pipeline.run().wait_until_finish()


def test_one_key_gets_one_type_when_conflicting_records_arrive_together(shape):
    stream = (
        EventStream()
        .add_elements(
            [_line(f"num-{i}", 1, {"k": i}) for i in range(10)]
            + [_line(f"str-{i}", 1, {"k": str(i)}) for i in range(10)]
        )
        .advance_watermark_to_infinity()
    )
    pipeline, checked = _check(stream, shape, shards=3)

    def one_type_won(ids):
        ids = sorted(ids)
        assert ids in ([f"num-{i}" for i in range(10)], [f"str-{i}" for i in range(10)]), ids

    assert_that(checked.records | beam.Keys(), one_type_won, label="accepted")

    def the_other_type_lost(ids):
        assert len(ids) == 10 and len({i.split("-")[0] for i in ids}) == 1, ids

    assert_that(
        checked.dead_letters | beam.Map(lambda d: d["transaction_id"]),
        the_other_type_lost,
        label="rejected",
    )
    pipeline.run().wait_until_finish()


def test_the_persisted_schema_wins_in_streams_too(shape):
    stream = (
        EventStream()
        .add_elements([_line("a", 1, {"plan": 3}), _line("b", 1, {"plan": "pro", "x": True})])
        .advance_watermark_to_infinity()
    )
    pipeline, checked = _check(stream, shape, stored={"plan": "string"})
    assert_that(checked.records | beam.Keys(), equal_to(["b"]), label="accepted")
    assert_that(checked.new_fields, equal_to([("x", "boolean")]), label="new keys")
    pipeline.run().wait_until_finish()


def test_in_process_schema_decides_each_key_once_across_threads():
    import threading

    from moesif_beam.transforms.schema import signature, signature_id

    schema = InProcessSchema({"plan": "string"})
    shapes = [{"k": 1, "plan": "pro"}, {"k": "one"}, {"k": True, "n": {"m": 1}}]
    sigs = [signature(m) for m in shapes]
    results: list = []

    def work(i: int) -> None:
        sig = sigs[i % 3]
        results.append((i % 3, *schema.check(signature_id(sig), sig)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    accepted = {i for i, conflict, _ in results if conflict is None}
    assert len(accepted) == 1  # one type of "k" won, whichever came first
    new = [field for _, _, fields in results for field in fields]
    assert sorted(key for key, _ in new) == ["k", "m", "n"]  # each once; "plan" was stored
    # A key twice in one signature: the first of its types (in signature order) wins.
    twice = (("x", "number"), ("x", "string"))
    conflict, fields = InProcessSchema({}).check(b"twice", twice)
    assert conflict == ("x", "number", "string")
    assert fields == [("x", "number")]


# -- The store decides once for every run, restart and worker --------------------------------


def test_concurrent_writers_of_a_local_store_lose_no_key_and_agree_on_each(tmp_path):
    import threading

    from moesif_beam.transforms.schema.store import decide_in_store, load_schema, save_schema

    path = str(tmp_path / "store" / "schema.json")
    answers: dict[str, set[str]] = {}
    lock = threading.Lock()

    def writer(n: int) -> None:
        for i in range(15):
            # Every writer decides the shared keys with its own type, and adds its own.
            kind = "number" if n % 2 else "string"
            got, _ = decide_in_store(path, "name", f"shared{i}", kind)
            with lock:
                answers.setdefault(f"shared{i}", set()).add(got)
            save_schema(path, "name", [(f"own{n}_{i}", "boolean")])

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored = load_schema(path, "name")
    assert all(len(types) == 1 for types in answers.values()), answers
    assert {k: stored[k] for k in answers} == {k: next(iter(v)) for k, v in answers.items()}
    assert {k for k in stored if k.startswith("own")} == {
        f"own{n}_{i}" for n in range(6) for i in range(15)
    }


class _NoState:
    def __init__(self) -> None:
        self.value = None

    def read(self):
        return self.value

    def write(self, value) -> None:
        self.value = value


def test_a_restarted_job_decides_a_key_as_the_store_says_not_as_its_first_record(tmp_path):
    import uuid

    from moesif_beam.transforms.schema.streaming import _DecideKeyTypeFn

    store = (str(tmp_path / "schema.json"), "name")
    first_job = _DecideKeyTypeFn({}, uuid.uuid4().hex, store)
    first_job.setup()
    out = list(first_job.process(("plan", (b"sig1", "string", 1)), _NoState()))
    assert out[-1] == (b"sig1", ("plan", "string", "string", 1))
    # A new job: fresh memory and fresh Beam state, started from the same stored snapshot
    # (empty: the key was decided after it was read). Its first record says number.
    second_job = _DecideKeyTypeFn({}, uuid.uuid4().hex, store)
    second_job.setup()
    out = list(second_job.process(("plan", (b"sig2", "number", 1)), _NoState()))
    assert out[-1] == (b"sig2", ("plan", "string", "number", 1))  # a conflict, not a new type


def test_the_in_process_rule_stores_a_decision_before_using_it_and_reads_others(tmp_path):
    from moesif_beam.transforms.schema.store import load_schema, save_schema

    store = (str(tmp_path / "schema.json"), "name")
    run_a = InProcessSchema({}, store)
    run_b = InProcessSchema({}, store)  # started with the same (empty) snapshot
    assert run_a.check(b"s1", (("plan", "string"),)) == (None, [("plan", "string")])
    assert load_schema(*store) == {"plan": "string"}  # durable before the verdict is used
    save_schema(*store, [("seats", "number")])  # a third run decided seats meanwhile
    conflict, new = run_b.check(b"s2", (("plan", "number"), ("seats", "string")))
    assert conflict == ("plan", "string", "number")
    assert new == []  # nothing b decided was new to the store
