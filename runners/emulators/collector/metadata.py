"""Moesif's metadata rules: dots in keys become ``_``; the first JSON type of a key wins.

See the package docstring for the rules. :func:`_apply_metadata_rules` converts keys in place
and checks every value against the schema (key name -> JSON type), collecting the types a
request would add; :class:`MetadataTypeConflict` is the 400 it raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from moesif_beam.runners.emulators.collector.validation import ValidationError

#: The JSON types the metadata schema records. Null has none: it matches every type.
METADATA_TYPES: Final = ("string", "number", "boolean", "object", "array")
_STRING, _NUMBER, _BOOLEAN, _OBJECT, _ARRAY = METADATA_TYPES
# Keyed by exact class, as json.loads builds values: one dict lookup per value, and bool has
# its own entry, so True is never taken for a number although Python's bool is an int.
_JSON_TYPES: Final[dict[type, str]] = {
    str: _STRING,
    int: _NUMBER,
    float: _NUMBER,
    bool: _BOOLEAN,
    dict: _OBJECT,
    list: _ARRAY,
}


class MetadataTypeConflict(ValidationError):
    """Metadata that sends a key with another JSON type than the schema holds for it.

    Attributes:
        key: The key name (after dot conversion), wherever it was found.
        expected_type: The type the schema (or an earlier item or value of the same request)
            established for the key.
        actual_type: The type this value has.
    """

    def __init__(
        self,
        key: str,
        expected_type: str,
        actual_type: str,
        field: str | None = None,
        index: int | None = None,
    ) -> None:
        message = f"metadata type conflict: key {key!r} is {expected_type}, got {actual_type}"
        super().__init__(message, field, index)
        self.key = key
        self.expected_type = expected_type
        self.actual_type = actual_type

    def to_json(self) -> dict[str, Any]:
        """Returns the 400 body: the base fields, ``key``, ``expected_type``, ``actual_type``."""
        body = super().to_json()
        body["key"] = self.key
        body["expected_type"] = self.expected_type
        body["actual_type"] = self.actual_type
        return body


class _Conflict(Exception):
    """Raised deep in a metadata walk; each level it passes adds its key to ``path``."""

    def __init__(self, key: str, expected: str, actual: str) -> None:
        super().__init__(key)
        self.key = key
        self.expected = expected
        self.actual = actual
        # Innermost first: the walk appends while the exception travels outwards, so the hot
        # path never builds a path string for values that are fine.
        self.path: list[str] = [key]


def _json_type(value: Any) -> str:
    """The JSON type of a value json.loads did not build (subclasses from direct callers)."""
    if isinstance(value, bool):
        return _BOOLEAN
    if isinstance(value, int | float):
        return _NUMBER
    if isinstance(value, dict):
        return _OBJECT
    if isinstance(value, list):
        return _ARRAY
    return _STRING  # a str subclass: nothing else comes out of a JSON parser


# A verdict per object *shape*: its keys, in order, and the classes of its values. A shape
# is cached once every non-null value in it was found in the committed schema with its
# type and no key had a dot; building and hashing the shape runs in C, so a record of a
# known shape costs a fraction of a key-by-key walk. Verdicts stay true because schema
# entries never change; reset() starts a new cache along with the new schema.
_Shapes = dict[tuple[Any, ...], tuple[str, ...]]
# Bounds the cache's memory when keys vary endlessly; a full cache starts over.
_SHAPE_CACHE_LIMIT: Final = 4096


def _walk_object(
    obj: dict[str, Any], schema: Mapping[str, str], learned: dict[str, str], shapes: _Shapes
) -> dict[str, Any]:
    """Converts dots in the keys of ``obj`` and checks value types, depth first in key order.

    Args:
        obj: A metadata object or an object nested in one. Nested objects and arrays are
            rewritten in place when their keys change.
        schema: The committed schema, only read.
        learned: Types first seen in this request, in the order they were seen; new keys
            are added to it.
        shapes: Shapes known to pass against ``schema``; read and extended.

    Returns:
        ``obj`` itself, or a new dict when one of its own keys had a dot.

    Raises:
        _Conflict: At the first value whose type differs from its key's known type.
    """
    shape = (*obj, *map(type, obj.values()))
    nested = shapes.get(shape)
    if nested is not None:
        for key in nested:  # only the objects and arrays inside still need a look
            _walk_child(obj, key, schema, learned, shapes)
        return obj
    # One C-speed scan answers "any dot in any key?" (a dot in the joined keys came from one).
    cacheable = "." not in "".join(obj)
    if not cacheable:
        # Converted before any check, so on a collision only the surviving value (the later
        # one, as when a JSON parser meets a repeated key) is type-checked and stored.
        obj = {key.replace(".", "_"): value for key, value in obj.items()}
    known = schema.get
    children: list[str] = []
    for key, value in obj.items():
        kind = _JSON_TYPES.get(value.__class__)
        if kind is None:
            if value is None:
                continue  # null matches every type, and establishes none
            kind = _json_type(value)
        if known(key) != kind:
            cacheable = False
            expected = known(key) or learned.setdefault(key, kind)
            if expected != kind:
                raise _Conflict(key, expected, kind)
        if kind is _OBJECT or kind is _ARRAY:
            children.append(key)
            _walk_child(obj, key, schema, learned, shapes)
    if cacheable:
        if len(shapes) >= _SHAPE_CACHE_LIMIT:
            shapes.clear()
        shapes[shape] = tuple(children)
    return obj


def _walk_child(
    obj: dict[str, Any],
    key: str,
    schema: Mapping[str, str],
    learned: dict[str, str],
    shapes: _Shapes,
) -> None:
    """Walks the object or array at ``obj[key]``, adding ``key`` to the path of a conflict."""
    value = obj[key]
    try:
        if isinstance(value, dict):
            converted = _walk_object(value, schema, learned, shapes)
            if converted is not value:
                obj[key] = converted  # replaces a value, never adds a key: safe mid-iteration
        else:
            _walk_array(value, schema, learned, shapes)
    except _Conflict as exc:
        exc.path.append(key)
        raise


def _walk_array(
    values: list[Any], schema: Mapping[str, str], learned: dict[str, str], shapes: _Shapes
) -> None:
    """Walks the objects (and arrays) inside an array; scalars in arrays have no key."""
    for position, value in enumerate(values):
        try:
            if isinstance(value, dict):
                converted = _walk_object(value, schema, learned, shapes)
                if converted is not value:
                    values[position] = converted
            elif isinstance(value, list):
                _walk_array(value, schema, learned, shapes)
        except _Conflict as exc:
            exc.path.append(str(position))
            raise


_SCALAR_CLASSES: Final = frozenset({str, int, float, bool, type(None)})


def _convert_keys(value: Any) -> Any:
    """Converts dots in object keys at every depth, in place where it can (no type checks).

    Returns:
        ``value``, or a new dict when it is an object with a dotted key of its own.
    """
    if isinstance(value, dict):
        if "." in "".join(value):
            value = {key.replace(".", "_"): item for key, item in value.items()}
        # Most objects hold scalars only; a set of their classes, built in C, tells.
        if not _SCALAR_CLASSES.issuperset(map(type, value.values())):
            for key, item in value.items():
                if isinstance(item, dict | list):
                    converted = _convert_keys(item)
                    if converted is not item:
                        value[key] = converted
    elif isinstance(value, list):
        for position, item in enumerate(value):
            if isinstance(item, dict | list):
                value[position] = _convert_keys(item)
    return value


def _apply_metadata_rules(
    items: list[dict[str, Any]],
    schema: Mapping[str, str],
    learned: dict[str, str] | None,
    shapes: _Shapes | None,
    *,
    batch: bool,
) -> None:
    """Applies Moesif's metadata rules to the ``metadata`` of validated events or actions.

    Dots in keys are converted in place (``records()`` shows the converted keys), and, unless
    ``learned`` is None, every non-null value is checked against the first type known for its
    key name: from ``schema``, else from earlier in this request (earlier items, or earlier
    values of the same item), in which case it lands in ``learned``.

    Args:
        items: Validated records; ``metadata`` is an object or absent.
        schema: The committed schema, only read.
        learned: Collects the types this request would add to the schema; None only
            converts keys.
        shapes: The shape cache that goes with ``schema`` (None with ``learned`` None).
        batch: Whether the request was a batch, so the error carries the item's index.

    Raises:
        MetadataTypeConflict: At the first conflicting value, in item order, then depth first
            in key order; ``field`` is its dotted path (``metadata.tags.0.id``).
    """
    for index, item in enumerate(items):
        metadata = item.get("metadata")
        if not metadata:
            continue
        if learned is None or shapes is None:
            item["metadata"] = _convert_keys(metadata)
            continue
        try:
            converted = _walk_object(metadata, schema, learned, shapes)
        except _Conflict as exc:
            field = ".".join(["metadata", *reversed(exc.path)])
            raise MetadataTypeConflict(
                exc.key, exc.expected, exc.actual, field, index if batch else None
            ) from None
        if converted is not metadata:
            item["metadata"] = converted


def _clean_schema(types: Any) -> dict[str, str]:
    """Checks a schema to seed (``{"key": "type"}``); keys get the dot conversion.

    Raises:
        ValueError: If it is not an object of known type names; nothing is then seeded.
    """
    if not isinstance(types, Mapping):
        msg = 'a schema must be a JSON object of {"key": "type"}'
        raise ValueError(msg)
    cleaned: dict[str, str] = {}
    for key, kind in types.items():
        if not isinstance(key, str) or kind not in METADATA_TYPES:
            allowed = ", ".join(METADATA_TYPES)
            msg = (
                f"schema entry {str(key)[:100]!r} must map to one of {allowed}, "
                f"got {repr(kind)[:100]}"
            )
            raise ValueError(msg)
        cleaned[key.replace(".", "_")] = kind
    return cleaned
