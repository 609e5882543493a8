"""Parse and deliver in worker processes, decide here: records never come back to this process.

moesif-beam's default streaming runner (Prism, LOOPBACK workers) runs every stage in one
Python process. Moving only parsing to worker processes
(:func:`~moesif_beam.transforms.common.pooled.in_processes`) brings every parsed record back
here for dedup, the type rule and delivery, and left this process the busiest of the
stream's (docs/performance.md, sessions 21 and 22). :class:`InWorkers` keeps each record
in the worker that parsed it:

1. a chunk of lines goes to a worker, which runs ``parse`` on it; or a claimed Kafka
   offset range, which the worker reads with its own consumer first
   (:class:`~moesif_beam.transforms.sources.kafka_ranges.RangeReader`);
2. the worker sends back one small question per record (its transaction id, time,
   metadata signature, and for lines its acknowledgement; not its body), and
   ``parse``'s dead letters;
3. ``decide`` runs here, in one thread, on each question, in the order of the lines
   (for lines, as a record without a body through ``process``; for a range, through
   its ``verdicts``); the worker is told which records to keep. Whatever ``decide``
   emits under a tag leaves here, except a range's duplicates' acks and the input
   bytes, source and ack of its ``type_conflict`` letters, which the worker holding the
   records adds;
4. the worker hands the records kept to ``deliver``, a DoFn whose bundle there lasts until
   this stage's bundle ends; each bundle end here ends it in every worker (its batches
   delivered, its acks emitted) before this bundle finishes.

What the stages guarantee is unchanged:

- every line handed to the stage in a bundle has been parsed, decided and, if kept,
  delivered when the bundle finishes; its acknowledgement and dead letters leave in
  this bundle's output or, when a concurrent bundle's end reached the same worker
  first, in that bundle's (an ack is a fact about a record, whichever bundle carries
  it; offsets are committed only over a contiguous run of acks, so acks lost with a
  failed bundle only mean records delivered again);
- ``decide`` sees every record in the order of its input, one at a time, so what it
  remembers (ids, the first type of a key) is this process's, as before;
- what the workers count is added to this process's counters, bundle by bundle, and
  their POSTs to its latency histogram and batches-in-flight gauge;
- a worker that dies, or work that raises in one, fails the bundle (on Prism, the job;
  a Kafka stream, which committed nothing for it, reads it again when restarted); the
  next bundle starts new workers.

Outputs keep their line's timestamp and window (a range's, its claim's); what
``deliver`` emits as it goes (dead letters of a batch) takes the time of the chunk whose
decision led to it, and what it emits at its bundle's end is windowed by it, as Beam
requires there.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import multiprocessing
import os
import pickle
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.utils.windowed_value import WindowedValue

from moesif_beam.transforms.common import live
from moesif_beam.transforms.common.counters import counter
from moesif_beam.transforms.common.garbage import collect_garbage_less_often
from moesif_beam.transforms.common.in_workers_decide import decide_lines, decide_range
from moesif_beam.transforms.common.in_workers_worker import run_worker
from moesif_beam.transforms.common.pooled import CHUNK, LOOK_EVERY, chunk_due, tally_counters
from moesif_beam.transforms.sources.kafka_ranges import range_reader_settings
from moesif_beam.transforms.sources.kafka_topic import KafkaSourceConfig

__all__ = ["InWorkers"]

# Chunks a worker has been sent and not yet asked about: one to parse while this process
# decides on the other, and no more, so a busy worker holds little.
_OUTSTANDING = 2


class InWorkers(beam.PTransform):
    """``parse`` and ``deliver`` in ``processes`` workers, ``decide`` here; one ParDo.

    ``parse`` takes :class:`~moesif_beam.transforms.records.Line` s and emits keyed
    :class:`~moesif_beam.transforms.records.Record` s (and tagged outputs); ``decide``
    takes a keyed record (without its body) and its timestamp, and emits it to keep it;
    ``deliver`` takes the keyed records kept and emits only tagged outputs. The guarantees
    are the module's. The output is the ParDo's tagged outputs (``tags``); the main one is
    empty. With ``kafka`` (the source's settings), each input element is a
    :class:`~moesif_beam.transforms.sources.kafka_ranges.KafkaRange` instead, which a worker reads
    with its own consumer: a partition's ranges all go to one worker when ``sticky``,
    else to the least busy one. Outputs then take the range's time, and ``decide`` gets
    each message's Kafka time; it must then also offer ``verdicts`` and ``letter`` (as
    :class:`~moesif_beam.transforms.dedup.streaming.DedupAndCheckInProcess`'s stage does),
    which decide a record without one being built.
    """

    def __init__(
        self,
        parse: beam.DoFn,
        decide: beam.DoFn,
        deliver: beam.DoFn,
        processes: int,
        tags: Sequence[str],
        chunk: int = CHUNK,
        *,
        kafka: KafkaSourceConfig | None = None,
        sticky: bool = True,
    ) -> None:
        super().__init__()
        if not all(isinstance(stage, beam.DoFn) for stage in (parse, decide, deliver)):
            msg = "InWorkers takes DoFns"
            raise ValueError(msg)
        for method in ("start_bundle", "finish_bundle"):
            if getattr(type(decide), method) is not getattr(beam.DoFn, method):
                # decide runs on one thread for every bundle: it has no bundles of its own.
                msg = f"{type(decide).__name__} has a {method}: decide must work per element"
                raise ValueError(msg)
        if processes < 1:
            msg = f"processes must be at least 1, got {processes}"
            raise ValueError(msg)
        if chunk < 1:
            msg = f"chunk must be at least 1, got {chunk}"
            raise ValueError(msg)
        if kafka is not None and not all(
            callable(getattr(decide, name, None)) for name in ("verdicts", "letter")
        ):
            msg = f"with kafka, decide must offer verdicts and letter: {type(decide).__name__}"
            raise TypeError(msg)
        kind = _InWorkersRangesFn if kafka is not None else _InWorkersFn
        self._fn = kind(_Stages(parse, decide, deliver, processes, kafka, sticky), chunk)
        self._tags = tuple(tags)

    def expand(self, pcoll: beam.PCollection) -> pvalue.DoOutputsTuple:
        return pcoll | beam.ParDo(self._fn).with_outputs(*self._tags, main="main")


class _Stages:
    """What a pool is made of; its key names the pool shared by the DoFn's copies."""

    def __init__(
        self,
        parse: beam.DoFn,
        decide: beam.DoFn,
        deliver: beam.DoFn,
        processes: int,
        kafka: KafkaSourceConfig | None = None,
        sticky: bool = True,
    ) -> None:
        # The librdkafka settings workers read Kafka ranges with.
        self.kafka_settings = (
            None if kafka is None else range_reader_settings(kafka.consumer_settings(), sticky)
        )
        self.sticky = sticky
        self.parse = parse
        self.decide = decide
        self.deliver = deliver
        self.processes = processes
        self.key = uuid.uuid4().hex


class _Box:
    """One bundle's share of the pool: what it must emit and count, and what it waits for."""

    __slots__ = ("counts", "flushes", "open", "order", "outputs", "workers")

    def __init__(self) -> None:
        self.outputs: list[Any] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.open = 0  # chunks sent and not yet decided
        self.flushes = 0  # bundle ends asked of workers and not yet done
        # Its chunks not yet decided, in the order they were sent: decided in that order.
        self.order: collections.deque[int] = collections.deque()
        self.workers: set[int] = set()  # the workers its chunks went to


class _Chunk:
    __slots__ = ("asked", "box", "lines", "metas", "worker")

    def __init__(self, box: _Box, lines: list[Any] | None, metas: list[Any], worker: int) -> None:
        self.box = box
        self.lines = lines  # None for a Kafka range: the worker read it
        self.metas = metas  # (timestamp, window) of each line; a range's one, its claim's
        self.worker = worker
        self.asked: tuple | None = None  # the worker's questions, until they are decided


class _Pool:
    """The worker processes of one stage and the thread here that answers them.

    Every field below the condition is guarded by it.
    """

    def __init__(self, stages: _Stages) -> None:
        context = multiprocessing.get_context("forkserver")
        parse, deliver = pickle.dumps(stages.parse), pickle.dumps(stages.deliver)
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        self._send_locks: list[threading.Lock] = []
        for _ in range(stages.processes):
            here, there = context.Pipe(duplex=True)
            # forkserver, not fork: this process runs gRPC and Kafka client threads, which
            # a forked child would inherit half-way through their work.
            proc = context.Process(
                target=run_worker,
                args=(there, parse, deliver, os.getpid(), stages.kafka_settings),
                daemon=True,
            )
            proc.start()
            there.close()
            self._conns.append(here)
            self._procs.append(proc)
            self._send_locks.append(threading.Lock())
        # decide's own copy, called only from the answering thread; its counters count
        # there and are handed to the bundle whose chunk it decided.
        self._decide = pickle.loads(pickle.dumps(stages.decide))  # noqa: S301 - our own
        # Beam's metrics count per bundle thread, and this is none.
        self._tallies = tally_counters(self._decide)
        self._decide.setup()
        self._sticky = stages.sticky
        self._ids = itertools.count()
        self.cv = threading.Condition()
        self.broken: str | None = None
        self._closing = False
        self._chunks: dict[int, _Chunk] = {}
        self._flushes: dict[int, _Box] = {}
        self._outstanding = [0] * stages.processes
        self._turn = 0
        self._answerer = threading.Thread(target=self._answer, name="in-workers", daemon=True)
        self._answerer.start()

    # -- called from bundle threads ------------------------------------------------------

    def send(
        self,
        box: _Box,
        lines: list[Any] | None,
        metas: list[Any],
        kafka_range: Any = None,
    ) -> None:
        """Hand a chunk to a worker; waits while that worker has enough.

        The least busy worker, or for a Kafka range with ``sticky``, the one its
        partition's ranges go to.
        """
        # Built before the chunk is counted: what cannot be sent must not be waited for.
        payload = _to_worker(lines) if lines is not None else tuple(kafka_range)
        kind = "C" if lines is not None else "K"
        with self.cv:
            while True:
                self.check()
                if kafka_range is not None and self._sticky:
                    # A partition's ranges go to one worker, whose consumer goes on
                    # prefetching from where the last one ended.
                    worker = kafka_range.partition % len(self._conns)
                else:
                    worker = min(
                        range(len(self._outstanding)),
                        key=lambda w: (self._outstanding[w], (w - self._turn) % len(self._conns)),
                    )
                if self._outstanding[worker] < _OUTSTANDING:
                    break
                self.cv.wait()
            self._turn = worker + 1
            chunk_id = next(self._ids)
            self._chunks[chunk_id] = _Chunk(box, lines, metas, worker)
            self._outstanding[worker] += 1
            box.open += 1
            box.order.append(chunk_id)
            box.workers.add(worker)
        self._send(worker, (kind, chunk_id, payload))

    def finish(self, box: _Box) -> None:
        """Wait until every chunk of ``box`` is decided, then end its workers' bundles.

        Only the workers that had one of its chunks: a bundle that sent nothing waits for
        nothing, and cuts no other bundle's batches short.
        """
        with self.cv:
            while box.open:
                self.check()
                self.cv.wait()
            flushes = []
            for worker in sorted(box.workers):
                flush_id = next(self._ids)
                self._flushes[flush_id] = box
                box.flushes += 1
                flushes.append((worker, flush_id))
        for worker, flush_id in flushes:
            self._send(worker, ("F", flush_id))
        with self.cv:
            while box.flushes:
                self.check()
                self.cv.wait()

    def close(self) -> None:
        """End the workers (each finishes what it has) and the answering thread."""
        with self.cv:
            self._closing = True
        for worker in range(len(self._conns)):
            with contextlib.suppress(OSError):  # gone already
                self._send(worker, ("X",))
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        self._answerer.join(timeout=5)
        for worker, conn in enumerate(self._conns):
            conn.close()
            live.in_flight_elsewhere((id(self), worker), None)
        self._decide.teardown()

    def check(self) -> None:
        if self.broken is not None:
            msg = f"a worker process failed: {self.broken}"
            raise RuntimeError(msg)

    def _send(self, worker: int, message: tuple) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._send_locks[worker]:
                self._conns[worker].send_bytes(data)
        except OSError as exc:
            # The worker is gone: its own report (or its end) says why, if it came first.
            with self.cv:
                self._break(f"worker process {worker} took no more work ({exc})")
            self.check()

    # -- the answering thread ------------------------------------------------------------

    def _answer(self) -> None:
        try:
            self._answer_workers()
        finally:
            # However this thread ends, nobody may wait on it: an end that is not the
            # pool's close breaks the pool, and every waiting bundle fails.
            with self.cv:
                if not self._closing:
                    self._break("the thread answering the workers ended")

    def _answer_workers(self) -> None:
        index: dict[Any, int] = {conn: worker for worker, conn in enumerate(self._conns)}
        while index:
            try:
                ready: list[Any] = wait(list(index), timeout=1.0)
            except OSError:
                return  # closed
            for conn in ready:
                worker = index[conn]
                try:
                    message = pickle.loads(conn.recv_bytes())  # noqa: S301 - our own worker
                except (EOFError, OSError):
                    del index[conn]
                    with self.cv:
                        if not self._closing:
                            self._break(f"worker process {worker} ended")
                    continue
                except BaseException as exc:
                    with self.cv:
                        self._break(f"a message of worker {worker} could not be read: {exc!r}")
                    return
                try:
                    self._handle(worker, message)
                except BaseException as exc:
                    with self.cv:
                        self._break(f"deciding a chunk raised {type(exc).__name__}: {exc}")
                    return

    def _break(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
        self.cv.notify_all()

    def _handle(self, worker: int, message: tuple) -> None:
        kind = message[0]
        if kind == "E":
            with self.cv:
                self._break(message[1])
            return
        *body, counts, (batches, posts) = message
        for seconds, status in posts:
            live.observe_post(seconds, status)
        live.in_flight_elsewhere((id(self), worker), batches)
        if kind == "Q":
            self._asked(body[1], (body[2], body[3], body[4], counts))
        elif kind == "R":
            with self.cv:
                chunk = self._chunks.pop(body[1])
                timestamp, window = chunk.metas[-1]
                box = chunk.box
                box.outputs.extend(_windowed(body[2], timestamp, window))
                box.counts.update(counts)
        elif kind == "F":
            with self.cv:
                box = self._flushes.pop(body[1])
                box.outputs.extend(body[2])
                box.counts.update(counts)
                box.flushes -= 1
                self.cv.notify_all()

    def _asked(self, chunk_id: int, asked: tuple) -> None:
        """Decide on a chunk's questions once every earlier chunk of its bundle is decided.

        A bundle's chunks go to several workers and come back in any order; ``decide``
        must see records in the order of their lines (the first copy of an id is the one
        kept, the first type of a key wins), so a chunk that comes back early waits.
        """
        with self.cv:
            chunk = self._chunks[chunk_id]
            chunk.asked = asked
            box = chunk.box
            ready = []
            while box.order and self._chunks[box.order[0]].asked is not None:
                ready.append(box.order.popleft())
        for ready_id in ready:
            if self.broken is not None:
                # A broken pool's bundles fail: what it would remember of them (ids,
                # types) must not outlive them in the memory its successor shares.
                return
            self._decided(ready_id)

    def _decided(self, chunk_id: int) -> None:
        with self.cv:
            chunk = self._chunks[chunk_id]
        assert chunk.asked is not None
        questions, tagged, finished, counts = chunk.asked
        chunk.asked = ()  # decided: the questions need not be kept
        worker = chunk.worker
        lines, metas = chunk.lines, chunk.metas
        outputs: list[Any] = []
        for index, tag, value in tagged:
            timestamp, window = metas[index if lines is not None else 0]
            outputs.append(pvalue.TaggedOutput(tag, WindowedValue(value, timestamp, (window,))))
        outputs.extend(finished)
        keep = bytearray(len(questions) if lines is not None else len(questions[0]))
        # Dead letters of records read by the worker: it has their input bytes, this
        # process does not; it puts them in and emits the letters.
        letters: dict[int, dict] = {}
        if lines is None:
            decide_range(self._decide, questions, metas[0], keep, letters, outputs)
        else:
            decide_lines(self._decide, questions, lines, metas, keep, outputs)
        self._send(worker, ("D", chunk_id, bytes(keep), letters))
        with self.cv:
            box = chunk.box
            box.outputs.extend(outputs)
            box.counts.update(counts)
            for name, tally in self._tallies.items():
                if tally.count:
                    box.counts[name] += tally.count
                    tally.count = 0
            self._outstanding[worker] -= 1
            box.open -= 1
            self.cv.notify_all()


def _windowed(outputs: Iterable[Any], timestamp: Any, window: Any) -> list[Any]:
    return [
        pvalue.TaggedOutput(output.tag, WindowedValue(output.value, timestamp, (window,)))
        for output in outputs
    ]


def _to_worker(lines: list[Any]) -> list[tuple]:
    # Acks as plain tuples: a NamedTuple costs two Python calls each way to pickle.
    return [
        (raw, source, None if ack is None else tuple(ack), at) for raw, source, ack, at in lines
    ]


# The pools of this process, by stage key, shared by the DoFn's instances that are set up
# (how many): the last one's teardown closes its pool.
_POOLS: dict[str, _Pool] = {}
_USERS: collections.Counter[str] = collections.Counter()
_POOLS_LOCK = threading.Lock()


class _InWorkersFn(beam.DoFn):
    """The stages in a shared pool (see :class:`InWorkers`); input one line at a time."""

    def __init__(self, stages: _Stages, chunk: int) -> None:
        self._stages = stages
        self._chunk = chunk

    def setup(self) -> None:
        # This process unpickles every question: see transforms/common/garbage.py.
        collect_garbage_less_often()
        self._counters: dict[str, Any] = {}
        with _POOLS_LOCK:
            _USERS[self._stages.key] += 1

    def start_bundle(self) -> None:
        key = self._stages.key
        with _POOLS_LOCK:
            pool = _POOLS.get(key)
            if pool is None or pool.broken is not None:
                if pool is not None:
                    threading.Thread(target=pool.close, daemon=True).start()
                pool = _POOLS[key] = _Pool(self._stages)
        self._pool = pool
        self._box = _Box()
        self._lines: list[Any] = []
        self._metas: list[tuple[Any, Any]] = []
        self._first_at = 0.0

    def process(
        self,
        element: Any,
        timestamp: Any = beam.DoFn.TimestampParam,
        window: Any = beam.DoFn.WindowParam,
    ) -> Iterable[Any]:
        lines = self._lines
        lines.append(element)
        self._metas.append((timestamp, window))
        count = len(lines)
        if count == 1:
            self._first_at = time.monotonic()
        if chunk_due(count, self._chunk, self._first_at):
            self._pool.send(self._box, lines, self._metas)
            self._lines, self._metas = [], []
        elif count % LOOK_EVERY:
            return ()  # what is back waits a few lines: taking it is a lock per look
        return self._take()

    def finish_bundle(self) -> Iterable[Any]:
        if self._lines:
            self._pool.send(self._box, self._lines, self._metas)
            self._lines, self._metas = [], []
        self._pool.finish(self._box)
        return self._take()

    def teardown(self) -> None:
        key = self._stages.key
        with _POOLS_LOCK:
            _USERS[key] -= 1
            last = _USERS[key] <= 0
            if last:
                del _USERS[key]
            pool = _POOLS.pop(key, None) if last else None
        if pool is not None:
            pool.close()

    def _take(self) -> list[Any]:
        """What this bundle's chunks led to so far, with their counts added here."""
        box = self._box
        with self._pool.cv:
            self._pool.check()
            outputs, box.outputs = box.outputs, []
            counts, box.counts = box.counts, collections.Counter()
        for name, count in counts.items():
            known = self._counters.get(name)
            if known is None:
                known = self._counters[name] = counter(name)
            known.inc(count)
        return outputs


class _InWorkersRangesFn(_InWorkersFn):
    """:class:`_InWorkersFn` for Kafka ranges: each input element is a ``KafkaRange``.

    The worker reads the range's messages with a consumer of its own, one per partition.
    Outputs take the range's time; ``decide`` gets each message's Kafka time.
    """

    def process(
        self,
        kafka_range: Any,
        timestamp: Any = beam.DoFn.TimestampParam,
        window: Any = beam.DoFn.WindowParam,
    ) -> Iterable[Any]:
        self._pool.send(self._box, None, [(timestamp, window)], kafka_range)
        return self._take()
