"""The metadata type rule in a bounded run: per-key winners, then a verdict per signature.

See :mod:`moesif_beam.transforms.schema.rule` for the rule and why the answer does not depend
on input order or parallelism.
"""

from __future__ import annotations

import threading
from collections import ChainMap
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam import pvalue

from moesif_beam.transforms.common.counters import counter
from moesif_beam.transforms.common.fused import Run
from moesif_beam.transforms.deadletters.letters import ACK_FIELD, DEAD_LETTER, dead_letter
from moesif_beam.transforms.records import FirstSeen, Keyed
from moesif_beam.transforms.schema.rule import (
    Signature,
    _remember,
    find_conflict,
)
from moesif_beam.transforms.schema.store import _checked, decide_in_store
from moesif_beam.transforms.sources.readback import original_bytes

__all__ = ["EnforceMetadataSchema", "InProcessSchema", "SchemaChecked", "conflict_letter"]


class SchemaChecked(NamedTuple):
    """Outputs of :class:`EnforceMetadataSchema`."""

    records: beam.PCollection  # records whose metadata agrees with the schema
    dead_letters: beam.PCollection  # type_conflict dead letters
    new_fields: beam.PCollection  # (key, type) pairs this run adds to the schema


class _FirstType(NamedTuple):
    """A key's type as one record carries it; the earliest ``(time_ms, transaction_id)`` wins."""

    time_ms: int
    transaction_id: str
    kind: str


def _earliest(values: Iterable[Any]) -> Any:
    # FirstSeen and _FirstType both order by (time_ms, transaction_id) first.
    return min(values)


def _explode(element: tuple[bytes, FirstSeen]) -> Iterator[tuple[str, _FirstType]]:
    _, first = element
    for key, kind in first.signature:
        yield key, _FirstType(first.time_ms, first.transaction_id, kind)


def _verdict(
    element: tuple[bytes, FirstSeen],
    stored: dict[str, str],
    winners: dict[str, str],
) -> Iterator[tuple[bytes, tuple[str, str, str]]]:
    sig_id, first = element
    # The persisted type of a key wins over this run's first-seen one.
    conflict = find_conflict(first.signature, ChainMap(stored, winners))
    if conflict is not None:
        yield sig_id, conflict


class _CheckFn(beam.DoFn):
    def __init__(self, pipeline: str) -> None:
        self._pipeline = pipeline
        self._conflicts = counter("type_conflicts")

    # A tuple, not a generator: this runs once per record.
    def process(
        self, element: Keyed, conflicts: Mapping[bytes, tuple[str, str, str]]
    ) -> tuple[Any]:
        conflict = conflicts.get(element[1].sig_id) if conflicts else None
        if conflict is None:
            return (element,)
        self._conflicts.inc()
        return (
            pvalue.TaggedOutput(DEAD_LETTER, conflict_letter(element, conflict, self._pipeline)),
        )

    def process_run(self, run: Run, conflicts: Mapping[bytes, tuple[str, str, str]]) -> list[Any]:
        """:meth:`process` for each record of ``run``: the kept ones as one run, then letters."""
        if not conflicts:
            return [run]
        kept = Run()
        letters: list[Any] = []
        for element in run:
            conflict = conflicts.get(element[1].sig_id)
            if conflict is None:
                kept.append(element)
                continue
            self._conflicts.inc()
            letter = conflict_letter(element, conflict, self._pipeline)
            letters.append(pvalue.TaggedOutput(DEAD_LETTER, letter))
        return [kept, *letters]


def conflict_letter(
    element: Keyed, conflict: tuple[str, str, str], pipeline: str
) -> dict[str, Any]:
    """The ``type_conflict`` dead letter of a record, with its acknowledgement if any."""
    transaction_id, value = element
    key, expected, actual = conflict
    payload, note = original_bytes(value)
    detail = f"metadata key {key!r} is {expected} in the schema; this record sends {actual}"
    letter = dead_letter(
        "type_conflict",
        "schema",
        detail + note,
        payload,
        value.source,
        pipeline,
        transaction_id=transaction_id,
        field=key,
        expected_type=expected,
        actual_type=actual,
    )
    if value.ack is not None:
        letter[ACK_FIELD] = value.ack
    return letter


class InProcessSchema:
    """The metadata type rule for a stream whose workers are all one process.

    The first type to arrive for a key wins (or the stored one), decided under one lock,
    so concurrent bundles agree. With ``store`` (the schema store's path and scope), a
    key's first decision is written to the store before it is used, and a key the store
    already has (from a run that stored it after this one started) takes that type. A
    signature's verdict is computed once and remembered (bounded, like every memo here).
    Only valid where one process sees every record: on runners with several worker
    processes use :class:`EnforceMetadataSchemaInStream`.
    """

    def __init__(self, stored: Mapping[str, str], store: tuple[str, str] | None = None) -> None:
        self._decided = dict(_checked(stored))
        self._store = store
        self._verdicts: dict[bytes, tuple[str, str, str] | None] = {}
        self._lock = threading.Lock()

    def check(self, sig_id: bytes, sig: Signature) -> tuple[tuple[str, str, str] | None, list]:
        """``(conflict or None, keys decided for the first time as (key, type))``."""
        verdicts = self._verdicts
        if sig_id in verdicts:
            return verdicts[sig_id], []
        with self._lock:
            if sig_id in verdicts:
                return verdicts[sig_id], []
            decided = self._decided
            new = []
            for key, kind in sig:
                if key in decided:  # a key twice in one signature: its first type wins
                    continue
                if self._store is None:
                    decided[key] = kind
                    new.append((key, kind))
                    continue
                # Stored before any record carrying it is delivered: a restarted run (whose
                # memory is gone) or a concurrent one then reads the same type.
                decided[key], added = decide_in_store(*self._store, key, kind)
                if added:
                    new.append((key, kind))
            verdict = find_conflict(sig, decided)
            _remember(verdicts, sig_id, verdict)
        return verdict, new


class EnforceMetadataSchema(beam.PTransform):
    """Dead-letter records whose metadata contradicts the first type seen for a key.

    Takes ``(records, signatures)``: records are ``(transaction_id, Record)`` and signatures
    ``(signature_id, FirstSeen)`` as
    :class:`~moesif_beam.transforms.formats.normalize.NormalizeRecords` emits them. Returns
    the records that agree, ``type_conflict`` dead letters (counted in ``type_conflicts``), and
    the ``(key, type)`` pairs this run adds to the persisted schema.
    """

    def __init__(self, stored: Mapping[str, str], pipeline: str) -> None:
        super().__init__()
        self._stored = _checked(stored)
        self._pipeline = pipeline

    def expand(self, pcolls: tuple[beam.PCollection, beam.PCollection]) -> SchemaChecked:
        records, signatures = pcolls
        conflicts, new_fields = self.decide(signatures)
        checked = records | "Check" >> beam.ParDo(
            self.check_stage(), conflicts=beam.pvalue.AsDict(conflicts)
        ).with_outputs(DEAD_LETTER, main="records")
        return SchemaChecked(checked.records, checked[DEAD_LETTER], new_fields)

    def decide(self, signatures: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        """``(conflicts, new_fields)``: what the run's signatures decide.

        The conflicting signature ids (the ``conflicts`` side input of :meth:`check_stage`,
        as ``AsDict``) and the ``(key, type)`` pairs this run adds to the persisted schema.
        """
        distinct = signatures | "DistinctSignatures" >> beam.CombinePerKey(_earliest)
        winners = (
            distinct
            | "KeyTypes" >> beam.FlatMap(_explode)
            | "FirstTypePerKey" >> beam.CombinePerKey(_earliest)
            | "WinningType" >> beam.MapTuple(lambda key, first: (key, first.kind))
        )
        conflicts = distinct | "Verdicts" >> beam.FlatMap(
            _verdict, stored=self._stored, winners=beam.pvalue.AsDict(winners)
        )
        stored = self._stored
        new_fields = winners | "NewKeys" >> beam.Filter(lambda kv: kv[0] not in stored)
        return conflicts, new_fields

    def check_stage(self) -> beam.DoFn:
        """The check as a stage of a :class:`~moesif_beam.transforms.common.fused.Fused` chain.

        Takes the ``conflicts`` side input; records that agree out, ``type_conflict`` dead
        letters tagged.
        """
        return _CheckFn(self._pipeline)
