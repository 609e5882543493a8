"""The ``moesif-beam`` command: parse flags, build the pipeline, run it, report.

Beam-style ``--snake_case`` flags. Flags this command does not know are handed to Beam as
pipeline options (``--runner``, ``--direct_num_workers``, ``--flink_master``...), after a
check that Beam knows them too, so a typo is an error rather than a silent default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from apache_beam.options.pipeline_options import (
    PipelineOptions,
    StandardOptions,
    _BeamArgumentParser,
)

from moesif_beam.pipelines import actions, events
from moesif_beam.pipelines.config import DEFAULT_BASE_URL, PipelineConfig
from moesif_beam.runners.engines.local_workers import LocalRunner
from moesif_beam.runners.engines.loopback import loopback_grpc_servers
from moesif_beam.runners.engines.prism import PrismServer, ensure_prism
from moesif_beam.runners.engines.run_state import start_run
from moesif_beam.runners.launch import EXIT_COLLECTOR, execute
from moesif_beam.transforms.common.errors import CollectorConfigError
from moesif_beam.transforms.delivery import RetryPolicy, Secret, preflight
from moesif_beam.transforms.formats.normalize import FORMATS
from moesif_beam.transforms.schema import SCOPES, load_schema, save_schema, seed_pairs
from moesif_beam.transforms.sources.files import (
    MAX_LINE_BYTES,
    RANGE_BYTES,
    match_inputs,
    splittable,
)
from moesif_beam.transforms.sources.kafka import KafkaSourceConfig, resolve_partitions

__all__ = ["main"]

EXIT_USAGE = 2

# Streaming runs default to Beam's Prism runner, built from Beam's Go module on first use
# and started as our own job server (runners/prism.py).
# Bounded runs default to Beam's FnApiRunner, chosen rather than reached by accident: the
# DirectRunner would first try to download Prism, and our batch pipelines use nothing
# the FnApiRunner lacks. It honours --direct_num_workers and --direct_running_mode; ours
# (runners/local_workers.py) only forks its multi_processing workers instead of starting
# them, which saves each about 2 s of start-up.
# Imported above, before any work starts a thread: forking is judged against the threads
# that existed then.
DEFAULT_BATCH_RUNNER = f"{LocalRunner.__module__}.{LocalRunner.__name__}"

_USAGE = """usage: moesif-beam COMMAND [options]

commands:
  events      gateway logs -> Moesif /v1/events/batch (--format wso2)
  actions     action streams -> Moesif /v1/actions/batch (--format moesif|segment)
  schema      show or seed the persisted metadata type schema
  collector   a local Moesif Collector API emulator, for tests and trials
  kafka-local a real single-node Apache Kafka broker (KRaft), for laptops and tests

'moesif-beam COMMAND --help' lists a command's options."""


_DEFAULT_FORMAT = {"events": "wso2", "actions": "moesif"}
_DESCRIPTION = {
    "events": "Deliver API-gateway logs to Moesif's /v1/events/batch.",
    "actions": "Deliver action streams to Moesif's /v1/actions/batch.",
}
_FORMAT_HELP = {
    "events": "input format (default wso2: WSO2 API Manager analytics events)",
    "actions": "input format (default moesif: Collector API action JSON, one action or an "
    "array per line; segment: Segment track calls)",
}


def _delivery_parser(pipeline: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"moesif-beam {pipeline}",
        description=f"{_DESCRIPTION[pipeline]} Any Beam pipeline option (--runner, "
        "--direct_num_workers, ...) passes through.",
        allow_abbrev=False,
    )
    source = parser.add_argument_group("source")
    source.add_argument("--input", help="file glob of JSON-lines files; .gz files are read too")
    source.add_argument(
        "--follow",
        action="store_true",
        help="keep watching --input for new files (a streaming run; Logstash-style shipping)",
    )
    source.add_argument(
        "--follow_interval", type=float, default=5.0, help="seconds between looks for new files"
    )
    source.add_argument(
        "--source", default="files", choices=["files", "kafka"], help="where records come from"
    )
    source.add_argument("--kafka_bootstrap_servers", help="host:port[,host:port]")
    source.add_argument("--kafka_topic")
    source.add_argument(
        "--kafka_group_id",
        help="consumer group: where a read resumes, and where offsets are committed once "
        "their records are delivered or dead-lettered",
    )
    source.add_argument(
        "--kafka_start",
        default="earliest",
        help="earliest, latest or an ISO 8601 time: where partitions without a committed "
        "offset start (default earliest)",
    )
    source.add_argument(
        "--kafka_discovery_interval",
        type=float,
        default=30.0,
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
        default=MAX_LINE_BYTES,
        help=f"longest input line or Kafka message read (default {MAX_LINE_BYTES:,}: 16 MiB); "
        "a longer one is a too_large dead letter",
    )
    source.add_argument(
        "--company_id_field",
        help="field whose value becomes company_id when a record has none (events: top "
        "level, then properties; actions: metadata)",
    )
    sink = parser.add_argument_group("sink")
    sink.add_argument(
        "--moesif_application_id",
        help="Moesif application id (or env MOESIF_APPLICATION_ID); without one, batches "
        "are written to files under --output_dir",
    )
    sink.add_argument("--moesif_base_url", default=DEFAULT_BASE_URL, help="collector base URL")
    sink.add_argument(
        "--ca_bundle",
        default=None,
        metavar="PATH",
        help="PEM file of CA certificates to trust for the collector (a private CA)",
    )
    sink.add_argument("--output_dir", default="./moesif-out", help="batch files and dead letters")
    sink.add_argument("--dead_letter", default="", help="dead-letter directory")
    sink.add_argument("--metrics_out", help="write the run's counters as JSON to this path")
    _add_schema_flags(parser)
    batching = parser.add_argument_group("batching and retries")
    batching.add_argument("--batch_max_events", type=int, default=500)
    batching.add_argument(
        "--batch_max_bytes", type=int, default=5_000_000, help="bytes of uncompressed JSON"
    )
    batching.add_argument(
        "--batch_max_delay", type=float, default=2.0, help="seconds (streaming runs)"
    )
    batching.add_argument(
        "--max_retry_seconds",
        type=float,
        default=300.0,
        help="retry budget per batch, and for the whole run while the collector fails "
        "without a break",
    )
    batching.add_argument("--http_timeout", type=float, default=30.0, help="seconds per request")
    batching.add_argument("--gzip_level", type=int, default=6)
    batching.add_argument(
        "--max_in_flight",
        type=int,
        default=2,
        help="batches each worker compresses and posts at once while it goes on batching",
    )
    batching.add_argument(
        "--dedup_ttl",
        type=float,
        default=3600.0,
        help="streaming: seconds (of event time) a transaction id is remembered",
    )
    batching.add_argument(
        "--drain_timeout",
        type=float,
        default=30.0,
        help="streaming: seconds a drain (SIGTERM, Ctrl-C) may take; records not delivered "
        "by then are not committed, and are read again on restart (exit code 4)",
    )
    parser.add_argument(
        "--log_level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    return parser


def _add_schema_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("metadata type schema")
    group.add_argument(
        "--schema_store",
        default="",
        help="persisted metadata type schema, JSON on any Beam filesystem (default "
        "<output_dir>/metadata_schema.json, shared by events and actions)",
    )
    group.add_argument(
        "--schema_scope",
        default="name",
        choices=list(SCOPES),
        help="track a key's type by its name at any depth (Moesif's rule, default) or by "
        "its full path",
    )


class _OwnErrorsOnce(logging.Filter):
    """Drop log records about a refused collector configuration.

    The CLI reports that error itself, in one line; Beam would otherwise also log the
    worker's traceback for it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info:
            text += "".join(traceback.format_exception(*record.exc_info))
        return CollectorConfigError.MARKER not in text


def _configure_logging(level: str) -> None:
    # force: importing Beam already configured the root logger (it logs a warning on
    # import), which would make basicConfig a no-op.
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_OwnErrorsOnce())
    if level == "DEBUG":
        # Records are data, not diagnostics: these Beam loggers print whole elements at
        # DEBUG, so they stay at INFO whatever --log_level asks for.
        for name in _ELEMENT_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)


# Beam's loggers that log elements at DEBUG (Beam 2.77: "Processing [<element>]" for
# combines, flattens and in-memory writes; the trigger manager's values; LogElements).
_ELEMENT_LOGGERS = (
    "apache_beam.runners.worker.operations",
    "apache_beam.runners.portability.fn_api_runner.trigger_manager",
    "apache_beam.transforms.util",
)


def _unknown_beam_args(beam_args: Sequence[str]) -> list[str]:
    """Return the flags in ``beam_args`` that no Beam options class declares."""
    parser = _BeamArgumentParser(allow_abbrev=False, conflict_handler="resolve")
    seen: set[type] = set()
    pending = list(PipelineOptions.__subclasses__())
    while pending:
        cls = pending.pop()
        if cls in seen:
            continue
        seen.add(cls)
        pending.extend(cls.__subclasses__())
        cls._add_argparse_args(parser)
    _, unknown = parser.parse_known_args(list(beam_args))
    return [arg for arg in unknown if arg.startswith("-")]


def _wants_streaming(beam_args: list[str]) -> bool:
    return bool(PipelineOptions(beam_args).view_as(StandardOptions).streaming)


def _has_runner(beam_args: list[str]) -> bool:
    return any(arg == "--runner" or arg.startswith("--runner=") for arg in beam_args)


# Runners whose shuffle lives in this machine's memory; bounded runs on them spill the
# dedup to files instead (see transforms/dedup.py).
_LOCAL_RUNNERS = frozenset(
    {
        "FnApiRunner",
        "LocalRunner",
        "DirectRunner",
        "SwitchingDirectRunner",
        "BundleBasedDirectRunner",
    }
)


def _runs_locally(beam_args: list[str]) -> bool:
    runner = PipelineOptions(beam_args).view_as(StandardOptions).runner
    return runner is None or str(runner).rsplit(".", 1)[-1] in _LOCAL_RUNNERS


# A bounded local run over at least this much splittable input runs its workers as
# processes, one per core. Measured on 2 cores with forked workers (runners/
# local_workers.py): at 40 MB two processes took 9.2-9.5 s against 10.9-12.8 s for one;
# at 17 MB the two were even; below that a second process has too little to do.
PARALLEL_INPUT_BYTES = 4 * RANGE_BYTES
_MAX_LOCAL_WORKERS = 4


def _local_parallelism(beam_args: list[str], paths: list[str]) -> list[str]:
    """Worker flags for a bounded local run the user did not size (see the README)."""
    if not _runs_locally(beam_args):
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


def _beam_options(beam_args: list[str], *, streaming: bool) -> PipelineOptions:
    if streaming and "--streaming" not in beam_args:
        beam_args = [*beam_args, "--streaming"]
    if not _has_runner(beam_args):
        beam_args = [f"--runner={DEFAULT_BATCH_RUNNER}", *beam_args]
    return _RunOptions(beam_args)


_BUILDERS = {"events": events.build, "actions": actions.build}


def _deliver(pipeline: str, argv: Sequence[str]) -> int:
    parser = _delivery_parser(pipeline)
    args, beam_args = parser.parse_known_args(argv)
    _configure_logging(args.log_level)
    unknown = _unknown_beam_args(beam_args)
    if unknown:
        parser.error(f"unknown option(s): {' '.join(unknown)}")
    app_id = args.moesif_application_id or os.environ.get("MOESIF_APPLICATION_ID") or None
    try:
        kafka = _kafka_config(args)
        config = PipelineConfig(
            pipeline=pipeline,
            input=args.input or "",
            kafka=kafka,
            input_format=args.input_format,
            application_id=Secret(app_id) if app_id else None,
            base_url=args.moesif_base_url,
            output_dir=args.output_dir,
            dead_letter=args.dead_letter,
            company_id_field=args.company_id_field,
            batch_max_events=args.batch_max_events,
            batch_max_bytes=args.batch_max_bytes,
            batch_max_delay=args.batch_max_delay,
            retry=RetryPolicy(max_retry_seconds=args.max_retry_seconds),
            http_timeout=args.http_timeout,
            ca_bundle=args.ca_bundle,
            gzip_level=args.gzip_level,
            max_in_flight=args.max_in_flight,
            metrics_out=args.metrics_out,
            schema_store=args.schema_store,
            schema_scope=args.schema_scope,
            streaming=_wants_streaming(beam_args)
            or args.follow
            or (kafka is not None and not kafka.bounded),
            follow=args.follow,
            follow_interval=args.follow_interval,
            dedup_ttl=args.dedup_ttl,
            drain_timeout=args.drain_timeout,
            dedup_spill=_runs_locally(beam_args),
            max_line_bytes=args.max_line_bytes,
        )
        load_schema(config.schema_store_path, config.schema_scope)
        if kafka is not None:
            config = dataclasses.replace(config, kafka_partitions=tuple(resolve_partitions(kafka)))
        elif not config.follow:
            paths = match_inputs(config.input)
            if not config.streaming:
                beam_args = [*_local_parallelism(beam_args, paths), *beam_args]
    except ValueError as exc:
        parser.error(str(exc))
    if config.application_id is not None:
        try:
            preflight(
                config.base_url,
                config.application_id,
                timeout=config.http_timeout,
                ca_bundle=config.ca_bundle,
            )
        except CollectorConfigError as exc:
            print(str(exc), file=sys.stderr, flush=True)
            return EXIT_COLLECTOR
    # Removes what killed runs left, claims this run's directories, and gives the run a
    # private temporary directory (Prism's log, Beam's temporary files), all removed after.
    run = start_run(config)
    prism = None
    try:
        if config.streaming and not _has_runner(beam_args):
            prism = PrismServer(ensure_prism(), run.file("prism.log"))
            beam_args = [
                "--runner=PortableRunner",
                f"--job_endpoint={prism.start()}",
                # LOOPBACK keeps the Python workers in this process, so SIGTERM drains them.
                "--environment_type=LOOPBACK",
                *beam_args,
            ]
        options = _beam_options(beam_args, streaming=config.streaming)
        if prism is not None:
            config = dataclasses.replace(config, single_process=True)
        with loopback_grpc_servers():  # Beam's worker endpoints listen on 127.0.0.1 only
            return execute(
                _BUILDERS[pipeline], config, options, in_process_workers=prism is not None
            )
    except RuntimeError as exc:
        print(f"moesif-beam {pipeline}: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    finally:
        if prism is not None:
            prism.stop()
        run.close()


def _kafka_config(args: argparse.Namespace) -> KafkaSourceConfig | None:
    kafka_flags = [
        name
        for name in ("kafka_bootstrap_servers", "kafka_topic", "kafka_group_id", "kafka_stop")
        if getattr(args, name)
    ]
    if args.source != "kafka":
        if kafka_flags:
            msg = f"--{kafka_flags[0]} needs --source kafka"
            raise ValueError(msg)
        return None
    if args.input:
        msg = "--input reads files; it cannot be combined with --source kafka"
        raise ValueError(msg)
    config = KafkaSourceConfig(
        bootstrap_servers=args.kafka_bootstrap_servers or "",
        topic=args.kafka_topic or "",
        group_id=args.kafka_group_id or "",
        start=args.kafka_start,
        stop=args.kafka_stop,
        discovery_interval=args.kafka_discovery_interval,
    )
    return config


def _schema(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="moesif-beam schema",
        description="Show or seed the persisted metadata type schema.",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="action", required=True)
    show = commands.add_parser("show", help="print the schema as JSON")
    seed = commands.add_parser(
        "seed",
        help="add keys from a file: JSON lines (or a JSON array) of example records or "
        "metadata objects, whose types are inferred; or, with --types, a JSON object of "
        "key -> type. Keys already in the schema keep their type.",
    )
    seed.add_argument("file")
    seed.add_argument("--types", action="store_true", help="FILE maps keys to type names")
    for sub in (show, seed):
        sub.add_argument("--output_dir", default="./moesif-out")
        _add_schema_flags(sub)
    args = parser.parse_args(argv)
    store = args.schema_store or f"{args.output_dir.rstrip('/')}/metadata_schema.json"
    try:
        if args.action == "show":
            schema = load_schema(store, args.schema_scope)
        else:
            before = load_schema(store, args.schema_scope)
            pairs = seed_pairs(args.file, args.schema_scope, types_map=args.types)
            schema = save_schema(store, args.schema_scope, pairs)
            added = len(schema) - len(before)
            print(f"seeded {added} new keys; {len(schema)} in {store}", file=sys.stderr)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    print(
        json.dumps({"scope": args.schema_scope, "fields": dict(sorted(schema.items()))}, indent=2)
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moesif-beam`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if args else EXIT_USAGE
    command, rest = args[0], args[1:]
    if command in _BUILDERS:
        return _deliver(command, rest)
    if command == "schema":
        return _schema(rest)
    if command == "kafka-local":
        from moesif_beam.runners.emulators import kafka_local  # noqa: PLC0415 - only this command needs it

        return kafka_local.main(rest)
    if command == "collector":
        from moesif_beam.runners.emulators import collector  # noqa: PLC0415 - the emulator is not needed otherwise

        return collector.main(rest)
    print(f"moesif-beam: unknown command {command!r}\n\n{_USAGE}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
