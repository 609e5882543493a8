"""The worker side of :mod:`.in_workers`: parse chunks, ask about their records, deliver.

A worker holds the records it parsed until the stage's process says which to keep, then
hands those to its delivery DoFn, whose bundle lasts until the stage asks it to end.
Messages each way are pickled tuples, first the kind:

- from the stage: ``("C", chunk, lines)`` parse; ``("K", chunk, range)`` read a Kafka
  range, then parse; ``("D", chunk, keep, letters)`` deliver the records whose byte in
  ``keep`` is 1 (for a range, also emit the acks of those marked 0, duplicates, and
  complete ``letters``, the ``type_conflict`` letters of those marked 2);
  ``("F", flush)`` end the delivery bundle; ``("X",)`` finish and exit;
- to the stage: ``("Q", chunk, questions, tagged, finished, counts, live)`` after parsing
  (for a range, ``questions`` is four columns: ids, Kafka times, signature ids and
  signatures);
  ``("R", chunk, tagged, counts, live)`` after delivering; ``("F", flush, windowed,
  counts, live)`` after a bundle's end; ``("L", {}, live)`` the batches in flight and
  POSTs now and then; ``("E", why)`` before exiting on an error.

``counts`` are what this process counted since its last message; ``live`` is its batches
in flight and the POSTs observed since (:mod:`.live`).
"""

from __future__ import annotations

import os
import pickle
import queue
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from apache_beam import pvalue

from moesif_beam.transforms.common import live
from moesif_beam.transforms.common.counters import tally_snapshot
from moesif_beam.transforms.common.garbage import collect_garbage_less_often
from moesif_beam.transforms.common.pooled import exit_with
from moesif_beam.transforms.common.worker_tallies import TALLY_DIR_ENV
from moesif_beam.transforms.deadletters.letters import ACK_FIELD, DEAD_LETTER
from moesif_beam.transforms.delivery.sinks import ACKS
from moesif_beam.transforms.records import new_ack, new_line
from moesif_beam.transforms.sources.kafka_ranges import KafkaRange, RangeReader

__all__ = ["run_worker"]

# How often a busy worker tells the stage its batches in flight and POSTs (the gauge and
# histogram of --metrics_port), when they changed.
_REPORT_EVERY_S = 0.25


def run_worker(
    conn: Connection,
    parse: bytes,
    deliver: bytes,
    stage_pid: int,
    kafka: dict[str, Any] | None = None,
) -> None:
    """A worker process's life: set up the stages, then answer ``conn`` until told to exit.

    ``kafka``: the librdkafka settings its Kafka ranges are read with, if it gets any.
    """
    # Out of the terminal's process group: a Ctrl-C is for the stage's process, which
    # drains and then ends its workers.
    os.setpgrp()
    threading.Thread(target=exit_with, args=(stage_pid,), daemon=True).start()
    # This process's counts go back to the stage; it must not also publish them as a local
    # run's worker would (worker_tallies), or they count twice.
    os.environ.pop(TALLY_DIR_ENV, None)
    collect_garbage_less_often()
    live.forward_from_here()
    worker = _Worker(conn, kafka)
    try:
        worker.start(pickle.loads(parse), pickle.loads(deliver))  # noqa: S301 - the stage's
        worker.run()
    except BaseException as exc:
        why = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        try:
            worker.send(("E", why))
        finally:
            os._exit(1)


def _lines(payload: list[tuple]) -> list[Any]:
    """The lines a chunk from the stage carries (acks as plain tuples, see in_workers)."""
    return [
        new_line((raw, source, None if ack is None else new_ack(ack), at))
        for raw, source, ack, at in payload
    ]


class _Worker:
    def __init__(self, conn: Connection, kafka: dict[str, Any] | None = None) -> None:
        self._conn = conn
        self._kafka = kafka  # the settings Kafka ranges are read with
        self._send_lock = threading.Lock()
        # Filled by a thread that only reads, so the stage's writes to this worker never
        # wait on what this worker is doing (and neither side can block the other).
        self._inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._counted = tally_snapshot()
        # chunk id -> (its records, whether they are a Kafka range's)
        self._pending: dict[int, tuple[list[Any], bool]] = {}
        self._ranges: RangeReader | None = None  # made by the first Kafka range
        self._reported = 0

    def start(self, parse: Any, deliver: Any) -> None:
        self._parse = parse
        self._deliver = deliver
        parse.setup()
        deliver.setup()
        deliver.start_bundle()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._report, daemon=True).start()

    def send(self, message: tuple) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            self._conn.send_bytes(data)

    def run(self) -> None:
        """Answer messages until told to exit; an error leaves at once (see run_worker).

        No teardown on an error: the delivery's teardown waits for POSTs in flight, which
        may retry for minutes, while every bundle of the stage waits on this worker.
        """
        inbox = self._inbox
        while True:
            data = inbox.get()
            if data is None:
                return  # the stage's process is gone
            message = pickle.loads(data)  # noqa: S301 - from the stage's process
            kind = message[0]
            if kind == "C":
                self._parsed(message[1], _lines(message[2]))
            elif kind == "K":
                self._parsed_range(message[1], message[2])
            elif kind == "D":
                self._delivered(message[1], message[2], message[3])
            elif kind == "F":
                windowed = list(self._deliver.finish_bundle() or ())
                self._deliver.start_bundle()
                self.send(("F", message[1], windowed, self._counts(), self._live()))
            else:
                # "X" comes once every bundle has ended: the delivery holds nothing.
                break
        self._deliver.teardown()
        self._parse.teardown()
        if self._ranges is not None:
            self._ranges.close()

    def _read(self) -> None:
        try:
            while True:
                self._inbox.put(self._conn.recv_bytes())
        except (EOFError, OSError):
            self._inbox.put(None)

    def _report(self) -> None:
        while True:
            time.sleep(_REPORT_EVERY_S)
            # While the main thread waits (on a batch retrying against a collector that
            # is away, say), the gauge and histogram still move.
            batches, posts = live.in_flight(), live.take_forwarded()
            if posts or batches != self._reported:
                self._reported = batches
                self.send(("L", {}, (batches, posts)))

    def _live(self) -> tuple[int, list[tuple[float, int | None]]]:
        batches = live.in_flight()
        self._reported = batches
        return batches, live.take_forwarded()

    def _counts(self) -> dict[str, int]:
        now = tally_snapshot()
        counted = self._counted
        self._counted = now
        return {name: n - counted.get(name, 0) for name, n in now.items() if n != counted.get(name)}

    def _parsed_range(self, chunk_id: int, kafka_range: tuple) -> None:
        """Read a claimed Kafka range's messages here, then as :meth:`_parsed`."""
        if self._ranges is None:
            assert self._kafka is not None
            self._ranges = RangeReader(self._kafka)
        lines, times, gap = self._ranges.read(KafkaRange(*kafka_range))
        self._parsed(chunk_id, lines, times, gap)

    def _parsed(
        self, chunk_id: int, lines: list[Any], times: list[int] | None = None, gap: Any = None
    ) -> None:
        """Parse ``lines`` and ask the stage about their records.

        ``times`` (each line's Kafka time) and ``gap`` (an ack of offsets without records)
        come with a Kafka range's lines, whose questions then go as columns.
        """
        parse = self._parse
        parse.start_bundle()
        process = parse.process
        records: list[Any] = []
        questions: list[tuple] = []
        tagged: list[tuple[int, str, Any]] = []
        # One signature object per signature id, so pickle writes each once per chunk.
        signatures: dict[bytes, tuple] = {}
        # A range's questions go as four columns (ids, Kafka times, signature ids,
        # signatures): no tuple per record to pickle here and unpickle there, and none of
        # what only a letter or an ack needs, which stays here (see _delivered).
        ids: list[str] = []
        clocks: list[int] = []
        sig_ids: list[bytes] = []
        sigs: list[tuple] = []
        for index, line in enumerate(lines):
            for output in process(line) or ():
                if type(output) is pvalue.TaggedOutput:
                    tagged.append((index, output.tag, output.value))
                    continue
                records.append(output)
                transaction_id, record = output
                time_ms, _, raw, source, sig_id, signature, ack, _ = record
                if signature:
                    signature = signatures.setdefault(sig_id, signature)
                if times is not None:
                    ids.append(transaction_id)
                    clocks.append(times[index])
                    sig_ids.append(sig_id)
                    sigs.append(signature)
                    continue
                questions.append(
                    (
                        index,
                        transaction_id,
                        time_ms,
                        None if raw is line.raw else raw,
                        None if source is line.source else source,
                        sig_id,
                        signature,
                        None if ack is None else (ack.parts, ack.part),
                    )
                )
        asked: Any = questions if times is None else (ids, clocks, sig_ids, sigs)
        finished = list(parse.finish_bundle() or ())
        if any(type(output) is not pvalue.TaggedOutput for output in finished):
            msg = f"{type(parse).__name__} emitted a record as its bundle ended: it must not"
            raise ValueError(msg)
        if gap is not None:
            tagged.append((0, ACKS, gap))
        self._pending[chunk_id] = (records, times is not None)
        self.send(("Q", chunk_id, asked, tagged, finished, self._counts(), self._live()))

    def _delivered(self, chunk_id: int, keep: bytes, letters: dict[int, dict]) -> None:
        """Deliver the records ``keep`` marks 1.

        For a Kafka range, also what the stage left to this process, which holds the
        records: the acks of those marked 0 (duplicates), and the input bytes, source and
        ack of each ``type_conflict`` letter (marked 2).
        """
        records, ranged = self._pending.pop(chunk_id)
        process = self._deliver.process
        outputs: list[Any] = []
        for position, letter in letters.items():
            # Letters come only for a range's records (lines' leave the stage whole).
            record = records[position][1]
            letter["payload"] = bytes(record.raw)
            letter["source"] = record.source
            if record.ack is not None:
                letter[ACK_FIELD] = record.ack
            outputs.append(pvalue.TaggedOutput(DEAD_LETTER, letter))
        for record, kept in zip(records, keep, strict=True):
            if kept == 1:
                outputs.extend(process(record) or ())
            elif not kept and ranged and record[1].ack is not None:
                outputs.append(pvalue.TaggedOutput(ACKS, record[1].ack))
        if any(type(output) is not pvalue.TaggedOutput for output in outputs):
            msg = f"{type(self._deliver).__name__} emitted a main output: it must only tag"
            raise ValueError(msg)
        self.send(("R", chunk_id, outputs, self._counts(), self._live()))
