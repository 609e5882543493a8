"""A streaming ``moesif-beam events`` run in a subprocess, and waiting on what it does.

Shared by the Kafka streaming tests on the default runner and on Flink, with the one
scenario both run: a stream killed after it delivered, restarted with copies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.conftest import REPO
from tests.kafka_support import committed, produce

SAMPLE = REPO / "samples" / "wso2_sample.jsonl"


class StreamingRun:
    """``moesif-beam events ARGS`` with its log and counters under ``tmp_path``.

    Stopped by SIGTERM (:meth:`drain`, which must exit 0) or SIGKILL (:meth:`kill`).
    """

    def __init__(self, tmp_path: Path, name: str, args: Sequence[str], app_id: str) -> None:
        self.log = tmp_path / f"{name}.log"
        self.metrics = tmp_path / f"{name}-metrics.json"
        env = dict(os.environ, MOESIF_APPLICATION_ID=app_id)
        command = [sys.executable, "-m", "moesif_beam.runners.cli", "events", *args]
        self.proc = subprocess.Popen(
            [*command, "--metrics_out", str(self.metrics)],
            cwd=REPO,
            env=env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def drain(self, timeout: float = 90) -> dict:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout) == 0, self.log.read_text()[-3000:]
        return json.loads(self.metrics.read_text())

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    run: StreamingRun | None = None,
) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` s, or at once if ``run`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if run is not None:
            assert run.proc.poll() is None, run.log.read_text()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def wso2_event(tid: str, **extra: object) -> bytes:
    """The sample's second event with ``tid`` as its correlation id, and ``extra`` fields."""
    event = json.loads(SAMPLE.read_bytes().splitlines()[1])
    event["correlationId"] = tid
    event.update(extra)
    return json.dumps(event).encode()


def wait_for_commits(
    bootstrap: str,
    group: str,
    topic: str,
    partitions: int,
    total: int,
    timeout: float,
    run: StreamingRun | None = None,
    what: str = "every offset to be committed",
) -> None:
    """Wait until ``group`` has committed ``total`` offsets over ``topic``'s partitions."""
    wait_for(
        lambda: sum(committed(bootstrap, group, topic, partitions)) == total, timeout, what, run
    )


def kill_then_restart_with_copies(
    start: Callable[[str], StreamingRun],
    bootstrap: str,
    topic: str,
    group: str,
    delivered: Sequence[str],
    new: Sequence[str],
    timeout: float,
    drain_timeout: float,
) -> dict:
    """A stream killed after delivering, then restarted with a copy of every id it delivered.

    ``start(name)`` starts the stream on ``topic`` (2 partitions) with consumer ``group``.
    The first run gets ``delivered`` (metadata ``tier`` "first") and is SIGKILLed once they
    are all committed; then a copy of each (``tier`` "copy", other offsets) and ``new`` are
    produced, and a second run goes until every offset is committed, then drains (within
    ``drain_timeout``). Returns the second run's counters.
    """
    produce(bootstrap, topic, [wso2_event(t, tier="first") for t in delivered], partitions=2)
    first = start("first")
    try:
        what = "the first run to deliver and commit"
        wait_for_commits(bootstrap, group, topic, 2, len(delivered), timeout, first, what)
    finally:
        first.kill()  # a crash: no drain
    copies = [wso2_event(t, tier="copy") for t in delivered]
    produce(bootstrap, topic, [*copies, *[wso2_event(t) for t in new]], partitions=2)
    second = start("second")
    try:
        total = 2 * len(delivered) + len(new)
        wait_for_commits(bootstrap, group, topic, 2, total, timeout, second)
    finally:
        metrics = second.drain(drain_timeout)
    return metrics
