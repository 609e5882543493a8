"""`moesif-beam events` end to end: the real command, over real HTTP, against the emulator."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CliRun, run_cli
from tests.fixtures import RESPONSE_EVENT_AS_PRINTED, wso2_line
from tests.helpers import assert_nothing_lost, read_dead_letters

pytestmark = pytest.mark.integration

APP_ID = "test-app-id-3f9c2b"  # a recognisable secret: it must never show up in outputs


def _write_input(path: Path, unique: int, *, repeats: int = 0, extra: list[bytes] = ()) -> Path:
    lines = [wso2_line(f"00000000-0000-4000-8000-{i:012d}") for i in range(unique)]
    lines += lines[:repeats]
    lines += list(extra)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _events(tmp_path: Path, collector_url: str, *extra: str, app_id: str = APP_ID) -> CliRun:
    args = [
        "events",
        "--input",
        str(tmp_path / "in.jsonl"),
        "--moesif_base_url",
        collector_url,
        "--output_dir",
        str(tmp_path / "out"),
        *extra,
    ]
    return run_cli(args, app_id=app_id, metrics=tmp_path / "metrics.json")


def _assert_no_secret(run: CliRun, tmp_path: Path) -> None:
    assert APP_ID not in run.stdout
    assert APP_ID not in run.stderr
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert APP_ID.encode() not in path.read_bytes(), path


def test_delivers_gzip_batches_and_accounts_for_everything(tmp_path, start_collector):
    collector = start_collector(application_id=APP_ID)
    _write_input(
        tmp_path / "in.jsonl", 120, repeats=10, extra=[RESPONSE_EVENT_AS_PRINTED, b"not json"]
    )
    run = _events(tmp_path, collector.url, "--batch_max_events", "50")
    assert run.returncode == 0, run.stderr
    metrics = run.metrics
    assert_nothing_lost(metrics)
    assert (metrics["read"], metrics["sent"], metrics["duplicates"]) == (132, 120, 10)
    assert (metrics["dead_letters"], metrics["parse_errors"]) == (2, 2)
    assert metrics["batches"] == 3
    stored = collector.records("events")
    assert len(stored) == 120
    assert len({event["transaction_id"] for event in stored}) == 120
    assert all(event["request"]["time"].endswith("Z") for event in stored)
    stats = collector.stats()
    assert stats["content_encodings"] == {"gzip": 3}  # every batch arrived gzip-compressed
    assert stats["requests"]["/v1/events/batch"] == {"201": 3}
    assert "holds" in run.stdout
    _assert_no_secret(run, tmp_path)


@pytest.mark.parametrize(
    "faults",
    [
        {"fail_first": 3, "fail_status": 503, "retry_after": 0.2},
        {"fail_rate": 0.4, "fail_status": 429, "seed": 7},
        {"drop_first": 2, "drop_connection_rate": 0.2, "seed": 11},
        {"fail_rate": 0.3, "fail_status": 500, "drop_connection_rate": 0.2, "seed": 5},
    ],
    ids=["503-retry-after", "429", "dropped-connections", "mixed"],
)
def test_transient_faults_are_retried_with_zero_loss(tmp_path, start_collector, faults):
    collector = start_collector(application_id=APP_ID, **faults)
    _write_input(tmp_path / "in.jsonl", 200)
    run = _events(tmp_path, collector.url, "--batch_max_events", "20")
    assert run.returncode == 0, run.stderr
    assert_nothing_lost(run.metrics)
    assert run.metrics["sent"] == 200
    assert run.metrics["retries"] > 0
    assert run.metrics["dead_letters"] == 0
    stored = [event["transaction_id"] for event in collector.records("events")]
    assert sorted(stored) == sorted(set(stored))  # no duplicate transaction ids stored
    assert len(stored) == 200


def test_timeouts_are_retried_and_redelivery_is_deduplicated(tmp_path, start_collector):
    # The collector stores the first batches but answers after the client gave up, so the
    # retry re-sends records it already holds: Moesif's transaction_id dedup absorbs them.
    collector = start_collector(application_id=APP_ID, latency_ms=1500, latency_first=2)
    _write_input(tmp_path / "in.jsonl", 60)
    run = _events(tmp_path, collector.url, "--batch_max_events", "20", "--http_timeout", "0.5")
    assert run.returncode == 0, run.stderr
    assert_nothing_lost(run.metrics)
    assert run.metrics["retries"] >= 2
    stored = [event["transaction_id"] for event in collector.records("events")]
    assert len(stored) == len(set(stored)) == 60


def test_a_batch_with_one_refused_event_is_bisected(tmp_path, start_collector):
    # Moesif refuses events older than 30 days (without backfill): the emulator answers
    # 400 for the whole batch, and only the old event may end up in the dead letters.
    collector = start_collector(application_id=APP_ID, reject_older_than_days=30)
    old = wso2_line("old-event", requestTimestamp="2020-01-01T00:00:00.000Z")
    recent = [
        wso2_line(f"recent-{i}", requestTimestamp="2099-01-01T00:00:00.000Z") for i in range(40)
    ]
    lines = [*recent[:17], old, *recent[17:]]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    run = _events(tmp_path, collector.url, "--batch_max_events", "100")
    assert run.returncode == 0, run.stderr
    assert_nothing_lost(run.metrics)
    assert (run.metrics["sent"], run.metrics["collector_rejected"]) == (40, 1)
    dead = read_dead_letters(str(tmp_path / "out" / "dead_letter"))
    assert [(d["reason"], d["transaction_id"], d["stage"]) for d in dead] == [
        ("collector_rejected", "old-event", "send")
    ]
    assert dead[0]["payload"] == old
    assert "HTTP 400" in dead[0]["detail"]
    assert len(collector.records("events")) == 40


def test_a_413_splits_the_batch(tmp_path, start_collector):
    collector = start_collector(application_id=APP_ID, fail_first=1, fail_status=413)
    _write_input(tmp_path / "in.jsonl", 30)
    run = _events(tmp_path, collector.url, "--batch_max_events", "30")
    assert run.returncode == 0, run.stderr
    assert_nothing_lost(run.metrics)
    assert (run.metrics["sent"], run.metrics["batches"]) == (30, 2)
    assert len(collector.records("events")) == 30


def test_retries_exhausted_become_dead_letters(tmp_path, start_collector):
    collector = start_collector(application_id=APP_ID, fail_rate=1.0, fail_status=503)
    _write_input(tmp_path / "in.jsonl", 25)
    run = _events(tmp_path, collector.url, "--max_retry_seconds", "1")
    assert run.returncode == 0, run.stderr
    assert_nothing_lost(run.metrics)
    assert (run.metrics["sent"], run.metrics["dead_letters"]) == (0, 25)
    assert run.metrics["retries_exhausted"] == 25
    dead = read_dead_letters(str(tmp_path / "out" / "dead_letter"))
    assert {d["reason"] for d in dead} == {"retries_exhausted"}
    assert "gave up after" in dead[0]["detail"]
    _assert_no_secret(run, tmp_path)


def test_wrong_application_id_stops_with_one_clear_message(tmp_path, start_collector):
    collector = start_collector(application_id="the-right-id")
    _write_input(tmp_path / "in.jsonl", 10)
    run = _events(tmp_path, collector.url)
    assert run.returncode == 3
    assert "HTTP 401" in run.stderr
    assert "application id was refused" in run.stderr
    assert "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert len(collector.records("events")) == 0
    _assert_no_secret(run, tmp_path)


def test_401_during_the_run_stops_it_and_dead_letters_nothing(tmp_path, start_collector):
    # The preflight passes; the collector then refuses the batch itself.
    collector = start_collector(application_id=APP_ID, fail_first=1, fail_status=401)
    _write_input(tmp_path / "in.jsonl", 10)
    run = _events(tmp_path, collector.url)
    assert run.returncode == 3
    assert "HTTP 401" in run.stderr
    assert "Traceback" not in run.stderr
    assert not read_dead_letters(str(tmp_path / "out" / "dead_letter"))
    _assert_no_secret(run, tmp_path)


def test_without_an_application_id_batches_go_to_files(tmp_path):
    _write_input(tmp_path / "in.jsonl", 12, repeats=2)
    run = run_cli(
        ["events", "--input", str(tmp_path / "in.jsonl"), "--output_dir", str(tmp_path / "out")],
        metrics=tmp_path / "metrics.json",
    )
    assert run.returncode == 0, run.stderr
    assert_nothing_lost(run.metrics)
    assert run.metrics["sent"] == 12
    files = list((tmp_path / "out" / "events").glob("batch-*.json.gz"))
    assert len(files) == run.metrics["batches"] == 1
    assert run.metrics["bytes_sent"] == files[0].stat().st_size


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["events", "--batch_max_event", "5", "--input", "x"],
            "unknown option(s): --batch_max_event",
        ),
        (
            ["events", "--input", "x", "--no_such_beam_flag"],
            "unknown option(s): --no_such_beam_flag",
        ),
        (["events"], "--input is required"),
        (["events", "--input", "/nonexistent/*.jsonl"], "matches no files"),
        (["events", "--input", "x", "--batch_max_bytes", "60000000"], "--batch_max_bytes"),
        (["events", "--input", "x", "--format", "mulesoft"], "invalid choice"),
        (["nonsense"], "unknown command"),
    ],
)
def test_bad_configuration_is_one_clear_error(args, message):
    run = run_cli(args, timeout=60)
    assert run.returncode == 2
    assert message in run.stderr
    assert "Traceback" not in run.stderr


def test_metrics_out_has_every_contract_key(tmp_path):
    _write_input(tmp_path / "in.jsonl", 3)
    run = run_cli(
        ["events", "--input", str(tmp_path / "in.jsonl"), "--output_dir", str(tmp_path / "out")],
        metrics=tmp_path / "metrics.json",
    )
    assert run.returncode == 0, run.stderr
    keys = set(json.loads((tmp_path / "metrics.json").read_text()))
    contract = {
        "read",
        "parse_errors",
        "invalid",
        "type_conflicts",
        "duplicates",
        "sent",
        "batches",
        "bytes_sent",
        "retries",
        "collector_rejected",
        "dead_letters",
    }
    assert contract <= keys


def test_large_local_inputs_run_on_worker_processes(tmp_path, monkeypatch):
    from moesif_beam.runners import options as cli

    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    big = tmp_path / "big.jsonl"
    with big.open("wb") as handle:
        handle.truncate(cli.PARALLEL_INPUT_BYTES)  # sparse: the size is what counts
    small = tmp_path / "small.jsonl"
    small.write_bytes(b"{}\n")
    processes = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    assert cli.local_parallelism([], [str(big)]) == processes
    assert cli.local_parallelism(["--runner=FnApiRunner"], [str(big)]) == processes
    # Small inputs stay in one process; the user's own sizing and other runners are kept.
    assert cli.local_parallelism([], [str(small)]) == []
    assert cli.local_parallelism(["--direct_num_workers", "1"], [str(big)]) == []
    assert cli.local_parallelism(["--runner=DataflowRunner"], [str(big)]) == []
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 1)
    assert cli.local_parallelism([], [str(big)]) == []


@pytest.mark.parametrize("workers", [("--start_workers",), ()], ids=["started", "forked"])
def test_a_file_split_into_ranges_across_two_worker_processes_loses_nothing(
    tmp_path, start_collector, workers
):
    """Large files are read as line-aligned ranges by several worker processes (started
    as Beam starts them, or forked): every record is still sent once, and dead letters name
    their line in the whole file."""
    from moesif_beam.transforms.sources.files import RANGE_BYTES
    from samples.generate_wso2 import generate

    collector = start_collector(application_id=APP_ID)
    lines = list(generate(15_000, seed=11))
    # Bad lines in the first, second and last range; line numbers are 1-based.
    bad = {2_000: b"not json", 9_000: b'{"apiMethod": 3}', 14_900: b'{"a": "\xff"}'}
    for number in sorted(bad):
        lines.insert(number - 1, bad[number])
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert path.stat().st_size > 2 * RANGE_BYTES  # three ranges at least

    run = _events(
        tmp_path,
        collector.url,
        "--direct_num_workers",
        "2",
        "--direct_running_mode",
        "multi_processing",
        *workers,
    )
    assert run.returncode == 0, run.stderr
    metrics = run.metrics
    assert_nothing_lost(metrics)
    good = [json.loads(line) for n, line in enumerate(lines, 1) if n not in bad]
    unique = {event["correlationId"] for event in good}
    assert metrics["read"] == len(lines)
    assert (metrics["sent"], metrics["duplicates"]) == (len(unique), len(good) - len(unique))
    assert metrics["dead_letters"] == 3
    received = [event["transaction_id"] for event in collector.records("events")]
    assert len(received) == len(set(received)) and set(received) == unique
    dead = read_dead_letters(str(tmp_path / "out" / "dead_letter"))
    assert sorted(d["source"] for d in dead) == sorted(f"{path}:{n}" for n in bad)
    # The workers claimed the ranges as they read (transforms/sources/ranges.py); the
    # claims went with the spill.
    assert not (tmp_path / "out" / ".dedup-spill").exists()


def test_run_options_make_each_view_once_and_share_its_values():
    from apache_beam.options.pipeline_options import (
        DirectOptions,
        PipelineOptions,
        StandardOptions,
    )

    from moesif_beam.runners import cli
    from moesif_beam.runners import options as run_options

    options = run_options.beam_options(
        ["--direct_num_workers=2"], streaming=False, default_runner=cli.DEFAULT_BATCH_RUNNER
    )
    direct = options.view_as(DirectOptions)
    assert options.view_as(DirectOptions) is direct
    assert direct.direct_num_workers == 2
    assert options.view_as(StandardOptions).runner == cli.DEFAULT_BATCH_RUNNER
    # A value set through one view is what every view, and the serialized options, read.
    direct.direct_running_mode = "multi_processing"
    assert options.view_as(DirectOptions).direct_running_mode == "multi_processing"
    assert PipelineOptions.view_as(options, DirectOptions).direct_running_mode == (
        "multi_processing"
    )
    assert options.get_all_options()["direct_running_mode"] == "multi_processing"
    # The flag check still knows every Beam flag and only those.
    assert run_options._unknown_beam_args(["--direct_num_workers=2", "--no_such_flag"]) == [
        "--no_such_flag"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runner", "Bogus"], "unknown --runner 'Bogus'"),
        (["--runner=no.such.module.Runner"], "--runner"),
        (["--direct_num_workers=many"], "direct_num_workers"),
        (["--runner", "DaskRunner", "--dask_client_address", "x"], "DaskRunner"),
    ],
)
def test_a_bad_runner_or_runner_option_is_one_line_and_exit_2(tmp_path, args, message):
    _write_input(tmp_path / "in.jsonl", 3)
    run = run_cli(
        [
            "events",
            "--input",
            str(tmp_path / "in.jsonl"),
            "--output_dir",
            str(tmp_path / "o"),
            *args,
        ],
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert message in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "Traceback" not in run.stderr


def test_a_chosen_runners_own_options_are_accepted(tmp_path):
    # The options class exists only in the runner's module: it is imported because the
    # runner is chosen, so its flag is known.
    _write_input(tmp_path / "in.jsonl", 5)
    run = run_cli(
        [
            "events",
            "--input",
            str(tmp_path / "in.jsonl"),
            "--output_dir",
            str(tmp_path / "out"),
            "--runner",
            "tests.support.custom_runner.AuditedRunner",
            "--audit_label",
            "nightly",
        ],
        metrics=tmp_path / "metrics.json",
    )
    assert run.returncode == 0, run.stderr
    assert run.metrics["sent"] == 5
    # Without the runner, the same flag is unknown.
    again = run_cli(
        ["events", "--input", str(tmp_path / "in.jsonl"), "--audit_label", "nightly"], timeout=60
    )
    assert again.returncode == 2
    assert "unknown option(s): --audit_label" in again.stderr


def test_clear_failures_at_start_are_one_line_and_exit_2(tmp_path):
    # Issue 18's list: an unreachable broker, an input that cannot be read, a dead-letter
    # path or output directory that cannot be written, a schema store that is not JSON.
    sample = _write_input(tmp_path / "in.jsonl", 2)
    bad_store = tmp_path / "schema.json"
    bad_store.write_text("{not json")
    cases = [
        (
            [
                "--source",
                "kafka",
                "--kafka_bootstrap_servers",
                "127.0.0.1:1",
                "--kafka_topic",
                "t",
                "--kafka_group_id",
                "g",
                "--kafka_stop",
                "now",
            ],
            "cannot read Kafka at 127.0.0.1:1",
        ),
        (["--input", "nosuchscheme://bucket/*.jsonl"], "nosuchscheme://bucket/*.jsonl"),
        (["--input", str(sample), "--dead_letter", "/proc/none/dl"], "--dead_letter"),
        (["--input", str(sample), "--output_dir", "/proc/none"], "--output_dir"),
        (["--input", str(sample), "--schema_store", str(bad_store)], "not JSON"),
    ]
    for args, message in cases:
        run = run_cli(["events", *args], timeout=120)
        assert run.returncode == 2, (args, run.stderr)
        assert message in run.stderr, (args, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1, (args, run.stderr)


def _start_as_in_a_terminal(command: list[str], env: dict[str, str]) -> Any:
    """Start ``command`` as a terminal's foreground job, for a test to send it Ctrl-C.

    It must not start with SIGINT ignored, which it would inherit from a test run a shell
    started in the background; a handler is not inherited (exec resets it to the
    default). It gets its own process group, as a terminal's foreground job does.
    """
    import signal
    import subprocess

    from tests.conftest import REPO

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c_once(
    proc: Any, ready: Callable[[], bool], seconds: float, every: float, what: str
) -> tuple[str, str]:
    """Once ``ready()`` holds (checked every ``every`` s while ``proc`` runs, for at most
    ``seconds``), a terminal's Ctrl-C to ``proc``'s group; its stdout and stderr."""
    import os
    import signal
    import time

    deadline = time.monotonic() + seconds
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"the command never got to {what}"
        time.sleep(every)
    os.killpg(proc.pid, signal.SIGINT)
    return proc.communicate(timeout=60)


def test_ctrl_c_stops_a_bounded_run_with_one_line_exit_130_and_nothing_left(
    tmp_path, start_collector
):
    """A terminal's Ctrl-C reaches the whole process group: the launcher, its fork server,
    the worker stubs and the workers. The run stops with one line and exit 130, leaves no
    process behind, removes its spill, and leaves the metadata schema store unwritten."""
    import os
    import sys
    import time

    collector = start_collector(application_id=APP_ID)
    # Large enough to run on worker processes, and still running when interrupted.
    _write_input(tmp_path / "in.jsonl", 150_000)
    env = dict(os.environ, MOESIF_APPLICATION_ID=APP_ID)
    command = [sys.executable, "-m", "moesif_beam.runners.cli", "events", "--input"]
    command += [str(tmp_path / "in.jsonl"), "--moesif_base_url", collector.url]
    proc = _start_as_in_a_terminal([*command, "--output_dir", str(tmp_path / "out")], env)
    spill = tmp_path / "out" / ".dedup-spill"
    # Once the workers are writing the spill.
    out, err = _ctrl_c_once(proc, lambda: any(spill.rglob("*.bin")), 120, 0.05, "spilling")
    assert proc.returncode == 130, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("moesif-beam events: interrupted;")
    assert "Run the same command again" in lines[0]
    assert "holds" not in out  # no summary: the run did not complete
    ended = time.monotonic() + 10
    while True:  # every process of the run's group ends with it
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < ended, "processes of the interrupted run are still running"
        time.sleep(0.05)
    assert not spill.exists()
    assert not (tmp_path / "out" / "metadata_schema.json").exists()
    assert APP_ID not in err


def test_ctrl_c_while_the_command_is_still_importing_is_one_line_and_exit_130(tmp_path):
    """The installed ``moesif-beam`` command, interrupted inside its import of Beam (the
    first second of every run): one line, exit 130, no traceback."""
    import os
    import sys
    from pathlib import Path

    command = Path(sys.executable).parent / "moesif-beam"
    _write_input(tmp_path / "in.jsonl", 10)
    out = str(tmp_path / "out")
    env = {k: v for k, v in os.environ.items() if k != "MOESIF_APPLICATION_ID"}
    proc = _start_as_in_a_terminal(
        [str(command), "events", "--input", str(tmp_path / "in.jsonl"), "--output_dir", out], env
    )
    # Beam's compiled modules are mapped only by the command's import of Beam, which goes
    # on for a few hundred milliseconds after the first of them: interrupt right then.
    maps = Path(f"/proc/{proc.pid}/maps")
    ready = lambda: "apache_beam" in maps.read_text()  # noqa: E731
    out, err = _ctrl_c_once(proc, ready, 60, 0.002, "importing Beam")
    assert proc.returncode == 130, err
    assert err.splitlines() == [
        "moesif-beam: interrupted while starting; nothing was read or sent."
    ], err
    assert not (tmp_path / "out" / "events").exists()
