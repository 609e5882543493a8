"""The dead-letter record's `format` field, and how `moesif-beam deadletters replay` uses it.

The field is written by both writers and absent from files written before it existed,
which still read; replay plans a run per pipeline and format, and its summary says what
failed again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import apache_beam as beam
import fastavro
import orjson
import pytest

from moesif_beam.runners.deadletters import (
    plan_replay,
    read_dead_letters,
    replay_format,
    replay_summary,
    replay_totals,
)
from moesif_beam.schemas import load_schema, schema_json
from moesif_beam.transforms.deadletters import (
    WriteDeadLetters,
    WriteDeadLettersInStream,
    dead_letter,
)
from moesif_beam.transforms.deadletters.letters import ACK_FIELD

T0 = 1_790_000_000_000  # 2026-09-21T14:13:20.000Z


def _letter(
    failed_at: int = T0,
    reason: str = "retries_exhausted",
    pipeline: str = "events",
    payload: bytes = b'{"a":1}',
    stage: str = "send",
    **extra: Any,
) -> dict[str, Any]:
    letter = dead_letter(reason, stage, "why", payload, "in.jsonl:1", pipeline)
    return {**letter, "failed_at": failed_at, **extra}


def _old_schema() -> dict[str, Any]:
    """The dead-letter schema as it was before the `format` field."""
    schema = schema_json("dead_letter")
    schema["fields"] = [f for f in schema["fields"] if f["name"] != "format"]
    return schema


def _write(path: Path, letters: list[dict[str, Any]], schema: Any = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        fastavro.writer(
            handle, fastavro.parse_schema(schema or schema_json("dead_letter")), letters
        )


# -- the format field -------------------------------------------------------------------


def test_the_format_field_is_optional_and_null_by_default():
    (field,) = [f for f in schema_json("dead_letter")["fields"] if f["name"] == "format"]
    assert field["type"] == ["null", "string"]
    assert field["default"] is None


def test_old_files_without_the_format_field_still_read(tmp_path):
    _write(tmp_path / "dl" / "events-old-0.avro", [_letter()], _old_schema())
    # With their own (writer's) schema, as `deadletters` reads: no `format` key at all.
    (old,) = read_dead_letters(str(tmp_path / "dl"))
    assert "format" not in old
    assert old["reason"] == "retries_exhausted" and old["payload"] == b'{"a":1}'
    # With today's schema as the reader's: the default fills it in.
    with (tmp_path / "dl" / "events-old-0.avro").open("rb") as handle:
        (evolved,) = fastavro.reader(handle, reader_schema=load_schema("dead_letter"))
    assert evolved["format"] is None
    # And replay reads such an events letter as `auto`.
    plan = plan_replay([old], None)
    assert plan.groups == {("events", "auto"): [b'{"a":1}']}


def test_the_bounded_writer_records_the_runs_format(tmp_path):
    letters = [_letter(payload=b"x"), _letter(payload=b"y", format="aws")]
    with beam.Pipeline() as pipeline:
        _ = (
            pipeline
            | beam.Create(letters)
            | WriteDeadLetters(str(tmp_path), "events", "run", input_format="kong")
        )
    written = {r["payload"]: r["format"] for r in read_dead_letters(str(tmp_path))}
    # A letter that names its format keeps it; every other takes the run's.
    assert written == {b"x": "kong", b"y": "aws"}


def test_the_bounded_writer_without_a_format_writes_null(tmp_path):
    with beam.Pipeline() as pipeline:
        _ = pipeline | beam.Create([_letter()]) | WriteDeadLetters(str(tmp_path), "events", "r")
    assert [r["format"] for r in read_dead_letters(str(tmp_path))] == [None]


def test_the_stream_writer_records_the_runs_format_and_still_acks(tmp_path):
    fn = WriteDeadLettersInStream(str(tmp_path), "actions", "run", input_format="segment")._fn
    fn.setup()
    fn.start_bundle()
    original = {**_letter(pipeline="actions"), ACK_FIELD: "ack-1"}
    fn.process(original)
    acks = [value.value for value in fn.finish_bundle()]
    assert acks == ["ack-1"]
    assert "format" not in original  # the element was not mutated
    assert [r["format"] for r in read_dead_letters(str(tmp_path))] == ["segment"]


# -- replay plans -----------------------------------------------------------------------


def test_replay_format_prefers_the_flag_then_the_letter_then_the_pipelines_fallback():
    kong = _letter(format="kong")
    assert replay_format(kong, "aws") == "aws"
    assert replay_format(kong, None) == "kong"
    assert replay_format(_letter(), None) == "auto"
    assert replay_format(_letter(pipeline="actions"), None) == "moesif"
    assert replay_format(_letter(pipeline="profiles"), None) == "wso2"


def test_a_replay_runs_once_per_pipeline_and_format():
    letters = [
        _letter(payload=b"k1", format="kong"),
        _letter(payload=b"w1", format="wso2"),
        _letter(payload=b"k2", format="kong"),
        _letter(payload=b"old"),
        _letter(payload=b"a1", pipeline="actions", format="segment"),
        _letter(payload=b"up", pipeline="profile-upserts"),
        _letter(payload=b"", reason="unreadable_input"),
        _letter(payload=b"two\nlines"),
    ]
    plan = plan_replay(letters, None)
    assert plan.groups == {
        ("events", "kong"): [b"k1", b"k2"],
        ("events", "wso2"): [b"w1"],
        ("events", "auto"): [b"old"],
        ("actions", "segment"): [b"a1"],
    }
    assert plan.not_replayed == {"profile-upserts": 1}
    assert plan.no_payload == 2


def test_format_given_overrides_every_letters_own():
    letters = [_letter(payload=b"k", format="kong"), _letter(payload=b"w", format="wso2")]
    assert plan_replay(letters, "auto").groups == {("events", "auto"): [b"k", b"w"]}


def test_a_format_that_is_not_the_pipelines_is_refused_before_any_run():
    with pytest.raises(ValueError, match="--format 'moesif', not a events format"):
        plan_replay([_letter()], "moesif")
    with pytest.raises(ValueError, match="format field says 'fluentd'"):
        plan_replay([_letter(format="fluentd")], None)


def _run(pipeline: str, read: int, sent: int, dead: int, **extra: Any) -> dict[str, Any]:
    return {
        "pipeline": pipeline,
        "run_id": f"r-{pipeline}",
        "read": read,
        "sent": sent,
        "duplicates": read - sent - dead,
        "dead_letters": dead,
        "elapsed_seconds": 1.25,
        "invariant_holds": True,
        **extra,
    }


def test_replay_totals_sum_every_counter_over_the_runs():
    runs = [_run("events", 10, 7, 2, format="kong"), _run("actions", 5, 5, 0, format="moesif")]
    totals = replay_totals(runs)
    assert (totals["read"], totals["sent"], totals["duplicates"], totals["dead_letters"]) == (
        15,
        12,
        1,
        2,
    )
    assert totals["elapsed_seconds"] == 2.5
    assert totals["invariant_holds"] is True
    assert totals["runs"] == runs
    assert "pipeline" not in totals and "format" not in totals
    assert replay_totals([*runs, {**runs[0], "invariant_holds": False}])["invariant_holds"] is False
    orjson.dumps(totals)  # what --metrics_out writes


def test_a_replay_where_everything_failed_again_says_so_and_where():
    totals = replay_totals([_run("events", 120, 0, 120)])
    first, warning = replay_summary(totals, "replay-out/dead_letter")
    assert "120 records in 1 run:" in first and "dead letters again 120" in first
    assert "every replayed record failed again -> replay-out/dead_letter" in warning
    assert "moesif-beam deadletters stats --dead_letter replay-out/dead_letter" in warning


def test_a_replay_where_some_failed_again_counts_them():
    totals = replay_totals([_run("events", 10, 8, 2), _run("actions", 3, 3, 0)])
    first, warning = replay_summary(totals, "d")
    assert "13 records in 2 runs: sent 11, duplicates 0, dead letters again 2" in first
    assert "2 of 13 records failed again -> d" in warning


def test_a_replay_where_nothing_failed_is_one_line():
    assert len(replay_summary(replay_totals([_run("events", 4, 4, 0)]), "d")) == 1
