"""How :mod:`.in_workers` decides a chunk's questions, in the stage's process.

Two shapes of question: a Kafka range's, four columns decided with ``decide``'s
``verdicts``; followed lines', one tuple per record decided with ``decide``'s
``process`` on the record without its body.
"""

from __future__ import annotations

from typing import Any

from apache_beam import pvalue
from apache_beam.utils.windowed_value import WindowedValue

from moesif_beam.transforms.dedup.streaming import NEW_FIELDS
from moesif_beam.transforms.records import new_record

__all__ = ["decide_lines", "decide_range"]


def decide_range(
    decide: Any,
    questions: tuple[list, list, list, list],
    meta: tuple[Any, Any],
    keep: bytearray,
    letters: dict[int, dict],
    outputs: list[Any],
) -> None:
    """Decide a Kafka range's records: ``decide``'s verdicts on them, no record built.

    ``keep`` gets 1 for a record to deliver, 0 for a duplicate (whose ack the worker
    emits) and 2 for a ``type_conflict``, whose letter goes to the worker without
    the input bytes, source and ack it holds. Outputs take the range's time; the
    dedup clock is each message's Kafka time. Measured: building a record, its ack
    and its time for each question only for ``decide`` to take them apart cost
    1.02x to 1.13x the stream's rate (docs/performance.md, session 23).
    """
    timestamp, window = meta
    windows = (window,)
    ids, _, sig_ids, _ = questions
    deliver, refused, fields = decide.verdicts(*questions)
    # Duplicates are in neither list: their 0 in ``keep`` stands.
    for position in deliver:
        keep[position] = 1
    for position, conflict in refused:
        keep[position] = 2
        record = new_record((0, b"", b"", "", sig_ids[position], (), None, -1))
        letters[position] = decide.letter((ids[position], record), conflict)
    for field in fields:
        outputs.append(pvalue.TaggedOutput(NEW_FIELDS, WindowedValue(field, timestamp, windows)))


def decide_lines(
    decide: Any,
    questions: list[tuple],
    lines: list[Any],
    metas: list[Any],
    keep: bytearray,
    outputs: list[Any],
) -> None:
    """Decide the records of lines sent from here, with ``decide``'s ``process``."""
    process = decide.process
    for position, question in enumerate(questions):
        timestamp, window = metas[question[0]]
        element = _light(question, lines[question[0]])
        for output in process(element, timestamp) or ():
            if type(output) is pvalue.TaggedOutput:
                outputs.append(
                    pvalue.TaggedOutput(
                        output.tag, WindowedValue(output.value, timestamp, (window,))
                    )
                )
            else:
                keep[position] = 1


def _light(question: tuple, line: Any) -> tuple[str, Any]:
    """The keyed record a question stands for, its body left out (``decide`` needs none)."""
    _, transaction_id, time_ms, raw, source, sig_id, signature, parts = question
    line_raw, line_source, ack, line_at = line
    if parts is not None and parts != (1, 0):
        ack = ack._replace(parts=parts[0], part=parts[1])
    elif parts is None:
        ack = None
    return transaction_id, new_record(
        (
            time_ms,
            b"",
            line_raw if raw is None else raw,
            line_source if source is None else source,
            sig_id,
            signature,
            ack,
            line_at if raw is None else -1,
        )
    )
