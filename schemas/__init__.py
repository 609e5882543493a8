"""Avro schemas shipped with moesif-beam, loaded once with fastavro."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import fastavro

__all__ = ["load_schema"]


@functools.cache
def load_schema(name: str) -> Any:
    """Return the parsed Avro schema ``schemas/<name>.avsc``.

    Parsed once per process; a missing or broken schema fails at pipeline construction,
    not on the first record.
    """
    text = resources.files(__name__).joinpath(f"{name}.avsc").read_text(encoding="utf-8")
    return fastavro.parse_schema(json.loads(text))
