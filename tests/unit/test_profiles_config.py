"""The profiles command's settings: refused when incoherent, secrets never shown."""

from __future__ import annotations

import logging

import pytest

from moesif_beam.pipelines.config import PipelineConfig
from moesif_beam.runners import cli
from moesif_beam.runners.profile_options import Secrets
from moesif_beam.transforms.delivery import Secret
from moesif_beam.transforms.profiles.delivery import DeliverProfiles, segment_url

KEY = "wk-unit-test-6a1f"


def _config(**settings: object) -> PipelineConfig:
    values = {"pipeline": "profiles", "input": "x", "input_format": "wso2", **settings}
    return PipelineConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"input_format": "segment", "segment_write_key": Secret(KEY)}, "sending them back"),
        ({"segment_write_key": Secret("short")}, "write key is too short"),
        ({"segment_write_key": Secret(KEY), "segment_base_url": "ftp://x"}, "segment_base_url"),
        ({"profile_interval": 0}, "--profile_interval must be positive"),
        ({"input_format": "nope"}, "not a profiles format"),
    ],
)
def test_incoherent_profiles_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message) as caught:
        _config(**settings)
    assert KEY not in str(caught.value)


def test_profiles_options_belong_to_profiles():
    with pytest.raises(ValueError, match="options of moesif-beam profiles"):
        PipelineConfig(pipeline="events", input="x", input_format="wso2", as_of_ms=0)
    assert KEY not in repr(_config(segment_write_key=Secret(KEY)))


def test_the_command_refuses_a_bad_as_of_and_as_of_in_a_stream(capsys, tmp_path):
    for extra in (["--as_of", "yesterday"], ["--as_of", "2026-11-01T00:00:00Z", "--follow"]):
        with pytest.raises(SystemExit) as exited:
            cli.main(["profiles", "--input", str(tmp_path / "*.jsonl"), *extra])
        assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--as_of 'yesterday' is not a time" in err
    assert "--as_of fixes a bounded run's time" in err


def test_log_lines_never_show_either_secret():
    secrets = Secrets(Secret("app-id-unit-1234"), Secret(KEY))
    record = logging.LogRecord("x", logging.INFO, "f", 1, f"a {KEY} b app-id-unit-1234", (), None)
    from moesif_beam.runners.logs import make_formatter

    line = make_formatter("json", secrets).format(record)
    assert KEY not in line and "app-id-unit-1234" not in line
    assert line.count("***") == 2


def test_segment_delivery_needs_a_key_and_posts_to_the_batch_route():
    assert segment_url("https://api.segment.io/v1/") == "https://api.segment.io/v1/batch"
    with pytest.raises(ValueError, match="write key is required"):
        DeliverProfiles("segment", base_url="https://api.segment.io")
    with pytest.raises(ValueError, match="output must be one of"):
        DeliverProfiles("events", directory="x")
