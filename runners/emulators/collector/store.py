"""Where accepted records go: SQLite (``collector.db``, or memory), or counts only.

Events and actions are deduplicated by ``transaction_id`` across batches; users, companies
and subscriptions are upserts with a recursive merge. The SQLite store also persists the
metadata schema, in the same transaction as the records that establish its keys.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol

from moesif_beam.runners.emulators.collector.config import _PROFILE_KEYS, KINDS
from moesif_beam.runners.emulators.collector.validation import _compact


class _Store(Protocol):
    def insert_unique(
        self, kind: str, items: list[dict[str, Any]], new_types: Mapping[str, str] | None = None
    ) -> int: ...
    def load_schema(self) -> dict[str, str]: ...
    def add_types(self, new_types: Mapping[str, str]) -> None: ...
    def upsert(self, kind: str, items: list[dict[str, Any]]) -> None: ...
    def counts(self) -> dict[str, int]: ...
    def records(self, kind: str, limit: int | None, offset: int) -> list[Any]: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


# First wins here too: a key already in the table keeps its type.
_SCHEMA_INSERT: Final = "INSERT OR IGNORE INTO metadata_schema (key, type) VALUES (?, ?)"


def _transaction_id(item: Mapping[str, Any]) -> str | None:
    # An empty id cannot identify anything, so such items are stored like items without one.
    return item.get("transaction_id") or None


def _merge(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merges ``new`` into ``old``: new values win, nested objects merge.

    A null in ``new`` keeps the old value, because the SDKs send null for "not set"
    (docs/design.md, Collector API §2), not for "erase".
    """
    merged = dict(old)
    for key, value in new.items():
        if value is None and key in merged:
            continue
        previous = merged.get(key)
        if isinstance(value, dict) and isinstance(previous, dict):
            merged[key] = _merge(previous, value)
        else:
            merged[key] = value
    return merged


class _SqliteStore:
    """All records in SQLite; one connection, one lock, one transaction per request."""

    def __init__(self, data_dir: str | None) -> None:
        if data_dir is None:
            target = ":memory:"
        else:
            Path(data_dir).mkdir(parents=True, exist_ok=True)
            target = str(Path(data_dir) / "collector.db")
        # Handler threads share this connection; self._lock serialises every use of it.
        # isolation_level=None lets us issue BEGIN/COMMIT ourselves, one pair per request.
        self._conn = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        if data_dir is not None:
            # WAL lets `sqlite3 collector.db` read while we write. Without fsyncs the file
            # still survives a crash of this process intact; only an OS crash could lose the
            # last writes, which is irrelevant for test evidence and halves the write cost.
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=OFF")
        # The transaction_id index is random-access; a 64 MiB page cache keeps it in memory.
        self._conn.execute("PRAGMA cache_size=-65536")
        for kind in ("events", "actions"):
            self._conn.execute(
                f"CREATE TABLE IF NOT EXISTS {kind} ("  # table names come from KINDS only
                " seq INTEGER PRIMARY KEY, transaction_id TEXT UNIQUE, body TEXT NOT NULL)"
            )
        for kind in _PROFILE_KEYS:
            self._conn.execute(
                f"CREATE TABLE IF NOT EXISTS {kind} ("
                " seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, body TEXT NOT NULL)"
            )
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS metadata_schema (key TEXT PRIMARY KEY, type TEXT)"
        )

    def insert_unique(
        self, kind: str, items: list[dict[str, Any]], new_types: Mapping[str, str] | None = None
    ) -> int:
        """Stores new records and, in the same transaction, the schema keys they establish."""
        rows = [(_transaction_id(item), _compact(item)) for item in items]
        # NULL never collides with a UNIQUE column, so items without an id are always stored;
        # OR IGNORE drops repeats, both across batches and within one.
        sql = f"INSERT OR IGNORE INTO {kind} (transaction_id, body) VALUES (?, ?)"  # noqa: S608
        stored = 0

        def work() -> None:
            nonlocal stored
            before = self._conn.total_changes
            self._conn.executemany(sql, rows)
            stored = self._conn.total_changes - before
            if new_types:
                self._conn.executemany(_SCHEMA_INSERT, new_types.items())

        with self._lock:
            self._transaction(work)
        return stored

    def load_schema(self) -> dict[str, str]:
        with self._lock:
            return dict(self._conn.execute("SELECT key, type FROM metadata_schema").fetchall())

    def add_types(self, new_types: Mapping[str, str]) -> None:
        with self._lock:
            self._transaction(lambda: self._conn.executemany(_SCHEMA_INSERT, new_types.items()))

    def upsert(self, kind: str, items: list[dict[str, Any]]) -> None:
        key = _PROFILE_KEYS[kind]
        ids = list(dict.fromkeys(str(item[key]) for item in items))
        select = f"SELECT id, body FROM {kind} WHERE id IN "  # noqa: S608
        write = (
            f"INSERT INTO {kind} (id, body) VALUES (?, ?)"  # noqa: S608
            " ON CONFLICT(id) DO UPDATE SET body = excluded.body"
        )

        def work() -> None:
            current: dict[str, dict[str, Any]] = {}
            # Stay well under SQLite's limit on bound parameters per statement.
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for row_id, body in self._conn.execute(f"{select}({marks})", chunk):
                    current[row_id] = json.loads(body)
            for item in items:
                item_id = str(item[key])
                current[item_id] = _merge(current.get(item_id, {}), item)
            self._conn.executemany(write, [(i, _compact(current[i])) for i in ids])

        with self._lock:
            self._transaction(work)

    def _transaction(self, work: Callable[[], object]) -> None:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            work()
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                kind: self._conn.execute(f"SELECT COUNT(*) FROM {kind}").fetchone()[0]  # noqa: S608
                for kind in KINDS
            }

    def records(self, kind: str, limit: int | None, offset: int) -> list[Any]:
        sql = f"SELECT body FROM {kind} ORDER BY seq LIMIT ? OFFSET ?"  # noqa: S608
        with self._lock:
            rows = self._conn.execute(sql, (-1 if limit is None else limit, offset)).fetchall()
        return [json.loads(body) for (body,) in rows]

    def reset(self) -> None:
        def work() -> None:
            for kind in KINDS:
                self._conn.execute(f"DELETE FROM {kind}")  # noqa: S608
            self._conn.execute("DELETE FROM metadata_schema")

        with self._lock:
            self._transaction(work)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _CountStore:
    """Validates and deduplicates like the SQLite store but keeps only ids and counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, set[str]] = {kind: set() for kind in KINDS}
        self._anonymous: dict[str, int] = dict.fromkeys(KINDS, 0)

    def insert_unique(
        self, kind: str, items: list[dict[str, Any]], new_types: Mapping[str, str] | None = None
    ) -> int:
        del new_types  # this mode's schema lives only in _Collector's memory
        seen = self._seen[kind]
        add = seen.add
        anonymous = 0
        # Per item only what must be: one lookup and one add (a repeat adds nothing).
        with self._lock:
            before = len(seen)
            for item in items:
                transaction_id = item.get("transaction_id")
                if transaction_id:
                    add(transaction_id)
                else:  # an empty id identifies nothing: stored like an item without one
                    anonymous += 1
            self._anonymous[kind] += anonymous
            return len(seen) - before + anonymous

    def upsert(self, kind: str, items: list[dict[str, Any]]) -> None:
        key = _PROFILE_KEYS[kind]
        with self._lock:
            self._seen[kind].update(str(item[key]) for item in items)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {kind: len(self._seen[kind]) + self._anonymous[kind] for kind in KINDS}

    def records(self, kind: str, limit: int | None, offset: int) -> list[Any]:
        del kind, limit, offset  # No bodies are kept in this mode.
        return []

    def load_schema(self) -> dict[str, str]:
        return {}  # nothing persists in this mode

    def add_types(self, new_types: Mapping[str, str]) -> None:
        del new_types  # this mode's schema lives only in _Collector's memory

    def reset(self) -> None:
        with self._lock:
            for kind in KINDS:
                self._seen[kind].clear()
                self._anonymous[kind] = 0

    def close(self) -> None:
        """Nothing to release."""
