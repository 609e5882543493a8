"""The reference loop of ``events_throughput.py``, draining a Kafka topic instead of a file.

A measurement for issue 15's streaming target, not a way to run moesif-beam.
``streaming_latency.py`` runs it on the same backlog, broker and emulator as the
pipeline, and measures it the same way (10% to 90% of the backlog at the emulator).
What a user would otherwise write to drain a topic into Moesif, as lean as we could
make it, on one core:

- read the topic with confluent-kafka, up to 10,000 messages a call;
- parse, map (the pipeline's own mapping), drop repeated ids, serialize with orjson;
- batch 500, gzip with the pipeline's compressor, POST on four keep-alive connections
  (the file loop's :class:`~benchmarks.events_throughput.Poster`);
- commit the consumer's offsets, asynchronously, after each batch is handed to a POST
  (a commit before the POST's answer: fewer guarantees than the pipeline's, which
  commits an offset only once its record is delivered, so the loop is not slowed by
  them).

    .venv/bin/python benchmarks/kafka_reference.py --bootstrap HOST:PORT --topic T \
        --url URL --total N
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import orjson
from confluent_kafka import Consumer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._support import drain_parser
from benchmarks.events_throughput import KEYS, Poster, unique_of
from moesif_beam.transforms.common.garbage import collect_garbage_less_often
from moesif_beam.transforms.delivery.sinks import DEFAULT_GZIP_LEVEL

_BATCH = 500


def run(bootstrap: str, topic: str, url: str, total: int) -> dict:
    """Drain ``total`` messages of ``topic``; the counts, as the file loop gives them."""
    collect_garbage_less_often()  # the pipeline's setting, as the file loop has it
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reference-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    poster = Poster(url, DEFAULT_GZIP_LEVEL, thread=True)
    dumps = orjson.dumps
    counts = dict.fromkeys(KEYS, 0)
    seen: set[str] = set()
    batch: list[bytes] = []
    idle_since = time.monotonic()
    while counts["read"] < total:
        messages = consumer.consume(num_messages=10_000, timeout=0.2)
        values = [m.value() for m in messages if m.error() is None]
        if not values:
            if time.monotonic() - idle_since > 60:
                sys.exit(f"kafka reference: nothing to read for 60s after {counts['read']:,}")
            continue
        idle_since = time.monotonic()
        for _, event in unique_of(values, counts, seen):
            batch.append(dumps(event))
            if len(batch) >= _BATCH:
                poster.post(batch)
                counts["sent"] += len(batch)
                batch = []
                consumer.commit(asynchronous=True)
    if batch:
        poster.post(batch)
        counts["sent"] += len(batch)
    poster.close()
    consumer.close()
    return counts


def main() -> int:
    parser = drain_parser(__doc__)
    args = parser.parse_args()
    print(json.dumps(run(args.bootstrap, args.topic, args.url, args.total)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
