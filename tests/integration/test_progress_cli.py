"""The progress line of a bounded run, through the real command.

Stderr is a pipe in most of these; the last ones give the command a terminal (a pty).
"""

from __future__ import annotations

import itertools
import os
import pty
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
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


# One draw of the line, wherever it is in stderr (worker logs may sit between draws).
_DRAW = re.compile(
    r"moesif-beam events: read ([\d,]+)  sent ([\d,]+)  duplicates ([\d,]+)  "
    r"dead letters ([\d,]+)  [\d,]+ records/s  \d+%"
)
_WORKERS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


def _input_with_every_outcome(path: Path, events: int = 3000) -> None:
    """``events`` events, 5 of them twice, a line that is not JSON and one that is no event."""
    lines = [wso2_line(f"00000000-0000-4000-8000-{i:012d}") for i in range(events)]
    path.write_bytes(b"\n".join([*lines, *lines[:5], b"{not json", b'{"a": 1}']) + b"\n")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory for the command, with a path short enough for the fork server.

    The fork server's socket lives in it, and a Unix socket path may not exceed 108 bytes:
    under pytest's own temporary directories the runner would start its workers instead.
    """
    path = Path(tempfile.mkdtemp(prefix="mb-progress-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(tmp: Path) -> dict[str, str]:
    """No application id (batches go to files), and ``tmp`` as the temporary directory."""
    env = {k: v for k, v in os.environ.items() if k != "MOESIF_APPLICATION_ID"}
    env["TMPDIR"] = str(tmp)
    return env


def _summary_counts(stdout: str) -> tuple[int, ...]:
    """read, sent, duplicates and dead letters, as the summary gives them."""
    found = {}
    for line in stdout.splitlines():
        match = re.match(r"  (read|sent|duplicates|dead letters) +([\d,]+)", line)
        if match:
            found[match.group(1)] = int(match.group(2).replace(",", ""))
    return tuple(found[name] for name in ("read", "sent", "duplicates", "dead letters"))


def _drawn_counts(stderr: str) -> list[tuple[int, ...]]:
    return [tuple(int(n.replace(",", "")) for n in m.groups()) for m in _DRAW.finditer(stderr)]


@pytest.mark.parametrize("start", [False, True], ids=["forked", "started"])
def test_worker_processes_show_their_counts_ending_equal_to_the_summary(tmp_path, short_tmp, start):
    _input_with_every_outcome(tmp_path / "in.jsonl")
    args = ["events", "--input", str(tmp_path / "in.jsonl"), "--output_dir", str(tmp_path / "out")]
    args += ["--progress", *_WORKERS, "--log_level", "INFO"]
    if start:
        args.append("--start_workers")
    proc = subprocess.run(
        [sys.executable, "-m", "moesif_beam.runners.cli", *args],
        cwd=REPO,
        env=_env(short_tmp),
        capture_output=True,
        timeout=180,
        check=False,
    )
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert "counts at the end" not in stderr
    draws = _drawn_counts(stderr)
    assert draws, stderr
    # The counts only grow, and the last draw, after the run, is the summary's.
    for earlier, later in itertools.pairwise(draws):
        assert all(a <= b for a, b in zip(earlier, later, strict=True)), (earlier, later)
    assert draws[-1] == _summary_counts(stdout) == (3007, 3000, 5, 2)
    if not start:
        # The progress line's thread does not keep the workers from being forked (the
        # local runner says when it starts them instead, and why).
        assert "starting worker processes" not in stderr
    # The published tallies lived in the run's directory, removed with it.
    assert list(short_tmp.rglob("tally-*")) == []
    assert not list(short_tmp.glob("moesif-beam-run-*"))


def _on_a_terminal(tmp: Path, *args: str) -> tuple[int, str, str]:
    """Run the command, its stderr on a terminal: exit code, stdout, what the terminal got."""
    primary, secondary = pty.openpty()
    received: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: every process holding the terminal has ended
                return
            if not chunk:
                return
            received.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "moesif_beam.runners.cli", *args],
            cwd=REPO,
            env=_env(tmp),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=secondary,
            timeout=180,
            check=False,
        )
    finally:
        os.close(secondary)
        reader.join(timeout=10)
        os.close(primary)
    return proc.returncode, proc.stdout.decode(), b"".join(received).decode(errors="replace")


def test_on_a_terminal_no_progress_draws_nothing(tmp_path, short_tmp):
    _input_with_every_outcome(tmp_path / "in.jsonl", events=200)
    code, stdout, terminal = _on_a_terminal(
        short_tmp,
        "events",
        "--input",
        str(tmp_path / "in.jsonl"),
        "--output_dir",
        str(tmp_path / "out"),
        "--no_progress",
    )
    assert code == 0, terminal
    assert "finished in" in stdout
    assert "\r" not in terminal
    assert "moesif-beam events: read" not in terminal
    assert "moesif-beam events: running" not in terminal


@pytest.mark.timeout(300)
def test_on_a_terminal_a_long_run_in_worker_processes_shows_live_counts(tmp_path, short_tmp):
    # Over 32 MiB: on two cores or more the run starts worker processes of its own accord.
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: the run keeps its workers in the launcher")
    _input_with_every_outcome(tmp_path / "in.jsonl", events=30_000)
    assert (tmp_path / "in.jsonl").stat().st_size >= 32 * 2**20
    code, stdout, terminal = _on_a_terminal(
        short_tmp,
        "events",
        "--input",
        str(tmp_path / "in.jsonl"),
        "--output_dir",
        str(tmp_path / "out"),
    )
    assert code == 0, terminal
    assert "counts at the end" not in terminal
    draws = _drawn_counts(terminal)
    assert len(draws) >= 2, terminal  # redrawn while the run is on, not only at its end
    assert draws[-1] == _summary_counts(stdout) == (30_007, 30_000, 5, 2)
    # One line, redrawn with carriage returns and ended once (the terminal shows \n as \r\n).
    assert terminal.count("\n") == 1, terminal
    assert terminal.count("\r") >= len(draws)
