"""The progress line's text, ETA and fraction done, without a pipeline."""

from __future__ import annotations

import io

import pytest

from moesif_beam.runners.progress import (
    ProgressLine,
    done_fraction,
    eta_seconds,
    format_duration,
    format_progress,
)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (42.4, "42s"), (59.6, "1m00s"), (185, "3m05s"), (3720, "1h02m")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_files_half_read_and_nothing_delivered_is_a_quarter_done():
    counts = {"read": 500, "bytes_read": 50, "sent": 0}
    assert done_fraction(counts, total_bytes=100) == pytest.approx(0.25)


def test_files_all_read_and_half_delivered():
    # 1,000 records in all (all bytes read); 500 accounted for.
    counts = {"read": 1000, "bytes_read": 100, "sent": 400, "duplicates": 60, "dead_letters": 40}
    assert done_fraction(counts, total_bytes=100) == pytest.approx(0.75)


def test_kafka_progress_is_by_offsets():
    counts = {"read": 250, "sent": 100}
    assert done_fraction(counts, total_offsets=1000) == pytest.approx((0.25 + 0.1) / 2)


def test_nothing_to_measure_by():
    assert done_fraction({"read": 10}) is None
    assert eta_seconds(None, 5.0) is None
    assert eta_seconds(0.0, 5.0) is None


def test_eta_at_the_pace_so_far():
    assert eta_seconds(0.25, 10.0) == pytest.approx(30.0)
    assert eta_seconds(1.0, 10.0) == 0


def test_line_with_counts_rate_and_eta():
    counts = {"read": 12345, "bytes_read": 100, "sent": 6000, "duplicates": 10, "dead_letters": 3}
    text = format_progress("events", counts, 10.0, total_bytes=200)
    assert text == (
        "moesif-beam events: read 12,345  sent 6,000  duplicates 10  dead letters 3  "
        "1,234 records/s  37% ETA 17s  elapsed 10s"
    )


def test_line_when_done_has_no_eta():
    counts = {"read": 10, "bytes_read": 100, "sent": 10}
    text = format_progress("actions", counts, 2.0, total_bytes=100)
    assert text.endswith("5 records/s  100%  elapsed 2s")


def test_line_without_visible_counts_shows_elapsed_only():
    assert format_progress("events", None, 75.0) == (
        "moesif-beam events: running 1m15s (counts at the end)"
    )


def test_progress_line_redraws_with_carriage_returns_and_ends_the_line():
    stream = io.StringIO()
    with ProgressLine("events", counts_visible=False, stream=stream, interval=0.01):
        pass
    text = stream.getvalue()
    assert text.startswith("\rmoesif-beam events: running 0s")
    assert text.endswith("\n") and text.count("\n") == 1
