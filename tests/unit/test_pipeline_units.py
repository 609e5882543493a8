"""The pipeline's transforms on the FnApiRunner: normalize, dedup, batching, dead letters."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import random
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from moesif_beam.pipelines import events
from moesif_beam.pipelines.config import PipelineConfig
from moesif_beam.transforms.dedup.bounded import (
    DedupByTransactionId,
    pack_block,
    pick_first,
    removes_spill_as_read,
    unpack_blocks,
)
from moesif_beam.transforms.delivery.sinks import WriteBatchFiles
from moesif_beam.transforms.formats.normalize import NormalizeRecords
from moesif_beam.transforms.records import Ack, Line, Record
from moesif_beam.transforms.sources.files import (
    Oversized,
    ReadLines,
    iter_lines,
    iter_range,
    plan_ranges,
)
from tests.fixtures import (
    FAULT_EVENT_AS_PRINTED,
    FAULT_EVENT_LINE,
    RESPONSE_EVENT_AS_PRINTED,
    RESPONSE_EVENT_LINE,
    wso2_line,
)
from tests.helpers import (
    assert_nothing_lost,
    make_pipeline,
    read_batches,
    read_dead_letters,
    run,
    spill_files,
)


def test_normalize_routes_every_line_to_records_or_dead_letters():
    lines = [
        (RESPONSE_EVENT_LINE, "f:1"),
        (FAULT_EVENT_LINE, "f:2"),
        (RESPONSE_EVENT_AS_PRINTED, "f:3"),  # the docs' own syntax error
        (FAULT_EVENT_AS_PRINTED, "f:4"),
        (b'{"apiMethod": "GET", "caf\xff": 1}', "f:5"),  # bad UTF-8
        (wso2_line("x", requestTimestamp=None), "f:6"),
        (b'{"a": NaN}', "f:7"),
        (b"[1, 2]", "f:8"),
    ]
    pipeline = make_pipeline()
    out = (
        pipeline | beam.Create([Line(*line) for line in lines]) | NormalizeRecords("events", "wso2")
    )
    assert_that(
        out.records | "Ids" >> beam.Keys(),
        equal_to(["79ed20c3-55b1-434a-adf6-eea25e2d09c3", "ccf2196f-9db8-429b-aaae-98f4c6edf6d7"]),
        label="records",
    )
    assert_that(
        out.dead_letters | "Why" >> beam.Map(lambda d: (d["source"], d["reason"], d["field"])),
        equal_to(
            [
                ("f:3", "parse_error", None),
                ("f:4", "parse_error", None),
                ("f:5", "parse_error", None),
                ("f:6", "invalid_record", "requestTimestamp"),
                ("f:7", "parse_error", None),
                ("f:8", "invalid_record", None),
            ]
        ),
        label="dead letters",
    )
    assert_that(
        out.dead_letters | "Payload" >> beam.Map(lambda d: (d["source"], d["payload"])),
        equal_to([(source, raw) for raw, source in lines[2:]]),
        label="payloads untouched",
    )
    counters = run(pipeline)
    assert (counters["read"], counters["parse_errors"], counters["invalid"]) == (8, 4, 2)


def test_normalize_dead_letters_records_over_the_size_limit():
    big = wso2_line("big", properties={"apiContext": "/a", "blob": "x" * 2000})
    pipeline = make_pipeline()
    out = (
        pipeline
        | beam.Create([Line(big, "f:1")])
        | NormalizeRecords("events", "wso2", max_record_bytes=1500)
    )
    assert_that(
        out.dead_letters | beam.Map(lambda d: (d["reason"], d["transaction_id"])),
        equal_to([("too_large", "big")]),
    )
    assert run(pipeline)["too_large"] == 1


def test_pick_first_is_order_independent():
    values = [
        Record(5, b"b", b"r1", "s1"),
        Record(3, b"z", b"r2", "s2"),
        Record(3, b"a", b"r3", "s3"),
    ]
    for _ in range(5):
        random.shuffle(values)
        assert pick_first(values) == (Record(3, b"a", b"r3", "s3"), 2)
    with pytest.raises(ValueError, match="at least one"):
        pick_first([])


def test_dedup_keeps_the_earliest_record_per_transaction_id():
    records = [
        ("a", Record(2, b'{"v":2}', b"raw2", "f:2")),
        ("a", Record(1, b'{"v":1}', b"raw1", "f:1")),
        ("b", Record(7, b'{"v":7}', b"raw7", "f:7")),
        ("a", Record(1, b'{"v":1}', b"raw1", "f:9")),
    ]
    pipeline = make_pipeline()
    out = pipeline | beam.Create(records) | DedupByTransactionId()
    assert_that(
        out | beam.Map(lambda kv: (kv[0], kv[1].body)),
        equal_to([("a", b'{"v":1}'), ("b", b'{"v":7}')]),
    )
    assert run(pipeline)["duplicates"] == 2


def test_spill_blocks_round_trip():
    records = [
        ("a", Record(5, b'{"v":1}', b"raw\xff", "f:1", b"\x01" * 16)),
        ("\u00e9t\u00e9", Record(-3, b"", b"", "topic/0@7", ack=Ack("topic/0", 7, 6, 3, 2))),
        ("s", Record(9, b"{}", b"r", "f:3", b"\x02", (("k", "string"), ("n", "number")))),
    ]
    # A file name decoded with surrogate escapes cannot be written as msgpack: that block
    # falls back to records packed one by one, and reads back the same.
    odd = [("b", Record(1, b"{}", b"x", "bad\udcffname.jsonl:4"))]
    data = pack_block(records) + pack_block(odd) + pack_block(records[:1])
    assert data[4:5] == b"M"
    assert pack_block(odd)[4:5] == b"P"
    assert list(unpack_blocks(data)) == [*records, *odd, records[0]]
    with pytest.raises(ValueError, match="not a spill block"):
        list(unpack_blocks(b"\x00\x00\x00\x00X"))


@pytest.mark.parametrize("spill", [False, True])
def test_dedup_spilled_or_shuffled_keeps_the_same_records(tmp_path, spill):
    rng = random.Random(3)
    records = []
    for i in range(400):
        tid = f"id-{rng.randrange(150)}"
        time_ms = rng.randrange(50)
        records.append(
            (tid, Record(time_ms, json.dumps({"t": tid, "i": i}).encode(), b"r", f"f:{i}"))
        )
    expected = {}
    for tid, value in records:
        if tid not in expected or value[:2] < expected[tid][:2]:
            expected[tid] = value
    pipeline = make_pipeline()
    spill_dir = str(tmp_path / "spill") if spill else None
    out = pipeline | beam.Create(records) | DedupByTransactionId(spill_dir, partitions=7)
    assert_that(out, equal_to(sorted(expected.items())))
    assert run(pipeline)["duplicates"] == len(records) - len(expected)


def test_the_spill_keeps_records_msgpack_cannot_write(tmp_path):
    # A file whose name is not UTF-8 gives sources decoded with surrogate escapes; the
    # spill writes those records apart (packed) and the partition's dedup reads them back.
    dedup = DedupByTransactionId(str(tmp_path), partitions=3)
    spill, keep = dedup.spill_stage(), dedup.keep_stage()
    records = [
        (f"id-{i % 7}", Record(i, b'{"i":%d}' % i, b"r", f"f\udcff:{i}" if i % 3 else f"f:{i}"))
        for i in range(30)
    ]
    files = spill_files(spill, records)
    kept = [winner for group in files.items() for run in keep.process(group) for winner in run]
    assert sorted(kept) == sorted(records[:7])  # the earliest of each id, its source intact


def test_partitions_read_through_one_reused_buffer_keep_every_record_intact(tmp_path):
    # The partition files are read into one buffer the DoFn reuses: a large partition
    # grows it past its first size (1 MiB), a small one after it fills only part of it,
    # and no record already emitted may change when the buffer is overwritten or replaced.
    keep = DedupByTransactionId(str(tmp_path / "k"), partitions=2).keep_stage()

    def spilled(name: str, pad: int) -> tuple[list, dict[int, list[str]]]:
        dedup = DedupByTransactionId(str(tmp_path / name), partitions=2)
        records = [
            (f"{name}-{i % 9}", Record(i, b'{"i":%d,"p":"%s"}' % (i, b"x" * pad), b"r", f"f:{i}"))
            for i in range(30)
        ]
        return records, spill_files(dedup.spill_stage(), records)

    big, big_files = spilled("big", 150_000)
    small, small_files = spilled("small", 10)
    assert min(os.path.getsize(p) for paths in big_files.values() for p in paths) > 1 << 20
    kept = []
    for files in (big_files, small_files, big_files):
        kept.append([w for group in files.items() for run in keep.process(group) for w in run])
    assert sorted(kept[0]) == sorted(kept[2]) == sorted(big[:9])
    assert sorted(kept[1]) == sorted(small[:9])


@pytest.mark.parametrize("remove_read", [True, False])
def test_a_partition_deletes_its_spill_files_once_read(tmp_path, remove_read):
    # The run no longer waits at its end for the whole spill to be deleted: each file goes
    # once its partition has read it, and what it held is still emitted. Only where asked:
    # a runner that retries bundles would read the files again.
    dedup = DedupByTransactionId(str(tmp_path / "spill"), partitions=2)
    spill, keep = dedup.spill_stage(), dedup.keep_stage(remove_read)
    records = [(f"id-{i % 5}", Record(i, b'{"i":%d}' % i, b"r", f"f:{i}")) for i in range(20)]
    files = spill_files(spill, records)
    assert len(list((tmp_path / "spill").iterdir())) == len(files) == 2
    kept = [winner for group in files.items() for run in keep.process(group) for winner in run]
    keep.teardown()  # waits for the deletions
    assert sorted(kept) == sorted(records[:5])
    assert len(list((tmp_path / "spill").iterdir())) == (0 if remove_read else 2)


@pytest.mark.parametrize(
    ("runner", "removes"),
    [
        ("moesif_beam.runners.engines.local_workers.LocalRunner", True),
        ("FnApiRunner", True),
        ("DirectRunner", False),  # may fall back to the BundleBasedDirectRunner
        ("BundleBasedDirectRunner", False),  # retries a failed bundle
        (None, False),
    ],
)
def test_spill_files_are_deleted_as_read_only_where_no_bundle_is_retried(runner, removes):
    assert removes_spill_as_read(runner) is removes


@pytest.mark.parametrize(("max_events", "max_bytes"), [(3, 5_000_000), (500, 1024), (7, 2000)])
def test_batches_respect_count_and_byte_limits(tmp_path, max_events, max_bytes):
    records = [
        (
            f"id-{i}",
            Record(i, json.dumps({"i": i, "pad": "p" * (i % 50)}).encode(), b"raw", f"f:{i}"),
        )
        for i in range(200)
    ]
    pipeline = make_pipeline()
    _ = (
        pipeline
        | beam.Create(records)
        | WriteBatchFiles("events", str(tmp_path), max_events=max_events, max_bytes=max_bytes)
    )
    counters = run(pipeline)
    batches = read_batches(str(tmp_path))
    assert sorted(item["i"] for batch in batches for item in batch) == list(range(200))
    for path in tmp_path.glob("batch-*.json.gz"):
        plain = gzip.decompress(path.read_bytes())
        assert len(plain) <= max_bytes
        assert len(json.loads(plain)) <= max_events
    assert counters["sent"] == 200
    assert counters["batches"] == len(batches)
    assert counters["bytes_sent"] == sum(p.stat().st_size for p in tmp_path.glob("batch-*"))


def test_batches_are_the_same_whatever_the_number_in_flight(tmp_path):
    records = [
        (f"id-{i}", Record(i, json.dumps({"i": i}).encode(), b"raw", f"f:{i}")) for i in range(300)
    ]
    contents = {}
    for in_flight in (1, 4):
        out = tmp_path / str(in_flight)
        pipeline = make_pipeline()
        _ = (
            pipeline
            | beam.Create(records, reshuffle=False)
            | WriteBatchFiles("events", str(out), max_events=7, max_in_flight=in_flight)
        )
        counters = run(pipeline)
        assert counters["sent"] == 300
        assert counters["batches"] == len(list(out.glob("batch-*")))
        # What each batch holds, not its compressed bytes: once, in a full run of the
        # suite, igzip encoded one batch differently (the same CRC-32 and length). A
        # corrupt body fails here, in gzip.decompress's own checks.
        contents[in_flight] = sorted(gzip.decompress(p.read_bytes()) for p in out.glob("batch-*"))
    assert contents[1] == contents[4]


def test_batch_limits_are_validated():
    with pytest.raises(ValueError, match="batch_max_bytes"):
        WriteBatchFiles("events", "/tmp/x", max_bytes=60_000_000)
    with pytest.raises(ValueError, match="batch_max_bytes"):
        WriteBatchFiles("actions", "/tmp/x", max_bytes=16_000_000)
    with pytest.raises(ValueError, match="batch_max_events"):
        WriteBatchFiles("events", "/tmp/x", max_events=0)
    with pytest.raises(ValueError, match="kind"):
        WriteBatchFiles("users", "/tmp/x")
    with pytest.raises(ValueError, match="max_in_flight"):
        WriteBatchFiles("events", "/tmp/x", max_in_flight=0)


def test_events_pipeline_accounts_for_every_line(tmp_path):
    lines = [
        RESPONSE_EVENT_LINE,
        FAULT_EVENT_LINE,
        RESPONSE_EVENT_LINE,  # a replayed line
        wso2_line("79ed20c3-55b1-434a-adf6-eea25e2d09c3", requestTimestamp="2022-01-20T03:00Z"),
        RESPONSE_EVENT_AS_PRINTED,
        FAULT_EVENT_AS_PRINTED,
        b"\xff\xfe not utf-8",
        b"",  # blank lines are not records
        wso2_line("no-time", requestTimestamp=None),
        *(wso2_line(f"id-{i}") for i in range(30)),
    ]
    source = tmp_path / "in.jsonl.gz"
    source.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    config = PipelineConfig(
        pipeline="events",
        input=str(source),
        input_format="wso2",
        output_dir=str(tmp_path / "out"),
        batch_max_events=7,
    )
    counters = run(events.build(config, make_pipeline().options))
    assert_nothing_lost(counters)
    assert counters["read"] == 38
    assert counters["duplicates"] == 2
    assert counters["sent"] == 32
    assert counters["dead_letters"] == 4
    assert counters["batches"] == 5  # 32 records, 7 per batch

    sent = [event for batch in read_batches(config.batch_dir) for event in batch]
    ids = [event["transaction_id"] for event in sent]
    assert len(ids) == len(set(ids)) == 32
    # the earliest of the repeated correlationId won
    repeated = next(e for e in sent if e["transaction_id"].startswith("79ed20c3"))
    assert repeated["request"]["time"] == "2022-01-20T03:00:00.000Z"

    dead = read_dead_letters(config.dead_letter_dir)
    assert sorted(d["reason"] for d in dead) == [
        "invalid_record",
        "parse_error",
        "parse_error",
        "parse_error",
    ]
    by_line = {d["source"].rsplit(":", 1)[1]: d for d in dead}
    assert by_line["5"]["payload"] == RESPONSE_EVENT_AS_PRINTED
    assert by_line["7"]["payload"] == b"\xff\xfe not utf-8"
    assert by_line["9"]["field"] == "requestTimestamp"
    assert all(d["pipeline"] == "events" and d["failed_at"] for d in dead)


def _random_lines_file(path, rng: random.Random) -> None:
    lines = []
    for _ in range(rng.randint(0, 60)):
        r = rng.random()
        if r < 0.1:
            lines.append(b"")
        elif r < 0.15:
            lines.append(b"  ")
        else:
            lines.append(bytes(rng.choice(b"ab{}:") for _ in range(rng.randint(1, 30))))
    data = b"\n".join(lines) + (b"\n" if rng.random() < 0.5 else b"")
    path.write_bytes(data.replace(b"\n", b"\r\n") if rng.random() < 0.2 else data)


@pytest.mark.parametrize("count_block", [3, 64, 4 << 20])
def test_planned_ranges_read_every_line_once_with_its_number(tmp_path, monkeypatch, count_block):
    # Planning counts newlines in blocks (ranges._COUNT_BLOCK): small blocks put block
    # edges inside and between the ranges, as a large file does.
    from moesif_beam.transforms.sources import ranges as planning

    monkeypatch.setattr(planning, "_COUNT_BLOCK", count_block)
    rng = random.Random(11)
    path = tmp_path / "in.jsonl"
    for _ in range(300):
        _random_lines_file(path, rng)
        ranges = plan_ranges(str(path), rng.randint(1, 40))
        assert [line for r in ranges for line in iter_range(r)] == list(iter_lines(str(path)))
        assert all(later[1] == earlier[2] for earlier, later in itertools.pairwise(ranges))


def test_planned_ranges_cut_over_long_lines_as_the_line_reader_does(tmp_path):
    # Ranges are read whole and cut in memory (files._range_at_once) when they are small:
    # the same lines, numbers and over-long lines as reading the file line by line.
    rng = random.Random(5)
    path = tmp_path / "in.jsonl"
    limit = 100_000
    for _ in range(40):
        lines = [
            bytes(rng.choice(b"ab \r{}") for _ in range(rng.choice((0, 3, 40, 99_999, 100_001))))
            + rng.choice((b"", b"\r", b"x" * rng.randint(60_000, 140_000)))
            for _ in range(rng.randint(1, 12))
        ]
        path.write_bytes(b"\n".join(lines) + rng.choice((b"", b"\n", b"\r\n")))
        ranges = plan_ranges(str(path), rng.randint(1, 300_000))
        read = [line for r in ranges for line in iter_range(r, limit)]
        assert read == list(iter_lines(str(path), limit))
        assert any(isinstance(line, Oversized) for line, _ in read) or all(
            len(line) <= limit + 1 for line in lines
        )


def test_the_range_reader_gives_what_the_line_reader_gives_in_one_list(tmp_path):
    # A planned range becomes one list of outputs (no generator per line); with no CR,
    # blank or over-long line it is built without a Python loop. Both ways must give the
    # line reader's lines, numbers and over-long dead letters.
    from apache_beam import pvalue

    from moesif_beam.transforms.sources.files import ReadLines

    rng = random.Random(23)
    path = tmp_path / "in.jsonl"
    clean = b"".join(b'{"n":%d}\n' % i for i in range(500))
    messy = clean.replace(b'{"n":7}', b"  ").replace(b'{"n":9}', b"x" * 300) + b"tail\r"
    for data in (clean, messy, clean[:-1]):
        path.write_bytes(data)
        read = ReadLines(str(path), pipeline="events", max_line_bytes=200).stage()
        read.setup()
        read.start_bundle()
        outputs = [
            o for r in plan_ranges(str(path), rng.randint(50, 3000)) for o in read.process(r)
        ]
        lines = [o for o in outputs if type(o) is Line]
        letters = [o.value for o in outputs if isinstance(o, pvalue.TaggedOutput)]
        expected = [item for item in iter_lines(str(path), 200)]
        assert [(line.raw, line.source) for line in lines] == [
            item for item in expected if not isinstance(item[0], Oversized)
        ]
        assert [letter["source"] for letter in letters] == [
            source for line, source in expected if isinstance(line, Oversized)
        ]
        assert all(letter["reason"] == "too_large" for letter in letters)


def test_a_planned_range_that_cannot_be_read_is_one_dead_letter(tmp_path):
    from apache_beam import pvalue

    from moesif_beam.transforms.sources.files import ReadLines

    path = tmp_path / "gone.jsonl"
    path.write_bytes(b'{"a":1}\n' * 100)
    ranges = plan_ranges(str(path), 200)
    path.unlink()
    read = ReadLines(str(path), pipeline="events", max_line_bytes=1 << 20).stage()
    read.setup()
    read.start_bundle()
    outputs = list(read.process(ranges[1]))
    assert len(outputs) == 1 and isinstance(outputs[0], pvalue.TaggedOutput)
    assert outputs[0].value["reason"] == "unreadable_input"
    assert "before its first line" in outputs[0].value["detail"]


def test_a_last_line_finished_after_planning_is_read_whole(tmp_path):
    # A file still being written: its last line had no newline when the ranges were
    # planned. Reading the range reads that line on to its end, as the line reader does.
    path = tmp_path / "growing.jsonl"
    path.write_bytes(b'{"a":1}\n' * 20 + b'{"partial"')
    ranges = plan_ranges(str(path), 64)
    with path.open("ab") as f:
        f.write(b':"rest"}\n{"next":2}\n')
    read = [line for r in ranges for line, _ in iter_range(r, 1 << 20)]
    assert read[-1] == b'{"partial":"rest"}'
    assert len(read) == 21


def test_a_line_within_the_limit_is_not_rebuilt_from_a_flood_of_carriage_returns(tmp_path):
    path = tmp_path / "cr.jsonl"
    path.write_bytes(b"a" + b"\r" * 200_000 + b"\nb\n")
    (flood, _), (after, number) = iter_lines(str(path), 10)
    assert isinstance(flood, Oversized)  # not held as 200,000 bytes of "\r"
    assert (after, number) == (b"b", f"{path}:2")


def test_only_local_plain_files_are_split(tmp_path):
    gz = tmp_path / "in.jsonl.gz"
    gz.write_bytes(gzip.compress(b"a\n" * 100))
    assert plan_ranges(str(gz), 10) == [(str(gz), 0, -1, 1)]
    small = tmp_path / "small.jsonl"
    small.write_bytes(b"a\n")
    assert plan_ranges(str(small), 10) == [(str(small), 0, 2, 1)]
    with pytest.raises(ValueError, match="range_bytes"):
        ReadLines(str(small), range_bytes=0)


def test_read_lines_reads_split_files_whole(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(b'{"n": %d}\n' % i for i in range(500)) + b"\n\nlast")
    pipeline = make_pipeline()
    lines = (pipeline | ReadLines(str(tmp_path / "*.jsonl"), range_bytes=256)).lines
    # Line.at (where a line starts) is the reader's, checked in test_line_offsets_*.
    pairs = lines | beam.Map(lambda line: (line.raw, line.source))
    assert_that(pairs, equal_to(list(iter_lines(str(path)))))
    run(pipeline)


@pytest.mark.parametrize("single_process", [False, True])
@pytest.mark.parametrize("source", ["kafka", "follow"])
def test_stream_flattens_take_inputs_of_one_coder(tmp_path, source, single_process):
    """Prism runs a Flatten whose inputs are coded unlike its output as one more stage,
    re-encoding every element that passes: on the record path that cost a whole hop."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from moesif_beam.pipelines.common import build_delivery
    from moesif_beam.transforms.sources.drain import OPEN_END
    from moesif_beam.transforms.sources.kafka import KafkaPartition, KafkaSourceConfig

    kafka = KafkaSourceConfig("localhost:9092", "t", "g") if source == "kafka" else None
    config = PipelineConfig(
        pipeline="events",
        input=str(tmp_path / "*.jsonl") if kafka is None else "",
        kafka=kafka,
        input_format="wso2",
        output_dir=str(tmp_path / "out"),
        streaming=True,
        follow=kafka is None,
        single_process=single_process,
        kafka_partitions=(KafkaPartition("t", 0, 0, OPEN_END),) if kafka else (),
    )
    graph = build_delivery(config, PipelineOptions(["--streaming"]), {}).to_runner_api()
    components = graph.components
    flattens = 0
    for transform in components.transforms.values():
        if transform.spec.urn != "beam:transform:flatten:v1":
            continue
        flattens += 1
        (output,) = transform.outputs.values()
        coder = components.pcollections[output].coder_id
        inputs = {components.pcollections[i].coder_id for i in transform.inputs.values()}
        assert inputs == {coder}, transform.unique_name
    assert flattens >= 1


# ---------------------------------------------------------------------------------------
# A partition's winners as one run (Fused): the same outcome as record by record
# ---------------------------------------------------------------------------------------


def _batches(directory: Any) -> list[list[str]]:
    return sorted(
        [event["transaction_id"] for event in json.loads(gzip.decompress(path.read_bytes()))]
        for path in directory.iterdir()
    )


@pytest.mark.parametrize(("max_events", "max_bytes"), [(3, 5_000_000), (500, 1024)])
def test_a_run_makes_the_batches_its_records_make_one_by_one(tmp_path, max_events, max_bytes):
    from moesif_beam.transforms.common.fused import Run

    records = [
        (
            f"id-{i:03d}",
            Record(
                i,
                json.dumps({"transaction_id": f"id-{i:03d}", "pad": "x" * (i * 7)}).encode(),
                b"r",
                "f:1",
            ),
        )
        for i in range(40)
    ]
    made = {}
    for how in ("one_by_one", "run"):
        sink = WriteBatchFiles(
            "events", str(tmp_path / how), max_events=max_events, max_bytes=max_bytes
        )._batching()
        sink.setup()
        sink.start_bundle()
        outputs: list[Any] = []
        if how == "run":
            outputs += sink.process_run(Run(records[:25]))
            outputs += sink.process_run(Run(records[25:]))
        else:
            for record in records:
                outputs += sink.process(record)
        outputs += list(sink.finish_bundle())
        sink.teardown()
        assert outputs == []  # nothing was refused
        made[how] = _batches(tmp_path / how)
    assert made["run"] == made["one_by_one"]
    assert len(made["run"]) > 1
    assert sorted(tid for batch in made["run"] for tid in batch) == [tid for tid, _ in records]


def test_the_schema_check_of_a_run_keeps_and_rejects_what_it_does_record_by_record():
    from moesif_beam.transforms.common.fused import Run
    from moesif_beam.transforms.schema.bounded import EnforceMetadataSchema

    check = EnforceMetadataSchema({}, "events").check_stage()
    records = [
        (f"id-{i}", Record(i, b"{}", b"raw %d" % i, "f:1", sig_id=b"bad" if i % 3 == 0 else b"ok"))
        for i in range(9)
    ]
    conflicts = {b"bad": ("plan", "string", "number")}
    one_by_one = [out for record in records for out in check.process(record, conflicts)]
    kept, *letters = check.process_run(Run(records), conflicts)
    assert list(kept) == [o for o in one_by_one if not isinstance(o, beam.pvalue.TaggedOutput)]

    # failed_at is the wall clock in ms, which may tick between the two calls.
    def _timeless(letter: dict) -> dict:
        return {key: value for key, value in letter.items() if key != "failed_at"}

    assert [_timeless(letter.value) for letter in letters] == [
        _timeless(o.value) for o in one_by_one if isinstance(o, beam.pvalue.TaggedOutput)
    ]
    assert all("failed_at" in letter.value for letter in letters)
    assert len(letters) == 3
    assert letters[0].value["reason"] == "type_conflict"
    # No conflicts in the run: the run goes on as it came, not copied record by record.
    run = Run(records)
    assert check.process_run(run, {})[0] is run
