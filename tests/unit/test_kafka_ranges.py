"""The settings a Kafka range's consumers get (pure; the reads are in integration)."""

from __future__ import annotations

from moesif_beam.transforms.sources.kafka_ranges import MAX_RANGE, range_reader_settings


def test_settings_never_let_the_consumer_jump():
    user = {
        "bootstrap.servers": "x",
        "auto.offset.reset": "latest",
        "enable.partition.eof": False,
        "enable.auto.commit": True,
        "enable.auto.offset.store": True,
    }
    settings = range_reader_settings(user, sticky=True)
    assert settings["auto.offset.reset"] == "error"
    assert settings["enable.partition.eof"] is True
    assert settings["enable.auto.commit"] is False
    assert settings["enable.auto.offset.store"] is False
    assert "queued.min.messages" not in range_reader_settings(user, sticky=True)
    assert range_reader_settings(user, sticky=False)["queued.min.messages"] == MAX_RANGE
    assert user["auto.offset.reset"] == "latest"  # the caller's dict is untouched
