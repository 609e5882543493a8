"""``moesif-beam kafka-local``: a real single-node Kafka broker in the foreground."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType
from typing import Any

from moesif_beam.runners.emulators.kafka_local.broker import LocalKafka
from moesif_beam.runners.emulators.kafka_local.config import (
    KAFKA_VERSION,
    KafkaConfig,
    LocalKafkaError,
)


class _StopRequested(Exception):
    """Raised by the signal handler when SIGTERM/SIGINT arrives while the broker starts."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moesif-beam kafka-local",
        description=(
            "Run a real single-node Apache Kafka broker (KRaft) in the foreground until SIGTERM "
            f"or Ctrl-C. Kafka {KAFKA_VERSION} is fetched from Maven Central on first use."
        ),
    )
    parser.add_argument("--port", type=int, default=9092, help="client port (0 = a free port)")
    parser.add_argument(
        "--data_dir", default="kafka-data", help="storage directory, kept across runs"
    )
    parser.add_argument(
        "--partitions", type=int, default=1, help="partitions of auto-created topics"
    )
    parser.add_argument("--heap", default="512m", help="maximum Java heap, e.g. 512m or 1g")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--controller_port", type=int, default=0, help="KRaft controller port (0 = a free port)"
    )
    parser.add_argument("--version", default=KAFKA_VERSION, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the broker in the foreground: ``moesif-beam kafka-local --port P --data_dir D``.

    Prints exactly one line to stdout once the broker serves clients,
    ``kafka listening on HOST:PORT (data in DIR)``, then runs until SIGTERM or SIGINT and stops
    the broker cleanly.

    Args:
        argv: Command-line arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        0 after a clean stop (also when stopped while still starting), 1 if the broker cannot
        start or dies on its own, 2 for invalid arguments.
    """
    args = _build_parser().parse_args(argv)
    try:
        config = KafkaConfig(
            data_dir=args.data_dir,
            port=args.port,
            host=args.host,
            controller_port=args.controller_port,
            heap=args.heap,
            version=args.version,
            partitions=args.partitions,
        )
    except ValueError as exc:
        print(f"moesif-beam kafka-local: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()
    starting = True

    def request_stop(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        stop.set()
        if starting:
            # Interrupt a start that may take up to a minute; start() kills its half-started
            # broker on the way out.
            raise _StopRequested

    previous: dict[int, Any] = {}
    # Signal handlers can only be installed from the main thread.
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, request_stop)
    broker = LocalKafka(config)
    try:
        try:
            broker.start()
        except _StopRequested:
            return 0
        except LocalKafkaError as exc:
            print(f"moesif-beam kafka-local: {exc}", file=sys.stderr)
            return 1
        finally:
            starting = False
        print(
            f"kafka listening on {broker.bootstrap_servers} (data in {broker.data_dir})",
            flush=True,
        )
        try:
            # A timed wait keeps the main thread responsive to signals and notices a broker
            # that dies on its own.
            while not stop.wait(0.5):
                if not broker.running:
                    print(
                        "moesif-beam kafka-local: the broker exited unexpectedly; last lines of "
                        f"{broker.log_path}:\n{broker.log_tail()}",
                        file=sys.stderr,
                    )
                    return 1
        finally:
            broker.stop()
        return 0
    finally:
        broker.kill()  # no-op after a clean stop; covers every other way out
        for restored, handler in previous.items():
            signal.signal(restored, handler)
