"""`moesif-beam deadletters`: stats, show, and a replay after a collector outage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from samples.generate_gateways import generate
from tests.conftest import CliRun, run_cli
from tests.fixtures import wso2_line
from tests.helpers import assert_nothing_lost, read_dead_letters

pytestmark = pytest.mark.integration

APP_ID = "replay-app-5d1e0c"


def _input(path: Path, n: int) -> list[str]:
    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(n)]
    path.write_bytes(b"\n".join([*(wso2_line(i) for i in ids), b"not json"]) + b"\n")
    return ids


def _replay(dead_dir: Path, collector_url: str, out: Path, *extra: str) -> list[str]:
    return [
        "deadletters",
        "replay",
        "--dead_letter",
        str(dead_dir),
        "--reason",
        "retries_exhausted",
        "--moesif_base_url",
        collector_url,
        "--output_dir",
        str(out),
        *extra,
    ]


def _events_during_outage(tmp_path: Path, collector_url: str, *flags: str) -> CliRun:
    """``events`` over ``tmp_path/in.jsonl`` into ``tmp_path/out``, its retries cut short."""
    return run_cli(
        [
            "events",
            "--input",
            str(tmp_path / "in.jsonl"),
            *flags,
            "--moesif_base_url",
            collector_url,
            "--output_dir",
            str(tmp_path / "out"),
            "--max_retry_seconds",
            "1",
        ],
        app_id=APP_ID,
        metrics=tmp_path / "first.json",
    )


def test_after_an_outage_replay_delivers_what_exhausted_its_retries(tmp_path, start_collector):
    ids = _input(tmp_path / "in.jsonl", 30)
    down = start_collector(application_id=APP_ID, fail_rate=1.0, fail_status=503)
    out = tmp_path / "out"
    first = _events_during_outage(tmp_path, down.url)
    assert first.returncode == 0, first.stderr
    assert first.metrics["retries_exhausted"] == 30
    assert first.metrics["parse_errors"] == 1
    dead_dir = out / "dead_letter"
    before = sorted(p.read_bytes() for p in dead_dir.glob("*.avro"))

    stats = run_cli(["deadletters", "stats", "--dead_letter", str(dead_dir)])
    assert stats.returncode == 0, stats.stderr
    assert "retries_exhausted" in stats.stdout and "parse_error" in stats.stdout
    assert "31" in stats.stdout.splitlines()[-2]  # the total line

    shown = run_cli(
        ["deadletters", "show", "--dead_letter", str(dead_dir), "--reason", "parse_error"]
    )
    assert shown.returncode == 0, shown.stderr
    (only,) = [json.loads(line) for line in shown.stdout.splitlines()]
    assert only["payload"] == "not json" and only["reason"] == "parse_error"

    up = start_collector(application_id=APP_ID)
    replay_out = tmp_path / "replay-out"
    replay = run_cli(
        _replay(dead_dir, up.url, replay_out), app_id=APP_ID, metrics=tmp_path / "replay.json"
    )
    assert replay.returncode == 0, replay.stderr
    assert_nothing_lost(replay.metrics)
    assert replay.metrics["sent"] == 30
    assert {e["transaction_id"] for e in up.records("events")} == set(ids)
    # The dead letters read are untouched; the replay wrote its own (none failed again).
    assert sorted(p.read_bytes() for p in dead_dir.glob("*.avro")) == before
    assert read_dead_letters(str(replay_out / "dead_letter")) == []

    # A second replay is harmless: the same ids, which the collector deduplicates.
    again = run_cli(_replay(dead_dir, up.url, tmp_path / "again"), app_id=APP_ID)
    assert again.returncode == 0, again.stderr
    assert len(up.records("events")) == 30
    assert APP_ID not in replay.stderr + stats.stdout + shown.stdout


def test_a_kong_outage_replays_as_kong_without_format(tmp_path, start_collector):
    data, expected = generate("kong", 30, seed=3)
    (tmp_path / "in.jsonl").write_bytes(data)
    down = start_collector(application_id=APP_ID, fail_rate=1.0, fail_status=503)
    out = tmp_path / "out"
    first = _events_during_outage(tmp_path, down.url, "--format", "kong")
    assert first.returncode == 0, first.stderr
    assert first.metrics["retries_exhausted"] == expected.unique
    dead_dir = out / "dead_letter"
    letters = read_dead_letters(str(dead_dir))
    # Every letter of the run, whichever stage made it, names the run's format.
    assert {letter["format"] for letter in letters} == {"kong"}
    before = sorted(p.read_bytes() for p in dead_dir.glob("*.avro"))
    up = start_collector(application_id=APP_ID)

    # Read as another format (what replay did before letters recorded theirs), every record
    # fails again: the run still exits 0, but the replay's summary says so and where.
    wrong_out = tmp_path / "wrong"
    wrong = run_cli(
        _replay(dead_dir, up.url, wrong_out, "--format", "wso2"),
        app_id=APP_ID,
        metrics=tmp_path / "wrong.json",
    )
    assert wrong.returncode == 0, wrong.stderr
    assert (wrong.metrics["read"], wrong.metrics["sent"]) == (expected.unique, 0)
    assert wrong.metrics["dead_letters"] == expected.unique
    assert f"every replayed record failed again -> {wrong_out}/dead_letter" in wrong.stdout
    assert f"deadletters stats --dead_letter {wrong_out}/dead_letter" in wrong.stdout
    again = read_dead_letters(str(wrong_out / "dead_letter"))
    assert len(again) == expected.unique
    assert {(d["reason"], d["format"]) for d in again} == {("invalid_record", "wso2")}
    assert up.records("events") == []

    # Without --format, each letter's own: every record is delivered, with its id.
    replay_out = tmp_path / "replay-out"
    replay = run_cli(
        _replay(dead_dir, up.url, replay_out), app_id=APP_ID, metrics=tmp_path / "replay.json"
    )
    assert replay.returncode == 0, replay.stderr
    assert "(--format kong)" in replay.stderr
    assert_nothing_lost(replay.metrics)
    assert replay.metrics["sent"] == expected.unique
    assert [run["format"] for run in replay.metrics["runs"]] == ["kong"]
    sent_ids = {d["transaction_id"] for d in letters if d["reason"] == "retries_exhausted"}
    assert {e["transaction_id"] for e in up.records("events")} == sent_ids
    assert len(sent_ids) == expected.unique
    assert read_dead_letters(str(replay_out / "dead_letter")) == []
    assert "failed again" not in replay.stdout
    # The dead letters read are untouched by both replays.
    assert sorted(p.read_bytes() for p in dead_dir.glob("*.avro")) == before
    assert APP_ID not in wrong.stdout + wrong.stderr + replay.stdout + replay.stderr


def test_a_missing_dead_letter_location_is_one_line(tmp_path):
    run = run_cli(["deadletters", "stats", "--dead_letter", str(tmp_path / "none")])
    assert run.returncode == 2
    assert "no dead-letter files" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
