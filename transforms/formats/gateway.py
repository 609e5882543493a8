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
* **Masking.** Secrets outside the bodies (sensitive headers, sensitive query parameters,
  and the same in metadata) are replaced by :data:`MASK` after identity is taken from
  them, so a secret in a log does not reach Moesif by accident: :mod:`.masking`'s
  :func:`mask_secrets`, one function for every format, re-exported here.
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
from dataclasses import dataclass
from typing import Any

import orjson

from moesif_beam.transforms.common.errors import InvalidRecord, json_type
from moesif_beam.transforms.common.timefmt import check_time_ms, format_time_ms, parse_time_ms
from moesif_beam.transforms.formats.masking import (
    MASK,
    SENSITIVE_PARAMS,
    _Secrets,
    mask_headers,
    mask_query,
    mask_secrets,
)
from moesif_beam.transforms.formats.wso2 import PLACEHOLDERS
from moesif_beam.transforms.schema.keys import sanitize_keys

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
HEADER_PREFIX = "header:"

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
