"""The persisted metadata type schema: a JSON document on any Beam filesystem, first type wins.

Shared by pipelines and runs: every save re-reads the store and adds only keys it does not
know, so two runs sharing a store never overwrite each other's decisions.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping

from apache_beam.io.filesystems import FileSystems

from moesif_beam.transforms.schema.keys import sanitize_keys
from moesif_beam.transforms.schema.rule import merge_schema, types_of

__all__ = ["decide_in_store", "load_schema", "save_schema", "seed_pairs"]


_STORE_VERSION = 1


def load_schema(path: str, scope: str) -> dict[str, str]:
    """Read a persisted schema; a missing file is an empty schema.

    Raises:
        ValueError: the file is not a schema document, or tracks keys in another scope.
    """
    if not FileSystems.exists(path):
        return {}
    with FileSystems.open(path) as handle:
        raw = handle.read()
    try:
        document = json.loads(raw)
    except ValueError as exc:
        msg = f"--schema_store {path} is not JSON: {exc}"
        raise ValueError(msg) from exc
    if not isinstance(document, dict) or not isinstance(document.get("fields"), dict):
        msg = f"--schema_store {path} is not a moesif-beam schema document (no 'fields')"
        raise ValueError(msg)
    stored_scope = document.get("scope", "name")
    if stored_scope != scope:
        msg = (
            f"--schema_store {path} tracks keys by {stored_scope}; this run uses "
            f"--schema_scope {scope}. Use the same scope, or another store."
        )
        raise ValueError(msg)
    fields = document["fields"]
    bad = {k: v for k, v in fields.items() if v not in _TYPES}
    if bad:
        msg = f"--schema_store {path} has unknown types: {dict(list(bad.items())[:3])}"
        raise ValueError(msg)
    return dict(fields)


_TYPES = frozenset({"string", "number", "boolean", "object", "array"})


def save_schema(path: str, scope: str, new: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Merge new keys into the persisted schema (first wins) and write it back.

    The store is re-read just before writing, so keys another run added meanwhile are kept
    and win. Local files are replaced atomically.

    Returns:
        The schema as written.
    """
    with _writing(path):
        return _merge_and_write(path, scope, new)


def decide_in_store(path: str, scope: str, key: str, kind: str) -> tuple[str, bool]:
    """``(type, added)``: the type ``key`` has in the store, storing ``kind`` if it had none.

    The decision is durable before it is returned: a record that carries it can be
    delivered knowing that every later decision for ``key``, in this run after a restart
    or in another run, reads the same type.
    """
    with _writing(path):
        stored = load_schema(path, scope)
        if key in stored:
            return stored[key], False
        return _merge_and_write(path, scope, [(key, kind)])[key], True


@contextlib.contextmanager
def _writing(path: str) -> Iterator[None]:
    """Serialize writers of a local store (processes and threads alike) with a lock file.

    Without it, two writers that read the store at once each write back only their own
    keys, and the first one's are lost. Remote filesystems offer no lock through Beam:
    there, concurrent writers of one store can still lose each other's new keys.
    """
    if "://" in path:
        yield
        return
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    try:
        import fcntl  # noqa: PLC0415 - POSIX only; elsewhere there is no lock
    except ImportError:
        yield
        return
    # A hidden file beside the store: users list their output directory.
    lock = os.path.join(parent, f".{os.path.basename(path)}.lock")
    with _THREADS, open(lock, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# flock is per open file description: threads of one process need a lock of their own.
_THREADS = threading.RLock()


def _merge_and_write(path: str, scope: str, new: Iterable[tuple[str, str]]) -> dict[str, str]:
    merged = merge_schema(load_schema(path, scope), new)
    document = {
        "version": _STORE_VERSION,
        "scope": scope,
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fields": dict(sorted(merged.items())),
    }
    data = json.dumps(document, indent=2).encode("utf-8") + b"\n"
    temporary = f"{path}.tmp-{time.time_ns()}-{threading.get_ident()}"
    with FileSystems.create(temporary, mime_type="application/json") as handle:
        handle.write(data)
    if "://" not in path:
        # Atomic on one filesystem: a reader sees the old store or the new, never none.
        os.replace(temporary, path)
        return merged
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temporary], [path])
    return merged


def seed_pairs(path: str, scope: str, *, types_map: bool = False) -> list[tuple[str, str]]:
    """Read ``(key, type)`` pairs to seed a schema with, in file order (first wins).

    Args:
        path: a file on any Beam filesystem.
        scope: ``name`` or ``path``, as the schema tracks keys.
        types_map: the file is one JSON object mapping keys to type names (or a schema
            document with ``fields``). Otherwise it holds example records as JSON lines or
            one JSON array: events or actions (their ``metadata`` is read) or bare metadata
            objects, whose types are inferred, dots in keys turned into ``_`` first.

    Raises:
        ValueError: the file is not in the expected shape.
    """
    with FileSystems.open(path) as handle:
        text = handle.read().decode("utf-8")
    if types_map:
        document = json.loads(text)
        fields = document.get("fields", document) if isinstance(document, dict) else None
        if not isinstance(fields, dict):
            msg = f"{path}: expected a JSON object of key -> type"
            raise ValueError(msg)
        bad = {k: v for k, v in fields.items() if v not in _TYPES}
        if bad:
            msg = f"{path}: unknown types {dict(list(bad.items())[:3])}; use {sorted(_TYPES)}"
            raise ValueError(msg)
        return list(fields.items())
    stripped = text.lstrip()
    examples = (
        json.loads(stripped)
        if stripped.startswith("[")
        else [json.loads(line) for line in text.splitlines() if line.strip()]
    )
    pairs: list[tuple[str, str]] = []
    for example in examples:
        if not isinstance(example, dict):
            continue
        metadata = example.get("metadata", example)
        if isinstance(metadata, dict):
            pairs.extend(types_of(sanitize_keys(metadata), scope))
    return pairs


def _checked(stored: Mapping[str, str]) -> dict[str, str]:
    bad = sorted(k for k, v in stored.items() if v not in _TYPES)
    if bad:
        msg = f"stored schema has keys with unknown types: {bad[:5]}"
        raise ValueError(msg)
    return dict(stored)
