"""Kong's logging plugins (http-log, file-log, tcp/udp-log, syslog, kafka-log) to Moesif.

Every Kong logging plugin writes the same serializer output: one JSON object per request,
or (http-log and kafka-log with ``max_batch_size > 1``) a JSON array of them. The mapping:

* times: ``started_at`` (epoch ms); the response at ``started_at + latencies.request``;
* ``uri`` = ``request.url``, ``verb`` = ``request.method``, ``status`` =
  ``response.status``, ``ip_address`` = ``client_ip``, and both header maps;
* ``user_id`` = ``consumer.custom_id``, else ``consumer.username``, else ``consumer.id``;
  ``session_token`` = ``authenticated_entity.id`` (the credential's id; Kong never logs
  the key itself);
* ``transaction_id`` from ``request.id`` (Kong 3.x), else the ``X-Moesif-Transaction-Id``
  request header (Moesif's plugin sets it), else the record's content;
* everything else (route, service, workspace, tries, upstream fields) is metadata;
  ``latencies`` and what is left of ``request`` and ``response`` go in flattened, as
  ``latencies_proxy``, ``request_querystring``, ``response_size``: Moesif types a
  metadata key by its name at any depth, and ``latencies.request`` is a number.

Pure functions of one parsed record; no Beam, no I/O.
"""

from __future__ import annotations

from typing import Any

from moesif_beam.transforms.common.errors import InvalidRecord, json_type
from moesif_beam.transforms.formats.gateway import (
    DEFAULT_OPTIONS,
    MappingOptions,
    build_event,
    header_map,
    identity,
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

__all__ = ["FORMAT", "split", "to_moesif_event"]

FORMAT = "kong"

_CONSUMED = (
    "started_at",
    "client_ip",
    "consumer",
    "authenticated_entity",
    "request.url",
    "request.method",
    "request.headers",
    "request.id",
    "response.status",
    "response.headers",
)


def split(value: Any) -> list[tuple[Any, str]]:
    """A line's records: the object itself, or each element of a batch array."""
    if isinstance(value, list):
        return [(item, f"[{index}]") for index, item in enumerate(value)]
    return [(value, "")]


def _part(record: dict, key: str) -> dict:
    part = record.get(key)
    if not isinstance(part, dict):
        msg = f"{key} must be an object" if key in record else f"missing {key}"
        raise InvalidRecord(msg, key, "object", None if part is None else json_type(part))
    return part


def _header(headers: dict[str, str], name: str) -> str | None:
    return next((value for key, value in headers.items() if key.lower() == name), None)


def _metadata(record: dict[str, Any]) -> dict[str, Any]:
    metadata = leftovers(record, _CONSUMED)
    # Flattened to request_size, latencies_proxy...: Moesif types a metadata key by its
    # name at any depth, and latencies.request (a number) would contradict the request
    # object, latencies.proxy Apigee's proxy name.
    for part in ("request", "response", "latencies"):
        rest = metadata.pop(part, None)
        if isinstance(rest, dict):
            metadata.update({f"{part}_{key}": value for key, value in rest.items()})
    return metadata


def to_moesif_event(
    value: Any, options: MappingOptions = DEFAULT_OPTIONS
) -> tuple[str, int, dict[str, Any]]:
    """Map one Kong log record to a Moesif API event.

    Returns:
        ``(transaction_id, request_time_ms, moesif_event)``.

    Raises:
        InvalidRecord: not an object, or ``started_at``, ``request`` (``url``,
            ``method``) or ``response.status`` missing or mistyped; names the field.
    """
    record = require_object(value, FORMAT)
    request_part = _part(record, "request")
    response_part = _part(record, "response")
    request_ms = time_ms(record.get("started_at"), "started_at")
    latencies = record.get("latencies")
    latency = None
    if isinstance(latencies, dict):
        latency = number(latencies.get("request"), "latencies.request")
    response_ms = response_time(request_ms, latency, "latencies.request")
    request_time, response_time_text = times(request_ms, response_ms)

    request: dict[str, Any] = {
        "time": request_time,
        "uri": require_str(request_part.get("url"), "request.url"),
        "verb": require_str(request_part.get("method"), "request.method").upper(),
        "headers": header_map(request_part.get("headers"), "request.headers"),
    }
    ip = optional_str(record.get("client_ip"), "client_ip")
    if ip:
        request["ip_address"] = ip
    response = {
        "time": response_time_text,
        "status": status(response_part.get("status"), "response.status"),
        "headers": header_map(response_part.get("headers"), "response.headers"),
    }
    consumer = record.get("consumer")
    user_id = None
    if isinstance(consumer, dict):
        user_id = next(
            (
                identity(consumer.get(key))
                for key in ("custom_id", "username", "id")
                if identity(consumer.get(key))
            ),
            None,
        )
    entity = record.get("authenticated_entity")
    session = entity.get("id") if isinstance(entity, dict) else None
    gateway_id = request_part.get("id")
    if identity(gateway_id) is None:
        # Before 3.x Kong logs no id; Moesif's plugin, where it ran, left its own header.
        gateway_id = _header(request["headers"], "x-moesif-transaction-id")
    return build_event(
        FORMAT,
        gateway_id,
        record,
        request=request,
        response=response,
        request_ms=request_ms,
        metadata=_metadata(record),
        roots=[record],
        options=options,
        user_id=user_id,
        session_token=session,
    )
