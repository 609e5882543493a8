"""A Kafka stream on Flink: delivered, committed after delivery, dead letters, drain and crash.

The stream runs through the real command with ``--streaming --runner FlinkRunner
--flink_master [local] --parallelism 2``: moesif-beam's own Flink job server (Beam's runner
2.62.0 with the 2.77.0 SDK) and a real broker (``kafka-local``). On Flink the stream takes
the keyed shape: dedup shards and metadata-type decisions in Beam state, the decisions also
in the schema store, which is what keeps a key's type across a new job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import assert_nothing_lost, read_dead_letters
from tests.kafka_support import committed, produce
from tests.streams import (
    StreamingRun,
    kill_then_restart_with_copies,
    wait_for,
    wait_for_commits,
    wso2_event,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.flink,
    pytest.mark.kafka,
    pytest.mark.usefixtures("flink_jobserver"),
]

APP_ID = "flink-stream-app-7c1d"
FLINK = ["--runner", "FlinkRunner", "--flink_master", "[local]", "--parallelism", "2"]


def _stream(tmp_path: Path, name: str, args: list[str]) -> StreamingRun:
    """``moesif-beam events ARGS`` streaming on embedded Flink."""
    return StreamingRun(tmp_path, name, [*args, *FLINK, "--streaming"], app_id=APP_ID)


def _ids(prefix: str, n: int) -> list[str]:
    return [f"00000000-0000-4000-{prefix}-{i:012d}" for i in range(n)]


def _stored(collector: Any) -> dict[str, dict]:
    return {e["transaction_id"]: e for e in collector.records("events")}


def _args(bootstrap: str, topic: str, group: str, collector: Any, out: Path) -> list[str]:
    return [
        "--source",
        "kafka",
        "--kafka_bootstrap_servers",
        bootstrap,
        "--kafka_topic",
        topic,
        "--kafka_group_id",
        group,
        "--moesif_base_url",
        collector.url,
        "--output_dir",
        str(out),
        "--batch_max_delay",
        "1",
    ]


_POISON = [b'{"truncated": ', b"\xff\xfe not utf-8"]


def test_a_stream_on_flink_delivers_dedups_dead_letters_commits_and_drains(
    tmp_path, kafka_broker, kafka_topic, start_collector
):
    bootstrap = kafka_broker.bootstrap_servers
    topic = kafka_topic(partitions=2)
    collector = start_collector(application_id=APP_ID)
    first = _ids("8000", 200)
    values = [wso2_event(t, tier="gold") for t in first] + _POISON
    produce(bootstrap, topic, values, partitions=2)
    stream = _stream(tmp_path, "stream", _args(bootstrap, topic, "fs", collector, tmp_path / "o"))
    try:
        wait_for(lambda: set(first) <= _stored(collector).keys(), 240, "the backlog", stream)
        # Offsets are committed after delivery, as the stream goes, not only at the end.
        what = "the backlog's offsets to be committed"
        wait_for_commits(bootstrap, "fs", topic, 2, len(values), 60, stream, what)
        # Copies of delivered records, a new one, and one whose `tier` contradicts the type
        # the stream decided (a string): dropped, delivered and dead-lettered.
        later = [wso2_event(t, tier="gold") for t in first[:50]]
        later += [wso2_event("00000000-0000-4000-9000-000000000001", tier="gold")]
        later += [wso2_event("00000000-0000-4000-9000-000000000002", tier=3)]
        produce(bootstrap, topic, later, partitions=2)
        wait_for(
            lambda: "00000000-0000-4000-9000-000000000001" in _stored(collector),
            60,
            "a record sent while the stream runs",
            stream,
        )
        # Every record done (the two partitions go at their own pace) before the drain.
        wait_for_commits(bootstrap, "fs", topic, 2, len(values) + len(later), 60, stream)
    finally:
        metrics = stream.drain(120)
    assert_nothing_lost(metrics)
    total = len(values) + len(later)
    assert metrics["read"] == total
    assert (metrics["sent"], metrics["duplicates"]) == (201, 50)
    assert (metrics["parse_errors"], metrics["type_conflicts"]) == (2, 1)
    stored = _stored(collector)
    assert len(stored) == 201
    assert "00000000-0000-4000-9000-000000000002" not in stored
    letters = read_dead_letters(str(tmp_path / "o" / "dead_letter"))
    assert sorted(d["reason"] for d in letters) == ["parse_error", "parse_error", "type_conflict"]
    assert {bytes(d["payload"]) for d in letters} >= set(_POISON)
    # Drained: everything read is done, so each partition is committed to its end.
    assert sum(committed(bootstrap, "fs", topic, 2)) == total


def test_a_flink_stream_killed_mid_stream_loses_nothing_and_keeps_types_on_restart(
    tmp_path, kafka_broker, kafka_topic, start_collector
):
    bootstrap = kafka_broker.bootstrap_servers
    topic = kafka_topic(partitions=2)
    # Enough that the kill comes mid-stream: with 8 batches of 20 in flight per worker, a
    # collector answering in 150 ms takes about 2,000 records a second, and 400 records
    # were all delivered before the poll saw the first 40 (a fresh run on a faster VM).
    ids = _ids("a000", 2000)
    produce(bootstrap, topic, [wso2_event(t, seats=5) for t in ids], partitions=2)
    # A slow collector keeps records in flight when the job is killed.
    collector = start_collector(application_id=APP_ID, latency_ms=150)
    args = [
        *_args(bootstrap, topic, "crash", collector, tmp_path / "o"),
        "--batch_max_events",
        "20",
    ]
    first = _stream(tmp_path, "first", args)
    try:
        wait_for(lambda: len(_stored(collector)) >= 40, 240, "some deliveries", first)
    finally:
        first.kill()
    assert len(_stored(collector)) < len(ids), "the kill came too late to test anything"

    # A new job: new Beam state. `seats` was decided (a number) by the first job and is in
    # the schema store, so a string `seats` is a conflict here too.
    produce(bootstrap, topic, [wso2_event("00000000-0000-4000-b000-000000000001", seats="five")])
    second = _stream(tmp_path, "second", args)
    try:
        wait_for(lambda: set(ids) <= _stored(collector).keys(), 240, "every record", second)
        wait_for_commits(bootstrap, "crash", topic, 2, len(ids) + 1, 60, second)
    finally:
        metrics = second.drain(120)
    assert_nothing_lost(metrics)
    assert metrics["type_conflicts"] == 1
    assert set(_stored(collector)) == set(ids)  # nothing lost; re-sent copies absorbed
    schema = json.loads((tmp_path / "o" / "metadata_schema.json").read_text())
    assert schema["fields"]["seats"] == "number"


def test_a_new_flink_job_drops_copies_of_what_the_killed_one_delivered(
    tmp_path, kafka_broker, kafka_topic, start_collector
):
    # Runner 2.62 gives a Python Kafka reader no checkpoints, so a restart is a new job with
    # new Beam state. The delivered-ids journal is what still knows the ids.
    bootstrap = kafka_broker.bootstrap_servers
    topic = kafka_topic(partitions=2)
    collector = start_collector(application_id=APP_ID)
    delivered, new = _ids("c000", 120), _ids("d000", 30)
    args = _args(bootstrap, topic, "restart", collector, tmp_path / "o")
    metrics = kill_then_restart_with_copies(
        lambda name: _stream(tmp_path, name, args),
        bootstrap,
        topic,
        "restart",
        delivered,
        new,
        timeout=240,
        drain_timeout=120,
    )
    assert_nothing_lost(metrics)
    assert (metrics["read"], metrics["sent"], metrics["duplicates"]) == (150, 30, 120)
    # The collector got each id once: no copy crossed the restart.
    assert collector.stats()["duplicates"]["events"] == 0
    stored = _stored(collector)
    assert {stored[t]["metadata"]["tier"] for t in delivered} == {"first"}
