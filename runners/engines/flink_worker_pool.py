"""Beam's Python worker pool for a Flink cluster's EXTERNAL environment, on loopback only.

``python -m moesif_beam.runners.engines.flink_worker_pool PORT``: Beam's
``worker_pool_main`` (each worker a process of this environment's Python, so the workers
import moesif_beam), with its gRPC server bound to 127.0.0.1 instead of every interface.
"""

from __future__ import annotations

import os
import sys

from apache_beam.runners.worker import worker_pool_main

from moesif_beam.runners.engines.loopback import loopback_grpc_servers


def main(argv: list[str]) -> None:
    """Serve the worker pool on 127.0.0.1:``argv[0]`` until killed."""
    # Beam starts each worker as ``python`` from PATH: make that this environment's Python
    # (measured: another one fails with "No module named 'apache_beam'" and the job hangs).
    bin_dir = os.path.dirname(sys.executable)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    with loopback_grpc_servers():
        worker_pool_main.main(["--service_port", argv[0]])


if __name__ == "__main__":
    main(sys.argv[1:])
