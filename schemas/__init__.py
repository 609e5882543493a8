"""Avro schemas shipped with moesif-beam, loaded once with fastavro."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import fastavro

__all__ = ["load_schema", "schema_json"]


def schema_json(name: str) -> dict[str, Any]:
    """Return ``schemas/<name>.avsc`` as plain JSON (what Beam's ``WriteToAvro`` takes)."""
    text = resources.files(__name__).joinpath(f"{name}.avsc").read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


@functools.cache
def load_schema(name: str) -> Any:
    """Return the parsed Avro schema ``schemas/<name>.avsc`` (for fastavro writers).

    Parsed once per process; a missing or broken schema fails at pipeline construction,
    not on the first record.
    """
    return fastavro.parse_schema(schema_json(name))
