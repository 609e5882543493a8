"""The persisted metadata type schema: a JSON document on any Beam filesystem, first type wins.

Shared by pipelines and runs: every save re-reads the store and adds only keys it does not
know, so two runs sharing a store never overwrite each other's decisions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping

from apache_beam.io.filesystems import FileSystems

from moesif_beam.transforms.schema.keys import sanitize_keys
from moesif_beam.transforms.schema.rule import merge_schema, types_of

__all__ = ["load_schema", "save_schema", "seed_pairs"]


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
    merged = merge_schema(load_schema(path, scope), new)
    document = {
        "version": _STORE_VERSION,
        "scope": scope,
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fields": dict(sorted(merged.items())),
    }
    data = json.dumps(document, indent=2).encode("utf-8") + b"\n"
    temporary = f"{path}.tmp-{time.time_ns()}"
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent and "://" not in path and not FileSystems.exists(parent):
        FileSystems.mkdirs(parent)
    with FileSystems.create(temporary, mime_type="application/json") as handle:
        handle.write(data)
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
