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

Files are written whole under a fresh name and never changed; a file cut short by a crash
is ignored (its bundle never acknowledged anything, so its records come again). Any
worker may compact: it writes the live entries of the files it read into one new file,
then deletes those files, so concurrent compactions only ever repeat entries. Entries are
``(transaction id, event time ms)``; what is forgotten is what is a TTL older than the
newest entry, the same event-time rule the dedup applies.
"""

from __future__ import annotations

import contextlib
import uuid
import zlib
from collections.abc import Iterable, Sequence

import orjson
from apache_beam.io.filesystem import CompressionTypes
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


def live_entries(entries: Iterable[Entry], ttl_ms: int) -> dict[str, int]:
    """Each id once, at its earliest time, without those a TTL older than the newest."""
    earliest: dict[str, int] = {}
    for transaction_id, time_ms in entries:
        known = earliest.get(transaction_id)
        if known is None or time_ms < known:
            earliest[transaction_id] = time_ms
    if not earliest:
        return earliest
    horizon = max(earliest.values()) - ttl_ms
    return {tid: t for tid, t in earliest.items() if t >= horizon}


class DeliveredIds:
    """A journal directory (any Beam filesystem) of delivered ids; see the module docstring.

    Reading is incremental: each instance remembers the files it has read, so a later
    :meth:`read` costs one listing and the new files.
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
        self._read: set[str] = set()
        self._ids: dict[str, int] = {}

    def _listing(self) -> list[str]:
        pattern = FileSystems.join(self.directory, f"*{_SUFFIX}")
        matches = FileSystems.match([pattern])[0].metadata_list
        return sorted(m.path for m in matches)

    def _load(self, path: str) -> list[Entry] | None:
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                return decode_entries(f.read())
        except OSError:
            return None  # gone (compacted away since the listing) or unreadable

    def write(self, entries: Sequence[Entry]) -> None:
        """Add ``entries`` in one new file; returns once the file is whole."""
        if not entries:
            return
        if not FileSystems.exists(self.directory):
            # Made meanwhile by another worker, perhaps (object stores need none).
            with contextlib.suppress(OSError):
                FileSystems.mkdirs(self.directory)
        name = f"{uuid.uuid4().hex}{_SUFFIX}"
        final = FileSystems.join(self.directory, name)
        # Written under a temporary name and renamed, so a listing never sees a partial file
        # (on local disks; object stores publish an object whole when it is closed).
        staging = FileSystems.join(self.directory, f".{name}.tmp")
        with FileSystems.create(staging, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(encode_entries(entries))
        FileSystems.rename([staging], [final])

    def read(self) -> dict[str, int]:
        """Every live delivered id with its time, files written since the last read included."""
        if not FileSystems.exists(self.directory):
            return self._ids
        added = False
        # A file can vanish between the listing and its read when another worker compacts:
        # its entries are then in the compacted file, which the next listing shows.
        for _ in range(3):
            listing = self._listing()
            self._read &= set(listing)  # forget names compaction removed
            vanished = False
            for path in listing:
                if path in self._read:
                    continue
                entries = self._load(path)
                if entries is None and not FileSystems.exists(path):
                    vanished = True
                    continue
                self._read.add(path)
                for transaction_id, time_ms in entries or ():
                    known = self._ids.get(transaction_id)
                    if known is None or time_ms < known:
                        self._ids[transaction_id] = time_ms
                    added = True
            if not vanished:
                break
        if added:
            self._ids = live_entries(self._ids.items(), self.ttl_ms)
        return self._ids

    def compact(self, min_files: int = COMPACT_AFTER_FILES) -> bool:
        """Merge the journal into one file when it has ``min_files`` or more.

        Returns whether it compacted. Safe with concurrent writers and compactions: only
        files whose entries are already in the new file are deleted.
        """
        if not FileSystems.exists(self.directory):
            return False
        paths = self._listing()
        if len(paths) < min_files:
            return False
        merged: list[Entry] = []
        readable: list[str] = []
        for path in paths:
            entries = self._load(path)
            if entries is None:
                continue
            readable.append(path)
            merged.extend(entries)
        self.write(list(live_entries(merged, self.ttl_ms).items()))
        for path in readable:
            # Perhaps deleted by a concurrent compaction, whose file holds its entries.
            with contextlib.suppress(OSError):
                FileSystems.delete([path])
        return True
