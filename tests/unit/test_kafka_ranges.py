"""The settings a Kafka range's consumers get (pure; the reads are in integration)."""

from __future__ import annotations

from moesif_beam.transforms.sources.kafka_ranges import MAX_RANGE, range_reader_settings


def test_settings_never_let_the_consumer_jump():
    user = {"bootstrap.servers": "x", "auto.offset.reset": "latest"}
    assert range_reader_settings(user, sticky=True)["auto.offset.reset"] == "error"
    assert "queued.min.messages" not in range_reader_settings(user, sticky=True)
    assert range_reader_settings(user, sticky=False)["queued.min.messages"] == MAX_RANGE
    assert user["auto.offset.reset"] == "latest"  # the caller's dict is untouched
