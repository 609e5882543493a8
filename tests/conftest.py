"""Fixtures that start real local services for the integration tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from moesif_beam.runners.emulators.collector import (
    CollectorConfig,
    RunningCollector,
    start_in_thread,
)

REPO = Path(__file__).resolve().parent.parent

# A real Kafka broker for the tests that need one: see tests/kafka_support.py.
pytest_plugins = ["tests.kafka_support"]


@pytest.fixture
def start_collector(tmp_path: Path) -> Iterator[Callable[..., RunningCollector]]:
    """Start Moesif collector emulators on free loopback ports; stopped after the test."""
    running: list[RunningCollector] = []

    def start(**settings: Any) -> RunningCollector:
        data_dir = tmp_path / f"collector-{len(running)}"
        collector = start_in_thread(CollectorConfig(data_dir=str(data_dir), **settings))
        running.append(collector)
        return collector

    yield start
    for collector in running:
        collector.stop()


@pytest.fixture(scope="session")
def prism_runner() -> str:
    """Beam's Prism runner, built before any streaming test starts its clock.

    Built from Beam's Go module on first use (minutes on a fresh machine, then cached).
    """
    from moesif_beam.runners.engines.prism import ensure_prism

    return ensure_prism()


@dataclass
class CliRun:
    """One finished ``moesif-beam`` process."""

    returncode: int
    stdout: str
    stderr: str
    metrics: dict[str, Any]


def run_cli(
    args: list[str], *, app_id: str | None = None, metrics: Path | None = None, timeout: int = 180
) -> CliRun:
    """Run the real command line in a subprocess, as a user would."""
    env = {k: v for k, v in os.environ.items() if k != "MOESIF_APPLICATION_ID"}
    if app_id is not None:
        env["MOESIF_APPLICATION_ID"] = app_id
    if metrics is not None:
        args = [*args, "--metrics_out", str(metrics)]
    proc = subprocess.run(
        [sys.executable, "-m", "moesif_beam.runners.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    loaded = json.loads(metrics.read_text()) if metrics is not None and metrics.exists() else {}
    return CliRun(proc.returncode, proc.stdout, proc.stderr, loaded)


@pytest.fixture
def fresh_drain() -> Iterator[None]:
    """The drain flag and deadline are per process: each test starts and ends without one."""
    from moesif_beam.transforms.sources import drain

    def reset() -> None:
        drain._deadline = None
        drain._timed_out.clear()
        drain.DRAIN.clear()

    reset()
    yield
    reset()
