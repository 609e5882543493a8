"""``--metrics_port``: a real stream scraped over real HTTP, and the endpoint's clear failures."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moesif_beam.runners.engines.children import free_port
from tests.conftest import REPO, run_cli
from tests.fixtures import wso2_line
from tests.kafka_support import committed, produce
from tests.processes import listening_addresses

SAMPLE = REPO / "samples" / "wso2_sample.jsonl"
APP_ID = "metrics-test-app-0123456789"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    """The one sample ``name`` whose labels include ``labels``; None if there is none."""
    matches = [
        value
        for (sample, have), value in samples.items()
        if sample == name and set(labels.items()) <= have
    ]
    assert len(matches) <= 1, f"{name} {labels} is ambiguous: {matches}"
    return matches[0] if matches else None


class _Stream:
    """A streaming ``moesif-beam events`` with ``--metrics_port``, drained by SIGTERM."""

    def __init__(self, tmp_path: Path, args: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "stream.log"
        self.metrics_out = tmp_path / "metrics.json"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "moesif_beam.runners.cli",
                "events",
                *args,
                "--metrics_port",
                str(self.port),
                "--metrics_out",
                str(self.metrics_out),
            ],
            cwd=REPO,
            env=dict(os.environ, MOESIF_APPLICATION_ID=APP_ID),
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def scrape(self) -> tuple[str, Samples]:
        status, text = _get(f"{self.url}/metrics")
        assert status == 200, text
        return text, _samples(text)

    def wait(self, condition: Callable[[Samples], bool], what: str, timeout: float = 120) -> str:
        """Scrape until ``condition`` holds; return that scrape's text."""
        deadline = time.monotonic() + timeout
        samples: Samples = {}
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                text, samples = self.scrape()
            except (urllib.error.URLError, ConnectionError):
                text = ""  # not listening yet
            else:
                if condition(samples):
                    return text
            time.sleep(0.2)
        shown = {k[0]: v for k, v in samples.items() if k[0].startswith("moesif_beam_")}
        raise AssertionError(f"timed out waiting for {what}; last scrape: {shown}")

    def drain(self) -> dict:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(120) == 0, self.log.read_text()[-3000:]
        return json.loads(self.metrics_out.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def _lags(samples: Samples, topic: str) -> dict[str, float | None]:
    return {
        p: _value(samples, "moesif_beam_kafka_consumer_lag", topic=topic, partition=p)
        for p in ("0", "1")
    }


@pytest.mark.integration
@pytest.mark.kafka
@pytest.mark.usefixtures("prism_runner")
@pytest.mark.timeout(420)
def test_a_kafka_stream_serves_counters_lag_latency_and_liveness(
    tmp_path, kafka_broker, kafka_topic, start_collector
):
    bootstrap = kafka_broker.bootstrap_servers
    topic = kafka_topic(partitions=2)
    collector = start_collector(application_id=APP_ID)
    stream = _Stream(
        tmp_path,
        [
            "--source",
            "kafka",
            "--kafka_bootstrap_servers",
            bootstrap,
            "--kafka_topic",
            topic,
            "--kafka_group_id",
            "scraped",
            "--moesif_base_url",
            collector.url,
            "--output_dir",
            str(tmp_path / "out"),
            "--batch_max_delay",
            "1",
            # Retries go on for as long as the collector is away below: nothing is
            # dead-lettered, so nothing is committed until the collector is back.
            "--max_retry_seconds",
            "600",
        ],
    )
    ids = [f"scraped-{i:03d}" for i in range(20)]
    try:
        # The endpoint serves while the run starts, and the lag is looked at before the
        # run reads anything: an empty topic has none.
        text = stream.wait(lambda s: _lags(s, topic) == {"0": 0, "1": 0}, "the lag series")
        # Loopback by default: the only listening socket on the port is 127.0.0.1's.
        assert listening_addresses(stream.proc.pid, stream.port) == {"127.0.0.1"}
        status, body = _get(f"{stream.url}/healthz")
        assert status == 200, body
        assert json.loads(body)["status"] == "ok"

        # With the collector away, records are read but none can be done: the lag is every
        # record produced, the failed attempts show in the latency histogram as they
        # happen, and the batches stay in flight. (The retries counter moves when a batch's
        # delivery ends, like every counter of the summary: below.)
        collector.stop()
        produce(bootstrap, topic, [wso2_line(i) for i in ids], partitions=2)
        stream.wait(
            lambda s: (
                _lags(s, topic) == {"0": 10, "1": 10}
                and (_value(s, "moesif_beam_batches_in_flight") or 0) >= 1
                and (_value(s, "moesif_beam_batch_post_seconds_count", outcome="no_response") or 0)
                >= 2
            ),
            "lag 10 per partition while the collector is away",
        )
        assert _value(stream.scrape()[1], "moesif_beam_sent_total") == 0

        # Back on the same port: every record is sent, and committed.
        start_collector(application_id=APP_ID, port=collector.port)
        text = stream.wait(
            lambda s: (
                _value(s, "moesif_beam_sent_total", pipeline="events", source="kafka") == len(ids)
                and _lags(s, topic) == {"0": 0, "1": 0}
                and _value(s, "moesif_beam_batches_in_flight") == 0
            ),
            "every record sent and the lag back to 0",
        )
        samples = _samples(text)
        assert _value(samples, "moesif_beam_read_total", pipeline="events", source="kafka") == 20
        assert _value(samples, "moesif_beam_dead_letters_total") == 0
        assert (_value(samples, "moesif_beam_retries_total") or 0) >= 1
        assert _value(samples, "moesif_beam_retries_exhausted_total") == 0
        assert _value(samples, "moesif_beam_kafka_log_end_offset", partition="0") == 10
        assert _value(samples, "moesif_beam_kafka_committed_offset", partition="1") == 10
        # The latency histogram: the posts that got a 2xx, in cumulative buckets.
        ok_count = _value(samples, "moesif_beam_batch_post_seconds_count", outcome="2xx")
        assert ok_count is not None and ok_count >= 1
        assert (
            _value(samples, "moesif_beam_batch_post_seconds_bucket", outcome="2xx", le="+Inf")
            == ok_count
        )
        assert (_value(samples, "moesif_beam_batch_post_seconds_sum", outcome="2xx") or 0) > 0
        # The application id is in no name, label or help text.
        assert APP_ID not in text

        status, body = _get(f"{stream.url}/healthz")
        assert (status, json.loads(body)["state"]) == (200, "RUNNING")
        assert _get(f"{stream.url}/live")[0] == 200
        assert _get(f"{stream.url}/nothing-here")[0] == 404
    finally:
        try:
            summary = stream.drain()
        finally:
            stream.kill()
    # The endpoint and the summary agree.
    assert summary["sent"] == len(ids)
    assert committed(bootstrap, "scraped", topic, 2) == [10, 10]


@pytest.mark.integration
def test_a_busy_metrics_port_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = run_cli(
            [
                "events",
                "--input",
                str(SAMPLE),
                "--output_dir",
                str(tmp_path / "out"),
                "--metrics_port",
                str(port),
            ]
        )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert f"--metrics_port {port}: 127.0.0.1:{port} is already in use" in lines[0]
    assert not (tmp_path / "out" / "events").exists()  # nothing was read or sent


@pytest.mark.integration
def test_a_bounded_run_with_an_endpoint_finishes_as_without(tmp_path):
    run = run_cli(
        [
            "events",
            "--input",
            str(SAMPLE),
            "--output_dir",
            str(tmp_path / "out"),
            "--metrics_port",
            "0",
        ],
        metrics=tmp_path / "m.json",
    )
    assert run.returncode == 0, run.stderr
    assert "metrics on http://127.0.0.1:" in run.stderr
    assert (
        run.metrics["read"]
        == run.metrics["sent"] + run.metrics["duplicates"] + run.metrics["dead_letters"]
    )
