"""What a run keeps on disk: claimed by its owner while it runs, removed after a killed one.

A bounded run spills records under ``<output_dir>/.dedup-spill/<pipeline>-<run id>`` and
writes the metadata keys it adds under ``<output_dir>/.schema-pending/...``; a run forks
its workers through a socket in a temporary directory; Beam makes temporary directories of
its own while it builds and submits a job; Prism writes a log. A run that ends removes what
it made. A run that is killed (``kill -9``, the OOM killer, a power cut) cannot, so every
such directory carries an owner file naming the process that made it (its pid, the
process's start time and the boot it belongs to: a pid alone is reused), and each run
starts by removing the directories whose owner is gone. A directory whose owner still runs
is never touched, nor one without an owner file that is not empty (moesif-beam did not
claim it, or made it before this rule).

Ownership is judged from ``/proc``: on systems without it nothing is ever cleaned up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moesif_beam.pipelines.config import PipelineConfig

__all__ = [
    "OWNER_FILE",
    "TEMP_PREFIX",
    "Owner",
    "RunDirectory",
    "claim_dir",
    "make_temp_dir",
    "remove_abandoned",
    "remove_claimed",
    "start_run",
]

_LOG = logging.getLogger(__name__)

# Written into every directory a run claims.
OWNER_FILE = ".moesif-beam-owner"
# Every temporary directory moesif-beam makes starts with this.
TEMP_PREFIX = "moesif-beam-"
# An unclaimed, empty directory this old is one whose maker died between making it and
# writing its owner file (a few microseconds): removed. Younger, it may be being claimed.
_UNCLAIMED_GRACE_S = 60.0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks after boot, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses;
    # the fields after the last ")" start at field 3, and the start time is field 22.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Owner:
    """One process, told apart from any later process that gets the same pid."""

    pid: int
    started: int
    boot: str

    @classmethod
    def of(cls, pid: int) -> Owner | None:
        """The running process ``pid``, or None if there is none (or no ``/proc``)."""
        started = _start_time(pid)
        boot = _boot_id()
        if started is None or not boot:
            return None
        return cls(pid, started, boot)

    @classmethod
    def current(cls) -> Owner | None:
        """This process (looked up afresh, so a forked child is not its parent)."""
        return cls.of(os.getpid())

    def alive(self) -> bool:
        """Whether this very process still runs (a zombie counts as gone)."""
        if self.boot != _boot_id():
            return False
        started = _start_time(self.pid)
        if started is None:
            # Hidden from us (another user's process under /proc's hidepid) or gone: only
            # a process we may not signal is taken to be alive, as it may be the owner.
            try:
                os.kill(self.pid, 0)
            except PermissionError:
                return True
            except OSError:
                return False
            return False
        if started != self.started:
            return False
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        return state[state.rfind(")") + 2 :].split()[:1] != ["Z"]

    def encode(self) -> str:
        return json.dumps({"pid": self.pid, "started": self.started, "boot": self.boot})

    @classmethod
    def decode(cls, text: str) -> Owner | None:
        try:
            data = json.loads(text)
            return cls(int(data["pid"]), int(data["started"]), str(data["boot"]))
        except (ValueError, KeyError, TypeError):
            return None


def _write_owner(directory: str, owner: Owner | None) -> None:
    if owner is None:  # no /proc: the directory stays unclaimed, and is never cleaned up
        return
    path = os.path.join(directory, OWNER_FILE)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(owner.encode())


def _is_local(path: str) -> bool:
    return "://" not in path


def claim_dir(path: str) -> str:
    """Make directory ``path`` (and its parents) and claim it for this process.

    Remote paths (``gs://...``) are left to their filesystem: nothing is made or claimed.
    """
    if not _is_local(path):
        return path
    for attempt in range(3):
        try:
            os.makedirs(path, exist_ok=True)
            break
        except FileNotFoundError:  # a parent was removed by an ending run meanwhile
            if attempt == 2:
                raise
    _write_owner(path, Owner.current())
    return path


def make_temp_dir(kind: str, parent: str | None = None) -> str:
    """A new private temporary directory ``moesif-beam-<kind>-*``, claimed by this process."""
    directory = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{kind}-", dir=parent)
    _write_owner(directory, Owner.current())
    return directory


def remove_claimed(path: str) -> None:
    """Remove a directory this run claimed, then its parent if that is left empty."""
    if not _is_local(path):
        return
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path.rstrip("/")))


def _abandoned(directory: str) -> bool:
    """Whether ``directory`` was claimed by a process that is gone, or never claimed."""
    try:
        text = Path(directory, OWNER_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        # Unclaimed: removed only when empty and old, i.e. its maker died before claiming.
        try:
            empty = not os.listdir(directory)
            age = time.time() - os.stat(directory).st_mtime
        except OSError:
            return False
        return empty and age > _UNCLAIMED_GRACE_S
    except OSError:  # an owner file we cannot read: not ours to judge
        return False
    owner = Owner.decode(text)
    return owner is not None and not owner.alive()


def _candidates(parent: str, prefix: str) -> Iterator[str]:
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False):
            yield entry.path


def remove_abandoned(parents: list[tuple[str, str]]) -> list[str]:
    """Remove the directories whose owner is gone; return their paths.

    Args:
        parents: ``(directory, name prefix)`` pairs: the entries of each directory whose
            names start with the prefix are examined (an empty prefix examines all).
    """
    removed: list[str] = []
    if not _boot_id():  # no /proc: liveness cannot be judged, so nothing is removed
        return removed
    for parent, prefix in parents:
        if not _is_local(parent):
            continue
        for directory in _candidates(parent, prefix):
            if not _abandoned(directory):
                continue
            shutil.rmtree(directory, ignore_errors=True)
            if not os.path.exists(directory):
                removed.append(directory)
                _LOG.info("removed %s, left by a run that is gone", directory)
    return removed


class RunDirectory:
    """One run's private temporary directory, and Beam's temporary files with it.

    While the run is on, Python's ``tempfile`` makes its files and directories inside it
    (Beam stages a job's dependencies in ``mkdtemp()`` directories it never removes), and
    the run's own files (Prism's log) live there. :meth:`close` removes it, and the
    directories the run claimed; if the run is killed instead, the next run removes them
    (see :func:`remove_abandoned`).
    """

    def __init__(self, claims: Sequence[str] = ()) -> None:
        self._claims = [claim_dir(path) for path in claims]
        self.path = make_temp_dir("run")
        self._previous_tempdir = tempfile.tempdir
        tempfile.tempdir = self.path

    def file(self, name: str) -> str:
        """The path of the run's own file ``name``."""
        return os.path.join(self.path, name)

    def close(self) -> None:
        """Remove the run's directory and what it claimed; safe to call twice."""
        if tempfile.tempdir == self.path:
            tempfile.tempdir = self._previous_tempdir
        shutil.rmtree(self.path, ignore_errors=True)
        claims, self._claims = self._claims, []
        for path in claims:
            remove_claimed(path)


def start_run(config: PipelineConfig) -> RunDirectory:
    """Remove what killed runs left, then claim this run's directories.

    Examined: moesif-beam's temporary directories, and the spill and pending-schema
    directories under ``config.output_dir`` (every run's, whatever its pipeline).
    """
    spill, pending = config.spill_dir, config.schema_pending_dir
    remove_abandoned(
        [
            (tempfile.gettempdir(), TEMP_PREFIX),
            (os.path.dirname(spill), ""),
            (os.path.dirname(pending), ""),
        ]
    )
    claims = []
    if not config.streaming:  # streams neither spill nor write keys aside
        claims.append(pending)
        if config.dedup_spill:
            claims.append(spill)
    return RunDirectory(claims)
