"""Envoy (and Istio) JSON access logs with the keys of Istio's template, to Moesif.

The mapping:

* times: ``start_time``; the response at ``start_time + duration`` (ms);
* ``uri`` = ``https://{authority}{path}``; ``verb`` = ``method``; ``status`` =
  ``response_code`` (0: no response was sent); ``ip_address`` = the first
  ``x_forwarded_for`` entry, else ``downstream_remote_address`` without its port;
* request headers from the keys that hold them: ``User-Agent`` (``user_agent``),
  ``X-Forwarded-For``, ``X-Request-Id`` and ``Host`` (``authority``);
* no identity by default: Envoy logs none (name a key your format adds with
  ``--user_id_field``);
* ``transaction_id`` from ``request_id`` (``x-request-id``);
* the rest (route, cluster, flags, bytes, upstream...) is metadata; ``-`` and null, how
  Envoy writes an unset value, are dropped.

Pure functions; no Beam, no I/O.
"""

from __future__ import annotations

from typing import Any

from moesif_beam.transforms.formats.gateway import (
    DEFAULT_OPTIONS,
    MappingOptions,
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

__all__ = ["FORMAT", "client_ip", "strip_port", "to_moesif_event"]

FORMAT = "envoy"

_CONSUMED = (
    "start_time",
    "duration",
    "authority",
    "path",
    "method",
    "response_code",
    "x_forwarded_for",
    "downstream_remote_address",
    "user_agent",
    "request_id",
)
_HEADERS = (
    ("user_agent", "User-Agent"),
    ("x_forwarded_for", "X-Forwarded-For"),
    ("request_id", "X-Request-Id"),
    ("authority", "Host"),
)


def strip_port(address: str) -> str:
    """``203.0.113.9:5123`` -> ``203.0.113.9``; ``[2001:db8::1]:443`` -> ``2001:db8::1``."""
    if address.startswith("["):
        return address[1:].partition("]")[0]
    if address.count(":") == 1:
        return address.partition(":")[0]
    return address


def client_ip(forwarded_for: str | None, remote: str | None) -> str | None:
    """The first ``X-Forwarded-For`` entry, else the remote address without its port."""
    if forwarded_for:
        first = forwarded_for.split(",")[0].strip()
        if first and first != "-":
            return first
    if remote:
        return strip_port(remote.strip()) or None
    return None


def to_moesif_event(
    value: Any, options: MappingOptions = DEFAULT_OPTIONS
) -> tuple[str, int, dict[str, Any]]:
    """Map one Envoy access-log record to a Moesif API event.

    Returns:
        ``(transaction_id, request_time_ms, moesif_event)``.

    Raises:
        InvalidRecord: not an object; ``start_time``, ``method``, ``path`` or
            ``response_code`` missing or mistyped. Names the field.
    """
    record = require_object(value, FORMAT)
    request_ms = time_ms(record.get("start_time"), "start_time")
    response_ms = response_time(request_ms, number(record.get("duration"), "duration"), "duration")
    request_time, response_time_text = times(request_ms, response_ms)

    authority = optional_str(record.get("authority"), "authority")
    path = require_str(record.get("path"), "path")
    headers = {}
    for key, name in _HEADERS:
        text = optional_str(record.get(key), key)
        if text:
            headers[name] = text
    request: dict[str, Any] = {
        "time": request_time,
        "uri": f"https://{authority}{path}" if authority else path,
        "verb": require_str(record.get("method"), "method").upper(),
        "headers": headers,
    }
    ip = client_ip(
        optional_str(record.get("x_forwarded_for"), "x_forwarded_for"),
        optional_str(record.get("downstream_remote_address"), "downstream_remote_address"),
    )
    if ip:
        request["ip_address"] = ip
    response = {
        "time": response_time_text,
        "status": status(record.get("response_code"), "response_code"),
        "headers": {},
    }
    return build_event(
        FORMAT,
        record.get("request_id"),
        record,
        request=request,
        response=response,
        request_ms=request_ms,
        metadata=leftovers(record, _CONSUMED, drop_dashes=True),
        roots=[record],
        options=options,
    )
