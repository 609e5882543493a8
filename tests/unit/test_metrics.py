"""The metrics endpoint's pure pieces, and the endpoint itself, in this process, over HTTP."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from apache_beam.metrics.execution import MetricKey, MetricResult
from apache_beam.metrics.metricbase import MetricName
from apache_beam.options.pipeline_options import PipelineOptions
from prometheus_client.parser import text_string_to_metric_families

from moesif_beam.pipelines.config import PipelineConfig
from moesif_beam.runners.kafka_lag import KafkaLag, consumer_lag
from moesif_beam.runners.metrics import RunMetrics, counter_help, liveness
from moesif_beam.runners.progress import counts_visible
from moesif_beam.transforms.common import live
from moesif_beam.transforms.common.counters import NAMESPACE, counter
from moesif_beam.transforms.common.worker_tallies import RunTally, encode_tally
from moesif_beam.transforms.sources.kafka import KafkaSourceConfig


def test_lag_counts_from_the_committed_offset_else_from_where_the_run_started():
    assert consumer_lag(end=120, committed=100, start=0) == 20
    assert consumer_lag(end=120, committed=-1001, start=90) == 30  # nothing committed yet
    assert consumer_lag(end=50, committed=80, start=0) == 0  # a truncated log has no lag


def test_kafka_lag_refuses_a_nonpositive_interval():
    config = KafkaSourceConfig("127.0.0.1:9", "t", "g")
    with pytest.raises(ValueError, match="positive"):
        KafkaLag(config, {}, interval=0)


@pytest.mark.parametrize(
    ("state", "draining", "status", "body"),
    [
        (None, False, 200, {"status": "ok", "state": "STARTING"}),
        ("RUNNING", True, 200, {"status": "ok", "state": "RUNNING", "draining": True}),
        ("DONE", False, 200, {"status": "ok", "state": "DONE"}),
        ("FAILED", False, 503, {"status": "failing", "state": "FAILED"}),
        ("CANCELLED", False, 503, {"status": "failing", "state": "CANCELLED"}),
        ("UNREACHABLE", False, 503, {"status": "failing", "state": "UNREACHABLE"}),
    ],
)
def test_liveness(state, draining, status, body):
    assert liveness(state, draining=draining) == (status, body)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (201, "2xx"),
        (307, "3xx"),
        (400, "4xx"),
        (503, "5xx"),
        (None, "no_response"),
        (0, "no_response"),
    ],
)
def test_outcome_of(status, outcome):
    assert live.outcome_of(status) == outcome


def test_latency_snapshots_are_cumulative_and_subtract():
    before = live.post_latency().get("5xx")
    live.observe_post(0.003, 503)  # first bucket
    live.observe_post(0.3, 502)  # le 0.5
    live.observe_post(120.0, 500)  # over the largest bound: +Inf only
    now = live.post_latency()["5xx"].minus(before)
    assert now.count == 3
    assert now.total == pytest.approx(120.303)
    cumulative = dict(now.cumulative())
    assert (cumulative["0.005"], cumulative["0.25"], cumulative["0.5"]) == (1, 1, 2)
    assert (cumulative["60.0"], cumulative["+Inf"]) == (2, 3)


def test_a_batch_in_flight_is_counted_until_its_delivery_ends_even_by_an_error():
    base = live.in_flight()
    with pytest.raises(RuntimeError), live.delivering():
        assert live.in_flight() == base + 1
        raise RuntimeError("the collector refused the id")
    assert live.in_flight() == base


def _config() -> PipelineConfig:
    return PipelineConfig(pipeline="events", input="in/*.jsonl", input_format="wso2")


@pytest.fixture
def endpoint() -> Iterator[RunMetrics]:
    metrics = RunMetrics(_config(), port=0).start()  # the default host
    try:
        yield metrics
    finally:
        metrics.stop()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _scrape(metrics: RunMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, text = _get(f"{metrics.url}/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


LABELS = frozenset({("pipeline", "events"), ("source", "files")})


def test_the_endpoint_listens_on_loopback_by_default(endpoint):
    assert endpoint.url.startswith("http://127.0.0.1:")


def test_counters_are_this_runs_share_of_the_tally_when_the_workers_run_here():
    counter("sent").inc(5)  # an earlier run in this process: not this run's
    with RunMetrics(_config(), port=0) as endpoint:
        assert _scrape(endpoint)[("moesif_beam_sent_total", LABELS)] == 0  # runner not chosen
        endpoint.workers_here(True)
        assert _scrape(endpoint)[("moesif_beam_sent_total", LABELS)] == 0
        counter("sent").inc(3)
        counter("retries_exhausted").inc(2)
        samples = _scrape(endpoint)
    assert samples[("moesif_beam_sent_total", LABELS)] == 3
    assert samples[("moesif_beam_retries_exhausted_total", LABELS)] == 2
    assert samples[("moesif_beam_read_total", LABELS)] == 0  # every counter, zero or not
    assert ("moesif_beam_batches_in_flight", LABELS) in samples


def test_latency_is_served_for_posts_made_since_the_endpoint_started(endpoint):
    endpoint.workers_here(True)
    live.observe_post(0.02, 201)
    samples = _scrape(endpoint)
    ok = LABELS | {("outcome", "2xx")}
    assert samples[("moesif_beam_batch_post_seconds_count", ok)] == 1
    assert samples[("moesif_beam_batch_post_seconds_bucket", ok | {("le", "0.025")})] == 1
    assert samples[("moesif_beam_batch_post_seconds_bucket", ok | {("le", "0.01")})] == 0


class _RunnerMetrics:
    def __init__(self, sent: int) -> None:
        self._sent = sent

    def query(self, _filter: Any = None) -> dict[str, list[MetricResult]]:
        key = MetricKey("Deliver", MetricName(NAMESPACE, "sent"))
        return {"counters": [MetricResult(key, None, self._sent)]}


class _Result:
    def __init__(self, sent: int, state: str = "RUNNING") -> None:
        self._metrics = _RunnerMetrics(sent)
        self._state = state

    def metrics(self) -> _RunnerMetrics:
        return self._metrics

    @property
    def state(self) -> str:
        if self._state == "gone":
            msg = "job service unavailable"
            raise ConnectionError(msg)
        return self._state


def test_workers_elsewhere_serve_the_runners_metrics_and_no_histogram(endpoint):
    endpoint.workers_here(False)
    assert _scrape(endpoint)[("moesif_beam_sent_total", LABELS)] == 0  # no job yet
    endpoint.watch(_Result(sent=42))
    samples = _scrape(endpoint)
    assert samples[("moesif_beam_sent_total", LABELS)] == 42
    assert not any(name.startswith("moesif_beam_batch_post_seconds") for name, _ in samples)
    assert ("moesif_beam_batches_in_flight", LABELS) not in samples


def test_workers_in_local_processes_serve_their_published_tallies(endpoint, tmp_path):
    tally = RunTally(str(tmp_path))
    for pid, sent in ((11, 40), (12, 2)):
        (tmp_path / f"tally-{pid}.json").write_text(
            encode_tally(tally.run, pid, {"sent": sent, "bytes_read": 9, "users_sent": 1})
        )
    (tmp_path / "tally-13.json").write_text(encode_tally("another-run", 13, {"sent": 500}))
    endpoint.workers_here(False)
    endpoint.read_tally(tally)
    endpoint.watch(_Result(sent=7))  # the runner's (end-of-run) answer is not asked
    samples = _scrape(endpoint)
    assert samples[("moesif_beam_sent_total", LABELS)] == 42
    assert samples[("moesif_beam_users_sent_total", LABELS)] == 2  # a pipeline's own counter
    assert samples[("moesif_beam_read_total", LABELS)] == 0  # every counter, zero or not
    assert not any(name.startswith("moesif_beam_bytes_read") for name, _ in samples)
    assert not any(name.startswith("moesif_beam_batch_post_seconds") for name, _ in samples)


def test_liveness_follows_the_job(endpoint):
    assert _get(f"{endpoint.url}/healthz") == (200, '{"status": "ok", "state": "STARTING"}\n')
    endpoint.watch(_Result(0, "RUNNING"))
    assert _get(f"{endpoint.url}/live")[0] == 200
    endpoint.watch(_Result(0, "FAILED"))
    status, body = _get(f"{endpoint.url}/healthz")
    assert (status, json.loads(body)["state"]) == (503, "FAILED")
    endpoint.watch(_Result(0, "gone"))
    status, body = _get(f"{endpoint.url}/healthz")
    assert (status, json.loads(body)["state"]) == (503, "UNREACHABLE")


def test_a_busy_port_is_one_line_naming_the_flag():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError) as caught:
            RunMetrics(_config(), port=port).start()
    assert str(caught.value) == (
        f"--metrics_port {port}: 127.0.0.1:{port} is already in use; choose another port"
    )


@pytest.mark.parametrize(
    ("host", "port", "match"), [("", 9100, "empty"), ("127.0.0.1", 70000, "65535")]
)
def test_bad_addresses_are_refused_before_binding(host, port, match):
    with pytest.raises(ValueError, match=match):
        RunMetrics(_config(), host=host, port=port)


def test_an_unresolvable_host_is_one_line():
    with pytest.raises(
        ValueError, match=r"--metrics_host 'no-such-host\.invalid' cannot be resolved"
    ):
        RunMetrics(_config(), host="no-such-host.invalid", port=0).start()


@pytest.mark.parametrize(
    ("flags", "visible"),
    [
        (["--runner=FnApiRunner"], True),
        (["--runner=FnApiRunner", "--direct_running_mode=multi_processing"], False),
        (["--runner=PortableRunner", "--environment_type=LOOPBACK"], True),  # Prism's way
        (["--runner=PortableRunner", "--environment_type=EXTERNAL"], False),
        (["--runner=FlinkRunner"], True),  # embedded [auto]: Beam picks LOOPBACK
        (["--runner=FlinkRunner", "--flink_master=[local]"], True),
        (["--runner=FlinkRunner", "--flink_master=127.0.0.1:8081"], False),
        (["--runner=DataflowRunner"], False),
    ],
)
def test_counts_are_read_here_only_where_every_worker_runs_here(flags, visible):
    assert counts_visible(PipelineOptions(flags)) is visible


def test_help_says_what_sent_counts_in_each_pipeline():
    # profiles' "sent" is the records its rollups took in, not anything a collector took.
    assert "collector accepted" in counter_help("sent", "events")
    assert "rollups" in counter_help("sent", "profiles")
    assert "collector" not in counter_help("sent", "profiles")
    assert counter_help("read", "profiles") == counter_help("read", "events")
