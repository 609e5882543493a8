"""Moesif's metadata key rule: a dot in a key becomes an underscore, at every depth.

Moesif rewrites ``so.me_str.ing`` to ``so_me_str_ing`` on arrival; doing it in the pipeline
means what we validate, deduplicate and dead-letter is exactly what Moesif will store.
Values are never touched (a dot in a value is fine).
"""

from __future__ import annotations

from typing import Any

__all__ = ["sanitize_keys"]


def sanitize_keys(value: Any) -> Any:
    """Return ``value`` with every ``.`` in object keys replaced by ``_``, recursively.

    Objects nested in arrays are rewritten too. Inputs are not mutated; subtrees with no
    dotted key are returned as they are, so the common case allocates nothing new.
    When two keys collide after rewriting (``a.b`` and ``a_b``), the later one in the
    object wins, as it would in a JSON parser reading a repeated key.
    """
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
            new_item = sanitize_keys(item) if isinstance(item, dict | list) else item
            new_key = key.replace(".", "_") if "." in key else key
            if new_key is not key or new_item is not item:
                changed = True
            out[new_key] = new_item
        return out if changed else value
    if isinstance(value, list):
        items = [sanitize_keys(item) for item in value]
        if any(new is not old for new, old in zip(items, value, strict=True)):
            return items
        return value
    return value


# JSON's scalar types; any other value type (containers, their subclasses) takes the
# careful path.
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _flat(obj: dict) -> bool:
    return set(map(type, obj.values())) <= _SCALARS
