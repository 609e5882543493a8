"""Masking secrets outside bodies: headers, query parameters and metadata (issue 17).

Every events format calls :func:`mask_secrets` once per record (through
:func:`~moesif_beam.transforms.formats.gateway.finish_identity`):

* sensitive request and response headers are replaced by :data:`MASK`;
* the same header names are masked in every headers-shaped object that goes to metadata
  (a key whose name contains ``header``, holding an object or header text);
* the values of sensitive query parameters (:data:`SENSITIVE_PARAMS` and the masked
  header names) are masked in ``request.uri`` and in the metadata strings and objects
  :func:`mask_secrets` lists.

Everything here is a pure function of plain values; no Beam, no I/O. The names are
re-exported by :mod:`~moesif_beam.transforms.formats.gateway`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

import orjson

from moesif_beam.transforms.schema.keys import MAX_DEPTH

if TYPE_CHECKING:
    from moesif_beam.transforms.formats.gateway import MappingOptions

__all__ = ["MASK", "SENSITIVE_PARAMS", "mask_headers", "mask_query", "mask_secrets"]

MASK = "*****"

# Query parameters that carry credentials: API keys (Kong key-auth's key_in_query, Google's
# key, Azure API Management's subscription-key) and OAuth tokens. The masked header names
# count too, so ?x-api-key= is as secret as the X-Api-Key header. Names are compared in
# lower case with "_" read as "-".
SENSITIVE_PARAMS: tuple[str, ...] = (
    "apikey",
    "api_key",
    "api-key",
    "key",
    "access_token",
    "token",
    "subscription-key",
)


def mask_headers(headers: Mapping[str, str], names: Iterable[str]) -> Mapping[str, str]:
    """``headers`` with the value of every header named in ``names`` (lower case) masked.

    Headers with nothing to mask come back as they are, not copied (most records: the
    copy was a fifth of the identity step's time).
    """
    masked = names if isinstance(names, frozenset) else frozenset(names)
    if masked.isdisjoint(map(str.lower, headers)):
        return headers
    return {k: (MASK if k.lower() in masked else v) for k, v in headers.items()}


def _param(name: str) -> str:
    """A query parameter's name as :class:`_Secrets` compares it."""
    if "%" in name or "+" in name:
        name = unquote_plus(name)
    return name.strip().lower().replace("_", "-")


@dataclass(frozen=True)
class _Secrets:
    """The header and query-parameter names to mask, and a fast test for the latter.

    Attributes:
        headers: header names, lower case.
        params: query parameter names as :func:`_param` writes them.
        tails: the fewest substrings one of which every name in ``params`` contains
            (``key``, ``token``, ``cookie``, ``authorization`` for the defaults): a query
            holding none of them, in lower case with ``_`` read as ``-``, has nothing to
            mask, and most queries are settled by these few C-level tests.
        keys: the names a metadata key is itself a secret's name under (see
            :func:`_kind`): the header names and ``params``, with ``-`` for ``_``.
        clean: queries known to hold nothing to mask (Kong writes the same query in
            ``request.url``, ``request.uri`` and ``upstream_uri``; APIs see the same
            queries again and again). Bounded by ``_CLEAN_MAX`` and ``_CLEAN_LONGEST``.
        kinds: metadata key -> what :func:`_kind` says it holds. Keys repeat from record
            to record, so this stays small; it stops growing at ``_KINDS_MAX`` (a record
            with made-up keys per call). Per instance: the answer depends on the names.
    """

    headers: frozenset[str]
    params: frozenset[str]
    tails: tuple[str, ...]
    keys: frozenset[str] = frozenset()
    clean: dict[str, None] = field(default_factory=dict, compare=False, repr=False)
    kinds: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, headers: Iterable[str], params: Iterable[str]) -> _Secrets:
        names = frozenset(_param(name) for name in params if name.strip())
        tails: list[str] = []
        for name in sorted(names, key=len):
            if not any(tail in name for tail in tails):
                tails.append(name)
        lowered = frozenset(h.lower() for h in headers)
        keys = frozenset(h.replace("_", "-") for h in lowered) | names
        return cls(lowered, names, tuple(tails), keys)

    def may_hold(self, query: str) -> bool:
        """Whether ``query`` (or text holding parameter names) may name a sensitive one."""
        if query in self.clean:
            return False
        text = query.lower()
        if "%" in text:
            return True
        if "_" in text:
            text = text.replace("_", "-")
        for tail in self.tails:  # a loop: any() over a generator costs twice as much
            if tail in text:
                return True
        if len(query) <= _CLEAN_LONGEST:
            if len(self.clean) >= _CLEAN_MAX:
                self.clean.clear()
            self.clean[query] = None
        return False


# At most 4,096 queries of at most 256 characters: about 1 MiB at worst.
_CLEAN_MAX = 4096
_CLEAN_LONGEST = 256


# Where a query string ends in a URI: the fragment, or the space before "HTTP/1.1" when
# the value is a request line. Any other space is part of the query (a logged, undecoded
# "q=a b" must not hide what follows it).
_QUERY_END = re.compile(r"#|\s(?=HTTP/)")
_QUERY_SEPARATORS = re.compile(r"([&;])")


def mask_query(text: str, names: Iterable[str], *, whole: bool = False) -> str:
    """``text`` with the value of every sensitive query parameter replaced by :data:`MASK`.

    The parameter's name is kept (``?apikey=*****&page=2``), as a masked header keeps its
    name; a parameter without a value is left alone. ``text`` is a URI (its query is what
    follows the first ``?``, up to ``#`` or the space before ``HTTP/`` of a request line)
    or, with ``whole``, a query string, with or without its leading ``?`` (a ``?`` in a
    value does not start it; one before the first ``=`` does, as in a whole URI). Text
    with nothing to mask comes back as it is.

    Args:
        text: the URI or query string.
        names: the sensitive parameters' names (any case; ``_`` and ``-`` alike;
            percent-encoded names in ``text`` are decoded to compare).
        whole: ``text`` is a query string (or a URI).
    """
    return _mask_query(text, _Secrets.of((), names), whole)


def _mask_query(text: str, secrets: _Secrets, whole: bool) -> str:
    start = text.find("?") + 1
    if not start:
        if not whole:
            return text
    elif whole and "=" in text[: start - 1]:
        start = 0  # the "?" is in a value: the query is the whole text
    if not secrets.may_hold(text[start:] if start else text):
        return text
    found = _QUERY_END.search(text, start)
    end = found.start() if found else len(text)
    pieces = _QUERY_SEPARATORS.split(text[start:end])
    changed = False
    for index in range(0, len(pieces), 2):
        name, equals, value = pieces[index].partition("=")
        if equals and value and _param(name) in secrets.params:
            pieces[index] = f"{name}={MASK}"
            changed = True
    if not changed:
        return text
    return f"{text[:start]}{''.join(pieces)}{text[end:]}"


def _mask_params(params: dict[str, Any], secrets: _Secrets) -> dict[str, Any]:
    """A parsed query string (Kong's ``querystring``) with sensitive values masked."""
    if not secrets.may_hold("&".join(params)):
        return params
    out = {}
    for name, value in params.items():
        # null, "" and a flag without a value (Kong logs true) hold nothing to hide
        secret = value is not None and value is not True and value is not False and value != ""
        if secret and _param(name) in secrets.params:
            out[name] = [MASK] * len(value) if isinstance(value, list) else MASK
        else:
            out[name] = value
    return out


# A JSON string, or one of the punctuation marks that give an object its structure.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\],:]')


def _mask_json_text(text: str, names: frozenset[str]) -> str:
    """A JSON object's text (valid: already parsed) with its top-level ``names`` masked.

    Only each masked value's own span is replaced by ``"*****"``: the rest of the text
    (spacing, key order, big integers, number spellings, escapes) stays as it was.
    """
    pieces: list[str] = []
    last = depth = 0
    masking = after_colon = False
    start = 0
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        first = token[0]
        if first == '"':
            if depth == 1 and not after_colon:  # a key of the object itself
                masking = str(orjson.loads(token)).lower() in names
        elif first in "{[":
            depth += 1
        elif first == ":":
            if depth == 1:
                after_colon = True
                start = match.end()
        else:  # "," "}" "]"
            if depth == 1 and first != "]" and after_colon:
                if masking:
                    value = text[start : match.start()]
                    lead = len(value) - len(value.lstrip())
                    tail = len(value.rstrip())
                    pieces.append(text[last : start + lead])
                    pieces.append(f'"{MASK}"')
                    last = start + tail
                masking = after_colon = False
            if first != ",":
                depth -= 1
    pieces.append(text[last:])
    return "".join(pieces)


def _mask_header_text(text: str, names: frozenset[str]) -> str:
    """Header text (a JSON object, ``name:value;;...`` or one header a line), masked."""
    if text.lstrip()[:1] == "{":
        try:
            parsed = orjson.loads(text)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            if names.isdisjoint(map(str.lower, parsed)):
                return text
            return _mask_json_text(text, names)
    separator = ";;" if ";;" in text else "\n"
    lines = text.split(separator)
    changed = False
    for index, line in enumerate(lines):
        name, colon, value = line.partition(":")
        if colon and value.strip() and name.strip().lower() in names:
            lead = value[: len(value) - len(value.lstrip())]
            trail = value[len(value.rstrip()) :]  # keeps the \r of a CRLF line
            lines[index] = f"{name}:{lead}{MASK}{trail}"
            changed = True
    return separator.join(lines) if changed else text


_HEADERS, _QUERY, _SECRET, _OTHER = 1, 2, 3, 4
# Metadata keys whose values are cached per _Secrets: at most this many.
_KINDS_MAX = 10_000
# Prefixes under which a header's name becomes a metadata key (NGINX's $http_authorization,
# WSO2's request_header_*), "_" read as "-".
_KEY_PREFIXES = ("http-", "request-header-", "response-header-")


def _kind(key: str, secrets: _Secrets) -> int:
    """What a metadata key's name says its value is: a secret, headers, a query, or other.

    A secret is a key whose name, in lower case with ``_`` read as ``-`` and without a
    leading ``http_``, ``request_header_`` or ``response_header_``, is a masked header's
    or a sensitive query parameter's (``authorization``, ``x_api_key``,
    ``http_authorization``, ``request_header_cookie``, ``api_key``).
    """
    name = key.lower()
    bare = name.replace("_", "-")
    for prefix in _KEY_PREFIXES:
        if bare.startswith(prefix):
            bare = bare[len(prefix) :]
            break
    if bare in secrets.keys:
        kind = _SECRET
    elif "header" in name:
        kind = _HEADERS
    elif "query" in name or name in ("args", "qs"):
        kind = _QUERY
    else:
        kind = _OTHER
    if len(secrets.kinds) < _KINDS_MAX:
        secrets.kinds[key] = kind
    return kind


def _mask_tree(node: dict[str, Any], secrets: _Secrets, depth: int) -> dict[str, Any]:
    """``node`` (metadata, or an object in it) with its secrets masked, at any depth.

    Copies only the objects on the way to a masked value; the rest is shared, and a
    record with nothing to mask comes back as it is. This runs for every record, so the
    common value (a number, a string under an ordinary key without ``?``) costs a type
    test, a dict lookup and one C-level substring test, and nothing else.
    """
    out: dict[str, Any] | None = None
    kinds = secrets.kinds
    new: Any
    for key, value in node.items():
        cls = value.__class__
        if cls is str:
            try:
                kind = kinds[key]
            except KeyError:
                kind = _kind(key, secrets)
            if kind == _OTHER:
                # A URI's query needs "?" and "=": most strings have neither.
                if "?" not in value or "=" not in value:
                    continue
                new = _mask_query(value, secrets, False)
            elif kind == _SECRET:
                if not value:
                    continue
                new = MASK
            elif kind == _HEADERS:
                if ":" not in value:
                    continue
                new = _mask_header_text(value, secrets.headers)
            elif "=" in value:
                new = _mask_query(value, secrets, True)
            else:
                continue
        elif cls is dict:
            if not value:
                continue
            try:
                kind = kinds[key]
            except KeyError:
                kind = _kind(key, secrets)
            if kind == _HEADERS:
                new = mask_headers(value, secrets.headers)
            elif kind == _QUERY:
                new = _mask_params(value, secrets)
            elif depth < MAX_DEPTH:
                new = _mask_tree(value, secrets, depth + 1)
            else:
                continue
        elif cls is list and value and depth < MAX_DEPTH:
            try:
                kind = kinds[key]
            except KeyError:
                kind = _kind(key, secrets)
            new = value
            if kind == _HEADERS:
                new = _mask_header_list(value, secrets.headers)
            elif kind == _SECRET:  # repeated values (Set-Cookie)
                new = _mask_strings(value)
            new = _mask_items(new, secrets, depth + 1)
        else:
            continue
        if new is not value:
            if out is None:
                out = dict(node)
            out[key] = new
    return node if out is None else out


def _mask_strings(items: list[Any]) -> list[Any]:
    """A secret's list of values with every non-empty string masked."""
    if not any(item.__class__ is str and item for item in items):
        return items
    return [MASK if item.__class__ is str and item else item for item in items]


def _header_name(item: Any) -> tuple[Any, Any]:
    """The name of a header-list entry and the key or index of its value, else (None, None).

    Entries are ``{"name": ..., "value": ...}`` (any case of ``name`` and ``value``) or
    ``[name, value]``.
    """
    if item.__class__ is dict:
        name = slot = None
        for key in item:
            low = key.lower()
            if low == "name":
                name = item[key]
            elif low == "value":
                slot = key
        return (name, slot) if slot is not None else (None, None)
    if item.__class__ is list and len(item) == 2:
        return item[0], 1
    return None, None


def _mask_header_list(items: list[Any], names: frozenset[str]) -> list[Any]:
    """A list of headers, masked: ``[{"name": n, "value": v}]``, ``[[n, v]]`` or lines."""
    out: list[Any] | None = None
    new: Any
    for index, item in enumerate(items):
        if item.__class__ is str:  # "Authorization: Bearer ..."
            new = _mask_header_text(item, names) if ":" in item else item
            if new is item:
                continue
        else:
            name, slot = _header_name(item)
            if name.__class__ is not str or name.strip().lower() not in names:
                continue
            new = dict(item) if item.__class__ is dict else list(item)
            new[slot] = MASK
        if out is None:
            out = list(items)
        out[index] = new
    return items if out is None else out


def _mask_items(items: list[Any], secrets: _Secrets, depth: int) -> list[Any]:
    """A metadata array with the objects, arrays and URIs in it masked."""
    out: list[Any] | None = None
    new: Any
    for index, item in enumerate(items):
        cls = item.__class__
        if cls is dict:
            new = _mask_tree(item, secrets, depth + 1)
        elif cls is str and "=" in item and "?" in item:
            new = _mask_query(item, secrets, False)
        elif cls is list and depth < MAX_DEPTH:
            new = _mask_items(item, secrets, depth + 1)
        else:
            continue
        if new is not item:
            if out is None:
                out = list(items)
            out[index] = new
    return items if out is None else out


def mask_secrets(event: dict[str, Any], options: MappingOptions) -> dict[str, Any]:
    """Mask, in place, every secret of ``event`` outside its bodies; returns ``event``.

    * the ``mask_headers`` request and response headers;
    * in ``metadata``, at any depth (objects and arrays):

      * the string value of a key that is itself a secret's name (see :func:`_kind`:
        ``authorization``, ``x_api_key``, ``http_cookie``, ``request_header_authorization``,
        ``api_key``, ``token``...), and each string of a list under such a key;
      * the same header names under a key whose name contains ``header`` (any case)
        holding an object, header text (a JSON object, ``name:value;;...`` or one header
        a line) or a list of ``{"name": ..., "value": ...}`` objects, ``[name, value]``
        pairs or ``name: value`` strings;
    * the values of sensitive query parameters (:data:`SENSITIVE_PARAMS` and the
      ``mask_headers`` names) in ``request.uri``, in every other metadata string that
      holds a query (``...?name=value``, the query ending at ``#``, at the space before
      ``HTTP/`` of a request line, or at the end), and under every metadata key whose
      name contains ``query`` (or is ``args`` or ``qs``): an object (Kong's
      ``querystring``) or a string, with or without its ``?``.

    Nothing is masked when ``mask_headers`` is empty. Metadata objects are copied on
    write, never changed in place: they may be the input record's own.
    """
    secrets = options.secrets
    if secrets is None:
        return event
    request = event["request"]
    for part in (request, event.get("response") or {}):
        if part.get("headers"):
            part["headers"] = mask_headers(part["headers"], secrets.headers)
    uri = request.get("uri")
    if uri.__class__ is str and "?" in uri:
        request["uri"] = _mask_query(uri, secrets, False)
    metadata = event.get("metadata")
    if metadata.__class__ is dict and metadata:
        event["metadata"] = _mask_tree(metadata, secrets, 1)
    return event
