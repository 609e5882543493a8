"""`moesif-beam deadletters` in-process: reading, filtering, show, stats and replay plans.

The dead-letter record's `format` field is written by both writers and absent from files
written before it existed, which still read. The command's own `main` runs here too, with
a stand-in for the pipeline runs a replay starts (the real ones are in
tests/integration/test_deadletters_cli.py).
"""

from __future__ import annotations

import base64
import datetime
import json
from pathlib import Path
from typing import Any

import apache_beam as beam
import fastavro
import orjson
import pytest

from moesif_beam.runners.deadletters import (
    main,
    matching,
    plan_replay,
    read_dead_letters,
    replay_format,
    replay_summary,
    replay_totals,
    show_line,
    stats_lines,
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


# -- reading and filtering --------------------------------------------------------------


def test_a_glob_reads_only_the_files_it_matches(tmp_path):
    _write(tmp_path / "a" / "events-1-0.avro", [_letter(payload=b"a")])
    _write(tmp_path / "b" / "actions-2-0.avro", [_letter(payload=b"b", pipeline="actions")])
    _write(tmp_path / "b" / "events-3-0.avro", [_letter(payload=b"c")])
    every = sorted(r["payload"] for r in read_dead_letters(str(tmp_path / "*" / "*.avro")))
    assert every == [b"a", b"b", b"c"]
    events = sorted(r["payload"] for r in read_dead_letters(str(tmp_path / "*" / "events-*")))
    assert events == [b"a", b"c"]
    # A directory means its .avro files; a trailing slash is the same directory.
    assert [r["payload"] for r in read_dead_letters(str(tmp_path / "a") + "/")] == [b"a"]


def test_a_location_with_no_dead_letters_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="no dead-letter files"):
        list(read_dead_letters(str(tmp_path / "none-*.avro")))


def test_since_is_inclusive_until_exclusive_and_reasons_combine():
    letters = [
        _letter(T0 - 1, payload=b"before"),
        _letter(T0, payload=b"at since"),
        _letter(T0 + 500, reason="parse_error", payload=b"parse"),
        _letter(T0 + 999, payload=b"last in"),
        _letter(T0 + 1000, payload=b"at until"),
    ]
    # fastavro hands failed_at back as an aware datetime; both forms are compared.
    as_read = [
        {**r, "failed_at": datetime.datetime.fromtimestamp(r["failed_at"] / 1000, datetime.UTC)}
        for r in letters
    ]
    for records in (letters, as_read):
        window = [r["payload"] for r in matching(records, [], T0, T0 + 1000)]
        assert window == [b"at since", b"parse", b"last in"]
        retries = [r["payload"] for r in matching(records, ["retries_exhausted"], T0, None)]
        assert retries == [b"at since", b"last in", b"at until"]
        either = matching(records, ["parse_error", "retries_exhausted"], None, T0)
        assert [r["payload"] for r in either] == [b"before"]


def test_since_and_until_on_the_command_line_filter_show(tmp_path, capsys):
    _write(
        tmp_path / "events-1-0.avro",
        [_letter(T0 + i * 60_000, payload=b"%d" % i) for i in (0, 1, 2)],
    )

    def deliver(_argv):
        raise AssertionError

    argv = ["show", "--dead_letter", str(tmp_path), "--since", "2026-09-21T14:14:20Z"]
    assert main([*argv, "--until", "2026-09-21T14:15:20.000Z"], deliver) == 0
    assert [json.loads(line)["payload"] for line in capsys.readouterr().out.splitlines()] == ["1"]


# -- show and stats ---------------------------------------------------------------------


def test_show_prints_text_payloads_as_text():
    line = show_line(_letter(payload='{"é":1}'.encode(), format="kong"))
    shown = json.loads(line)
    assert shown["payload"] == '{"é":1}'
    assert "payload_base64" not in shown
    assert shown["failed_at"] == "2026-09-21T14:13:20.000Z"
    assert shown["format"] == "kong"
    assert "\n" not in line


def test_show_prints_binary_payloads_as_base64_under_their_own_key():
    raw = b"\xff\xfe\x00 not utf-8"
    shown = json.loads(show_line(_letter(reason="parse_error", payload=raw)))
    assert "payload" not in shown
    assert base64.b64decode(shown["payload_base64"]) == raw


def test_stats_counts_by_pipeline_reason_and_stage_with_the_time_range():
    letters = [
        _letter(T0 + 2_000),
        _letter(T0),
        _letter(T0 + 1_000, reason="parse_error", stage="parse"),
        _letter(T0 + 5_000, pipeline="profile-upserts", reason="too_large"),
    ]
    lines = stats_lines(letters)
    rows = [line.split() for line in lines[1:-2]]
    assert rows == [
        ["events", "parse_error", "parse", "1"],
        ["events", "retries_exhausted", "send", "2"],
        ["profile-upserts", "too_large", "send", "1"],
    ]
    assert lines[-2].split() == ["total", "4"]
    assert lines[-1] == "failed between 2026-09-21T14:13:20.000Z and 2026-09-21T14:13:25.000Z"
    # The columns line up, even with the widest pipeline name.
    assert len({len(line) for line in lines[:-1]}) == 1


def test_stats_of_nothing_is_a_zero_total_and_no_time_range():
    lines = stats_lines([])
    assert lines[-1].split() == ["total", "0"]
    assert not any(line.startswith("failed between") for line in lines)


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
        _letter(payload=b"p1", pipeline="profiles", format="wso2"),
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
    # Neither is an input record to replay alone: profiles re-run over the whole input.
    assert plan.not_replayed == {"profile-upserts": 1, "profiles": 1}
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


def test_replay_hands_each_pipeline_and_format_to_one_run_and_sums_them(tmp_path, capsys):
    _write(tmp_path / "dl" / "events-old-0.avro", [_letter(payload=b"old")], _old_schema())
    _write(
        tmp_path / "dl" / "events-new-0.avro",
        [
            _letter(payload=b"k1", format="kong"),
            _letter(payload=b"bad", format="kong", reason="parse_error"),
            _letter(payload=b"k2", format="kong"),
        ],
    )
    runs: list[tuple[str, str, list[bytes], list[str]]] = []

    def deliver(argv):
        argv = list(argv)
        payloads = Path(argv[argv.index("--input") + 1]).read_bytes().splitlines()
        runs.append((argv[0], argv[argv.index("--format") + 1], payloads, argv))
        document = {
            "pipeline": argv[0],
            "run_id": f"run{len(runs)}",
            "read": len(payloads),
            "sent": len(payloads) - 1,
            "duplicates": 0,
            "dead_letters": 1,
            "elapsed_seconds": 0.5,
            "invariant_holds": True,
        }
        Path(argv[argv.index("--metrics_out") + 1]).write_bytes(orjson.dumps(document))
        return 3 if len(runs) == 1 else 0

    argv = [
        "replay",
        "--dead_letter",
        str(tmp_path / "dl" / "*.avro"),
        "--reason",
        "retries_exhausted",
        "--output_dir",
        str(tmp_path / "again"),
        "--moesif_base_url",
        "http://127.0.0.1:9",
        "--metrics_out",
        str(tmp_path / "replay.json"),
    ]
    assert main(argv, deliver) == 3  # the worst run's code
    assert [run[:3] for run in runs] == [
        ("events", "auto", [b"old"]),
        ("events", "kong", [b"k1", b"k2"]),
    ]
    for *_, run_argv in runs:
        assert run_argv[run_argv.index("--output_dir") + 1] == str(tmp_path / "again")
        assert "http://127.0.0.1:9" in run_argv
        assert str(tmp_path / "replay.json") not in run_argv  # each run has its own
    totals = json.loads((tmp_path / "replay.json").read_text())
    assert (totals["read"], totals["sent"], totals["dead_letters"]) == (3, 1, 2)
    assert [(run["run_id"], run["format"]) for run in totals["runs"]] == [
        ("run1", "auto"),
        ("run2", "kong"),
    ]
    out = capsys.readouterr()
    assert f"2 of 3 records failed again -> {tmp_path / 'again'}/dead_letter" in out.out
    assert "replaying 2 events records (--format kong)" in out.err


def test_a_replay_run_that_stopped_without_counts_is_named(tmp_path, capsys):
    _write(
        tmp_path / "dl" / "events-new-0.avro",
        [_letter(payload=b"k1", format="kong"), _letter(payload=b"w1", format="wso2")],
    )

    def deliver(argv):
        argv = list(argv)
        if argv[argv.index("--format") + 1] == "kong":
            return 3  # refused before counting anything: no metrics written
        document = {"pipeline": argv[0], "run_id": "w", "read": 1, "sent": 1}
        document |= {"duplicates": 0, "dead_letters": 0, "invariant_holds": True}
        Path(argv[argv.index("--metrics_out") + 1]).write_bytes(orjson.dumps(document))
        return 0

    argv = ["replay", "--dead_letter", str(tmp_path / "dl"), "--reason", "retries_exhausted"]
    assert main([*argv, "--output_dir", str(tmp_path / "again")], deliver) == 3
    err = capsys.readouterr().err
    assert "the events run (--format kong, 1 records) exited 3 without counts" in err
    assert "--format wso2, 1 records) exited" not in err
