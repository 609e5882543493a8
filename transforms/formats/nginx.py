"""NGINX access logs written as JSON (``log_format ... escape=json``) to Moesif.

NGINX has no standard JSON record; this format reads the common variables under their own
names (``msec``, ``request_id``, ``remote_addr``, ``http_x_forwarded_for``...). Numbers
are often quoted and an empty variable is written ``-``: both are handled. The mapping:

* times: ``msec`` (epoch seconds with milliseconds), else ``time_iso8601``; the response
  at ``msec + request_time`` (seconds);
* ``uri`` = ``{scheme}://{host}{request_uri}`` (``https`` when ``scheme`` is absent,
  ``uri`` + ``?args`` when ``request_uri`` is); ``verb`` = ``request_method``;
  ``status`` as a number; ``ip_address`` = the first ``http_x_forwarded_for`` entry
  unless it is ``-``, else ``remote_addr``;
* every ``http_<name>`` variable is the request header ``<name>`` (``_`` read as ``-``),
  every ``sent_http_<name>`` a response header; ``request_body`` is the request body;
* ``user_id`` = ``remote_user`` (HTTP basic auth); no session token unless asked
  (``--session_token_field header:x-api-key``);
* ``transaction_id`` from ``request_id``;
* the rest (``upstream_*``, ``body_bytes_sent``, ``server_protocol``...) is metadata,
  without ``-`` values.

Pure functions; no Beam, no I/O.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from moesif_beam.transforms.common.errors import InvalidRecord, json_type
from moesif_beam.transforms.common.timefmt import check_time_ms
from moesif_beam.transforms.formats.envoy import client_ip
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

__all__ = ["FORMAT", "seconds_to_ms", "to_moesif_event"]

FORMAT = "nginx"

_CONSUMED = (
    "msec",
    "time_iso8601",
    "request_time",
    "scheme",
    "host",
    "request_uri",
    "uri",
    "args",
    "request_method",
    "status",
    "remote_addr",
    "remote_user",
    "request_body",
    "request_id",
)


def seconds_to_ms(value: Any, field: str) -> int:
    """Epoch seconds with a fraction (``"1782820800.123"`` or a number) to milliseconds."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        msg = f"{field} must be epoch seconds"
        raise InvalidRecord(msg, field, "number", json_type(value))
    try:
        ms = int(Decimal(str(value).strip()) * 1000)
        return check_time_ms(ms)
    except (InvalidOperation, ValueError, OverflowError):
        msg = f"{field} is not epoch seconds: {str(value)[:40]!r}"
        raise InvalidRecord(msg, field, "number", json_type(value)) from None


def _headers(record: dict[str, Any], prefix: str) -> dict[str, str]:
    out = {}
    for key, value in record.items():
        if key.startswith(prefix) and isinstance(value, str) and value not in ("", "-"):
            out[key[len(prefix) :].replace("_", "-")] = value
    return out


def to_moesif_event(
    value: Any, options: MappingOptions = DEFAULT_OPTIONS
) -> tuple[str, int, dict[str, Any]]:
    """Map one NGINX JSON access-log record to a Moesif API event.

    Returns:
        ``(transaction_id, request_time_ms, moesif_event)``.

    Raises:
        InvalidRecord: not an object; ``msec`` (or ``time_iso8601``),
            ``request_method``, ``request_uri`` (or ``uri``) or ``status`` missing or
            mistyped. Names the field.
    """
    record = require_object(value, FORMAT)
    msec = record.get("msec")
    if msec not in (None, "", "-"):
        request_ms = seconds_to_ms(msec, "msec")
    else:
        request_ms = time_ms(record.get("time_iso8601"), "msec")
    seconds = number(record.get("request_time"), "request_time")
    latency = None if seconds is None else seconds * 1000
    response_ms = response_time(request_ms, latency, "request_time")
    request_time, response_time_text = times(request_ms, response_ms)

    target = optional_str(record.get("request_uri"), "request_uri")
    if target is None:
        target = require_str(record.get("uri"), "request_uri")
        args = optional_str(record.get("args"), "args")
        if args:
            target = f"{target}?{args}"
    host = optional_str(record.get("host"), "host")
    scheme = optional_str(record.get("scheme"), "scheme") or "https"
    request: dict[str, Any] = {
        "time": request_time,
        "uri": f"{scheme}://{host}{target}" if host else target,
        "verb": require_str(record.get("request_method"), "request_method").upper(),
        "headers": _headers(record, "http_"),
    }
    ip = client_ip(
        optional_str(record.get("http_x_forwarded_for"), "http_x_forwarded_for"),
        optional_str(record.get("remote_addr"), "remote_addr"),
    )
    if ip:
        request["ip_address"] = ip
    attach_body(request, record.get("request_body"))
    response = {
        "time": response_time_text,
        "status": status(record.get("status"), "status"),
        "headers": _headers(record, "sent_http_"),
    }
    consumed = [*_CONSUMED, *(k for k in record if k.startswith(("http_", "sent_http_")))]
    return build_event(
        FORMAT,
        record.get("request_id"),
        record,
        request=request,
        response=response,
        request_ms=request_ms,
        metadata=leftovers(record, consumed, drop_dashes=True),
        roots=[record],
        options=options,
        user_id=record.get("remote_user"),
    )
