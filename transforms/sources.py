"""File sources: JSON-lines files (plain or gzip) on any Beam filesystem.

Each line becomes ``(raw_bytes, source)`` where ``source`` is ``path:line`` so that dead
letters point at the exact line. Bytes are not decoded here: bad UTF-8 is the parser's to
report, and dead letters keep the line byte for byte.
"""

from __future__ import annotations

import gzip
import logging
import time
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import BeamIOError, FileSystems
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from transforms.drain import Ticks

__all__ = ["FollowFiles", "ReadLines", "iter_lines", "match_inputs"]

_LOG = logging.getLogger(__name__)


def match_inputs(pattern: str) -> list[str]:
    """Return the files a glob matches, or raise ValueError when it matches none."""
    results = FileSystems.match([pattern])[0].metadata_list
    paths = sorted(m.path for m in results)
    if not paths:
        msg = f"--input matches no files: {pattern}"
        raise ValueError(msg)
    return paths


def iter_lines(path: str) -> Iterator[tuple[bytes, str]]:
    """Yield ``(line, "path:number")`` for every non-blank line of a file.

    Line endings are removed; nothing else is touched. ``.gz`` files are decompressed.
    Blank lines are not records and are skipped (they are not counted as read).
    """
    for number, line in enumerate(_open_lines(path), 1):
        stripped = line.rstrip(b"\r\n")
        if stripped.strip():
            yield stripped, f"{path}:{number}"


def _open_lines(path: str) -> Iterator[bytes]:
    if "://" not in path:
        # Local files: the C-level line iterators of open()/gzip are several times faster
        # than Beam's generic readers.
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as handle:
            yield from handle
        return
    with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as handle:
        while True:
            line = handle.readline()
            if not line:
                return
            yield line


class ReadLines(beam.PTransform):
    """Read every line of the files matching a glob as ``(raw_bytes, "path:line")``.

    Files are the unit of parallelism; each file is read in one pass.
    """

    def __init__(self, pattern: str) -> None:
        super().__init__()
        if not pattern:
            msg = "an input pattern is required"
            raise ValueError(msg)
        self._pattern = pattern

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (
            pbegin
            | "Match" >> fileio.MatchFiles(self._pattern)
            | "Path" >> beam.Map(lambda metadata: metadata.path)
            # Without this the runner fuses matching with reading and one worker reads
            # every file; spreading paths lets files be read in parallel.
            | "Spread" >> beam.Reshuffle()
            | "Lines" >> beam.FlatMap(iter_lines)
        )


class _NewFilesFn(beam.DoFn):
    """Keyed by the glob: on every tick, emits each matching file once, once it has settled."""

    SEEN = ReadModifyWriteStateSpec("seen", PickleCoder())

    def __init__(self, pattern: str, settle_seconds: float) -> None:
        self._pattern = pattern
        self._settle = settle_seconds

    def process(
        self, element: tuple[str, int], seen: Any = beam.DoFn.StateParam(SEEN)
    ) -> Iterator[str]:
        known: set[str] = seen.read() or set()
        try:
            matches = FileSystems.match([self._pattern])[0].metadata_list
        except BeamIOError as exc:
            _LOG.warning("--follow: matching %s failed: %s", self._pattern, exc)
            return
        # A file still being written would be read half; wait until it has not changed for
        # settle_seconds (ship files by writing elsewhere and renaming, as log shippers do).
        cutoff = time.time() - self._settle
        new = sorted(
            m.path
            for m in matches
            if m.path not in known and (m.last_updated_in_seconds or 0) <= cutoff
        )
        if new:
            seen.write(known | set(new))
        yield from new


class FollowFiles(beam.PTransform):
    """Watch a glob and read every file that appears, as ``(raw_bytes, "path:line")``.

    Unbounded. The glob is matched every ``interval`` seconds; each file is read once,
    when its modification time is at least ``settle_seconds`` old. Files that match at
    start are read too. A restarted run reads them all again: the transaction ids are
    stable, so Moesif's dedup absorbs what was already delivered.
    """

    def __init__(self, pattern: str, interval: float = 5.0, settle_seconds: float = 2.0) -> None:
        super().__init__()
        if not pattern:
            msg = "an input pattern is required"
            raise ValueError(msg)
        if interval <= 0 or settle_seconds < 0:
            msg = f"need interval > 0 and settle_seconds >= 0, got {interval}, {settle_seconds}"
            raise ValueError(msg)
        self._pattern = pattern
        self._interval = interval
        self._settle = settle_seconds

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (
            pbegin
            | "Tick" >> Ticks(self._interval)
            | "ByGlob" >> beam.Map(lambda tick, glob: (glob, tick), self._pattern)
            | "NewFiles"
            >> beam.ParDo(_NewFilesFn(self._pattern, self._settle)).with_input_types(
                tuple[str, int]
            )
            | "Spread" >> beam.Reshuffle()
            | "Lines" >> beam.FlatMap(iter_lines)
        )
