"""The counts of a local run's worker processes, handed to the launcher through small files.

The in-process tally (:mod:`.counters`) is exact, but only the process that counts can
read it. When a bounded local run's workers are processes of their own (the FnApiRunner's
``multi_processing``: forked by runners/engines/local_workers.py, or started by Beam with
``--start_workers``), each worker publishes its tally and the launcher sums them:

- The launcher (:class:`RunTally`, entered around the run) names a directory, the run's
  own private one, and an id for this run in the environment, with its own pid; worker
  processes on this machine inherit the environment, forked or started.
- A worker starts one publisher thread: a forked worker as it starts, a started one the
  first time it makes a counter (a DoFn's counters come to life when the worker
  unpickles it). Never per record: the counters' ``inc`` is unchanged. Every half second,
  when its tally has changed, the thread writes ``tally-<pid>.json`` (written aside, then
  renamed over the last, so a reader never sees half a file); once more when the worker
  ends, so the launcher's last look has every count.
- The launcher reads the files of its run (others are ignored: another run's id, a name
  that is not a published tally, a file that does not parse) and adds what its own
  process counted since the run started.

The launcher itself never publishes, nor does any process when the environment names no
directory (in-process runs, clusters).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import threading
from collections.abc import Iterable, Mapping
from types import TracebackType

from moesif_beam.transforms.common.counters import tally_snapshot

__all__ = [
    "PUBLISH_INTERVAL_S",
    "TALLY_DIR_ENV",
    "TALLY_LAUNCHER_ENV",
    "TALLY_RUN_ENV",
    "RunTally",
    "decode_tally",
    "encode_tally",
    "publish_from_this_worker",
    "read_tallies",
    "stop_publishing",
    "sum_tallies",
    "tally_path",
]

TALLY_DIR_ENV = "MOESIF_BEAM_TALLY_DIR"
TALLY_RUN_ENV = "MOESIF_BEAM_TALLY_RUN"
TALLY_LAUNCHER_ENV = "MOESIF_BEAM_TALLY_LAUNCHER"
# The progress line is redrawn every half second: a worker publishes as often.
PUBLISH_INTERVAL_S = 0.5

_NAME = re.compile(r"tally-(\d+)\.json")


def tally_path(directory: str, pid: int) -> str:
    """Where worker ``pid`` publishes its tally."""
    return os.path.join(directory, f"tally-{pid}.json")


def encode_tally(run: str, pid: int, counts: Mapping[str, int]) -> str:
    """The text of one published tally."""
    return json.dumps({"run": run, "pid": pid, "counts": dict(counts)}, separators=(",", ":"))


def decode_tally(text: str, run: str) -> dict[str, int] | None:
    """The counts of one published tally of run ``run``; None for another run's or a bad one."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("run") != run:
        return None
    counts = data.get("counts")
    if not isinstance(counts, dict):
        return None
    if not all(isinstance(k, str) and type(v) is int for k, v in counts.items()):
        return None
    return counts


def read_tallies(directory: str, run: str) -> list[dict[str, int]]:
    """The tallies published in ``directory`` by run ``run``'s workers."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    tallies = []
    for name in names:
        if not _NAME.fullmatch(name):
            continue  # a file being written (``.tmp``), or not a tally at all
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as handle:
                text = handle.read()
        except OSError:
            continue
        counts = decode_tally(text, run)
        if counts is not None:
            tallies.append(counts)
    return tallies


def sum_tallies(tallies: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Counter by counter, the sum of ``tallies``."""
    total: dict[str, int] = {}
    for tally in tallies:
        for name, value in tally.items():
            total[name] = total.get(name, 0) + value
    return total


class _Publisher:
    """This worker's publisher thread (see the module docstring)."""

    def __init__(self, directory: str, run: str) -> None:
        self._path = tally_path(directory, os.getpid())
        self._run = run
        # A forked worker starts with a copy of its launcher's tally: not its counts.
        self._base = tally_snapshot()
        self._last: dict[str, int] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tally-publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def publish(self) -> None:
        now = tally_snapshot()
        counts = {name: n - self._base.get(name, 0) for name, n in now.items()}
        counts = {name: n for name, n in counts.items() if n}
        with self._lock:
            if counts == self._last:
                return
            aside = f"{self._path}.tmp"
            # The run's directory is gone once the run ended: nothing left to tell.
            with contextlib.suppress(OSError):
                with open(aside, "w", encoding="utf-8") as handle:
                    handle.write(encode_tally(self._run, os.getpid(), counts))
                os.replace(aside, self._path)
                self._last = counts

    def _loop(self) -> None:
        while not self._stop.wait(PUBLISH_INTERVAL_S):
            self.publish()

    def stop(self) -> None:
        """Stop the thread, then publish the final tally."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self.publish()


_PUBLISHER: _Publisher | None = None
_PUBLISHER_PID = 0
_START_LOCK = threading.Lock()


def publish_from_this_worker() -> None:
    """Start publishing this process's tally, if it is a worker of a run that reads them.

    Called when a counter is made and as a forked worker starts; after the first call in
    a process, a comparison of pids.
    """
    global _PUBLISHER, _PUBLISHER_PID
    pid = os.getpid()
    if pid == _PUBLISHER_PID:
        return
    directory = os.environ.get(TALLY_DIR_ENV)
    if not directory or os.environ.get(TALLY_LAUNCHER_ENV) == str(pid):
        return
    with _START_LOCK:
        if pid == _PUBLISHER_PID:
            return
        publisher = _Publisher(directory, os.environ.get(TALLY_RUN_ENV, ""))
        publisher.start()
        _PUBLISHER, _PUBLISHER_PID = publisher, pid
    # A worker Beam started ends by returning from its main: its final tally is written
    # then. A forked one leaves with os._exit, and calls stop_publishing itself.
    atexit.register(stop_publishing)


def stop_publishing() -> None:
    """Publish this worker's final tally and stop its publisher (nothing if it has none)."""
    if _PUBLISHER is not None and os.getpid() == _PUBLISHER_PID:
        _PUBLISHER.stop()


class RunTally:
    """What one run has counted so far, wherever its local workers run.

    The counts this process made since the tally was made, plus, with ``directory``, the
    tallies this run's worker processes published there. Entered around the run, it puts
    the directory and the run's id in the environment, for the workers to inherit.
    """

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory
        self.run = secrets.token_hex(8)
        self._base = tally_snapshot()
        self._saved: dict[str, str | None] = {}

    @property
    def published(self) -> bool:
        """Whether worker processes publish their counts to this tally."""
        return self.directory is not None

    def counts(self) -> dict[str, int]:
        """Every counter counted so far in this run, by name (counters never counted absent)."""
        here = tally_snapshot()
        delta = {name: n - self._base.get(name, 0) for name, n in here.items()}
        if self.directory is None:
            return delta
        return sum_tallies([delta, *read_tallies(self.directory, self.run)])

    def __enter__(self) -> RunTally:
        if self.directory is not None:
            values = {
                TALLY_DIR_ENV: self.directory,
                TALLY_RUN_ENV: self.run,
                TALLY_LAUNCHER_ENV: str(os.getpid()),
            }
            for key, value in values.items():
                self._saved[key] = os.environ.get(key)
                os.environ[key] = value
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved = {}
