"""What the benchmarks share: the collector emulator as a process of its own, and its stats."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
APP_ID = "benchmark-app"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_collector(data_dir: str) -> tuple[subprocess.Popen, str]:
    """The emulator in its fast count-only mode, in its own process, costing every side alike."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moesif_beam.runners.emulators.collector",
            "--port",
            str(port),
            "--data_dir",
            data_dir,
            # The fast count-only mode: parse, count and dedup, no field checks.
            "--store",
            "count",
            "--metadata_types",
            "off",
            "--validation",
            "off",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # "collector listening on ..."
    return proc, f"http://127.0.0.1:{port}"


def collector_stats(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/_emulator/stats", timeout=30) as response:
        return dict(json.load(response))


def reset_collector(url: str) -> None:
    request = urllib.request.Request(f"{url}/_emulator/reset", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=30):
        pass
