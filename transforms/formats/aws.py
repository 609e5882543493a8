"""AWS API Gateway (REST) access logs, in the JSON layout Moesif documents, to Moesif.

Values are strings in these logs (``"200"``, ``"87"``): numbers are converted, and ``"-"``
means absent. The mapping:

* times: ``requestTimeEpoch`` (ms), else ``requestTime`` (CLF ``30/Jun/2026:12:00:00
  +0000``); the response at request time + ``durationMs`` (or ``responseLatency``);
* ``uri`` = ``https://{requestHostHeader}{path}`` (``domainName`` and ``resourcePath``
  stand in); ``verb`` = ``httpMethod``; ``status``; ``ip_address`` = ``ip`` (or
  ``sourceIp``); ``User-Agent`` and ``Host`` from their ``request*Header`` keys;
* ``user_id`` = the first present of ``user``, ``apiKeyId``, ``principalId``,
  ``cognitoIdentityId``, ``caller``; ``company_id`` = ``companyId``;
* ``transaction_id`` from ``extendedRequestId`` (API Gateway's own; clients cannot set
  it), else ``requestId`` (a client may choose its own, so it is the second choice), else
  the CloudWatch log event's ``id``;
* everything else is metadata, with ``apiKey`` (the key itself) masked.

The same format reads the wrappers these records arrive in: CloudWatch Logs subscription
payloads (gzip + base64, as a Kinesis record, a Lambda's ``awslogs.data`` or already
decoded; ``CONTROL_MESSAGE`` payloads are skipped), Firehose transformation input and
Firehose HTTP-endpoint bodies (``records[].data``, base64, holding one object, an array,
NDJSON or a CloudWatch payload), and Firehose-to-S3 objects (concatenated JSON values).

Pure functions; no Beam, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import json
import re
import zlib
from typing import Any

import orjson

from moesif_beam.transforms.common.errors import InvalidRecord, json_type
from moesif_beam.transforms.common.timefmt import check_time_ms
from moesif_beam.transforms.formats.gateway import (
    DEFAULT_OPTIONS,
    MappingOptions,
    NoRecords,
    build_event,
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

__all__ = ["FORMAT", "MAX_DECODED_BYTES", "decode_line", "split", "to_moesif_event"]

FORMAT = "aws"

# A gzip payload may not inflate beyond this: a small line must not become gigabytes.
MAX_DECODED_BYTES = 64 * 1024 * 1024

_USER_KEYS = ("user", "apiKeyId", "principalId", "cognitoIdentityId", "caller")
_CONSUMED = (
    "requestTimeEpoch",
    "requestTime",
    "durationMs",
    "responseLatency",
    "requestHostHeader",
    "domainName",
    "path",
    "httpMethod",
    "status",
    "ip",
    "sourceIp",
    "requestUserAgentHeader",
    "companyId",
)
_SECRETS = ("apiKey",)
_BASE64 = re.compile(rb"[A-Za-z0-9+/=\r\n]+")
_GZIP_MAGIC = b"\x1f\x8b"
_MONTHS = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
        start=1,
    )
}
_CLF = re.compile(r"(\d{2})/([A-Z][a-z]{2})/(\d{4}):(\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})")


# -- wrappers -----------------------------------------------------------------------------


def _inflate(data: bytes) -> bytes:
    if data[:2] != _GZIP_MAGIC:
        return data
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = inflater.decompress(data, MAX_DECODED_BYTES)
    if inflater.unconsumed_tail:
        msg = f"gzip payload inflates beyond {MAX_DECODED_BYTES:,} bytes"
        raise ValueError(msg)
    return out


def _json_values(data: bytes) -> list[Any]:
    """Every JSON value in ``data``: one value, NDJSON, or values written back to back."""
    try:
        return [orjson.loads(data)]
    except orjson.JSONDecodeError:
        pass
    text = data.decode("utf-8")
    decoder = json.JSONDecoder()
    values: list[Any] = []
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index == len(text):
            return values
        value, index = decoder.raw_decode(text, index)
        values.append(value)


def _decode_data(data: Any) -> list[Any]:
    if not isinstance(data, str):
        msg = "a wrapper's data must be a base64 string"
        raise ValueError(msg)
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError) as exc:
        msg = "a wrapper's data is not base64"
        raise ValueError(msg) from exc
    return _json_values(_inflate(raw))


def decode_line(raw: bytes) -> Any:
    """The JSON a line that is not one JSON value holds, or None when it holds none.

    Handles a line of base64 (a Kinesis record of a CloudWatch Logs subscription: gzip
    inside) and a line of JSON values written back to back (Firehose to S3).

    Raises:
        ValueError: the line looks like base64 but does not decode to JSON.
    """
    stripped = raw.strip()
    if stripped[:1] in (b"{", b"["):
        try:
            values = _json_values(stripped)
        except ValueError:
            return None  # broken JSON: the JSON parser's own complaint says it best
        return values if len(values) > 1 else None
    if stripped and _BASE64.fullmatch(stripped):
        values = _decode_data(stripped.decode("ascii"))
        return values[0] if len(values) == 1 else values
    return None


def split(value: Any) -> list[tuple[Any, str]]:
    """A line's access-log records, out of any wrapper, each with its path in the line.

    Raises:
        NoRecords: the line holds only CloudWatch ``CONTROL_MESSAGE`` payloads.
        ValueError: a wrapper's ``data`` is not base64 of JSON.
    """
    skipped: list[str] = []
    items = _unwrap(value, "", skipped)
    if not items and skipped:
        msg = "a CloudWatch Logs control message"
        raise NoRecords(msg)
    return [(item, at.lstrip(".")) for item, at in items]


def _unwrap(value: Any, at: str, skipped: list[str]) -> list[tuple[Any, str]]:
    if isinstance(value, list):
        out: list[tuple[Any, str]] = []
        for index, item in enumerate(value):
            out.extend(_unwrap(item, f"{at}[{index}]", skipped))
        return out
    if not isinstance(value, dict):
        return [(value, at)]
    awslogs = value.get("awslogs")
    if isinstance(awslogs, dict) and "data" in awslogs:
        return _unwrap(_decode_data(awslogs["data"]), f"{at}.awslogs.data", skipped)
    if "logEvents" in value and "messageType" in value:
        if value["messageType"] == "CONTROL_MESSAGE":
            skipped.append(at)
            return []
        events = value["logEvents"]
        if not isinstance(events, list):
            return [(value, at)]
        return [(event, f"{at}.logEvents[{index}]") for index, event in enumerate(events)]
    records = value.get("records")
    if (
        isinstance(records, list)
        and records
        and all(isinstance(r, dict) and "data" in r for r in records)
    ):
        out = []
        for index, record in enumerate(records):
            decoded = _decode_data(record["data"])
            where = f"{at}.records[{index}].data"
            out.extend(_unwrap(decoded[0] if len(decoded) == 1 else decoded, where, skipped))
        return out
    return [(value, at)]


# -- the mapping --------------------------------------------------------------------------


def _message(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        msg = "the log event's message is not a JSON access log line"
        raise InvalidRecord(msg, "message", "object", "string") from None


def _request_ms(record: dict) -> int:
    epoch = record.get("requestTimeEpoch")
    if epoch not in (None, "", "-"):
        return time_ms(epoch, "requestTimeEpoch")
    text = record.get("requestTime")
    if isinstance(text, str):
        match = _CLF.fullmatch(text.strip())
        if match and match[2] in _MONTHS:
            return _clf_ms(match)
    return time_ms(text, "requestTime")


def _clf_ms(match: re.Match[str]) -> int:
    day, month, year = int(match[1]), _MONTHS[match[2]], int(match[3])
    hour, minute, second = int(match[4]), int(match[5]), int(match[6])
    offset = (int(match[8]) * 60 + int(match[9])) * (1 if match[7] == "+" else -1)
    try:
        seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
        return check_time_ms((seconds - offset * 60) * 1000)
    except (ValueError, OverflowError) as exc:
        msg = f"requestTime is not a time: {exc}"
        raise InvalidRecord(msg, "requestTime", "string", "string") from exc


def to_moesif_event(
    value: Any, options: MappingOptions = DEFAULT_OPTIONS
) -> tuple[str, int, dict[str, Any]]:
    """Map one API Gateway access-log record to a Moesif API event.

    Args:
        value: the record (an object), its line as a string (a CloudWatch ``message``), or
            a CloudWatch log event ``{id, timestamp, message}``.
        options: identity fields and masked headers.

    Returns:
        ``(transaction_id, request_time_ms, moesif_event)``.

    Raises:
        InvalidRecord: the message is not JSON, or a time, ``httpMethod``, ``status`` or a
            uri source is missing or mistyped; names the field.
    """
    event_id = None
    if isinstance(value, str):
        value = _message(value)
    elif isinstance(value, dict) and isinstance(value.get("message"), str):
        event_id = value.get("id")
        value = _message(value["message"])
    record = require_object(value, FORMAT)

    request_ms = _request_ms(record)
    latency = number(record.get("durationMs"), "durationMs")
    if latency is None:
        latency = number(record.get("responseLatency"), "responseLatency")
    response_ms = response_time(request_ms, latency, "durationMs")
    request_time, response_time_text = times(request_ms, response_ms)

    host = optional_str(record.get("requestHostHeader"), "requestHostHeader") or optional_str(
        record.get("domainName"), "domainName"
    )
    path = optional_str(record.get("path"), "path") or optional_str(
        record.get("resourcePath"), "resourcePath"
    )
    if path is None:
        msg = "missing path (and resourcePath)"
        raise InvalidRecord(msg, "path")
    headers: dict[str, str] = {}
    if host:
        headers["Host"] = host
    agent = optional_str(record.get("requestUserAgentHeader"), "requestUserAgentHeader")
    if agent:
        headers["User-Agent"] = agent
    request: dict[str, Any] = {
        "time": request_time,
        "uri": f"https://{host}{path}" if host else path,
        "verb": require_str(record.get("httpMethod"), "httpMethod").upper(),
        "headers": headers,
    }
    ip = optional_str(record.get("ip"), "ip") or optional_str(record.get("sourceIp"), "sourceIp")
    if ip:
        request["ip_address"] = ip
    response = {
        "time": response_time_text,
        "status": status(record.get("status"), "status"),
        "headers": {},
    }
    user_id = next((identity(record[k]) for k in _USER_KEYS if identity(record.get(k))), None)
    gateway_id = next(
        (
            record[k]
            for k in ("extendedRequestId", "requestId")
            if identity(record.get(k)) is not None
        ),
        event_id,
    )
    if gateway_id is not None and not isinstance(gateway_id, str | int):
        msg = "the request id must be a string"
        raise InvalidRecord(msg, "requestId", "string", json_type(gateway_id))
    return build_event(
        FORMAT,
        gateway_id,
        record,
        request=request,
        response=response,
        request_ms=request_ms,
        metadata=leftovers(record, _CONSUMED, masked=_SECRETS, drop_dashes=True),
        roots=[record],
        options=options,
        user_id=user_id,
        company_id=record.get("companyId"),
    )
