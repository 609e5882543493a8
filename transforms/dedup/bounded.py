"""Exact deduplication by transaction id for bounded runs.

Two ways to bring every copy of an id together, with the same result:

* the engine's shuffle (a GroupByKey by id), right for runners whose shuffle spills to
  disk (Flink, Dataflow);
* a spill: records are appended, as bytes, to files hash-partitioned by id, and each
  partition is deduplicated on its own. The local FnApiRunner holds a GroupByKey's whole
  input in memory, several times over, so there this keeps memory to one partition.
"""

from __future__ import annotations

import contextlib
import resource
import struct
import uuid
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import apache_beam as beam
import msgspec
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from moesif_beam.transforms.common.counters import counter
from moesif_beam.transforms.common.fused import Run
from moesif_beam.transforms.records import Keyed, Record, pack_keyed, unpack_keyed

__all__ = [
    "DEFAULT_PARTITIONS",
    "MAX_PARTITIONS",
    "PARTITION_SPILL_BYTES",
    "DedupByTransactionId",
    "never_retries",
    "open_file_budget",
    "pack_block",
    "pick_first",
    "removes_spill_as_read",
    "spill_buffer_bytes",
    "spill_partitions",
    "unpack_blocks",
]

# A spill file is a run of blocks, each: its payload's length (4 bytes, little-endian),
# its kind (1 byte), its payload. Kind "M": a msgpack array of (transaction_id, Record),
# each record encoded by msgspec as it arrives (so a pending block holds one large bytes
# object per record: records held as Python objects pinned the allocator's arenas, and a
# worker's memory grew by 90 MB) and the whole block decoded by msgspec in one C call
# (measured on 1.2 KB WSO2 events: 2.3 µs a record, against 3.3 to 4.5 µs unpacking each
# in Python). Kind "P": records packed one by one (records.pack_keyed), for what msgspec
# cannot write (a string that is not valid UTF-8, such as a file name decoded with
# surrogate escapes).
_BLOCK = struct.Struct("<IB")
_MSGPACK, _PACKED = ord("M"), ord("P")
_ARRAY32 = struct.Struct(">BI")  # msgpack's array header: 0xdd, then the element count
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(list[tuple[str, Record]])
_UNENCODABLE = (msgspec.EncodeError, UnicodeEncodeError)


def _encoded_block(encoded: list[bytes]) -> bytes:
    """A kind "M" block of records each encoded by ``_ENCODER``."""
    payload = b"".join((_ARRAY32.pack(0xDD, len(encoded)), *encoded))
    return _BLOCK.pack(len(payload), _MSGPACK) + payload


def _packed_block(records: list[Keyed]) -> bytes:
    payload = b"".join(pack_keyed(tid, record) for tid, record in records)
    return _BLOCK.pack(len(payload), _PACKED) + payload


def pack_block(records: list[Keyed]) -> bytes:
    """``(transaction_id, Record)`` pairs as one spill block, header included."""
    try:
        return _encoded_block([_ENCODER.encode(record) for record in records])
    except _UNENCODABLE:
        return _packed_block(records)


def unpack_blocks(data: bytes | memoryview) -> Iterator[Keyed]:
    """Every record of the blocks :func:`pack_block` wrote, concatenated in ``data``, in order."""
    view = memoryview(data)
    pos, end = 0, len(data)
    while pos < end:
        size, kind = _BLOCK.unpack_from(data, pos)
        pos += _BLOCK.size
        payload = view[pos : pos + size]
        pos += size
        if kind == _MSGPACK:
            yield from _DECODER.decode(payload)
        elif kind == _PACKED:
            yield from unpack_keyed(bytes(payload))
        else:
            msg = f"not a spill block: kind {kind} at byte {pos - size - _BLOCK.size}"
            raise ValueError(msg)


def _earlier(value: Record, other: Record) -> bool:
    """The winner rule: earlier event time, then the serialized record, first."""
    return (value.time_ms, value.body) < (other.time_ms, other.body)


def pick_first(values: Iterable[Record]) -> tuple[Record, int]:
    """Choose the record a transaction id keeps, and count the others.

    The earliest event time wins, ties broken by the serialized record, so the choice does
    not depend on input order, bundle boundaries or the number of workers.

    Returns:
        ``(winner, duplicates)``.
    """
    winner: Record | None = None
    seen = 0
    for value in values:
        seen += 1
        if winner is None or _earlier(value, winner):
            winner = value
    if winner is None:
        msg = "pick_first needs at least one value"
        raise ValueError(msg)
    return winner, seen - 1


class _KeepFirstFn(beam.DoFn):
    def __init__(self) -> None:
        self._duplicates = counter("duplicates")

    def process(self, element: tuple[str, Iterable[Any]]) -> Iterator[tuple[str, Any]]:
        transaction_id, values = element
        winner, duplicates = pick_first(values)
        if duplicates:
            self._duplicates.inc(duplicates)
        yield transaction_id, winner


# Bytes a partition gathers in memory before they are written: one write per block, not
# one per record. Measured on a 1M-event run: record-sized writes cost a fifth of the
# workers' CPU in the kernel (ext4 zeroing the rest of each partly written block, and a
# system call per record). 256 KiB per partition while 32 MiB covers all of a worker's
# partitions; with more partitions, smaller blocks, never under 16 KiB (64 MiB at the
# most partitions; 16 KiB writes still cost a system call per dozen records, not one).
_SPILL_BUFFER_BYTES = 256 * 1024
_SPILL_BUFFERS_TOTAL = 32 * 2**20
_SPILL_BUFFER_MIN = 16 * 1024

# What a partition's reader holds at once is that partition's records (its spill bytes,
# as Python objects): the spill is sized so that one partition is about this much.
PARTITION_SPILL_BYTES = 32 * 2**20
# Spill bytes per input byte, at most: each record is spilled with its serialized Moesif
# body and, unless it can be read again from a plain input file (Record.at), its raw line
# (for dead letters after the dedup). Measured with the raw line: 100k WSO2 events, 117.9
# MB of input, 271.0 MB spilled (2.3x; without it, 1.3x); a gzip file's lines are about 8
# times its size.
_SPILL_PER_INPUT_BYTE = 2.3
_GZIP_EXPANSION = 8
DEFAULT_PARTITIONS = 64
MAX_PARTITIONS = 4096


def spill_partitions(plain_bytes: int, gzip_bytes: int = 0, max_partitions: int = 0) -> int:
    """How many partitions a bounded run's dedup spill needs for its input.

    ``plain_bytes`` of uncompressed and ``gzip_bytes`` of gzip input. Enough that one
    partition's spill is about :data:`PARTITION_SPILL_BYTES` (a worker holds one partition
    at a time, so memory stays flat as inputs grow), never fewer than
    :data:`DEFAULT_PARTITIONS` (what runs of unknown size get) nor more than
    ``max_partitions`` (:data:`MAX_PARTITIONS` when 0; a worker keeps a file open per
    partition while it spills). Files a run spills grow with partitions times workers (each
    worker writes one file per partition per bundle; a 100k-event run wrote 129).
    """
    if plain_bytes < 0 or gzip_bytes < 0:
        msg = f"input sizes must be >= 0, got {plain_bytes} and {gzip_bytes}"
        raise ValueError(msg)
    limit = min(MAX_PARTITIONS, max_partitions or MAX_PARTITIONS)
    expected = (plain_bytes + gzip_bytes * _GZIP_EXPANSION) * _SPILL_PER_INPUT_BYTE
    needed = -(-int(expected) // PARTITION_SPILL_BYTES)
    return max(DEFAULT_PARTITIONS, min(limit, needed))


def open_file_budget() -> int:
    """Partitions a worker may spill to at once: its open-file limit, less room for the rest."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return DEFAULT_PARTITIONS
    if soft == resource.RLIM_INFINITY:
        return MAX_PARTITIONS
    return max(DEFAULT_PARTITIONS, soft - 256)


def spill_buffer_bytes(partitions: int) -> int:
    """The block one partition gathers before it is written, for ``partitions`` partitions."""
    share = _SPILL_BUFFERS_TOTAL // max(1, partitions)
    return max(_SPILL_BUFFER_MIN, min(_SPILL_BUFFER_BYTES, share))


class _SpillFn(beam.DoFn):
    """Appends each record to its partition's file; emits ``(partition, path)`` per bundle.

    Each bundle writes files of its own, named by a fresh id, so a retried bundle never
    touches what another attempt wrote, and only files of committed bundles are read.
    Records are gathered per partition and written in blocks of ``_SPILL_BUFFER_BYTES``
    or less when partitions are many (:func:`spill_buffer_bytes`); every file is complete before
    ``finish_bundle`` emits its path.
    """

    def __init__(self, directory: str, partitions: int) -> None:
        self._directory = directory
        self._partitions = partitions
        self._block = spill_buffer_bytes(partitions)

    def start_bundle(self) -> None:
        self._bundle = uuid.uuid4().hex
        self._files: dict[int, Any] = {}
        self._pending: dict[int, list[bytes]] = {}
        self._pending_bytes: dict[int, int] = {}

    def process(self, element: Keyed) -> None:
        transaction_id, record = element
        part = zlib.crc32(transaction_id.encode("utf-8", "surrogatepass")) % self._partitions
        try:
            if record.at < 0:
                encoded = _ENCODER.encode(element)
            else:
                # The line can be read again from the input (readback.original_bytes), so
                # it is not spilled: about half the bytes, written and read back (measured
                # on a 1M-event run: 2.70 GB of spill became 1.53 GB, about 3 CPU s less).
                time_ms, body, _, source, sig_id, signature, ack, at = record
                encoded = _ENCODER.encode(
                    (transaction_id, (time_ms, body, b"", source, sig_id, signature, ack, at))
                )
        except _UNENCODABLE:
            self._file(part).write(_packed_block([element]))
            return
        pending = self._pending.get(part)
        if pending is None:
            pending = self._pending[part] = []
            self._pending_bytes[part] = 0
        pending.append(encoded)
        size = self._pending_bytes[part] + len(encoded)
        if size >= self._block:
            self._write(part)
            size = 0
        self._pending_bytes[part] = size

    def _file(self, part: int) -> Any:
        handle = self._files.get(part)
        if handle is None:
            path = FileSystems.join(self._directory, f"{part:04d}-{self._bundle}.bin")
            handle = self._files[part] = (
                path,
                FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED),
            )
        return handle[1]

    def _write(self, part: int) -> None:
        self._file(part).write(_encoded_block(self._pending[part]))
        self._pending[part] = []

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for part, pending in self._pending.items():
            if pending:
                self._write(part)
        window = GlobalWindow()
        for part, (path, handle) in sorted(self._files.items()):
            handle.close()
            yield WindowedValue((part, path), window.max_timestamp(), (window,))
        self._files = {}
        self._pending = {}
        self._pending_bytes = {}


def _remove_quietly(path: str) -> None:
    """Delete one spill file; one that cannot be deleted is left for the run's clean-up."""
    with contextlib.suppress(OSError, BeamIOError):
        FileSystems.delete([path])


# Runners that never run a bundle twice: a spill file read by one of their bundles is read
# by nobody else. (Beam's older BundleBasedDirectRunner, which DirectRunner may fall back
# to, retries a failed bundle up to four times.)
_RUNNERS_WITHOUT_RETRIES = frozenset({"FnApiRunner", "LocalRunner"})


def never_retries(runner: object) -> bool:
    """Whether ``runner`` (a ``--runner`` value) runs every bundle once: a failure fails the run."""
    return runner is not None and str(runner).rsplit(".", 1)[-1] in _RUNNERS_WITHOUT_RETRIES


def removes_spill_as_read(runner: object) -> bool:
    """Whether a run on ``runner`` (a ``--runner`` value) may delete spill files once read."""
    return never_retries(runner)


class _KeepFirstInPartitionFn(beam.DoFn):
    """Reads one partition's files and emits the first record of each id in them.

    With ``remove_read``, each file is deleted once read, on a thread of its own: only for
    runners that never retry a bundle (:func:`removes_spill_as_read`), so nothing reads it
    again; a failed run's spill is deleted whole by the launcher, as before. Deleting 2.2
    GB of spill files took about a second at the end of a 1M-event run, while the run
    waited; spread over the partitions, the kernel does it while this stage waits on the
    collector.

    With ``runs`` (only inside :class:`~moesif_beam.transforms.common.fused.Fused`) a
    partition's winners leave as one :class:`~moesif_beam.transforms.common.fused.Run`,
    in the same order.
    """

    def __init__(self, remove_read: bool = False, runs: bool = False) -> None:
        self._duplicates = counter("duplicates")
        self._remove_read = remove_read
        self._runs = runs
        self._removals: ThreadPoolExecutor | None = None
        # One buffer the partition files are read into, reused: a fresh bytes object per
        # file came from memory the kernel had to fault in, page by page (measured: 280k
        # page faults, about 1.1 s of CPU, in one worker's second phase of a 1M run).
        self._buffer = bytearray()

    def teardown(self) -> None:
        if self._removals is not None:
            self._removals.shutdown(wait=True)
            self._removals = None

    def _remove(self, path: str) -> None:
        if self._removals is None:
            self._removals = ThreadPoolExecutor(1, thread_name_prefix="spill-removal")
        self._removals.submit(_remove_quietly, path)

    def _read(self, path: str) -> memoryview:
        """The whole file, in this DoFn's buffer: valid until the next call.

        Decoding copies every value out of it (msgspec makes new ``bytes`` and ``str``), so
        nothing that leaves this DoFn points into the buffer.
        """
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            if not hasattr(f, "readinto"):  # a file object without it: its own bytes
                return memoryview(f.read())
            filled = 0
            while True:
                if filled == len(self._buffer):
                    # A new, larger buffer (never resized in place: a view of the old one
                    # may still be held); partition files are of about one size, so this
                    # happens a few times per worker.
                    grown = bytearray(max(2 * filled, 1 << 20))
                    grown[:filled] = self._buffer[:filled]
                    self._buffer = grown
                with memoryview(self._buffer) as view:
                    got = f.readinto(view[filled:])
                if not got:
                    return memoryview(self._buffer)[:filled]
                filled += got

    def process(self, element: tuple[int, Iterable[str]]) -> Iterator[Any]:
        _, paths = element
        winners: dict[str, Record] = {}
        duplicates = 0
        for path in sorted(paths):
            data = self._read(path)
            if self._remove_read:
                self._remove(path)
            for transaction_id, value in unpack_blocks(data):
                best = winners.get(transaction_id)
                if best is None:
                    winners[transaction_id] = value
                    continue
                duplicates += 1
                if _earlier(value, best):
                    winners[transaction_id] = value
            del data
        if duplicates:
            self._duplicates.inc(duplicates)
        # Emitted in id order, so the batches a partition makes do not depend on the order
        # its files were written in.
        if self._runs:
            run = Run(
                [(transaction_id, winners[transaction_id]) for transaction_id in sorted(winners)]
            )
            winners.clear()
            yield run
            return
        for transaction_id in sorted(winners):
            yield transaction_id, winners.pop(transaction_id)


class DedupByTransactionId(beam.PTransform):
    """Keep exactly one record per transaction id in a bounded run.

    Input and output are ``(transaction_id, Record)``. The
    earliest event time wins, ties broken by the serialized record, so the result does not
    depend on input order or parallelism. Every dropped record is counted in ``duplicates``.
    Records travel as bytes, serialized before this step and not parsed again.

    With ``spill_dir`` the records are spilled to ``partitions`` files there, by id, and
    each partition is deduplicated in memory on its own: memory holds one partition, not
    the run. Without it the engine's GroupByKey brings the copies together. The caller
    removes ``spill_dir`` after the run.
    """

    def __init__(self, spill_dir: str | None = None, partitions: int = DEFAULT_PARTITIONS) -> None:
        super().__init__()
        if not 1 <= partitions <= MAX_PARTITIONS:
            msg = f"partitions must be between 1 and {MAX_PARTITIONS}, got {partitions}"
            raise ValueError(msg)
        self._spill_dir = spill_dir
        self._partitions = partitions

    def spill_stage(self) -> beam.DoFn:
        """The spill as a stage of a :class:`~moesif_beam.transforms.common.fused.Fused` chain.

        Keyed records in, ``(partition, path)`` per file written out, as in :meth:`expand`.
        """
        if self._spill_dir is None:
            msg = "spill_stage needs a spill_dir"
            raise ValueError(msg)
        return _SpillFn(self._spill_dir, self._partitions)

    def keep_stage(self, remove_read: bool = False) -> beam.DoFn:
        """A partition's dedup as a stage of a :class:`~moesif_beam.transforms.common.fused.Fused`.

        ``(partition, paths)`` in, that partition's winners out, as in :meth:`expand`, as
        one :class:`~moesif_beam.transforms.common.fused.Run` per partition. With
        ``remove_read`` each spill file is deleted once read: only where the runner never
        retries a bundle (:func:`removes_spill_as_read`).
        """
        return _KeepFirstInPartitionFn(remove_read, runs=True)

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        if self._spill_dir is None:
            return (
                records
                | "GroupById" >> beam.GroupByKey()
                | "KeepFirst" >> beam.ParDo(_KeepFirstFn())
            )
        return (
            records
            | "Spill" >> beam.ParDo(_SpillFn(self._spill_dir, self._partitions))
            | "GroupPartitionFiles" >> beam.GroupByKey()
            | "KeepFirstPerPartition" >> beam.ParDo(_KeepFirstInPartitionFn())
        )
