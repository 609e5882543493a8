"""The stages of an unbounded run: TTL dedup, delay-bounded batches, streaming dead letters.

Bounded runs use :mod:`transforms.dedup`; a stream remembers ids in keyed state instead.
Both use the same bundle-based batching and delivery (:mod:`transforms.moesif_sink`).
Every record's fate is reported as an acknowledgement token (see :mod:`transforms.offsets`)
once it is final: a duplicate when it is dropped, a sent record after the collector's 2xx,
a dead letter after its file is closed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple

import apache_beam as beam
import fastavro
from apache_beam import pvalue
from apache_beam.coders import BooleanCoder
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Duration
from apache_beam.utils.windowed_value import WindowedValue

from schemas import load_schema
from transforms.counters import counter
from transforms.deadletter import ACK_FIELD
from transforms.moesif_sink import ACKS, PostToMoesif, WriteBatchFiles
from transforms.schema import save_schema

__all__ = [
    "ACKS",
    "BatchAndDeliverInStream",
    "DedupInStream",
    "Deduplicated",
    "Delivered",
    "PersistSchemaInStream",
    "WriteDeadLettersInStream",
]


class Deduplicated(NamedTuple):
    """Outputs of :class:`DedupInStream`."""

    records: beam.PCollection
    acks: beam.PCollection  # tokens of the duplicates dropped


class _DedupFn(beam.DoFn):
    SEEN = ReadModifyWriteStateSpec("seen", BooleanCoder())
    EXPIRE = TimerSpec("expire", TimeDomain.WATERMARK)

    def __init__(self, ttl_seconds: float) -> None:
        self._ttl = Duration.of(ttl_seconds)
        self._duplicates = counter("duplicates")

    def process(
        self,
        element: tuple[str, tuple],
        timestamp: Any = beam.DoFn.TimestampParam,
        seen: Any = beam.DoFn.StateParam(SEEN),
        expire: Any = beam.DoFn.TimerParam(EXPIRE),
    ) -> Iterator[Any]:
        _, value = element
        if seen.read():
            self._duplicates.inc()
            if len(value) > 5 and value[5] is not None:
                yield pvalue.TaggedOutput(ACKS, value[5])
            return
        seen.write(True)
        # Event time: a re-sent record within the TTL of the first one's time is caught,
        # and a drained stream (watermark at the end) releases all state at once.
        expire.set(min(timestamp + self._ttl, GlobalWindow().max_timestamp()))
        yield element

    @on_timer(EXPIRE)
    def _forget(self, seen: Any = beam.DoFn.StateParam(SEEN)) -> None:
        seen.clear()


class DedupInStream(beam.PTransform):
    """Drop records whose transaction id was seen within ``ttl_seconds`` (of event time).

    State per id lives for the TTL only, so memory is bounded by the ids of one TTL.
    Duplicates are counted in ``duplicates`` and acknowledged.
    """

    def __init__(self, ttl_seconds: float) -> None:
        super().__init__()
        if ttl_seconds <= 0:
            msg = f"dedup_ttl must be positive, got {ttl_seconds}"
            raise ValueError(msg)
        self._ttl = ttl_seconds

    def expand(self, records: beam.PCollection) -> Deduplicated:
        out = records | "DropRepeats" >> beam.ParDo(_DedupFn(self._ttl)).with_input_types(
            tuple[str, tuple]
        ).with_outputs(ACKS, main="records")
        return Deduplicated(out.records, out[ACKS])


class Delivered(NamedTuple):
    """Outputs of :class:`BatchAndDeliverInStream`."""

    dead_letters: beam.PCollection
    acks: beam.PCollection  # tokens of the records the collector accepted


class BatchAndDeliverInStream(beam.PTransform):
    """Batch a stream by count, bytes and delay, and deliver each batch with ``sink``'s writer.

    ``sink`` is a configured :class:`PostToMoesif` or :class:`WriteBatchFiles`; its
    guarantees per batch (retries, split, bisect, dead letters) hold unchanged. A batch is
    delivered when full, when its oldest record has waited ``max_delay`` seconds, and at
    every bundle end; nothing waits on a timer (a stream's bundles last about a second).
    Delivered records are acknowledged.
    """

    def __init__(self, sink: PostToMoesif | WriteBatchFiles, max_delay: float) -> None:
        super().__init__()
        if max_delay <= 0:
            msg = f"batch_max_delay must be positive, got {max_delay}"
            raise ValueError(msg)
        self._sink = sink
        self._max_delay = max_delay

    def expand(self, records: beam.PCollection) -> Delivered:
        out = records | "Batch" >> self._sink.in_stream(self._max_delay)
        return Delivered(out.dead_letters, out[ACKS])


class _WriteDeadLettersFn(beam.DoFn):
    def __init__(self, directory: str, pipeline: str, run_id: str) -> None:
        self._directory = directory.rstrip("/")
        self._prefix = f"{pipeline}-{run_id}"
        self._dead_letters = counter("dead_letters")

    def setup(self) -> None:
        self._schema = load_schema("dead_letter")
        if "://" not in self._directory and not FileSystems.exists(self._directory):
            FileSystems.mkdirs(self._directory)

    def start_bundle(self) -> None:
        self._letters: list[dict[str, Any]] = []

    def process(self, letter: dict[str, Any]) -> None:
        self._letters.append(letter)

    def finish_bundle(self) -> Iterator[WindowedValue]:
        if not self._letters:
            return
        letters, self._letters = self._letters, []
        path = f"{self._directory}/{self._prefix}-{uuid.uuid4().hex[:12]}.avro"
        with FileSystems.create(path, mime_type="application/avro") as handle:
            fastavro.writer(handle, self._schema, letters, codec="deflate")
        # Only now, with the file closed, are these records done.
        self._dead_letters.inc(len(letters))
        window = GlobalWindow()
        for letter in letters:
            if letter.get(ACK_FIELD) is not None:
                yield WindowedValue(letter[ACK_FIELD], window.max_timestamp(), (window,))


class WriteDeadLettersInStream(beam.PTransform):
    """Write a stream's dead letters as one Avro file per bundle; output their acks.

    Files are ``<directory>/<pipeline>-<run_id>-<random>.avro``, the schema of
    ``schemas/dead_letter.avsc``. Each record is counted in ``dead_letters`` and
    acknowledged only after its file is closed.
    """

    def __init__(self, directory: str, pipeline: str, run_id: str) -> None:
        super().__init__()
        self._fn = _WriteDeadLettersFn(directory, pipeline, run_id)

    def expand(self, pcolls: Any) -> beam.PCollection:
        if isinstance(pcolls, tuple | list):
            pcolls = tuple(pcolls) | "Flatten" >> beam.Flatten()
        return pcolls | "WriteAvro" >> beam.ParDo(self._fn)


class _PersistSchemaFn(beam.DoFn):
    def __init__(self, path: str, scope: str) -> None:
        self._path = path
        self._scope = scope

    def start_bundle(self) -> None:
        self._new: list[tuple[str, str]] = []

    def process(self, key_type: tuple[str, str]) -> None:
        self._new.append(key_type)

    def finish_bundle(self) -> None:
        if self._new:
            save_schema(self._path, self._scope, self._new)
            self._new = []


class PersistSchemaInStream(beam.PTransform):
    """Merge newly decided metadata keys into the schema store as they are decided.

    Each bundle with new keys re-reads the store and adds them (first wins), so the store
    is never more than a bundle behind the pipeline's decisions.
    """

    def __init__(self, path: str, scope: str) -> None:
        super().__init__()
        self._fn = _PersistSchemaFn(path, scope)

    def expand(self, new_fields: beam.PCollection) -> beam.PCollection:
        return new_fields | "Persist" >> beam.ParDo(self._fn)
