"""Moesif's metadata type rule, enforced in the pipeline: the first JSON type seen for a key wins.

Moesif keeps one metadata schema per organization. Once a key has been seen with a JSON type
(string, number, boolean, object, array), a record that sends another type for that key, at
any depth, is not accepted; null matches any type. Moesif reports nothing when that happens.
moesif-beam catches it before sending: the record becomes a ``type_conflict`` dead letter
naming the key and both types.

How the bounded pipeline decides, deterministically and in parallel:

1. While normalizing, each record's metadata is reduced to a *signature*: the sorted set of
   ``(key, type)`` pairs it carries (by key name at any depth, or by full path with
   ``--schema_scope path``). Records travel with a short signature id, not the signature.
2. Each distinct signature is kept once, with the earliest ``(event time, transaction_id)``
   of the records that carry it.
3. Per key, the winning type is the one of the earliest ``(event time, transaction_id)``
   carrying the key, unless the persisted schema already knows the key: then it wins.
   This is a combine per key, so many keys spread over many workers.
4. Each distinct signature gets a verdict against the winners; records whose signature
   conflicts become dead letters.

The answer depends only on the input and the persisted schema, not on input order, bundle
boundaries, the number of workers or the runner. A key's type is fixed by the earliest
record carrying it even if that record is rejected for another key: the rule stays a
per-key decision, so it can be computed in parallel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from moesif_beam.transforms.common.errors import json_type

__all__ = [
    "NO_TIME",
    "SCOPES",
    "Signature",
    "SignatureMemo",
    "find_conflict",
    "merge_schema",
    "signature",
    "signature_id",
    "type_name",
    "types_of",
]

SCOPES = ("name", "path")
# Sorts after every real time: records without an event time are "seen" last.
NO_TIME = 2**62

Signature = tuple[tuple[str, str], ...]


def type_name(value: Any) -> str | None:
    """The JSON type Moesif tracks for a value, or None for null (which matches any type)."""
    return None if value is None else json_type(value)


def types_of(metadata: Mapping[str, Any], scope: str = "name") -> Iterator[tuple[str, str]]:
    """Yield ``(key, type)`` for every non-null value in ``metadata``, at every depth.

    With scope ``name`` the key is the bare key name; with ``path`` it is the dotted path
    from the metadata root, ``[]`` marking array elements (``tags[].label``). Keys are
    expected to be sanitized already (no dots).
    """
    stack: list[tuple[str, Any]] = [("", metadata)]
    by_path = scope == "path"
    while stack:
        prefix, obj = stack.pop()
        if isinstance(obj, dict):
            for key, value in obj.items():
                if value is None:
                    continue
                kind = json_type(value)
                name = f"{prefix}{key}" if by_path else key
                yield name, kind
                if kind == "object":
                    stack.append((f"{name}." if by_path else "", value))
                elif kind == "array":
                    stack.append((f"{name}[]." if by_path else "", value))
        elif isinstance(obj, list):
            for item in obj:
                if isinstance(item, dict | list):
                    stack.append((prefix, item))


def signature(metadata: Any, scope: str = "name") -> Signature:
    """The sorted, distinct ``(key, type)`` pairs of a metadata object (empty if not one)."""
    if not isinstance(metadata, dict) or not metadata:
        return ()
    return tuple(sorted(set(types_of(metadata, scope))))


# Bound on the decisions a worker remembers per stage (each a few dozen bytes).
_VERDICT_MEMO_SIZE = 100_000


def _remember(memo: dict[Any, Any], key: Any, value: Any, size: int = _VERDICT_MEMO_SIZE) -> Any:
    """Store ``value`` in a memo that starts over once it holds ``size`` entries."""
    if len(memo) >= size:
        memo.clear()
    memo[key] = value
    return value


# The value types whose JSON type is their Python type alone (as orjson makes them).
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _nested_positions(types: tuple[type, ...]) -> tuple[int, ...]:
    """Where a dict's values are dicts or lists; () if any is of a type not plain JSON."""
    positions = []
    for position, kind in enumerate(types):
        if kind is dict or kind is list:
            positions.append(position)
        elif kind not in _SCALARS:
            return ()
    return tuple(positions)


def _shape(obj: Any) -> tuple | None:
    """A hashable shape of a dict or list that decides its signature, in either scope.

    Keys in order and the exact type of each value, nested objects and arrays by their own
    shapes (an array's by the distinct shapes of the objects and arrays in it: scalars in
    arrays carry no key). None when a value's type is not one of the plain JSON types
    (a dict or list subclass, say): such metadata is not memoized.
    """
    if type(obj) is dict:
        types = tuple(map(type, obj.values()))
        if _SCALARS.issuperset(types):
            return (tuple(obj), types)
        parts: list[Any] = []
        for value, kind in zip(obj.values(), types, strict=True):
            if kind in _SCALARS:
                parts.append(kind)
            elif kind is dict or kind is list:
                sub = _shape(value)
                if sub is None:
                    return None
                parts.append(sub)
            else:
                return None
        return (tuple(obj), tuple(parts))
    items: list[Any] = []
    for item in obj:
        kind = type(item)
        if kind is dict or kind is list:
            sub = _shape(item)
            if sub is None:
                return None
            items.append(sub)
        elif isinstance(item, dict | list):
            return None
    # A signature is a set: how often and in which order an element's shape occurs does
    # not change it, and a long array of alike objects stays one small key.
    return ("[]", tuple(dict.fromkeys(items)))


class SignatureMemo:
    """:func:`signature` and :func:`signature_id` of metadata, remembered by shape.

    Records of one source mostly share a metadata shape: the same keys, in the same order,
    with values of the same types, nested objects and arrays by their own shapes (see
    :func:`_shape`). That shape decides the signature, so it is computed once per shape
    instead of once per record. At most ``size`` shapes are kept; the memo starts over
    when full, so an endless variety of shapes costs time, never unbounded memory.
    """

    def __init__(self, scope: str, size: int = 50_000) -> None:
        if scope not in SCOPES:
            msg = f"scope must be one of {SCOPES}, got {scope!r}"
            raise ValueError(msg)
        self._scope = scope
        self._size = size
        self._by_shape: dict[tuple, tuple[Signature, bytes]] = {}
        self._by_signature: dict[Signature, bytes] = {}
        # A top level's (keys, types) -> where its dicts and lists are; () when a value is
        # of some other non-scalar type.
        self._nested_at: dict[tuple, tuple[int, ...]] = {}

    def __call__(self, metadata: Any) -> tuple[Signature, bytes]:
        """``(signature, signature_id)``; ``((), b"")`` for empty or missing metadata."""
        if type(metadata) is not dict or not metadata:
            return (), b""
        types = tuple(map(type, metadata.values()))
        flat = (tuple(metadata), types)
        # The top level's keys and exact types: for all-scalar metadata (most records)
        # the whole shape, so a hit needs nothing more.
        known = self._by_shape.get(flat)
        if known is not None:
            return known
        nested = self._nested_at.get(flat)
        if nested is None:
            if _SCALARS.issuperset(types):
                of_shape = self._of_signature(signature(metadata, self._scope))
                return _remember(self._by_shape, flat, of_shape, self._size)
            nested = _remember(self._nested_at, flat, _nested_positions(types), self._size)
        if not nested:  # a value of a type that is not plain JSON: not memoized
            return self._of_signature(signature(metadata, self._scope))
        # Then only the nested values' own shapes: the top level is already in ``flat``
        # (measured: 8.4 µs for metadata with two nested values, against 1.9 µs flat).
        values = tuple(metadata.values())
        subs = []
        for position in nested:
            sub = _shape(values[position])
            if sub is None:
                return self._of_signature(signature(metadata, self._scope))
            subs.append(sub)
        shape = (flat, tuple(subs))
        known = self._by_shape.get(shape)
        if known is None:
            of_shape = self._of_signature(signature(metadata, self._scope))
            known = _remember(self._by_shape, shape, of_shape, self._size)
        return known

    def _of_signature(self, sig: Signature) -> tuple[Signature, bytes]:
        if not sig:
            return (), b""
        sig_id = self._by_signature.get(sig)
        if sig_id is None:
            sig_id = _remember(self._by_signature, sig, signature_id(sig), self._size)
        return sig, sig_id


def signature_id(sig: Signature) -> bytes:
    """A short, stable id for a signature (16 bytes of BLAKE2b)."""
    text = "\x1e".join(f"{key}\x1f{kind}" for key, kind in sig)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def find_conflict(sig: Signature, schema: Mapping[str, str]) -> tuple[str, str, str] | None:
    """The first ``(key, expected_type, actual_type)`` of ``sig`` that ``schema`` refuses."""
    for key, kind in sig:
        expected = schema.get(key)
        if expected is not None and expected != kind:
            return key, expected, kind
    return None


def merge_schema(current: Mapping[str, str], new: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Add new keys to a schema; a key already present keeps its type (first wins)."""
    merged = dict(current)
    for key, kind in new:
        merged.setdefault(key, kind)
    return merged
