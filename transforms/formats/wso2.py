"""WSO2 API Manager analytics events (``apim_event_response``, ``apim_event_faulty``) to Moesif.

Matches WSO2's own Moesif publisher where it is sensible and improves on it where it loses
information:

* ``transaction_id`` is the gateway's ``correlationId`` (WSO2 sends none), so replays and
  retries are deduplicated by Moesif;
* fault events keep the real uri, verb, client IP and caller (WSO2 sends ``N/A`` and the
  API's creator) and take their response time from the event, not from the wall clock;
* metadata keeps native JSON types (older WSO2 publishers turned everything into strings)
  and every property, with dots in keys turned into ``_`` as Moesif does;
* no synthetic response headers and no browser-family string posing as a User-Agent.

Everything here is a pure function of one parsed event; no Beam, no I/O.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import orjson

from moesif_beam.transforms.common.errors import InvalidRecord, json_type
from moesif_beam.transforms.common.timefmt import check_time_ms, format_time_ms, parse_time_ms
from moesif_beam.transforms.schema.keys import sanitize_keys

__all__ = ["PLACEHOLDERS", "WSO2_NAMESPACE", "extract_json", "to_moesif_event"]

# WSO2 writes these where it has no value; they are not identities.
PLACEHOLDERS = frozenset({"", "UNKNOWN", "unknown", "anonymous", "N/A", "-", "null"})

# Namespace for ids derived from content when an event has no correlationId: uuid5 of
# the canonical JSON, so a re-run of a backfill derives the same id for the same event.
WSO2_NAMESPACE = uuid.UUID("5b0f4a52-8f0c-4f8e-9c1e-3d7a0e6a9b21")

_TENANT_SUFFIX = "@carbon.super"

# Top-level fields that become first-class Moesif fields and are therefore not metadata.
# correlationId, apiMethod and apiVersion stay in metadata as well, as WSO2's publisher
# keeps them there and dashboards built on it filter on them.
_TOP_CONSUMED = frozenset(
    {"requestTimestamp", "userIp", "userAgentHeader", "proxyResponseCode", "properties"}
)
# Properties that become request/response parts: bodies would bloat metadata and headers
# belong in headers.
_PROP_CONSUMED = frozenset(
    {
        "x-original-gw-url",
        "requestHeaders",
        "responseHeaders",
        "requestBody",
        "responseBody",
        "requestBodyTransferEncoding",
        "responseBodyTransferEncoding",
    }
)


def extract_json(raw: bytes) -> bytes:
    """Return the JSON part of a WSO2 analytics log line.

    Plain JSON lines pass through. ELK-style gateway log lines
    (``... apimMetrics: apim:response, properties :{...}``) carry the event after a prefix;
    the event starts at the first ``{`` after the ``apimMetrics`` marker.
    """
    stripped = raw.lstrip()
    if stripped[:1] == b"{":
        return stripped
    marker = raw.find(b"apimMetrics")
    if marker >= 0:
        start = raw.find(b"{", marker)
        if start >= 0:
            return raw[start:]
    return raw


def to_moesif_event(event: Any, company_id_field: str | None = None) -> tuple[str, int, dict]:
    """Map one parsed WSO2 analytics event to a Moesif API event.

    Args:
        event: the parsed JSON value of one log line.
        company_id_field: a field whose value becomes ``company_id``, looked up at the top
            level and then in ``properties``; None leaves ``company_id`` unset.

    Returns:
        ``(transaction_id, request_time_ms, moesif_event)``.

    Raises:
        InvalidRecord: the event is not an object, lacks a field Moesif requires
            (``requestTimestamp``, ``apiMethod``, ``proxyResponseCode``, a uri source), or
            carries a field of the wrong type. The exception names the field and types.
    """
    if not isinstance(event, dict):
        msg = f"a WSO2 event is a JSON object, got {json_type(event)}"
        raise InvalidRecord(msg, "", "object", json_type(event))
    props = event.get("properties")
    if props is None:
        props = {}
    elif not isinstance(props, dict):
        msg = "properties must be an object"
        raise InvalidRecord(msg, "properties", "object", json_type(props))

    request_ms = _request_time(event)
    verb = _required_str(event, "apiMethod").upper()
    status = _status(event)
    response_ms = _response_time(event, request_ms)

    request: dict[str, Any] = {
        "time": format_time_ms(request_ms),
        "uri": _uri(event, props),
        "verb": verb,
        "headers": _request_headers(event, props),
    }
    api_version = _optional_str(event, "apiVersion")
    if api_version:
        request["api_version"] = api_version
    ip = _optional_str(event, "userIp")
    if ip and ip not in PLACEHOLDERS:
        request["ip_address"] = ip
    _attach_body(request, props, "requestBody", "requestBodyTransferEncoding")

    response: dict[str, Any] = {
        "time": format_time_ms(response_ms),
        "status": status,
        "headers": _response_headers(props),
    }
    _attach_body(response, props, "responseBody", "responseBodyTransferEncoding")

    metadata = {k: v for k, v in props.items() if k not in _PROP_CONSUMED}
    for key, value in event.items():
        if key not in _TOP_CONSUMED:
            metadata[key] = value  # the top level wins over a property of the same name
    metadata = sanitize_keys(metadata)

    transaction_id = _optional_str(event, "correlationId") or _derived_id(event)
    moesif: dict[str, Any] = {
        "transaction_id": transaction_id,
        "request": request,
        "response": response,
        "direction": "Incoming",
    }
    user_id = _user_id(event, props)
    if user_id:
        moesif["user_id"] = user_id
    if company_id_field:
        company_id = _company_id(event, props, company_id_field)
        if company_id:
            moesif["company_id"] = company_id
    moesif["metadata"] = metadata
    return transaction_id, request_ms, moesif


def _request_time(event: dict) -> int:
    if "requestTimestamp" not in event or event["requestTimestamp"] is None:
        msg = "missing requestTimestamp"
        raise InvalidRecord(msg, "requestTimestamp")
    try:
        return parse_time_ms(event["requestTimestamp"])
    except ValueError as exc:
        msg = f"requestTimestamp is not a time: {exc}"
        raise InvalidRecord(
            msg, "requestTimestamp", "string", json_type(event["requestTimestamp"])
        ) from exc


# A latency longer than a day is a corrupt field, not a slow API (and 1e308 would
# overflow every time computed from it).
MAX_LATENCY_MS = 86_400_000


def _response_time(event: dict, request_ms: int) -> int:
    latency = _optional_number(event, "responseLatency")
    if latency is None:
        return request_ms
    if not -MAX_LATENCY_MS <= latency <= MAX_LATENCY_MS:
        msg = f"responseLatency must be within {MAX_LATENCY_MS:,} ms, got {latency:.6g}"
        raise InvalidRecord(msg, "responseLatency", "number", "number")
    try:
        return check_time_ms(request_ms + int(latency))
    except ValueError as exc:
        msg = f"requestTimestamp + responseLatency is {exc}"
        raise InvalidRecord(msg, "responseLatency", "number", "number") from exc


def _required_str(event: dict, key: str) -> str:
    value = event.get(key)
    if value is None or value == "":
        msg = f"missing {key}"
        raise InvalidRecord(msg, key)
    if not isinstance(value, str):
        msg = f"{key} must be a string"
        raise InvalidRecord(msg, key, "string", json_type(value))
    return value


def _optional_str(event: dict, key: str) -> str | None:
    value = event.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        msg = f"{key} must be a string"
        raise InvalidRecord(msg, key, "string", json_type(value))
    return value


def _optional_number(event: dict, key: str) -> float | None:
    value = event.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"{key} must be a number"
        raise InvalidRecord(msg, key, "number", json_type(value))
    return value


def _status(event: dict) -> int:
    value = event.get("proxyResponseCode")
    if value is None:
        msg = "missing proxyResponseCode"
        raise InvalidRecord(msg, "proxyResponseCode")
    if isinstance(value, bool) or not isinstance(value, int):
        msg = "proxyResponseCode must be an integer"
        raise InvalidRecord(msg, "proxyResponseCode", "number", json_type(value))
    # WSO2 writes -1 (and 0) where a fault had no backend response; anything beyond
    # three digits is not an HTTP status.
    if not -1 <= value <= 999:
        msg = f"proxyResponseCode must be an HTTP status, got {value}"
        raise InvalidRecord(msg, "proxyResponseCode", "number", "number")
    return value


def _uri(event: dict, props: dict) -> str:
    gw_url = props.get("x-original-gw-url") or event.get("x-original-gw-url")
    if isinstance(gw_url, str) and gw_url:
        return gw_url
    context = event.get("apiContext") or props.get("apiContext")
    if not context:
        msg = "no uri: neither x-original-gw-url nor apiContext is present"
        raise InvalidRecord(msg, "properties.apiContext")
    if not isinstance(context, str):
        msg = "apiContext must be a string"
        raise InvalidRecord(msg, "properties.apiContext", "string", json_type(context))
    template = event.get("apiResourceTemplate")
    if not template or not isinstance(template, str):
        return context
    return context.rstrip("/") + "/" + template.lstrip("/")


def _request_headers(event: dict, props: dict) -> dict[str, str]:
    headers = _string_map(props.get("requestHeaders"))
    agent = event.get("userAgentHeader")
    if isinstance(agent, str) and agent not in PLACEHOLDERS:
        headers.setdefault("User-Agent", agent)
    content_type = props.get("requestContentType")
    if isinstance(content_type, str) and content_type:
        headers.setdefault("Content-Type", content_type)
    return headers


def _response_headers(props: dict) -> dict[str, str]:
    headers = _string_map(props.get("responseHeaders"))
    content_type = props.get("responseContentType")
    if isinstance(content_type, str) and content_type:
        headers.setdefault("Content-Type", content_type)
    return headers


def _string_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    # Moesif headers are string to string; repeated headers arrive as lists and are joined
    # with commas, as HTTP itself allows.
    out = {}
    for key, item in value.items():
        if isinstance(item, list):
            out[str(key)] = ", ".join(str(part) for part in item)
        elif item is not None:
            out[str(key)] = item if isinstance(item, str) else json.dumps(item)
    return out


def _attach_body(target: dict, props: dict, body_key: str, encoding_key: str) -> None:
    body = props.get(body_key)
    if body is None:
        return
    if isinstance(body, dict | list):
        target["body"] = body
        target["transfer_encoding"] = "json"
        return
    text = body if isinstance(body, str) else json.dumps(body)
    if str(props.get(encoding_key, "")).lower() == "base64":
        target["body"] = text
        target["transfer_encoding"] = "base64"
        return
    if text[:1] in ("{", "["):
        try:
            # orjson, as for the event itself: NaN, Infinity and numbers that overflow to
            # them are not JSON, so such a body is sent base64 like any other non-JSON text.
            target["body"] = orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
        else:
            target["transfer_encoding"] = "json"
            return
    target["body"] = base64.b64encode(text.encode("utf-8", "surrogatepass")).decode("ascii")
    target["transfer_encoding"] = "base64"


def _user_id(event: dict, props: dict) -> str | None:
    for value in (event.get("userName"), props.get("userName")):
        if isinstance(value, str) and value not in PLACEHOLDERS:
            name = value.removesuffix(_TENANT_SUFFIX)
            return name or None
    return None


def _company_id(event: dict, props: dict, field: str) -> str | None:
    value = event.get(field)
    if value is None:
        value = props.get(field)
    if value is None or isinstance(value, dict | list | bool):
        return None
    text = value if isinstance(value, str) else str(value)
    return None if text in PLACEHOLDERS else text


def _derived_id(event: dict) -> str:
    canonical = json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return str(uuid.uuid5(WSO2_NAMESPACE, canonical))
