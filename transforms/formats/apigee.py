"""Apigee MessageLogging JSON records, alone or inside a Cloud Logging entry, to Moesif.

Apigee has no fixed log record: users write one with a MessageLogging policy in the
PostClientFlow. This format reads the keys the reference's policy writes (flow variables
in brackets):

* times: ``req_start`` (``client.received.start.timestamp``, epoch ms); the response at
  ``resp_end`` (``client.sent.end.timestamp``);
* ``uri`` = ``https://{host}{uri}`` (``request.header.host``, ``request.uri``); ``verb``;
  ``status``; ``ip_address`` = ``client_ip``;
* ``user_id`` = ``developer_email``; ``company_id`` = ``app``
  (``developer.app.name``); ``session_token`` = ``client_id``;
* ``transaction_id`` from ``messageid``, else the Cloud Logging entry's ``insertId``;
* the rest (``proxy``, ``rev``, ``env``, ``org``, ``product``, ``target_ms``...) is
  metadata. A Cloud Logging entry's own fields describe the logging, not the call, and are
  not.

A record may arrive as a Cloud Logging ``LogEntry`` (a Pub/Sub log sink, an export):
its ``jsonPayload`` is the record. Pure functions; no Beam, no I/O.
"""

from __future__ import annotations

from typing import Any

from moesif_beam.transforms.formats.gateway import (
    DEFAULT_OPTIONS,
    MappingOptions,
    build_event,
    leftovers,
    optional_str,
    require_object,
    require_str,
    status,
    time_ms,
    times,
)

__all__ = ["FORMAT", "payload", "to_moesif_event"]

FORMAT = "apigee"

_CONSUMED = (
    "req_start",
    "resp_end",
    "host",
    "uri",
    "verb",
    "status",
    "client_ip",
    "developer_email",
    "app",
    "client_id",
)


def payload(record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(the message, the Cloud Logging entry around it or None)``."""
    inner = record.get("jsonPayload")
    if isinstance(inner, dict):
        return inner, record
    return record, None


def to_moesif_event(
    value: Any, options: MappingOptions = DEFAULT_OPTIONS
) -> tuple[str, int, dict[str, Any]]:
    """Map one Apigee message (or a Cloud Logging entry holding it) to a Moesif API event.

    Returns:
        ``(transaction_id, request_time_ms, moesif_event)``.

    Raises:
        InvalidRecord: not an object; ``req_start``, ``verb``, ``uri`` or ``status``
            missing or mistyped. Names the field (``jsonPayload.`` first inside an entry).
    """
    record, entry = payload(require_object(value, FORMAT))
    at = "jsonPayload." if entry is not None else ""
    request_ms = time_ms(record.get("req_start"), f"{at}req_start")
    end = record.get("resp_end")
    response_ms = request_ms if end in (None, "", "-") else time_ms(end, f"{at}resp_end")
    request_time, response_time_text = times(request_ms, response_ms)

    host = optional_str(record.get("host"), f"{at}host")
    path = require_str(record.get("uri"), f"{at}uri")
    request: dict[str, Any] = {
        "time": request_time,
        "uri": f"https://{host}{path}" if host else path,
        "verb": require_str(record.get("verb"), f"{at}verb").upper(),
        "headers": {"Host": host} if host else {},
    }
    ip = optional_str(record.get("client_ip"), f"{at}client_ip")
    if ip:
        request["ip_address"] = ip
    response = {
        "time": response_time_text,
        "status": status(record.get("status"), f"{at}status"),
        "headers": {},
    }
    gateway_id = record.get("messageid")
    if gateway_id in (None, "", "-") and entry is not None:
        gateway_id = entry.get("insertId")
    return build_event(
        FORMAT,
        gateway_id,
        record,
        request=request,
        response=response,
        request_ms=request_ms,
        metadata=leftovers(record, _CONSUMED),
        roots=[record] if entry is None else [record, entry],
        options=options,
        user_id=record.get("developer_email"),
        company_id=record.get("app"),
        session_token=record.get("client_id"),
    )
