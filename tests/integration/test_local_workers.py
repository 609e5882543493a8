"""Forked worker processes for bounded local runs (runners/engines/local_workers.py).

Forking is only safe from a process with one thread, which pytest's process is not by
the time these run, so each check runs in a fresh interpreter, as the launcher does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from moesif_beam.runners.engines import local_workers
from moesif_beam.runners.engines.local_workers import ForkServer
from tests.conftest import REPO

pytestmark = pytest.mark.integration

# A pipeline on the LocalRunner with two worker processes. Each element records the
# process that handled it and whether that process holds a value only the launcher's
# memory has: a forked worker does, a worker started from scratch would not.
_PIPELINE = """
import json, os, sys
import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
import moesif_beam.runners.engines.local_workers as local_workers

local_workers._launcher_mark = os.getpid()


def where(n):
    import os, sys
    import moesif_beam.runners.engines.local_workers as lw
    # One write per line: two processes share the pipe, and print() writes the line and
    # its newline separately.
    sys.stdout.write(f"worker-line {n}\\n")
    return json.dumps([n * n, os.getpid(), getattr(lw, "_launcher_mark", None)])


print("launcher-line")  # still in this process's buffer when the workers are forked


options = PipelineOptions(
    ["--runner=moesif_beam.runners.engines.local_workers.LocalRunner", "--direct_num_workers=2",
     "--direct_running_mode=multi_processing"]
)
with beam.Pipeline(options=options) as p:
    _ = (
        p
        | beam.Create(list(range(200)))
        | beam.Reshuffle()
        | beam.Map(where)
        | beam.io.WriteToText(sys.argv[1])
    )
print(json.dumps({"launcher": os.getpid(), "mode": options.view_as(
    __import__("apache_beam").options.pipeline_options.DirectOptions).direct_running_mode}))
"""


def _python(script: str, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    # Buffered output, as a launcher writing to a pipe or a file has it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | extra_env
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _pipeline_result(proc: subprocess.CompletedProcess, tmp_path: Path) -> tuple[dict, list]:
    """What the :data:`_PIPELINE` script reported, and its rows, checked to be exact."""
    assert proc.returncode == 0, proc.stderr
    launcher = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [
        json.loads(line)
        for path in sorted(tmp_path.glob("out*"))
        for line in path.read_text().splitlines()
    ]
    assert sorted(row[0] for row in rows) == [n * n for n in range(200)]
    return launcher, rows


def test_workers_are_forked_from_the_launcher_and_compute_the_same(tmp_path):
    proc = _python(_PIPELINE, str(tmp_path / "out"))
    launcher, rows = _pipeline_result(proc, tmp_path)
    # Every element ran in a worker process, and every worker was a fork of the launcher.
    assert {row[1] for row in rows}.isdisjoint({launcher["launcher"]})
    assert {row[2] for row in rows} == {launcher["launcher"]}
    # The user's options read as they were given once the run is over.
    assert launcher["mode"] == "multi_processing"
    # What the workers print is written once; what the launcher had buffered, once too.
    printed = proc.stdout.splitlines()
    assert printed.count("launcher-line") == 1
    assert sorted(line for line in printed if line.startswith("worker-line")) == sorted(
        f"worker-line {n}" for n in range(200)
    )


def test_without_a_fork_server_workers_are_started_as_beam_starts_them(tmp_path):
    # A Unix socket path may not exceed 108 bytes: under this TMPDIR no fork server can
    # listen, so the run must fall back to Beam's own worker processes, and still finish.
    long_tmp = tmp_path / ("x" * 100)
    long_tmp.mkdir()
    proc = _python(_PIPELINE, str(tmp_path / "out"), TMPDIR=str(long_tmp))
    launcher, rows = _pipeline_result(proc, tmp_path)
    # Started workers import everything afresh: none holds the launcher's value.
    assert {row[2] for row in rows} == {None}
    assert launcher["mode"] == "multi_processing"
    assert list(long_tmp.iterdir()) == []  # the fork server's directory is removed


_FAILING_WORKER = """
import subprocess, sys
from moesif_beam.runners.engines.local_workers import ForkServer

server = ForkServer()
server.start()
try:
    # No control endpoint in the environment: the SDK harness cannot start.
    code = subprocess.run(server.command(), shell=True, env={}, timeout=60).returncode
finally:
    server.stop()
print(code)
"""


def test_a_worker_that_cannot_start_reports_a_failure_exit_code():
    proc = _python(_FAILING_WORKER)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "1"
    assert "forked SDK worker failed" in proc.stderr


def test_forking_is_refused_while_other_threads_run(monkeypatch):
    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    try:
        assert not ForkServer.can_fork()
    finally:
        release.set()
        thread.join()
    # A native thread started after the module's import (a Kafka client's, gRPC's) counts
    # as well; here every thread of this process is "new" to an empty baseline.
    monkeypatch.setattr(local_workers, "_THREADS_AT_IMPORT", frozenset())
    assert local_workers._os_threads()
    assert not ForkServer.can_fork()


def test_the_command_line_launcher_can_fork_once_it_has_imported_everything():
    proc = _python(
        "import moesif_beam.runners.cli\n"
        "from moesif_beam.runners.engines.local_workers import ForkServer\n"
        "print(ForkServer.can_fork())"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True"]


def test_the_worker_command_runs_the_standard_library_stub_only():
    server = ForkServer()
    server._directory = "/tmp/some dir"  # a path that needs quoting
    command = server.command()
    # The shell ignores Ctrl-C and becomes the stub (the launcher handles Ctrl-C).
    assert command.startswith(f"trap '' INT; exec {sys.executable} -I -S ")
    assert command.endswith("'/tmp/some dir/fork.sock'")
    stub = Path(REPO) / "runners" / "engines" / "_worker_stub.py"
    imports = [
        line.split()[1]
        for line in stub.read_text().splitlines()
        if line.startswith(("import ", "from "))
    ]
    assert set(imports) <= {"json", "os", "signal", "socket", "sys"}


_RUNS_IN_TURN = """
import os, sys
import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from moesif_beam.runners.engines.local_workers import LocalRunner

runner = LocalRunner()
for mode in ("multi_processing", "in_memory", "multi_processing"):
    workers = "2" if mode == "multi_processing" else "1"
    options = PipelineOptions([f"--direct_running_mode={mode}", f"--direct_num_workers={workers}"])
    pipeline = beam.Pipeline(runner=runner, options=options)
    log = sys.argv[1]
    _ = (
        pipeline
        | beam.Create([mode])
        | beam.Map(lambda m, log=log: open(log, "a").write(f"{m} {__import__('os').getpid()}\\n"))
    )
    pipeline.run().wait_until_finish()
print(os.getpid())
"""


def test_one_runner_forks_for_each_run_and_leaves_other_modes_alone(tmp_path):
    log = tmp_path / "where.txt"
    proc = _python(_RUNS_IN_TURN, str(log))
    assert proc.returncode == 0, proc.stderr
    launcher = proc.stdout.split()[-1]
    runs = [line.split() for line in log.read_text().splitlines()]
    assert [mode for mode, _ in runs] == ["multi_processing", "in_memory", "multi_processing"]
    # in_memory runs in the launcher itself; each multi_processing run in a worker of its own.
    assert runs[1][1] == launcher
    assert launcher not in (runs[0][1], runs[2][1])
