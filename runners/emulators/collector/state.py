"""The emulator's state, independent of HTTP: store, metadata schema, counters, faults."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

from moesif_beam.runners.emulators.collector.config import _PROFILE_KEYS, KINDS, CollectorConfig
from moesif_beam.runners.emulators.collector.faults import _Fault, _FaultSchedule
from moesif_beam.runners.emulators.collector.inspection import (
    _MAX_LAGS,
    _arrival_lags,
    _percentiles,
)
from moesif_beam.runners.emulators.collector.metadata import (
    MetadataTypeConflict,
    _apply_metadata_rules,
    _clean_schema,
    _Shapes,
)
from moesif_beam.runners.emulators.collector.store import _CountStore, _SqliteStore, _Store
from moesif_beam.runners.emulators.collector.validation import _check_kind


class _Collector:
    """Store, metadata schema, counters and fault schedule of one emulator; thread-safe.

    The metadata schema (key name -> JSON type) only ever gains keys, short of ``reset``: a
    key found with a type keeps it. So a request whose every key/type pair is already known
    is judged without the schema lock, while a request that would add keys decides and
    commits them (with its records) under the lock, so that two concurrent requests cannot
    establish different types for the same key.
    """

    def __init__(self, config: CollectorConfig) -> None:
        self.config = config
        self.store: _Store = (
            _CountStore() if config.store == "count" else _SqliteStore(config.data_dir)
        )
        self._lock = threading.Lock()
        # Lock order: _schema_lock, then the store's lock; never the other way round.
        self._schema_lock = threading.Lock()
        try:
            schema = self.store.load_schema()
        except BaseException:
            self.store.close()
            raise
        # The schema and its shape cache, swapped as one pair by reset(): a request reads
        # the attribute once, so it never judges against one and caches into the other.
        self._schema_state: tuple[dict[str, str], _Shapes] = (schema, {})
        self._reset_counters()

    def _reset_counters(self) -> None:
        with self._lock:
            self._requests: defaultdict[str, defaultdict[str, int]] = defaultdict(
                lambda: defaultdict(int)
            )
            self._received = dict.fromkeys(KINDS, 0)
            self._encodings: defaultdict[str, int] = defaultdict(int)
            self._accepted = dict.fromkeys(KINDS, 0)
            self._stored = dict.fromkeys(KINDS, 0)
            self._duplicates = {"events": 0, "actions": 0}
            self._type_conflicts = 0
            self._lags: dict[str, list[int]] = {"events": [], "actions": []}
            # The fault schedule restarts too, so a reset emulator behaves like a fresh one.
            self._faults = _FaultSchedule(self.config)

    def next_latency(self) -> float:
        """Seconds to delay the next ingestion POST (latency_ms, within latency_first)."""
        return self._faults.next_latency()

    def next_fault(self) -> _Fault | None:
        """Decides the fault for the next ingestion POST: drop first, then fail."""
        return self._faults.next_fault()

    def count_request(self, route: str, status: int) -> None:
        with self._lock:
            self._requests[route][str(status)] += 1

    def count_received(self, kind: str, count: int, encoding: str) -> None:
        with self._lock:
            self._received[kind] += count
            self._encodings[encoding] += 1

    def ingest(
        self, kind: str, items: list[dict[str, Any]], *, batch: bool = True
    ) -> tuple[int, int]:
        """Stores validated records, applying the metadata rules to events and actions first.

        Args:
            kind: One of ``KINDS``.
            items: Records that passed ``validate_payload``. Dotted metadata keys are
                converted in place.
            batch: Whether they came from a ``/batch`` route (errors then carry the index).

        Returns:
            (stored, duplicates dropped).

        Raises:
            MetadataTypeConflict: If a metadata value contradicts its key's known type (with
                ``metadata_types="enforce"``). Nothing is then stored and no type is learned.
        """
        if kind in _PROFILE_KEYS:
            self.store.upsert(kind, items)
            stored, duplicates = len(items), 0
        else:
            try:
                stored = self._insert_events(kind, items, batch=batch)
            except MetadataTypeConflict:
                with self._lock:
                    self._type_conflicts += 1
                raise
            duplicates = len(items) - stored
        timed = self.config.arrival_lags and kind in ("events", "actions")
        lags = _arrival_lags(items) if timed else []
        with self._lock:
            self._accepted[kind] += len(items)
            self._stored[kind] += stored
            if kind in self._duplicates:
                self._duplicates[kind] += duplicates
            if lags and len(self._lags[kind]) < _MAX_LAGS:
                self._lags[kind].extend(lags)
        return stored, duplicates

    def _insert_events(self, kind: str, items: list[dict[str, Any]], *, batch: bool) -> int:
        if self.config.metadata_types == "off":
            if self.config.store != "count":  # nothing to convert where nothing is kept
                _apply_metadata_rules(items, {}, None, None, batch=batch)
            return self.store.insert_unique(kind, items)
        # First pass without the lock. Schema entries never change once made, so a verdict
        # of "conflict" or "all known" stays true; only the new keys need a second look.
        # (A request racing reset() is judged against the schema from before the reset.)
        learned: dict[str, str] = {}
        schema, shapes = self._schema_state
        _apply_metadata_rules(items, schema, learned, shapes, batch=batch)
        if not learned:
            return self.store.insert_unique(kind, items)
        with self._schema_lock:
            schema, shapes = self._schema_state
            if any(schema.get(key, kind_) != kind_ for key, kind_ in learned.items()):
                # A concurrent request committed one of these keys with another type in the
                # meantime: judge again, against the schema as it is now (keys are already
                # converted, so this pass changes nothing but the verdict).
                learned = {}
                _apply_metadata_rules(items, schema, learned, shapes, batch=batch)
            # Records and new keys go in one transaction, so a failed write learns nothing.
            stored = self.store.insert_unique(kind, items, learned)
            schema.update(learned)
        return stored

    def metadata_schema(self) -> dict[str, str]:
        """The metadata schema, sorted by key."""
        with self._schema_lock:
            return dict(sorted(self._schema_state[0].items()))

    def seed_schema(self, types: Any) -> dict[str, str]:
        """Adds the keys of ``types`` that the schema does not know yet (first type wins).

        Returns:
            The resulting schema, sorted by key.

        Raises:
            ValueError: If ``types`` is not an object of key -> type name; nothing is added.
        """
        cleaned = _clean_schema(types)
        with self._schema_lock:
            schema = self._schema_state[0]
            new = {key: kind for key, kind in cleaned.items() if key not in schema}
            if new:
                self.store.add_types(new)
                schema.update(new)
            return dict(sorted(schema.items()))

    def stats(self) -> dict[str, Any]:
        records = self.store.counts()
        schema = self.metadata_schema()
        with self._lock:
            return {
                "store": self.config.store,
                "records": records,
                "requests": {
                    route: dict(sorted(by_status.items()))
                    for route, by_status in sorted(self._requests.items())
                },
                "items_received": dict(self._received),
                "content_encodings": dict(sorted(self._encodings.items())),
                "items_accepted": dict(self._accepted),
                "items_stored": dict(self._stored),
                "duplicates": dict(self._duplicates),
                "faults": self._faults.counts(),
                "metadata_schema": schema,
                "type_conflicts": self._type_conflicts,
                "arrival_lag_ms": {kind: _percentiles(lags) for kind, lags in self._lags.items()},
            }

    def records(self, kind: str, limit: int | None = None, offset: int = 0) -> list[Any]:
        _check_kind(kind)
        return self.store.records(kind, limit, offset)

    def reset(self) -> None:
        with self._schema_lock:
            self.store.reset()
            # New objects rather than clear(): a request still in flight keeps the old schema
            # and shape cache, so its verdicts cannot leak into the fresh ones.
            self._schema_state = ({}, {})
        self._reset_counters()

    def close(self) -> None:
        self.store.close()
