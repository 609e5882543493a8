"""The live progress line of a bounded run: counts, records/s, and an ETA.

What the line shows depends on where the workers run:

- In this process (the default FnApiRunner without ``multi_processing``), or in worker
  processes of the local runner (``multi_processing``, forked or started by Beam): the
  run's counts (``read``, ``sent``, ``duplicates``, ``dead_letters``), records/s, and a
  percentage with an ETA. The counts are the in-process tally, plus, for worker
  processes, the tallies they publish in the run's directory every half second
  (transforms/common/worker_tallies.py). Reading is measured by input bytes for files
  (the ``bytes_read`` counter, added once per range read, so it moves in steps of at
  most one range, 8 MiB) or by records read against the offsets to read for a Kafka
  backfill; delivering by records accounted for (sent, duplicates and dead letters)
  against the records read. The percentage is the mean of the two, since a bounded run
  reads, then delivers.
- Elsewhere (a cluster, Dataflow): the counts are not visible while the run is on, so
  the line shows the elapsed time only; the summary has the counts at the end.

The line is redrawn every half second on stderr, with a carriage return; reading the
tally is a copy of a few integers under a lock, and for worker processes the read of one
small file per worker. The drawing thread does not keep the local runner from forking its
workers (``local_workers.fork_safe_thread``).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import TextIO

from apache_beam.options.pipeline_options import (
    DirectOptions,
    FlinkRunnerOptions,
    PipelineOptions,
    PortableOptions,
    StandardOptions,
)

from moesif_beam.pipelines.config import PipelineConfig
from moesif_beam.runners.engines.local_workers import fork_safe_thread
from moesif_beam.transforms.common.worker_tallies import RunTally
from moesif_beam.transforms.sources.files import input_bytes

__all__ = [
    "ProgressLine",
    "counts_visible",
    "done_fraction",
    "eta_seconds",
    "format_duration",
    "format_progress",
    "progress_line",
    "progress_shown",
    "run_tally",
    "workers_publish",
]

INTERVAL_S = 0.5
# Runners whose workers run in this process unless told to use processes.
_IN_PROCESS_RUNNERS = frozenset({"FnApiRunner", "LocalRunner", "BundleBasedDirectRunner"})
# Runners whose multi_processing workers are processes on this machine, started by the
# FnApiRunner (the DirectRunner hands a bounded pipeline to it) or forked by ours.
_LOCAL_PROCESS_RUNNERS = frozenset(
    {"FnApiRunner", "LocalRunner", "DirectRunner", "SwitchingDirectRunner"}
)
# Beam's Flink runner runs these embedded, with LOOPBACK workers unless told otherwise.
_EMBEDDED_FLINK = frozenset({"[local]", "[auto]"})


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def done_fraction(
    counts: Mapping[str, int], *, total_bytes: int = 0, total_offsets: int = 0
) -> float | None:
    """How much of the run is done, 0 to 1; None when there is nothing to measure by.

    Reading counts for half (bytes read of ``total_bytes``, or records read of
    ``total_offsets``), delivering for the other half (records sent, duplicate or
    dead-lettered, of the records there are: known for Kafka, estimated from the bytes
    for files).
    """
    read = counts.get("read", 0)
    if total_bytes > 0:
        reading = min(1.0, counts.get("bytes_read", 0) / total_bytes)
        records = read / reading if reading > 0 else 0.0
    elif total_offsets > 0:
        reading = min(1.0, read / total_offsets)
        records = max(float(total_offsets), float(read))
    else:
        return None
    accounted = counts.get("sent", 0) + counts.get("duplicates", 0) + counts.get("dead_letters", 0)
    delivering = min(1.0, accounted / records) if records > 0 else 0.0
    return (reading + delivering) / 2


def eta_seconds(fraction: float | None, elapsed: float) -> float | None:
    """Time left at the pace so far; None before anything is done."""
    if fraction is None or fraction <= 0 or elapsed <= 0:
        return None
    return elapsed * (1 - fraction) / fraction


def format_progress(
    pipeline: str,
    counts: Mapping[str, int] | None,
    elapsed: float,
    *,
    total_bytes: int = 0,
    total_offsets: int = 0,
) -> str:
    """The progress line's text; ``counts`` None when the workers' counts are not visible."""
    head = f"moesif-beam {pipeline}:"
    if counts is None:
        return f"{head} running {format_duration(elapsed)} (counts at the end)"
    rate = counts.get("read", 0) / elapsed if elapsed > 0 else 0.0
    text = (
        f"{head} read {counts.get('read', 0):,}  sent {counts.get('sent', 0):,}  "
        f"duplicates {counts.get('duplicates', 0):,}  "
        f"dead letters {counts.get('dead_letters', 0):,}  {rate:,.0f} records/s"
    )
    fraction = done_fraction(counts, total_bytes=total_bytes, total_offsets=total_offsets)
    if fraction is not None:
        text += f"  {fraction:.0%}"
        eta = eta_seconds(fraction, elapsed)
        if fraction < 1 and eta is not None:
            text += f" ETA {format_duration(eta)}"
    return f"{text}  elapsed {format_duration(elapsed)}"


class ProgressLine:
    """Redraws the progress line on ``stream`` while the run is on (a context manager).

    The last state stays on screen, ended by a newline, when the run ends. With
    ``counts_visible``, the counts are ``tally``'s (by default, what this process counts
    from now on).
    """

    def __init__(
        self,
        pipeline: str,
        *,
        counts_visible: bool,
        tally: RunTally | None = None,
        total_bytes: int = 0,
        total_offsets: int = 0,
        stream: TextIO | None = None,
        interval: float = INTERVAL_S,
    ) -> None:
        self._pipeline = pipeline
        self._visible = counts_visible
        self._tally = tally if tally is not None else RunTally()
        self._total_bytes = total_bytes
        self._total_offsets = total_offsets
        self._stream = stream
        self._interval = interval
        self._stop = threading.Event()
        self._busy = threading.Lock()  # held while drawing: see fork_safe_thread
        self._thread: threading.Thread | None = None
        self._registered = contextlib.ExitStack()
        self._started = 0.0
        self._width = 0

    def _draw(self) -> None:
        counts = self._tally.counts() if self._visible else None
        text = format_progress(
            self._pipeline,
            counts,
            time.monotonic() - self._started,
            total_bytes=self._total_bytes,
            total_offsets=self._total_offsets,
        )
        # Spaces, not a terminal escape, blank what a longer previous line left.
        padding = " " * max(0, self._width - len(text))
        self._width = len(text)
        stream = self._stream or sys.stderr
        stream.write(f"\r{text}{padding}")
        stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._busy:
                self._draw()

    def __enter__(self) -> ProgressLine:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="progress-line", daemon=True)
        self._registered.enter_context(fork_safe_thread(self._thread, self._busy))
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._registered.close()
        self._draw()
        (self._stream or sys.stderr).write("\n")
        (self._stream or sys.stderr).flush()


def counts_visible(options: PipelineOptions) -> bool:
    """Whether the workers' counts reach this process's tally while the run is on.

    True when every worker runs in this process: the local runners without
    ``multi_processing``, and portable runs with ``--environment_type LOOPBACK`` (the
    default streaming runner, Prism, is started so), which is also what Beam's Flink
    runner picks for an embedded Flink (``--flink_master [local]`` or ``[auto]``) when no
    environment is given. Used by the progress line and the ``--metrics_port`` endpoint.
    """
    runner = str(options.view_as(StandardOptions).runner or "").rsplit(".", 1)[-1]
    if runner in _IN_PROCESS_RUNNERS:
        return options.view_as(DirectOptions).direct_running_mode != "multi_processing"
    environment = str(options.view_as(PortableOptions).environment_type or "").upper()
    if runner == "FlinkRunner" and not environment:
        master = options.view_as(FlinkRunnerOptions).flink_master
        return master in _EMBEDDED_FLINK
    return runner in ("PortableRunner", "FlinkRunner") and environment == "LOOPBACK"


def workers_publish(options: PipelineOptions) -> bool:
    """Whether the run's workers are local processes that publish their counts.

    The local runner (and Beam's FnApiRunner, which the DirectRunner hands bounded
    pipelines to) in ``multi_processing`` mode, whose workers are forked or started on
    this machine and inherit the launcher's environment (``worker_tallies.RunTally``).
    """
    runner = str(options.view_as(StandardOptions).runner or "").rsplit(".", 1)[-1]
    mode = options.view_as(DirectOptions).direct_running_mode
    return runner in _LOCAL_PROCESS_RUNNERS and mode == "multi_processing"


def progress_shown(config: PipelineConfig, requested: bool | None) -> bool:
    """Whether the run shows a progress line: bounded, on a terminal unless ``requested`` says."""
    show = sys.stderr.isatty() if requested is None else requested
    return show and not config.streaming


def run_tally(
    config: PipelineConfig,
    options: PipelineOptions,
    requested: bool | None,
    directory: str,
    *,
    endpoint: bool,
) -> RunTally:
    """The run's tally, for its progress line and its ``--metrics_port`` ``endpoint``.

    Its worker processes publish their counts in ``directory`` (the run's own) when they
    are local processes (:func:`workers_publish`) and something reads them: the progress
    line, when shown, or the endpoint. Otherwise they publish nothing.
    """
    read = endpoint or progress_shown(config, requested)
    return RunTally(directory if read and workers_publish(options) else None)


def progress_line(
    config: PipelineConfig,
    options: PipelineOptions,
    requested: bool | None,
    tally: RunTally | None = None,
) -> ProgressLine | None:
    """The run's progress line: for bounded runs, on a terminal unless ``requested`` says.

    ``tally``: the run's (with the workers' published counts when they are processes).
    """
    if not progress_shown(config, requested):
        return None
    published = tally is not None and tally.published and workers_publish(options)
    visible = counts_visible(options) or published
    if config.kafka is not None:
        offsets = sum(p.stop - p.start for p in config.kafka_partitions if p.stop > p.start)
        return ProgressLine(
            config.pipeline, counts_visible=visible, tally=tally, total_offsets=offsets
        )
    return ProgressLine(
        config.pipeline, counts_visible=visible, tally=tally, total_bytes=input_bytes(config.input)
    )
