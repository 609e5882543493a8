"""The records that travel through a pipeline, named, with coders as cheap as bare tuples.

* :class:`Line`: one input line or Kafka message, as read;
* :class:`Record`: one normalized Moesif record, serialized once, keyed by its
  transaction id as ``(transaction_id, Record)`` from normalize to delivery;
* :class:`Ack` and :class:`PartitionStart`: what the commit stage learns about a Kafka
  partition.

Fields are read by name everywhere; only the coders below know the byte layout.
"""

from __future__ import annotations

import functools
import pickle
import struct
from typing import Any, NamedTuple

from apache_beam import coders

__all__ = [
    "Ack",
    "AckCoder",
    "FirstSeen",
    "Keyed",
    "Line",
    "PartitionStart",
    "Record",
    "RecordCoder",
    "new_ack",
    "new_line",
    "new_record",
    "pack_keyed",
    "unpack_keyed",
]


class Ack(NamedTuple):
    """Every record of ``partition`` after offset ``previous`` up to ``offset`` is done.

    One record (whose predecessor in the partition was ``previous``), or a run of them
    merged by :func:`~moesif_beam.transforms.sources.offsets.compact_acks`. A message
    holding several records (a line with a JSON array) is done once all ``parts`` of it
    are; each record then carries its ``part``, counted from 0.
    """

    partition: str  # "topic/partition"
    offset: int
    previous: int
    parts: int = 1
    part: int = 0


class PartitionStart(NamedTuple):
    """Where a partition's read starts: everything up to ``before`` is already done."""

    partition: str
    before: int


class Line(NamedTuple):
    """One input line (file) or message value (Kafka), untouched, with where it came from.

    ``at`` is where ``raw`` starts in the plain (uncompressed, local) file ``source``
    names, when the reader knows ``raw`` is exactly the bytes from there to the next
    newline (or the file's end); -1 otherwise.
    """

    raw: bytes
    source: str  # "path:line" or "topic/partition@offset"
    ack: Ack | None = None
    at: int = -1


class Record(NamedTuple):
    """One normalized record on its way to delivery.

    Attributes:
        time_ms: event time in epoch milliseconds (``NO_TIME`` when it has none).
        body: the Moesif record as JSON, serialized once.
        raw: the input bytes it came from (the line, or its array element), for dead
            letters.
        source: where the input came from, for dead letters.
        sig_id: the id of its metadata signature; ``b""`` when it has no metadata.
        signature: the signature itself, carried only when the type rule is decided in
            the same stage (the fused single-process stream); ``()`` otherwise.
        ack: the Kafka acknowledgement its fate reports, if it came from Kafka.
        at: where ``raw`` starts in the file ``source`` names (``Line.at``), or -1. Only
            the bounded dedup spill uses it: a record whose ``at`` is known is spilled
            without ``raw``, which :func:`original_bytes` reads back from the input
            for the rare record that becomes a dead letter after the dedup.
    """

    time_ms: int
    body: bytes
    raw: bytes
    source: str
    sig_id: bytes = b""
    signature: tuple[tuple[str, str], ...] = ()
    ack: Ack | None = None
    at: int = -1


Keyed = tuple[str, Record]


# A Record or Line from a tuple of all its fields, built from C: a NamedTuple call runs a
# Python-level __new__ (measured: 0.48 µs against 0.26 µs), and the hot paths make one
# per record.
new_record = functools.partial(tuple.__new__, Record)
new_line = functools.partial(tuple.__new__, Line)
# Every field, parts and part included: (partition, offset, previous, parts, part).
new_ack = functools.partial(tuple.__new__, Ack)


class FirstSeen(NamedTuple):
    """The earliest record seen with one metadata signature: it decides a key's first type."""

    time_ms: int
    transaction_id: str
    signature: tuple


# time_ms, at, then the lengths of: body, raw, source, sig_id, signature, ack.
_RECORD = struct.Struct("<qqIIIIII")
# offset, previous, parts, part, then the partition's length.
_ACK = struct.Struct("<qqIII")


def _encode_ack(ack: Ack) -> bytes:
    name = ack.partition.encode("utf-8")
    return _ACK.pack(ack.offset, ack.previous, ack.parts, ack.part, len(name)) + name


def _decode_ack(data: bytes | memoryview) -> Ack:
    offset, previous, parts, part, n = _ACK.unpack_from(data, 0)
    start = _ACK.size
    return Ack(str(data[start : start + n], "utf-8"), offset, previous, parts, part)


def _encode_record(record: Record) -> bytes:
    source = record.source.encode("utf-8", "surrogateescape")
    # The signature travels only inside one process's fused stage; pickled in the rare
    # case it is encoded at all.
    signature = pickle.dumps(record.signature, protocol=5) if record.signature else b""
    ack = b"" if record.ack is None else _encode_ack(record.ack)
    header = _RECORD.pack(
        record.time_ms,
        record.at,
        len(record.body),
        len(record.raw),
        len(source),
        len(record.sig_id),
        len(signature),
        len(ack),
    )
    return b"".join((header, record.body, record.raw, source, record.sig_id, signature, ack))


def _decode_record(data: bytes, pos: int = 0) -> tuple[Record, int]:
    # Slices of bytes: one copy each, no memoryview in between (3.5 to 2.0 µs a record).
    time_ms, at, n_body, n_raw, n_source, n_sig, n_signature, n_ack = _RECORD.unpack_from(data, pos)
    pos += _RECORD.size
    end = pos + n_body
    body = data[pos:end]
    pos, end = end, end + n_raw
    raw = data[pos:end]
    pos, end = end, end + n_source
    source = data[pos:end].decode("utf-8", "surrogateescape")
    pos, end = end, end + n_sig
    sig_id = data[pos:end]
    pos = end
    signature = pickle.loads(data[pos : pos + n_signature]) if n_signature else ()  # noqa: S301 (our own bytes)
    pos += n_signature
    ack = _decode_ack(data[pos : pos + n_ack]) if n_ack else None
    pos += n_ack
    return Record(time_ms, body, raw, source, sig_id, signature, ack, at), pos


_TID = struct.Struct("<I")


def pack_keyed(transaction_id: str, record: Record) -> bytes:
    """``(transaction_id, record)`` as bytes: the dedup spill's format, and the coder's."""
    tid = transaction_id.encode("utf-8", "surrogateescape")
    return b"".join((_TID.pack(len(tid)), tid, _encode_record(record)))


def unpack_keyed(data: bytes) -> Any:
    """Every ``(transaction_id, record)`` :func:`pack_keyed` wrote, concatenated in ``data``."""
    pos, end = 0, len(data)
    while pos < end:
        (n,) = _TID.unpack_from(data, pos)
        pos += _TID.size
        transaction_id = str(data[pos : pos + n], "utf-8", "surrogateescape")
        record, pos = _decode_record(data, pos + n)
        yield transaction_id, record


class RecordCoder(coders.Coder):
    """Encodes a :class:`Record` as a plain tuple with Beam's fast primitives coder.

    Beam would otherwise take the slower named-tuple path, which also writes the class's
    name into every element. Measured per keyed record (encode and decode, 1.2 KB event):
    bare tuples 2.0 µs, this coder 5.4 µs, Beam's named-tuple path 6.1 µs. Records are
    shuffled only on runners with several workers (keyed streaming stages); bounded local
    runs move them as :func:`pack_keyed` bytes through the dedup spill instead.
    """

    def __init__(self) -> None:
        self._fast = coders.FastPrimitivesCoder().get_impl()

    def encode(self, value: Record) -> bytes:
        ack = value.ack
        source: str | bytes = value.source
        if not value.source.isascii():
            # A file name that is not UTF-8 was decoded with surrogate escapes, which the
            # fast coder's strict UTF-8 refuses: a source that is not ASCII travels as its
            # bytes, encoded once here.
            source = value.source.encode("utf-8", "surrogateescape")
        return self._fast.encode(
            (
                value.time_ms,
                value.body,
                value.raw,
                source,
                value.sig_id,
                value.signature,
                None
                if ack is None
                else (ack.partition, ack.offset, ack.previous, ack.parts, ack.part),
                value.at,
            )
        )

    def decode(self, encoded: bytes) -> Record:
        time_ms, body, raw, source, sig_id, signature, ack, at = self._fast.decode(encoded)
        if type(source) is bytes:
            source = source.decode("utf-8", "surrogateescape")
        return Record(
            time_ms, body, raw, source, sig_id, signature, None if ack is None else Ack(*ack), at
        )

    def is_deterministic(self) -> bool:
        return True

    def to_type_hint(self) -> type:
        return Record

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))


class AckCoder(coders.Coder):
    """Encodes an :class:`Ack` in 28 bytes plus its partition's name."""

    def encode(self, value: Ack) -> bytes:
        return _encode_ack(value)

    def decode(self, encoded: bytes) -> Ack:
        return _decode_ack(encoded)

    def is_deterministic(self) -> bool:
        return True

    def to_type_hint(self) -> type:
        return Ack


coders.registry.register_coder(Record, RecordCoder)
coders.registry.register_coder(Ack, AckCoder)
