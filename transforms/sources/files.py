"""File sources: JSON-lines files (plain or gzip) on any Beam filesystem.

Each line becomes ``(raw_bytes, source)`` where ``source`` is ``path:line`` so that dead
letters point at the exact line. Bytes are not decoded here: bad UTF-8 is the parser's to
report, and dead letters keep the line byte for byte.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.coders import PickleCoder
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import BeamIOError, FileSystems
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from moesif_beam.transforms.common.counters import counter
from moesif_beam.transforms.common.errors import require_positive
from moesif_beam.transforms.deadletters.letters import DEAD_LETTER, dead_letter
from moesif_beam.transforms.records import Line, new_line
from moesif_beam.transforms.sources.drain import Ticks
from moesif_beam.transforms.sources.ranges import (
    RANGE_BYTES,
    RangeClaims,
    claimed_ranges,
    plan_ranges,
    splittable,
    tokens_over,
)

__all__ = [
    "MAX_LINE_BYTES",
    "FollowFiles",
    "Lines",
    "Oversized",
    "RangeClaims",
    "ReadLines",
    "input_bytes",
    "iter_lines",
    "iter_range",
    "match_inputs",
    "plan_ranges",
    "splittable",
]

_LOG = logging.getLogger(__name__)


# The longest line read by default: above the largest batch body Moesif takes (15 MB of
# actions), so a line holding a whole /v1/actions/batch body still fits.
MAX_LINE_BYTES = 16 << 20
_SCAN_CHUNK = 1 << 20


def match_inputs(pattern: str) -> list[str]:
    """Return the files a glob matches, or raise ValueError when it matches none."""
    results = FileSystems.match([pattern])[0].metadata_list
    paths = sorted(m.path for m in results)
    if not paths:
        msg = f"--input matches no files: {pattern}"
        raise ValueError(msg)
    return paths


def iter_lines(path: str, max_line_bytes: int = 0) -> Iterator[tuple[Any, str]]:
    """Yield ``(line, "path:number")`` for every non-blank line of a file.

    Line endings are removed; nothing else is touched. ``.gz`` files are decompressed.
    Blank lines are not records and are skipped (they are not counted as read). With
    ``max_line_bytes``, a longer line is yielded as an :class:`Oversized` in its place,
    and only its first :data:`OVERSIZED_HEAD` bytes are ever held in memory (on local
    files read line by line; other filesystems read the line whole first, and a planned
    range of at most 32 MiB is read whole, see ``_WHOLE_RANGE_BYTES``).

    Raises:
        OSError, EOFError, zlib.error: the file cannot be read or decompressed; lines
            before the failure have been yielded.
    """
    return _numbered(_open_lines(path, max_line_bytes), path, 1)


# What a dead letter keeps of a line too long to read whole.
OVERSIZED_HEAD = 64 << 10


@dataclass(frozen=True)
class Oversized:
    """A line longer than the reader's limit: its first bytes and its full length."""

    head: bytes
    size: int


def _numbered(
    lines: Iterable[bytes | Oversized], path: str, first: int
) -> Iterator[tuple[Any, str]]:
    for number, line in enumerate(lines, first):
        if isinstance(line, Oversized):
            yield line, f"{path}:{number}"
            continue
        stripped = line.rstrip(b"\r\n")
        if stripped.strip():
            yield stripped, f"{path}:{number}"


def _bounded(handle: Any, limit: int) -> Iterator[bytes | Oversized]:
    """Lines of ``handle``; a line over ``limit`` bytes (ending excluded) as Oversized."""
    while True:
        line = handle.readline(limit + 2)  # room for "\r\n" after a line of exactly limit
        if not line:
            return
        if len(line.rstrip(b"\r\n")) <= limit and (line.endswith(b"\n") or len(line) < limit + 2):
            yield line
            continue
        # Over the limit: keep the head, count the rest without holding it. The ending
        # ("\r\n", say) can be cut across two reads: count its bytes over every read.
        head, size, last = line[:OVERSIZED_HEAD], len(line), line
        ending = _ending(line, 0)
        while not last.endswith(b"\n"):
            last = handle.readline(_SCAN_CHUNK)
            if not last:
                break
            size += len(last)
            ending = _ending(last, ending)
        newline = b"\n" if last.endswith(b"\n") else b""
        carriage_returns = size - len(line) - len(newline)
        if size - ending <= limit and carriage_returns <= OVERSIZED_HEAD:
            # Only more "\r" (and the "\n") followed: the line is within the limit after
            # all, and whole in the first read. Its bytes as consumed, for the range's count
            # (a run of "\r" longer than OVERSIZED_HEAD stays an over-long line: it is not
            # rebuilt in memory).
            yield line + b"\r" * carriage_returns + newline
            continue
        yield Oversized(head, size - ending)


def _ending(chunk: bytes, before: int) -> int:
    """Bytes of line ending at the end of what was read, ``before`` of them before ``chunk``."""
    content = len(chunk.rstrip(b"\r\n"))
    return before + len(chunk) if content == 0 else len(chunk) - content


def _open_lines(path: str, max_line_bytes: int = 0) -> Iterator[bytes | Oversized]:
    if "://" not in path:
        # Local files: the C-level line readers of open()/gzip are several times faster
        # than Beam's generic readers.
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as handle:
            if max_line_bytes:
                yield from _bounded(handle, max_line_bytes)
            else:
                yield from handle
        return
    with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as handle:
        while True:
            line = handle.readline()
            if not line:
                return
            if max_line_bytes and len(line.rstrip(b"\r\n")) > max_line_bytes:
                yield Oversized(line[:OVERSIZED_HEAD], len(line.rstrip(b"\r\n")))
                continue
            yield line


def iter_range(
    file_range: tuple[str, int, int, int], max_line_bytes: int = 0
) -> Iterator[tuple[Any, str]]:
    """Yield ``(line, "path:number")`` for the non-blank lines of one planned range.

    ``max_line_bytes`` is as for :func:`iter_lines`.
    """
    path, start, end, first_line = file_range
    if end < 0:
        return iter_lines(path, max_line_bytes)
    if _at_once(file_range, max_line_bytes):
        return _range_at_once(path, start, end, first_line, max_line_bytes)
    return _numbered(_lines_between(path, start, end, max_line_bytes), path, first_line)


def _at_once(file_range: tuple[str, int, int, int], max_line_bytes: int) -> bool:
    """A planned range small enough to read in one call (see :data:`_WHOLE_RANGE_BYTES`)."""
    _, start, end, _ = file_range
    # Limits under OVERSIZED_HEAD are left to the line reader, whose dead letters then
    # keep only what it read of the line (its first max_line_bytes + 2 bytes).
    return (
        end >= 0
        and end - start <= _WHOLE_RANGE_BYTES
        and (max_line_bytes == 0 or max_line_bytes > OVERSIZED_HEAD)
    )


# A planned range up to this size is read in one call and cut into lines at C speed: the
# same lines, numbers and over-long lines as the line-by-line reader, for a quarter of its
# cost (measured: 4.1 µs a line through the layered generators, about 1 µs this way). It
# holds the range twice while it is cut (up to 64 MiB), and an over-long line inside it
# whole, up to this size; a larger range (one holding a line far beyond RANGE_BYTES) is
# read line by line, and there an over-long line is never held whole.
_WHOLE_RANGE_BYTES = 4 * RANGE_BYTES


def _range_at_once(
    path: str, start: int, end: int, first_line: int, max_line_bytes: int
) -> Iterator[tuple[Any, str]]:
    for item in _range_lines(path, start, end, first_line, max_line_bytes):
        yield (item.raw, item.source) if type(item) is Line else item


def _range_lines(
    path: str, start: int, end: int, first_line: int, max_line_bytes: int
) -> list[Any]:
    """A planned range read in one call and cut in memory, as the line reader would.

    A ``Line`` for each line that is not blank, an ``(Oversized, source)`` pair for each
    one over ``max_line_bytes``, in order. When no line has a CR, is blank or is too long
    (checked at C speed, the usual case), the lines are built without a Python loop.
    """
    with open(path, "rb") as handle:
        handle.seek(start)
        data = handle.read(end - start)
        if data and not data.endswith(b"\n"):
            # The range's last line had no newline when it was planned (a file still being
            # written): read on to its end, as the line reader does.
            data += handle.readline(max_line_bytes + 2 if max_line_bytes else -1)
    has_cr = b"\r" in data
    lines = data.split(b"\n")
    del data
    if lines and not lines[-1]:
        lines.pop()  # the range ends with a newline: nothing follows it
    limit = max_line_bytes or sys.maxsize
    prefix = f"{path}:"
    if (
        not has_cr
        and all(map(bytes.strip, lines))  # strip() returns the line itself, or b"" if blank
        and (not lines or max(map(len, lines)) <= limit)
    ):
        sources = [f"{prefix}{number}" for number in range(first_line, first_line + len(lines))]
        # Each line's offset in the file (Line.at), summed at C speed: a line and its "\n".
        offsets = itertools.accumulate(map((1).__add__, map(len, lines)), initial=start)
        return list(map(new_line, zip(lines, sources, itertools.repeat(None), offsets)))
    out: list[Any] = []
    for number, line in enumerate(lines, first_line):
        stripped = line.rstrip(b"\r")
        if len(stripped) > limit:
            out.append((Oversized(line[:OVERSIZED_HEAD], len(stripped)), f"{prefix}{number}"))
        elif stripped.strip():
            out.append(Line(stripped, f"{prefix}{number}"))
    return out


def _lines_between(
    path: str, start: int, end: int, max_line_bytes: int = 0
) -> Iterator[bytes | Oversized]:
    with open(path, "rb") as handle:
        handle.seek(start)
        position = start
        lines: Iterable[bytes | Oversized] = (
            _bounded(handle, max_line_bytes) if max_line_bytes else handle
        )
        for line in lines:
            yield line
            # A line read whole is exactly the bytes it consumed; only after an oversized
            # one (whose ending was not kept) is the file asked. tell() per line cost a
            # tenth of a million-event run's reading (a system call each, measured).
            if isinstance(line, Oversized):
                position = handle.tell()
            else:
                position += len(line)
            if position >= end:
                return


class _ReadFn(beam.DoFn):
    """Reads one planned range (or a whole file); a failure becomes a dead letter.

    A file that cannot be opened, read or decompressed (a truncated or corrupt ``.gz``)
    gives one ``unreadable_input`` dead letter naming the file and how far the read got;
    the lines before the failure go on as usual. A line over ``max_line_bytes`` gives a
    ``too_large`` dead letter holding its first bytes. Each such letter counts once in
    ``read``, so the run's books still balance.
    """

    def __init__(self, pipeline: str, max_line_bytes: int) -> None:
        require_positive("max_line_bytes", max_line_bytes)
        self._pipeline = pipeline
        self._max_line_bytes = max_line_bytes
        self._read = counter("read")
        self._too_large = counter("too_large")
        self._unreadable = counter("unreadable_inputs")
        self._bytes_read = counter("bytes_read")

    def process(self, file_range: Any) -> Iterable[Any]:
        if isinstance(file_range, str):
            file_range = (file_range, 0, -1, 1)
        elif type(file_range) is RangeClaims:
            return self._read_claimed(file_range)
        if _at_once(file_range, self._max_line_bytes):
            return self._read_at_once(file_range)
        return self._read_in_turn(file_range)

    def _read_claimed(self, claims: RangeClaims) -> Iterator[Any]:
        for file_range in claimed_ranges(claims):
            yield from self.process(file_range)

    def _read_in_turn(self, file_range: tuple[str, int, int, int]) -> Iterator[Any]:
        try:
            yield from self._read_range(file_range)
        finally:
            # Once per range, never per line: what the progress line measures input by.
            self._bytes_read.inc(_range_bytes(file_range))

    def _read_at_once(self, file_range: tuple[str, int, int, int]) -> list[Any]:
        """A planned range's outputs as one list: no generator resumed per line."""
        path, start, end, first_line = file_range
        try:
            items = _range_lines(path, start, end, first_line, self._max_line_bytes)
        except Exception as exc:
            # Reached only for failures of the file itself: open, read.
            return [self._unreadable_letter(file_range, exc, 0, "")]
        finally:
            # Once per range, never per line: what the progress line measures input by.
            self._bytes_read.inc(_range_bytes(file_range))
        for index, item in enumerate(items):
            if type(item) is not Line:
                items[index] = self._oversized(*item)
        return items

    def _read_range(self, file_range: tuple[str, int, int, int]) -> Iterator[Any]:
        lines, last = 0, ""
        try:
            for line, source in iter_range(file_range, self._max_line_bytes):
                if isinstance(line, Oversized):
                    yield self._oversized(line, source)
                else:
                    lines += 1
                    last = source
                    yield Line(line, source)
        except Exception as exc:
            # Reached only for failures of the file itself: open, read, decompress.
            yield self._unreadable_letter(file_range, exc, lines, last)

    def _unreadable_letter(
        self, file_range: tuple[str, int, int, int], exc: Exception, lines: int, last: str
    ) -> pvalue.TaggedOutput:
        path = file_range[0]
        self._read.inc()
        self._unreadable.inc()
        where = f"after line {last.rsplit(':', 1)[-1]}" if last else "before its first line"
        detail = (
            f"cannot read {path}: {type(exc).__name__}: {exc}"[:300]
            + f"; the read stopped {where} ({lines:,} lines read"
            + (f" from byte {file_range[1]:,})" if file_range[1] else ")")
        )
        letter = dead_letter("unreadable_input", "read", detail, b"", path, self._pipeline)
        return pvalue.TaggedOutput(DEAD_LETTER, letter)

    def _oversized(self, line: Oversized, source: str) -> pvalue.TaggedOutput:
        self._read.inc()
        self._too_large.inc()
        detail = (
            f"line is {line.size:,} bytes; --max_line_bytes is {self._max_line_bytes:,} "
            f"(the payload holds its first {len(line.head):,} bytes)"
        )
        letter = dead_letter("too_large", "read", detail, line.head, source, self._pipeline)
        return pvalue.TaggedOutput(DEAD_LETTER, letter)


def _range_bytes(file_range: tuple[str, int, int, int]) -> int:
    """The bytes of input a range covers: as stored (compressed, for a ``.gz`` file)."""
    path, start, end, _ = file_range
    if end >= 0:
        return end - start
    try:
        if "://" not in path:
            return os.path.getsize(path)
        return int(FileSystems.match([path])[0].metadata_list[0].size_in_bytes)
    except (OSError, BeamIOError, IndexError):
        return 0


def input_bytes(pattern: str) -> int:
    """The bytes of input a glob matches, as stored: what ``bytes_read`` counts up to."""
    return sum(m.size_in_bytes for m in FileSystems.match([pattern])[0].metadata_list)


class Lines(NamedTuple):
    """Outputs of the file readers."""

    lines: beam.PCollection  # Line(raw_bytes, "path:line")
    dead_letters: beam.PCollection  # unreadable files and over-long lines


class _PlanRanges(beam.PTransform):
    def __init__(self, pattern: str, range_bytes: int, claims: tuple[str, int] | None) -> None:
        super().__init__()
        self._pattern = pattern
        self._range_bytes = range_bytes
        self._claims = claims

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        planned = (
            pbegin
            | "Match" >> fileio.MatchFiles(self._pattern)
            | "Plan"
            >> beam.FlatMap(
                lambda metadata, size: plan_ranges(metadata.path, size), self._range_bytes
            )
        )
        if self._claims is not None:
            planned = (
                planned
                | "Gather" >> beam.combiners.ToList()
                | "Tokens" >> beam.FlatMap(tokens_over, *self._claims)
            )
        # Without this the runner fuses planning with reading and one worker reads
        # everything; spreading ranges (or tokens) lets them be read in parallel.
        return planned | "Spread" >> beam.Reshuffle()


class ReadLines(beam.PTransform):
    """Read every line of the files matching a glob as ``(raw_bytes, "path:line")``.

    Each file is read once. Large local plain files are read as several line-aligned
    ranges (see ``plan_ranges``) so that a multi-worker runner reads and parses them on
    every worker; other files are read whole. A file that cannot be read, and a line over
    ``max_line_bytes``, become dead letters (see :class:`Lines`); the other files and
    lines are read as usual.

    With ``claims_dir`` (a local directory, for runners that never run a bundle twice),
    the ranges are not split between the workers up front: each worker claims the next
    unclaimed range as it goes (:class:`RangeClaims`), handed ``claim_tokens`` alike
    tokens in all. The same lines are read, once each.
    """

    def __init__(
        self,
        pattern: str,
        range_bytes: int = RANGE_BYTES,
        *,
        pipeline: str = "events",
        max_line_bytes: int = MAX_LINE_BYTES,
        claims_dir: str | None = None,
        claim_tokens: int = 4,
    ) -> None:
        super().__init__()
        self._fn = _ReadFn(pipeline, max_line_bytes)
        if not pattern:
            msg = "an input pattern is required"
            raise ValueError(msg)
        if range_bytes <= 0:
            msg = f"range_bytes must be > 0, got {range_bytes}"
            raise ValueError(msg)
        if claims_dir is not None and ("://" in claims_dir or not claims_dir):
            msg = f"claims_dir must be a local directory, got {claims_dir!r}"
            raise ValueError(msg)
        require_positive("claim_tokens", claim_tokens)
        self._pattern = pattern
        self._range_bytes = range_bytes
        self._claims = None if claims_dir is None else (claims_dir, claim_tokens)

    def expand(self, pbegin: beam.pvalue.PBegin) -> Lines:
        read = (
            pbegin
            | "Ranges" >> self.ranges()
            | "Lines" >> beam.ParDo(self._fn).with_outputs(DEAD_LETTER, main="lines")
        )
        return Lines(read.lines, read[DEAD_LETTER])

    def ranges(self) -> beam.PTransform:
        """The planned ranges of the matching files, spread over workers: :meth:`stage`'s input."""
        return _PlanRanges(self._pattern, self._range_bytes, self._claims)

    def stage(self) -> beam.DoFn:
        """Reading one range as a stage of a :class:`~moesif_beam.transforms.common.fused.Fused`.

        ``Line`` main outputs and dead letters, as in :meth:`expand`.
        """
        return self._fn


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

    def __init__(
        self,
        pattern: str,
        interval: float = 5.0,
        settle_seconds: float = 2.0,
        *,
        pipeline: str = "events",
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        super().__init__()
        self._fn = _ReadFn(pipeline, max_line_bytes)
        if not pattern:
            msg = "an input pattern is required"
            raise ValueError(msg)
        if interval <= 0 or settle_seconds < 0:
            msg = f"need interval > 0 and settle_seconds >= 0, got {interval}, {settle_seconds}"
            raise ValueError(msg)
        self._pattern = pattern
        self._interval = interval
        self._settle = settle_seconds

    def expand(self, pbegin: beam.pvalue.PBegin) -> Lines:
        read = (
            pbegin
            | "Tick" >> Ticks(self._interval)
            | "ByGlob" >> beam.Map(lambda tick, glob: (glob, tick), self._pattern)
            | "NewFiles"
            >> beam.ParDo(_NewFilesFn(self._pattern, self._settle)).with_input_types(
                tuple[str, int]
            )
            | "Spread" >> beam.Reshuffle()
            | "Lines" >> beam.ParDo(self._fn).with_outputs(DEAD_LETTER, main="lines")
        )
        return Lines(read.lines, read[DEAD_LETTER])
