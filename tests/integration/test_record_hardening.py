"""Issue 12, the record path end to end: bad files and poison records beside good ones.

The real command, over real HTTP, against the emulator in full validation; and a Kafka stream
whose poison records used to stop a partition for good. The unit side (the normalize DoFn,
property tests) is tests/unit/test_record_hardening.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.test_record_hardening import (
    WSO2_LINE,
    _nested_arrays,
    _replace_field,
    _with,
)

# End to end: the real command, over real HTTP, against the emulator in full validation.


@pytest.mark.integration
def test_bad_files_and_poison_lines_beside_good_ones_deliver_the_good(tmp_path, start_collector):
    # Rows 1, 3, 4 and 5 through the CLI: the run exits 0, every good record is delivered,
    # each bad file and line is one dead letter, and every batch the collector saw was
    # valid JSON (it answers 400 otherwise, which would show as collector_rejected).
    import gzip

    from tests.conftest import run_cli
    from tests.fixtures import wso2_line
    from tests.helpers import assert_nothing_lost, read_dead_letters

    app_id = "hardening-app-0001"
    collector = start_collector(application_id=app_id)
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = [wso2_line(f"00000000-0000-4000-8000-{i:012d}") for i in range(2000)]
    (inputs / "a.jsonl").write_bytes(b"\n".join(good[:1000]) + b"\n")
    (inputs / "b.jsonl.gz").write_bytes(gzip.compress(b"\n".join(good[1000:]) + b"\n"))
    truncated = gzip.compress(b"\n".join(good[:500]) + b"\n")
    (inputs / "truncated.jsonl.gz").write_bytes(truncated[: len(truncated) // 2])
    (inputs / "not-gzip.jsonl.gz").write_bytes(b"plain text, not gzip\n")
    corrupt = bytearray(gzip.compress(b"\n".join(good[:50]) + b"\n"))
    corrupt[20:40] = b"\x00" * 20
    (inputs / "corrupt.jsonl.gz").write_bytes(bytes(corrupt))
    poison = [
        _replace_field(WSO2_LINE, "responseLatency", "1e400"),
        _replace_field(WSO2_LINE, "responseLatency", str(2**70)),
        _replace_field(WSO2_LINE, "requestTimestamp", str(2**70)),
        _with(WSO2_LINE, requestTimestamp="1" * 20),
        _replace_field(WSO2_LINE, "deep", _nested_arrays(700)),
        _replace_field(WSO2_LINE, "custom", "1e400"),
        b'{"apiMethod": "' + b"x" * 5000 + b'"}',  # over --max_line_bytes below
    ]
    (inputs / "poison.jsonl").write_bytes(b"\n".join(poison) + b"\n")
    run = run_cli(
        [
            "events",
            "--input",
            str(inputs / "*"),
            "--moesif_base_url",
            collector.url,
            "--output_dir",
            str(tmp_path / "out"),
            "--max_line_bytes",
            "4096",
        ],
        app_id=app_id,
        metrics=tmp_path / "metrics.json",
    )
    assert run.returncode == 0, run.stderr
    metrics = run.metrics
    assert_nothing_lost(metrics)
    stored = {e["transaction_id"] for e in collector.records("events")}
    assert stored >= {json.loads(line)["correlationId"] for line in good}
    assert metrics["collector_rejected"] == 0
    letters = read_dead_letters(str(tmp_path / "out" / "dead_letter"))
    unreadable = sorted(
        Path(d["source"]).name for d in letters if d["reason"] == "unreadable_input"
    )
    assert unreadable == ["corrupt.jsonl.gz", "not-gzip.jsonl.gz", "truncated.jsonl.gz"]
    assert metrics["unreadable_inputs"] == 3
    truncated_letter = next(d for d in letters if d["source"].endswith("truncated.jsonl.gz"))
    assert "lines read" in truncated_letter["detail"]
    poison_reasons = sorted(
        d["reason"] for d in letters if Path(d["source"]).name.startswith("poison.jsonl:")
    )
    # 1e400 twice (latency, metadata); 2**70 latency and time, 20 digits, depth; length.
    expected = ["parse_error"] * 2 + ["invalid_record"] * 4 + ["too_large"]
    assert poison_reasons == sorted(expected)
    # Lines a truncated or corrupt file gave before it failed are delivered or dead
    # letters like any others; none is lost.
    assert metrics["read"] == metrics["sent"] + metrics["duplicates"] + len(letters)


@pytest.mark.integration
@pytest.mark.kafka
@pytest.mark.usefixtures("prism_runner")
def test_a_kafka_stream_with_poison_records_delivers_the_rest_and_commits_past_them(
    tmp_path, kafka_broker, kafka_topic, start_collector
):
    # Row 2: the same overflowing records in a topic used to stop the stream within 2 s,
    # and every restart did the same: the partition was stuck for good.
    from tests.helpers import assert_nothing_lost, read_dead_letters
    from tests.integration.test_kafka_pipeline import (
        APP_ID,
        _delivery_args,
        _kafka_args,
        _stored_ids,
    )
    from tests.kafka_support import committed, produce
    from tests.streams import StreamingRun, wait_for, wso2_event

    bootstrap = kafka_broker.bootstrap_servers
    topic = kafka_topic(partitions=1)
    collector = start_collector(application_id=APP_ID)
    poison = [
        _replace_field(wso2_event("p1"), "responseLatency", "1e400"),
        _replace_field(wso2_event("p2"), "responseLatency", str(2**70)),
        _replace_field(wso2_event("p3"), "requestTimestamp", str(2**70)),
        _replace_field(wso2_event("p4"), "deep", _nested_arrays(900)),
    ]
    good = [wso2_event(f"good-{i}") for i in range(200)]
    # Poison first, then the good records: a stuck partition would deliver none of them.
    produce(bootstrap, topic, [*poison, *good])
    stream = StreamingRun(
        tmp_path,
        "poison",
        [*_kafka_args(bootstrap, topic, "poison"), *_delivery_args(collector, tmp_path)],
        APP_ID,
    )
    try:
        wait_for(lambda: len(_stored_ids(collector)) >= 200, 180, "the good records")
    finally:
        metrics = stream.drain()
    assert _stored_ids(collector) == {f"good-{i}" for i in range(200)}
    assert_nothing_lost(metrics)
    assert (metrics["read"], metrics["sent"], metrics["dead_letters"]) == (204, 200, 4)
    dead = read_dead_letters(str(tmp_path / "out" / "dead_letter"))
    assert sorted(d["source"] for d in dead) == [f"{topic}/0@{o}" for o in range(4)]
    assert {d["payload"] for d in dead} == set(poison)
    assert committed(bootstrap, "poison", topic, 1) == [204]
