"""The transaction ids a stream has delivered, kept in files so a new job still knows them.

A stream's dedup remembers ids in Beam state or worker memory, which a new job does not
have: after a restart (a stream stopped and started again, a crash, a Flink job that
cannot restore a checkpoint) a copy of an id delivered a minute before would be delivered
again. The journal closes that gap:

* delivery writes the ids of every batch that got its 2xx, one file per bundle, before the
  bundle's acknowledgements leave it, so an id whose Kafka offset is committed is always
  in the journal;
* the dedup of a new job (or of a shard that moved to another worker) reads the journal
  when it builds its memory, and drops later copies of those ids within the TTL.

Files are written whole under a fresh name and never changed; a file that is not a whole
journal file is ignored (and removed by the next compaction). Any worker may compact: it
writes the live entries of the files it read into one new file, then deletes those files,
so concurrent compactions only ever repeat entries. Entries are ``(transaction id, time
ms)``, the time being the wall clock when delivery's bundle ended; an entry is forgotten
a TTL after that (after the newest entry's time, if the clock is behind it).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Sequence

import orjson
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems

__all__ = [
    "DeliveredIds",
    "decode_entries",
    "encode_entries",
    "live_entries",
    "shard_of",
]

Entry = tuple[str, int]

_SUFFIX = ".ids"
# Files one reader keeps in its listing before a writer compacts them into one.
COMPACT_AFTER_FILES = 256


def shard_of(transaction_id: str, shards: int) -> int:
    """The dedup shard of a transaction id (the one :class:`DedupInStream` keys it to)."""
    return zlib.crc32(transaction_id.encode("utf-8")) % shards


def encode_entries(entries: Sequence[Entry]) -> bytes:
    """One journal file's bytes: a JSON array of ``[id, time_ms]`` pairs."""
    return orjson.dumps(entries)


def decode_entries(data: bytes) -> list[Entry] | None:
    """The entries of one file, or None when it is not a whole journal file."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(value, list):
        return None
    entries: list[Entry] = []
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or type(item[1]) is not int
        ):
            return None
        entries.append((item[0], item[1]))
    return entries


def live_entries(entries: Iterable[Entry], ttl_ms: int, now_ms: int = 0) -> dict[str, int]:
    """Each id once, at its earliest time, without those a TTL older than ``now_ms``.

    ``now_ms`` is raised to the newest entry's time when it is behind it.
    """
    earliest: dict[str, int] = {}
    for transaction_id, time_ms in entries:
        known = earliest.get(transaction_id)
        if known is None or time_ms < known:
            earliest[transaction_id] = time_ms
    if not earliest:
        return earliest
    newest = max(earliest.values())
    horizon = max(now_ms, newest) - ttl_ms
    return {tid: t for tid, t in earliest.items() if t >= horizon}


def _now_ms() -> int:
    return int(time.time() * 1000)


_LOG = logging.getLogger(__name__)


class DeliveredIds:
    """A journal directory (any Beam filesystem) of delivered ids; see the module docstring.

    Reading is incremental: each instance remembers the files it has read, so a later
    read costs one listing and the new files. One instance may be shared by threads.
    """

    def __init__(self, directory: str, ttl_ms: int) -> None:
        if not directory:
            msg = "the journal directory must not be empty"
            raise ValueError(msg)
        if ttl_ms < 1:
            msg = f"ttl_ms must be >= 1, got {ttl_ms}"
            raise ValueError(msg)
        self.directory = directory.rstrip("/")
        self.ttl_ms = ttl_ms
        self._lock = threading.Lock()
        self._read: set[str] = set()
        self._ids: dict[str, int] = {}
        self._by_shard: dict[int, dict[int, dict[str, int]]] = {}  # shards -> shard -> ids

    def _listing(self) -> list[str]:
        """The journal's files; none when the directory (or bucket prefix) has none yet.

        No ``exists`` check on the directory: on object stores a prefix is not an object.
        """
        pattern = FileSystems.join(self.directory, f"*{_SUFFIX}")
        try:
            matches = FileSystems.match([pattern])[0].metadata_list
        except BeamIOError:
            return []
        return sorted(m.path for m in matches)

    @staticmethod
    def _fetch(path: str) -> bytes | None:
        """A file's bytes; None when it is gone or cannot be read now."""
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                data: bytes = f.read()
        except OSError:
            return None
        return data

    def write(self, entries: Sequence[Entry]) -> None:
        """Add ``entries`` in one new file; returns once the file is whole."""
        if not entries:
            return
        name = f"{uuid.uuid4().hex}{_SUFFIX}"
        final = FileSystems.join(self.directory, name)
        # Written under a temporary name and renamed, so a listing never sees a partial file
        # (on local disks; object stores publish an object whole when it is closed). Beam's
        # local create makes missing directories; object stores need none.
        staging = FileSystems.join(self.directory, f".{name}.tmp")
        with FileSystems.create(staging, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(encode_entries(entries))
        FileSystems.rename([staging], [final])

    def read(self) -> dict[str, int]:
        """Every live delivered id with its time, files written since the last read included.

        A copy, safe to use while other threads read.
        """
        with self._lock:
            self._refresh()
            return dict(self._ids)

    def read_shard(self, shard: int, shards: int) -> dict[str, int]:
        """:meth:`read`, only the ids of one dedup shard (see :func:`shard_of`)."""
        with self._lock:
            self._refresh()
            index = self._by_shard.get(shards)
            if index is None:
                index = self._by_shard[shards] = {}
                for transaction_id, time_ms in self._ids.items():
                    part = shard_of(transaction_id, shards)
                    index.setdefault(part, {})[transaction_id] = time_ms
            return dict(index.get(shard, {}))

    def _refresh(self) -> None:
        fresh: list[Entry] = []
        # A file can vanish between the listing and its read when another worker compacts:
        # its entries are then in the compacted file, which the next listing shows.
        for _ in range(3):
            listing = self._listing()
            self._read &= set(listing)  # forget names compaction removed
            missed = False
            for path in listing:
                if path in self._read:
                    continue
                data = self._fetch(path)
                if data is None:
                    missed = True  # gone, or not readable now: not marked, tried again
                    continue
                self._read.add(path)  # a file that is not whole stays ignored
                fresh.extend(decode_entries(data) or ())
            if not missed:
                break
        if fresh:
            # live_entries keeps each id's earliest time, old and new entries alike.
            merged = itertools.chain(self._ids.items(), fresh)
            self._ids = live_entries(merged, self.ttl_ms, _now_ms())
            self._by_shard = {}

    def compact(self, min_files: int = COMPACT_AFTER_FILES) -> bool:
        """Merge the journal into one file when it has ``min_files`` or more.

        Returns whether it compacted. Safe with concurrent writers and compactions: only
        files whose entries are already in the new file (or that are not journal files)
        are deleted.
        """
        paths = self._listing()
        if len(paths) < min_files:
            return False
        merged: list[Entry] = []
        done: list[str] = []
        for path in paths:
            data = self._fetch(path)
            if data is None:
                continue  # gone or unreadable now: left for a later compaction
            merged.extend(decode_entries(data) or ())
            done.append(path)
        self.write(list(live_entries(merged, self.ttl_ms, _now_ms()).items()))
        for path in done:
            # Perhaps deleted by a concurrent compaction, whose file holds its entries.
            with contextlib.suppress(OSError):
                FileSystems.delete([path])
        return True

    def compact_quietly(self) -> None:
        """:meth:`compact`, logging instead of raising: compaction only saves space and time."""
        try:
            self.compact()
        except OSError as exc:
            _LOG.warning("could not compact the delivered-ids journal %s: %s", self.directory, exc)
