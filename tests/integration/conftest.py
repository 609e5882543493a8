"""Fixtures for the Flink tests: the job server's classpath and a ``flink-local`` cluster."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="session")
def flink_jobserver() -> str:
    """The Flink job server's classpath, fetched (about 150 MB, once) before any clock starts."""
    from moesif_beam.runners.engines.flink import ensure_flink_jobserver

    return ensure_flink_jobserver()


@pytest.fixture(scope="session")
def flink_local(flink_jobserver, tmp_path_factory) -> Iterator[int]:
    """``moesif-beam flink-local`` (Flink fetched from PyPI once), stopped by SIGTERM after."""
    from moesif_beam.runners.engines.children import free_port
    from moesif_beam.runners.engines.flink_cluster import ensure_flink_home

    ensure_flink_home()
    port = free_port()
    data_dir = tmp_path_factory.mktemp("flink-local")
    command = [sys.executable, "-m", "moesif_beam.runners.cli", "flink-local"]
    proc = subprocess.Popen(
        [*command, "--port", str(port), "--data_dir", str(data_dir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # printed once the REST API and the workers answer
    assert line.startswith(f"flink listening on 127.0.0.1:{port} "), (line, proc.stderr.read())
    yield port
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
