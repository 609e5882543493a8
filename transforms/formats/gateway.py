"""What every gateway mapping shares: ids, identity, header masking, leftovers and field checks.

The per-gateway modules (``kong``, ``aws``, ``tyk``, ``azure``, ``apigee``, ``envoy``,
``nginx``) only say where each Moesif field comes from; the rules below are written once:

* **Ids.** A gateway's request id that is already a UUID is kept as it is; any other id
  becomes ``uuid5(namespace, "<format>:<id>")``; a record without an id gets
  ``uuid5(namespace, "<format>:content:<canonical JSON>")``. The same record therefore
  always gets the same ``transaction_id``, whichever run reads it, so replays dedup.
* **Identity.** ``--user_id_field``, ``--company_id_field`` and ``--session_token_field``
  name a record field (a dotted path) or a request header (``header:NAME``) and win over
  the gateway's own identity; ``--user_id_jwt_claim`` takes ``user_id`` from a claim of a
  ``Bearer`` JWT in ``Authorization`` before the gateway's default. The token is decoded,
  never verified, never logged, and a token that does not decode is ignored.
* **Masking.** Sensitive request and response headers are replaced by :data:`MASK` after
  identity is taken from them, so a secret in a log does not reach Moesif by accident.
  The same header names are masked in every headers-shaped object that goes to metadata
  (a key whose name contains ``header``, holding an object or header text), and the
  values of sensitive query parameters (:data:`SENSITIVE_PARAMS` and the masked header
  names) are masked in ``request.uri`` and in every URI and query string in metadata
  (:func:`mask_secrets`, one function for every format).
* **Leftovers.** Fields a mapping does not use go to metadata with their native types,
  dots in keys replaced as Moesif does.

Everything here is a pure function of plain values; no Beam, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import functools
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

import orjson

from moesif_beam.transforms.common.errors import InvalidRecord, json_type
from moesif_beam.transforms.common.timefmt import check_time_ms, format_time_ms, parse_time_ms
from moesif_beam.transforms.formats.wso2 import PLACEHOLDERS
from moesif_beam.transforms.schema.keys import MAX_DEPTH, sanitize_keys

__all__ = [
    "DEFAULT_MASKED_HEADERS",
    "DEFAULT_OPTIONS",
    "GATEWAY_NAMESPACE",
    "HEADER_PREFIX",
    "MASK",
    "MAX_LATENCY_MS",
    "SENSITIVE_PARAMS",
    "MappingOptions",
    "NoRecords",
    "attach_body",
    "build_event",
    "finish_identity",
    "header_map",
    "identity",
    "jwt_claim",
    "leftovers",
    "lookup",
    "mask_headers",
    "mask_query",
    "mask_secrets",
    "number",
    "optional_str",
    "require_object",
    "require_str",
    "response_time",
    "status",
    "time_ms",
    "times",
    "transaction_id",
]

# Namespace of every id derived here (uuid5). Changing it would change every derived id
# and defeat dedup against what earlier runs delivered: it is fixed for good.
GATEWAY_NAMESPACE = uuid.UUID("0d6b7d0e-3c1f-5a61-9b1e-6f0a4c2d8e57")

# Headers that carry credentials: Authorization schemes, cookies, and the API-key headers
# of the common gateways (Kong, AWS, Azure, Apigee, Tyk and hand-rolled NGINX setups).
DEFAULT_MASKED_HEADERS: tuple[str, ...] = (
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "apikey",
    "x-apikey",
    "ocp-apim-subscription-key",
)
MASK = "*****"
HEADER_PREFIX = "header:"

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

# A latency longer than a day is a corrupt field, not a slow API.
MAX_LATENCY_MS = 86_400_000

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class NoRecords(ValueError):
    """A line that holds nothing to deliver and is not an error either.

    A CloudWatch Logs ``CONTROL_MESSAGE`` (a subscription's health check) is the case:
    it is skipped rather than dead-lettered.
    """


def _check_ref(flag: str, value: str | None) -> None:
    if value is None:
        return
    name = value.removeprefix(HEADER_PREFIX)
    if not name.strip():
        msg = f"--{flag} must name a field or header:NAME, got {value!r}"
        raise ValueError(msg)


@dataclass(frozen=True)
class MappingOptions:
    """How identities are chosen and which headers are masked, for every events format.

    Attributes:
        user_id_field: field path or ``header:NAME`` whose value becomes ``user_id``.
        company_id_field: field path or ``header:NAME`` whose value becomes ``company_id``.
        session_token_field: field path or ``header:NAME`` for ``session_token``.
        user_id_jwt_claim: claim of a ``Bearer`` JWT in ``Authorization`` that becomes
            ``user_id`` when ``user_id_field`` gives none; None does not look.
        mask_headers: header names (any case) whose values become :data:`MASK`.
    """

    user_id_field: str | None = None
    company_id_field: str | None = None
    session_token_field: str | None = None
    user_id_jwt_claim: str | None = None
    mask_headers: tuple[str, ...] = DEFAULT_MASKED_HEADERS

    def __post_init__(self) -> None:
        for name in ("user_id_field", "company_id_field", "session_token_field"):
            if getattr(self, name) == "":
                object.__setattr__(self, name, None)  # an empty flag asks for nothing
        _check_ref("user_id_field", self.user_id_field)
        _check_ref("company_id_field", self.company_id_field)
        _check_ref("session_token_field", self.session_token_field)
        if self.user_id_jwt_claim is not None and not self.user_id_jwt_claim.strip():
            msg = "--user_id_jwt_claim must name a claim, such as sub"
            raise ValueError(msg)
        names = tuple(sorted({n.strip().lower() for n in self.mask_headers if n.strip()}))
        object.__setattr__(self, "mask_headers", names)

    @functools.cached_property
    def masked(self) -> frozenset[str]:
        """``mask_headers`` as a set, made once rather than per record."""
        return frozenset(self.mask_headers)

    @functools.cached_property
    def secrets(self) -> _Secrets | None:
        """What :func:`mask_secrets` masks, made once; None when ``mask_headers`` is empty."""
        if not self.mask_headers:
            return None
        return _Secrets.of(self.masked, (*SENSITIVE_PARAMS, *self.mask_headers))


DEFAULT_OPTIONS = MappingOptions()


# -- ids ----------------------------------------------------------------------------------


def transaction_id(fmt: str, gateway_id: object, record: object) -> str:
    """The ``transaction_id`` of a record from gateway ``fmt``.

    Args:
        fmt: the format's name; part of a derived id, so two gateways' ids never collide.
        gateway_id: the gateway's own request id, or None/``""``/``"-"`` when it has none.
        record: the parsed record, hashed when there is no id.
    """
    text = identity(gateway_id)
    if text is not None:
        if len(text) == 36 and _UUID.fullmatch(text):
            return text
        return str(uuid.uuid5(GATEWAY_NAMESPACE, f"{fmt}:{text}"))
    canonical = orjson.dumps(record, option=orjson.OPT_SORT_KEYS).decode("utf-8")
    return str(uuid.uuid5(GATEWAY_NAMESPACE, f"{fmt}:content:{canonical}"))


# -- identity -----------------------------------------------------------------------------


def identity(value: object) -> str | None:
    """A string or number as an identity; placeholders (``-``, ``""``, ``null``...) as None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
    elif isinstance(value, int | float):
        text = str(value)
    else:
        return None
    return None if text in PLACEHOLDERS else text


def lookup(roots: Sequence[Mapping[str, Any]], path: str) -> Any:
    """The value at ``path`` in the first root that has it, else None.

    A key containing dots (Apigee's ``request.header.host``) is tried whole first, then
    ``path`` is followed one dotted part at a time.
    """
    for root in roots:
        if path in root:
            return root[path]
        node: Any = root
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                node = None
                break
            node = node[part]
        if node is not None:
            return node
    return None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def _resolve(
    ref: str | None, roots: Sequence[Mapping[str, Any]], headers: Mapping[str, str]
) -> str | None:
    if ref is None:
        return None
    if ref.startswith(HEADER_PREFIX):
        return identity(_header(headers, ref[len(HEADER_PREFIX) :]))
    return identity(lookup(roots, ref))


def jwt_claim(headers: Mapping[str, str], claim: str) -> str | None:
    """The ``claim`` of the Bearer JWT in ``Authorization``, decoded and never verified.

    Anything that is not a three-part token with a JSON object payload gives None; the
    token itself never appears in an exception or a message.
    """
    value = _header(headers, "authorization")
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    parts = token.strip().split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, binascii.Error):
        return None
    if not isinstance(claims, dict):
        return None
    return identity(lookup([claims], claim))


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
        clean: queries known to hold nothing to mask (Kong writes the same query in
            ``request.url``, ``request.uri`` and ``upstream_uri``; APIs see the same
            queries again and again). Bounded by ``_CLEAN_MAX`` and ``_CLEAN_LONGEST``.
    """

    headers: frozenset[str]
    params: frozenset[str]
    tails: tuple[str, ...]
    clean: dict[str, None] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, headers: Iterable[str], params: Iterable[str]) -> _Secrets:
        names = frozenset(_param(name) for name in params if name.strip())
        tails: list[str] = []
        for name in sorted(names, key=len):
            if not any(tail in name for tail in tails):
                tails.append(name)
        return cls(frozenset(h.lower() for h in headers), names, tuple(tails))

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


# Where a query string ends in a URI: the fragment, or the space before " HTTP/1.1" when
# the value is a request line.
_QUERY_END = re.compile(r"[#\s]")
_QUERY_SEPARATORS = re.compile(r"([&;])")


def mask_query(text: str, names: Iterable[str], *, whole: bool = False) -> str:
    """``text`` with the value of every sensitive query parameter replaced by :data:`MASK`.

    The parameter's name is kept (``?apikey=*****&page=2``), as a masked header keeps its
    name; a parameter without a value is left alone. ``text`` is a URI (its query is what
    follows the first ``?``, up to ``#`` or a space) or, with ``whole``, a query string
    that may lack the ``?``. Text with nothing to mask comes back as it is.

    Args:
        text: the URI or query string.
        names: the sensitive parameters' names (any case; ``_`` and ``-`` alike;
            percent-encoded names in ``text`` are decoded to compare).
        whole: ``text`` is a query string when it has no ``?``.
    """
    return _mask_query(text, _Secrets.of((), names), whole)


def _mask_query(text: str, secrets: _Secrets, whole: bool) -> str:
    start = text.find("?") + 1
    if not start and not whole:
        return text
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


def _mask_header_text(text: str, names: frozenset[str]) -> str:
    """Header text (a JSON object, ``name:value;;...`` or one header a line), masked."""
    if text.lstrip()[:1] == "{":
        try:
            parsed = orjson.loads(text)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            masked = mask_headers(parsed, names)
            return text if masked is parsed else orjson.dumps(masked).decode()
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


# Never 0: `_KINDS.get(key) or _kind(key)` must not recompute a known key.
_HEADERS, _QUERY, _OTHER = 1, 2, 3
# Metadata key -> what its name says the value is. Keys repeat from record to record, so
# this stays small; it stops growing at _KINDS_MAX (a record with made-up keys per call).
_KINDS: dict[str, int] = {}
_KINDS_MAX = 10_000


def _kind(key: str) -> int:
    """What a metadata key's name says its value is: headers, a query string, or other."""
    name = key.lower()
    if "header" in name:
        kind = _HEADERS
    elif "query" in name or name in ("args", "qs"):
        kind = _QUERY
    else:
        kind = _OTHER
    if len(_KINDS) < _KINDS_MAX:
        _KINDS[key] = kind
    return kind


def _mask_tree(node: dict[str, Any], secrets: _Secrets, depth: int) -> dict[str, Any]:
    """``node`` (metadata, or an object in it) with its secrets masked, at any depth.

    Copies only the objects on the way to a masked value; the rest is shared, and a
    record with nothing to mask comes back as it is. This runs for every record, so the
    common value (a number, a string without ``=`` or ``:``) costs a type test and one
    or two C-level substring tests, and nothing else.
    """
    out: dict[str, Any] | None = None
    kinds = _KINDS
    new: Any
    for key, value in node.items():
        cls = value.__class__
        if cls is str:
            # Header text needs ":", a query "=": most strings have neither.
            if ":" not in value and "=" not in value:
                continue
            kind = kinds.get(key) or _kind(key)
            if kind == _HEADERS:
                new = _mask_header_text(value, secrets.headers)
            elif kind == _QUERY:
                new = _mask_query(value, secrets, True)
            elif "?" in value and "=" in value:
                new = _mask_query(value, secrets, False)
            else:
                continue
        elif cls is dict:
            if not value:
                continue
            kind = kinds.get(key) or _kind(key)
            if kind == _HEADERS:
                new = mask_headers(value, secrets.headers)
            elif kind == _QUERY:
                new = _mask_params(value, secrets)
            elif depth < MAX_DEPTH:
                new = _mask_tree(value, secrets, depth + 1)
            else:
                continue
        elif cls is list and value and depth < MAX_DEPTH:
            new = _mask_items(value, secrets, depth + 1)
        else:
            continue
        if new is not value:
            if out is None:
                out = dict(node)
            out[key] = new
    return node if out is None else out


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
    * the same header names in every headers-shaped value in ``metadata``: a key whose
      name contains ``header`` (any case) holding an object or header text (a JSON
      object, ``name:value;;...`` or one header a line), at any depth;
    * the values of sensitive query parameters (:data:`SENSITIVE_PARAMS` and the
      ``mask_headers`` names) in ``request.uri``, in every string in ``metadata`` that
      holds a query (``...?name=value``), and in every metadata key whose name contains
      ``query`` (or is ``args``), an object (Kong's ``querystring``) or a string.

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


def finish_identity(
    event: dict[str, Any],
    roots: Sequence[Mapping[str, Any]],
    options: MappingOptions,
    *,
    user_id: object = None,
    company_id: object = None,
    session_token: object = None,
) -> dict[str, Any]:
    """Set ``user_id``, ``company_id`` and ``session_token`` on ``event``, then mask secrets.

    Precedence: the option's field or header, then (``user_id`` only) the JWT claim, then
    the gateway's own value passed here. Headers are read before they are masked; the
    masking is :func:`mask_secrets` (headers, the uri's query, metadata).
    """
    request = event["request"]
    headers = request.get("headers") or {}
    user = _resolve(options.user_id_field, roots, headers)
    if user is None and options.user_id_jwt_claim:
        user = jwt_claim(headers, options.user_id_jwt_claim)
    chosen = {
        "user_id": user or identity(user_id),
        "company_id": _resolve(options.company_id_field, roots, headers) or identity(company_id),
        "session_token": _resolve(options.session_token_field, roots, headers)
        or identity(session_token),
    }
    for key, value in chosen.items():
        if value is not None:
            event[key] = value
    return mask_secrets(event, options)


# -- building blocks ----------------------------------------------------------------------


def header_map(value: Any, field: str) -> dict[str, str]:
    """Headers as Moesif wants them: string to string; repeats (lists) joined with commas.

    A string is read as a JSON object, else as ``name:value;;name:value`` (Moesif's APIM
    policy) or one ``name: value`` per line. None or ``"-"`` is no headers.

    Raises:
        InvalidRecord: ``value`` is neither an object nor such a string.
    """
    if value is None or value in ("", "-"):
        return {}
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            value = _header_lines(value)
    if not isinstance(value, dict):
        msg = f"{field} must be an object of headers"
        raise InvalidRecord(msg, field, "object", json_type(value))
    out: dict[str, str] = {}
    for key, item in value.items():
        if isinstance(item, list):
            out[str(key)] = ", ".join(str(part) for part in item)
        elif isinstance(item, str):
            out[str(key)] = item
        elif item is not None:
            out[str(key)] = orjson.dumps(item).decode()
    return out


def _header_lines(text: str) -> dict[str, str] | None:
    """``name:value;;name:value`` (Moesif's APIM policy) or one header per line."""
    parts = text.split(";;") if ";;" in text else text.splitlines()
    pairs = [part.partition(":") for part in parts if part.strip()]
    if not pairs or not all(colon and name.strip() for name, colon, _ in pairs):
        return None
    return {name.strip(): value.strip() for name, _, value in pairs}


def attach_body(target: dict[str, Any], body: Any, *, base64_encoded: bool = False) -> None:
    """Set ``target``'s body: JSON as JSON, anything else base64, as Moesif's plugins do."""
    if body is None or body in ("", "-"):
        return
    if isinstance(body, dict | list):
        target["body"] = body
        target["transfer_encoding"] = "json"
        return
    raw = body if isinstance(body, bytes) else str(body).encode("utf-8", "surrogatepass")
    if base64_encoded:
        try:
            raw = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            target["body"] = raw.decode("ascii", "replace")
            target["transfer_encoding"] = "base64"
            return
    if raw.lstrip()[:1] in (b"{", b"["):
        try:
            target["body"] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
        else:
            target["transfer_encoding"] = "json"
            return
    target["body"] = base64.b64encode(raw).decode("ascii")
    target["transfer_encoding"] = "base64"


def leftovers(
    record: Mapping[str, Any],
    consumed: Iterable[str],
    *,
    masked: Iterable[str] = (),
    drop_dashes: bool = False,
) -> dict[str, Any]:
    """The fields a mapping did not use, as metadata (native types, Moesif's key rule).

    Args:
        record: the gateway record.
        consumed: dotted paths the mapping used (``request.headers`` drops that part of
            ``request`` and keeps the rest).
        masked: keys whose values are secrets: kept as :data:`MASK`.
        drop_dashes: drop ``"-"``, ``""`` and null values (how AWS, NGINX and Envoy write
            an absent value).
    """
    paths = frozenset(consumed)
    secret = frozenset(masked)
    return sanitize_keys(_drop(record, paths, secret, drop_dashes, ""))


def _drop(
    record: Mapping[str, Any], paths: frozenset[str], secret: frozenset[str], dashes: bool, at: str
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        path = f"{at}{key}"
        if path in paths:
            continue
        if dashes and (value is None or value in ("-", "")):
            continue
        if key in secret and value not in (None, "", "-"):
            out[key] = MASK
        elif isinstance(value, Mapping) and any(p.startswith(path + ".") for p in paths):
            rest = _drop(value, paths, secret, dashes, path + ".")
            if rest:
                out[key] = rest
        else:
            out[key] = value
    return out


def build_event(
    fmt: str,
    gateway_id: object,
    record: Any,
    *,
    request: dict[str, Any],
    response: dict[str, Any],
    request_ms: int,
    metadata: dict[str, Any],
    roots: Sequence[Mapping[str, Any]],
    options: MappingOptions,
    user_id: object = None,
    company_id: object = None,
    session_token: object = None,
) -> tuple[str, int, dict[str, Any]]:
    """Assemble the Moesif event and the ``(transaction_id, time, event)`` triple."""
    tid = transaction_id(fmt, gateway_id, record)
    event: dict[str, Any] = {
        "transaction_id": tid,
        "request": request,
        "response": response,
        "direction": "Incoming",
        "metadata": metadata,  # before finish_identity: its masking covers metadata too
    }
    finish_identity(
        event,
        roots,
        options,
        user_id=user_id,
        company_id=company_id,
        session_token=session_token,
    )
    return tid, request_ms, event


# -- field checks -------------------------------------------------------------------------


def require_object(value: Any, fmt: str) -> dict[str, Any]:
    """``value`` when it is a JSON object; else an ``invalid_record`` naming the record."""
    if not isinstance(value, dict):
        msg = f"a {fmt} record is a JSON object, got {json_type(value)}"
        raise InvalidRecord(msg, "", "object", json_type(value))
    return value


def require_str(value: Any, field: str) -> str:
    """A non-empty string (``"-"`` counts as missing)."""
    if value is None or value in ("", "-"):
        msg = f"missing {field}"
        raise InvalidRecord(msg, field)
    if not isinstance(value, str):
        msg = f"{field} must be a string"
        raise InvalidRecord(msg, field, "string", json_type(value))
    return value


def optional_str(value: Any, field: str) -> str | None:
    """A string, or None for null, ``""`` and ``"-"``."""
    if value is None or value in ("", "-"):
        return None
    if not isinstance(value, str):
        msg = f"{field} must be a string"
        raise InvalidRecord(msg, field, "string", json_type(value))
    return value


def number(value: Any, field: str, *, required: bool = False) -> float | None:
    """A number, or a string holding one (gateways quote numbers); ``"-"`` is absent."""
    if value is None or value in ("", "-"):
        if required:
            msg = f"missing {field}"
            raise InvalidRecord(msg, field)
        return None
    if isinstance(value, bool):
        msg = f"{field} must be a number"
        raise InvalidRecord(msg, field, "number", "boolean")
    if isinstance(value, int | float):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value)
        except ValueError:
            msg = f"{field} must be a number, got {value[:40]!r}"
            raise InvalidRecord(msg, field, "number", "string") from None
    else:
        msg = f"{field} must be a number"
        raise InvalidRecord(msg, field, "number", json_type(value))
    if not math.isfinite(result):
        msg = f"{field} must be a finite number"
        raise InvalidRecord(msg, field, "number", json_type(value))
    return result


def status(value: Any, field: str) -> int:
    """An HTTP status (0 to 999; Envoy writes 0 when no response was sent)."""
    code = number(value, field, required=True)
    if code is None or code != int(code) or not 0 <= code <= 999:
        msg = f"{field} must be an HTTP status, got {value!r}"[:200]
        raise InvalidRecord(msg, field, "number", json_type(value))
    return int(code)


def time_ms(value: Any, field: str) -> int:
    """A time (ISO 8601, or epoch seconds or milliseconds) in epoch milliseconds."""
    if value is None or value in ("", "-"):
        msg = f"missing {field}"
        raise InvalidRecord(msg, field)
    try:
        return parse_time_ms(value)
    except ValueError as exc:
        msg = f"{field} is not a time: {exc}"
        raise InvalidRecord(msg, field, "string", json_type(value)) from exc


def response_time(request_ms: int, latency_ms: float | None, field: str) -> int:
    """``request_ms + latency_ms``, refusing latencies over a day either way."""
    if latency_ms is None:
        return request_ms
    if not -MAX_LATENCY_MS <= latency_ms <= MAX_LATENCY_MS:
        msg = f"{field} must be within {MAX_LATENCY_MS:,} ms, got {latency_ms:.6g}"
        raise InvalidRecord(msg, field, "number", "number")
    try:
        return check_time_ms(request_ms + round(latency_ms))
    except ValueError as exc:
        msg = f"{field} puts the response time {exc}"
        raise InvalidRecord(msg, field, "number", "number") from exc


def times(request_ms: int, response_ms: int) -> tuple[str, str]:
    """Both times in Moesif's format."""
    return format_time_ms(request_ms), format_time_ms(response_ms)
