"""Beam's Prism runner for local streaming runs, built once from Beam's Go module.

The Python SDK would download a Prism binary from GitHub; that is out of reach on many
machines (and on ours). Prism is a Go module, so ``go install`` at the pinned Beam version
builds the same runner from the Go module proxy. The binary is cached under
``~/.cache/moesif-beam/prism-<beam version>/``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from apache_beam.version import __version__ as BEAM_VERSION

from runners.children import child_options

__all__ = ["BEAM_VERSION", "PrismServer", "ensure_prism", "prism_path"]

_MODULE = "github.com/apache/beam/sdks/v2/go/cmd/prism"


def prism_path(version: str = BEAM_VERSION) -> Path:
    """Where the Prism binary for ``version`` is cached."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "moesif-beam" / f"prism-{version}" / "prism"


def ensure_prism(version: str = BEAM_VERSION) -> str:
    """Return the path of a Prism binary for ``version``, building it on first use.

    Raises:
        RuntimeError: Go is not installed, or the build failed (with Go's output).
    """
    target = prism_path(version)
    if target.is_file() and os.access(target, os.X_OK):
        return str(target)
    go = shutil.which("go")
    if go is None:
        msg = (
            "streaming runs locally on Beam's Prism runner, which moesif-beam builds with Go "
            "(`go install`); install Go 1.24+ or choose another runner (--runner FlinkRunner)"
        )
        raise RuntimeError(msg)
    print(
        f"moesif-beam: building Beam's Prism runner {version} with go install into "
        f"{target.parent} (first use only, a few minutes)...",
        file=sys.stderr,
        flush=True,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as build_dir:
        env = dict(os.environ, GOBIN=build_dir, GOFLAGS="-mod=mod")
        # Keep Go's downloads with ours under ~/.cache unless the user chose otherwise.
        env.setdefault("GOMODCACHE", str(target.parent.parent / "go-mod"))
        result = subprocess.run(
            [go, "install", f"{_MODULE}@v{version}"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        built = Path(build_dir) / "prism"
        if result.returncode != 0 or not built.is_file():
            msg = f"building Prism failed:\n{result.stderr[-2000:]}"
            raise RuntimeError(msg)
        # Rename within one directory: atomic, so a half-built binary is never cached.
        built.replace(target)
    return str(target)


class PrismServer:
    """A Prism job server of our own, in its own session.

    Beam's PrismRunner starts Prism in our process group, so a Ctrl-C or a group-wide
    SIGTERM (``timeout``, systemd) kills it before we can drain. Started here with a new
    session, Prism only stops when we stop it, after the drain.
    """

    def __init__(self, binary: str, log_path: str) -> None:
        self._binary = binary
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self.endpoint = ""

    def start(self, timeout: float = 30.0) -> str:
        """Start Prism and return its job endpoint (``localhost:port``) once it listens."""
        port = _free_port()
        log = open(self._log_path, "ab")  # noqa: SIM115 - handed to the child process
        self._process = subprocess.Popen(
            [self._binary, "--job_port", str(port), "--log_level", "warn", "--serve_http=false"],
            stdout=log,
            stderr=log,
            **child_options(),  # its own session, and it dies if we are killed
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                msg = (
                    f"Prism exited at start (code {self._process.returncode}); see {self._log_path}"
                )
                raise RuntimeError(msg)
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    self.endpoint = f"localhost:{port}"
                    return self.endpoint
            time.sleep(0.1)
        self.stop()
        msg = f"Prism did not listen on port {port} within {timeout:.0f}s; see {self._log_path}"
        raise RuntimeError(msg)

    def stop(self) -> None:
        """Stop Prism (SIGTERM, then SIGKILL after 10 s)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
