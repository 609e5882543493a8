"""The run's Prometheus endpoint (``--metrics_port``): counters, Kafka lag, latency, liveness.

Served by the launcher, from a thread of its own, on ``--metrics_host`` (127.0.0.1 unless
told otherwise), with the standard client library's exposition:

- ``/metrics``: every counter of the summary as ``moesif_beam_<counter>`` (a Prometheus
  counter, so its sample is ``moesif_beam_<counter>_total``), labelled ``pipeline`` and
  ``source`` (``kafka`` or ``files``); for Kafka, the consumer lag, log end offset and
  committed offset per partition (runners/kafka_lag.py); the batch post latency histogram
  ``moesif_beam_batch_post_seconds`` (by ``outcome``) and the gauge
  ``moesif_beam_batches_in_flight``.
- ``/healthz`` (also ``/live``): liveness. 200 while the run is starting, running or
  draining; 503 once the runner says the job failed or was cancelled, or its job service
  stops answering.

Where the numbers come from depends on where the workers run:

- In this process (the default streaming runner, Prism with LOOPBACK workers; the default
  bounded runner without ``multi_processing``): the counters are this process's tally
  (transforms/common/counters.py), the same one the progress line and the summary read,
  taken since the endpoint started; latency and batches in flight are the sink's own
  measurements (transforms/common/live.py).
- In worker processes of the local runner (``multi_processing``, forked or started by
  Beam): the counters are the sum of the tallies the workers publish in the run's
  directory every half second (transforms/common/worker_tallies.py), read at each scrape.
  The latency histogram and batches in flight are not served: they are measured in the
  workers, which publish only their counters.
- Elsewhere (Flink clusters, Dataflow): the counters are what the runner reports for the
  job while it runs, asked for at most once a second; before the runner has the job, and
  on runners that report nothing until the end, they stay at zero. The latency histogram
  and batches in flight are not served.

Labels name the pipeline, the source, the topic and partition, and an HTTP outcome class:
never the application id, a URL or a path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from socketserver import ThreadingMixIn
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from moesif_beam.pipelines.config import PipelineConfig
from moesif_beam.runners.kafka_lag import KafkaLag
from moesif_beam.runners.launch import sum_counters
from moesif_beam.transforms.common.counters import (
    COUNTERS,
    EXTRA_COUNTERS,
    PROGRESS_COUNTERS,
    local_tally,
    tally_names,
)
from moesif_beam.transforms.common.live import LatencySnapshot, in_flight, post_latency
from moesif_beam.transforms.common.worker_tallies import RunTally
from moesif_beam.transforms.sources.drain import DRAIN

__all__ = [
    "DEFAULT_METRICS_HOST",
    "LIVENESS_PATHS",
    "RunMetrics",
    "counter_help",
    "liveness",
    "runner_metrics",
]

DEFAULT_METRICS_HOST = "127.0.0.1"
LIVENESS_PATHS = ("/healthz", "/live")
PREFIX = "moesif_beam_"
# Asking a runner for its metrics is an RPC to its job service (or Dataflow's API): at
# most once a second, however often the endpoint is scraped.
RUNNER_POLL_S = 1.0
RUNNER_TIMEOUT_S = 5.0

_HELP = {
    "read": "Records read from the source.",
    "parse_errors": "Input records that could not be parsed (dead-lettered).",
    "invalid": "Records that are not valid Moesif records (dead-lettered).",
    "type_conflicts": "Records whose metadata changed a key's type (dead-lettered).",
    "duplicates": "Records dropped as duplicates of a transaction id already seen.",
    "sent": "Records the collector accepted (or written to batch files).",
    "batches": "Batches delivered.",
    "bytes_sent": "Bytes of delivered batch bodies, compressed.",
    "retries": "Retried posts of a batch (408, 429, 5xx, no answer).",
    "collector_rejected": "Records the collector refused with 400 (dead-lettered).",
    "dead_letters": "Records written to the dead-letter sink, all reasons.",
    "too_large": "Records over a size limit (dead-lettered).",
    "retries_exhausted": "Records whose batch ran out of retry time (dead-lettered).",
    "internal_errors": "Records a stage failed on unexpectedly (dead-lettered).",
    "unreadable_inputs": "Input files that could not be read (dead-lettered).",
    "timeouts": "Posts that got no answer within --http_timeout (re-posted).",
    "skipped": "Input lines holding no records (CloudWatch Logs control messages), not read.",
}
# Where profiles count something else under the same name: its "sent" is the records its
# rollups took in; what was delivered is users_sent, companies_sent and segment_sent.
_PROFILES_HELP = {
    "sent": "Records the profile rollups took in (deliveries: users_sent, companies_sent, "
    "segment_sent).",
}
# Job states past which the run is not alive (Beam's PipelineState names).
_DEAD_STATES = frozenset({"FAILED", "CANCELLED", "CANCELLING", "UNRECOGNIZED"})


def counter_help(name: str, pipeline: str = "") -> str:
    """The HELP text of counter ``name`` in ``pipeline``'s run."""
    if pipeline == "profiles" and name in _PROFILES_HELP:
        return _PROFILES_HELP[name]
    return _HELP.get(name, f"The {name} counter of the summary.")


def liveness(state: str | None, *, draining: bool) -> tuple[int, dict[str, Any]]:
    """The liveness answer: HTTP status and JSON body.

    Args:
        state: the runner's job state (``RUNNING``, ``DONE``...), None before the runner
            has the job, or ``UNREACHABLE`` when its job service did not answer.
        draining: a drain (SIGTERM, Ctrl-C) is under way.
    """
    alive = state not in _DEAD_STATES and state != "UNREACHABLE"
    body: dict[str, Any] = {"status": "ok" if alive else "failing", "state": state or "STARTING"}
    if draining:
        body["draining"] = True
    return (200 if alive else 503), body


def runner_metrics(result: Any) -> Any:
    """The runner's ``MetricResults`` for the job as it is now.

    A portable runner's result (Prism, Flink) caches its first answer, so its job service
    is asked directly; other results (Dataflow's) ask afresh on every call.
    """
    service = getattr(result, "_job_service", None)
    job_id = getattr(result, "_job_id", None)
    if service is None or job_id is None:
        return result.metrics()
    from apache_beam.portability.api import beam_job_api_pb2  # noqa: PLC0415
    from apache_beam.runners.portability.portable_runner import PortableMetrics  # noqa: PLC0415

    request = beam_job_api_pb2.GetJobMetricsRequest(job_id=job_id)
    # Bounded, so a job service that hangs cannot hold a scrape (or the next) for long.
    return PortableMetrics(service.GetJobMetrics(request, timeout=RUNNER_TIMEOUT_S))


class _Sources:
    """Where the families' numbers come from, for one run (see the module docstring)."""

    def __init__(self) -> None:
        # Unknown until the runner is chosen; until then the counters are zero.
        self.workers_here: bool | None = None
        # The run's tally, where its worker processes publish their counts.
        self.tally: RunTally | None = None
        self._lock = threading.Lock()
        self._result: Any = None
        self._runner_counts = dict.fromkeys((*COUNTERS, *EXTRA_COUNTERS), 0)
        self._asked_at = float("-inf")
        # The tally and the latency are process-wide: serve what this run adds to them.
        self._tally_base = local_tally()
        self._latency_base = post_latency()

    def watch(self, result: Any) -> None:
        with self._lock:
            self._result = result

    def result(self) -> Any:
        with self._lock:
            return self._result

    def counts(self) -> dict[str, int]:
        if self.workers_here is None:
            return dict.fromkeys((*COUNTERS, *EXTRA_COUNTERS), 0)
        if self.tally is not None:
            counts = dict.fromkeys((*COUNTERS, *EXTRA_COUNTERS), 0)
            counts.update(self.tally.counts())
            return {name: n for name, n in counts.items() if name not in PROGRESS_COUNTERS}
        if self.workers_here:
            # Every counter counted, the summary's and any a pipeline adds (profiles').
            extra = [name for name in tally_names() if name not in PROGRESS_COUNTERS]
            now = local_tally(*extra)
            return {name: now[name] - self._tally_base.get(name, 0) for name in now}
        with self._lock:
            result = self._result
            if result is not None and time.monotonic() - self._asked_at >= RUNNER_POLL_S:
                self._asked_at = time.monotonic()
                # A failed ask keeps the last answer until the next.
                with contextlib.suppress(Exception):
                    self._runner_counts = sum_counters(runner_metrics(result))
            return dict(self._runner_counts)

    def latency(self) -> dict[str, LatencySnapshot]:
        return {
            outcome: snapshot.minus(self._latency_base.get(outcome))
            for outcome, snapshot in post_latency().items()
        }


class _RunCollector:
    """The families of one run, built at every scrape (a prometheus_client collector)."""

    def __init__(self, pipeline: str, source: str, sources: _Sources, lag: KafkaLag | None) -> None:
        self._labels = [pipeline, source]
        self._sources = sources
        self._lag = lag

    def collect(self) -> Iterator[Metric]:
        names = ["pipeline", "source"]
        for name, value in self._sources.counts().items():
            family = CounterMetricFamily(
                PREFIX + name, counter_help(name, self._labels[0]), labels=names
            )
            family.add_metric(self._labels, value)
            yield family
        if self._sources.workers_here:
            yield from self._delivery(names)
        if self._lag is not None:
            yield from self._kafka(names)

    def _delivery(self, names: list[str]) -> Iterator[Metric]:
        latency = HistogramMetricFamily(
            PREFIX + "batch_post_seconds",
            "Seconds one POST of a batch body took, every attempt, by outcome (2xx, 3xx, "
            "4xx, 5xx, no_response).",
            labels=[*names, "outcome"],
        )
        for outcome, snapshot in sorted(self._sources.latency().items()):
            latency.add_metric(
                [*self._labels, outcome], snapshot.cumulative(), sum_value=snapshot.total
            )
        yield latency
        gauge = GaugeMetricFamily(
            PREFIX + "batches_in_flight",
            "Batches being compressed, posted or waiting to be retried right now.",
            labels=names,
        )
        gauge.add_metric(self._labels, in_flight())
        yield gauge

    def _kafka(self, names: list[str]) -> Iterator[Metric]:
        assert self._lag is not None
        by_partition = [*names, "topic", "partition"]
        families = {
            "lag": GaugeMetricFamily(
                PREFIX + "kafka_consumer_lag",
                "Records of the partition not done yet: log end offset minus the group's "
                "committed offset (committed only past delivered or dead-lettered records).",
                labels=by_partition,
            ),
            "end": GaugeMetricFamily(
                PREFIX + "kafka_log_end_offset",
                "The partition's log end offset (high watermark).",
                labels=by_partition,
            ),
            "committed": GaugeMetricFamily(
                PREFIX + "kafka_committed_offset",
                "The consumer group's committed offset (-1: none yet).",
                labels=by_partition,
            ),
        }
        for partition, lag in sorted(self._lag.partitions().items()):
            labels = [*self._labels, self._lag.topic, str(partition)]
            families["lag"].add_metric(labels, lag.lag)
            families["end"].add_metric(labels, lag.end)
            families["committed"].add_metric(labels, lag.committed)
        yield from families.values()
        polled_at = self._lag.polled_at
        if polled_at is not None:
            stamp = GaugeMetricFamily(
                PREFIX + "kafka_lag_polled_timestamp_seconds",
                "Unix time of the last successful look at the broker for the lag.",
                labels=[*names, "topic"],
            )
            stamp.add_metric([*self._labels, self._lag.topic], polled_at)
            yield stamp


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """Scrapes are not news: no access log."""


def _address_family(host: str) -> socket.AddressFamily:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        msg = f"--metrics_host {host!r} cannot be resolved"
        raise ValueError(msg) from None
    return infos[0][0]


def _bind(host: str, port: int, app: Callable[..., Iterable[bytes]]) -> _Server:
    class Server(_Server):
        address_family = _address_family(host)

    try:
        return make_server(host, port, app, server_class=Server, handler_class=_QuietHandler)
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            msg = f"--metrics_port {port}: {where} is already in use; choose another port"
        elif exc.errno == errno.EADDRNOTAVAIL:
            msg = f"--metrics_host {host}: not an address of this machine"
        elif exc.errno == errno.EACCES:
            msg = f"--metrics_port {port}: not allowed to listen on {where}"
        else:
            msg = f"--metrics_port {port}: cannot listen on {where}: {exc.strerror or exc}"
        raise ValueError(msg) from None


class RunMetrics:
    """Serves one run's metrics over HTTP from :meth:`start` until :meth:`stop`.

    The endpoint is bound before the run starts, so a port that cannot be had stops the
    command before anything is read. Nothing it serves names the application id.
    """

    def __init__(
        self,
        config: PipelineConfig,
        *,
        host: str = DEFAULT_METRICS_HOST,
        port: int,
        lag: KafkaLag | None = None,
    ) -> None:
        if not host:
            msg = "--metrics_host must not be empty"
            raise ValueError(msg)
        if not 0 <= port <= 65535:
            msg = f"--metrics_port must be between 0 and 65535, got {port}"
            raise ValueError(msg)
        self._host = host
        self._port = port
        self._config = config
        self._sources = _Sources()
        self._lag = lag
        self._registry = CollectorRegistry(auto_describe=False)
        source = "kafka" if config.kafka is not None else "files"
        self._registry.register(_RunCollector(config.pipeline, source, self._sources, lag))
        self._metrics_app = make_wsgi_app(self._registry)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def for_run(cls, config: PipelineConfig, *, host: str, port: int) -> RunMetrics:
        """The endpoint of ``config``'s run, with the Kafka lag when it reads Kafka."""
        lag = None
        if config.kafka is not None:
            starts = {p.partition: p.start for p in config.kafka_partitions}
            lag = KafkaLag(config.kafka, starts)
        return cls(config, host=host, port=port, lag=lag)

    @property
    def url(self) -> str:
        """``http://host:port`` as bound (the port chosen when 0 was asked for)."""
        if self._server is None:
            msg = "the endpoint is not started"
            raise RuntimeError(msg)
        port = self._server.server_address[1]
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{port}"

    def workers_here(self, here: bool) -> None:
        """Say where the workers run, once the runner is chosen (see the module docstring).

        ``here``: every worker runs in this process (``progress.counts_visible``).
        """
        self._sources.workers_here = here

    def read_tally(self, tally: RunTally) -> None:
        """Serve the counters of ``tally``: the run's, where its worker processes publish them."""
        self._sources.tally = tally

    def watch(self, result: Any) -> None:
        """Follow the runner's result: its job state, and its metrics where they are read."""
        self._sources.watch(result)

    def _app(self, environ: Mapping[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in LIVENESS_PATHS:
            status, body = liveness(self._job_state(), draining=DRAIN.is_set())
            start_response(
                f"{status} {'OK' if status == 200 else 'Service Unavailable'}",
                [("Content-Type", "application/json")],
            )
            return [json.dumps(body).encode() + b"\n"]
        if path in ("/", "/metrics"):
            return self._metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /healthz\n"]

    def _job_state(self) -> str | None:
        result = self._sources.result()
        if result is None:
            return None
        try:
            return str(result.state)
        except Exception:  # a job service that does not answer is the news
            return "UNREACHABLE"

    def start(self) -> RunMetrics:
        """Bind and serve; the Kafka lag is looked at once before this returns.

        Raises:
            ValueError: the address cannot be listened on (one line naming the flag).
        """
        self._server = _bind(self._host, self._port, self._app)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="metrics-endpoint",
            daemon=True,
        )
        self._thread.start()
        if self._lag is not None:
            self._lag.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket and the lag's consumer."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join()
        if self._lag is not None:
            self._lag.stop()

    def __enter__(self) -> RunMetrics:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
