"""Another stream design, without Beam: records never cross processes, only their ids.

A measurement for issue 15's streaming target, not a way to run moesif-beam.
``streaming_latency.py --split_bound`` runs it beside the pipeline, on the same backlog,
broker and emulator, and measures it the same way (10% to 90% of the backlog at the
emulator).

Today's stream (and ``stream_free_bound.py``, its work without Beam) reads Kafka in one
process, sends every message's bytes to two parsing processes and takes every record's
bytes back to deduplicate, batch, gzip and POST them there. Here each of two worker
processes does all of a record's work itself:

- it reads its own share of the topic's partitions (partition ``p`` to worker
  ``p % 2``) with its own confluent-kafka consumer, up to the end offsets when it starts;
- it runs the pipeline's normalize DoFn on a chunk of 256 messages (parse, map,
  signature, serialize);
- it sends the chunk's transaction ids (about 40 bytes each) to this process, which
  keeps the set of ids seen and answers with one byte a record: the first copy of an id
  to arrive, from either worker, is kept, as the stream keeps it;
- it batches what is kept (500), gzips it with the pipeline's compressor, POSTs it on
  four keep-alive connections (the reference loop's poster) and commits its consumer's
  offsets after each batch.

What it leaves out, as ``stream_free_bound.py`` does: dead letters (the backlog has
none), the schema check's decisions, the dedup journal and acknowledgements per record.

    .venv/bin/python benchmarks/stream_split_bound.py --bootstrap HOST:PORT --topic T \
        --url URL --total N
"""

from __future__ import annotations

import json
import multiprocessing
import pickle
import queue
import sys
import threading
import uuid
from multiprocessing.connection import Connection, wait
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._stages import normalize_fn
from benchmarks._support import drain_parser
from benchmarks.events_throughput import Poster
from moesif_beam.transforms.common.garbage import collect_garbage_less_often
from moesif_beam.transforms.delivery.sinks import DEFAULT_GZIP_LEVEL
from moesif_beam.transforms.records import Line

_WORKERS = 2
_CHUNK = 256
_BATCH = 500
_IDS, _END = b"I", b"E"


class _Deliver:
    """A worker's side of a chunk: normalize, ask which ids are new, batch and POST those."""

    def __init__(self, url: str, conn: Connection) -> None:
        self.normalize = normalize_fn(inline_signatures=True)  # as the stream's workers have it
        self.normalize.start_bundle()
        self.poster = Poster(url, DEFAULT_GZIP_LEVEL, thread=True)
        self.conn = conn
        self.counts = {"read": 0, "sent": 0, "duplicates": 0}
        self.batch: list[bytes] = []

    def chunk(self, values: list[bytes]) -> bool:
        """Take one chunk; whether a batch was posted (so offsets may be committed)."""
        self.counts["read"] += len(values)
        ids: list[bytes] = []
        bodies: list[bytes] = []
        for value in values:
            for output in self.normalize.process(Line(value, "kafka", None)):
                if type(output) is tuple:
                    ids.append(output[0].encode())
                    bodies.append(output[1].body)
        self.conn.send_bytes(_IDS + b"\n".join(ids))
        keep = self.conn.recv_bytes()
        posted = False
        batch = self.batch
        for body, kept in zip(bodies, keep, strict=True):
            if not kept:
                self.counts["duplicates"] += 1
                continue
            batch.append(body)
            if len(batch) >= _BATCH:
                self.poster.post(batch)
                self.counts["sent"] += len(batch)
                self.batch = batch = []
                posted = True
        return posted

    def end(self) -> None:
        if self.batch:
            self.poster.post(self.batch)
            self.counts["sent"] += len(self.batch)
        self.poster.close()
        self.conn.send_bytes(_END + json.dumps(self.counts).encode())


def _work(index: int, bootstrap: str, topic: str, group: str, url: str, conn: Connection) -> None:
    """One worker reading its own partitions, to their end offsets at its start."""
    collect_garbage_less_often()
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
        }
    )
    partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
    mine = [p for p in partitions if p % _WORKERS == index]
    ends = {
        p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in mine
    }
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in mine])
    positions = dict.fromkeys(mine, 0)
    deliver = _Deliver(url, conn)
    while any(positions[p] < ends[p] for p in mine):
        messages = consumer.consume(num_messages=10_000, timeout=0.2)
        values = []
        for message in messages:
            if message.error() is None:
                values.append(message.value())
                positions[message.partition()] = message.offset() + 1
        for start in range(0, len(values), _CHUNK):
            if deliver.chunk(values[start : start + _CHUNK]):
                consumer.commit(asynchronous=True)
    consumer.close()
    deliver.end()


def _work_on_lines(url: str, conn: Connection, lines: Connection) -> None:
    """One worker taking chunks of message values from this process (``--lines_here``)."""
    collect_garbage_less_often()
    deliver = _Deliver(url, conn)
    while chunk := lines.recv_bytes():
        deliver.chunk(pickle.loads(chunk))
    deliver.end()


def _answer(message: bytes, seen: set[bytes]) -> bytes:
    """One byte an id: 1 for the first copy of it to arrive."""
    ids = message[1:].split(b"\n") if len(message) > 1 else []
    keep = bytearray(len(ids))
    for i, transaction_id in enumerate(ids):
        if transaction_id not in seen:
            seen.add(transaction_id)
            keep[i] = 1
    return bytes(keep)


def _feed(lines: Connection, chunks: queue.Queue) -> None:
    """Write this worker's chunks to it, so this process never blocks on a full pipe."""
    while (chunk := chunks.get()) is not None:
        lines.send_bytes(chunk)
    lines.send_bytes(b"")


def run(bootstrap: str, topic: str, url: str, total: int, *, lines_here: bool = False) -> dict:
    """Drain the topic with two workers; this process answers which ids are new.

    With ``lines_here`` this process also reads the topic and hands each worker chunks of
    message values (as the pipeline's reader, a Beam source, would have to), and commits
    offsets asynchronously every 500 messages.
    """
    context = multiprocessing.get_context("fork")  # no Kafka client exists here yet
    group = f"split-bound-{uuid.uuid4().hex[:8]}"
    conns: list[Connection] = []
    feeders: list[tuple[queue.Queue, threading.Thread]] = []
    workers = []
    for index in range(_WORKERS):
        ours, theirs = context.Pipe()
        if lines_here:
            lines_in, lines_out = context.Pipe(duplex=False)
            worker = context.Process(
                target=_work_on_lines, args=(url, theirs, lines_in), daemon=True
            )
        else:
            worker = context.Process(
                target=_work, args=(index, bootstrap, topic, group, url, theirs), daemon=True
            )
        worker.start()
        theirs.close()
        conns.append(ours)
        workers.append(worker)
        if lines_here:
            lines_in.close()
            chunks: queue.Queue = queue.Queue()
            feeder = threading.Thread(target=_feed, args=(lines_out, chunks), daemon=True)
            feeder.start()
            feeders.append((chunks, feeder))
    seen: set[bytes] = set()
    totals = {"read": 0, "sent": 0, "duplicates": 0}
    live = list(conns)
    consumer = None
    if lines_here:
        consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        consumer.subscribe([topic])
    read = 0
    out = [0] * _WORKERS  # chunks handed to each worker and not yet asked about
    next_worker = 0
    while live:
        # Read on while a worker has under two chunks to work on; otherwise wait for one.
        can_read = consumer is not None and read < total and min(out) < 2
        if can_read:
            assert consumer is not None
            messages = consumer.consume(num_messages=10_000, timeout=0.05)
            values = [m.value() for m in messages if m.error() is None]
            for start in range(0, len(values), _CHUNK):
                index = min(range(_WORKERS), key=lambda i: (out[i], (i - next_worker) % 2))
                next_worker = (index + 1) % _WORKERS
                out[index] += 1
                feeders[index][0].put(pickle.dumps(values[start : start + _CHUNK], 5))
            read += len(values)
            if values:
                consumer.commit(asynchronous=True)
            if read >= total:
                for chunks, _ in feeders:
                    chunks.put(None)
        for conn in wait(live, timeout=0 if can_read else None):
            assert isinstance(conn, Connection)
            try:
                message = conn.recv_bytes()
            except EOFError:
                sys.exit("split bound: a worker ended without its counts")
            if message[:1] == _END:
                for key, value in json.loads(message[1:]).items():
                    totals[key] += value
                live.remove(conn)
                continue
            out[conns.index(conn)] -= 1
            conn.send_bytes(_answer(message, seen))
    for worker in workers:
        worker.join()
    if consumer is not None:
        consumer.close()
    if totals["read"] != total:
        sys.exit(f"split bound: read {totals['read']:,} of {total:,}")
    return totals


def main() -> int:
    parser = drain_parser(__doc__)
    parser.add_argument(
        "--lines_here",
        action="store_true",
        help="this process reads the topic and hands the workers the message values",
    )
    args = parser.parse_args()
    counts = run(args.bootstrap, args.topic, args.url, args.total, lines_here=args.lines_here)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
