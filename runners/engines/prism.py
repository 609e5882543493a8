"""Beam's Prism runner for local streaming runs, built once from Beam's Go module.

The Python SDK would download a Prism binary from GitHub; that is out of reach on many
machines (and on ours). Prism is a Go module, so Go builds the same runner from the Go
module proxy, at the pinned Beam version. The binary is cached under
``~/.cache/moesif-beam/prism-<beam version>-loopback/``.

One line of Prism is changed before it is built: its job server, which also serves its
workers' Fn API (control, data, state, logging), listens on every interface (``:port``,
with no flag to choose), unauthenticated, so anyone who reaches the machine could submit a
job. moesif-beam builds it to listen on 127.0.0.1 only; it tells its clients
``localhost:port`` anyway, so nothing that worked before stops working.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from apache_beam.version import __version__ as BEAM_VERSION

from moesif_beam.runners.engines.children import child_options, free_port, log_tail, stop_process

__all__ = ["BEAM_VERSION", "PrismServer", "ensure_prism", "loopback_only", "prism_path"]

_GO_MODULE = "github.com/apache/beam/sdks/v2"
_MAIN = "./go/cmd/prism"
# The listener of Prism's job and worker endpoints, and what it becomes.
_LISTEN_FILE = "go/pkg/beam/runners/prism/internal/jobservices/server.go"
_LISTEN_ANY = 'net.Listen("tcp", fmt.Sprintf(":%d", port))'
_LISTEN_LOOPBACK = 'net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))'


def prism_path(version: str = BEAM_VERSION) -> Path:
    """Where the (loopback-only) Prism binary for ``version`` is cached."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "moesif-beam" / f"prism-{version}-loopback" / "prism"


def loopback_only(source: str) -> str:
    """Prism's ``server.go`` with its listener bound to 127.0.0.1 instead of every interface.

    Raises:
        RuntimeError: the source does not have the one line this expects (another Beam
            version): building a Prism that listens everywhere would be silently worse.
    """
    if source.count(_LISTEN_ANY) != 1:
        msg = (
            f"cannot make Prism listen on loopback only: {_LISTEN_FILE} does not contain "
            f"{_LISTEN_ANY} exactly once (has Beam changed it?)"
        )
        raise RuntimeError(msg)
    return source.replace(_LISTEN_ANY, _LISTEN_LOOPBACK)


def _go(go: str, args: list[str], env: dict[str, str], cwd: str | None = None) -> str:
    result = subprocess.run(
        [go, *args], env=env, cwd=cwd, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        msg = f"building Prism failed (go {' '.join(args)}):\n{result.stderr[-2000:]}"
        raise RuntimeError(msg)
    return result.stdout


def _writable_copy(module_dir: str, destination: str) -> None:
    """Copy the Go SDK part of Beam's module (read-only in Go's cache) to ``destination``."""
    os.makedirs(destination)
    for name in ("go.mod", "go.sum"):
        shutil.copyfile(os.path.join(module_dir, name), os.path.join(destination, name))
    shutil.copytree(os.path.join(module_dir, "go"), os.path.join(destination, "go"))
    for root, dirs, files in os.walk(destination):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o700)
        for name in files:
            os.chmod(os.path.join(root, name), 0o600)


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
            "streaming runs locally on Beam's Prism runner, which moesif-beam builds with Go; "
            "install Go 1.24+ or choose another runner (--runner FlinkRunner)"
        )
        raise RuntimeError(msg)
    print(
        f"moesif-beam: building Beam's Prism runner {version} with Go into "
        f"{target.parent} (first use only, a few minutes)...",
        file=sys.stderr,
        flush=True,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as build_dir:
        env = dict(os.environ, GOFLAGS="-mod=mod")
        # Keep Go's downloads with ours under ~/.cache unless the user chose otherwise.
        env.setdefault("GOMODCACHE", str(target.parent.parent / "go-mod"))
        listing = _go(go, ["mod", "download", "-json", f"{_GO_MODULE}@v{version}"], env, build_dir)
        module_dir = json.loads(listing)["Dir"]
        source = os.path.join(build_dir, "src")
        _writable_copy(module_dir, source)
        listen = Path(source, _LISTEN_FILE)
        listen.write_text(loopback_only(listen.read_text()))
        built = Path(build_dir) / "prism"
        _go(go, ["build", "-trimpath", "-o", str(built), _MAIN], env, source)
        if not built.is_file():
            msg = "building Prism failed: go build made no binary"
            raise RuntimeError(msg)
        # Rename within one directory: atomic, so a half-built binary is never cached.
        built.replace(target)
    return str(target)


class PrismServer:
    """A Prism job server of our own, in its own session, logging to ``log_path``.

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
        port = free_port()
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
                code = self._process.returncode
                msg = f"Prism exited at start (code {code}){log_tail(self._log_path, 10)}"
                raise RuntimeError(msg)
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    self.endpoint = f"localhost:{port}"
                    return self.endpoint
            time.sleep(0.1)
        self.stop()
        tail = log_tail(self._log_path, 10)
        msg = f"Prism did not listen on port {port} within {timeout:.0f}s{tail}"
        raise RuntimeError(msg)

    def stop(self) -> None:
        """Stop Prism (SIGTERM, then SIGKILL after 10 s)."""
        process, self._process = self._process, None
        stop_process(process, timeout=10)
