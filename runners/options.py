"""The command's flags, their defaults (taken from the config, written once), and Beam's options.

Flags are Beam-style ``--snake_case``. Their defaults come from the fields of
:class:`~moesif_beam.pipelines.config.PipelineConfig` (and the retry policy's and the Kafka
source's), so each default is written in one place; validation is the config's own. Flags
the command does not know are Beam pipeline options: the chosen runner is resolved first
(importing it registers its own options, ``--dask_client_address`` and the like), then
every remaining flag must be one some Beam options class declares.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from apache_beam.options.pipeline_options import (
    PipelineOptions,
    StandardOptions,
    _BeamArgumentParser,
)

from moesif_beam.pipelines.config import PipelineConfig
from moesif_beam.runners.logs import LOG_FORMATS
from moesif_beam.runners.metrics import DEFAULT_METRICS_HOST
from moesif_beam.transforms.delivery import RetryPolicy
from moesif_beam.transforms.formats.normalize import FORMATS
from moesif_beam.transforms.schema import SCOPES
from moesif_beam.transforms.sources.files import RANGE_BYTES, splittable
from moesif_beam.transforms.sources.kafka import KafkaSourceConfig

__all__ = [
    "DEFAULTS",
    "ArgumentParser",
    "UsageError",
    "add_delivery_flags",
    "add_schema_flags",
    "beam_options",
    "check_beam_args",
    "has_runner",
    "local_parallelism",
    "runs_locally",
    "wants_streaming",
]


class UsageError(Exception):
    """A bad flag or option: one line on stderr, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line, naming the command and its --help."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        raise SystemExit(2)


def _defaults() -> dict[str, Any]:
    values: dict[str, Any] = {}
    for cls in (PipelineConfig, RetryPolicy, KafkaSourceConfig):
        for spec in dataclasses.fields(cls):
            if spec.default is not dataclasses.MISSING:
                values.setdefault(spec.name, spec.default)
    return values


# Every flag's default, by the config field it sets.
DEFAULTS = _defaults()

_DEFAULT_FORMAT = {"events": "wso2", "actions": "moesif", "profiles": "wso2"}
_FORMAT_HELP = {
    "events": "input format (default wso2: WSO2 API Manager analytics events; kong, aws, "
    "tyk, azure, apigee, envoy, nginx: those gateways' logs; auto: decided per record)",
    "actions": "input format (default moesif: Collector API action JSON, one action or an "
    "array per line; segment: Segment track calls)",
    "profiles": "input format: any events format (default wso2), moesif (actions), or "
    "segment (Segment identify and group calls, upserted as they are)",
}


def _header_names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def add_identity_flags(group: Any) -> None:
    """The flags that choose identities and masked headers, for every events format."""
    d = DEFAULTS
    group.add_argument(
        "--user_id_field",
        help="field (a dotted path) or header:NAME whose value becomes user_id, instead of "
        "the format's own (see the README's tables)",
    )
    group.add_argument(
        "--session_token_field",
        help="field (a dotted path) or header:NAME whose value becomes session_token",
    )
    group.add_argument(
        "--user_id_jwt_claim",
        nargs="?",
        const="sub",
        metavar="CLAIM",
        help="take user_id from this claim (sub when the flag is given alone) of a Bearer "
        "JWT in the Authorization header when --user_id_field gives none; decoded, never "
        "verified or logged",
    )
    group.add_argument(
        "--mask_headers",
        type=_header_names,
        default=d["mask_headers"],
        metavar="NAMES",
        help="comma-separated request and response headers whose values are masked, in "
        f"headers and in metadata (default {','.join(d['mask_headers'])}); these names and "
        "apikey, api_key, key, access_token, token, subscription-key are also masked as "
        "query parameters of the uri and of URLs and query strings in metadata; an empty "
        "string masks none",
    )


def add_delivery_flags(parser: argparse.ArgumentParser, pipeline: str) -> None:
    """The flags of ``events`` and ``actions``."""
    d = DEFAULTS
    source = parser.add_argument_group("source")
    source.add_argument("--input", help="file glob of JSON-lines files; .gz files are read too")
    source.add_argument(
        "--follow",
        action="store_true",
        help="keep watching --input for new files (a streaming run; Logstash-style shipping)",
    )
    source.add_argument(
        "--follow_interval",
        type=float,
        default=d["follow_interval"],
        help="seconds between looks for new files",
    )
    source.add_argument(
        "--source", default="files", choices=["files", "kafka"], help="where records come from"
    )
    source.add_argument("--kafka_bootstrap_servers", help="host:port[,host:port]")
    source.add_argument("--kafka_topic", help="the topic to read")
    source.add_argument(
        "--kafka_group_id",
        help="consumer group: where a read resumes, and where offsets are committed once "
        "their records are delivered or dead-lettered",
    )
    source.add_argument(
        "--kafka_start",
        default=d["start"],
        help="earliest, latest or an ISO 8601 time: where partitions without a committed "
        f"offset start (default {d['start']})",
    )
    source.add_argument(
        "--kafka_discovery_interval",
        type=float,
        default=d["discovery_interval"],
        help="streaming: seconds between looks for partitions added to the topic",
    )
    source.add_argument(
        "--kafka_stop",
        help="now or an ISO 8601 time: read up to it and finish (a backfill); without it "
        "the read is unbounded",
    )
    source.add_argument(
        "--format",
        dest="input_format",
        default=_DEFAULT_FORMAT[pipeline],
        choices=sorted(FORMATS[pipeline]),
        help=_FORMAT_HELP[pipeline],
    )
    source.add_argument(
        "--max_line_bytes",
        type=int,
        default=d["max_line_bytes"],
        help=f"longest input line or Kafka message read (default {d['max_line_bytes']:,}); "
        "a longer one is a too_large dead letter",
    )
    source.add_argument(
        "--company_id_field",
        help="field whose value becomes company_id (events: a dotted path, looked up at the "
        "top level, then in properties for wso2, or header:NAME for a request header; "
        "actions: metadata, when the action has none)",
    )
    if pipeline in ("events", "profiles"):
        add_identity_flags(source)
    sink = parser.add_argument_group("sink")
    sink.add_argument(
        "--moesif_application_id",
        help="Moesif application id (or env MOESIF_APPLICATION_ID); without one, batches "
        "are written to files under --output_dir",
    )
    sink.add_argument("--moesif_base_url", default=d["base_url"], help="collector base URL")
    sink.add_argument(
        "--ca_bundle",
        default=d["ca_bundle"],
        metavar="PATH",
        help="PEM file of CA certificates to trust for the collector (a private CA)",
    )
    sink.add_argument("--output_dir", default=d["output_dir"], help="batch files and dead letters")
    sink.add_argument("--dead_letter", default=d["dead_letter"], help="dead-letter directory")
    sink.add_argument("--metrics_out", help="write the run's counters as JSON to this path")
    metrics = parser.add_argument_group("metrics endpoint")
    metrics.add_argument(
        "--metrics_port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on this port while the run is on: /metrics (every "
        "counter, Kafka consumer lag, post latency, batches in flight) and /healthz",
    )
    metrics.add_argument(
        "--metrics_host",
        default=DEFAULT_METRICS_HOST,
        help=f"address the metrics endpoint listens on (default {DEFAULT_METRICS_HOST}, "
        "this machine only; 0.0.0.0 for every interface)",
    )
    add_schema_flags(parser)
    batching = parser.add_argument_group("batching and retries")
    batching.add_argument(
        "--batch_max_events", type=int, default=d["batch_max_events"], help="records per batch"
    )
    batching.add_argument(
        "--batch_max_bytes",
        type=int,
        default=d["batch_max_bytes"],
        help="bytes of uncompressed JSON",
    )
    batching.add_argument(
        "--batch_max_delay",
        type=float,
        default=d["batch_max_delay"],
        help="seconds (streaming runs)",
    )
    batching.add_argument(
        "--max_retry_seconds",
        type=float,
        default=d["max_retry_seconds"],
        help="retry budget per batch, and for the whole run while the collector fails "
        "without a break",
    )
    batching.add_argument(
        "--http_timeout", type=float, default=d["http_timeout"], help="seconds per request"
    )
    batching.add_argument(
        "--gzip_level", type=int, default=d["gzip_level"], help="batch compression, 0 to 9"
    )
    batching.add_argument(
        "--max_in_flight",
        type=int,
        default=d["max_in_flight"],
        help="batches each worker compresses and posts at once while it goes on batching",
    )
    batching.add_argument(
        "--dedup_ttl",
        type=float,
        default=d["dedup_ttl"],
        help="streaming: seconds (of event time) a transaction id is remembered",
    )
    batching.add_argument(
        "--dedup_journal",
        default=d["dedup_journal"],
        help="streaming: where delivered transaction ids are journaled, so a restarted "
        "stream still drops their copies within --dedup_ttl; any Beam filesystem the "
        "workers share (default <output_dir>/.delivered-ids/<pipeline>-<destination>)",
    )
    batching.add_argument(
        "--drain_timeout",
        type=float,
        default=d["drain_timeout"],
        help="streaming: seconds a drain (SIGTERM, Ctrl-C) may take; records not delivered "
        "by then are not committed, and are read again on restart (exit code 4)",
    )
    batching.add_argument(
        "--parse_processes",
        type=int,
        default=None,
        help="streaming on the default runner: worker processes that read (Kafka), parse, "
        "map and deliver records beside the pipeline's own (default: one per core, 1 to 4; "
        "0: all in the pipeline's process)",
    )
    parser.add_argument(
        "--fork_workers",
        action="store_true",
        help="the default: bounded local runs with several worker processes fork them from "
        "this process instead of starting each as a new Python (saves about 2 s of CPU per "
        "worker; Linux, else they are started)",
    )
    parser.add_argument(
        "--start_workers",
        action="store_true",
        help="bounded local runs start their worker processes as Beam does (a new Python "
        "each) instead of forking them",
    )
    parser.add_argument(
        "--log_level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    parser.add_argument(
        "--log_format",
        default="text",
        choices=list(LOG_FORMATS),
        help="json: one JSON object per log line (time, level, logger, message, exception)",
    )
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        dest="progress",
        action="store_const",
        const=True,
        default=None,
        help="bounded runs: show a live progress line on stderr even when it is not a "
        "terminal (by default, only on a terminal)",
    )
    progress.add_argument(
        "--no_progress",
        dest="progress",
        action="store_const",
        const=False,
        help="never show the progress line",
    )


def add_schema_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that name the persisted metadata type schema."""
    group = parser.add_argument_group("metadata type schema")
    group.add_argument(
        "--schema_store",
        default=DEFAULTS["schema_store"],
        help="persisted metadata type schema, JSON on any Beam filesystem (default "
        "<output_dir>/metadata_schema.json, shared by events and actions)",
    )
    group.add_argument(
        "--schema_scope",
        default=DEFAULTS["schema_scope"],
        choices=list(SCOPES),
        help="track a key's type by its name at any depth (Moesif's rule, default) or by "
        "its full path",
    )


def _runner_name(beam_args: Sequence[str]) -> str | None:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--runner")
    known, _ = parser.parse_known_args(list(beam_args))
    return known.runner


def check_beam_args(beam_args: Sequence[str]) -> None:
    """Resolve the chosen runner, then check every Beam flag and its value.

    Importing the runner registers its own options classes, so they are accepted when
    (and only when) their runner is chosen or already imported.

    Raises:
        UsageError: an unknown runner, a runner that cannot be used here (a missing extra),
            an unknown flag, or a value a flag refuses; one line each.
    """
    name = _runner_name(beam_args)
    if name:
        from apache_beam.runners.runner import create_runner  # noqa: PLC0415

        try:
            create_runner(name)
        except ValueError:
            msg = (
                f"unknown --runner {name!r}: give a Beam runner's name (DirectRunner, "
                "FnApiRunner, PrismRunner, FlinkRunner, PortableRunner, DataflowRunner, "
                "...) or the dotted path of a PipelineRunner subclass"
            )
            raise UsageError(msg) from None
        except ImportError as exc:
            msg = f"--runner {name} cannot be used here: {str(exc).splitlines()[0]}"
            raise UsageError(msg) from None
        if name.rsplit(".", 1)[-1].lower() in ("dataflowrunner", "testdataflowrunner"):
            _check_dataflow_extra(name)
        if name.rsplit(".", 1)[-1].lower() == "flinkrunner":
            # Declares the Java runner's options (checkpointing, state, savepoints).
            from moesif_beam.runners.engines import flink_options  # noqa: F401, PLC0415
    unknown = _unknown_beam_args(beam_args)
    if unknown:
        msg = f"unknown option(s): {' '.join(unknown)}"
        raise UsageError(msg)


def _check_dataflow_extra(name: str) -> None:
    """The Dataflow runner imports its client libraries only when it runs: check them now."""
    try:
        from apache_beam.runners.dataflow.internal import apiclient  # noqa: F401, PLC0415
    except ImportError:
        msg = (
            f"--runner {name} cannot be used here: it needs Beam's Google Cloud libraries; "
            "install them with: pip install 'moesif-beam[dataflow]'"
        )
        raise UsageError(msg) from None


class _Refusal(Exception):
    pass


class _CheckingParser(_BeamArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Refusal(message)


def _unknown_beam_args(beam_args: Sequence[str]) -> list[str]:
    """The flags in ``beam_args`` that no Beam options class declares.

    Raises:
        UsageError: a known flag got a value it refuses (a bad choice, not a number).
    """
    parser = _CheckingParser(allow_abbrev=False, conflict_handler="resolve")
    seen: set[type] = set()
    pending = list(PipelineOptions.__subclasses__())
    while pending:
        cls = pending.pop()
        if cls in seen:
            continue
        seen.add(cls)
        pending.extend(cls.__subclasses__())
        cls._add_argparse_args(parser)
    try:
        _, unknown = parser.parse_known_args(list(beam_args))
    except _Refusal as exc:
        raise UsageError(str(exc)) from None
    return [arg for arg in unknown if arg.startswith("-")]


def wants_streaming(beam_args: list[str]) -> bool:
    """Whether Beam's own ``--streaming`` was given."""
    return bool(PipelineOptions(beam_args).view_as(StandardOptions).streaming)


def has_runner(beam_args: list[str]) -> bool:
    """Whether the user chose a runner."""
    return any(arg == "--runner" or arg.startswith("--runner=") for arg in beam_args)


# Runners whose shuffle lives in this machine's memory; bounded runs on them spill the
# dedup to files instead (see transforms/dedup/bounded.py).
_LOCAL_RUNNERS = frozenset(
    {
        "FnApiRunner",
        "LocalRunner",
        "DirectRunner",
        "SwitchingDirectRunner",
        "BundleBasedDirectRunner",
    }
)


def runs_locally(beam_args: list[str]) -> bool:
    """Whether the run's workers run on this machine, with an in-memory shuffle."""
    runner = PipelineOptions(beam_args).view_as(StandardOptions).runner
    return runner is None or str(runner).rsplit(".", 1)[-1] in _LOCAL_RUNNERS


# A bounded local run over at least this much splittable input runs its workers as
# processes, one per core. Measured on 2 cores with forked workers (runners/engines/
# local_workers.py): at 40 MB two processes took 9.2-9.5 s against 10.9-12.8 s for one;
# at 17 MB the two were even; below that a second process has too little to do.
PARALLEL_INPUT_BYTES = 4 * RANGE_BYTES
_MAX_LOCAL_WORKERS = 4


def stream_parse_processes() -> int:
    """Parsing processes for a stream on the default runner: one per core, 1 to 4.

    Measured on 2 cores, draining a Kafka backlog read in blocks: two parsing processes
    beside the stream's own gave 13,000 events/s, one 9,800 and three 12,000 (the
    stream's own process, reading, deduplicating and delivering, used about half a core).
    """
    return max(1, min(_MAX_LOCAL_WORKERS, os.cpu_count() or 1))


def local_parallelism(beam_args: list[str], paths: list[str]) -> list[str]:
    """Worker flags for a bounded local run the user did not size (see the README)."""
    if not runs_locally(beam_args):
        return []
    if any(arg.startswith(("--direct_num_workers", "--direct_running_mode")) for arg in beam_args):
        return []
    cores = min(os.cpu_count() or 1, _MAX_LOCAL_WORKERS)
    size = sum(os.path.getsize(p) for p in paths if splittable(p))
    if cores < 2 or size < PARALLEL_INPUT_BYTES:
        return []
    return [f"--direct_num_workers={cores}", "--direct_running_mode=multi_processing"]


class _RunOptions(PipelineOptions):
    """PipelineOptions whose views are made once per options class.

    Beam asks for a view at every transform it applies, and each view parses the flags
    again: half of building our pipeline's graph (0.55 s of it, measured). Views share
    one store of values, so a view made once reads and writes what a new one would.
    """

    def view_as(self, cls: type[Any]) -> Any:
        views = self.__dict__.setdefault("_views", {})
        view = views.get(cls)
        if view is None:
            view = views[cls] = super().view_as(cls)
        return view


def beam_options(beam_args: list[str], *, streaming: bool, default_runner: str) -> PipelineOptions:
    """The run's Beam options: the user's, ``--streaming`` when the run is, and a runner."""
    if streaming and "--streaming" not in beam_args:
        beam_args = [*beam_args, "--streaming"]
    if not has_runner(beam_args):
        beam_args = [f"--runner={default_runner}", *beam_args]
    return _RunOptions(beam_args)
