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
import tempfile
import traceback
from collections.abc import Sequence
from typing import Any

from moesif_beam.pipelines import actions, events, profiles
from moesif_beam.pipelines.config import PipelineConfig
from moesif_beam.runners.dataflow.job import dry_run_requested, run_dry
from moesif_beam.runners.engines.flink import start_flink_job_server
from moesif_beam.runners.engines.local_workers import LocalRunner
from moesif_beam.runners.engines.loopback import loopback_grpc_servers
from moesif_beam.runners.engines.prism import PrismServer, ensure_prism
from moesif_beam.runners.engines.run_state import start_run
from moesif_beam.runners.launch import EXIT_COLLECTOR, execute, report_interrupt
from moesif_beam.runners.logs import make_formatter
from moesif_beam.runners.metrics import RunMetrics
from moesif_beam.runners.options import (
    DEFAULTS,
    ArgumentParser,
    UsageError,
    add_delivery_flags,
    add_schema_flags,
    beam_options,
    check_beam_args,
    has_runner,
    local_parallelism,
    runs_locally,
    stream_parse_processes,
    wants_streaming,
)
from moesif_beam.runners.paths import LAUNCHER_PATHS, WORKER_PATHS, place_paths
from moesif_beam.runners.profile_options import (
    Secrets,
    add_profiles_flags,
    profiles_settings,
    write_key,
)
from moesif_beam.runners.profiles import add_profile_flag, apply_profile
from moesif_beam.runners.progress import counts_visible, progress_line, run_tally
from moesif_beam.transforms.common.errors import CollectorConfigError
from moesif_beam.transforms.delivery import RetryPolicy, Secret, preflight
from moesif_beam.transforms.schema import load_schema, save_schema, seed_pairs
from moesif_beam.transforms.sources.files import (
    match_inputs,
)
from moesif_beam.transforms.sources.kafka import (
    CLIENT_LOG,
    KafkaSourceConfig,
    resolve_partitions,
)

__all__ = ["main"]

EXIT_USAGE = 2

# Streaming runs default to Beam's Prism runner, built from Beam's Go module on first use
# and started as our own job server (runners/engines/prism.py).
# Bounded runs default to Beam's FnApiRunner, chosen rather than reached by accident: the
# DirectRunner would first try to download Prism, and our batch pipelines use nothing
# the FnApiRunner lacks. It honours --direct_num_workers and --direct_running_mode.
DEFAULT_BATCH_RUNNER = "FnApiRunner"
# By default (and with --fork_workers) the same runner forks its multi_processing workers
# instead of starting them (runners/engines/local_workers.py): about 2 s of CPU saved per
# worker, measured 4% to 13% faster at a million events (docs/performance.md);
# --start_workers starts them as Beam does. Imported above, before any work starts a
# thread: forking is judged against the threads that existed then.
FORKING_BATCH_RUNNER = f"{LocalRunner.__module__}.{LocalRunner.__name__}"

_DESCRIPTION = {
    "events": "Deliver API-gateway logs to Moesif's /v1/events/batch (--format wso2|kong|aws|"
    "tyk|azure|apigee|envoy|nginx|auto).",
    "actions": "Deliver action streams to Moesif's /v1/actions/batch (--format moesif|segment).",
    "profiles": "Upsert Moesif users and companies computed from the traffic (first/last "
    "seen, latest IP and user agent, ttfhw_s, last24HourAggResults) to /v1/users/batch and "
    "/v1/companies/batch, and send them to Segment as identify/group calls.",
}


class _OwnErrorsOnce(logging.Filter):
    """Drop log records about a refused collector configuration, and Beam's start-up noise.

    The CLI reports that error itself, in one line; Beam would otherwise also log the
    worker's traceback for it. Beam's warning about a missing semi-persistent directory
    (see ``_BEAM_NOISE``) says nothing a user can act on.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info:
            text += "".join(traceback.format_exception(*record.exc_info))
        if record.levelno < logging.ERROR and _BEAM_NOISE in text:
            return False
        return not any(marker in text for marker in CollectorConfigError.MARKERS)


# Beam's workers warn at start that they have no semi-persistent directory (a Dataflow
# notion); the local runner forwards it once per worker process, about nothing.
_BEAM_NOISE = "No semi_persistent_directory found"


def _configure_logging(level: str, log_format: str = "text", secret: Secret | None = None) -> None:
    # force: importing Beam already configured the root logger (it logs a warning on
    # import), which would make basicConfig a no-op.
    logging.basicConfig(level=level, force=True)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(make_formatter(log_format, secret))  # never shows the id
        handler.addFilter(_OwnErrorsOnce())
    if level != "DEBUG":
        CLIENT_LOG.setLevel(logging.CRITICAL)
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


_BUILDERS = {"events": events.build, "actions": actions.build, "profiles": profiles.build}


def _deliver(
    pipeline: str, parser: argparse.ArgumentParser, args: argparse.Namespace, beam_args: list[str]
) -> int:
    app_id = args.moesif_application_id or os.environ.get("MOESIF_APPLICATION_ID") or None
    _configure_logging(
        args.log_level,
        args.log_format,
        Secrets(Secret(app_id) if app_id else None, write_key(args)),
    )
    try:
        beam_args = apply_profile(args.profile, beam_args)
        check_beam_args(beam_args)
        # A dry run builds a Dataflow job offline: nothing below touches the input, the
        # schema store or the collector (no glob matching, no store read, no preflight).
        # Only a Kafka read still asks its broker for the partitions the graph is made of.
        dry_run, beam_args = dry_run_requested(beam_args)
        args = _placed_paths(parser, args, beam_args)
    except UsageError as exc:
        parser.error(str(exc))
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
            # events only: the other commands do not have these flags
            user_id_field=getattr(args, "user_id_field", None),
            session_token_field=getattr(args, "session_token_field", None),
            user_id_jwt_claim=getattr(args, "user_id_jwt_claim", None),
            mask_headers=getattr(args, "mask_headers", DEFAULTS["mask_headers"]),
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
            streaming=wants_streaming(beam_args)
            or args.follow
            or (kafka is not None and not kafka.bounded),
            follow=args.follow,
            follow_interval=args.follow_interval,
            dedup_ttl=args.dedup_ttl,
            dedup_journal=args.dedup_journal,
            drain_timeout=args.drain_timeout,
            parse_processes=args.parse_processes or 0,
            dedup_spill=runs_locally(beam_args),
            max_line_bytes=args.max_line_bytes,
            **(profiles_settings(args) if pipeline == "profiles" else {}),
        )
        if not dry_run:
            load_schema(config.schema_store_path, config.schema_scope)
        _check_writable(config.output_dir, "--output_dir")
        _check_writable(config.dead_letter_dir, "--dead_letter")
        if kafka is not None:
            config = dataclasses.replace(config, kafka_partitions=tuple(resolve_partitions(kafka)))
        elif kafka is None and not config.follow and not dry_run:
            paths = match_inputs(config.input)
            if not config.streaming:
                beam_args = [*local_parallelism(beam_args, paths), *beam_args]
    except ValueError as exc:
        parser.error(str(exc))
    if config.application_id is not None and not dry_run:
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
    # Bound before anything starts, so a port that cannot be had is one line and exit 2.
    metrics = _start_metrics(parser, args, config) if not dry_run else None
    # Removes what killed runs left, claims this run's directories, and gives the run a
    # private temporary directory (Prism's log, Beam's temporary files), all removed after.
    run = start_run(config)
    prism = None
    flink = None
    try:
        # --runner FlinkRunner: our own Flink job server (runners/engines/flink.py).
        flink, beam_args = start_flink_job_server(beam_args, run.path)
        if config.streaming and not has_runner(beam_args):
            prism = PrismServer(ensure_prism(), run.file("prism.log"))
            beam_args = [
                "--runner=PortableRunner",
                f"--job_endpoint={prism.start()}",
                # LOOPBACK keeps the Python workers in this process, so SIGTERM drains them.
                "--environment_type=LOOPBACK",
                *beam_args,
            ]
        options = beam_options(
            beam_args,
            streaming=config.streaming,
            default_runner=DEFAULT_BATCH_RUNNER if args.start_workers else FORKING_BATCH_RUNNER,
        )
        if prism is not None:
            config = dataclasses.replace(
                config,
                single_process=True,
                parse_processes=(
                    stream_parse_processes()
                    if args.parse_processes is None
                    else args.parse_processes
                ),
            )
        # Local worker processes publish their counts in the run's directory, for the
        # progress line and the endpoint (transforms/common/worker_tallies.py).
        tally = run_tally(config, options, args.progress, run.path, endpoint=metrics is not None)
        if metrics is not None:
            metrics.workers_here(counts_visible(options))
            if tally.published:
                metrics.read_tally(tally)
        if dry_run:
            return run_dry(_BUILDERS[pipeline], config, options)
        # Beam's worker endpoints listen on 127.0.0.1 only; the tally's environment is
        # what the workers inherit.
        with loopback_grpc_servers(), tally:
            return execute(
                _BUILDERS[pipeline],
                config,
                options,
                in_process_workers=prism is not None,
                report_file=run.file("collector-refused"),
                progress=progress_line(config, options, args.progress, tally),
                on_run=metrics.watch if metrics is not None else None,
            )
    except UsageError as exc:
        parser.error(str(exc))
    except RuntimeError as exc:
        print(f"moesif-beam {pipeline}: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    finally:
        if prism is not None:
            prism.stop()
        if flink is not None:
            flink.stop()
        if metrics is not None:
            metrics.stop()
        run.close()


def _start_metrics(
    parser: argparse.ArgumentParser, args: argparse.Namespace, config: PipelineConfig
) -> RunMetrics | None:
    """The ``--metrics_port`` endpoint, serving; None without the flag."""
    if args.metrics_port is None:
        return None
    try:
        metrics = RunMetrics.for_run(config, host=args.metrics_host, port=args.metrics_port)
        metrics.start()
    except ValueError as exc:
        parser.error(str(exc))
    print(
        f"moesif-beam {config.pipeline}: metrics on {metrics.url}/metrics, liveness on "
        f"{metrics.url}/healthz",
        file=sys.stderr,
        flush=True,
    )
    return metrics


def _placed_paths(
    parser: argparse.ArgumentParser, args: argparse.Namespace, beam_args: list[str]
) -> argparse.Namespace:
    """``args`` with its path flags as the run's workers need them (runners/paths.py)."""
    names = [*WORKER_PATHS, *LAUNCHER_PATHS]
    placed = place_paths(
        {name: getattr(args, name) for name in names},
        beam_args,
        defaults={name: parser.get_default(name) for name in names},
    )
    return argparse.Namespace(**{**vars(args), **placed})


def _check_writable(directory: str, flag: str) -> None:
    """Refuse, before any record is read, a local directory the run could not write.

    Other filesystems (gs://, s3://) are left to the run: checking them would need the
    network and credentials before the job is even built.
    """
    if "://" in directory:
        return
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".moesif-beam-probe-"):
            pass
    except OSError as exc:
        msg = f"{flag} {directory} cannot be written: {exc.strerror or exc}"
        raise ValueError(msg) from None


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


def _add_schema_command(commands: Any) -> None:
    parser = commands.add_parser(
        "schema",
        help="show or seed the persisted metadata type schema",
        description="Show or seed the persisted metadata type schema.",
        allow_abbrev=False,
    )
    actions = parser.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="print the schema as JSON")
    seed = actions.add_parser(
        "seed",
        help="add keys from a file: JSON lines (or a JSON array) of example records or "
        "metadata objects, whose types are inferred; or, with --types, a JSON object of "
        "key -> type. Keys already in the schema keep their type.",
    )
    seed.add_argument("file")
    seed.add_argument("--types", action="store_true", help="FILE maps keys to type names")
    for sub in (show, seed):
        sub.add_argument("--output_dir", default=DEFAULTS["output_dir"])
        add_schema_flags(sub)
        sub.set_defaults(parser=sub)


def _schema(args: argparse.Namespace) -> int:
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
        args.parser.error(str(exc))
    print(
        json.dumps({"scope": args.schema_scope, "fields": dict(sorted(schema.items()))}, indent=2)
    )
    return 0


# Commands with a command line of their own, handed everything after their name.
_SERVICES = {
    "deadletters": "inspect (stats, show) and replay dead letters",
    "collector": "a local Moesif Collector API emulator, for tests and trials",
    "segment-emulator": "a local Segment Tracking API emulator, for profiles' Segment output",
    "kafka-local": "a real single-node Apache Kafka broker (KRaft), for laptops and tests",
    "flink-local": "a real single-machine Flink 1.19 cluster, with its Python workers",
}


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="moesif-beam",
        description="Move API-gateway logs and product events into Moesif.",
        epilog="'moesif-beam COMMAND --help' lists a command's options.",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for pipeline in _BUILDERS:
        sub = commands.add_parser(
            pipeline,
            help=_DESCRIPTION[pipeline],
            description=f"{_DESCRIPTION[pipeline]} Any Beam pipeline option (--runner, "
            "--direct_num_workers, ...) passes through.",
            allow_abbrev=False,
        )
        add_delivery_flags(sub, pipeline)
        if pipeline == "profiles":
            add_profiles_flags(sub)
        add_profile_flag(sub)
        sub.set_defaults(parser=sub)
    _add_schema_command(commands)
    for name, text in _SERVICES.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moesif-beam`` console script; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in _SERVICES:
        # Their own parsers, help and errors.
        if args_list[0] == "deadletters":
            from moesif_beam.runners import deadletters  # noqa: PLC0415

            return deadletters.main(args_list[1:], main)
        if args_list[0] == "flink-local":
            from moesif_beam.runners.engines import flink_cluster  # noqa: PLC0415

            return flink_cluster.main(args_list[1:])
        if args_list[0] == "segment-emulator":
            from moesif_beam.runners.emulators import segment  # noqa: PLC0415

            return segment.main(args_list[1:])
        if args_list[0] == "kafka-local":
            from moesif_beam.runners.emulators import kafka_local  # noqa: PLC0415

            return kafka_local.main(args_list[1:])
        from moesif_beam.runners.emulators import collector  # noqa: PLC0415

        return collector.main(args_list[1:])
    parser = _parser()
    if not args_list:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    commands = [*_BUILDERS, "schema", *_SERVICES]
    if not args_list[0].startswith("-") and args_list[0] not in commands:
        parser.error(f"unknown command {args_list[0]!r}; commands: {', '.join(commands)}")
    args, extra = parser.parse_known_args(args_list)
    if args.command in _BUILDERS:
        try:
            return _deliver(args.command, args.parser, args, extra)
        except KeyboardInterrupt:  # Ctrl-C, at any point of a bounded run (a stream drains)
            return report_interrupt(args.command)
    if extra:
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return _schema(args)


if __name__ == "__main__":
    raise SystemExit(main())
