"""Worker processes for bounded local runs, forked instead of started.

Beam's FnApiRunner in ``multi_processing`` mode starts each worker as a new Python
process, which imports Beam and our transforms again: about 2 s of CPU per worker
before it processes a record (measured on 2 cores; the whole run of a 1,000-event file
took 6.2 s with two workers against 3.4 s with none). This runner forks its workers
from a copy of the launcher instead, taken once everything is imported and before any
thread or gRPC connection exists, so a worker is ready in milliseconds.

Only the way a worker process comes to life changes. The runner still speaks to it over
the Fn API as to any worker process, the worker still runs Beam's own SDK harness, and
its exit code still reaches the runner (see :mod:`moesif_beam.runners.engines._worker_stub`).
Where forking is not safe (not Linux, or threads already running) it starts workers as Beam
does. A thread of our own that must run across the fork (the progress line's) says so with
:func:`fork_safe_thread`: the fork waits until that thread holds none of the locks a forked
process could inherit held.

Each worker publishes its counts for the launcher's progress line and metrics endpoint
(transforms/common/worker_tallies.py): a forked worker starts its publisher as it starts,
and writes its final counts before it reports its exit code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import shlex
import shutil
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

from apache_beam.options.pipeline_options import DirectOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

# Imported with this module, so that every forked worker has the SDK harness loaded.
from apache_beam.runners.worker import sdk_worker_main
from apache_beam.transforms import environments

from moesif_beam.runners.engines.run_state import make_temp_dir
from moesif_beam.transforms.common.garbage import collect_garbage_less_often
from moesif_beam.transforms.common.worker_tallies import (
    publish_from_this_worker,
    stop_publishing,
)

__all__ = ["ForkServer", "LocalRunner", "fork_safe_thread"]

_LOG = logging.getLogger(__name__)

_STUB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_worker_stub.py")


class ForkServer:
    """A process, forked from this one, that forks SDK workers on request.

    :meth:`start` forks it; :meth:`command` is the worker command line the runner runs
    for each worker; :meth:`stop` ends it (workers already running end when the runner
    closes their control channel, as Beam's own worker processes do).
    """

    def __init__(self) -> None:
        self._pid: int | None = None
        self._keepalive: int | None = None
        self._directory = ""  # holds the server's socket, once started

    @staticmethod
    def can_fork() -> bool:
        """Forking is safe here: Linux, and no thread runs but this one.

        A fork keeps only the calling thread, and a lock another thread held stays locked
        for ever. So no other Python thread may run, nor any native thread started since
        this module was imported (a Kafka client's, gRPC's). The threads present at import
        (numpy's BLAS pool, jemalloc's background thread) are the libraries' own and
        handle fork themselves.
        """
        # Linux only: on macOS system frameworks are not fork-safe (Python itself spawns
        # there by default), and elsewhere there is no fork.
        if not sys.platform.startswith("linux"):
            return False
        with _SAFE_LOCK:
            safe = dict(_SAFE_THREADS)
        here = threading.current_thread()
        if any(t is not here and t not in safe for t in threading.enumerate()):
            return False
        safe_ids = {str(t.native_id) for t in safe if t.native_id is not None}
        return _os_threads() - safe_ids <= _THREADS_AT_IMPORT

    def start(self) -> None:
        # Claimed by this process: if the launcher is killed, the next run removes it.
        self._directory = make_temp_dir("workers")
        path = self._socket_path()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen(16)
        except OSError:
            listener.close()
            raise
        keepalive_read, self._keepalive = os.pipe()
        # What this process has buffered but not written would otherwise be written again
        # by every fork that flushes.
        sys.stdout.flush()
        sys.stderr.flush()
        with _fork_safe_threads_paused():
            pid = os.fork()
        if pid == 0:  # the fork server
            os.close(self._keepalive)
            code = 1
            try:
                _serve(listener, keepalive_read)
                code = 0
            finally:
                os._exit(code)
        listener.close()
        os.close(keepalive_read)
        self._pid = pid

    def command(self) -> str:
        """The shell command that gets one forked worker and waits for it.

        The runner runs it with a shell, which would die of a Ctrl-C while it waits: the
        shell ignores SIGINT and replaces itself with the stub, which then ignores it from
        its first instruction (see :func:`_serve`).
        """
        parts = (sys.executable, "-I", "-S", _STUB, self._socket_path())
        return "trap '' INT; exec " + " ".join(shlex.quote(part) for part in parts)

    def stop(self) -> None:
        """End the server; safe to call twice, or after a :meth:`start` that failed."""
        if self._keepalive is not None:
            os.close(self._keepalive)  # the server sees end-of-file and leaves
            self._keepalive = None
        if self._pid is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._pid, 0)
            self._pid = None
        if self._directory:
            shutil.rmtree(self._directory, ignore_errors=True)  # the socket and owner file
            self._directory = ""

    def _socket_path(self) -> str:
        return os.path.join(self._directory, "fork.sock")


def _os_threads() -> frozenset[str]:
    """Ids of this process's threads as the OS knows them (empty where it cannot tell)."""
    try:
        return frozenset(os.listdir("/proc/self/task"))
    except OSError:
        return frozenset()


# The CLI imports this module before it does any work (see runners/cli.py).
_THREADS_AT_IMPORT = _os_threads()

# Threads that may run while the fork server is forked, each with the lock it holds while
# it touches anything shared (a stream, the tally).
_SAFE_THREADS: dict[threading.Thread, threading.Lock] = {}
_SAFE_LOCK = threading.Lock()


@contextlib.contextmanager
def fork_safe_thread(thread: threading.Thread, busy: threading.Lock) -> Iterator[None]:
    """While inside, ``thread`` does not keep the launcher from forking its workers.

    ``thread`` must hold ``busy`` whenever it is doing anything but waiting: while it
    writes to a stream, takes a lock another module owns, or calls into a library. The
    fork takes ``busy`` first, so the fork server is made while the thread waits, and
    inherits no lock held by a thread it does not have. Register the thread before it
    starts.
    """
    with _SAFE_LOCK:
        _SAFE_THREADS[thread] = busy
    try:
        yield
    finally:
        with _SAFE_LOCK:
            _SAFE_THREADS.pop(thread, None)


@contextlib.contextmanager
def _fork_safe_threads_paused() -> Iterator[None]:
    with _SAFE_LOCK:
        locks = list(_SAFE_THREADS.values())
    with contextlib.ExitStack() as held:
        for lock in locks:
            held.enter_context(lock)
        # Python 3.12+ warns of any fork with threads running; these are accounted for.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield


def _serve(listener: socket.socket, keepalive: int) -> None:
    """The fork server's loop: one worker per connection, until the launcher goes away."""
    # A terminal's Ctrl-C reaches the whole process group. The launcher handles it (one
    # line, its clean-up, exit 130); this server and the workers it forks ignore it and
    # end when the launcher goes (the keepalive here, each worker's control channel), as
    # after any end of the launcher. Killed by Ctrl-C themselves, the workers made each
    # of the runner's threads print a traceback before the launcher could say anything.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(keepalive, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select(timeout=1.0):
            if key.fileobj is not listener:
                return  # the launcher closed its end (or died)
            conn, _ = listener.accept()
            request = b""
            while chunk := conn.recv(65536):
                request += chunk
            if os.fork() == 0:
                selector.close()
                listener.close()
                os.close(keepalive)
                _run_worker(conn, json.loads(request))
            conn.close()
        _reap()


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _run_worker(conn: socket.socket, env: dict[str, str]) -> None:
    """Run Beam's SDK harness in this (forked) process; report its exit code; never return."""
    code = 1
    try:
        os.environ.update(env)
        # The harness sends its logs to the runner; the launcher's handlers, inherited by
        # the fork, would print every line a second time.
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        publish_from_this_worker()
        # In the worker, not once in the fork server after a gc.collect(): measured
        # 375-379 MiB peak PSS at 1M against 396-416, the fork server's collection wrote
        # to pages the workers would otherwise have shared.
        collect_garbage_less_often()
        sdk_worker_main.main([])
        code = 0
    except BaseException:  # reported through the exit code, as a worker process would
        _LOG.exception("forked SDK worker failed")
    finally:
        # Before the exit code: the runner, then the launcher, go on once they have it.
        with contextlib.suppress(Exception):
            stop_publishing()
        # os._exit skips the interpreter's own flushing: what the worker's code printed
        # is written here, as a worker process's would be at its exit.
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            conn.sendall(str(code).encode("ascii"))
            conn.close()
        os._exit(code)


class LocalRunner(FnApiRunner):
    """Beam's FnApiRunner, with ``multi_processing`` workers forked rather than started.

    Everything else, including ``--direct_num_workers`` and the other running modes, is
    the FnApiRunner's own.
    """

    def run_pipeline(self, pipeline: Any, options: Any) -> Any:
        direct = options.view_as(DirectOptions)
        if direct.direct_running_mode != "multi_processing":
            return super().run_pipeline(pipeline, options)
        if not ForkServer.can_fork():
            _LOG.info("starting worker processes: forking is not safe with threads running")
            return super().run_pipeline(pipeline, options)
        server = ForkServer()
        try:
            server.start()
        except OSError as exc:  # e.g. a socket path over the 108-byte limit of a long TMPDIR
            _LOG.info("starting worker processes: no fork server (%s)", exc)
            server.stop()
            return super().run_pipeline(pipeline, options)
        # This run's command points at this run's fork server only.
        default_environment = self._default_environment
        try:
            self._default_environment = environments.SubprocessSDKEnvironment.from_command_string(
                server.command()
            )
            # The environment is chosen above; "in_memory" keeps the FnApiRunner from
            # replacing it with its own subprocess command.
            direct.direct_running_mode = "in_memory"
            with _quiet_mode_warning():
                return super().run_pipeline(pipeline, options)
        finally:
            direct.direct_running_mode = "multi_processing"
            self._default_environment = default_environment
            server.stop()


@contextlib.contextmanager
def _quiet_mode_warning() -> Any:
    """Drop the FnApiRunner's warning that in_memory with several workers is not parallel.

    It is parallel here: the workers are the forked processes chosen above.
    """
    fn_runner_log = logging.getLogger("apache_beam.runners.portability.fn_api_runner.fn_runner")

    def keep(record: logging.LogRecord) -> bool:
        return "direct_running_mode" not in record.getMessage()

    fn_runner_log.addFilter(keep)
    try:
        yield
    finally:
        fn_runner_log.removeFilter(keep)
