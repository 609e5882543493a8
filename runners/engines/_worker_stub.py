"""The worker command of the local runner (``local_workers``): asks the fork server for a worker.

Run by the FnApiRunner in place of ``python -m apache_beam.runners.worker.sdk_worker_main``,
as ``python -I -S _worker_stub.py SOCKET``. It imports nothing but the standard library,
so it starts in milliseconds; it hands its environment (the runner's control and logging
endpoints, the pipeline options) to the fork server, waits for the forked worker to end,
and exits with the worker's exit code, so the runner sees what it would have seen from a
worker process of its own.
"""

import json
import os
import signal
import socket
import sys

# What the runner puts in a worker's environment (see Beam's SubprocessSdkWorker).
_WORKER_ENV = (
    "CONTROL_API_SERVICE_DESCRIPTOR",
    "LOGGING_API_SERVICE_DESCRIPTOR",
    "PIPELINE_OPTIONS",
    "WORKER_ID",
)


def main(path: str) -> int:
    # Ctrl-C is the launcher's to handle (see local_workers._serve): this stub, like the
    # worker it stands for, ends when that worker does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    request = {key: os.environ[key] for key in _WORKER_ENV if key in os.environ}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        conn.sendall(json.dumps(request).encode("utf-8"))
        conn.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := conn.recv(64):
            reply += chunk
    # No reply: the worker died without reporting (killed, or crashed in C).
    return int(reply) if reply.strip().isdigit() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
