"""``moesif-beam collector``: run the emulator in the foreground, or inspect a running one."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from moesif_beam.runners.emulators.collector.config import (
    _METADATA_MODES,
    _VALIDATION_MODES,
    KINDS,
    CollectorConfig,
)
from moesif_beam.runners.emulators.collector.inspection import _inspect
from moesif_beam.runners.emulators.collector.server import start_in_thread

# One logger for the whole emulator, named after its package.
_LOG = logging.getLogger(__package__)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moesif-beam collector",
        description="Local emulator of Moesif's Collector API (validation, dedup, faults).",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    add("--port", type=int, default=9500, help="port; 0 picks a free one (default 9500)")
    add(
        "--data_dir",
        default="./collector-data",
        help="directory for collector.db (default ./collector-data); ':memory:' keeps no file",
    )
    add("--application_id", default=None, help="the only application id accepted (secret)")
    add("--fail_rate", type=float, default=0.0, help="probability an ingestion POST fails")
    add("--fail_status", type=int, default=503, help="status of injected failures (503)")
    add("--fail_first", type=int, default=0, help="the first N ingestion POSTs fail")
    add("--retry_after", type=float, default=None, help="Retry-After seconds on 429/503 faults")
    add("--latency_ms", type=int, default=0, help="delay added to ingestion POSTs")
    add("--latency_first", type=int, default=0, help="delay only the first N POSTs (0: all)")
    add("--drop_connection_rate", type=float, default=0.0, help="probability of a dropped socket")
    add("--drop_first", type=int, default=0, help="the first N ingestion POSTs are dropped")
    add("--seed", type=int, default=None, help="seed for the fault rates")
    add("--store", choices=("sqlite", "count"), default="sqlite", help="keep bodies, or count")
    add("--reject_older_than_days", type=int, default=None, help="reject events older than this")
    add(
        "--metadata_types",
        choices=_METADATA_MODES,
        default="enforce",
        help="enforce: refuse metadata whose key changes JSON type (default); off: no checks",
    )
    add(
        "--validation",
        choices=_VALIDATION_MODES,
        default="full",
        help="full: check every item's fields (default); off: only parse and count "
        "(with --store count --metadata_types off: the fast count-only mode)",
    )
    add("--redirect_to", default=None, help="answer every /v1 request 307 to this base URL")
    add("--tls_cert", default=None, help="serve HTTPS with this PEM certificate chain")
    add("--tls_key", default=None, help="the PEM private key of --tls_cert")
    add(
        "--arrival_lags",
        choices=("on", "off"),
        default="on",
        help="on: keep each event's lag behind its request.time for the stats (default); "
        "off: skip it (benchmarks that do not read it)",
    )
    add("--verbose", action="store_true", help="log one line per request to stderr")
    add("--inspect", metavar="URL", default=None, help="print a running emulator's stats, exit")
    add("--kind", choices=KINDS, default="events", help="with --inspect: records to show")
    add("--limit", type=int, default=20, help="with --inspect: how many records (default 20)")
    return parser


def _config_from_args(args: argparse.Namespace) -> CollectorConfig:
    in_memory = args.store == "count" or args.data_dir in ("", ":memory:")
    return CollectorConfig(
        host=args.host,
        port=args.port,
        data_dir=None if in_memory else args.data_dir,
        application_id=args.application_id,
        fail_rate=args.fail_rate,
        fail_status=args.fail_status,
        fail_first=args.fail_first,
        retry_after=args.retry_after,
        latency_ms=args.latency_ms,
        latency_first=args.latency_first,
        drop_connection_rate=args.drop_connection_rate,
        drop_first=args.drop_first,
        seed=args.seed,
        store=args.store,
        reject_older_than_days=args.reject_older_than_days,
        metadata_types=args.metadata_types,
        validation=args.validation,
        redirect_to=args.redirect_to,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        arrival_lags=args.arrival_lags == "on",
    )


def main(argv: list[str] | None = None) -> int:
    """Runs the emulator in the foreground, or inspects a running one with ``--inspect``.

    Serving prints exactly one line to stdout, ``collector listening on URL (data in DIR)``,
    then runs until SIGTERM or SIGINT and stops cleanly. The application id is never printed.

    Args:
        argv: Command-line arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        0 after a clean stop or a successful inspection, 1 if the port cannot be bound or the
        emulator cannot be reached, 2 for invalid arguments.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.inspect:
        return _inspect(args.inspect, args.kind, args.limit)
    try:
        config = _config_from_args(args)
    except ValueError as exc:
        print(f"moesif-beam collector: {exc}", file=sys.stderr)
        return 2
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        _LOG.setLevel(logging.INFO)

    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        stop.set()

    previous: dict[int, Any] = {}
    # Signal handlers can only be installed from the main thread (tests may call main()
    # elsewhere, e.g. for --inspect).
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, request_stop)
    try:
        try:
            running = start_in_thread(config, verbose=args.verbose)
        except OSError as exc:
            print(f"cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
            return 1
        where = "memory" if config.data_dir is None else str(Path(config.data_dir).resolve())
        print(f"collector listening on {running.url} (data in {where})", flush=True)
        try:
            # A timed wait keeps the main thread responsive to signals on every platform.
            while not stop.wait(0.5):
                pass
        finally:
            running.stop()
        if args.verbose:
            _LOG.info("collector stopped")
        return 0
    finally:
        for restored, handler in previous.items():
            signal.signal(restored, handler)
