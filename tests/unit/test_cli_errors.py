"""Errors reach the user as one line: a refused configuration is reported, not searched for."""

from __future__ import annotations

import pytest

from moesif_beam.pipelines.config import PipelineConfig
from moesif_beam.runners import launch
from moesif_beam.runners.options import DEFAULTS
from moesif_beam.transforms.common.errors import (
    REPORT_ENV,
    CollectorConfigError,
    reported_config_error,
)
from moesif_beam.transforms.delivery import RetryPolicy, Secret
from moesif_beam.transforms.profiles.delivery import _SegmentWriter

WRITE_KEY = "segment-wk-unit-7e3a91"


def test_a_refusal_raised_in_a_worker_is_reported_to_the_launcher(tmp_path, monkeypatch):
    report = tmp_path / "collector-refused"
    monkeypatch.setenv(REPORT_ENV, str(report))
    CollectorConfigError(f"{CollectorConfigError.MARKER}: HTTP 401 from http://x/v1: refused")
    assert reported_config_error(str(report)).endswith("HTTP 401 from http://x/v1: refused")


def test_without_a_listener_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(REPORT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    CollectorConfigError("refused")
    assert list(tmp_path.iterdir()) == []


def test_the_launcher_prints_the_reported_refusal_whatever_the_runner_wrapped(tmp_path, capsys):
    report = tmp_path / "collector-refused"
    report.write_text("moesif-beam: collector refused the configuration: HTTP 403")
    config = PipelineConfig(pipeline="events", input="x", input_format="wso2")
    # The runner's own exception says nothing useful: the report does.
    code = launch._report_failure(RuntimeError("Pipeline failed"), config, str(report))
    assert code == launch.EXIT_COLLECTOR
    assert capsys.readouterr().err.strip() == (
        "moesif-beam: collector refused the configuration: HTTP 403"
    )


@pytest.mark.parametrize(
    ("status", "headers", "says"),
    [
        (401, {}, "the Segment write key was refused; check --segment_write_key"),
        (403, {}, "the Segment write key was refused; check --segment_write_key"),
        (404, {}, "Segment has no such endpoint; check --segment_base_url"),
        (307, {"Location": f"https://other.example/?k={WRITE_KEY}"}, "a redirect to other.example"),
        (402, {}, "Segment refused the request"),
    ],
)
def test_segments_refusal_names_segment_not_the_collector(status, headers, says):
    writer = _SegmentWriter(
        "http://127.0.0.1:9/v1/batch", Secret(WRITE_KEY), "profile-upserts", 6, RetryPolicy(), 5
    )
    response = type("Response", (), {"status_code": status, "headers": headers})()
    message = writer._fatal_message(status, response)
    assert message.startswith(f"moesif-beam: Segment refused the configuration: HTTP {status} ")
    assert says in message
    assert "collector" not in message and "moesif_base_url" not in message
    assert WRITE_KEY not in message and "\n" not in message


def test_the_launcher_finds_segments_refusal_in_a_remote_workers_traceback(capsys):
    config = PipelineConfig(pipeline="events", input="x", input_format="wso2")
    line = (
        f"{CollectorConfigError.SEGMENT_MARKER}: HTTP 401 from http://s/v1/batch: the Segment "
        "write key was refused"
    )
    wrapped = RuntimeError(f"Pipeline failed: Traceback ...\nCollectorConfigError: {line}\n ...")
    assert launch._report_failure(wrapped, config) == launch.EXIT_COLLECTOR
    assert capsys.readouterr().err.strip() == line


def test_flag_defaults_are_the_configs_own():
    config = PipelineConfig(pipeline="events", input="x", input_format="wso2")
    for name in ("batch_max_events", "batch_max_bytes", "gzip_level", "http_timeout"):
        assert DEFAULTS[name] == getattr(config, name)
    assert DEFAULTS["max_retry_seconds"] == RetryPolicy().max_retry_seconds


def test_the_log_filter_drops_beams_worker_start_noise_but_not_other_warnings():
    import logging

    from moesif_beam.runners.cli import _OwnErrorsOnce

    def record(message: str, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord("apache_beam.x", level, __file__, 1, message, (), None)

    keep = _OwnErrorsOnce().filter
    assert not keep(record('Worker: message: "No semi_persistent_directory found:  User ..."'))
    assert keep(record("No semi_persistent_directory found", logging.ERROR))
    assert keep(record("a retry of batch 3"))


def test_the_entry_points_interrupt_exit_code_is_the_launchers():
    from moesif_beam.runners import entry

    assert entry._EXIT_INTERRUPTED == launch.EXIT_INTERRUPTED
