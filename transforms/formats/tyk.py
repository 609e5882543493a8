"""Tyk Pump analytics records (the JSON of ``AnalyticsRecord``, or Kafka pump's flat form).

The mapping follows Moesif's own Tyk pump:

* times: ``timestamp``; the response at ``timestamp + request_time`` (ms;
  ``request_time_ms`` in the Kafka pump's records, else ``latency.total``);
* ``uri`` = ``https://{host}`` + the request-target of ``raw_request``'s request line,
  else ``raw_path``, else ``path``; ``verb`` = ``method``; ``status`` = ``response_code``;
  ``ip_address``; ``api_version``;
* headers and bodies parsed from ``raw_request`` / ``raw_response`` (base64 of the whole
  HTTP message; filled only with detailed recording), else ``User-Agent`` from
  ``user_agent``; JSON bodies are sent as JSON, others base64;
* ``user_id`` = ``alias``, else ``oauth_id``; ``session_token`` = ``api_key`` (as Moesif's
  pump does: Tyk logs the key's hash when ``hash_keys`` is on);
* ``transaction_id``: Tyk records carry no request id, so it is derived from the whole
  record's content (the same record always gets the same id);
* everything else (``api_name``, ``api_id``, ``org_id``, ``tags``, ``geo``, ``network``,
  ``latency``...) is metadata.

Pure functions; no Beam, no I/O.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from moesif_beam.transforms.common.errors import InvalidRecord, json_type
from moesif_beam.transforms.formats.gateway import (
    DEFAULT_OPTIONS,
    MappingOptions,
    attach_body,
    build_event,
    leftovers,
    number,
    optional_str,
    require_object,
    require_str,
    response_time,
    status,
    time_ms,
    times,
)

__all__ = ["FORMAT", "parse_http_message", "to_moesif_event"]

FORMAT = "tyk"

_CONSUMED = (
    "timestamp",
    "method",
    "host",
    "path",
    "raw_path",
    "response_code",
    "ip_address",
    "user_agent",
    "raw_request",
    "raw_response",
    "request_time",
    "request_time_ms",
    "api_version",
    "alias",
    "oauth_id",
    "api_key",
)


def parse_http_message(data: bytes) -> tuple[str, dict[str, str], bytes]:
    """Split a raw HTTP message into its start line, headers and body.

    Repeated headers are joined with commas, as HTTP allows. Lines end in CRLF or LF.
    """
    for separator in (b"\r\n\r\n", b"\n\n"):
        head, found, body = data.partition(separator)
        if found:
            break
    else:
        head, body = data, b""
    lines = head.decode("utf-8", "replace").replace("\r\n", "\n").split("\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            continue
        name, value = name.strip(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return lines[0].strip(), headers, body


def _raw(record: dict, key: str) -> tuple[str, dict[str, str], bytes] | None:
    value = record.get(key)
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        msg = f"{key} must be a base64 string"
        raise InvalidRecord(msg, key, "string", json_type(value))
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        msg = f"{key} is not base64"
        raise InvalidRecord(msg, key, "string", "string") from None
    return parse_http_message(data)


def to_moesif_event(
    value: Any, options: MappingOptions = DEFAULT_OPTIONS
) -> tuple[str, int, dict[str, Any]]:
    """Map one Tyk analytics record to a Moesif API event.

    Returns:
        ``(transaction_id, request_time_ms, moesif_event)``.

    Raises:
        InvalidRecord: not an object; ``timestamp``, ``method`` or ``response_code``
            missing or mistyped; ``raw_request``/``raw_response`` not base64. Names the
            field.
    """
    record = require_object(value, FORMAT)
    request_ms = time_ms(record.get("timestamp"), "timestamp")
    latency = number(record.get("request_time"), "request_time")
    if latency is None:
        latency = number(record.get("request_time_ms"), "request_time_ms")
    if latency is None and isinstance(record.get("latency"), dict):
        latency = number(record["latency"].get("total"), "latency.total")
    response_ms = response_time(request_ms, latency, "request_time")
    request_time, response_time_text = times(request_ms, response_ms)

    verb = require_str(record.get("method"), "method").upper()
    raw_request = _raw(record, "raw_request")
    raw_response = _raw(record, "raw_response")
    target = None
    headers: dict[str, str] = {}
    if raw_request is not None:
        parts = raw_request[0].split(" ")
        if len(parts) >= 2 and parts[1].startswith("/"):
            target = parts[1]
        headers = raw_request[1]
    path = (
        target
        or optional_str(record.get("raw_path"), "raw_path")
        or require_str(record.get("path"), "path")
    )
    host = optional_str(record.get("host"), "host")
    agent = optional_str(record.get("user_agent"), "user_agent")
    if agent and not any(k.lower() == "user-agent" for k in headers):
        headers["User-Agent"] = agent
    request: dict[str, Any] = {
        "time": request_time,
        "uri": f"https://{host}{path}" if host else path,
        "verb": verb,
        "headers": headers,
    }
    api_version = optional_str(record.get("api_version"), "api_version")
    if api_version:
        request["api_version"] = api_version
    ip = optional_str(record.get("ip_address"), "ip_address")
    if ip:
        request["ip_address"] = ip
    if raw_request is not None:
        attach_body(request, raw_request[2] or None)
    response: dict[str, Any] = {
        "time": response_time_text,
        "status": status(record.get("response_code"), "response_code"),
        "headers": raw_response[1] if raw_response else {},
    }
    if raw_response is not None:
        attach_body(response, raw_response[2] or None)
    return build_event(
        FORMAT,
        None,
        record,
        request=request,
        response=response,
        request_ms=request_ms,
        metadata=leftovers(record, _CONSUMED),
        roots=[record],
        options=options,
        user_id=record.get("alias") or record.get("oauth_id"),
        session_token=record.get("api_key"),
    )
