"""The stages of an unbounded run: TTL dedup, delay-bounded batches, streaming dead letters.

Bounded runs use :mod:`transforms.dedup` and the bundle-based sinks; a stream needs state
and timers instead. Each stage here reports every record's fate as an acknowledgement
token (see :mod:`transforms.offsets`) once it is final: a duplicate when it is dropped, a
sent record after the collector's 2xx, a dead letter after its file is closed.
"""

from __future__ import annotations

import time
import uuid
import zlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import apache_beam as beam
import fastavro
from apache_beam import pvalue
from apache_beam.coders import BooleanCoder, PickleCoder
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    BagStateSpec,
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Duration
from apache_beam.utils.windowed_value import WindowedValue

from schemas import load_schema
from transforms.counters import counter
from transforms.deadletter import ACK_FIELD, DEAD_LETTER
from transforms.moesif_sink import PostToMoesif, WriteBatchFiles, as_item, cut_batches
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

# Tag of the acknowledgement outputs.
ACKS = "acks"


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


class _StreamBatchFn(beam.DoFn):
    """Keyed by shard: buffers records until a batch is full or ``max_delay`` has passed."""

    BUFFER = BagStateSpec("buffer", PickleCoder())
    SIZE = ReadModifyWriteStateSpec("size", PickleCoder())
    FLUSH = TimerSpec("flush", TimeDomain.REAL_TIME)
    END = TimerSpec("end", TimeDomain.WATERMARK)

    def __init__(self, sink: Any, max_delay: float) -> None:
        self._writer = sink.writer
        self._max_events = sink.max_events
        self._max_bytes = sink.max_bytes
        self._max_delay = max_delay

    def setup(self) -> None:
        self._writer.open()

    def teardown(self) -> None:
        self._writer.close()

    def process(
        self,
        element: tuple[int, tuple[str, tuple]],
        buffer: Any = beam.DoFn.StateParam(BUFFER),
        size: Any = beam.DoFn.StateParam(SIZE),
        flush: Any = beam.DoFn.TimerParam(FLUSH),
        end: Any = beam.DoFn.TimerParam(END),
    ) -> Iterator[Any]:
        item = as_item(element[1])
        count, nbytes = size.read() or (0, 2)
        buffer.add(item)
        count, nbytes = count + 1, nbytes + len(item[0]) + 1
        if count == 1:
            # A quiet stream still delivers within max_delay; a drained one at its end.
            flush.set(time.time() + self._max_delay)
            end.set(GlobalWindow().max_timestamp())
        if count >= self._max_events or nbytes >= self._max_bytes:
            yield from self._deliver(buffer, size)
            return
        size.write((count, nbytes))

    @on_timer(FLUSH)
    def _on_delay(
        self,
        buffer: Any = beam.DoFn.StateParam(BUFFER),
        size: Any = beam.DoFn.StateParam(SIZE),
    ) -> Iterator[Any]:
        yield from self._deliver(buffer, size)

    @on_timer(END)
    def _on_end(
        self,
        buffer: Any = beam.DoFn.StateParam(BUFFER),
        size: Any = beam.DoFn.StateParam(SIZE),
    ) -> Iterator[Any]:
        yield from self._deliver(buffer, size)

    def _deliver(self, buffer: Any, size: Any) -> Iterator[Any]:
        items = list(buffer.read())
        buffer.clear()
        size.clear()
        for batch in cut_batches(items, self._max_events, self._max_bytes):
            for item, letter in self._writer.deliver(batch):
                if letter is not None:
                    yield pvalue.TaggedOutput(DEAD_LETTER, letter)
                elif item[4] is not None:
                    yield pvalue.TaggedOutput(ACKS, item[4])


def _shard(element: tuple[str, tuple], shards: int) -> tuple[int, tuple[str, tuple]]:
    return zlib.crc32(element[0].encode("utf-8")) % shards, element


class BatchAndDeliverInStream(beam.PTransform):
    """Batch a stream by count, bytes and delay, and deliver each batch with ``sink``'s writer.

    ``sink`` is a configured :class:`PostToMoesif` or :class:`WriteBatchFiles`; its
    guarantees per batch (retries, split, bisect, dead letters) hold unchanged. A partial
    batch waits at most ``max_delay`` seconds of processing time. Records are spread over
    ``shards`` keys, so batching is parallel.
    """

    def __init__(
        self, sink: PostToMoesif | WriteBatchFiles, max_delay: float, shards: int = 4
    ) -> None:
        super().__init__()
        if max_delay <= 0:
            msg = f"batch_max_delay must be positive, got {max_delay}"
            raise ValueError(msg)
        if shards < 1:
            msg = f"shards must be >= 1, got {shards}"
            raise ValueError(msg)
        self._sink = sink
        self._max_delay = max_delay
        self._shards = shards

    def expand(self, records: beam.PCollection) -> Delivered:
        out = (
            records
            | "Shard" >> beam.Map(_shard, self._shards)
            | "Batch"
            >> beam.ParDo(_StreamBatchFn(self._sink, self._max_delay))
            .with_input_types(tuple[int, tuple[str, tuple]])
            .with_outputs(DEAD_LETTER, ACKS)
        )
        return Delivered(out[DEAD_LETTER], out[ACKS])


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
