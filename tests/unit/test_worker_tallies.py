"""Worker processes' published tallies: the files, their sum, and what the launcher reads."""

from __future__ import annotations

import io
import os
import pickle
import sys

import pytest

from moesif_beam.pipelines.config import PipelineConfig
from moesif_beam.runners.progress import ProgressLine, run_tally, workers_publish
from moesif_beam.transforms.common import worker_tallies
from moesif_beam.transforms.common.counters import counter, tally_snapshot
from moesif_beam.transforms.common.worker_tallies import (
    TALLY_DIR_ENV,
    TALLY_LAUNCHER_ENV,
    TALLY_RUN_ENV,
    RunTally,
    decode_tally,
    encode_tally,
    read_tallies,
    sum_tallies,
    tally_path,
)


def _publish(directory, run: str, pid: int, **counts: int) -> None:
    with open(tally_path(str(directory), pid), "w", encoding="utf-8") as handle:
        handle.write(encode_tally(run, pid, counts))


def test_tallies_sum_counter_by_counter():
    assert sum_tallies([{"read": 3, "sent": 1}, {"read": 4, "duplicates": 2}, {}]) == {
        "read": 7,
        "sent": 1,
        "duplicates": 2,
    }
    assert sum_tallies([]) == {}


def test_a_tally_round_trips_for_its_own_run_only():
    text = encode_tally("run-a", 41, {"read": 5})
    assert decode_tally(text, "run-a") == {"read": 5}
    assert decode_tally(text, "run-b") is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        '{"run": "r", "pid": 1, "coun',  # cut short
        "[1, 2]",
        '{"run": "r", "pid": 1}',
        '{"run": "r", "pid": 1, "counts": [1]}',
        '{"run": "r", "pid": 1, "counts": {"read": "5"}}',
        '{"run": "r", "pid": 1, "counts": {"read": 1.5}}',
    ],
)
def test_a_file_that_is_not_a_whole_tally_is_ignored(text):
    assert decode_tally(text, "r") is None


def test_only_this_runs_published_tallies_are_read(tmp_path):
    _publish(tmp_path, "this", 101, read=10, sent=4, bytes_read=1000)
    _publish(tmp_path, "this", 102, read=5, dead_letters=1)
    _publish(tmp_path, "an-earlier-run", 103, read=999)  # another run's workers
    # A file being written aside, a torn one, and files that are not tallies at all.
    (tmp_path / "tally-104.json.tmp").write_text(encode_tally("this", 104, {"read": 7}))
    (tmp_path / "tally-105.json").write_text('{"run": "this", "pid": 105, "cou')
    (tmp_path / "collector-refused").write_text("nope")
    (tmp_path / "tally-x.json").write_text(encode_tally("this", 0, {"read": 7}))
    (tmp_path / "tally-106.json").mkdir()
    assert sum_tallies(read_tallies(str(tmp_path), "this")) == {
        "read": 15,
        "sent": 4,
        "dead_letters": 1,
        "bytes_read": 1000,
    }
    assert read_tallies(str(tmp_path / "gone"), "this") == []  # the run's directory removed


def test_the_run_tally_adds_the_workers_counts_to_what_this_process_counted_since(tmp_path):
    counter("sent").inc(7)  # before the run: not this run's
    tally = RunTally(str(tmp_path))
    _publish(tmp_path, tally.run, 201, read=10, sent=6)
    _publish(tmp_path, "other", 202, read=50)
    counter("sent").inc(2)
    counts = tally.counts()
    assert counts["read"] == 10
    assert counts["sent"] == 8


def test_a_run_tally_without_a_directory_counts_this_process_only(tmp_path):
    tally = RunTally()
    assert not tally.published
    counter("duplicates").inc(3)
    assert tally.counts()["duplicates"] == 3


def test_the_run_tally_names_its_directory_to_the_workers_while_entered(tmp_path, monkeypatch):
    monkeypatch.setenv(TALLY_RUN_ENV, "an-outer-value")
    monkeypatch.delenv(TALLY_DIR_ENV, raising=False)
    tally = RunTally(str(tmp_path))
    with tally:
        assert os.environ[TALLY_DIR_ENV] == str(tmp_path)
        assert os.environ[TALLY_RUN_ENV] == tally.run
        assert os.environ[TALLY_LAUNCHER_ENV] == str(os.getpid())
    assert TALLY_DIR_ENV not in os.environ
    assert TALLY_LAUNCHER_ENV not in os.environ
    assert os.environ[TALLY_RUN_ENV] == "an-outer-value"
    with RunTally():  # nothing to publish to: the environment is left alone
        assert TALLY_DIR_ENV not in os.environ


def test_the_launcher_and_processes_of_no_run_never_publish(tmp_path, monkeypatch):
    monkeypatch.setattr(worker_tallies, "_PUBLISHER_PID", 0)
    monkeypatch.delenv(TALLY_DIR_ENV, raising=False)
    counter("read")  # no run named in the environment
    assert worker_tallies._PUBLISHER_PID == 0
    with RunTally(str(tmp_path)):
        counter("read")  # this process is the run's launcher
        pickle.loads(pickle.dumps(counter("read")))
    assert worker_tallies._PUBLISHER_PID == 0
    assert os.listdir(tmp_path) == []


def test_a_counter_is_made_anew_where_it_is_unpickled():
    made = pickle.loads(pickle.dumps(counter("parse_errors")))
    before = tally_snapshot().get("parse_errors", 0)
    made.inc(2)
    assert tally_snapshot()["parse_errors"] == before + 2


def test_a_worker_publishes_what_it_counted_itself_and_its_final_tally(tmp_path):
    counter("read").inc(100)  # a forked worker starts with a copy of its launcher's tally
    publisher = worker_tallies._Publisher(str(tmp_path), "run-1")
    counter("read").inc(4)
    counter("bytes_read").inc(512)
    publisher.publish()
    assert read_tallies(str(tmp_path), "run-1") == [{"read": 4, "bytes_read": 512}]
    assert sorted(os.listdir(tmp_path)) == [f"tally-{os.getpid()}.json"]  # nothing aside
    counter("sent").inc(4)
    publisher.stop()  # never started: still writes the final tally
    assert read_tallies(str(tmp_path), "run-1") == [{"read": 4, "bytes_read": 512, "sent": 4}]


def test_a_worker_whose_run_directory_is_gone_publishes_nothing_and_does_not_fail(tmp_path):
    publisher = worker_tallies._Publisher(str(tmp_path / "gone"), "run-1")
    counter("read").inc(1)
    publisher.publish()
    assert not (tmp_path / "gone").exists()


def test_the_progress_line_shows_the_workers_counts(tmp_path):
    tally = RunTally(str(tmp_path))
    _publish(tmp_path, tally.run, 301, read=600, bytes_read=50, sent=200)
    _publish(tmp_path, tally.run, 302, read=400, bytes_read=50, sent=300, duplicates=2)
    stream = io.StringIO()
    with ProgressLine(
        "events", counts_visible=True, tally=tally, total_bytes=100, stream=stream, interval=60
    ):
        pass
    assert stream.getvalue().startswith(
        "\rmoesif-beam events: read 1,000  sent 500  duplicates 2  dead letters 0  "
    )
    assert "75% ETA" in stream.getvalue()


@pytest.mark.parametrize(
    ("flags", "publish"),
    [
        (["--runner=FnApiRunner", "--direct_running_mode=multi_processing"], True),
        (
            [
                "--runner=moesif_beam.runners.engines.local_workers.LocalRunner",
                "--direct_running_mode=multi_processing",
            ],
            True,
        ),
        (["--runner=FnApiRunner"], False),  # in this process: the tally is read directly
        (["--runner=FnApiRunner", "--direct_running_mode=multi_threading"], False),
        (["--runner=PortableRunner", "--environment_type=PROCESS"], False),
        (["--runner=DataflowRunner", "--direct_running_mode=multi_processing"], False),
    ],
)
def test_workers_publish_where_they_are_local_processes(flags, publish):
    from apache_beam.options.pipeline_options import PipelineOptions

    assert workers_publish(PipelineOptions(flags)) is publish


@pytest.mark.parametrize(
    ("mode", "requested", "endpoint", "published"),
    [
        ("multi_processing", True, False, True),  # the progress line reads them
        ("multi_processing", None, False, False),  # stderr is no terminal (patched below)
        ("multi_processing", False, True, True),  # the --metrics_port endpoint reads them
        ("multi_processing", False, False, False),  # nothing reads them: no publishing
        ("in_memory", True, True, False),  # the workers run here: the tally is read directly
    ],
)
def test_workers_publish_only_when_something_reads_their_counts(
    tmp_path, monkeypatch, mode, requested, endpoint, published
):
    from apache_beam.options.pipeline_options import PipelineOptions

    # Not a terminal, whatever pytest's own stderr is (pytest -s in a terminal).
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)

    options = PipelineOptions(["--runner=FnApiRunner", f"--direct_running_mode={mode}"])
    config = PipelineConfig(pipeline="events", input="in.jsonl", input_format="wso2")
    tally = run_tally(config, options, requested, str(tmp_path), endpoint=endpoint)
    assert tally.published is published
    assert tally.directory == (str(tmp_path) if published else None)
