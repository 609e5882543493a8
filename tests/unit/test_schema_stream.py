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
