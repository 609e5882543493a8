"""The Moesif Collector API emulator: pure validation, and its behaviour over real HTTP."""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests

from moesif_beam.runners.emulators.collector import (
    ACTIONS_BATCH_LIMIT_BYTES,
    METADATA_TYPES,
    CollectorConfig,
    MetadataTypeConflict,
    RunningCollector,
    ValidationError,
    main,
    parse_iso8601,
    start_in_thread,
    validate_payload,
    validate_record,
)
from moesif_beam.runners.emulators.collector.handler import _count_only_items

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
APP_ID = "emulator-secret-7d41c9"  # recognisable, so a leak into any output is caught
JSON = "application/json"


# ---- builders -------------------------------------------------------------------------------


def event(transaction_id: str | None = "tx-1", **extra: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "request": {
            "time": "2026-01-02T03:04:05.678Z",
            "uri": "https://api.example.com/v1/items?q=1",
            "verb": "GET",
            "headers": {"Host": "api.example.com"},
        },
        "response": {
            "time": "2026-01-02T03:04:05.789Z",
            "status": 200,
            "headers": {"Content-Type": JSON},
            "body": {"ok": True},
        },
    }
    if transaction_id is not None:
        record["transaction_id"] = transaction_id
    record.update(extra)
    return record


def action(transaction_id: str = "act-1", **extra: Any) -> dict[str, Any]:
    record = {
        "action_name": "Clicked Sign Up",
        "transaction_id": transaction_id,
        "request": {"time": "2026-01-02T03:04:05.678Z", "uri": "https://example.com/signup"},
    }
    record.update(extra)
    return record


SAMPLES: dict[str, dict[str, Any]] = {
    "events": event(),
    "actions": action(),
    "users": {"user_id": "u-1", "metadata": {"email": "a@example.com"}},
    "companies": {"company_id": "c-1", "company_domain": "example.com"},
    "subscriptions": {"subscription_id": "s-1", "company_id": "c-1", "status": "active"},
}


def post(
    collector: RunningCollector,
    path: str,
    payload: Any,
    *,
    encoding: str | None = None,
    app_id: str | None = APP_ID,
    content_type: str = JSON,
    session: requests.Session | None = None,
) -> requests.Response:
    """POST ``payload`` (JSON-encoded unless bytes), compressed as ``encoding`` says."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    if encoding == "gzip":
        body = gzip.compress(body)
    elif encoding == "deflate":
        body = zlib.compress(body)
    elif encoding == "raw-deflate":
        packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        body = packer.compress(body) + packer.flush()
        encoding = "deflate"
    headers = {"Content-Type": content_type}
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    if app_id is not None:
        headers["X-Moesif-Application-Id"] = app_id
    return (session or requests).post(collector.url + path, data=body, headers=headers, timeout=30)


@pytest.fixture
def collector() -> Iterator[RunningCollector]:
    with start_in_thread(CollectorConfig(application_id=APP_ID)) as running:
        yield running


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"fail_rate": 1.5}, "fail_rate must be in [0, 1]"),
        ({"drop_connection_rate": -0.1}, "drop_connection_rate must be in [0, 1]"),
        ({"fail_status": 200}, "fail_status must be an HTTP error status"),
        ({"fail_first": -1}, "fail_first must be >= 0"),
        ({"latency_ms": -5}, "latency_ms must be >= 0"),
        ({"store": "memory"}, "store must be 'sqlite' or 'count'"),
        ({"port": 70000}, "port must be in 0..65535"),
        ({"retry_after": -1.0}, "retry_after must be >= 0"),
        ({"reject_older_than_days": 0}, "reject_older_than_days must be >= 1"),
        ({"application_id": "  "}, "application_id must be non-empty"),
        ({"metadata_types": "strict"}, "metadata_types must be 'enforce' or 'off'"),
        ({"validation": "some"}, "validation must be 'full' or 'off'"),
    ],
)
def test_config_rejects_bad_settings(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        CollectorConfig(**settings)


def test_config_repr_hides_the_application_id():
    assert APP_ID not in repr(CollectorConfig(application_id=APP_ID))


# ---- pure validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "2026-01-02T03:04:05",
        "2026-01-02T03:04:05Z",
        "2026-01-02T03:04:05.6",
        "2026-01-02T03:04:05.678",
        "2026-01-02T03:04:05.123456789Z",
        "2026-01-02T03:04:05.678+00:00",
        "2026-01-02T05:04:05+0200",
        "2026-01-02T05:04+02",
        "2026-01-02t03:04:05.678z",
    ],
)
def test_parse_iso8601_accepts_the_shapes_sdks_send(text):
    parsed = parse_iso8601(text)
    assert parsed.tzinfo is not None  # no zone means UTC
    assert parsed.astimezone(UTC).replace(second=0, microsecond=0) == datetime(
        2026, 1, 2, 3, 4, tzinfo=UTC
    )


def test_parse_iso8601_reads_fractions_and_offsets():
    assert parse_iso8601("2026-01-02T03:04:05.123456789Z").microsecond == 123456
    assert parse_iso8601("2026-01-02T03:04:05.5").microsecond == 500000
    assert parse_iso8601("2026-01-02T03:04:05-03:30").utcoffset() == -timedelta(hours=3, minutes=30)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2026-01-02",
        "2026-01-02 03:04:05",
        "20260102T030405",
        "2026-13-02T03:04:05",
        "2026-02-30T03:04:05",
        "2026-01-02T25:04:05",
        "2026-01-02T03:04:05.1234567890Z",
        "2026-01-02T03:04:05+25:00",
        "1735787045123",
        "yesterday",
    ],
)
def test_parse_iso8601_rejects_other_text(text):
    with pytest.raises(ValueError, match="date-time"):
        parse_iso8601(text)


@pytest.mark.parametrize(
    ("kind", "record"),
    [
        ("events", event()),
        ("events", event(transaction_id=None)),  # no id: fine, just never deduplicated
        ("events", {**event(), "response": None}),  # timed-out call
        (
            "events",
            event(
                user_id=None,
                company_id="c",
                subscription_id=None,
                session_token=None,
                direction="Internal",
                metadata={"a": {"b": [1]}},
                weight=None,
                tags=None,
                blocked_by=None,
                action_name="List",
            ),
        ),
        ("events", {**event(), "request": {**event()["request"], "content_length": 5}}),
        ("actions", action()),
        ("actions", {"action_name": "Viewed", "request": {}}),  # time and uri are optional
        ("actions", action(request={"time": "2026-01-02T03:04:05"}, metadata=None)),
        ("users", SAMPLES["users"]),
        ("users", {"user_id": "u", "metadata": None, "company_id": None, "campaign": {}}),
        ("companies", SAMPLES["companies"]),
        ("subscriptions", {**SAMPLES["subscriptions"], "items": [{"plan_id": "p"}]}),
    ],
)
def test_validate_record_accepts_valid_records(kind, record):
    validate_record(kind, record)


def _without(record: dict[str, Any], dotted: str) -> dict[str, Any]:
    copy = json.loads(json.dumps(record))
    *parents, last = dotted.split(".")
    target = copy
    for key in parents:
        target = target[key]
    del target[last]
    return copy


def _with(record: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    copy = json.loads(json.dumps(record))
    *parents, last = dotted.split(".")
    target = copy
    for key in parents:
        target = target[key]
    target[last] = value
    return copy


@pytest.mark.parametrize(
    ("kind", "record", "field"),
    [
        ("events", _without(event(), "request"), "request"),
        ("events", _with(event(), "request", "GET /"), "request"),
        ("events", _without(event(), "request.time"), "request.time"),
        ("events", _with(event(), "request.time", 1735787045123), "request.time"),
        ("events", _with(event(), "request.time", "02/01/2026"), "request.time"),
        ("events", _without(event(), "request.uri"), "request.uri"),
        ("events", _without(event(), "request.verb"), "request.verb"),
        ("events", _with(event(), "request.verb", None), "request.verb"),
        ("events", _without(event(), "request.headers"), "request.headers"),
        ("events", _with(event(), "request.headers", "Host: x"), "request.headers"),
        ("events", _with(event(), "response", []), "response"),
        ("events", _without(event(), "response.time"), "response.time"),
        ("events", _without(event(), "response.status"), "response.status"),
        ("events", _with(event(), "response.status", "200"), "response.status"),
        ("events", _with(event(), "response.status", True), "response.status"),
        ("events", _without(event(), "response.headers"), "response.headers"),
        ("events", _with(event(), "transaction_id", 7), "transaction_id"),
        ("events", _with(event(), "user_id", 42), "user_id"),
        ("events", _with(event(), "session_token", {}), "session_token"),
        ("events", _with(event(), "metadata", "plan=pro"), "metadata"),
        ("events", _with(event(), "weight", 1.5), "weight"),
        ("events", _with(event(), "weight", True), "weight"),
        ("events", _with(event(), "direction", "Sideways"), "direction"),
        ("events", _with(event(), "direction", ["Incoming"]), "direction"),
        ("actions", _without(action(), "action_name"), "action_name"),
        ("actions", _with(action(), "action_name", ""), "action_name"),
        ("actions", _without(action(), "request"), "request"),
        ("actions", _with(action(), "request.time", "soon"), "request.time"),
        ("actions", _with(action(), "request.uri", 3), "request.uri"),
        ("actions", _with(action(), "company_id", 3), "company_id"),
        ("users", {"metadata": {}}, "user_id"),
        ("users", {"user_id": ""}, "user_id"),
        ("users", {"user_id": 12}, "user_id"),
        ("users", {"user_id": "u", "metadata": []}, "metadata"),
        ("companies", {"company_domain": "x.com"}, "company_id"),
        ("subscriptions", {"company_id": "c", "status": "active"}, "subscription_id"),
        ("subscriptions", {"subscription_id": "s", "status": "active"}, "company_id"),
        ("subscriptions", {"subscription_id": "s", "company_id": "c"}, "status"),
        ("subscriptions", {**SAMPLES["subscriptions"], "items": [{}]}, "items.0.plan_id"),
    ],
)
def test_validate_record_names_the_offending_field(kind, record, field):
    with pytest.raises(ValidationError) as caught:
        validate_record(kind, record)
    assert caught.value.field == field
    assert caught.value.index is None
    assert caught.value.to_json()["field"] == field


def test_validate_record_rejects_non_objects_and_unknown_kinds():
    with pytest.raises(ValidationError, match="JSON object"):
        validate_record("events", ["not", "an", "object"])
    with pytest.raises(ValueError, match="kind must be one of"):
        validate_record("sessions", {})


def test_validate_record_age_window_uses_request_time():
    now = datetime(2026, 3, 1, tzinfo=UTC)
    recent = _with(event(), "request.time", "2026-02-20T00:00:00.000")
    old = _with(event(), "request.time", "2026-01-01T00:00:00+05:00")
    validate_record("events", recent, now=now, reject_older_than_days=30)
    validate_record("events", old, now=now)  # no window, no age check
    with pytest.raises(ValidationError, match="older") as caught:
        validate_record("events", old, now=now, reject_older_than_days=30)
    assert caught.value.field == "request.time"
    # Actions without a time are stamped by the server, so they are never too old.
    validate_record(
        "actions", {"action_name": "x", "request": {}}, now=now, reject_older_than_days=1
    )
    with pytest.raises(ValidationError):
        validate_record("actions", action(), now=now, reject_older_than_days=1)


def test_validate_payload_is_all_or_nothing_and_reports_the_index():
    items = [event("a"), event("b"), _without(event("c"), "request.verb"), event("d")]
    with pytest.raises(ValidationError) as caught:
        validate_payload("events", items, batch=True)
    assert caught.value.to_json() == {
        "error": "request.verb is required",
        "index": 2,
        "field": "request.verb",
    }
    assert validate_payload("events", [], batch=True) == []
    assert validate_payload("users", SAMPLES["users"], batch=False) == [SAMPLES["users"]]
    with pytest.raises(ValidationError, match="JSON array"):
        validate_payload("events", event(), batch=True)
    with pytest.raises(ValidationError, match="JSON object"):
        validate_payload("events", [event()], batch=False)


def test_validation_accepts_dict_subclasses_from_direct_callers():
    class Record(dict):  # not what json.loads builds, so the fast path defers to the full one
        pass

    validate_record("events", Record(event()))
    validate_record("actions", Record(action()))


# ---- HTTP: routes, auth, bodies -------------------------------------------------------------


@pytest.mark.parametrize("kind", list(SAMPLES))
@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
def test_every_post_route_answers_201_and_stores(collector, kind, batch):
    payload = [SAMPLES[kind]] if batch else SAMPLES[kind]
    response = post(collector, f"/v1/{kind}{'/batch' if batch else ''}", payload)
    assert response.status_code == 201, response.text
    assert response.json() == {}
    assert response.headers["X-Moesif-Config-ETag"]
    assert collector.records(kind) == [SAMPLES[kind]]
    stats = collector.stats()
    assert stats["records"][kind] == 1
    assert sum(stats["records"].values()) == 1
    assert stats["requests"][f"/v1/{kind}{'/batch' if batch else ''}"] == {"201": 1}


def test_config_and_rules(collector):
    headers = {"X-Moesif-Application-Id": APP_ID}
    config = requests.get(collector.url + "/v1/config", headers=headers, timeout=10)
    assert config.status_code == 200
    assert config.headers["X-Moesif-Config-ETag"]
    assert config.json()["sample_rate"] == 100
    assert {"org_id", "app_id", "user_sample_rate", "regex_config"} <= set(config.json())
    rules = requests.get(collector.url + "/v1/rules", headers=headers, timeout=10)
    assert (rules.status_code, rules.json()) == (200, [])
    assert collector.stats()["requests"]["/v1/config"] == {"200": 1}


@pytest.mark.parametrize(
    "app_id", [None, "", "not-the-right-id"], ids=["missing", "empty", "wrong"]
)
@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/v1/events/batch"), ("GET", "/v1/config"), ("GET", "/v1/rules")]
)
def test_401_without_the_right_application_id(collector, app_id, method, path):
    headers = {"Content-Type": JSON}
    if app_id is not None:
        headers["X-Moesif-Application-Id"] = app_id
    response = requests.request(
        method, collector.url + path, data=json.dumps([event()]), headers=headers, timeout=10
    )
    assert response.status_code == 401
    assert response.json() == {"error": "missing or invalid X-Moesif-Application-Id"}
    assert APP_ID not in response.text
    assert APP_ID not in str(response.headers)
    if app_id:
        assert app_id not in response.text
    assert collector.records("events") == []


def test_any_non_empty_id_is_accepted_when_none_is_configured():
    with start_in_thread(CollectorConfig()) as running:
        assert post(running, "/v1/events/batch", [event()], app_id="whatever").status_code == 201
        assert post(running, "/v1/events/batch", [event()], app_id="").status_code == 401


def test_unknown_paths_and_wrong_methods(collector):
    headers = {"X-Moesif-Application-Id": APP_ID}
    assert (
        requests.get(collector.url + "/v1/nothing", headers=headers, timeout=10).status_code == 404
    )
    # Exact paths only: no trailing slash, no prefix matching.
    assert post(collector, "/v1/events/batch/", [event()]).status_code == 404
    wrong = requests.get(collector.url + "/v1/events/batch", headers=headers, timeout=10)
    assert (wrong.status_code, wrong.headers["Allow"]) == (405, "POST")
    assert post(collector, "/v1/config", {}).status_code == 405
    head = requests.head(collector.url + "/v1/events", headers=headers, timeout=10)
    assert (head.status_code, head.content) == (405, b"")


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate", "identity", None])
def test_compressed_and_plain_bodies_are_accepted(collector, encoding):
    batch = [event("a"), event("b"), event("c")]
    response = post(collector, "/v1/events/batch", batch, encoding=encoding)
    assert response.status_code == 201, response.text
    assert [e["transaction_id"] for e in collector.records("events")] == ["a", "b", "c"]


def test_concatenated_gzip_members_are_one_body(collector):
    text = json.dumps([event("a"), event("b")]).encode()
    body = gzip.compress(text[:40]) + gzip.compress(text[40:])
    response = requests.post(
        collector.url + "/v1/events/batch",
        data=body,
        headers={
            "Content-Type": JSON,
            "Content-Encoding": "gzip",
            "X-Moesif-Application-Id": APP_ID,
        },
        timeout=10,
    )
    assert response.status_code == 201
    assert len(collector.records("events")) == 2


@pytest.mark.parametrize(
    ("body", "encoding", "message"),
    [
        (b"\x1f\x8b\x08\x00garbage", "gzip", "could not be decoded as gzip"),
        (gzip.compress(b'[{"a": 1}]')[:-12], "gzip", "truncated"),
        (b"plain text", "deflate", "could not be decoded as deflate"),
        (b"[]", "br", "unsupported Content-Encoding"),
    ],
    ids=["bad-gzip", "truncated-gzip", "bad-deflate", "brotli"],
)
def test_undecodable_bodies_are_400(collector, body, encoding, message):
    response = requests.post(
        collector.url + "/v1/events/batch",
        data=body,
        headers={
            "Content-Type": JSON,
            "Content-Encoding": encoding,
            "X-Moesif-Application-Id": APP_ID,
        },
        timeout=10,
    )
    assert response.status_code == 400
    assert message in response.json()["error"]


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/events/batch", b'[{"request": ', "not valid JSON"),
        ("/v1/events/batch", b"", "not valid JSON"),
        ("/v1/events/batch", b"[NaN]", "not valid JSON"),
        ("/v1/events/batch", b"\xff\xfe[]", "not UTF-8"),
        ("/v1/events/batch", b'[{"x": "\\ud800"}]', "unpaired UTF-16 surrogate"),
        ("/v1/events/batch", json.dumps(event()).encode(), "must be a JSON array"),
        ("/v1/actions/batch", b'{"batch": []}', "must be a JSON array"),
        ("/v1/users", b'[{"user_id": "u"}]', "must be a JSON object"),
    ],
)
def test_malformed_bodies_are_400(collector, path, body, message):
    response = post(collector, path, body)
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert collector.stats()["records"] == dict.fromkeys(SAMPLES, 0)


def test_unicode_escapes_and_a_byte_order_mark_are_fine(collector):
    text = json.dumps([event("\U0001f600", metadata={"name": "Zoë"})])  # escaped pair + é
    assert "\\ud83d\\ude00" in text
    response = post(collector, "/v1/events/batch", b"\xef\xbb\xbf" + text.encode())
    assert response.status_code == 201, response.text
    stored = collector.records("events")[0]
    assert (stored["transaction_id"], stored["metadata"]["name"]) == ("\U0001f600", "Zoë")


def test_content_type_must_be_json(collector):
    wrong = post(collector, "/v1/events/batch", [event()], content_type="text/plain")
    assert wrong.status_code == 400
    assert "Content-Type must be application/json" in wrong.json()["error"]
    fine = post(
        collector, "/v1/events/batch", [event()], content_type="Application/JSON; charset=utf-8"
    )
    assert fine.status_code == 201


def test_an_empty_batch_is_fine(collector):
    response = post(collector, "/v1/events/batch", [])
    assert response.status_code == 201
    assert collector.stats()["items_received"]["events"] == 0


@pytest.mark.parametrize(
    ("path", "batch", "index", "field"),
    [
        ("/v1/events/batch", [event("a"), _without(event("b"), "request.verb")], 1, "request.verb"),
        (
            "/v1/events/batch",
            [event("a"), event("b"), _without(event("c"), "response.status")],
            2,
            "response.status",
        ),
        ("/v1/actions/batch", [_without(action(), "action_name")], 0, "action_name"),
        ("/v1/users/batch", [{"user_id": "u-1"}, {"metadata": {"a": 1}}], 1, "user_id"),
    ],
)
def test_one_invalid_item_rejects_the_whole_batch(collector, path, batch, index, field):
    response = post(collector, path, batch, encoding="gzip")
    assert response.status_code == 400
    body = response.json()
    assert (body["index"], body["field"]) == (index, field)
    assert body["error"]
    stats = collector.stats()
    assert stats["records"] == dict.fromkeys(SAMPLES, 0)  # nothing stored, not even valid items
    assert stats["requests"][path] == {"400": 1}


def test_single_route_errors_name_the_field(collector):
    response = post(collector, "/v1/users", {"metadata": {}})
    assert response.status_code == 400
    assert response.json() == {"error": "user_id is required", "field": "user_id"}


def test_413_for_an_actions_batch_over_15_mb(collector):
    filler = "x" * 900_000  # each action stays under 1 MB; together they pass 15 MB
    batch = [action(f"a{i}", metadata={"blob": filler}) for i in range(18)]
    body = json.dumps(batch).encode()
    assert len(body) > ACTIONS_BATCH_LIMIT_BYTES
    with requests.Session() as session:
        plain = post(collector, "/v1/actions/batch", body, session=session)
        assert plain.status_code == 413
        assert "15,000,000" in plain.json()["error"]
        # Compressed it is tiny, but the limit holds for the decompressed body too.
        packed = post(collector, "/v1/actions/batch", body, encoding="gzip", session=session)
        assert packed.status_code == 413
        assert len(gzip.compress(body)) < 1_000_000
        # The same body is fine on /v1/events/batch, whose limit is 50 MB.
        assert post(collector, "/v1/events/batch", [], session=session).status_code == 201
    assert collector.records("actions") == []


def test_decompression_bombs_stop_at_the_limit(collector):
    bomb = gzip.compress(b" " * 60_000_000, compresslevel=9)  # 60 MB of whitespace, ~60 KB
    started = time.monotonic()
    response = requests.post(
        collector.url + "/v1/events/batch",
        data=bomb,
        headers={
            "Content-Type": JSON,
            "Content-Encoding": "gzip",
            "X-Moesif-Application-Id": APP_ID,
        },
        timeout=30,
    )
    assert response.status_code == 413
    assert "decompressed body exceeds" in response.json()["error"]
    assert time.monotonic() - started < 5


def test_413_for_an_event_over_1_mb(collector):
    big = event("big", metadata={"blob": "y" * 1_000_100})
    batch = [event("small"), big]
    response = post(collector, "/v1/events/batch", batch)
    assert response.status_code == 413
    assert response.json()["index"] == 1
    assert "1,000,000" in response.json()["error"]
    assert post(collector, "/v1/events", big).status_code == 413
    assert collector.records("events") == []
    # Just under the limit is fine.
    fits = event("fits", metadata={"blob": "y" * 990_000})
    assert post(collector, "/v1/events/batch", [fits]).status_code == 201


def test_a_body_without_content_length_is_411(collector):
    connection = http.client.HTTPConnection("127.0.0.1", collector.port, timeout=10)
    try:
        connection.request(
            "POST",
            "/v1/events/batch",
            body=iter([b"[", b"]"]),
            headers={"Content-Type": JSON, "X-Moesif-Application-Id": APP_ID},
            encode_chunked=True,
        )
        response = connection.getresponse()
        assert response.status == 411
        assert b"Content-Length" in response.read()
        # The chunks were drained, so the connection is still good for a proper request.
        sock = connection.sock
        connection.request(
            "POST",
            "/v1/events/batch",
            body=b"[]",
            headers={"Content-Type": JSON, "X-Moesif-Application-Id": APP_ID},
        )
        again = connection.getresponse()
        assert (again.status, again.read()) == (201, b"{}")
        assert connection.sock is sock
    finally:
        connection.close()


def test_connections_are_kept_alive(collector):
    connection = http.client.HTTPConnection("127.0.0.1", collector.port, timeout=10)
    try:
        body = json.dumps([event("a")])
        headers = {"Content-Type": JSON, "X-Moesif-Application-Id": APP_ID}
        connection.request("POST", "/v1/events/batch", body=body, headers=headers)
        first = connection.getresponse()
        assert (first.status, first.read()) == (201, b"{}")
        sock = connection.sock
        # Even an error answer keeps the connection usable.
        connection.request("POST", "/v1/events/batch", body="[1", headers=headers)
        second = connection.getresponse()
        assert second.status == 400
        second.read()
        connection.request("POST", "/v1/events/batch", body=body, headers=headers)
        third = connection.getresponse()
        assert third.status == 201
        third.read()
        assert connection.sock is sock  # no reconnect happened
    finally:
        connection.close()


# ---- semantics: dedup, upserts, age ---------------------------------------------------------


def test_transaction_ids_are_deduplicated_across_batches(collector):
    for batch in (["A", "B"], ["C"], ["A", "C", "D"]):
        assert post(collector, "/v1/events/batch", [event(t) for t in batch]).status_code == 201
    assert [e["transaction_id"] for e in collector.records("events")] == ["A", "B", "C", "D"]
    stats = collector.stats()
    assert stats["records"]["events"] == 4
    assert stats["duplicates"]["events"] == 2
    assert (stats["items_accepted"]["events"], stats["items_stored"]["events"]) == (6, 4)


def test_dedup_within_a_batch_and_items_without_ids(collector):
    batch = [event("X"), event("X"), event(None), event(None), event(""), action("X")]
    assert post(collector, "/v1/events/batch", batch[:5]).status_code == 201
    assert post(collector, "/v1/actions/batch", batch[5:]).status_code == 201
    assert len(collector.records("events")) == 4  # X once, every id-less event kept
    assert len(collector.records("actions")) == 1  # actions are a separate id space
    assert collector.stats()["duplicates"] == {"events": 1, "actions": 0}


def test_user_metadata_is_merged_recursively(collector):
    first = {
        "user_id": "u-1",
        "company_id": "c-1",
        "metadata": {"email": "a@example.com", "plan": {"name": "free", "seats": 1}},
    }
    second = {
        "user_id": "u-1",
        "company_id": None,  # SDKs send null for "not set": it does not erase
        "metadata": {"plan": {"seats": 5}, "name": "Ann"},
    }
    assert post(collector, "/v1/users", first).status_code == 201
    assert post(collector, "/v1/users/batch", [second, {"user_id": "u-2"}]).status_code == 201
    assert collector.records("users") == [
        {
            "user_id": "u-1",
            "company_id": "c-1",
            "metadata": {
                "email": "a@example.com",
                "plan": {"name": "free", "seats": 5},
                "name": "Ann",
            },
        },
        {"user_id": "u-2"},
    ]
    assert collector.stats()["records"]["users"] == 2


def test_companies_and_subscriptions_are_upserts(collector):
    post(collector, "/v1/companies", {"company_id": "c", "metadata": {"a": 1}})
    post(collector, "/v1/companies/batch", [{"company_id": "c", "metadata": {"b": 2}}] * 2)
    sub = SAMPLES["subscriptions"]
    post(collector, "/v1/subscriptions/batch", [sub, {**sub, "status": "cancelled"}])
    assert collector.records("companies") == [{"company_id": "c", "metadata": {"a": 1, "b": 2}}]
    assert collector.records("subscriptions") == [{**sub, "status": "cancelled"}]


def test_reject_older_than_days():
    with start_in_thread(CollectorConfig(application_id=APP_ID, reject_older_than_days=30)) as c:
        now = datetime.now(UTC)
        recent = _with(event("new"), "request.time", now.strftime("%Y-%m-%dT%H:%M:%S.000Z"))
        old_time = (now - timedelta(days=40)).astimezone(timezone(timedelta(hours=2)))
        old = _with(event("old"), "request.time", old_time.isoformat())
        response = post(c, "/v1/events/batch", [recent, old])
        assert response.status_code == 400
        assert (response.json()["index"], response.json()["field"]) == (1, "request.time")
        assert post(c, "/v1/events/batch", [recent]).status_code == 201
        assert [e["transaction_id"] for e in c.records("events")] == ["new"]


def test_data_survives_a_restart_and_dedup_spans_it(tmp_path):
    config = CollectorConfig(application_id=APP_ID, data_dir=str(tmp_path / "nested" / "dir"))
    with start_in_thread(config) as first:
        assert post(first, "/v1/events/batch", [event("A"), event("B")]).status_code == 201
        assert post(first, "/v1/users", {"user_id": "u", "metadata": {"a": 1}}).status_code == 201
    assert (tmp_path / "nested" / "dir" / "collector.db").exists()
    with start_in_thread(config) as second:
        assert post(second, "/v1/events/batch", [event("B"), event("C")]).status_code == 201
        assert post(second, "/v1/users", {"user_id": "u", "metadata": {"b": 2}}).status_code == 201
        assert [e["transaction_id"] for e in second.records("events")] == ["A", "B", "C"]
        assert second.records("users") == [{"user_id": "u", "metadata": {"a": 1, "b": 2}}]


def test_concurrent_clients_are_safe(collector):
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            with requests.Session() as session:
                for batch in range(5):
                    ids = [f"tx-{(offset + batch * 7 + i) % 60}" for i in range(20)]
                    response = post(
                        collector, "/v1/events/batch", [event(t) for t in ids], session=session
                    )
                    assert response.status_code == 201
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n * 11,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    stored = [e["transaction_id"] for e in collector.records("events")]
    assert len(stored) == len(set(stored)) == 60
    stats = collector.stats()
    assert stats["items_accepted"]["events"] == 6 * 5 * 20
    assert stats["items_stored"]["events"] + stats["duplicates"]["events"] == 600


# ---- faults ---------------------------------------------------------------------------------


def test_fail_first_gives_503s_with_retry_after_then_201():
    config = CollectorConfig(application_id=APP_ID, fail_first=2, retry_after=1.5)
    with start_in_thread(config) as c, requests.Session() as session:
        answers = [post(c, "/v1/events/batch", [event()], session=session) for _ in range(3)]
        assert [a.status_code for a in answers] == [503, 503, 201]
        assert [a.headers.get("Retry-After") for a in answers[:2]] == ["1.5", "1.5"]
        assert "Retry-After" not in answers[2].headers
        assert "injected" in answers[0].json()["error"]
        assert len(c.records("events")) == 1
        stats = c.stats()
        assert stats["faults"] == {"dropped": 0, "failed": 2}
        assert stats["requests"]["/v1/events/batch"] == {"201": 1, "503": 2}


def test_retry_after_only_for_429_and_503():
    with start_in_thread(CollectorConfig(fail_first=1, fail_status=500, retry_after=2)) as c:
        response = post(c, "/v1/events/batch", [event()], app_id="any")
        assert response.status_code == 500
        assert "Retry-After" not in response.headers
    with start_in_thread(CollectorConfig(fail_first=1, fail_status=429, retry_after=2)) as c:
        response = post(c, "/v1/events/batch", [event()], app_id="any")
        assert (response.status_code, response.headers["Retry-After"]) == (429, "2")


def test_faults_spare_gets_and_unauthorised_posts():
    with start_in_thread(CollectorConfig(application_id=APP_ID, fail_first=1)) as c:
        headers = {"X-Moesif-Application-Id": APP_ID}
        assert requests.get(c.url + "/v1/config", headers=headers, timeout=10).status_code == 200
        assert post(c, "/v1/events/batch", [event()], app_id="wrong").status_code == 401
        assert post(c, "/v1/events/batch", [event()]).status_code == 503
        assert post(c, "/v1/events/batch", [event()]).status_code == 201


def test_drop_first_closes_the_connection_without_an_answer():
    with start_in_thread(CollectorConfig(application_id=APP_ID, drop_first=1)) as c:
        with pytest.raises(requests.ConnectionError):
            post(c, "/v1/events/batch", [event("A")])
        assert c.records("events") == []  # a dropped request stores nothing
        assert post(c, "/v1/events/batch", [event("A")]).status_code == 201
        assert c.stats()["faults"] == {"dropped": 1, "failed": 0}
        assert c.records("events") == [event("A")]


def test_drop_then_fail_are_counted_separately():
    config = CollectorConfig(application_id=APP_ID, drop_first=1, fail_first=1)
    with start_in_thread(config) as c:
        with pytest.raises(requests.ConnectionError):
            post(c, "/v1/events/batch", [event()])
        assert post(c, "/v1/events/batch", [event()]).status_code == 503
        assert post(c, "/v1/events/batch", [event()]).status_code == 201


def test_random_faults_are_reproducible_with_a_seed():
    def outcomes() -> list[str]:
        config = CollectorConfig(application_id=APP_ID, fail_rate=0.5, seed=42)
        with start_in_thread(config) as c, requests.Session() as session:
            return [
                str(post(c, "/v1/events/batch", [], session=session).status_code) for _ in range(12)
            ]

    first = outcomes()
    assert first == outcomes()
    assert {"201", "503"} == set(first)


def test_latency_delays_ingestion_only():
    # The first POST is held for the injected latency (an hour): the client gives up on it.
    # The second is answered at once (latency_first=1: only the first is slow); stopping
    # the emulator then ends the held one.
    config = CollectorConfig(application_id=APP_ID, latency_ms=3_600_000, latency_first=1)
    with start_in_thread(config) as c:
        with pytest.raises(requests.Timeout):
            requests.post(
                c.url + "/v1/events/batch",
                data=json.dumps([event("a")]),
                headers={"Content-Type": JSON, "X-Moesif-Application-Id": APP_ID},
                timeout=1,
            )
        assert post(c, "/v1/events/batch", [event("b")]).status_code == 201


def test_a_request_the_client_gave_up_on_is_still_stored():
    with start_in_thread(CollectorConfig(application_id=APP_ID, latency_ms=600)) as c:
        with pytest.raises(requests.Timeout):
            requests.post(
                c.url + "/v1/events/batch",
                data=json.dumps([event("late")]),
                headers={"Content-Type": JSON, "X-Moesif-Application-Id": APP_ID},
                timeout=0.2,
            )
        deadline = time.monotonic() + 5
        while not c.records("events") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [e["transaction_id"] for e in c.records("events")] == ["late"]


def test_stop_does_not_wait_out_injected_latency(caplog):
    running = start_in_thread(CollectorConfig(application_id=APP_ID, latency_ms=600_000))
    outcome: list[BaseException] = []

    def client() -> None:
        try:
            post(running, "/v1/events/batch", [event()])
        except requests.RequestException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    # The request is in the handler (it reads its small body, then sleeps the latency).
    deadline = time.monotonic() + 30
    while running._server._active == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert running._server._active == 1
    started = time.monotonic()
    running.stop()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert time.monotonic() - started < 60  # far below the injected 600 s
    assert outcome and isinstance(outcome[0], requests.ConnectionError)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    running.stop()  # idempotent


# ---- count mode, inspection, reset ----------------------------------------------------------


def test_count_store_validates_dedups_and_keeps_no_bodies():
    with start_in_thread(CollectorConfig(application_id=APP_ID, store="count")) as c:
        for batch in (["A", "B"], ["C"], ["A", "C", "D"]):
            assert post(c, "/v1/events/batch", [event(t) for t in batch]).status_code == 201
        assert post(c, "/v1/users/batch", [{"user_id": "u"}, {"user_id": "u"}]).status_code == 201
        assert post(c, "/v1/events/batch", [{"request": {}}]).status_code == 400
        assert c.records("events") == []
        stats = c.stats()
        assert stats["store"] == "count"
        assert stats["records"]["events"] == 4
        assert stats["records"]["users"] == 1
        assert stats["duplicates"]["events"] == 2


def test_fast_count_mode_counts_without_checking_fields():
    """The benchmarks' collector: parse, count, dedup; no field checks, no type rules."""
    config = CollectorConfig(
        application_id=APP_ID, store="count", metadata_types="off", validation="off"
    )
    with start_in_thread(config) as c:
        assert post(c, "/v1/events/batch", [event("A"), {"request": {}}]).status_code == 201
        assert post(c, "/v1/events/batch", [event("A"), {"metadata": {"k": 1}}]).status_code == 201
        assert post(c, "/v1/events/batch", [{"metadata": {"k": "s"}}]).status_code == 201
        # What it still refuses: no auth, no JSON, not a list of objects.
        assert post(c, "/v1/events/batch", [event("B")], app_id="wrong").status_code == 401
        assert post(c, "/v1/events/batch", b"[{").status_code == 400
        assert post(c, "/v1/events/batch", [1, 2]).status_code == 400
        stats = c.stats()
        assert stats["items_received"]["events"] == 5
        assert stats["records"]["events"] == 4  # "A" once, three without an id
        assert stats["duplicates"]["events"] == 1


def test_fast_count_mode_reads_ids_and_request_times_of_any_item_shape():
    """Only id and request time are read; items shaped otherwise get the full parse."""
    config = CollectorConfig(
        application_id=APP_ID, store="count", metadata_types="off", validation="off"
    )
    stamped = event("lagged")
    when = datetime.now(UTC) - timedelta(seconds=30)
    stamped["request"]["time"] = when.isoformat(timespec="milliseconds")
    # The fast read takes plain items and declines the rest (which get the full parse).
    plain = json.dumps([stamped, {"transaction_id": "other"}]).encode()
    assert _count_only_items(plain) == [
        {"transaction_id": "lagged", "request": {"time": stamped["request"]["time"]}},
        {"transaction_id": "other", "request": None},
    ]
    assert _count_only_items(b'[{"request": "not an object"}]') is None
    assert _count_only_items(b'[{"v": NaN}]') is None
    assert _count_only_items(b'[{"v": "\xff"}]') is None
    deep = b'[{"v": ' + b"[" * 5000 + b"]" * 5000 + b"}]"
    assert _count_only_items(deep) is None  # too deep for msgspec: the full parse answers
    with start_in_thread(config) as c:
        odd = [{"transaction_id": "odd", "request": "not an object"}, {"transaction_id": 7}]
        assert post(c, "/v1/events/batch", odd).status_code == 201
        twice = [stamped, stamped, {"transaction_id": "other"}]
        assert post(c, "/v1/events/batch", twice).status_code == 201
        assert post(c, "/v1/events/batch", [{"transaction_id": "odd"}]).status_code == 201
        stats = c.stats()
        assert stats["items_received"]["events"] == 6
        assert stats["records"]["events"] == 4  # odd, 7, lagged, other
        assert stats["duplicates"]["events"] == 2
        lags = stats["arrival_lag_ms"]["events"]
        assert lags["count"] == 2  # the stamped item twice; the others have no request time
        assert 30_000 <= lags["p50"] <= lags["max"] < 90_000
        # Upserts are keyed by their own ids, which the fast read does not keep.
        users = [{"user_id": "u1"}, {"user_id": "u2"}, {"user_id": "u1"}]
        assert post(c, "/v1/users/batch", users).status_code == 201
        companies = [{"company_id": "c1"}]
        assert post(c, "/v1/companies/batch", companies).status_code == 201
        assert c.stats()["records"]["users"] == 2
        assert c.stats()["records"]["companies"] == 1
        # Nested deeper than msgspec goes: the full parse's answer, not an internal error.
        deep = b'[{"v": ' + b"[" * 5000 + b"]" * 5000 + b"}]"
        assert post(c, "/v1/events/batch", deep).status_code == 400


def test_fast_count_mode_without_arrival_lags_reads_only_ids_and_counts_alike():
    """The benchmarks' setting: no lags kept, so only the id is read; counts are the same."""
    plain = json.dumps([event("a"), {"transaction_id": "b", "request": "any"}]).encode()
    assert _count_only_items(plain, times=False) == [
        {"transaction_id": "a"},
        {"transaction_id": "b"},
    ]
    assert _count_only_items(b'[{"v": NaN}]', times=False) is None
    assert _count_only_items(b'[1, {"transaction_id": "x"}]', times=False) is None
    config = CollectorConfig(
        application_id=APP_ID,
        store="count",
        metadata_types="off",
        validation="off",
        arrival_lags=False,
    )
    with start_in_thread(config) as c:
        batch = [event("A"), event("A"), {"transaction_id": ""}, {"request": {}}, event("B")]
        assert post(c, "/v1/events/batch", batch).status_code == 201
        assert post(c, "/v1/events/batch", [event("B"), event("C")]).status_code == 201
        assert post(c, "/v1/events/batch", [1, 2]).status_code == 400
        stats = c.stats()
        assert stats["items_received"]["events"] == 7
        assert stats["records"]["events"] == 5  # A, B, C and the two without an id
        assert stats["duplicates"]["events"] == 2


def test_fast_count_mode_parses_as_strictly_as_the_others():
    """orjson reads this mode's bodies; what it refuses gets the standard library's answer."""
    config = CollectorConfig(
        application_id=APP_ID, store="count", metadata_types="off", validation="off"
    )
    with start_in_thread(config) as c:
        bom = b"\xef\xbb\xbf" + json.dumps([event("bom")]).encode()
        assert post(c, "/v1/events/batch", bom).status_code == 201
        big = b'[{"transaction_id": "big", "metadata": {"n": 123456789012345678901234567890}}]'
        assert post(c, "/v1/events/batch", big).status_code == 201
        for body, words in (
            (b'[{"transaction_id": "x", "metadata": {"v": NaN}}]', "NaN is not valid JSON"),
            (b'[{"transaction_id": "\\ud800"}]', "unpaired UTF-16 surrogate"),
            (b"[\xff]", "not UTF-8"),
        ):
            answer = post(c, "/v1/events/batch", body)
            assert answer.status_code == 400
            assert words in answer.json()["error"]
        # gzip is inflated by ISA-L here: corrupt, truncated and two-member bodies alike.
        text = json.dumps([event("g1"), event("g2")]).encode()
        two_members = gzip.compress(text[:40]) + gzip.compress(text[40:])
        for body, words in (
            (two_members, ""),
            (b"\x1f\x8b\x08\x00garbage", "could not be decoded as gzip"),
            (gzip.compress(b'[{"a": 1}]')[:-12], "truncated"),
        ):
            answer = requests.post(
                c.url + "/v1/events/batch",
                data=body,
                headers={
                    "Content-Type": JSON,
                    "Content-Encoding": "gzip",
                    "X-Moesif-Application-Id": APP_ID,
                },
                timeout=10,
            )
            if not words:
                assert answer.status_code == 201
                continue
            assert answer.status_code == 400
            assert words in answer.json()["error"]
        assert c.stats()["records"]["events"] == 4


def test_inspection_routes_and_reset(collector):
    post(collector, "/v1/events/batch", [event(str(i)) for i in range(5)])
    page = requests.get(
        collector.url + "/_emulator/records",
        params={"kind": "events", "limit": 2, "offset": 1},
        timeout=10,
    )
    assert [e["transaction_id"] for e in page.json()] == ["1", "2"]
    stats = requests.get(collector.url + "/_emulator/stats", timeout=10).json()
    assert stats == collector.stats()
    assert stats["records"]["events"] == 5
    assert stats["items_received"]["events"] == 5
    bad = requests.get(collector.url + "/_emulator/records", params={"kind": "nope"}, timeout=10)
    assert bad.status_code == 400
    reset = requests.post(collector.url + "/_emulator/reset", timeout=10)
    assert reset.status_code == 200
    assert collector.records("events") == []
    assert collector.stats()["requests"] == {}
    with pytest.raises(ValueError, match="kind"):
        collector.records("sessions")


def test_verbose_logs_one_line_per_request_without_headers(caplog):
    caplog.set_level(logging.INFO, logger="moesif_beam.runners.emulators.collector")
    with start_in_thread(CollectorConfig(application_id=APP_ID), verbose=True) as c:
        post(c, "/v1/events/batch", [event("a"), event("b")])
        post(c, "/v1/events/batch", [event("a")], app_id="wrong-id")
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "moesif_beam.runners.emulators.collector"
    ]
    assert lines == [
        "POST /v1/events/batch -> 201 (2 items)",
        "POST /v1/events/batch -> 401 (0 items)",
    ]
    assert APP_ID not in caplog.text
    assert "wrong-id" not in caplog.text


def test_quiet_by_default(caplog, capfd):
    caplog.set_level(logging.DEBUG - 5)
    with start_in_thread(CollectorConfig(application_id=APP_ID, drop_first=1)) as c:
        with pytest.raises(requests.ConnectionError):
            post(c, "/v1/events/batch", [event()])
        post(c, "/v1/events/batch", [event()])
    captured = capfd.readouterr()
    assert (captured.out, captured.err) == ("", "")
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]


# ---- command line ---------------------------------------------------------------------------


def test_cli_inspect_prints_stats_and_records(collector, capsys):
    post(collector, "/v1/events/batch", [event("a"), event("b"), event("c")])
    assert main(["--inspect", collector.url + "/", "--kind", "events", "--limit", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stats"]["records"]["events"] == 3
    assert report["kind"] == "events"
    assert [e["transaction_id"] for e in report["records"]] == ["a", "b"]


def test_cli_inspect_reports_an_unreachable_emulator(capsys):
    assert main(["--inspect", f"http://127.0.0.1:{free_port()}"]) == 1
    assert "cannot inspect" in capsys.readouterr().err


def test_cli_rejects_invalid_settings(capsys):
    assert main(["--fail_rate", "2", "--application_id", APP_ID]) == 2
    err = capsys.readouterr().err
    assert "fail_rate must be in [0, 1]" in err
    assert APP_ID not in err


def test_module_runs_as_a_service_and_stops_on_sigterm(tmp_path):
    port = free_port()
    data_dir = tmp_path / "collector-data"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moesif_beam.runners.emulators.collector",
            "--port",
            str(port),
            "--data_dir",
            str(data_dir),
            "--application_id",
            APP_ID,
            "--verbose",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "the emulator never printed its listening line"
        line = proc.stdout.readline().strip()
        url = f"http://127.0.0.1:{port}"
        assert line == f"collector listening on {url} (data in {data_dir.resolve()})"
        response = requests.post(
            url + "/v1/events/batch",
            data=gzip.compress(json.dumps([event("A"), event("B")]).encode()),
            headers={
                "Content-Type": JSON,
                "Content-Encoding": "gzip",
                "X-Moesif-Application-Id": APP_ID,
            },
            timeout=10,
        )
        assert response.status_code == 201
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert out == ""  # the listening line was the only output
    assert "POST /v1/events/batch -> 201 (2 items)" in err
    assert APP_ID not in line + out + err
    assert (data_dir / "collector.db").exists()


# ---- metadata rules: dots in keys, first type wins --------------------------------------------

SEED_FIRST = {
    "some_string": "I am a string",
    "some_int": 77,
    "some_object": {"some_sub_field": "some_value"},
}
SEED_SECOND = {
    "some_int": 77,
    "some_object": {"some_string": 23, "some_sub_field": "some_value"},
}
_ids = iter(range(10**9))


def with_metadata(kind: str, metadata: Any) -> dict[str, Any]:
    """An event or action carrying ``metadata``, with a fresh transaction id."""
    tid = f"md-{next(_ids)}"
    return event(tid, metadata=metadata) if kind == "events" else action(tid, metadata=metadata)


def send(c: RunningCollector, *metadata: Any, kind: str = "events") -> requests.Response:
    """Posts one batch holding one record per metadata object."""
    return post(c, f"/v1/{kind}/batch", [with_metadata(kind, m) for m in metadata])


def conflict(response: requests.Response) -> tuple[Any, ...]:
    assert response.status_code == 400, response.text
    body = response.json()
    return body.get("index"), body["field"], body["key"], body["expected_type"], body["actual_type"]


def stored_metadata(c: RunningCollector, kind: str = "events") -> list[Any]:
    return [record.get("metadata") for record in c.records(kind)]


@pytest.mark.parametrize(
    ("first", "second"),
    [("events", "events"), ("actions", "actions"), ("events", "actions"), ("actions", "events")],
)
def test_the_documented_example_is_refused_and_events_and_actions_share_one_schema(
    collector, first, second
):
    assert post(collector, f"/v1/{first}", with_metadata(first, SEED_FIRST)).status_code == 201
    response = post(collector, f"/v1/{second}/batch", [with_metadata(second, SEED_SECOND)])
    assert response.json() == {
        "error": "metadata type conflict: key 'some_string' is string, got number",
        "index": 0,
        "field": "metadata.some_object.some_string",
        "key": "some_string",
        "expected_type": "string",
        "actual_type": "number",
    }
    assert response.status_code == 400
    # The single route names the field the same way, without an index.
    single = post(collector, f"/v1/{second}", with_metadata(second, SEED_SECOND))
    field = "metadata.some_object.some_string"
    assert conflict(single) == (None, field, "some_string", "string", "number")
    assert stored_metadata(collector, first) == [SEED_FIRST]
    assert len(collector.records("events")) + len(collector.records("actions")) == 1
    assert collector.stats()["type_conflicts"] == 2


def test_dots_in_keys_become_underscores_at_every_depth(collector):
    metadata = {
        "so.me_str.ing": "I am a string",
        "some.int": 77.23,
        "url": "https://a.example.com/x.y",  # dots in values stay
        "tags": [{"a.b": 1, "list": [{"c.d": True}]}, "x.y"],
        "deep": {"e.f": {"g.h": None}},
    }
    assert send(collector, metadata).status_code == 201
    assert stored_metadata(collector) == [
        {
            "so_me_str_ing": "I am a string",
            "some_int": 77.23,
            "url": "https://a.example.com/x.y",
            "tags": [{"a_b": 1, "list": [{"c_d": True}]}, "x.y"],
            "deep": {"e_f": {"g_h": None}},
        }
    ]
    schema = collector.stats()["metadata_schema"]
    assert schema == {
        "a_b": "number",
        "c_d": "boolean",
        "deep": "object",
        "e_f": "object",
        "list": "array",
        "so_me_str_ing": "string",
        "some_int": "number",
        "tags": "array",
        "url": "string",
    }
    assert list(schema) == sorted(schema)
    # The converted name is the tracked one, whichever spelling arrives later.
    assert conflict(send(collector, {"so_me_str.ing": 5})) == (
        0,
        "metadata.so_me_str_ing",
        "so_me_str_ing",
        "string",
        "number",
    )


def test_a_key_collision_after_conversion_keeps_the_later_value_only(collector):
    # "a.b" and "a_b" collide; only the surviving value is checked, so 1 does not clash with "x".
    assert send(collector, {"a.b": 1, "a_b": "x", "n": {"c_d": 2, "c.d": False}}).status_code == 201
    assert stored_metadata(collector) == [{"a_b": "x", "n": {"c_d": False}}]
    assert collector.stats()["metadata_schema"] == {
        "a_b": "string",
        "c_d": "boolean",
        "n": "object",
    }


def test_ints_and_floats_are_both_numbers_and_booleans_are_not(collector):
    assert send(collector, {"n": 1}, {"n": 2.5}, {"n": -3e20}, {"flag": True}).status_code == 201
    assert send(collector, {"n": 7.0, "flag": False}).status_code == 201
    assert conflict(send(collector, {"n": True})) == (0, "metadata.n", "n", "number", "boolean")
    assert conflict(send(collector, {"flag": 1})) == (
        0,
        "metadata.flag",
        "flag",
        "boolean",
        "number",
    )
    assert conflict(send(collector, {"flag": "true"}))[3:] == ("boolean", "string")


def test_null_matches_any_type_and_establishes_none(collector):
    assert send(collector, {"x": None}, {"y": {"x": None}}).status_code == 201
    assert "x" not in collector.stats()["metadata_schema"]
    assert send(collector, {"x": [1]}, {"x": None}).status_code == 201
    assert conflict(send(collector, {"x": "s"})) == (0, "metadata.x", "x", "array", "string")
    assert send(collector, {"x": None}).status_code == 201


def test_keys_are_tracked_by_name_inside_objects_and_arrays(collector):
    assert (
        send(collector, {"tags": [{"id": "a"}, {"id": "b", "meta": {"rank": 1}}]}).status_code
        == 201
    )
    assert conflict(send(collector, {"id": 5})) == (0, "metadata.id", "id", "string", "number")
    assert conflict(send(collector, {"other": [[{"rank": "top"}]]})) == (
        0,
        "metadata.other.0.0.rank",
        "rank",
        "number",
        "string",
    )
    assert conflict(send(collector, {"x": {"tags": {}}})) == (
        0,
        "metadata.x.tags",
        "tags",
        "array",
        "object",
    )
    # Scalars inside arrays have no key, so arrays of any scalars are fine.
    assert send(collector, {"tags": ["a", 1, True, None]}).status_code == 201


def test_an_item_teaches_the_items_after_it_in_the_same_batch(collector):
    assert conflict(send(collector, {"a": "x"}, {"b": 1}, {"a": 1})) == (
        2,
        "metadata.a",
        "a",
        "string",
        "number",
    )
    assert collector.records("events") == []
    assert collector.stats()["metadata_schema"] == {}


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"id": "x", "nested": {"id": 1}}, ("metadata.nested.id", "string", "number")),
        ({"nested": {"id": 1}, "id": "x"}, ("metadata.id", "number", "string")),
        ({"l": [{"v": 1}, {"v": "2"}]}, ("metadata.l.1.v", "number", "string")),
    ],
)
def test_one_record_can_conflict_with_itself(collector, metadata, expected):
    field, expected_type, actual_type = expected
    response = send(collector, {"fine": 1}, metadata)
    assert conflict(response) == (1, field, field.rsplit(".", 1)[1], expected_type, actual_type)


def test_a_refused_batch_stores_nothing_and_teaches_nothing(collector):
    collector.seed_schema({"plan": "string"})
    response = send(collector, {"fresh": 1, "more": {"x": True}}, {"plan": 3})
    assert conflict(response)[:2] == (1, "metadata.plan")
    assert collector.records("events") == []
    assert collector.stats()["metadata_schema"] == {"plan": "string"}
    # A batch refused by ordinary validation teaches nothing either.
    broken = [with_metadata("events", {"other": 1}), {"request": {}, "metadata": {"x": 1}}]
    assert post(collector, "/v1/events/batch", broken).status_code == 400
    # So the keys of both refused batches are still free to take any type.
    assert (
        send(collector, {"fresh": "now a string", "more": 1, "other": [], "x": {}}).status_code
        == 201
    )
    stats = collector.stats()
    assert stats["metadata_schema"] == {
        "fresh": "string",
        "more": "number",
        "other": "array",
        "plan": "string",
        "x": "object",
    }
    assert stats["type_conflicts"] == 1  # the validation failure is not a type conflict
    assert stats["requests"]["/v1/events/batch"] == {"201": 1, "400": 2}


def test_only_event_and_action_metadata_is_checked(collector):
    user = {"user_id": "u", "metadata": {"a.b": 1, "plan": 1}}
    assert post(collector, "/v1/users", user).status_code == 201
    company = {"company_id": "c", "metadata": {"plan": {"x": 1}}}
    assert post(collector, "/v1/companies", company).status_code == 201
    bodies = event("body", metadata={"plan": "pro"})
    bodies["request"]["body"] = {"plan": 1}
    bodies["response"]["body"] = {"plan": [1]}
    assert post(collector, "/v1/events", bodies).status_code == 201
    assert collector.stats()["metadata_schema"] == {"plan": "string"}
    assert collector.records("users") == [user]  # profile metadata keys are not converted


def test_a_known_shape_still_checks_the_objects_inside_it(collector):
    # The first batch teaches the types, the second makes the shape {"o": object} known ...
    assert send(collector, {"o": {"a": 1}}).status_code == 201
    assert send(collector, {"o": {"a": 2}}, {"o": {"a": 3}}).status_code == 201
    # ... which must not wave through a nested value of another type.
    assert conflict(send(collector, {"o": {"a": "x"}})) == (
        0,
        "metadata.o.a",
        "a",
        "number",
        "string",
    )
    assert conflict(send(collector, {"o": {"a": 1}}, {"o": {"a": False}}))[:2] == (
        1,
        "metadata.o.a",
    )


def test_reset_clears_the_schema(collector):
    assert send(collector, {"a": 1}).status_code == 201
    assert send(collector, {"a": 2}).status_code == 201
    assert requests.post(collector.url + "/_emulator/reset", timeout=10).status_code == 200
    stats = collector.stats()
    assert (stats["metadata_schema"], stats["type_conflicts"]) == ({}, 0)
    assert send(collector, {"a": "now a string"}).status_code == 201
    assert conflict(send(collector, {"a": 3}))[3:] == ("string", "number")


def test_the_schema_survives_a_restart_with_the_same_data_dir(tmp_path):
    config = CollectorConfig(application_id=APP_ID, data_dir=str(tmp_path / "data"))
    with start_in_thread(config) as first:
        assert send(first, SEED_FIRST).status_code == 201
        first.seed_schema({"seeded": "boolean"})
    with start_in_thread(config) as second:
        assert second.stats()["metadata_schema"] == {
            "seeded": "boolean",
            "some_int": "number",
            "some_object": "object",
            "some_string": "string",
            "some_sub_field": "string",
        }
        assert conflict(send(second, SEED_SECOND))[2] == "some_string"
        assert conflict(send(second, {"seeded": "yes"}, kind="actions"))[2] == "seeded"
        assert send(second, {"learned_after_restart": 1}).status_code == 201
        second.reset()
    with start_in_thread(config) as third:
        assert third.stats()["metadata_schema"] == {}  # the reset was persisted too


@pytest.mark.parametrize("data_dir", [None, "dir"], ids=["memory", "file"])
def test_sqlite_keeps_the_schema_in_its_own_table(tmp_path, data_dir):
    import sqlite3

    config = CollectorConfig(
        application_id=APP_ID, data_dir=None if data_dir is None else str(tmp_path / data_dir)
    )
    with start_in_thread(config) as c:
        assert send(c, {"a": "x", "b": {"c": 1}}).status_code == 201
        assert c.stats()["metadata_schema"] == {"a": "string", "b": "object", "c": "number"}
    if data_dir is not None:
        with sqlite3.connect(tmp_path / data_dir / "collector.db") as db:
            rows = db.execute("SELECT key, type FROM metadata_schema ORDER BY key").fetchall()
        assert rows == [("a", "string"), ("b", "object"), ("c", "number")]


def test_count_store_enforces_types_in_memory():
    with start_in_thread(CollectorConfig(application_id=APP_ID, store="count")) as c:
        assert send(c, {"a.b": "x"}).status_code == 201
        assert conflict(send(c, {"a_b": 1}, kind="actions"))[2:] == ("a_b", "string", "number")
        stats = c.stats()
        assert stats["metadata_schema"] == {"a_b": "string"}
        assert (stats["records"]["events"], stats["type_conflicts"]) == (1, 1)


def test_metadata_types_off_converts_dots_but_checks_nothing():
    config = CollectorConfig(application_id=APP_ID, metadata_types="off")
    with start_in_thread(config) as c:
        assert send(c, {"some.key": "x", "l": [{"d.e": 1}]}, {"some_key": 1}).status_code == 201
        assert send(c, {"some_key": [True]}, kind="actions").status_code == 201
        assert stored_metadata(c) == [{"some_key": "x", "l": [{"d_e": 1}]}, {"some_key": 1}]
        stats = c.stats()
        assert (stats["metadata_schema"], stats["type_conflicts"]) == ({}, 0)


def test_seed_schema_adds_unknown_keys_only(collector):
    assert send(collector, {"plan": "pro"}).status_code == 201
    result = collector.seed_schema({"plan": "number", "seats": "number", "a.b": "array"})
    assert result == {"a_b": "array", "plan": "string", "seats": "number"}  # first type wins
    assert conflict(send(collector, {"seats": "10"}))[2:] == ("seats", "number", "string")
    with pytest.raises(ValueError, match="must map to one of string, number"):
        collector.seed_schema({"fine": "string", "bad": "integer"})
    assert "fine" not in collector.stats()["metadata_schema"]  # all or nothing
    assert METADATA_TYPES == ("string", "number", "boolean", "object", "array")


def test_post_emulator_schema_seeds_without_auth(collector):
    url = collector.url + "/_emulator/schema"
    response = requests.post(url, json={"user.tier": "string", "score": "number"}, timeout=10)
    assert response.status_code == 200
    assert response.json() == {"score": "number", "user_tier": "string"}
    again = requests.post(url, json={"score": "boolean", "active": "boolean"}, timeout=10)
    assert again.json() == {"active": "boolean", "score": "number", "user_tier": "string"}
    assert conflict(send(collector, {"user.tier": 3}))[1:] == (
        "metadata.user_tier",
        "user_tier",
        "string",
        "number",
    )
    for bad in (b"[]", b'{"k": "int"}', b'{"k": 1}', b"{nope"):
        answer = requests.post(url, data=bad, timeout=10)
        assert answer.status_code == 400, bad
        assert "error" in answer.json()
    assert requests.get(url, timeout=10).status_code == 405
    assert collector.stats()["metadata_schema"] == {
        "active": "boolean",
        "score": "number",
        "user_tier": "string",
    }
    assert collector.stats()["requests"] == {"/v1/events/batch": {"400": 1}}


def test_stats_report_the_schema_and_conflicts_over_http(collector):
    assert send(collector, {"z": 1, "a": {"m": "x"}}).status_code == 201
    assert send(collector, {"z": "1"}).status_code == 400
    assert post(collector, "/v1/actions", with_metadata("actions", {"m": [1]})).status_code == 400
    stats = requests.get(collector.url + "/_emulator/stats", timeout=10).json()
    assert stats == collector.stats()
    assert stats["metadata_schema"] == {"a": "object", "m": "string", "z": "number"}
    assert list(stats["metadata_schema"]) == ["a", "m", "z"]
    assert stats["type_conflicts"] == 2


def test_metadata_type_conflict_is_a_validation_error():
    exc = MetadataTypeConflict("k", "string", "number", "metadata.k", 3)
    assert isinstance(exc, ValidationError)
    assert exc.to_json() == {
        "error": "metadata type conflict: key 'k' is string, got number",
        "index": 3,
        "field": "metadata.k",
        "key": "k",
        "expected_type": "string",
        "actual_type": "number",
    }


def test_concurrent_conflicting_batches_let_exactly_one_type_win(collector):
    threads_per_round = 16
    errors: list[BaseException] = []

    def worker(n: int, key: str, barrier: threading.Barrier, outcomes: dict[int, int]) -> None:
        try:
            # Odd threads send a string, even ones a number, over both the events and
            # actions routes; the barrier releases them all at once.
            value: Any = "s" if n % 2 else n
            kind = "events" if n % 4 < 2 else "actions"
            body = json.dumps([with_metadata(kind, {"other": n, key: value})]).encode()
            barrier.wait(timeout=10)
            outcomes[n] = post(collector, f"/v1/{kind}/batch", body).status_code
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    for round_number in range(4):
        key = f"race_{round_number}"
        barrier = threading.Barrier(threads_per_round)
        outcomes: dict[int, int] = {}
        threads = [
            threading.Thread(target=worker, args=(n, key, barrier, outcomes))
            for n in range(threads_per_round)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        winner = collector.stats()["metadata_schema"][key]
        wins_with = 1 if winner == "string" else 0
        for n, status in outcomes.items():
            assert status == (201 if n % 2 == wins_with else 400), (n, winner, status)
    stored = stored_metadata(collector, "events") + stored_metadata(collector, "actions")
    assert len(stored) == 4 * threads_per_round // 2
    assert collector.stats()["type_conflicts"] == 4 * threads_per_round // 2


def test_cli_parses_metadata_types(capsys):
    from moesif_beam.runners.emulators.collector.cli import _build_parser, _config_from_args

    parser = _build_parser()
    assert _config_from_args(parser.parse_args([])).metadata_types == "enforce"
    assert _config_from_args(parser.parse_args(["--metadata_types", "off"])).metadata_types == "off"
    with pytest.raises(SystemExit) as exited:
        main(["--metadata_types", "strict"])
    assert exited.value.code == 2
    assert "--metadata_types" in capsys.readouterr().err


def test_stats_report_how_long_after_their_request_time_records_arrived(collector):
    def stamped(seconds_ago: float) -> str:
        when = datetime.now(UTC) - timedelta(seconds=seconds_ago)
        return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    events = [event(f"lag-{i}") for i in range(3)]
    for i, record in enumerate(events):
        record["request"]["time"] = stamped(2 + i)
    assert post(collector, "/v1/events/batch", events).status_code == 201
    late_action = action("lag-a")
    late_action["request"]["time"] = stamped(5)
    assert post(collector, "/v1/actions", late_action).status_code == 201

    lags = collector.stats()["arrival_lag_ms"]
    assert lags["events"]["count"] == 3
    # Seconds 2, 3 and 4 ago when stamped; the request itself takes well under 10 s.
    assert 2000 <= lags["events"]["p50"] - 1000 < 12_000
    assert 4000 <= lags["events"]["max"] < 14_000
    assert lags["events"]["p50"] <= lags["events"]["p99"] <= lags["events"]["max"]
    assert lags["actions"]["count"] == 1
    assert 5000 <= lags["actions"]["max"] < 15_000
    requests.post(collector.url + "/_emulator/reset", timeout=10)
    assert collector.stats()["arrival_lag_ms"] == {"events": {"count": 0}, "actions": {"count": 0}}


def test_arrival_lags_can_be_left_out_and_records_still_count():
    # The throughput benchmarks do not read the lags; without them each event's request
    # time is not parsed, and everything else is counted as before.
    config = CollectorConfig(
        store="count", metadata_types="off", validation="off", arrival_lags=False
    )
    with start_in_thread(config) as running:
        events = [event(f"no-lag-{i}") for i in range(4)]
        assert post(running, "/v1/events/batch", [*events, events[0]]).status_code == 201
        stats = running.stats()
    assert stats["items_stored"]["events"] == 4
    assert stats["arrival_lag_ms"]["events"] == {"count": 0}
