"""Every events mapping by name, and ``--format auto``: each record's format from its shape.

``auto`` unwraps what any format's records arrive in (JSON arrays, CloudWatch Logs and
Firehose wrappers, Azure's ``{"records": [...]}``), then decides per record by keys no
other format writes together (:func:`detect`). A record that matches no format is an
``invalid_record`` dead letter naming the formats tried. A record gets the same
``transaction_id`` under ``auto`` as under its own ``--format``.

Pure functions; no Beam, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moesif_beam.transforms.common.errors import InvalidRecord, json_type
from moesif_beam.transforms.formats import apigee, aws, azure, envoy, kong, nginx, tyk, wso2
from moesif_beam.transforms.formats.gateway import (
    DEFAULT_OPTIONS,
    MappingOptions,
    finish_identity,
)

__all__ = [
    "EVENT_MAPPINGS",
    "EVENT_SPLITS",
    "TRIED",
    "detect",
    "split",
    "to_moesif_event",
    "wso2_event",
]

EventMapping = Callable[[Any, MappingOptions], tuple[str, int, dict[str, Any]]]


def wso2_event(value: Any, options: MappingOptions = DEFAULT_OPTIONS) -> tuple[str, int, dict]:
    """WSO2's mapping with the identity options and header masking every format has.

    ``--company_id_field`` keeps WSO2's meaning (the top level, then ``properties``).
    """
    transaction_id, time_ms, event = wso2.to_moesif_event(value)
    props = value.get("properties") if isinstance(value, dict) else None
    roots = [value] if not isinstance(props, dict) else [value, props]
    finish_identity(event, roots, options)
    return transaction_id, time_ms, event


EVENT_MAPPINGS: dict[str, EventMapping] = {
    "wso2": wso2_event,
    "kong": kong.to_moesif_event,
    "aws": aws.to_moesif_event,
    "tyk": tyk.to_moesif_event,
    "azure": azure.to_moesif_event,
    "apigee": apigee.to_moesif_event,
    "envoy": envoy.to_moesif_event,
    "nginx": nginx.to_moesif_event,
}
TRIED = tuple(EVENT_MAPPINGS)

# The formats whose lines may hold several records (arrays, envelopes, wrappers).
EVENT_SPLITS = {"kong": kong.split, "aws": aws.split, "azure": azure.split}


def split(value: Any) -> list[tuple[Any, str]]:
    """A line's records out of any format's wrappers, each with its path in the line.

    Raises:
        NoRecords: the line holds only CloudWatch Logs control messages.
        ValueError: a wrapper's ``data`` is not base64 of JSON.
    """
    out: list[tuple[Any, str]] = []
    for item, at in aws.split(value):
        if isinstance(item, dict) and isinstance(item.get("records"), list):
            out.extend((r, f"{at}.{p}".lstrip(".")) for r, p in azure.split(item))
        else:
            out.append((item, at))
    return out


def _azure(record: dict[str, Any]) -> bool:
    keys = {key.lower() for key in record}
    if "properties" in keys:
        return bool(keys & {"calleripaddress", "correlationid", "operationname", "category"})
    return {"timegenerated", "responsecode", "correlationid"} <= keys


def detect(record: Any) -> str | None:
    """The events format whose shape ``record`` has, or None.

    A CloudWatch Logs event (``id``, ``timestamp`` and a string ``message``) is API
    Gateway's. A Cloud Logging entry is judged by its ``jsonPayload``.
    """
    if not isinstance(record, dict):
        return None
    payload = record.get("jsonPayload")
    if isinstance(payload, dict):
        return detect(payload)
    if isinstance(record.get("message"), str) and ("id" in record or "timestamp" in record):
        return "aws"
    checks: tuple[tuple[str, bool], ...] = (
        # WSO2 events also carry correlationId and properties (Azure's marks): one missing
        # its time is still WSO2's, known by its API's resource template.
        (
            "wso2",
            "apiMethod" in record
            and ("requestTimestamp" in record or "apiResourceTemplate" in record),
        ),
        ("kong", "started_at" in record and isinstance(record.get("request"), dict)),
        (
            "aws",
            "httpMethod" in record and ("requestId" in record or "extendedRequestId" in record),
        ),
        ("azure", _azure(record)),
        ("apigee", "messageid" in record and "verb" in record),
        ("envoy", "start_time" in record and "response_code" in record),
        ("nginx", "request_method" in record and ("msec" in record or "remote_addr" in record)),
        ("tyk", "response_code" in record and "method" in record and "timestamp" in record),
    )
    return next((name for name, matches in checks if matches), None)


def to_moesif_event(
    value: Any, options: MappingOptions = DEFAULT_OPTIONS
) -> tuple[str, int, dict[str, Any]]:
    """Map a record of any events format, recognised by its shape.

    Raises:
        InvalidRecord: the record matches no format (the detail names those tried), or
            fails its format's mapping (the detail starts with the format's name).
    """
    name = detect(value)
    if name is None:
        msg = f"matches no events format (tried {', '.join(TRIED)})"
        raise InvalidRecord(msg, "", "object", json_type(value))
    prefix = ""
    if name != "apigee" and isinstance(value, dict) and isinstance(value.get("jsonPayload"), dict):
        value, prefix = value["jsonPayload"], "jsonPayload"
    try:
        return EVENT_MAPPINGS[name](value, options)
    except InvalidRecord as exc:
        field = ".".join(part for part in (prefix, exc.field) if part)
        detail = f"as {name}: {exc.detail}"
        raise InvalidRecord(detail, field, exc.expected_type, exc.actual_type) from exc
