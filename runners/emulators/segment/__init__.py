"""A local emulator of Segment's HTTP Tracking API, for tests and trials.

Segment cannot be reached from our machines, so ``moesif-beam profiles``' Segment output
is exercised against this emulator, over real HTTP: basic auth with the write key, the
32 KB per call and 500 KB per batch limits, dedup by ``messageId``, and inspection of
what arrived (see :mod:`.server`).

Typical use in a test::

    with start_in_thread(SegmentConfig(write_key="wk_...")) as segment:
        run_profiles(segment.url)
        assert segment.messages("identify")

From the command line: ``moesif-beam segment-emulator --port 9600`` (or
``python -m moesif_beam.runners.emulators.segment``).
"""

from moesif_beam.runners.emulators.segment.server import (
    BATCH_LIMIT_BYTES,
    CALL_LIMIT_BYTES,
    RunningSegment,
    SegmentConfig,
    calls_of,
    start_in_thread,
)

__all__ = [
    "BATCH_LIMIT_BYTES",
    "CALL_LIMIT_BYTES",
    "RunningSegment",
    "SegmentConfig",
    "calls_of",
    "main",
    "start_in_thread",
]


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted: ``--port``, ``--host`` (default 127.0.0.1), ``--write_key``."""
    import argparse  # noqa: PLC0415
    import os  # noqa: PLC0415
    import threading  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="moesif-beam segment-emulator",
        description="A local Segment Tracking API emulator.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9600)
    parser.add_argument(
        "--write_key",
        default=os.environ.get("SEGMENT_WRITE_KEY"),
        help="the only write key accepted (or env SEGMENT_WRITE_KEY); default: any",
    )
    args = parser.parse_args(argv)
    running = start_in_thread(SegmentConfig(args.write_key, args.host, args.port))
    print(f"segment emulator on {running.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        running.stop()
    return 0
