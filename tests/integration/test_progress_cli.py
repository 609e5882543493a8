"""The progress line of a bounded run, through the real command (stderr is a pipe here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, CliRun
from tests.fixtures import wso2_line

pytestmark = pytest.mark.integration

APP_ID = "progress-app-5be3a1"


def _run(tmp_path: Path, collector_url: str, name: str, *extra: str) -> CliRun:
    """Like ``run_cli``, but keeps stderr's carriage returns (text mode turns them to newlines)."""
    args = [
        "events",
        "--input",
        str(tmp_path / "in.jsonl"),
        "--moesif_base_url",
        collector_url,
        "--output_dir",
        str(tmp_path / name),
        *extra,
    ]
    env = {**os.environ, "MOESIF_APPLICATION_ID": APP_ID}
    proc = subprocess.run(
        [sys.executable, "-m", "moesif_beam.runners.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=180,
        check=False,
    )
    return CliRun(proc.returncode, proc.stdout.decode(), proc.stderr.decode(), {})


def _summary(run: CliRun, name: str) -> list[str]:
    # The first line carries the timing; the rest must be the same with and without.
    lines = run.stdout.replace(name, "OUT").splitlines()
    assert lines[0].startswith("moesif-beam events: finished in")
    return lines[1:]


def test_forced_progress_draws_the_line_and_leaves_the_summary_alone(tmp_path, start_collector):
    collector = start_collector(application_id=APP_ID)
    lines = [wso2_line(f"00000000-0000-4000-8000-{i:012d}") for i in range(3000)]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join([*lines, *lines[:5]]) + b"\n")
    plain = _run(tmp_path, collector.url, "plain")
    shown = _run(tmp_path, collector.url, "shown", "--progress")
    assert plain.returncode == 0, plain.stderr
    assert shown.returncode == 0, shown.stderr
    assert "\r" not in plain.stderr
    assert _summary(shown, "shown") == _summary(plain, "plain")
    # Redrawn with carriage returns on one line, ended by a newline when the run ends.
    progress = [line for line in shown.stderr.split("\n") if "\r" in line]
    assert len(progress) == 1, shown.stderr
    draws = [draw for draw in progress[0].split("\r") if draw.strip()]
    assert draws
    assert all(d.startswith("moesif-beam events: read ") for d in draws), draws
    last = draws[-1]
    assert re.search(
        r"read 3,005  sent 3,000  duplicates 5  dead letters 0  [\d,]+ records/s", last
    )
    assert "100%" in last and "ETA" not in last
    assert APP_ID not in shown.stderr


def test_no_progress_line_when_stderr_is_not_a_terminal(tmp_path, start_collector):
    collector = start_collector(application_id=APP_ID)
    lines = [wso2_line(f"00000000-0000-4000-8000-{i:012d}") for i in range(200)]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    run = _run(tmp_path, collector.url, "out")
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr
    assert "moesif-beam events: read" not in run.stderr
    forced_off = _run(tmp_path, collector.url, "off", "--no_progress")
    assert forced_off.returncode == 0, forced_off.stderr
    assert "\r" not in forced_off.stderr
