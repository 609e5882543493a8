"""A streaming `moesif-beam profiles` on a real Kafka broker: profiles follow event time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from moesif_beam.runners.emulators.segment import SegmentConfig, start_in_thread
from moesif_beam.transforms.profiles.traits import METADATA_KEY
from tests.conftest import REPO
from tests.fixtures import wso2_line
from tests.helpers import assert_nothing_lost, wait_for
from tests.kafka_support import committed, produce

pytestmark = [
    pytest.mark.integration,
    pytest.mark.kafka,
    pytest.mark.usefixtures("prism_runner"),
]

APP_ID = "profiles-stream-app-7e21"
WRITE_KEY = "profiles-stream-wk-3b9d"


def _call(tid: int, hour: int, minute: int, user: str, status: int) -> bytes:
    return wso2_line(
        f"00000000-0000-4000-8000-{tid:012d}",
        userName=user,
        applicationName="acme",
        requestTimestamp=f"2026-11-01T{hour:02d}:{minute:02d}:00.000Z",
        proxyResponseCode=status,
        responseLatency=10 * tid,
    )


def _user(collector: Any, user_id: str) -> dict[str, Any] | None:
    for user in collector.records("users"):
        if user["user_id"] == user_id:
            return user["metadata"][METADATA_KEY]
    return None


def _as_of(collector: Any, user_id: str) -> str | None:
    derived = _user(collector, user_id)
    return None if derived is None else derived["asOfTime"]


def test_a_stream_updates_profiles_as_event_time_advances(
    tmp_path: Path, kafka_broker, kafka_topic, start_collector
):
    bootstrap = kafka_broker.bootstrap_servers
    topic = kafka_topic(partitions=2)
    collector = start_collector(application_id=APP_ID)
    segment = start_in_thread(SegmentConfig(write_key=WRITE_KEY))
    log = tmp_path / "stream.log"
    metrics = tmp_path / "metrics.json"
    env = dict(os.environ, MOESIF_APPLICATION_ID=APP_ID, SEGMENT_WRITE_KEY=WRITE_KEY)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moesif_beam.runners.cli",
            "profiles",
            "--source",
            "kafka",
            "--kafka_bootstrap_servers",
            bootstrap,
            "--kafka_topic",
            topic,
            "--kafka_group_id",
            "profiles",
            "--company_id_field",
            "applicationName",
            "--profile_interval",
            "3600",
            "--moesif_base_url",
            collector.url,
            "--segment_base_url",
            segment.url,
            "--output_dir",
            str(tmp_path / "out"),
            "--metrics_out",
            str(metrics),
        ],
        cwd=REPO,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        # Hour 10: three calls by ana (one replayed), one by bob.
        first = [
            _call(1, 10, 5, "ana", 401),
            _call(2, 10, 20, "ana", 200),
            _call(3, 10, 40, "bob", 200),
        ]
        produce(bootstrap, topic, [*first, first[1]], partitions=2)
        wait_for(
            lambda: (
                (_user(collector, "ana") or {}).get("lastSeenTime") == "2026-11-01T10:20:00.000Z"
                # Both calls: the 10:20 one can be reported first, alone, and the 10:05
                # one in a later update (a touch after its interval was reported).
                and (_user(collector, "ana") or {})["last24HourAggResults"]["calls"] >= 2
            ),
            180,
            "ana's profile with both her hour-10 calls",
        )
        ana = _user(collector, "ana")
        assert ana is not None
        assert ana["last24HourAggResults"]["calls"] == 2  # the replay counted once
        # As of the end of hour 10 (or of a later interval, when her second call arrived
        # after the first update was sent): never before the calls it reports.
        first_as_of = ana["asOfTime"]
        assert "2026-11-01T11:00:00.000Z" <= first_as_of < "2026-11-01T14:00:00.000Z"

        # Event time moves on to hour 13: the same profile is updated as of its end.
        produce(bootstrap, topic, [_call(4, 13, 15, "ana", 500), b"not json"], partitions=2)
        wait_for(
            lambda: _as_of(collector, "ana") == "2026-11-01T14:00:00.000Z",
            120,
            "ana's profile as of the end of hour 13",
        )
        ana = _user(collector, "ana")
        assert ana is not None
        assert ana["firstSeenTime"] == "2026-11-01T10:05:00.000Z"
        assert ana["lastSeenTime"] == "2026-11-01T13:15:00.000Z"
        assert ana["last24HourAggResults"]["calls"] == 3
        assert ana["last24HourAggResults"]["errors"] == 2
        companies = {c["company_id"]: c for c in collector.records("companies")}
        wait_for(
            lambda: any(
                m["userId"] == "ana" and m["timestamp"] == "2026-11-01T14:00:00.000Z"
                for m in segment.messages("identify")
            ),
            60,
            "ana's identify as of hour 13",
        )
        acme = companies["acme"]["metadata"][METADATA_KEY]
        assert acme["ttfhw_s"] == 15 * 60  # 10:05 first call, 10:20 first 2xx
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
        segment.stop()
    assert code == 0, log.read_text()[-3000:]
    counters = json.loads(metrics.read_text())
    assert_nothing_lost(counters)
    assert (counters["read"], counters["duplicates"], counters["dead_letters"]) == (6, 1, 1)
    assert WRITE_KEY not in log.read_text() and APP_ID not in log.read_text()
    # Drained: every record's fate is final, so the group's offsets reach the end.
    assert sum(committed(bootstrap, "profiles", topic, 2)) == 6
