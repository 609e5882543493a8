"""Dead letters: every record the pipeline cannot deliver, with its reason, as Avro.

A dead letter keeps the original input bytes untouched, so it can be inspected with any
Avro reader and replayed by feeding ``payload`` back through the pipeline.
"""

from __future__ import annotations

import time
from typing import Any

import apache_beam as beam
from apache_beam.io.avroio import WriteToAvro

from moesif_beam.schemas import schema_json
from moesif_beam.transforms.common.counters import counter

__all__ = [
    "ACK_FIELD",
    "DEAD_LETTER",
    "REASONS",
    "WriteDeadLetters",
    "dead_letter",
    "with_format",
]

# Tag of the dead-letter output of every fallible DoFn.
DEAD_LETTER = "dead_letter"

# Key of a dead letter's Kafka acknowledgement token while it travels through the pipeline;
# not part of the Avro record (fastavro ignores keys the schema does not name).
ACK_FIELD = "_ack"

REASONS = (
    "parse_error",
    "invalid_record",
    "type_conflict",
    "too_large",
    "collector_rejected",
    "retries_exhausted",
    "internal_error",
    "unreadable_input",
)


def dead_letter(
    reason: str,
    stage: str,
    detail: str,
    payload: bytes,
    source: str,
    pipeline: str,
    *,
    transaction_id: str | None = None,
    field: str | None = None,
    expected_type: str | None = None,
    actual_type: str | None = None,
) -> dict[str, Any]:
    """Build one dead-letter record (the shape of ``schemas/dead_letter.avsc``)."""
    if reason not in REASONS:
        msg = f"unknown dead-letter reason {reason!r}"
        raise ValueError(msg)
    return {
        "reason": reason,
        "stage": stage,
        "detail": detail,
        "field": field or None,
        "expected_type": expected_type,
        "actual_type": actual_type,
        "payload": bytes(payload),
        "source": source,
        "transaction_id": transaction_id,
        "pipeline": pipeline,
        "failed_at": int(time.time() * 1000),
    }


def with_format(record: dict[str, Any], input_format: str | None) -> dict[str, Any]:
    """``record`` with ``format`` set to ``input_format``, unless it names one already.

    A copy when it changes: Beam's elements are not ours to mutate.
    """
    if input_format is None or record.get("format") is not None:
        return record
    return {**record, "format": input_format}


def _count(record: dict[str, Any], input_format: str | None) -> dict[str, Any]:
    _DEAD_LETTERS.inc()
    return with_format(record, input_format)


_DEAD_LETTERS = counter("dead_letters")


class WriteDeadLetters(beam.PTransform):
    """Write all dead letters of a run as Avro files ``<directory>/<pipeline>-<run_id>-*.avro``.

    Takes one PCollection or a tuple of them and counts every record it writes in the
    ``dead_letters`` counter, so that counter is the truth about what reached the files.
    A run with no rejects still writes one valid, empty Avro file.

    ``input_format`` (the run's ``--format``) goes into the ``format`` of every letter
    that does not name one, so a replay reads the payloads as the run did. A run reads one
    format, so the writer knows it for every stage's letters, including those made far
    from the parser (dedup, schema, delivery), whose records do not carry it.
    """

    def __init__(
        self, directory: str, pipeline: str, run_id: str, input_format: str | None = None
    ) -> None:
        super().__init__()
        if not directory:
            msg = "dead-letter directory must not be empty"
            raise ValueError(msg)
        if not run_id:
            msg = "run_id must not be empty"
            raise ValueError(msg)
        self._prefix = f"{directory.rstrip('/')}/{pipeline}-{run_id}"
        self._format = input_format

    def expand(self, pcolls: Any) -> Any:
        # Each input is counted before the Flatten, by a step of its own: a step after a
        # Flatten is fused into every stage that produces one of its inputs, and Beam's
        # Flink runner (2.62.0) then reports one stage's count for the step, not their sum
        # (measured: 3 dead letters counted of 4 written, from two stages).
        if isinstance(pcolls, tuple | list):
            counted = tuple(
                pcoll | f"Count{index}" >> beam.Map(_count, self._format)
                for index, pcoll in enumerate(pcolls)
            )
            letters = counted | "Flatten" >> beam.Flatten()
        else:
            letters = pcolls | "Count" >> beam.Map(_count, self._format)
        return letters | "WriteAvro" >> WriteToAvro(
            self._prefix,
            schema=schema_json("dead_letter"),
            file_name_suffix=".avro",
            codec="deflate",
        )
