"""The gateway mappings as pure functions, on the reference's examples (no pipeline)."""

from __future__ import annotations

import base64
import gzip
import json
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from moesif_beam.runners import cli
from moesif_beam.transforms.common.errors import InvalidRecord
from moesif_beam.transforms.formats import auto
from moesif_beam.transforms.formats.gateway import (
    GATEWAY_NAMESPACE,
    MASK,
    SENSITIVE_PARAMS,
    MappingOptions,
    NoRecords,
    jwt_claim,
    mask_query,
    transaction_id,
)
from moesif_beam.transforms.formats.normalize import FORMATS
from tests.unit.gateway_examples import (
    APIGEE,
    APIGEE_ENTRY,
    AWS,
    AZURE,
    ENVOY,
    EXAMPLES,
    KONG,
    NGINX,
    TYK,
)

DEFAULT = MappingOptions()


def mapped(fmt: str, line: bytes, options: MappingOptions = DEFAULT) -> list[dict[str, Any]]:
    """Every event one line maps to, as NormalizeRecords would map them."""
    spec = FORMATS["events"][fmt]
    return [spec.to_moesif(item, options)[2] for item, _ in spec.split(spec.parse(line))]


def one(fmt: str, line: bytes, options: MappingOptions = DEFAULT) -> dict[str, Any]:
    (event,) = mapped(fmt, line, options)
    return event


def edited(line: bytes, **changes: Any) -> bytes:
    record = json.loads(line)
    for key, value in changes.items():
        if value is None:
            record.pop(key)
        else:
            record[key] = value
    return json.dumps(record).encode()


def _jwt(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


def test_kong_example():
    event = one("kong", KONG)
    assert event["request"] == {
        "time": "2025-06-30T12:00:00.123Z",
        "uri": "https://api.acme.io:443/v1/orders?x=1",
        "verb": "POST",
        "headers": {
            "host": "api.acme.io",
            "user-agent": "curl/8.5",
            "content-type": "application/json",
        },
        "ip_address": "203.0.113.9",
    }
    assert event["response"]["time"] == "2025-06-30T12:00:00.216Z"  # + latencies.request
    assert event["response"]["status"] == 201
    assert (event["user_id"], event["session_token"]) == ("u_8812", "cred-77")
    assert event["transaction_id"] == str(
        uuid.uuid5(GATEWAY_NAMESPACE, "kong:2f6946328ffc4946b8c9120704a4a155")
    )
    metadata = event["metadata"]
    assert metadata["route"] == {"id": "0f1a", "name": "orders"}
    assert metadata["service"]["name"] == "orders-svc"
    assert metadata["workspace_name"] == "default"
    assert metadata["latencies_proxy"] == 88
    assert metadata["request_querystring"] == {"x": "1"}
    assert (metadata["request_size"], metadata["response_size"]) == (412, 310)
    assert "request" not in metadata  # latencies.request is a number: one type per key name
    assert "consumer" not in metadata and "started_at" not in metadata


@pytest.mark.parametrize(
    ("consumer", "expected"),
    [({"id": "c9", "username": "app"}, "app"), ({"id": "c9"}, "c9"), (None, None)],
)
def test_kong_user_falls_back_from_custom_id_to_username_to_id(consumer, expected):
    event = one("kong", edited(KONG, consumer=consumer))
    assert event.get("user_id") == expected


def test_kong_without_request_id_uses_moesif_header_else_content():
    record = json.loads(KONG)
    del record["request"]["id"]
    assert one("kong", json.dumps(record).encode())["transaction_id"] == str(
        uuid.uuid5(
            GATEWAY_NAMESPACE,
            "kong:content:" + orjson.dumps(record, option=orjson.OPT_SORT_KEYS).decode(),
        )
    )
    record["request"]["headers"]["X-Moesif-Transaction-Id"] = "0f3c5a2e-1111-4222-8333-444455556666"
    event = one("kong", json.dumps(record).encode())
    assert event["transaction_id"] == "0f3c5a2e-1111-4222-8333-444455556666"


def test_kong_batch_array_is_one_record_per_element():
    events = mapped("kong", b"[" + KONG + b"," + edited(KONG, started_at=1751284900000) + b"]")
    assert [e["request"]["time"] for e in events] == [
        "2025-06-30T12:00:00.123Z",
        "2025-06-30T12:01:40.000Z",
    ]


def test_aws_example_converts_strings_and_dashes():
    event = one("aws", AWS)
    assert event["request"]["uri"] == "https://api.acme.io/prod/orders/42"
    assert event["request"]["verb"] == "GET"
    assert event["request"]["ip_address"] == "203.0.113.9"
    assert event["request"]["time"] == "2026-06-30T12:00:00.000Z"
    assert event["response"] == {"time": "2026-06-30T12:00:00.087Z", "status": 200, "headers": {}}
    # user and caller are "-": the first present of the list is apiKeyId
    assert event["user_id"] == "k2m4n6"
    assert event["company_id"] == "acme-corp"
    # extendedRequestId: API Gateway's own (a client can choose requestId)
    assert event["transaction_id"] == str(uuid.uuid5(GATEWAY_NAMESPACE, "aws:Kx9qHFr2IAMEbCw="))
    assert "caller" not in event["metadata"] and event["metadata"]["responseLength"] == "512"


def test_aws_clf_request_time_and_request_id_fallback():
    line = edited(AWS, requestTimeEpoch="-", extendedRequestId=None)
    event = one("aws", line)
    assert event["request"]["time"] == "2026-06-30T12:00:00.000Z"
    assert event["transaction_id"] == "7d3f9c1e-2b4a-4c8e-9f10-3a5b6c7d8e9f"  # a UUID, kept


def test_aws_api_key_never_reaches_metadata():
    event = one("aws", edited(AWS, apiKey="live_secret_key"))
    assert event["metadata"]["apiKey"] == MASK
    assert b"live_secret_key" not in orjson.dumps(event)


def _cloudwatch(messages: list[str], kind: str = "DATA_MESSAGE") -> dict[str, Any]:
    return {
        "messageType": kind,
        "owner": "1",
        "logGroup": "g",
        "logStream": "s",
        "subscriptionFilters": ["f"],
        "logEvents": [
            {"id": f"e{i}", "timestamp": 1, "message": m} for i, m in enumerate(messages)
        ],
    }


def _gzip64(value: Any) -> bytes:
    return base64.b64encode(gzip.compress(json.dumps(value).encode()))


def test_aws_cloudwatch_subscription_payload_gzip_base64():
    other = edited(AWS, extendedRequestId="other", durationMs="5").decode()
    line = _gzip64(_cloudwatch([AWS.decode(), other]))
    events = mapped("aws", line)
    assert [e["transaction_id"] for e in events] == [
        one("aws", AWS)["transaction_id"],
        str(uuid.uuid5(GATEWAY_NAMESPACE, "aws:other")),
    ]
    # the same payload as a Lambda receives it, and already decoded
    lambda_line = json.dumps({"awslogs": {"data": line.decode()}}).encode()
    assert mapped("aws", lambda_line) == events
    assert mapped("aws", json.dumps(_cloudwatch([AWS.decode(), other])).encode()) == events


def test_aws_cloudwatch_control_message_is_skipped():
    spec = FORMATS["events"]["aws"]
    line = _gzip64(_cloudwatch(["CWL CONTROL MESSAGE: Checking health"], "CONTROL_MESSAGE"))
    with pytest.raises(NoRecords):
        spec.split(spec.parse(line))


def test_aws_log_event_that_is_not_json_names_message():
    spec = FORMATS["events"]["aws"]
    items = spec.split(spec.parse(_gzip64(_cloudwatch(["GET /x 200"]))))
    with pytest.raises(InvalidRecord) as caught:
        spec.to_moesif(items[0][0], DEFAULT)
    assert caught.value.field == "message"
    assert items[0][1] == "logEvents[0]"


def test_aws_firehose_records_hold_objects_ndjson_or_cloudwatch():
    ndjson = AWS + b"\n" + edited(AWS, extendedRequestId="b") + b"\n"
    firehose = {
        "invocationId": "i",
        "records": [
            {"recordId": "1", "data": base64.b64encode(ndjson).decode()},
            {"recordId": "2", "data": _gzip64(_cloudwatch([AWS.decode()])).decode()},
        ],
    }
    spec = FORMATS["events"]["aws"]
    items = spec.split(spec.parse(json.dumps(firehose).encode()))
    assert [at for _, at in items] == [
        "records[0].data[0]",
        "records[0].data[1]",
        "records[1].data.logEvents[0]",
    ]
    # the HTTP endpoint's body has the same records
    body = {"requestId": "r", "timestamp": 1, "records": [{"data": firehose["records"][0]["data"]}]}
    assert len(mapped("aws", json.dumps(body).encode())) == 2


def test_aws_firehose_to_s3_objects_are_values_back_to_back():
    assert len(mapped("aws", AWS + edited(AWS, extendedRequestId="b"))) == 2


def test_tyk_example_parses_the_raw_request():
    event = one("tyk", TYK)
    request = event["request"]
    assert request["uri"] == "https://api.acme.io/orders"  # the raw request line's target
    assert request["headers"] == {"Host": "api.acme.io", "User-Agent": "curl/8.5"}
    assert (request["body"], request["transfer_encoding"]) == ({}, "json")
    assert (request["api_version"], request["ip_address"]) == ("v1", "203.0.113.9")
    assert event["response"]["time"] == "2026-06-30T12:00:00.216Z"  # + request_time_ms
    assert (event["user_id"], event["session_token"]) == ("u_8812", "5f3a")
    assert event["metadata"] == {
        "api_name": "Orders",
        "api_id": "b7e1",
        "org_id": "5e9d",
        "content_length": 42,
    }


def test_tyk_has_no_id_so_the_content_decides():
    first = one("tyk", TYK)["transaction_id"]
    assert first == one("tyk", TYK)["transaction_id"]
    assert first != one("tyk", edited(TYK, request_time_ms=94))["transaction_id"]
    uuid.UUID(first)


def test_tyk_non_json_body_is_base64_and_secret_headers_masked():
    raw = b"POST /x?a=1 HTTP/1.1\r\nAuthorization: Basic dTpw\r\nCookie: s=1\r\n\r\nplain text"
    event = one("tyk", edited(TYK, raw_request=base64.b64encode(raw).decode()))
    request = event["request"]
    assert request["uri"] == "https://api.acme.io/x?a=1"
    assert request["headers"]["Authorization"] == request["headers"]["Cookie"] == MASK
    assert request["transfer_encoding"] == "base64"
    assert base64.b64decode(request["body"]) == b"plain text"


def test_azure_example_in_its_envelope():
    event = one("azure", AZURE)
    assert event["request"]["uri"] == "https://acme-apim.azure-api.net/orders/42"
    assert event["request"]["time"] == "2026-06-30T12:00:00.123Z"
    assert event["response"]["time"] == "2026-06-30T12:00:00.214Z"  # + durationMs
    assert event["response"]["status"] == 200
    assert event["request"]["ip_address"] == "203.0.113.9"
    assert (event["user_id"], event["session_token"]) == ("u_8812", "sub-acme-01")
    assert event["transaction_id"] == "3c2f7a1e-8d4b-4b7e-a0f2-5e6d7c8b9a01"
    assert event["metadata"]["backendTime"] == 71
    assert event["metadata"]["category"] == "GatewayLogs"
    assert "properties" not in event["metadata"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer t", "Accept": "*/*"},
        '{"Authorization": "Bearer t", "Accept": "*/*"}',
        "Authorization:Bearer t;;Accept:*/*",
        "Authorization: Bearer t\r\nAccept: */*",
    ],
)
def test_azure_headers_as_object_json_or_text(headers):
    envelope = json.loads(AZURE)
    envelope["records"][0]["properties"]["requestHeaders"] = headers
    event = one("azure", json.dumps(envelope).encode())
    assert event["request"]["headers"] == {"Authorization": MASK, "Accept": "*/*"}


def test_azure_pascal_case_properties_map_alike():
    envelope = json.loads(AZURE)
    record = envelope["records"][0]
    record["properties"] = {k[0].upper() + k[1:]: v for k, v in record["properties"].items()}
    event = one("azure", json.dumps(envelope).encode())
    camel = one("azure", AZURE)
    assert event["request"] == camel["request"]
    assert event["response"] == camel["response"]
    assert event["user_id"] == camel["user_id"]


def test_apigee_example_alone_and_in_a_cloud_logging_entry():
    event = one("apigee", APIGEE)
    assert event["request"]["uri"] == "https://api.acme.io/v1/orders/42?expand=items"
    assert (event["request"]["time"], event["response"]["time"]) == (
        "2026-06-30T12:00:00.123Z",
        "2026-06-30T12:00:00.214Z",
    )
    assert (event["user_id"], event["company_id"], event["session_token"]) == (
        "ana@acme.io",
        "acme-mobile",
        "Ab12Cd34",
    )
    assert event["metadata"] == {
        "messageid": "rrt-0b1c2d3e4f-12345-1",
        "proxy": "orders-v1",
        "rev": "7",
        "env": "prod",
        "org": "acme",
        "target_ms": 71,
        "product": "orders-gold",
    }
    assert one("apigee", APIGEE_ENTRY) == event


def test_apigee_entry_without_messageid_uses_insert_id():
    entry = json.loads(APIGEE_ENTRY)
    del entry["jsonPayload"]["messageid"]
    event = one("apigee", json.dumps(entry).encode())
    assert event["transaction_id"] == str(uuid.uuid5(GATEWAY_NAMESPACE, "apigee:1x2y3z"))


def test_envoy_example():
    event = one("envoy", ENVOY)
    assert event["request"]["uri"] == "https://api.acme.io/v1/orders"
    assert event["request"]["ip_address"] == "203.0.113.9"
    assert event["response"]["time"] == "2026-06-30T12:00:00.216Z"
    assert event["transaction_id"] == "9b1d7f3a-52c4-4c8e-8a1f-0e2d3c4b5a69"
    assert event["metadata"]["upstream_cluster"] == "outbound|8080||orders"
    assert "response_flags" not in event["metadata"]  # "-" is unset


@pytest.mark.parametrize(
    ("remote", "expected"),
    [("198.51.100.7:51234", "198.51.100.7"), ("[2001:db8::1]:443", "2001:db8::1")],
)
def test_envoy_ip_without_forwarded_for_is_the_remote_address_without_port(remote, expected):
    event = one("envoy", edited(ENVOY, x_forwarded_for="-", downstream_remote_address=remote))
    assert event["request"]["ip_address"] == expected


def test_nginx_example():
    event = one("nginx", NGINX)
    assert event["request"]["uri"] == "https://api.acme.io/v1/orders/42?expand=items"
    assert (event["request"]["time"], event["response"]["time"]) == (
        "2026-06-30T12:00:00.123Z",
        "2026-06-30T12:00:00.216Z",
    )
    assert event["response"]["status"] == 200
    assert event["request"]["ip_address"] == "203.0.113.9"
    assert event["request"]["headers"] == {
        "x-forwarded-for": "203.0.113.9",
        "user-agent": "curl/8.5",
        "x-api-key": MASK,
    }
    assert event["transaction_id"] == str(
        uuid.uuid5(GATEWAY_NAMESPACE, "nginx:4f9c2b7e1a3d5f60718293a4b5c6d7e8")
    )
    assert event["metadata"] == {
        "body_bytes_sent": "812",
        "upstream_response_time": "0.088",
        "upstream_addr": "10.0.3.17:8080",
    }


def test_nginx_forwarded_for_dash_means_remote_addr():
    event = one("nginx", edited(NGINX, http_x_forwarded_for="-"))
    assert event["request"]["ip_address"] == "10.0.0.5"


# -- rules every format shares ------------------------------------------------------------


def test_ids_uuid_kept_others_derived_per_format():
    assert transaction_id("envoy", "9B1D7F3A-52C4-4C8E-8A1F-0E2D3C4B5A69", {}) == (
        "9B1D7F3A-52C4-4C8E-8A1F-0E2D3C4B5A69"
    )
    assert transaction_id("kong", "abc", {}) != transaction_id("nginx", "abc", {})
    assert transaction_id("kong", "abc", {}) == transaction_id("kong", "abc", {"other": 1})
    assert transaction_id("tyk", None, {"a": 1, "b": 2}) == transaction_id(
        "tyk", "-", {"b": 2, "a": 1}
    )


@pytest.mark.parametrize("fmt", sorted(EXAMPLES))
def test_auto_detects_every_example_and_gives_the_same_ids(fmt):
    line = EXAMPLES[fmt]
    assert mapped("auto", line) == mapped(fmt, line)


def test_auto_names_the_formats_tried():
    spec = FORMATS["events"]["auto"]
    with pytest.raises(InvalidRecord, match="matches no events format") as caught:
        spec.to_moesif({"event": "deploy"}, DEFAULT)
    assert all(name in caught.value.detail for name in auto.TRIED)
    with pytest.raises(InvalidRecord, match=r"as kong: missing request\.url"):
        spec.to_moesif(json.loads(KONG.replace(b'"url"', b'"uri_"')), DEFAULT)


@pytest.mark.parametrize(
    ("fmt", "line", "field", "actual"),
    [
        ("kong", edited(KONG, started_at=None), "started_at", None),
        ("kong", edited(KONG, response=[]), "response", "array"),
        ("aws", edited(AWS, httpMethod=None), "httpMethod", None),
        ("aws", edited(AWS, status="teapot"), "status", "string"),
        ("tyk", edited(TYK, timestamp="yesterday"), "timestamp", "string"),
        ("tyk", edited(TYK, raw_request="%%%"), "raw_request", "string"),
        (
            "azure",
            AZURE.replace(b'"responseCode":200', b'"responseCode":"x"'),
            "properties.responseCode",
            "string",
        ),
        (
            "azure",
            AZURE.replace(b'"properties":{', b'"properties":[{').replace(b"}}]}", b"}]}]}"),
            "properties",
            "array",
        ),
        ("apigee", edited(APIGEE, verb=7), "verb", "number"),
        ("envoy", edited(ENVOY, start_time=None), "start_time", None),
        ("envoy", edited(ENVOY, duration=1e12), "duration", "number"),
        ("nginx", edited(NGINX, msec="soon"), "msec", "string"),
        ("nginx", edited(NGINX, status="2OO"), "status", "string"),
    ],
)
def test_bad_records_name_the_field(fmt, line, field, actual):
    spec = FORMATS["events"][fmt]
    ((item, _),) = spec.split(spec.parse(line))
    with pytest.raises(InvalidRecord) as caught:
        spec.to_moesif(item, DEFAULT)
    assert caught.value.field == field
    assert caught.value.actual_type == actual


def test_apigee_field_inside_an_entry_is_named_with_its_path():
    spec = FORMATS["events"]["apigee"]
    entry = json.loads(APIGEE_ENTRY)
    del entry["jsonPayload"]["uri"]
    with pytest.raises(InvalidRecord) as caught:
        spec.to_moesif(entry, DEFAULT)
    assert caught.value.field == "jsonPayload.uri"


def test_identity_options_take_a_field_or_a_header():
    options = MappingOptions(
        user_id_field="consumer.username",
        company_id_field="header:X-Company",
        session_token_field="route.name",
    )
    line = KONG.replace(b'"host":"api.acme.io"', b'"host":"api.acme.io","x-company":"globex"')
    event = one("kong", line, options)
    assert (event["user_id"], event["company_id"], event["session_token"]) == (
        "acme-app",
        "globex",
        "orders",
    )
    # a field the record lacks leaves the gateway's own value
    assert one("kong", KONG, MappingOptions(user_id_field="nope"))["user_id"] == "u_8812"
    nginx = one("nginx", NGINX, MappingOptions(session_token_field="header:x-api-key"))
    assert nginx["session_token"] == "key_3f9a"
    assert nginx["request"]["headers"]["x-api-key"] == MASK


def test_user_id_from_a_bearer_jwt_claim_decoded_not_verified():
    token = _jwt({"sub": "jwt-user", "org": {"id": 7}})
    line = NGINX.replace(b'"http_x_api_key"', f'"http_authorization":"Bearer {token}","k"'.encode())
    event = one("nginx", line, MappingOptions(user_id_jwt_claim="sub"))
    assert event["user_id"] == "jwt-user"
    assert event["request"]["headers"]["authorization"] == MASK
    assert token.encode() not in orjson.dumps(event)
    assert jwt_claim({"Authorization": f"Bearer {token}"}, "org.id") == "7"
    # --user_id_field wins over the claim; a token that does not decode is ignored
    assert (
        one("nginx", line, MappingOptions(user_id_field="host", user_id_jwt_claim="sub"))["user_id"]
        == "api.acme.io"
    )
    for broken in ("Bearer x.y", "Bearer a.!!!.c", "Basic dTpw", f"Bearer {token[:-40]}"):
        assert jwt_claim({"authorization": broken}, "sub") is None


def test_masking_is_on_by_default_and_can_be_changed():
    line = KONG.replace(
        b'"host":"api.acme.io"',
        b'"host":"api.acme.io","Authorization":"Bearer abc","cookie":"sid=1","x-trace":"t"',
    )
    headers = one("kong", line)["request"]["headers"]
    assert headers["Authorization"] == headers["cookie"] == MASK
    assert headers["x-trace"] == "t"
    kept = one("kong", line, MappingOptions(mask_headers=()))["request"]["headers"]
    assert kept["Authorization"] == "Bearer abc"
    custom = one("kong", line, MappingOptions(mask_headers=("X-Trace",)))["request"]["headers"]
    assert (custom["x-trace"], custom["cookie"]) == (MASK, "sid=1")


def test_wso2_gets_the_same_options():
    from tests.fixtures import RESPONSE_EVENT

    event = dict(RESPONSE_EVENT)
    event["properties"] = {
        **event.get("properties", {}),
        "requestHeaders": {"Authorization": "Bearer x", "X-Tenant": "t1"},
    }
    options = MappingOptions(company_id_field="header:x-tenant")
    mapped_event = FORMATS["events"]["wso2"].to_moesif(event, options)[2]
    assert mapped_event["company_id"] == "t1"
    assert mapped_event["request"]["headers"]["Authorization"] == MASK


KEY = "key_0123456789abcdef"  # a secret: must not reach Moesif anywhere in an event


def _azure_with(**properties: Any) -> bytes:
    envelope = json.loads(AZURE)
    envelope["records"][0]["properties"].update(properties)
    return json.dumps(envelope).encode()


def test_azure_backend_headers_in_metadata_are_masked():
    line = _azure_with(
        backendRequestHeaders={
            "Authorization": "Bearer t0ps3cret",
            "Ocp-Apim-Subscription-Key": KEY,
            "Accept": "*/*",
        },
        backendResponseHeaders="Set-Cookie: sid=s3ss10n\r\nContent-Type: application/json",
    )
    metadata = one("azure", line)["metadata"]
    assert metadata["backendRequestHeaders"] == {
        "Authorization": MASK,
        "Ocp-Apim-Subscription-Key": MASK,
        "Accept": "*/*",
    }
    # header text stays text, in its own layout
    assert metadata["backendResponseHeaders"] == (
        f"Set-Cookie: {MASK}\r\nContent-Type: application/json"
    )
    # the Log Analytics spelling, JSON text and Moesif's ";;" layout alike
    pascal = one(
        "azure",
        _azure_with(
            BackendRequestHeaders=json.dumps({"authorization": f"Bearer {KEY}", "X-Id": "1"}),
            BackendResponseHeaders=f"Set-Cookie:{KEY};;Vary:Accept",
        ),
    )["metadata"]
    assert json.loads(pascal["BackendRequestHeaders"]) == {"authorization": MASK, "X-Id": "1"}
    assert pascal["BackendResponseHeaders"] == f"Set-Cookie:{MASK};;Vary:Accept"
    for event in (one("azure", line), one("azure", _azure_with(backendRequestHeaders="x"))):
        assert KEY.encode() not in orjson.dumps(event)
        assert b"t0ps3cret" not in orjson.dumps(event) and b"s3ss10n" not in orjson.dumps(event)


def test_kong_apikey_in_the_query_is_masked_in_uri_and_metadata():
    # key-auth with key_in_query: the key rides in the URL Kong logs four times over
    record = json.loads(KONG)
    target = f"/v1/orders?x=1&apikey={KEY}"
    record["request"].update(
        url=f"https://api.acme.io:443{target}",
        uri=target,
        querystring={"x": "1", "apikey": KEY},
    )
    record["upstream_uri"] = target.replace("/v1", "")
    event = one("kong", json.dumps(record).encode())
    assert event["request"]["uri"] == f"https://api.acme.io:443/v1/orders?x=1&apikey={MASK}"
    metadata = event["metadata"]
    assert metadata["request_querystring"] == {"x": "1", "apikey": MASK}
    assert metadata["request_uri"] == f"/v1/orders?x=1&apikey={MASK}"
    assert metadata["upstream_uri"] == f"/orders?x=1&apikey={MASK}"
    assert KEY.encode() not in orjson.dumps(event)
    # the input record is not changed: masking copies what it masks
    assert record["request"]["querystring"]["apikey"] == KEY


@pytest.mark.parametrize(
    ("fmt", "line"),
    [
        ("aws", edited(AWS, path=f"/prod/orders/42?access_token={KEY}")),
        ("tyk", edited(TYK, raw_request=None, raw_path=f"/orders?api_key={KEY}")),
        ("azure", _azure_with(url=f"https://acme-apim.azure-api.net/o?subscription-key={KEY}")),
        ("apigee", edited(APIGEE, uri=f"/v1/orders/42?Key={KEY}&expand=items")),
        ("envoy", edited(ENVOY, path=f"/v1/orders?token={KEY}")),
        ("nginx", edited(NGINX, request_uri=f"/v1/orders/42?api-key={KEY}#top")),
    ],
)
def test_every_format_masks_sensitive_query_parameters_in_the_uri(fmt, line):
    event = one(fmt, line)
    assert f"={MASK}" in event["request"]["uri"]
    assert KEY.encode() not in orjson.dumps(event)
    assert KEY.encode() not in orjson.dumps(one("auto", line))


def test_wso2_uri_and_metadata_urls_are_masked_too():
    from tests.fixtures import RESPONSE_EVENT

    event = dict(RESPONSE_EVENT, destination=f"http://backend:8281/svc?apikey={KEY}")
    event["properties"] = {
        **RESPONSE_EVENT["properties"],
        "x-original-gw-url": f"https://gw.acme.io/api1/2.0.0?access_token={KEY}",
    }
    mapped_event = FORMATS["events"]["wso2"].to_moesif(event, DEFAULT)[2]
    assert mapped_event["request"]["uri"] == f"https://gw.acme.io/api1/2.0.0?access_token={MASK}"
    assert mapped_event["metadata"]["destination"] == f"http://backend:8281/svc?apikey={MASK}"
    assert KEY.encode() not in orjson.dumps(mapped_event)


def test_nginx_query_variables_and_request_line_in_metadata_are_masked():
    line = edited(
        NGINX,
        query_string=f"page=2&apikey={KEY}",  # $query_string: a query without its "?"
        request=f"GET /v1/orders/42?apikey={KEY} HTTP/1.1",  # $request: the request line
    )
    metadata = one("nginx", line)["metadata"]
    assert metadata["query_string"] == f"page=2&apikey={MASK}"
    assert metadata["request"] == f"GET /v1/orders/42?apikey={MASK} HTTP/1.1"


@pytest.mark.parametrize(
    "uri",
    [
        "https://api.acme.io/v1/orders?x=1",
        "https://api.acme.io/v1/orders?page=2&limit=50#top",
        "https://api.acme.io/v1/orders?monkey=1&keyword=k&tokens=3&key",  # not sensitive
        "https://api.acme.io/v1/orders?apikey=&token",  # named, but nothing to hide
        "https://api.acme.io/v1/keys/token=1",  # no query at all
        "https://api.acme.io/v1/search?q=caf%C3%A9",
    ],
)
def test_a_uri_without_sensitive_parameters_is_unchanged(uri):
    event = one("kong", KONG.replace(b"https://api.acme.io:443/v1/orders?x=1", uri.encode()))
    assert event["request"]["uri"] == uri
    assert mask_query(uri, SENSITIVE_PARAMS) is uri  # not even copied


def test_the_reference_examples_lose_nothing_to_masking():
    # No example holds a secret outside headers: metadata comes back as the mapping made it.
    for fmt, line in EXAMPLES.items():
        masked = one(fmt, line)
        kept = one(fmt, line, MappingOptions(mask_headers=()))
        assert masked["metadata"] == kept["metadata"], fmt
        assert masked["request"]["uri"] == kept["request"]["uri"], fmt


def test_mask_query_keeps_names_layout_and_other_parameters():
    names = ("apikey", "x-api-key")
    assert mask_query(f"/a?apikey={KEY}&page=2", names) == f"/a?apikey={MASK}&page=2"
    assert mask_query(f"/a?page=2;APIKEY={KEY}#f", names) == f"/a?page=2;APIKEY={MASK}#f"
    assert mask_query(f"/a?x_api_key={KEY}", names) == f"/a?x_api_key={MASK}"
    assert mask_query(f"/a?api%6Bey={KEY}", ["apikey"]) == f"/a?api%6Bey={MASK}"
    assert mask_query(f"apikey={KEY}&b=2", names, whole=True) == f"apikey={MASK}&b=2"
    assert mask_query(f"apikey={KEY}&b=2", names) == f"apikey={KEY}&b=2"  # a uri: no "?"


def test_mask_headers_flag_governs_metadata_headers_and_query_parameters():
    record = json.loads(KONG)
    record["request"]["url"] = f"https://api.acme.io/v1/orders?x-secret=s3&apikey={KEY}"
    record["request"]["querystring"] = {"X_Secret": "s3", "apikey": KEY}
    record["backend_headers"] = {"X-Secret": "s3", "Authorization": "Bearer b"}
    line = json.dumps(record).encode()

    custom = one("kong", line, MappingOptions(mask_headers=("X-Secret",)))
    assert (
        custom["request"]["uri"] == f"https://api.acme.io/v1/orders?x-secret={MASK}&apikey={MASK}"
    )
    metadata = custom["metadata"]
    assert metadata["request_querystring"] == {"X_Secret": MASK, "apikey": MASK}
    # the list replaces the default headers: Authorization is no longer masked
    assert metadata["backend_headers"] == {"X-Secret": MASK, "Authorization": "Bearer b"}

    default = one("kong", line)["metadata"]["backend_headers"]
    assert default == {"X-Secret": "s3", "Authorization": MASK}

    # an empty list masks nothing, query parameters included
    off = one("kong", line, MappingOptions(mask_headers=()))
    assert off["request"]["uri"] == record["request"]["url"]
    assert off["metadata"]["request_querystring"]["apikey"] == KEY


@pytest.mark.parametrize("flag", ["user_id_field", "company_id_field", "session_token_field"])
def test_options_refuse_an_empty_header_name(flag):
    with pytest.raises(ValueError, match=f"--{flag}"):
        MappingOptions(**{flag: "header:"})


def test_auto_reads_a_wso2_record_without_its_time_as_wso2():
    # WSO2 events carry correlationId and properties too; one missing its time must still
    # be judged as WSO2 (and say what WSO2 lacks), not as an Azure record missing "time".
    sample = Path(__file__).parents[2] / "samples" / "wso2_sample.jsonl"
    record = json.loads(sample.read_bytes().splitlines()[0])
    assert auto.detect(record) == "wso2"
    record.pop("requestTimestamp")
    assert auto.detect(record) == "wso2"
    with pytest.raises(InvalidRecord, match="as wso2: missing requestTimestamp"):
        FORMATS["events"]["auto"].to_moesif(record, DEFAULT)


@pytest.mark.parametrize("pipeline", ["events", "profiles"])
def test_the_jwt_claim_flag_alone_takes_sub(pipeline):
    parser = cli._parser()
    assert parser.parse_args([pipeline, "--input", "x"]).user_id_jwt_claim is None
    alone = parser.parse_args([pipeline, "--input", "x", "--user_id_jwt_claim"])
    assert alone.user_id_jwt_claim == "sub"
    named = parser.parse_args([pipeline, "--input", "x", "--user_id_jwt_claim", "org.id"])
    assert named.user_id_jwt_claim == "org.id"
