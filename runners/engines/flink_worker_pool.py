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
    """Serve the worker pool on 127.0.0.1:``argv[0]`` until killed.

    With ``argv[1]`` (a directory), each worker is started by a launcher script written
    there, which runs :func:`worker` (this module, ``--worker``) instead of Beam's bare
    ``SdkHarness``, so that the worker's data queues are set up for Flink 2.62.
    """
    # Beam starts each worker as ``python`` from PATH: make that this environment's Python
    # (measured: another one fails with "No module named 'apache_beam'" and the job hangs).
    bin_dir = os.path.dirname(sys.executable)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    args = ["--service_port", argv[0]]
    if len(argv) > 1:
        args += ["--container_executable", _launcher(argv[1])]
    with loopback_grpc_servers():
        worker_pool_main.main(args)


_MODULE = "moesif_beam.runners.engines.flink_worker_pool"


def _launcher(directory: str) -> str:
    path = os.path.join(directory, "moesif-beam-sdk-worker")
    with open(path, "w", encoding="utf-8") as handle:
        # This module by name: run with -m, its __name__ is "__main__".
        handle.write(f'#!/bin/sh\nexec "{sys.executable}" -m {_MODULE} --worker "$@"\n')
    os.chmod(path, 0o755)  # noqa: S103 - only this user's data directory holds it
    return path


def worker(argv: list[str]) -> None:
    """One SDK worker, as Beam's container entry point is called (``--id``, endpoints)."""
    from apache_beam.runners.worker.sdk_worker import SdkHarness  # noqa: PLC0415

    from moesif_beam.runners.engines.flink import unbounded_sdk_send_queues  # noqa: PLC0415

    flags = dict(arg[2:].split("=", 1) for arg in argv if arg.startswith("--") and "=" in arg)
    unbounded_sdk_send_queues()
    SdkHarness(flags["control_endpoint"], worker_id=flags.get("id")).run()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        main(sys.argv[1:])
