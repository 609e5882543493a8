"""`moesif-beam deadletters`: stats, show, and a replay after a collector outage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.fixtures import wso2_line
from tests.helpers import assert_nothing_lost, read_dead_letters

pytestmark = pytest.mark.integration

APP_ID = "replay-app-5d1e0c"


def _input(path: Path, n: int) -> list[str]:
    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(n)]
    path.write_bytes(b"\n".join([*(wso2_line(i) for i in ids), b"not json"]) + b"\n")
    return ids


def test_after_an_outage_replay_delivers_what_exhausted_its_retries(tmp_path, start_collector):
    ids = _input(tmp_path / "in.jsonl", 30)
    down = start_collector(application_id=APP_ID, fail_rate=1.0, fail_status=503)
    out = tmp_path / "out"
    first = run_cli(
        [
            "events",
            "--input",
            str(tmp_path / "in.jsonl"),
            "--moesif_base_url",
            down.url,
            "--output_dir",
            str(out),
            "--max_retry_seconds",
            "1",
        ],
        app_id=APP_ID,
        metrics=tmp_path / "first.json",
    )
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
        [
            "deadletters",
            "replay",
            "--dead_letter",
            str(dead_dir),
            "--reason",
            "retries_exhausted",
            "--moesif_base_url",
            up.url,
            "--output_dir",
            str(replay_out),
        ],
        app_id=APP_ID,
        metrics=tmp_path / "replay.json",
    )
    assert replay.returncode == 0, replay.stderr
    assert_nothing_lost(replay.metrics)
    assert replay.metrics["sent"] == 30
    assert {e["transaction_id"] for e in up.records("events")} == set(ids)
    # The dead letters read are untouched; the replay wrote its own (none failed again).
    assert sorted(p.read_bytes() for p in dead_dir.glob("*.avro")) == before
    assert read_dead_letters(str(replay_out / "dead_letter")) == []

    # A second replay is harmless: the same ids, which the collector deduplicates.
    again = run_cli(
        [
            "deadletters",
            "replay",
            "--dead_letter",
            str(dead_dir),
            "--reason",
            "retries_exhausted",
            "--moesif_base_url",
            up.url,
            "--output_dir",
            str(tmp_path / "again"),
        ],
        app_id=APP_ID,
    )
    assert again.returncode == 0, again.stderr
    assert len(up.records("events")) == 30
    assert APP_ID not in replay.stderr + stats.stdout + shown.stdout


def test_a_missing_dead_letter_location_is_one_line(tmp_path):
    run = run_cli(["deadletters", "stats", "--dead_letter", str(tmp_path / "none")])
    assert run.returncode == 2
    assert "no dead-letter files" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
