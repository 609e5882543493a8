"""Run a built pipeline, collect its counters, print the summary, write ``--metrics_out``."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TextIO, cast

import apache_beam as beam
from apache_beam.io.filesystems import BeamIOError, FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from moesif_beam.pipelines.config import PipelineConfig
from moesif_beam.runners.engines.run_state import OWNER_FILE
from moesif_beam.transforms.common.counters import (
    COUNTERS,
    EXTRA_COUNTERS,
    NAMESPACE,
    PROGRESS_COUNTERS,
    local_tally,
)
from moesif_beam.transforms.common.errors import (
    REPORT_ENV,
    CollectorConfigError,
    reported_config_error,
)
from moesif_beam.transforms.profiles.compute import PROFILE_COUNTERS, profiles_summary
from moesif_beam.transforms.schema import load_schema, save_schema
from moesif_beam.transforms.sources.drain import drain_timed_out, start_drain

__all__ = [
    "EXIT_COLLECTOR",
    "EXIT_DRAIN_TIMEOUT",
    "EXIT_FAILED",
    "collect_counters",
    "execute",
    "format_summary",
    "sum_counters",
]

_LOG = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_COLLECTOR = 3
EXIT_DRAIN_TIMEOUT = 4
# 128 + SIGINT: what shells report for a command that Ctrl-C stopped.
EXIT_INTERRUPTED = 130
# Past a drain's deadline, a run that has not ended (a stage stuck elsewhere than in the
# sink's retries, which give up at the deadline) is cancelled, then ended.
_CANCEL_GRACE_S = 5.0
_EXIT_GRACE_S = 15.0


def collect_counters(result: Any) -> dict[str, int]:
    """Sum the moesif-beam counters of a finished run over all steps.

    Committed values where the runner reports them, attempted values otherwise.
    """
    return sum_counters(result.metrics())


def sum_counters(metrics: Any) -> dict[str, int]:
    """Sum the moesif-beam counters of Beam's ``MetricResults`` over all steps.

    Committed values where the runner reports them, attempted values otherwise; every
    counter of the summary is present, zero or not.
    """
    counters = dict.fromkeys((*COUNTERS, *EXTRA_COUNTERS), 0)
    query = metrics.query(MetricsFilter().with_namespace(NAMESPACE))
    for metric in query["counters"]:
        if metric.key.metric.name in PROGRESS_COUNTERS:
            continue  # the progress line's, not the summary's
        value = metric.committed if metric.committed is not None else metric.attempted
        counters[metric.key.metric.name] = counters.get(metric.key.metric.name, 0) + int(value or 0)
    return counters


def invariant_holds(counters: dict[str, int]) -> bool:
    """``read == sent + duplicates + dead_letters``: nothing was lost."""
    return counters["read"] == counters["sent"] + counters["duplicates"] + counters["dead_letters"]


def format_summary(config: PipelineConfig, counters: dict[str, int], seconds: float) -> str:
    """A short human summary of a finished bounded run."""
    rate = counters["read"] / seconds if seconds > 0 else 0.0
    where = config.batch_dir if config.application_id is None else config.base_url
    lines = [
        f"moesif-beam {config.pipeline}: finished in {seconds:.1f}s ({rate:,.0f} records/s)",
        f"  read          {counters['read']:>10,}"
        + (
            f"   skipped {counters['skipped']:,} (no records: CloudWatch Logs control messages)"
            if counters.get("skipped")
            else ""
        ),
        f"  sent          {counters['sent']:>10,}   in {counters['batches']:,} batches, "
        f"{counters['bytes_sent']:,} bytes -> {where}"
        if config.pipeline != "profiles"
        # profiles: records the rollups took in; what was delivered follows, per output
        else f"  sent          {counters['sent']:>10,}   taken in by the rollups",
        f"  duplicates    {counters['duplicates']:>10,}",
        f"  dead letters  {counters['dead_letters']:>10,}   parse_errors {counters['parse_errors']}"
        f", invalid {counters['invalid']}, type_conflicts {counters['type_conflicts']}"
        f", too_large {counters['too_large']}, collector_rejected "
        f"{counters['collector_rejected']}, retries_exhausted {counters['retries_exhausted']}"
        # Rare kinds are named only when they happened.
        + "".join(
            f", {name} {counters.get(name, 0)}"
            for name in ("internal_errors", "unreadable_inputs")
            if counters.get(name, 0)
        )
        + f" -> {config.dead_letter_dir}",
        f"  retries       {counters['retries']:>10,}"
        + (
            f"   timeouts {counters['timeouts']:,} (delivery unknown; re-posted, same ids)"
            if counters.get("timeouts")
            else ""
        ),
    ]
    if invariant_holds(counters):
        lines.append("  read == sent + duplicates + dead_letters: holds")
    else:
        lines.append("  read == sent + duplicates + dead_letters: BROKEN (records unaccounted for)")
    return "\n".join(lines)


def execute(
    build: Callable[[PipelineConfig, PipelineOptions, dict[str, str]], beam.Pipeline],
    config: PipelineConfig,
    options: PipelineOptions,
    out: TextIO = sys.stdout,
    *,
    in_process_workers: bool = False,
    report_file: str | None = None,
    progress: contextlib.AbstractContextManager[Any] | None = None,
    on_run: Callable[[Any], None] | None = None,
) -> int:
    """Build, run and report one pipeline run; return the process exit code.

    The persisted metadata schema is read before the run and updated after it completes;
    a failed run leaves it untouched. With ``in_process_workers`` (every worker runs in
    this process) the summary uses the exact in-process tally instead of the runner's
    metrics. With ``report_file``, workers on this machine report a refused collector
    configuration there (see :data:`~moesif_beam.transforms.common.errors.REPORT_ENV`).
    ``progress`` (a :class:`~moesif_beam.runners.progress.ProgressLine`) is entered while
    the pipeline runs, and left before the summary is printed. ``on_run`` is handed the
    runner's result as soon as the runner returns it (the ``--metrics_port`` endpoint
    follows the run through it).
    """
    if report_file is not None:
        os.environ[REPORT_ENV] = report_file
    try:
        return _execute(
            build, config, options, out, in_process_workers, report_file, progress, on_run
        )
    finally:
        if report_file is not None:
            os.environ.pop(REPORT_ENV, None)


def _execute(
    build: Callable[[PipelineConfig, PipelineOptions, dict[str, str]], beam.Pipeline],
    config: PipelineConfig,
    options: PipelineOptions,
    out: TextIO,
    in_process_workers: bool,
    report_file: str | None,
    progress: contextlib.AbstractContextManager[Any] | None = None,
    on_run: Callable[[Any], None] | None = None,
) -> int:
    stored = load_schema(config.schema_store_path, config.schema_scope)
    pipeline = build(config, options, stored)
    started = time.monotonic()
    restore = _drain_on_signals(config.drain_timeout) if config.streaming else None
    try:
        with progress or contextlib.nullcontext():
            result = pipeline.run()
            if on_run is not None:
                on_run(result)
            template = options.view_as(GoogleCloudOptions).template_location
            if template:  # Dataflow wrote the job as a template (a Flex Template's launch)
                print(
                    f"moesif-beam {config.pipeline}: Dataflow job written to {template}", file=out
                )
                return 0
            watchdog = _drain_watchdog(result, config) if config.streaming else None
            with watchdog or contextlib.nullcontext():
                result.wait_until_finish()
    except Exception as exc:  # the runner wraps worker errors; we explain them once
        if config.streaming and drain_timed_out():
            return _report_drain_timeout(config)
        return _report_failure(exc, config, report_file)
    finally:
        if restore is not None:
            restore()
        if config.dedup_spill:
            _remove_spill(config.spill_dir)
    seconds = time.monotonic() - started
    extra = PROFILE_COUNTERS if config.pipeline == "profiles" else ()
    counters = local_tally(*extra) if in_process_workers else collect_counters(result)
    for name in extra:  # the profiles' counters appear in --metrics_out, zero or not
        counters.setdefault(name, 0)
    added = merge_pending_schema(config)
    if config.streaming:
        # A stream stores each key as it decides it, so the merge finds them stored: count
        # the keys the store gained since this run read it.
        added = len(load_schema(config.schema_store_path, config.schema_scope)) - len(stored)
    if config.kafka is not None and not config.streaming and invariant_holds(counters):
        commit_offsets(config)
    print(format_summary(config, counters, seconds), file=out, flush=True)
    if config.pipeline == "profiles":
        print(profiles_summary(counters), file=out, flush=True)
    print(
        f"  metadata schema: {added} new keys -> {config.schema_store_path}", file=out, flush=True
    )
    if config.metrics_out:
        _write_metrics(config, counters, seconds)
    return 0 if invariant_holds(counters) else EXIT_FAILED


def _remove_spill(directory: str) -> None:
    """Delete a run's dedup spill files; a failed run's are no use to the next one."""
    try:
        if FileSystems.exists(directory):
            FileSystems.delete([directory])
    except BeamIOError as exc:
        _LOG.warning("could not remove the dedup spill directory %s: %s", directory, exc)
    if "://" not in directory:
        # The parent holds every run's spill; it goes once no run is using it.
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(directory.rstrip("/")))


def _drain_on_signals(timeout: float) -> Callable[[], None]:
    """Make SIGTERM and SIGINT drain a streaming run instead of killing it.

    The readers stop claiming, every stage flushes (partial batches are delivered, dead
    letters written), offsets are committed, and the run finishes with its summary. What
    is not delivered within ``timeout`` seconds is given up on (see :func:`execute`).
    Returns a function that restores the previous handlers.
    """

    def drain(signum: int, _frame: Any) -> None:
        print(
            f"moesif-beam: {signal.Signals(signum).name}: draining (flush, commit, exit; "
            f"at most {timeout:g}s)...",
            file=sys.stderr,
            flush=True,
        )
        start_drain(timeout)

    previous = {sig: signal.signal(sig, drain) for sig in (signal.SIGTERM, signal.SIGINT)}
    # Once the drain's time is up, the run is torn down: what Beam and gRPC log or print
    # about that (failed bundles, cancelled streams, each with its traceback) is noise
    # around the one line the launcher prints.
    quiet = _QuietAfterDrainTimeout()
    log_handlers = list(logging.getLogger().handlers)
    for log_handler in log_handlers:
        log_handler.addFilter(quiet)
    stderr = sys.stderr
    sys.stderr = cast(TextIO, _QuietAfterDrainTimeoutStream(stderr))

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if drain_timed_out():
            return  # stay quiet: Beam's threads die noisily while the process ends
        for log_handler in log_handlers:
            log_handler.removeFilter(quiet)
        sys.stderr = stderr

    return restore


class _QuietAfterDrainTimeout(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not drain_timed_out()


class _QuietAfterDrainTimeoutStream:
    """Standard error that drops what is written once a drain has timed out.

    Beam's SDK harness prints a failed bundle's traceback to ``sys.stderr`` itself, besides
    logging it.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        if drain_timed_out():
            return len(text)
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextlib.contextmanager
def _drain_watchdog(result: Any, config: PipelineConfig) -> Any:
    """Bound a drain even where no stage gives up by itself.

    The sink stops retrying at the drain's deadline, which fails the run. If the run has
    still not ended a little later, it is cancelled; if even that does not end it, the
    process exits with the drain timeout's code. Offsets are only ever committed for
    records that are done, so nothing is lost either way.
    """
    finished = threading.Event()

    def watch() -> None:
        while not finished.wait(0.5):
            if not drain_timed_out():
                continue
            if finished.wait(_CANCEL_GRACE_S):
                return
            threading.Thread(target=_cancel, args=(result,), daemon=True).start()
            if finished.wait(_EXIT_GRACE_S - _CANCEL_GRACE_S):
                return
            _report_drain_timeout(config)
            os._exit(EXIT_DRAIN_TIMEOUT)

    watcher = threading.Thread(target=watch, name="drain-watchdog", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        finished.set()


def _cancel(result: Any) -> None:
    with contextlib.suppress(Exception):
        result.cancel()


def _report_drain_timeout(config: PipelineConfig) -> int:
    print(
        f"moesif-beam {config.pipeline}: drain timed out after {config.drain_timeout:g}s: "
        "undelivered records were not committed and will be re-read on restart",
        file=getattr(sys.stderr, "stream", sys.stderr),  # past the quiet wrapper above
        flush=True,
    )
    return EXIT_DRAIN_TIMEOUT


def commit_offsets(config: PipelineConfig) -> None:
    """Commit a finished backfill's stop offsets to the consumer group.

    Called only after a bounded run completed with every record accounted for (sent,
    duplicate or dead-lettered), so the commit never covers an undelivered record.
    """
    from confluent_kafka import Consumer, TopicPartition  # noqa: PLC0415 - Kafka runs only

    assert config.kafka is not None
    done = [
        TopicPartition(p.topic, p.partition, p.stop)
        for p in config.kafka_partitions
        if p.stop > p.start
    ]
    if not done:
        return
    consumer = Consumer(config.kafka.consumer_settings())
    try:
        consumer.commit(offsets=done, asynchronous=False)
    finally:
        consumer.close()


def merge_pending_schema(config: PipelineConfig) -> int:
    """Merge the keys a finished run wrote aside into the schema store; return how many.

    The store is re-read at merge time and keys already in it keep their type (first wins),
    so two runs sharing a store never overwrite each other's decisions.
    """
    match = FileSystems.match([f"{config.schema_pending_dir}/*"])[0].metadata_list
    pairs: list[tuple[str, str]] = []
    for metadata in match:
        if os.path.basename(metadata.path) == OWNER_FILE:  # the run's claim, not keys
            continue
        with FileSystems.open(metadata.path) as handle:
            for line in handle.read().splitlines():
                if line.strip():
                    key, kind = json.loads(line)
                    pairs.append((key, kind))
    before = load_schema(config.schema_store_path, config.schema_scope)
    after = save_schema(config.schema_store_path, config.schema_scope, pairs)
    if match:
        FileSystems.delete([config.schema_pending_dir])
    return len(after) - len(before)


def _write_metrics(config: PipelineConfig, counters: dict[str, int], seconds: float) -> None:
    document = {
        **counters,
        "pipeline": config.pipeline,
        "run_id": config.run_id,
        "elapsed_seconds": round(seconds, 3),
        "invariant_holds": invariant_holds(counters),
    }
    assert config.metrics_out is not None
    with FileSystems.create(config.metrics_out, mime_type="application/json") as handle:
        handle.write(json.dumps(document, indent=2, sort_keys=True).encode("utf-8") + b"\n")


def report_interrupt(pipeline: str) -> int:
    """Ctrl-C stopped a run: one line saying what that means, and :data:`EXIT_INTERRUPTED`.

    The run's own clean-up (its spill) happens on the way out as for any failed run, and,
    as for any failed run, the metadata schema store and Kafka offsets are left as they
    were. What was already posted stays posted: running the same command again sends the
    rest, and the records sent twice carry the same transaction ids.
    """
    # A terminal's Ctrl-C reaches the whole process group, so the worker processes are
    # gone too, and each of the runner's threads that talked to them would print its
    # own traceback on the way out: a screenful that says nothing more.
    threading.excepthook = _quiet_thread_exit
    print(
        f"moesif-beam {pipeline}: interrupted; what was already posted stays posted, the "
        "rest was not sent. Run the same command again to send everything: records posted "
        "twice carry the same transaction ids.",
        file=sys.stderr,
        flush=True,
    )
    return EXIT_INTERRUPTED


def _quiet_thread_exit(args: Any) -> None:
    _LOG.debug("a runner thread ended after the interrupt: %s", args.exc_value)


def _report_failure(
    exc: BaseException, config: PipelineConfig, report_file: str | None = None
) -> int:
    reported = reported_config_error(report_file) if report_file else None
    if reported is not None:
        # A worker on this machine said why: the collector (or Segment) refused the
        # configuration.
        print(reported, file=sys.stderr, flush=True)
        return EXIT_COLLECTOR
    text = "".join(traceback.format_exception(exc))
    if config.application_id is not None:
        text = config.application_id.scrub(text)
    if config.segment_write_key is not None:
        text = config.segment_write_key.scrub(text)
    # Workers on other machines (Flink, Dataflow) reach us only through the runner's text
    # of their exception.
    message = CollectorConfigError.refusal_in(text)
    if message is not None:
        print(message, file=sys.stderr, flush=True)
        return EXIT_COLLECTOR
    _LOG.debug("pipeline failed:\n%s", text)
    last = text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
    print(f"moesif-beam {config.pipeline}: the pipeline failed: {last[:500]}", file=sys.stderr)
    print("  (run with --log_level DEBUG for the full traceback)", file=sys.stderr, flush=True)
    return EXIT_FAILED
