"""Exact deduplication by transaction id for bounded runs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam

from transforms.counters import counter

__all__ = ["DedupByTransactionId", "pick_first"]


def pick_first(values: Iterable[tuple]) -> tuple[tuple, int]:
    """Choose the record a transaction id keeps, and count the others.

    The earliest event time wins, ties broken by the serialized record, so the choice does
    not depend on input order, bundle boundaries or the number of workers.

    Returns:
        ``(winner, duplicates)``.
    """
    winner: tuple | None = None
    seen = 0
    for value in values:
        seen += 1
        if winner is None or value[:2] < winner[:2]:
            winner = value
    if winner is None:
        msg = "pick_first needs at least one value"
        raise ValueError(msg)
    return winner, seen - 1


class _KeepFirstFn(beam.DoFn):
    def __init__(self) -> None:
        self._duplicates = counter("duplicates")

    def process(self, element: tuple[str, Iterable[Any]]) -> Iterator[tuple[str, Any]]:
        transaction_id, values = element
        winner, duplicates = pick_first(values)
        if duplicates:
            self._duplicates.inc(duplicates)
        yield transaction_id, winner


class DedupByTransactionId(beam.PTransform):
    """Keep exactly one record per transaction id in a bounded run.

    Input and output are ``(transaction_id, (time_ms, record_json, raw, source, ...))``. Every
    dropped record is counted in ``duplicates``. One shuffle, of bytes: the records were
    serialized before this step and are not parsed again.
    """

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        return (
            records | "GroupById" >> beam.GroupByKey() | "KeepFirst" >> beam.ParDo(_KeepFirstFn())
        )
