"""How fast the stream's own work drains a Kafka backlog on two cores without Beam's runner.

A measurement for issue 15, not a way to run moesif-beam; ``streaming_latency.py
--free_bound`` runs it beside the pipeline, on the same backlog, broker and emulator, and
measures it the same way (10% to 90% of the backlog at the emulator). It does the work of
the default stream's one fused step, by hand, with nothing of Beam's between:

- this process reads the topic with confluent-kafka, a consumer batch at a time, as the
  pipeline's reader does, and hands the values in chunks of 256 to two worker processes;
- the workers run the pipeline's own normalize DoFn (parse, map, signature, serialize);
- this process keeps the first copy of each transaction id, checks no schema (the
  emulator's schema is empty, so the pipeline's check passes everything too), batches
  500 records, gzips them with the pipeline's compressor and POSTs them on up to eight
  threads, and commits offsets asynchronously after each batch.

What it leaves out besides the runner: dead letters (the backlog has none), the dedup
journal and acknowledgements per record. So its rate is about the ceiling of the stream's
design on this machine, a prototype to measure it rather than argue it.

    .venv/bin/python benchmarks/stream_free_bound.py --bootstrap HOST:PORT --topic T \
        --url URL --total N
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
from confluent_kafka import Consumer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._stages import normalize_fn
from benchmarks._support import APP_ID, drain_parser
from moesif_beam.transforms.delivery.http import encode_batch, gzip_body
from moesif_beam.transforms.delivery.sinks import DEFAULT_GZIP_LEVEL
from moesif_beam.transforms.records import Line

_CHUNK = 256
_BATCH = 500
_IN_FLIGHT = 8


class _Worker:
    """What a worker process holds: the pipeline's normalize DoFn, set up once."""

    normalize: Any = None


def _start_worker() -> None:
    normalize = normalize_fn(inline_signatures=True)  # as the stream's workers have it
    normalize.start_bundle()
    _Worker.normalize = normalize


def _map_chunk(values: list[bytes]) -> list[tuple[str, bytes]]:
    """``(transaction_id, body)`` of each value the pipeline's normalize turns into a record."""
    out = []
    for value in values:
        for output in _Worker.normalize.process(Line(value, "kafka", None)):
            if type(output) is tuple:
                out.append((output[0], output[1].body))
    return out


# One requests session per posting thread.
_SESSIONS = threading.local()


def _post(url: str, body: bytes) -> None:
    local = _SESSIONS.__dict__
    session = local.get("session")
    if session is None:
        session = local["session"] = requests.Session()
        session.trust_env = False
    response = session.post(
        url,
        data=body,
        headers={
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "X-Moesif-Application-Id": APP_ID,
        },
        timeout=60,
    )
    response.raise_for_status()


def run(bootstrap: str, topic: str, url: str, total: int) -> dict:
    # Forked before the consumer exists: no librdkafka thread is copied half-way.
    pool = multiprocessing.get_context("fork").Pool(2, initializer=_start_worker)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"free-bound-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    posts = ThreadPoolExecutor(_IN_FLIGHT)
    in_flight: collections.deque[Future] = collections.deque()
    chunks: collections.deque[Any] = collections.deque()
    batch_url = url.rstrip("/") + "/v1/events/batch"
    seen: set[str] = set()
    batch: list[bytes] = []
    counts = {"read": 0, "sent": 0, "duplicates": 0}

    def deliver(records: list[bytes]) -> None:
        body = gzip_body(encode_batch(records), DEFAULT_GZIP_LEVEL)
        in_flight.append(posts.submit(_post, batch_url, body))
        counts["sent"] += len(records)
        while len(in_flight) > _IN_FLIGHT or (in_flight and in_flight[0].done()):
            in_flight.popleft().result()
        consumer.commit(asynchronous=True)

    def take(result: list[tuple[str, bytes]]) -> None:
        nonlocal batch
        for transaction_id, body in result:
            if transaction_id in seen:
                counts["duplicates"] += 1
                continue
            seen.add(transaction_id)
            batch.append(body)
            if len(batch) >= _BATCH:
                deliver(batch)
                batch = []

    idle_since = time.monotonic()
    while counts["read"] < total or chunks:
        if counts["read"] < total:
            messages = consumer.consume(num_messages=10_000, timeout=0.2)
            values = [m.value() for m in messages if m.error() is None]
            counts["read"] += len(values)
            for start in range(0, len(values), _CHUNK):
                chunks.append(pool.apply_async(_map_chunk, (values[start : start + _CHUNK],)))
            if values:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > 60:
                sys.exit(f"free bound: nothing to read for 60s after {counts['read']:,}")
        # Over two chunks a worker out, wait for the oldest; take what is back already.
        while chunks and (len(chunks) > 4 or chunks[0].ready() or counts["read"] >= total):
            take(chunks.popleft().get())
    if batch:
        deliver(batch)
    while in_flight:
        in_flight.popleft().result()
    consumer.close()
    pool.close()
    pool.join()
    posts.shutdown()
    return counts


def main() -> int:
    parser = drain_parser(__doc__)
    args = parser.parse_args()
    print(json.dumps(run(args.bootstrap, args.topic, args.url, args.total)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
