"""Deliver serialized Moesif records in batches: to the Collector API, or to batch files.

Both sinks cut batches by count and by bytes, build the body once (a JSON array of the
already-serialized records, gzip-compressed) and account for every record: it is sent,
or it leaves as a dead letter with its reason. The HTTP sink's retry decisions come from
one pure function, :func:`decide`.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from moesif_beam.transforms.common.counters import counter
from moesif_beam.transforms.common.errors import require_positive
from moesif_beam.transforms.common.live import delivering
from moesif_beam.transforms.deadletters.letters import DEAD_LETTER
from moesif_beam.transforms.delivery.http import (
    _Counts,
    _Fates,
    _FileWriter,
    _HttpWriter,
    _Item,
    _Writer,
)
from moesif_beam.transforms.delivery.journal import DeliveredIds
from moesif_beam.transforms.delivery.policy import RetryPolicy
from moesif_beam.transforms.delivery.transport import Secret, batch_url, check_ca_bundle
from moesif_beam.transforms.records import Ack, Keyed
from moesif_beam.transforms.sources.offsets import compact_acks

__all__ = [
    "ACKS",
    "BATCH_BYTE_LIMITS",
    "DEFAULT_GZIP_LEVEL",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_EVENTS",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_TIMEOUT",
    "MAX_IN_FLIGHT",
    "PostToMoesif",
    "WriteBatchFiles",
    "validate_batching",
    "validate_collector",
]

_LOG = logging.getLogger(__name__)

# Moesif's request limits per batch endpoint, whether or not the body is compressed.
BATCH_BYTE_LIMITS = {"events": 50_000_000, "actions": 15_000_000}


# Tag of the output carrying delivered records' Kafka acknowledgement tokens.
ACKS = "acks"


class _BatchingFn(beam.DoFn):
    """Cuts records into batches by count and bytes and has a writer deliver them.

    A batch is cut when it is full, when its oldest record has waited ``max_delay``
    seconds (if set), and at the end of every bundle, so nothing waits on a timer: bounded
    runs get full batches from their large bundles, streams get batches within a bundle's
    length. Dead letters go to the ``dead_letter`` output; with ``acks``, delivered
    records' acknowledgement tokens go to the ``acks`` output. The main output is empty.

    Up to ``max_in_flight`` batches are compressed and delivered on background threads
    while this thread goes on batching (zlib and sockets release the GIL, so this uses a
    second core and overlaps the collector's own time). A bundle finishes only once every
    batch cut in it has an outcome, and every output and counter is emitted from this
    thread, oldest batch first, so a bundle's outputs mean what they meant before.
    """

    def __init__(
        self,
        writer: _Writer,
        max_events: int,
        max_bytes: int,
        max_delay: float | None = None,
        *,
        acks: bool = False,
        max_in_flight: int = 1,
    ) -> None:
        self._writer = writer
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._max_delay = max_delay
        self._acks = acks
        self._max_in_flight = max_in_flight
        self._batch: list[_Item] = []
        self._size = 2
        self._oldest = 0.0
        self._in_flight: collections.deque[Future] = collections.deque()

    def setup(self) -> None:
        self._writer.open()
        self._counters: dict[str, Any] = {}
        self._pool: ThreadPoolExecutor | None = None
        if self._max_in_flight > 1:
            self._pool = ThreadPoolExecutor(self._max_in_flight, thread_name_prefix="deliver")

    def teardown(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self._writer.close()

    def start_bundle(self) -> None:
        self._batch = []
        self._size = 2  # the brackets of the JSON array
        self._in_flight = collections.deque()
        self._done_acks: list[Ack] = []

    # A list (mostly empty), not a generator: this runs once per record.
    def process(self, item: Keyed) -> list[Any]:
        size = len(item[1].body) + 1  # the record and its comma
        outputs: list[Any] = []
        if self._batch and (
            len(self._batch) >= self._max_events or self._size + size > self._max_bytes
        ):
            outputs.extend(self._flush())
        if not self._batch:
            self._oldest = time.monotonic()
        self._batch.append(item)
        self._size += size
        if self._max_delay is not None and time.monotonic() - self._oldest >= self._max_delay:
            outputs.extend(self._flush())
        # Asked every 64 records, not every one: done() takes the future's lock, and an
        # outcome waiting a few more records changes nothing (a flush collects too).
        elif self._in_flight and not len(self._batch) & 63 and self._in_flight[0].done():
            outputs.extend(self._collect(self._max_in_flight))
        return outputs

    def process_run(self, items: list[Keyed]) -> list[Any]:
        """:meth:`process` for each of ``items`` in order, in one call (a fused chain's run)."""
        if self._max_delay is not None:  # cut by time too: record by record
            return [output for item in items for output in self.process(item)]
        outputs: list[Any] = []
        batch, size = self._batch, self._size
        max_events, max_bytes = self._max_events, self._max_bytes
        for item in items:
            length = len(item[1].body) + 1  # the record and its comma
            if batch and (len(batch) >= max_events or size + length > max_bytes):
                self._batch, self._size = batch, size
                outputs.extend(self._flush())
                batch, size = self._batch, self._size
            batch.append(item)
            size += length
        self._batch, self._size = batch, size
        if self._in_flight and self._in_flight[0].done():
            outputs.extend(self._collect(self._max_in_flight))
        return outputs

    def finish_bundle(self) -> Iterator[Any]:
        window = GlobalWindow()
        outputs = [*self._flush(), *self._collect(0)]
        self._before_acks()
        # A bundle's delivered records are runs of consecutive offsets: a few tokens say
        # the same as one per record, and the commit stage has that much less to shuffle.
        # Emitted here, after every batch of the bundle got its 2xx.
        outputs += [pvalue.TaggedOutput(ACKS, ack) for ack in compact_acks(self._done_acks)]
        self._done_acks = []
        for output in outputs:
            if isinstance(output, pvalue.TaggedOutput):
                yield pvalue.TaggedOutput(
                    output.tag, WindowedValue(output.value, window.max_timestamp(), (window,))
                )
            else:
                yield WindowedValue(output, window.max_timestamp(), (window,))

    def _before_acks(self) -> None:
        """Called once per bundle, after its batches' outcomes, before its acks leave."""

    def _delivered(self, transaction_id: str) -> None:
        """Called, in streams, for each record the collector (or batch file) took."""

    def _flush(self) -> Iterator[Any]:
        batch, self._batch, self._size = self._batch, [], 2
        if not batch:
            return
        if self._pool is None:
            done: Future = Future()
            done.set_result(self._deliver(batch))
            self._in_flight.append(done)
        else:
            self._in_flight.append(self._pool.submit(self._deliver, batch))
        yield from self._collect(self._max_in_flight)

    def _deliver(self, batch: list[_Item]) -> tuple[_Fates, _Counts]:
        counts: _Counts = collections.Counter()
        with delivering():  # the batches-in-flight gauge of --metrics_port
            return list(self._writer.deliver(batch, counts)), counts

    def _collect(self, limit: int) -> Iterator[Any]:
        """Emit the outcomes of finished batches, oldest first; wait while over ``limit``."""
        while self._in_flight and (len(self._in_flight) > limit or self._in_flight[0].done()):
            try:
                fates, counts = self._in_flight.popleft().result()
            except BaseException:
                # The bundle fails (a refused application id, say); batches still queued
                # are not posted, and the runner decides what is retried.
                for pending in self._in_flight:
                    pending.cancel()
                self._in_flight.clear()
                raise
            for name, n in counts.items():
                if name not in self._counters:
                    self._counters[name] = counter(name)
                self._counters[name].inc(n)
            for (transaction_id, record), letter in fates:
                if letter is not None:
                    yield pvalue.TaggedOutput(DEAD_LETTER, letter)
                elif self._acks:
                    self._delivered(transaction_id)
                    if record.ack is not None:
                        self._done_acks.append(record.ack)


class _JournaledBatchingFn(_BatchingFn):
    """:class:`_BatchingFn` for a stream that also journals the ids it delivered.

    Each bundle's delivered ids are written to the journal in one file before the
    bundle's acks leave it, so no offset is committed for an id the journal lacks. An
    id's time there is the wall clock when its bundle ended: a stream's records reach
    delivery with no event time of their own left (stages that hold records emit them
    at the end of the global window), and a new job keeps an id for one TTL after it.
    """

    def __init__(self, *args: Any, journal_dir: str, ttl_ms: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._journal_dir = journal_dir
        self._ttl_ms = ttl_ms

    def setup(self) -> None:
        super().setup()
        self._journal = DeliveredIds(self._journal_dir, self._ttl_ms)
        self._bundles = 0

    def start_bundle(self) -> None:
        super().start_bundle()
        self._taken: list[str] = []

    def _delivered(self, transaction_id: str) -> None:
        self._taken.append(transaction_id)

    def _before_acks(self) -> None:
        now_ms = int(time.time() * 1000)
        self._journal.write([(transaction_id, now_ms) for transaction_id in self._taken])
        self._taken = []
        self._bundles += 1
        if self._bundles % _COMPACT_EVERY_BUNDLES == 0:
            # After the write: the bundle's ids are safe whatever compaction does.
            self._journal.compact_quietly()


# How often (in bundles) a delivering worker looks whether the journal needs compacting:
# a listing per bundle would cost an object store request a second.
_COMPACT_EVERY_BUNDLES = 64


# Each batch in flight holds up to max_bytes twice (JSON and gzip): 32 at 5 MB each would be
# about 320 MB per worker, the most we let a flag ask for.
MAX_IN_FLIGHT = 32


# The sinks' defaults; the command's flags and PipelineConfig take theirs from here.
DEFAULT_MAX_EVENTS = 500
DEFAULT_MAX_BYTES = 5_000_000
# Chosen from a measured table of CPU against bytes sent (docs/performance.md): igzip's
# level 2 takes 1.5 µs per event for 182 bytes; zlib's 6, the default before, 13.8 µs for 134.
DEFAULT_GZIP_LEVEL = 2
DEFAULT_TIMEOUT = 30.0
# Batches a worker has on their way at once. A collector across the internet answers in
# tens to hundreds of milliseconds, and a worker waiting on two of them waits most of the
# time. Measured with the emulator answering after 100 ms (200k WSO2 events, 2 workers):
# 2 in flight 11.6k records/s, 4 15.3k, 8 20.6k; without the delay, 8 and 2 ran alike
# (1M events, three pairs), peak PSS 419 MiB against 379 (docs/performance.md).
DEFAULT_MAX_IN_FLIGHT = 8


def validate_batching(
    kind: str, max_events: int, max_bytes: int, gzip_level: int, max_in_flight: int
) -> None:
    """Check batch settings; each message starts with the flag's name.

    Raises:
        ValueError: a setting is out of range.
    """
    if kind not in BATCH_BYTE_LIMITS:
        msg = f"kind must be one of {sorted(BATCH_BYTE_LIMITS)}, got {kind!r}"
        raise ValueError(msg)
    if max_events < 1:
        msg = f"batch_max_events must be at least 1, got {max_events}"
        raise ValueError(msg)
    limit = BATCH_BYTE_LIMITS[kind]
    # A record larger than max_bytes still goes out, alone; the per-record limit upstream
    # keeps that within Moesif's batch limit.
    if not 1024 <= max_bytes <= limit:
        msg = (
            f"batch_max_bytes must be between 1024 and {limit} "
            f"(Moesif's {kind} batch limit), got {max_bytes}"
        )
        raise ValueError(msg)
    if not 0 <= gzip_level <= 9:
        msg = f"gzip_level must be between 0 and 9, got {gzip_level}"
        raise ValueError(msg)
    if not 1 <= max_in_flight <= MAX_IN_FLIGHT:
        msg = f"max_in_flight must be between 1 and {MAX_IN_FLIGHT}, got {max_in_flight}"
        raise ValueError(msg)


def validate_collector(base_url: str, timeout: float, ca_bundle: str | None) -> None:
    """Check where and how to reach the collector; each message starts with the flag's name.

    Raises:
        ValueError: a setting is unusable.
    """
    if not base_url.startswith(("http://", "https://")):
        msg = f"moesif_base_url must start with http:// or https://, got {base_url!r}"
        raise ValueError(msg)
    require_positive("http_timeout", timeout)
    if ca_bundle is not None:
        check_ca_bundle(ca_bundle)


class _BatchSink(beam.PTransform):
    """What both sinks share: a writer, batch limits, and the batching DoFn built on them."""

    _writer: _Writer
    _max_events: int
    _max_bytes: int
    _max_in_flight: int

    def _batching(
        self,
        max_delay: float | None = None,
        *,
        acks: bool = False,
        journal: tuple[str, int] | None = None,
    ) -> _BatchingFn:
        settings = (self._writer, self._max_events, self._max_bytes, max_delay)
        if journal is None:
            return _BatchingFn(*settings, acks=acks, max_in_flight=self._max_in_flight)
        return _JournaledBatchingFn(
            *settings,
            acks=acks,
            max_in_flight=self._max_in_flight,
            journal_dir=journal[0],
            ttl_ms=journal[1],
        )

    def stage(self) -> beam.DoFn:
        """Bounded delivery as a stage of a :class:`~moesif_beam.transforms.common.fused.Fused`.

        Records in, dead letters out (tagged), with the guarantees of :meth:`expand`.
        """
        return self._batching()

    def stream_stage(self, max_delay: float, journal: tuple[str, int] | None = None) -> beam.DoFn:
        """:meth:`in_stream`'s DoFn, as a stage of a chain."""
        return self._batching(max_delay, acks=True, journal=journal)

    def in_stream(self, max_delay: float, journal: tuple[str, int] | None = None) -> beam.ParDo:
        """The same delivery for a stream: dead letters, plus acks of delivered records.

        With ``journal`` (a directory and a TTL in ms), delivered ids are journaled first
        (:class:`_JournaledBatchingFn`).
        """
        fn = self._batching(max_delay, acks=True, journal=journal)
        return beam.ParDo(fn).with_outputs(ACKS, DEAD_LETTER, main="sent")


class PostToMoesif(_BatchSink):
    """Post records to ``/v1/<kind>/batch`` in gzip batches; output the dead letters.

    Input: ``(transaction_id, Record)``. Batches hold at most
    ``max_events`` records and ``max_bytes`` bytes of JSON (uncompressed, so Moesif's limit
    holds however the body compresses). Guarantees, per batch:

    * 2xx: every record counts as ``sent``.
    * 408, 429, 5xx except 501, no response: retried with capped exponential backoff and
      jitter, honouring ``Retry-After``, for at most ``policy.max_retry_seconds``; then
      each record is a ``retries_exhausted`` dead letter.
    * 413: the batch is split in halves; a single record refused for size is ``too_large``.
    * 400: the batch is bisected until the refused records are isolated, each a
      ``collector_rejected`` dead letter with the collector's message; the rest is sent.
    * 401, 403, redirects (never followed), TLS failures and other configuration errors:
      the run stops with :class:`CollectorConfigError`, and nothing is dead-lettered.

    The retry time is bounded for the whole run too: once the collector has failed for
    ``policy.max_retry_seconds`` without a break, each further batch gets one attempt
    before its records are dead-lettered, until the collector answers again. ``ca_bundle``
    is a PEM file of CAs to trust instead of the system's.

    Delivery is at least once: a retried bundle posts again, with the same transaction
    ids, which Moesif deduplicates.
    """

    def __init__(
        self,
        kind: str,
        base_url: str,
        application_id: Secret,
        pipeline: str,
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        gzip_level: int = DEFAULT_GZIP_LEVEL,
        policy: RetryPolicy | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        ca_bundle: str | None = None,
    ) -> None:
        super().__init__()
        validate_batching(kind, max_events, max_bytes, gzip_level, max_in_flight)
        validate_collector(base_url, timeout, ca_bundle)
        if not isinstance(application_id, Secret) or not application_id.reveal():
            msg = "a Moesif application id is required to post to the collector"
            raise ValueError(msg)
        self._writer: _Writer = _HttpWriter(
            batch_url(base_url, kind),
            application_id,
            pipeline,
            gzip_level,
            policy or RetryPolicy(),
            timeout,
            ca_bundle=ca_bundle,
        )
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._max_in_flight = max_in_flight

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        out = records | "PostBatches" >> beam.ParDo(self._batching()).with_outputs(
            DEAD_LETTER, main="sent"
        )
        return out[DEAD_LETTER]


class WriteBatchFiles(_BatchSink):
    """Write each batch body, exactly the gzip bytes that would be posted, to a file.

    Files are ``<directory>/batch-<content hash>.json.gz``; ``zcat`` shows the JSON array.
    Used when no application id is configured. Outputs no dead letters (an unwritable
    directory fails the run), but returns an empty PCollection so callers wire it alike.
    """

    def __init__(
        self,
        kind: str,
        directory: str,
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        gzip_level: int = DEFAULT_GZIP_LEVEL,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        super().__init__()
        validate_batching(kind, max_events, max_bytes, gzip_level, max_in_flight)
        if not directory:
            msg = "an output directory is required"
            raise ValueError(msg)
        self._writer: _Writer = _FileWriter(directory, kind, gzip_level)
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._max_in_flight = max_in_flight

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        out = records | "WriteBatches" >> beam.ParDo(self._batching()).with_outputs(
            DEAD_LETTER, main="sent"
        )
        return out[DEAD_LETTER]
