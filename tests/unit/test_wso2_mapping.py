"""The WSO2 -> Moesif mapping, as pure functions, on WSO2's own documented examples."""

from __future__ import annotations

import copy
import json

import pytest

from moesif_beam.transforms.common.errors import InvalidRecord
from moesif_beam.transforms.formats.normalize import parse_json
from moesif_beam.transforms.formats.wso2 import extract_json, to_moesif_event
from tests.fixtures import (
    FAULT_EVENT,
    FAULT_EVENT_AS_PRINTED,
    RESPONSE_EVENT,
    RESPONSE_EVENT_AS_PRINTED,
)


def test_response_event_maps_like_wso2_publisher_and_better():
    tid, time_ms, event = to_moesif_event(RESPONSE_EVENT)
    assert tid == "79ed20c3-55b1-434a-adf6-eea25e2d09c3"
    assert event["transaction_id"] == tid
    assert event["request"] == {
        "time": "2022-01-20T03:34:36.451Z",
        "uri": "/api1/2.0.0/*",
        "verb": "GET",
        "headers": {},
        "api_version": "1.0.0",
        "ip_address": "xxx.xx.xx.xx",
    }
    # response.time = request time + responseLatency (73 ms)
    assert event["response"] == {
        "time": "2022-01-20T03:34:36.524Z",
        "status": 202,
        "headers": {"Content-Type": "application/json; charset=UTF-8"},
    }
    assert time_ms == 1642649676451
    assert event["user_id"] == "admin"
    assert event["direction"] == "Incoming"
    assert "company_id" not in event
    metadata = event["metadata"]
    # native JSON types survive (older WSO2 publishers stringified them)
    assert metadata["backendLatency"] == 13
    assert metadata["responseCacheHit"] is False
    assert metadata["responseSize"] == 133
    assert metadata["isEgress"] is False
    # properties merged in; consumed fields are not repeated as metadata
    assert metadata["apiContext"] == "/api1/2.0.0"
    assert metadata["correlationId"] == tid
    for consumed in ("requestTimestamp", "userIp", "proxyResponseCode", "properties"):
        assert consumed not in metadata


def test_fault_event_keeps_caller_uri_verb_and_error_fields():
    tid, _, event = to_moesif_event(FAULT_EVENT)
    assert tid == "ccf2196f-9db8-429b-aaae-98f4c6edf6d7"
    assert event["request"]["uri"] == "/api1/2.0.0/publish"
    assert event["request"]["verb"] == "GET"
    # the caller (properties.userName), not the API's creator
    assert event["user_id"] == "admin"
    assert event["response"]["status"] == 429
    # no latency: the response time is the event's, never the wall clock
    assert event["response"]["time"] == event["request"]["time"] == "2022-02-01T04:18:48.023Z"
    metadata = event["metadata"]
    assert metadata["errorType"] == "THROTTLED"
    assert metadata["errorCode"] == 900803
    assert metadata["errorMessage"] == "APPLICATION_LEVEL_LIMIT_EXCEEDED"
    assert metadata["targetResponseCode"] == -1


@pytest.mark.parametrize("printed", [RESPONSE_EVENT_AS_PRINTED, FAULT_EVENT_AS_PRINTED])
def test_documented_examples_as_printed_are_not_json(printed):
    # The pipeline turns these into parse_error dead letters; here: they really do not parse.
    with pytest.raises(ValueError, match="Expecting"):
        parse_json(printed)


def test_parse_json_reads_utf8_only():
    assert parse_json(b'{"a": "\xc3\xa9"}') == {"a": "\u00e9"}
    # A UTF-8 byte-order mark (files saved by Windows tools) is skipped.
    assert parse_json(b'\xef\xbb\xbf {"a": 1} ') == {"a": 1}
    # An escaped lone surrogate is JSON; the mapping stage refuses to send it, not the parser.
    assert parse_json(b'"\\ud800"') == "\ud800"
    for not_utf8 in (
        '{"a": 1}'.encode("utf-16"),  # valid JSON, other encoding
        b'{"a": "\xed\xa0\x80"}',  # an encoded surrogate is not UTF-8
        b'{"a": "\xff"}',
    ):
        with pytest.raises(UnicodeDecodeError):
            parse_json(not_utf8)
    for constant in (b"NaN", b"[Infinity]", b'{"a": -Infinity}'):
        with pytest.raises(ValueError, match="not valid JSON"):
            parse_json(constant)


def test_original_gateway_url_wins_over_context_and_template():
    event = copy.deepcopy(RESPONSE_EVENT)
    event["properties"]["x-original-gw-url"] = "https://gw.example.com/api1/2.0.0/menu?x=1"
    _, _, mapped = to_moesif_event(event)
    assert mapped["request"]["uri"] == "https://gw.example.com/api1/2.0.0/menu?x=1"
    assert "x-original-gw-url" not in mapped["metadata"]


@pytest.mark.parametrize(
    ("context", "template", "uri"),
    [
        ("/api1/2.0.0/", "/menu", "/api1/2.0.0/menu"),
        ("/api1/2.0.0", "menu", "/api1/2.0.0/menu"),
        ("/api1/2.0.0", None, "/api1/2.0.0"),
        ("/pizza/1.0", "/order/{orderId}", "/pizza/1.0/order/{orderId}"),
    ],
)
def test_uri_joins_context_and_template_without_double_slashes(context, template, uri):
    event = copy.deepcopy(RESPONSE_EVENT)
    event["properties"]["apiContext"] = context
    event["apiResourceTemplate"] = template
    assert to_moesif_event(event)[2]["request"]["uri"] == uri


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("alice@carbon.super", "alice"),
        ("bob@acme.com", "bob@acme.com"),
        ("carol@carbon.super.example@carbon.super", "carol@carbon.super.example"),
        ("anonymous", None),
        ("UNKNOWN", None),
    ],
)
def test_user_id_drops_only_the_super_tenant_suffix(user, expected):
    event = copy.deepcopy(RESPONSE_EVENT)
    event["userName"] = user
    event["properties"]["userName"] = user
    assert to_moesif_event(event)[2].get("user_id") == expected


def test_user_agent_header_and_unknown_ip():
    event = dict(RESPONSE_EVENT, userAgentHeader="Mozilla/5.0 (X11)", userIp="UNKNOWN")
    _, _, mapped = to_moesif_event(event)
    assert mapped["request"]["headers"] == {"User-Agent": "Mozilla/5.0 (X11)"}
    assert "ip_address" not in mapped["request"]
    # a browser family is metadata, never a User-Agent header
    assert mapped["metadata"]["userAgent"] == "Chrome"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [("applicationId", None, "2d6c54b0-7c7d-4b50-83dc-e6ae6f88962e"), ("responseSize", 7, "7")],
)
def test_company_id_from_a_chosen_field(field, value, expected):
    event = copy.deepcopy(RESPONSE_EVENT)
    if value is not None:
        event["properties"][field] = value
        event.pop(field, None)
    _, _, mapped = to_moesif_event(event, company_id_field=field)
    assert mapped["company_id"] == expected


def test_dots_in_keys_become_underscores_at_every_depth():
    event = copy.deepcopy(RESPONSE_EVENT)
    event["properties"]["x.tenant.region"] = "eu.west"
    event["properties"]["geo"] = {"city.name": "Berlin", "list": [{"a.b": 1}]}
    metadata = to_moesif_event(event)[2]["metadata"]
    assert metadata["x_tenant_region"] == "eu.west"  # values keep their dots
    assert metadata["geo"] == {"city_name": "Berlin", "list": [{"a_b": 1}]}


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ("2026-11-01T10:15Z", "2026-11-01T10:15:00.000Z"),
        ("2026-11-01T10:15:30Z", "2026-11-01T10:15:30.000Z"),
        ("2026-11-01T10:15:30.5+05:30", "2026-11-01T04:45:30.500Z"),
        (1793528130123, "2026-11-01T10:15:30.123Z"),
        ("1793528130123", "2026-11-01T10:15:30.123Z"),
    ],
)
def test_lenient_timestamps(timestamp, expected):
    event = dict(RESPONSE_EVENT, requestTimestamp=timestamp, responseLatency=None)
    assert to_moesif_event(event)[2]["request"]["time"] == expected


@pytest.mark.parametrize(
    ("change", "field", "expected_type", "actual_type"),
    [
        ({"requestTimestamp": None}, "requestTimestamp", None, None),
        ({"requestTimestamp": "yesterday"}, "requestTimestamp", "string", "string"),
        ({"proxyResponseCode": "abc"}, "proxyResponseCode", "number", "string"),
        ({"proxyResponseCode": None}, "proxyResponseCode", None, None),
        ({"apiMethod": 7}, "apiMethod", "string", "number"),
        ({"apiMethod": ""}, "apiMethod", None, None),
        ({"responseLatency": "fast"}, "responseLatency", "number", "string"),
        ({"properties": [1]}, "properties", "object", "array"),
        ({"correlationId": 12}, "correlationId", "string", "number"),
    ],
)
def test_invalid_events_name_the_field_and_types(change, field, expected_type, actual_type):
    event = dict(RESPONSE_EVENT, **change)
    with pytest.raises(InvalidRecord) as info:
        to_moesif_event(event)
    assert info.value.field == field
    assert info.value.expected_type == expected_type
    assert info.value.actual_type == actual_type


def test_no_uri_source_is_invalid():
    event = copy.deepcopy(RESPONSE_EVENT)
    del event["properties"]["apiContext"]
    with pytest.raises(InvalidRecord, match="no uri"):
        to_moesif_event(event)


def test_not_an_object_is_invalid():
    with pytest.raises(InvalidRecord) as info:
        to_moesif_event([RESPONSE_EVENT])
    assert (info.value.expected_type, info.value.actual_type) == ("object", "array")


def test_missing_correlation_id_derives_a_stable_uuid():
    event = {k: v for k, v in RESPONSE_EVENT.items() if k != "correlationId"}
    first = to_moesif_event(event)[0]
    again = to_moesif_event(json.loads(json.dumps(event)))[0]
    other = to_moesif_event(dict(event, backendLatency=14))[0]
    assert first == again
    assert first != other
    assert len(first) == 36


def test_bodies_go_to_request_and_response_not_metadata():
    event = copy.deepcopy(RESPONSE_EVENT)
    event["properties"].update(
        requestBody='{"pizza": "margherita"}',
        responseBody="plain text",
        requestHeaders={"Accept": ["a", "b"], "X-Id": 1},
    )
    _, _, mapped = to_moesif_event(event)
    assert mapped["request"]["body"] == {"pizza": "margherita"}
    assert mapped["request"]["transfer_encoding"] == "json"
    assert mapped["response"]["body"] == "cGxhaW4gdGV4dA=="
    assert mapped["response"]["transfer_encoding"] == "base64"
    assert mapped["request"]["headers"]["Accept"] == "a, b"
    assert mapped["request"]["headers"]["X-Id"] == "1"
    assert "requestBody" not in mapped["metadata"]


def test_elk_style_log_line_prefix_is_skipped():
    line = b"[2026-11-01 10:00:00,000] INFO - ELKCounterMetric apimMetrics: apim:response, "
    line += b'properties :{"a": 1}'
    assert extract_json(line) == b'{"a": 1}'
    assert extract_json(b'  {"a": 1}') == b'{"a": 1}'
    assert extract_json(b"garbage") == b"garbage"
