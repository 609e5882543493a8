"""A stage's per-element work in worker processes, for a runner that gives a stage one process.

moesif-beam's default streaming runner (Prism, LOOPBACK workers) runs every stage in the
launching process, on one Python interpreter: measured on a Kafka backlog, parsing and
mapping were half of that interpreter's time, and it could not use the second core.
:func:`in_processes` wraps a stage's DoFn so that its ``process`` runs in a pool of worker
processes instead, on chunks of elements, while this process goes on reading and
delivering. What the stage guarantees is unchanged:

- the same DoFn code runs on every element, in the workers (set up there once);
- its outputs leave in the order of its inputs, each with its own input's timestamp and
  window, main and tagged alike;
- what the workers count is added to this process's counters, chunk by chunk;
- every element handed to the stage in a bundle has left it, with all its outputs, when
  the bundle finishes: nothing is held across bundles, so a checkpoint or an offset
  commit after the bundle covers it;
- a worker process that dies, or work that raises in one, fails the bundle: on Prism
  the job then fails, and a Kafka stream, which committed nothing for the bundle, reads
  it again when restarted; the next bundle starts a new pool if one died.

Only for DoFns whose ``process`` is a function of the element alone (no state, timers or
side inputs). A chunk is a bundle to the wrapped DoFn: what its ``finish_bundle`` emits
(windowed values, as Beam requires there) leaves after the chunk's outputs.

A worker process also ends by itself once the process that started its pool is gone.
(:mod:`.in_workers` keeps records in the workers instead, for the fused stream.)
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import pickle
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.utils.windowed_value import WindowedValue

from moesif_beam.transforms.common.counters import counter
from moesif_beam.transforms.common.garbage import collect_garbage_less_often
from moesif_beam.transforms.common.worker_tallies import TALLY_DIR_ENV

__all__ = [
    "CHUNK",
    "LOOK_EVERY",
    "Tally",
    "Wire",
    "chunk_due",
    "exit_with",
    "in_processes",
    "tally_counters",
]

# Elements per chunk: large enough that a chunk's hand-off (two pickles, two pipe writes)
# is small beside its work, small enough that a bundle's end waits on little.
CHUNK = 256
# A chunk that is not full is sent once its first element has waited this long (looked
# at every LOOK_EVERY elements; a bundle's end sends it in any case).
MAX_WAIT_S = 0.05
LOOK_EVERY = 16


def chunk_due(count: int, chunk: int, first_at: float) -> bool:
    """Whether ``count`` elements gathered since ``first_at`` (monotonic) go as a chunk now.

    Full, or, looked at every ``LOOK_EVERY`` elements, its first element has waited
    ``MAX_WAIT_S``: a slow stream's chunk goes before it is full.
    """
    return count >= chunk or (count % LOOK_EVERY == 0 and time.monotonic() - first_at > MAX_WAIT_S)


class Wire:
    """How a chunk crosses to a worker and its outputs come back; by default, as they are.

    A stage whose elements are costly to pickle (NamedTuples are: two Python calls per
    object each way) gives its own: ``to_worker`` runs here, ``in_worker`` and ``outputs``
    in the worker, ``restore`` here with the chunk's elements.
    """

    @staticmethod
    def to_worker(elements: list[Any]) -> Any:
        return elements

    @staticmethod
    def in_worker(payload: Any) -> list[Any]:
        return payload

    @staticmethod
    def outputs(outputs: list[list[Any]], elements: list[Any]) -> Any:
        return outputs

    @staticmethod
    def restore(payload: Any, elements: list[Any]) -> list[list[Any]]:
        return payload


class Tally:
    """A plain count standing in for a DoFn's counter, until its counts are handed on.

    For a DoFn that runs where Beam's metrics do not reach (a worker process, or a thread
    of the stage's own), see :func:`tally_counters`.
    """

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def inc(self, n: int = 1) -> None:
        self.count += n


def tally_counters(fn: beam.DoFn) -> dict[str, Tally]:
    """Replace ``fn``'s counters (its attributes that are) with tallies; them, by name."""
    tallies: dict[str, Tally] = {}
    for attribute, value in list(vars(fn).items()):
        name = getattr(value, "_name", None)
        if isinstance(name, str) and callable(getattr(value, "inc", None)):
            tallies[name] = tally = Tally()
            setattr(fn, attribute, tally)
    return tallies


class _Worker:
    """What a worker process holds: the stage's DoFn, its wire and its counters by name."""

    fn: Any = None
    wire: type[Wire] = Wire
    tallies: dict[str, Tally] = {}  # noqa: RUF012 - one per process, set up once


def exit_with(stage_pid: int) -> None:
    """End this worker once the stage's process is gone.

    A worker waits on its task queue, whose write end it holds itself, so a stage
    process killed outright (``kill -9``) would leave it, and the forkserver, for good.
    """
    while True:
        time.sleep(1.0)
        try:
            os.kill(stage_pid, 0)
        except (ProcessLookupError, PermissionError):
            # Gone (or its pid already another user's process).
            os._exit(0)


def _start_worker(pickled_fn: bytes, wire: type[Wire], stage_pid: int) -> None:
    # Out of the terminal's process group: a Ctrl-C (or a TERM sent to the group) is for
    # the stage's process, which drains and then ends its pool; a worker that took it
    # would break the pool and fail the drain's bundles instead.
    os.setpgrp()
    threading.Thread(target=exit_with, args=(stage_pid,), daemon=True).start()
    # This process's counts go back to the stage with each chunk; it must not also
    # publish them as a local run's worker would (worker_tallies), or they count twice.
    os.environ.pop(TALLY_DIR_ENV, None)
    collect_garbage_less_often()
    # The stage's own DoFn, pickled by the stage that started this process.
    fn = pickle.loads(pickled_fn)  # noqa: S301
    _Worker.tallies = tally_counters(fn)
    fn.setup()
    _Worker.fn = fn
    _Worker.wire = wire


def _run_chunk(payload: Any) -> tuple[Any, list[Any], dict[str, int]]:
    """Each element's outputs in order, what ``finish_bundle`` emitted, and the counts."""
    fn = _Worker.fn
    for tally in _Worker.tallies.values():
        tally.count = 0  # what a failed chunk counted is not this one's
    elements = _Worker.wire.in_worker(payload)
    # A chunk is a bundle to the DoFn: what it gathers per bundle, it emits per chunk.
    fn.start_bundle()
    process = fn.process
    outputs = [list(process(element) or ()) for element in elements]
    finished = list(fn.finish_bundle() or ())
    counts = {}
    for name, tally in _Worker.tallies.items():
        if tally.count:
            counts[name] = tally.count
            tally.count = 0
    return _Worker.wire.outputs(outputs, elements), finished, counts


def in_processes(
    fn: beam.DoFn, processes: int, chunk: int = CHUNK, wire: type[Wire] = Wire
) -> beam.DoFn:
    """``fn``, its ``process`` run in ``processes`` worker processes (see the module doc).

    The processes are this process's, shared by every instance of the DoFn (a runner
    makes one per bundle thread).
    """
    if processes < 1:
        msg = f"processes must be at least 1, got {processes}"
        raise ValueError(msg)
    if chunk < 1:
        msg = f"chunk must be at least 1, got {chunk}"
        raise ValueError(msg)
    return _PooledFn(fn, processes, chunk, wire)


# The worker pools of this process, by stage, shared by the DoFn's instances that are set
# up (how many): the last one's teardown shuts its pool down.
_POOLS: dict[str, ProcessPoolExecutor] = {}
_USERS: collections.Counter[str] = collections.Counter()
_POOLS_LOCK = threading.Lock()


class _PooledFn(beam.DoFn):
    """The stage's DoFn in a shared pool (see :func:`in_processes`)."""

    def __init__(self, fn: beam.DoFn, processes: int, chunk: int, wire: type[Wire]) -> None:
        self._fn = fn
        self._processes = processes
        self._chunk = chunk
        self._wire = wire
        self._key = uuid.uuid4().hex

    def setup(self) -> None:
        # The stage's process unpickles every record its workers send back: with the
        # default thresholds, garbage collection was 30% of its time (docs/performance.md).
        collect_garbage_less_often()
        self._counters: dict[str, Any] = {}
        self._pool: ProcessPoolExecutor | None = None
        with _POOLS_LOCK:
            _USERS[self._key] += 1

    def _shared_pool(self) -> ProcessPoolExecutor:
        with _POOLS_LOCK:
            pool = _POOLS.get(self._key)
            if pool is None:
                # forkserver, not fork: this process runs gRPC and Kafka client threads,
                # which a forked child would inherit half-way through their work.
                context = multiprocessing.get_context("forkserver")
                pool = _POOLS[self._key] = ProcessPoolExecutor(
                    self._processes,
                    context,
                    initializer=_start_worker,
                    initargs=(pickle.dumps(self._fn), self._wire, os.getpid()),
                )
            return pool

    def start_bundle(self) -> None:
        # Looked up every bundle: another instance may have replaced a broken pool.
        self._pool = self._shared_pool()
        self._elements: list[Any] = []
        self._metas: list[tuple[Any, Any]] = []
        # (future, the chunk's (timestamp, window) pairs, its elements), oldest first
        self._pending: collections.deque[tuple[Future, list[tuple[Any, Any]], list[Any]]] = (
            collections.deque()
        )

    def process(
        self,
        element: Any,
        timestamp: Any = beam.DoFn.TimestampParam,
        window: Any = beam.DoFn.WindowParam,
    ) -> Iterable[Any]:
        elements = self._elements
        elements.append(element)
        self._metas.append((timestamp, window))
        count = len(elements)
        if count == 1:
            self._first_at = time.monotonic()
        pending = self._pending
        if chunk_due(count, self._chunk, self._first_at):
            self._submit()
        elif count % LOOK_EVERY or not pending:
            return ()
        return self._ready()

    def _ready(self) -> list[Any]:
        """The outputs of the chunks that are back, oldest first; waits while too many are out."""
        pending = self._pending
        outputs: list[Any] = []
        # Bounded: over two chunks a worker in flight, this process waits for the oldest.
        while len(pending) > 2 * self._processes:
            outputs.extend(self._emit(pending.popleft()))
        # What is back already leaves now, not when the next chunk fills.
        while pending and pending[0][0].done():
            outputs.extend(self._emit(pending.popleft()))
        return outputs

    def finish_bundle(self) -> Iterable[Any]:
        if self._elements:
            self._submit()
        outputs: list[Any] = []
        pending = self._pending
        while pending:
            outputs.extend(self._emit(pending.popleft()))
        return outputs

    def teardown(self) -> None:
        self._pool = None
        with _POOLS_LOCK:
            _USERS[self._key] -= 1
            last = _USERS[self._key] <= 0
            if last:
                del _USERS[self._key]
            pool = _POOLS.pop(self._key, None) if last else None
        if pool is not None:
            pool.shutdown(wait=True)

    def _submit(self) -> None:
        self._submit_chunk(self._elements, self._metas)
        self._elements = []
        self._metas = []

    def _submit_chunk(self, elements: list[Any], metas: list[tuple[Any, Any]]) -> None:
        assert self._pool is not None
        future = self._pool.submit(_run_chunk, self._wire.to_worker(elements))
        self._pending.append((future, metas, elements))

    def _emit(self, done: tuple[Future, list[tuple[Any, Any]], list[Any]]) -> list[Any]:
        future, metas, elements = done
        try:
            payload, finished, counts = future.result()
        except BrokenProcessPool:
            # A worker died: the pool is of no more use to anyone; the next bundle (of
            # any instance) starts a new one.
            self._cancel_pending()
            self._drop_pool()
            raise
        except BaseException:
            # The work raised in a worker (or this bundle was abandoned): the pool is
            # sound, but this bundle's other chunks are not wanted.
            self._cancel_pending()
            raise
        results = self._wire.restore(payload, elements)
        for name, count in counts.items():
            known = self._counters.get(name)
            if known is None:
                known = self._counters[name] = counter(name)
            known.inc(count)
        out: list[Any] = []
        append = out.append
        for (timestamp, window), outputs in zip(metas, results, strict=True):
            windows = (window,)
            for output in outputs:
                if type(output) is pvalue.TaggedOutput:
                    append(
                        pvalue.TaggedOutput(
                            output.tag, WindowedValue(output.value, timestamp, windows)
                        )
                    )
                else:
                    append(WindowedValue(output, timestamp, windows))
        # What the worker's finish_bundle emitted is windowed already, as it must be there.
        out.extend(finished)
        return out

    def _cancel_pending(self) -> None:
        for future, _, _ in self._pending:
            future.cancel()
        self._pending.clear()

    def _drop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        with _POOLS_LOCK:
            if _POOLS.get(self._key) is pool:
                del _POOLS[self._key]
        pool.shutdown(wait=False)
