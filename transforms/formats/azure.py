"""Azure API Management GatewayLogs (diagnostic settings to Event Hub or storage) to Moesif.

Records arrive in a ``{"records": [...]}`` envelope. Event Hub JSON spells properties in
camelCase (``responseCode``), the Log Analytics table ``ApiManagementGatewayLogs`` in
PascalCase (``ResponseCode``) and flat (no ``properties``); both are read, keys matched
without regard to case. The mapping:

* times: ``time`` (``TimeGenerated``); the response at ``time + durationMs``
  (``TotalTime``);
* ``verb`` = ``method``; ``uri`` = ``url``; ``status`` = ``responseCode``; ``ip_address``
  = ``callerIpAddress``; headers and bodies from ``requestHeaders``/``responseHeaders`` and
  ``requestBody``/``responseBody`` when diagnostics log them;
* ``user_id`` = ``userId``; ``session_token`` = ``apimSubscriptionId``;
* ``transaction_id`` from ``correlationId``;
* everything else (api, operation, product, backend code and time, cache, errors,
  ``resourceId``...) is metadata, with the properties' keys at its top level.

Pure functions; no Beam, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moesif_beam.transforms.common.errors import InvalidRecord, json_type
from moesif_beam.transforms.formats.gateway import (
    DEFAULT_OPTIONS,
    MappingOptions,
    attach_body,
    build_event,
    header_map,
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

FORMAT = "azure"

_CONSUMED = frozenset(
    {
        "time",
        "timegenerated",
        "durationms",
        "totaltime",
        "method",
        "url",
        "responsecode",
        "calleripaddress",
        "userid",
        "apimsubscriptionid",
        "requestheaders",
        "responseheaders",
        "requestbody",
        "responsebody",
        "properties",
    }
)


def split(value: Any) -> list[tuple[Any, str]]:
    """A line's records: each of an envelope's ``records``, of an array, or the object."""
    if isinstance(value, dict) and isinstance(value.get("records"), list):
        return [(item, f"records[{index}]") for index, item in enumerate(value["records"])]
    if isinstance(value, list):
        return [(item, f"[{index}]") for index, item in enumerate(value)]
    return [(value, "")]


class _Fields:
    """Case-insensitive access to a record's properties, then its top level."""

    def __init__(self, record: dict[str, Any], props: dict[str, Any]) -> None:
        self._by_lower: dict[str, tuple[str, Any]] = {}
        for prefix, source in (("", record), ("properties.", props)):
            for key, value in source.items():
                self._by_lower[key.lower()] = (f"{prefix}{key}", value)

    def get(self, *names: str) -> tuple[Any, str]:
        """The first of ``names`` present, as ``(value, its path in the record)``."""
        for name in names:
            found = self._by_lower.get(name.lower())
            if found is not None and found[1] not in (None, ""):
                return found[1], found[0]
        return None, names[0]


def _leftovers(part: Mapping[str, Any]) -> dict[str, Any]:
    return leftovers(part, [k for k in part if k.lower() in _CONSUMED])


def to_moesif_event(
    value: Any, options: MappingOptions = DEFAULT_OPTIONS
) -> tuple[str, int, dict[str, Any]]:
    """Map one GatewayLogs record to a Moesif API event.

    Returns:
        ``(transaction_id, request_time_ms, moesif_event)``.

    Raises:
        InvalidRecord: not an object; ``properties`` not an object; ``time``, ``method``,
            ``url`` or ``responseCode`` missing or mistyped. Names the field.
    """
    record = require_object(value, FORMAT)
    props: Any = next((v for k, v in record.items() if k.lower() == "properties"), {})
    if props is None:
        props = {}
    if not isinstance(props, dict):
        msg = "properties must be an object"
        raise InvalidRecord(msg, "properties", "object", json_type(props))
    fields = _Fields(record, props)

    request_ms = time_ms(*fields.get("time", "TimeGenerated"))
    duration, where = fields.get("durationMs", "TotalTime")
    response_ms = response_time(request_ms, number(duration, where), where)
    request_time, response_time_text = times(request_ms, response_ms)

    request: dict[str, Any] = {
        "time": request_time,
        "uri": require_str(*fields.get("url")),
        "verb": require_str(*fields.get("method")).upper(),
        "headers": header_map(*fields.get("requestHeaders")),
    }
    ip = optional_str(*fields.get("callerIpAddress"))
    if ip:
        request["ip_address"] = ip
    attach_body(request, fields.get("requestBody")[0])
    response: dict[str, Any] = {
        "time": response_time_text,
        "status": status(*fields.get("responseCode")),
        "headers": header_map(*fields.get("responseHeaders")),
    }
    attach_body(response, fields.get("responseBody")[0])

    metadata = _leftovers(record)
    metadata.update(_leftovers(props))
    return build_event(
        FORMAT,
        fields.get("correlationId")[0],
        record,
        request=request,
        response=response,
        request_ms=request_ms,
        metadata=metadata,
        roots=[props, record],
        options=options,
        user_id=fields.get("userId")[0],
        session_token=fields.get("apimSubscriptionId")[0],
    )
