"""``--log_format json``: every log line is one JSON object, and never shows the id."""

from __future__ import annotations

import datetime
import json
import logging
import sys
from pathlib import Path

import pytest

from moesif_beam.runners.logs import JsonFormatter, ScrubbingFormatter
from moesif_beam.transforms.delivery import Secret
from tests.conftest import run_cli
from tests.fixtures import wso2_line

APP_ID = "log-format-app-7d41e0c9"  # distinctive: it must appear in no log line


def _record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(f"bad id {APP_ID}")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("moesif_beam.x", logging.WARNING, __file__, 1, message, args, exc_info)


def test_json_formatter_writes_one_scrubbed_object_per_record():
    formatter = JsonFormatter(secret=Secret(APP_ID))
    line = formatter.format(_record("posting with %s\nsecond line", APP_ID, exc=True))
    assert "\n" not in line
    document = json.loads(line)
    assert set(document) == {"time", "level", "logger", "message", "exception"}
    assert document["level"] == "WARNING"
    assert document["logger"] == "moesif_beam.x"
    assert document["message"] == "posting with ***\nsecond line"
    assert "ValueError: bad id ***" in document["exception"]
    assert APP_ID not in line
    stamp = document["time"]
    assert stamp.endswith("+00:00") and len(stamp.split(".")[1]) == len("123+00:00")
    assert datetime.datetime.fromisoformat(stamp).tzinfo == datetime.UTC


def test_json_formatter_has_no_exception_key_without_one():
    document = json.loads(JsonFormatter().format(_record("plain")))
    assert set(document) == {"time", "level", "logger", "message"}


def test_text_formatter_scrubs_too():
    line = ScrubbingFormatter("%(message)s", secret=Secret(APP_ID)).format(
        _record("id=%s", APP_ID, exc=True)
    )
    assert APP_ID not in line and "id=***" in line


@pytest.mark.integration
def test_cli_json_logs_parse_and_never_show_the_id(tmp_path: Path, start_collector):
    collector = start_collector(application_id=APP_ID)
    lines = [wso2_line(f"00000000-0000-4000-8000-{i:012d}") for i in range(40)]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join([*lines, b"not json"]) + b"\n")
    run = run_cli(
        [
            "events",
            "--input",
            str(tmp_path / "in.jsonl"),
            "--moesif_base_url",
            collector.url,
            "--output_dir",
            str(tmp_path / "out"),
            "--log_format",
            "json",
            "--log_level",
            "INFO",
        ],
        app_id=APP_ID,
    )
    assert run.returncode == 0, run.stderr
    assert "finished in" in run.stdout
    logged = [line for line in run.stderr.splitlines() if line.strip()]
    assert logged, "INFO should log something (Beam's runner does)"
    for line in logged:
        document = json.loads(line)
        assert {"time", "level", "logger", "message"} <= set(document), line
        assert set(document) <= {"time", "level", "logger", "message", "exception"}, line
    assert APP_ID not in run.stderr
    assert APP_ID not in run.stdout
