"""Moesif's metadata key rule: a dot in a key becomes an underscore, at every depth.

Moesif rewrites ``so.me_str.ing`` to ``so_me_str_ing`` on arrival; doing it in the pipeline
means what we validate, deduplicate and dead-letter is exactly what Moesif will store.
Values are never touched (a dot in a value is fine).
"""

from __future__ import annotations

from typing import Any

from moesif_beam.transforms.common.errors import InvalidRecord

__all__ = ["MAX_DEPTH", "sanitize_keys"]

# How deep metadata may nest. Moesif documents no limit; ours keeps every walk over a
# record bounded (Python's recursion limit is about 1,000 frames, and a 1.2 KB line can
# nest arrays 600 deep).
MAX_DEPTH = 128


def sanitize_keys(value: Any, depth: int = 1) -> Any:
    """Return ``value`` with every ``.`` in object keys replaced by ``_``, recursively.

    Objects nested in arrays are rewritten too. Inputs are not mutated; subtrees with no
    dotted key are returned as they are, so the common case allocates nothing new.
    When two keys collide after rewriting (``a.b`` and ``a_b``), the later one in the
    object wins, as it would in a JSON parser reading a repeated key.

    Raises:
        InvalidRecord: ``value`` nests objects or arrays more than :data:`MAX_DEPTH`
            levels deep (``value`` itself is level ``depth``).
    """
    if depth > MAX_DEPTH and isinstance(value, dict | list):
        msg = f"metadata nests more than {MAX_DEPTH} levels deep"
        raise InvalidRecord(msg, "metadata")
    if isinstance(value, dict):
        # The common case, a flat object without dotted keys, is decided at C speed: one
        # join over the keys (JSON keys are strings) and one pass over the value types.
        if "." not in "".join(value) and _flat(value):
            return value
        changed = False
        out: dict[str, Any] = {}
        for key, item in value.items():
            # Only containers can hold keys; skipping the call for scalars matters, as
            # this runs for every value of every record.
            new_item = sanitize_keys(item, depth + 1) if isinstance(item, dict | list) else item
            new_key = key.replace(".", "_") if "." in key else key
            if new_key is not key or new_item is not item:
                changed = True
            out[new_key] = new_item
        return out if changed else value
    if isinstance(value, list):
        # A loop, not a comprehension: one frame per level of nesting.
        items = []
        changed = False
        for item in value:
            new_item = sanitize_keys(item, depth + 1) if isinstance(item, dict | list) else item
            changed = changed or new_item is not item
            items.append(new_item)
        return items if changed else value
    return value


# JSON's scalar types; any other value type (containers, their subclasses) takes the
# careful path.
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _flat(obj: dict) -> bool:
    return set(map(type, obj.values())) <= _SCALARS
