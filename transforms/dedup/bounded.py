"""Exact deduplication by transaction id for bounded runs.

Two ways to bring every copy of an id together, with the same result:

* the engine's shuffle (a GroupByKey by id), right for runners whose shuffle spills to
  disk (Flink, Dataflow);
* a spill: records are appended, as bytes, to files hash-partitioned by id, and each
  partition is deduplicated on its own. The local FnApiRunner holds a GroupByKey's whole
  input in memory, several times over, so there this keeps memory to one partition.
"""

from __future__ import annotations

import pickle
import struct
import uuid
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from moesif_beam.transforms.common.counters import counter

__all__ = ["DedupByTransactionId", "pack_record", "pick_first", "unpack_records"]

# time_ms, then the lengths of: transaction id, body, raw, source, signature id, ack.
_HEADER = struct.Struct("<qIIIIII")


def pack_record(transaction_id: str, value: tuple) -> bytes:
    """One keyed record ``(transaction_id, (time_ms, body, raw, source, sig_id, ack))`` as bytes.

    Bytes in, bytes out: only the id and the source are encoded; an ack, when there is one,
    is pickled.
    """
    tid = transaction_id.encode("utf-8")
    source = value[3].encode("utf-8")
    sig_id = value[4] if len(value) > 4 else b""
    ack = value[5] if len(value) > 5 else None
    packed_ack = b"" if ack is None else pickle.dumps(ack, protocol=pickle.HIGHEST_PROTOCOL)
    header = _HEADER.pack(
        value[0], len(tid), len(value[1]), len(value[2]), len(source), len(sig_id), len(packed_ack)
    )
    return b"".join((header, tid, value[1], value[2], source, sig_id, packed_ack))


def unpack_records(data: bytes) -> Iterator[tuple[str, tuple]]:
    """The records :func:`pack_record` wrote, concatenated in ``data``, in order."""
    view = memoryview(data)
    pos = 0
    size = _HEADER.size
    while pos < len(data):
        time_ms, n_tid, n_body, n_raw, n_source, n_sig, n_ack = _HEADER.unpack_from(data, pos)
        pos += size
        tid = str(view[pos : pos + n_tid], "utf-8")
        pos += n_tid
        body = bytes(view[pos : pos + n_body])
        pos += n_body
        raw = bytes(view[pos : pos + n_raw])
        pos += n_raw
        source = str(view[pos : pos + n_source], "utf-8")
        pos += n_source
        sig_id = bytes(view[pos : pos + n_sig])
        pos += n_sig
        ack = pickle.loads(view[pos : pos + n_ack]) if n_ack else None  # noqa: S301 (our own bytes)
        pos += n_ack
        yield tid, (time_ms, body, raw, source, sig_id, ack)


def _earlier(value: tuple, other: tuple) -> bool:
    """The winner rule: earlier event time, then the serialized record, first."""
    return bool(value[:2] < other[:2])


def pick_first(values: Iterable[tuple]) -> tuple[tuple, int]:
    """Choose the record a transaction id keeps, and count the others.

    The earliest event time wins, ties broken by the serialized record, so the choice does
    not depend on input order, bundle boundaries or the number of workers.

    Returns:
        ``(winner, duplicates)``.
    """
    winner: tuple | None = None
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


class _SpillFn(beam.DoFn):
    """Appends each record to its partition's file; emits ``(partition, path)`` per bundle.

    Each bundle writes files of its own, named by a fresh id, so a retried bundle never
    touches what another attempt wrote, and only files of committed bundles are read.
    """

    def __init__(self, directory: str, partitions: int) -> None:
        self._directory = directory
        self._partitions = partitions

    def start_bundle(self) -> None:
        self._bundle = uuid.uuid4().hex
        self._files: dict[int, Any] = {}

    def process(self, element: tuple[str, tuple]) -> None:
        transaction_id, value = element
        part = zlib.crc32(transaction_id.encode("utf-8")) % self._partitions
        handle = self._files.get(part)
        if handle is None:
            path = FileSystems.join(self._directory, f"{part:04d}-{self._bundle}.bin")
            handle = self._files[part] = (
                path,
                FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED),
            )
        handle[1].write(pack_record(transaction_id, value))

    def finish_bundle(self) -> Iterator[WindowedValue]:
        window = GlobalWindow()
        for part, (path, handle) in sorted(self._files.items()):
            handle.close()
            yield WindowedValue((part, path), window.max_timestamp(), (window,))
        self._files = {}


class _KeepFirstInPartitionFn(beam.DoFn):
    """Reads one partition's files and emits the first record of each id in them."""

    def __init__(self) -> None:
        self._duplicates = counter("duplicates")

    def process(self, element: tuple[int, Iterable[str]]) -> Iterator[tuple[str, tuple]]:
        _, paths = element
        winners: dict[str, tuple] = {}
        duplicates = 0
        for path in sorted(paths):
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                data = f.read()
            for transaction_id, value in unpack_records(data):
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
        for transaction_id in sorted(winners):
            yield transaction_id, winners.pop(transaction_id)


class DedupByTransactionId(beam.PTransform):
    """Keep exactly one record per transaction id in a bounded run.

    Input and output are ``(transaction_id, (time_ms, record_json, raw, source, ...))``. The
    earliest event time wins, ties broken by the serialized record, so the result does not
    depend on input order or parallelism. Every dropped record is counted in ``duplicates``.
    Records travel as bytes, serialized before this step and not parsed again.

    With ``spill_dir`` the records are spilled to ``partitions`` files there, by id, and
    each partition is deduplicated in memory on its own: memory holds one partition, not
    the run. Without it the engine's GroupByKey brings the copies together. The caller
    removes ``spill_dir`` after the run.
    """

    def __init__(self, spill_dir: str | None = None, partitions: int = 64) -> None:
        super().__init__()
        if partitions < 1:
            msg = f"partitions must be >= 1, got {partitions}"
            raise ValueError(msg)
        self._spill_dir = spill_dir
        self._partitions = partitions

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
