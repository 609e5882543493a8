"""The action formats (Moesif Collector API actions, Segment track calls), as pure functions."""

from __future__ import annotations

import copy
import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from moesif_beam.transforms.common.errors import InvalidRecord
from moesif_beam.transforms.formats import moesif_actions, segment, wso2
from moesif_beam.transforms.formats.moesif_actions import ACTIONS_NAMESPACE
from moesif_beam.transforms.formats.segment import SEGMENT_NAMESPACE

SAMPLES = Path(__file__).resolve().parents[2] / "samples"

# Moesif's "Send a Batch of Actions" example, exactly as its docs print it.
SEED_BATCH: list[dict[str, Any]] = [
    {
        "action_name": "Processed Payment Transaction",
        "request": {"time": "2024-03-01T04:45:42.914"},
        "company_id": "12345",
        "transaction_id": "a3765025-46ec-45dd-bc83-b136c8d1d257",
        "metadata": {"amount": 24.6, "currency": "USD", "time_seconds": 66.3},
    },
    {
        "action_name": "Processed Payment Transaction",
        "request": {"time": "2024-03-01T04:46:42.914"},
        "company_id": "67890",
        "transaction_id": "f47ac10b-58cc-4372-a567-0e02b2c3d479",
        "metadata": {"amount": 674.12, "currency": "USD", "time_seconds": 25.9},
    },
]

# What moesif-browser-js sends for moesif.track('Clicked Sign Up', {...}).
BROWSER_ACTION: dict[str, Any] = {
    "action_name": "Clicked Sign Up",
    "request": {
        "uri": "https://www.example.com/pricing",
        "verb": "GET",
        "user_agent_string": "Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101",
        "time": "2026-11-01T08:12:05.331Z",
    },
    "anonymous_id": "a1f4c9e2-55b0-4d8e-b7a3-0e6c2d9f1b48",
    "session_token": "sess_8Hq2LmZx91",
    "metadata": {"button_label": "Get Started", "sign_up_method": "Google SSO"},
}

TRACK: dict[str, Any] = {
    "type": "track",
    "event": "Order Completed",
    "userId": "usr_7720",
    "anonymousId": "b1e7c4a9-2d6f-4e83-a05c-9f3b8d2e1c67",
    "messageId": "C3D5E7F9-1A2B-4C3D-8E5F-6A7B8C9D0E1F",
    "timestamp": "2026-11-01T09:14:22.568Z",
    "originalTimestamp": "2026-11-01T09:14:22.100Z",
    "sentAt": "2026-11-01T09:14:22.610Z",
    "receivedAt": "2026-11-01T09:14:22.902Z",
    "properties": {"order_id": "o-1", "revenue": 25.0, "products": [{"sku": "45790-32"}]},
    "context": {
        "ip": "198.51.100.64",
        "userAgent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64)",
        "page": {
            "url": "https://shop.example.com/checkout/complete",
            "path": "/checkout/complete",
            "referrer": "https://shop.example.com/checkout",
            "title": "Thank you",
        },
        "groupId": "cmp_initech",
        "traits": {"company": {"id": "cmp_from_traits"}, "company_id": "cmp_flat"},
        "library": {"name": "analytics.js", "version": "npm:next-1.74.0"},
    },
    "integrations": {"All": True},
    "groupId": "cmp_top",
}

OUTPUT_ORDER = [
    "transaction_id",
    "action_name",
    "request",
    "user_id",
    "company_id",
    "subscription_id",
    "session_token",
    "anonymous_id",
    "metadata",
]


def _track(**changes: Any) -> dict[str, Any]:
    call = copy.deepcopy(TRACK)
    for key, value in changes.items():
        if value is None:
            call.pop(key, None)
        else:
            call[key] = value
    return call


def _is_ordered(action: dict[str, Any]) -> bool:
    positions = [OUTPUT_ORDER.index(key) for key in action]
    return positions == sorted(positions)


# --- the Moesif action format -------------------------------------------------------------


def test_seed_batch_maps_field_for_field():
    records = moesif_actions.split(SEED_BATCH)
    assert [prefix for _, prefix in records] == ["[0]", "[1]"]
    first_id, first_ms, first = moesif_actions.to_moesif_action(records[0][0])
    assert first_id == "a3765025-46ec-45dd-bc83-b136c8d1d257"
    assert first_ms == 1709268342914
    assert first == {
        "transaction_id": first_id,
        "action_name": "Processed Payment Transaction",
        "request": {"time": "2024-03-01T04:45:42.914Z"},
        "company_id": "12345",
        "metadata": {"amount": 24.6, "currency": "USD", "time_seconds": 66.3},
    }
    assert list(first) == ["transaction_id", "action_name", "request", "company_id", "metadata"]
    second_id, second_ms, second = moesif_actions.to_moesif_action(records[1][0])
    assert second_id == "f47ac10b-58cc-4372-a567-0e02b2c3d479"
    assert second_ms == first_ms + 60_000
    assert second["request"] == {"time": "2024-03-01T04:46:42.914Z"}
    assert second["company_id"] == "67890"
    assert second["metadata"] == SEED_BATCH[1]["metadata"]


def test_mapping_does_not_mutate_the_input():
    record = copy.deepcopy(BROWSER_ACTION)
    record["metadata"]["a.b"] = 1
    before = copy.deepcopy(record)
    moesif_actions.to_moesif_action(record)
    assert record == before


def test_browser_action_keeps_request_context_and_ids():
    tid, time_ms, action = moesif_actions.to_moesif_action(BROWSER_ACTION)
    # request: the known keys first, in Moesif's order; moesif-browser-js's verb kept after
    assert list(action["request"].items()) == [
        ("time", "2026-11-01T08:12:05.331Z"),
        ("uri", "https://www.example.com/pricing"),
        ("user_agent_string", BROWSER_ACTION["request"]["user_agent_string"]),
        ("verb", "GET"),
    ]
    assert time_ms == 1793520725331
    assert action["session_token"] == "sess_8Hq2LmZx91"
    assert action["anonymous_id"] == BROWSER_ACTION["anonymous_id"]
    assert action["metadata"] == BROWSER_ACTION["metadata"]
    assert action["transaction_id"] == tid
    assert _is_ordered(action)


def test_all_fields_in_canonical_order_and_unknown_top_level_keys_dropped():
    record = {
        "metadata": {"k": 1},
        "anonymous_id": "anon",
        "session_token": "tok",
        "subscription_id": "sub",
        "company_id": "cmp",
        "user_id": "usr",
        "request": {"ip_address": "192.0.2.1", "time": "2026-11-05T01:02:03Z"},
        "action_name": "Renewed",
        "transaction_id": "9e3a5c7d-1f4b-4d8c-a0e2-3c5e7a9b1d4f",
        "weight": 3,
        "direction": "Incoming",
    }
    _, _, action = moesif_actions.to_moesif_action(record)
    assert list(action) == OUTPUT_ORDER
    assert "weight" not in action
    assert "direction" not in action
    assert action["request"] == {"time": "2026-11-05T01:02:03.000Z", "ip_address": "192.0.2.1"}


@pytest.mark.parametrize(
    ("given", "canonical", "millis"),
    [
        ("2026-11-01T04:45:42.914", "2026-11-01T04:45:42.914Z", 1793508342914),
        ("2026-11-01T10:15:42.914+05:30", "2026-11-01T04:45:42.914Z", 1793508342914),
        ("2026-11-01T04:45Z", "2026-11-01T04:45:00.000Z", 1793508300000),
        ("2026-11-01T04:45:42.914123456Z", "2026-11-01T04:45:42.914Z", 1793508342914),
        (1793508342914, "2026-11-01T04:45:42.914Z", 1793508342914),
        (1793508342, "2026-11-01T04:45:42.000Z", 1793508342000),
    ],
)
def test_request_time_is_parsed_leniently_and_sent_canonically(given, canonical, millis):
    record = {"action_name": "A", "request": {"time": given}}
    _, time_ms, action = moesif_actions.to_moesif_action(record)
    assert time_ms == millis
    assert action["request"]["time"] == canonical


@pytest.mark.parametrize("request_value", [None, {}, {"time": None}, {"time": ""}])
def test_missing_request_or_time_is_valid_and_has_no_time(request_value):
    record: dict[str, Any] = {"action_name": "Opened Dashboard"}
    if request_value is not None:
        record["request"] = request_value
    tid, time_ms, action = moesif_actions.to_moesif_action(record)
    assert time_ms is None
    assert action["request"] == {}
    assert action["metadata"] == {}
    assert uuid.UUID(tid).version == 5


def test_ids_become_strings_and_empty_ids_are_absent():
    record = {
        "action_name": "Sent Message",
        "transaction_id": "",
        "user_id": 1042,
        "company_id": 67890.5,
        "subscription_id": "",
        "session_token": None,
        "anonymous_id": "anon-1",
    }
    tid, _, action = moesif_actions.to_moesif_action(record)
    assert action["user_id"] == "1042"
    assert action["company_id"] == "67890.5"
    assert "subscription_id" not in action
    assert "session_token" not in action
    assert action["anonymous_id"] == "anon-1"
    # an empty transaction_id is absent: the id is derived, not ""
    assert tid == action["transaction_id"]
    assert uuid.UUID(tid).version == 5


def test_numeric_transaction_id_is_kept_as_a_string():
    tid, _, action = moesif_actions.to_moesif_action({"action_name": "A", "transaction_id": 42})
    assert tid == action["transaction_id"] == "42"


def test_derived_ids_are_deterministic_and_content_sensitive():
    record = {
        "action_name": "Paid",
        "request": {"time": "2026-11-01T00:00:00Z"},
        "metadata": {"a": 1},
    }
    reordered = {
        "metadata": {"a": 1},
        "request": {"time": "2026-11-01T00:00:00Z"},
        "action_name": "Paid",
    }
    changed = {
        "action_name": "Paid",
        "request": {"time": "2026-11-01T00:00:00Z"},
        "metadata": {"a": 2},
    }
    first, _, _ = moesif_actions.to_moesif_action(record)
    again, _, _ = moesif_actions.to_moesif_action(copy.deepcopy(record))
    other_order, _, _ = moesif_actions.to_moesif_action(reordered)
    different, _, _ = moesif_actions.to_moesif_action(changed)
    assert first == again == other_order
    assert first != different
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert first == str(uuid.uuid5(ACTIONS_NAMESPACE, canonical))


def test_each_format_has_its_own_fixed_namespace():
    namespaces = {ACTIONS_NAMESPACE, SEGMENT_NAMESPACE, wso2.WSO2_NAMESPACE}
    assert len(namespaces) == 3
    # the same content derives different ids in different formats
    call = {"event": "Paid"}
    action = {"action_name": "Paid"}
    assert segment.to_moesif_action(call)[0] != moesif_actions.to_moesif_action(action)[0]


def test_dots_in_metadata_keys_become_underscores_at_every_depth():
    record = {
        "action_name": "Configured Webhook",
        "metadata": {
            "so.me_str.ing": "I am a string",
            "some.int": 77.23,
            "webhook": {"target.url": "https://hooks.example.com/a.b", "events": [{"x.y": 1}]},
        },
    }
    _, _, action = moesif_actions.to_moesif_action(record)
    assert action["metadata"] == {
        "so_me_str_ing": "I am a string",
        "some_int": 77.23,
        "webhook": {"target_url": "https://hooks.example.com/a.b", "events": [{"x_y": 1}]},
    }


def test_seed_type_conflict_pair_maps_with_metadata_intact():
    # Detecting the conflict is the schema stage's job; the mapping must keep both as sent.
    first = {
        "action_name": "Updated Profile",
        "request": {"time": "2026-11-02T10:00:00.000Z"},
        "metadata": {
            "some_string": "I am a string",
            "some_int": 77,
            "some_object": {"some_sub_field": "some_value"},
        },
    }
    later = {
        "action_name": "Updated Profile",
        "request": {"time": "2026-11-02T14:30:00.000Z"},
        "metadata": {
            "some_int": 77,
            "some_object": {"some_string": 23, "some_sub_field": "some_value"},
        },
    }
    _, first_ms, first_action = moesif_actions.to_moesif_action(first)
    _, later_ms, later_action = moesif_actions.to_moesif_action(later)
    assert first_ms is not None and later_ms is not None
    assert first_ms < later_ms
    assert first_action["metadata"] == first["metadata"]
    assert later_action["metadata"]["some_object"]["some_string"] == 23


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"account_id": "cmp_umbrella"}, "cmp_umbrella"),
        ({"account_id": 4471}, "4471"),
        ({"account_id": ""}, None),
        ({"account_id": True}, None),
        ({"account_id": {"id": "x"}}, None),
        ({"other": "x"}, None),
    ],
)
def test_company_id_field_reads_metadata_when_there_is_no_company(metadata, expected):
    record = {"action_name": "Created API Key", "metadata": metadata}
    _, _, action = moesif_actions.to_moesif_action(record, company_id_field="account_id")
    assert action.get("company_id") == expected
    assert action["metadata"] == metadata  # the key stays in metadata
    _, _, without = moesif_actions.to_moesif_action(record)
    assert "company_id" not in without


def test_company_id_field_never_overrides_the_record_company():
    record = {"action_name": "A", "company_id": "cmp_own", "metadata": {"account_id": "cmp_meta"}}
    _, _, action = moesif_actions.to_moesif_action(record, company_id_field="account_id")
    assert action["company_id"] == "cmp_own"


@pytest.mark.parametrize(
    ("record", "field", "expected_type", "actual_type"),
    [
        ({"request": {"time": "2026-11-01T00:00:00Z"}}, "action_name", None, None),
        ({"action_name": ""}, "action_name", None, None),
        ({"action_name": 7}, "action_name", "string", "number"),
        ({"action_name": "A", "request": "https://x"}, "request", "object", "string"),
        (
            {"action_name": "A", "request": {"time": "yesterday"}},
            "request.time",
            "string",
            "string",
        ),
        ({"action_name": "A", "request": {"time": True}}, "request.time", "string", "boolean"),
        ({"action_name": "A", "request": {"uri": 5}}, "request.uri", "string", "number"),
        (
            {"action_name": "A", "request": {"ip_address": []}},
            "request.ip_address",
            "string",
            "array",
        ),
        (
            {"action_name": "A", "request": {"user_agent_string": {}}},
            "request.user_agent_string",
            "string",
            "object",
        ),
        ({"action_name": "A", "metadata": "x"}, "metadata", "object", "string"),
        ({"action_name": "A", "metadata": [1]}, "metadata", "object", "array"),
        ({"action_name": "A", "transaction_id": {"id": 1}}, "transaction_id", "string", "object"),
        ({"action_name": "A", "user_id": True}, "user_id", "string", "boolean"),
        ({"action_name": "A", "company_id": ["c"]}, "company_id", "string", "array"),
        ({"action_name": "A", "subscription_id": False}, "subscription_id", "string", "boolean"),
        ({"action_name": "A", "session_token": {}}, "session_token", "string", "object"),
        ({"action_name": "A", "anonymous_id": [1]}, "anonymous_id", "string", "array"),
    ],
)
def test_moesif_invalid_records_name_field_and_types(record, field, expected_type, actual_type):
    with pytest.raises(InvalidRecord) as info:
        moesif_actions.to_moesif_action(record)
    assert info.value.field == field
    assert info.value.expected_type == expected_type
    assert info.value.actual_type == actual_type
    assert field.rsplit(".", 1)[-1] in info.value.detail


@pytest.mark.parametrize("module", [moesif_actions, segment])
@pytest.mark.parametrize(
    ("item", "actual"),
    [("text", "string"), (3, "number"), (None, "null"), ([{}], "array"), (True, "boolean")],
)
def test_non_object_records_are_invalid_expecting_object(module, item, actual):
    with pytest.raises(InvalidRecord) as info:
        module.to_moesif_action(item)
    assert info.value.field == ""
    assert info.value.expected_type == "object"
    assert info.value.actual_type == actual


def test_moesif_split_shapes():
    one = {"action_name": "A"}
    assert moesif_actions.split(one) == [(one, "")]
    assert moesif_actions.split([one, 5, [one]]) == [(one, "[0]"), (5, "[1]"), ([one], "[2]")]
    assert moesif_actions.split([]) == []
    assert moesif_actions.split("text") == [("text", "")]
    # an object that looks like a Segment batch is still one Moesif record
    assert moesif_actions.split({"batch": [one]}) == [({"batch": [one]}, "")]


# --- the Segment format -------------------------------------------------------------------


def test_track_call_maps_to_an_action():
    tid, time_ms, action = segment.to_moesif_action(TRACK)
    assert tid == "c3d5e7f9-1a2b-4c3d-8e5f-6a7b8c9d0e1f"
    assert time_ms == 1793524462568
    assert action == {
        "transaction_id": tid,
        "action_name": "Order Completed",
        "request": {
            "time": "2026-11-01T09:14:22.568Z",
            "uri": "https://shop.example.com/checkout/complete",
            "ip_address": "198.51.100.64",
            "user_agent_string": "Mozilla/5.0 (Windows NT 10.0; Win64; x64)",
        },
        "user_id": "usr_7720",
        "company_id": "cmp_initech",
        "anonymous_id": "b1e7c4a9-2d6f-4e83-a05c-9f3b8d2e1c67",
        "metadata": TRACK["properties"],
    }
    assert _is_ordered(action)


@pytest.mark.parametrize(
    ("changes", "path", "expected"),
    [
        ({"event": "Signed Up"}, ("action_name",), "Signed Up"),
        ({"properties": {"plan": "growth"}}, ("metadata",), {"plan": "growth"}),
        ({"properties": None}, ("metadata",), {}),
        ({"userId": "usr_1"}, ("user_id",), "usr_1"),
        ({"userId": 90210}, ("user_id",), "90210"),
        ({"anonymousId": "anon-9"}, ("anonymous_id",), "anon-9"),
        ({"timestamp": "2026-11-03T01:00:00Z"}, ("request", "time"), "2026-11-03T01:00:00.000Z"),
        (
            {"timestamp": None, "originalTimestamp": "2026-11-03T02:00:00Z"},
            ("request", "time"),
            "2026-11-03T02:00:00.000Z",
        ),
        (
            {"timestamp": None, "originalTimestamp": None, "sentAt": "2026-11-03T03:00:00Z"},
            ("request", "time"),
            "2026-11-03T03:00:00.000Z",
        ),
        (
            {
                "timestamp": "",
                "originalTimestamp": None,
                "sentAt": None,
                "receivedAt": 1793635200123,
            },
            ("request", "time"),
            "2026-11-02T16:00:00.123Z",
        ),
        (
            {"context": {"page": {"url": "https://shop.example.com/a"}}},
            ("request", "uri"),
            "https://shop.example.com/a",
        ),
        ({"context": {"ip": "192.0.2.9"}}, ("request", "ip_address"), "192.0.2.9"),
        ({"context": {"userAgent": "curl/8.5"}}, ("request", "user_agent_string"), "curl/8.5"),
        (
            {"messageId": "ABCDEF01-2345-4789-ABCD-EF0123456789"},
            ("transaction_id",),
            "abcdef01-2345-4789-abcd-ef0123456789",
        ),
    ],
)
def test_segment_field_mapping_table(changes, path, expected):
    _, _, action = segment.to_moesif_action(_track(**changes))
    value: Any = action
    for key in path:
        value = value[key]
    assert value == expected


def test_segment_absent_fields_are_left_out():
    call = {"event": "Logged Out"}
    tid, time_ms, action = segment.to_moesif_action(call)
    assert time_ms is None
    assert action == {
        "transaction_id": tid,
        "action_name": "Logged Out",
        "request": {},
        "metadata": {},
    }


def test_context_and_integrations_are_not_metadata():
    _, _, action = segment.to_moesif_action(TRACK)
    flat = json.dumps(action)
    assert "library" not in flat
    assert "integrations" not in flat
    assert "referrer" not in flat
    assert set(action["metadata"]) == set(TRACK["properties"])


def test_segment_dots_in_property_keys_become_underscores():
    call = _track(properties={"experiment.id": "exp_3", "nested": {"a.b": [{"c.d": 1}]}})
    _, _, action = segment.to_moesif_action(call)
    assert action["metadata"] == {"experiment_id": "exp_3", "nested": {"a_b": [{"c_d": 1}]}}


@pytest.mark.parametrize("kind", [None, "", "track", "Track", "TRACK"])
def test_only_track_calls_become_actions(kind):
    _, _, action = segment.to_moesif_action(_track(type=kind))
    assert action["action_name"] == "Order Completed"


@pytest.mark.parametrize("kind", ["identify", "page", "screen", "group", "alias", "Identify"])
def test_other_call_types_are_invalid_naming_type(kind):
    with pytest.raises(InvalidRecord) as info:
        segment.to_moesif_action(_track(type=kind))
    assert info.value.field == "type"
    assert "only track calls" in info.value.detail
    assert kind in info.value.detail


def test_uuid_message_ids_are_kept_in_canonical_lowercase():
    for message_id in (
        "9a4f2c1e-7b3d-4e8a-a5c6-2d1f0e9b8c7a",
        "9A4F2C1E-7B3D-4E8A-A5C6-2D1F0E9B8C7A",
        "9a4F2c1E-7b3D-4e8A-a5C6-2d1F0e9B8c7A",
    ):
        tid, _, action = segment.to_moesif_action(_track(messageId=message_id))
        assert tid == action["transaction_id"] == "9a4f2c1e-7b3d-4e8a-a5c6-2d1f0e9b8c7a"


@pytest.mark.parametrize(
    "message_id",
    [
        "ajs-next-1793515925331-3f9c2a71-6d4e-4b8a-9e1f-0c2d5a7b8e64",
        "ajs-6f8c1e5b2d9a47e3b0c4d7f1a2e5b8c9",
        "9a4f2c1e7b3d4e8aa5c62d1f0e9b8c7a",  # a UUID without hyphens is not kept
        "{9a4f2c1e-7b3d-4e8a-a5c6-2d1f0e9b8c7a}",
        "9a4f2c1e-7b3d-4e8a-a5c6-2d1f0e9b8c7g",  # not hex
        "9a4f2c1e-7b3d-4e8a-a5c6-2d1f0e9b8c-a",  # a hyphen where a digit belongs
        "9a4f2c1e-7b3d-4e8a-a5c6_2d1f0e9b8c7a",
    ],
)
def test_other_message_ids_are_hashed_deterministically(message_id):
    tid, _, _ = segment.to_moesif_action(_track(messageId=message_id))
    again, _, _ = segment.to_moesif_action(_track(messageId=message_id, event="Other"))
    assert tid == again == str(uuid.uuid5(SEGMENT_NAMESPACE, message_id))
    assert uuid.UUID(tid).version == 5


def test_numeric_message_id_is_hashed_as_its_string():
    tid, _, _ = segment.to_moesif_action(_track(messageId=12345))
    assert tid == str(uuid.uuid5(SEGMENT_NAMESPACE, "12345"))


def test_calls_without_message_id_get_a_content_id():
    call = _track(messageId=None)
    tid, _, _ = segment.to_moesif_action(call)
    empty_id, _, _ = segment.to_moesif_action({**call, "messageId": ""})
    changed, _, _ = segment.to_moesif_action(_track(messageId=None, event="Order Refunded"))
    canonical = json.dumps(call, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert tid == str(uuid.uuid5(SEGMENT_NAMESPACE, canonical))
    assert segment.to_moesif_action(copy.deepcopy(call))[0] == tid
    assert empty_id != tid  # "" is absent, but the call's content differs by that key
    assert uuid.UUID(empty_id).version == 5
    assert changed != tid


@pytest.mark.parametrize(
    ("context", "top_level", "expected"),
    [
        ({"groupId": "g1", "traits": {"company": {"id": "t1"}, "company_id": "f1"}}, "top", "g1"),
        ({"groupId": "", "traits": {"company": {"id": "t1"}, "company_id": "f1"}}, "top", "t1"),
        ({"traits": {"company": {"id": 77}, "company_id": "f1"}}, "top", "77"),
        ({"traits": {"company": {"name": "Globex"}, "company_id": "f1"}}, "top", "f1"),
        ({"traits": {"company": "Globex Inc", "company_id": "f1"}}, "top", "f1"),
        ({"traits": {"company": {"id": None}}}, "top", "top"),
        ({"traits": {}}, 4471, "4471"),
        ({}, "top", "top"),
        ({}, None, None),
    ],
)
def test_company_id_fallbacks(context, top_level, expected):
    call = {"event": "E", "context": context}
    if top_level is not None:
        call["groupId"] = top_level
    _, _, action = segment.to_moesif_action(call)
    assert action.get("company_id") == expected


def test_segment_company_id_field_reads_properties_last():
    call = {"event": "E", "properties": {"account": 31}}
    _, _, action = segment.to_moesif_action(call, company_id_field="account")
    assert action["company_id"] == "31"
    assert action["metadata"] == {"account": 31}
    _, _, named = segment.to_moesif_action({**call, "groupId": "grp"}, company_id_field="account")
    assert named["company_id"] == "grp"


@pytest.mark.parametrize(
    ("changes", "field", "expected_type", "actual_type"),
    [
        ({"event": None}, "event", None, None),
        ({"event": ""}, "event", None, None),
        ({"event": ["Order Completed"]}, "event", "string", "array"),
        ({"type": 1}, "type", "string", "number"),
        ({"properties": "revenue=25"}, "properties", "object", "string"),
        ({"properties": [1, 2]}, "properties", "object", "array"),
        ({"context": "web"}, "context", "object", "string"),
        ({"context": {"page": "/pricing"}}, "context.page", "object", "string"),
        ({"context": {"page": {"url": 5}}}, "context.page.url", "string", "number"),
        ({"context": {"ip": 3232235777}}, "context.ip", "string", "number"),
        ({"context": {"userAgent": {"ua": "x"}}}, "context.userAgent", "string", "object"),
        ({"context": {"groupId": True}}, "context.groupId", "string", "boolean"),
        ({"context": {"traits": "vip"}}, "context.traits", "object", "string"),
        (
            {"context": {"traits": {"company": {"id": [1]}}}},
            "context.traits.company.id",
            "string",
            "array",
        ),
        (
            {"context": {"traits": {"company_id": {}}}},
            "context.traits.company_id",
            "string",
            "object",
        ),
        ({"context": {}, "groupId": False}, "groupId", "string", "boolean"),
        ({"userId": {"id": 1}}, "userId", "string", "object"),
        ({"anonymousId": True}, "anonymousId", "string", "boolean"),
        ({"messageId": ["m"]}, "messageId", "string", "array"),
        ({"timestamp": "yesterday"}, "timestamp", "string", "string"),
        ({"timestamp": None, "originalTimestamp": "soon"}, "originalTimestamp", "string", "string"),
        (
            {"timestamp": None, "originalTimestamp": None, "sentAt": {}},
            "sentAt",
            "string",
            "object",
        ),
        (
            {"timestamp": None, "originalTimestamp": None, "sentAt": None, "receivedAt": False},
            "receivedAt",
            "string",
            "boolean",
        ),
    ],
)
def test_segment_invalid_records_name_field_and_types(changes, field, expected_type, actual_type):
    call = _track(**changes)
    with pytest.raises(InvalidRecord) as info:
        segment.to_moesif_action(call)
    assert info.value.field == field
    assert info.value.expected_type == expected_type
    assert info.value.actual_type == actual_type


def test_segment_split_shapes():
    one = {"event": "A"}
    assert segment.split(one) == [(one, "")]
    assert segment.split([one, "x"]) == [(one, "[0]"), ("x", "[1]")]
    assert segment.split([]) == []
    assert segment.split({"batch": [one, 3]}) == [(one, "batch[0]"), (3, "batch[1]")]
    assert segment.split({"batch": []}) == []
    # a batch that is not an array is not a batch body: one record, for the mapper to judge
    not_batch = {"event": "A", "batch": "nightly"}
    assert segment.split(not_batch) == [(not_batch, "")]
    assert segment.split(7) == [(7, "")]


def test_batch_context_applies_to_every_call_and_calls_win():
    body = {
        "batch": [
            {"event": "A", "context": {"ip": "10.0.0.2", "groupId": "cmp_a"}},
            {"event": "B"},
            "not a call",
            {"event": "C", "context": "malformed"},
        ],
        "context": {"ip": "10.0.0.1", "library": {"name": "analytics-python"}},
    }
    before = copy.deepcopy(body)
    records = segment.split(body)
    assert records[0][0]["context"] == {
        "ip": "10.0.0.2",
        "library": {"name": "analytics-python"},
        "groupId": "cmp_a",
    }
    assert records[1][0]["context"] == body["context"]
    assert records[2][0] == "not a call"
    assert records[3][0] == {"event": "C", "context": "malformed"}
    assert body == before  # the input is not mutated
    _, _, first = segment.to_moesif_action(records[0][0])
    _, _, second = segment.to_moesif_action(records[1][0])
    assert first["request"]["ip_address"] == "10.0.0.2"
    assert first["company_id"] == "cmp_a"
    assert second["request"]["ip_address"] == "10.0.0.1"
    with pytest.raises(InvalidRecord) as info:
        segment.to_moesif_action(records[3][0])
    assert info.value.field == "context"


# --- the sample files ---------------------------------------------------------------------


def _tally(path: Path, module: Any) -> tuple[Counter[str], Counter[str], Counter[str]]:
    outcomes: Counter[str] = Counter()
    invalid_fields: Counter[str] = Counter()
    ids: Counter[str] = Counter()
    for line in path.read_text(encoding="utf-8").splitlines():
        outcomes["lines"] += 1
        try:
            value = json.loads(line)
        except ValueError:
            outcomes["not_json"] += 1
            continue
        for item, prefix in module.split(value):
            outcomes["records"] += 1
            try:
                tid, _, action = module.to_moesif_action(item)
            except InvalidRecord as exc:
                outcomes["invalid"] += 1
                invalid_fields[".".join(p for p in (prefix, exc.field) if p)] += 1
                continue
            outcomes["mapped"] += 1
            ids[tid] += 1
            assert _is_ordered(action)
            assert json.dumps(action, ensure_ascii=False)  # serializable as sent
            time = action["request"].get("time")
            assert time is None or time.startswith("2026-11-")
    return outcomes, invalid_fields, ids


def test_moesif_sample_composition():
    outcomes, invalid_fields, ids = _tally(SAMPLES / "actions_moesif.jsonl", moesif_actions)
    assert outcomes == Counter(lines=40, not_json=1, records=41, mapped=39, invalid=2)
    assert invalid_fields == Counter({"action_name": 1, "request.time": 1})
    repeated = {tid for tid, count in ids.items() if count > 1}
    # one replay with its own transaction_id, one replay whose id is derived from content
    assert len(repeated) == 2
    assert "3b8f1c2e-7a4d-4e6b-9c05-2f7e8d1a6b34" in repeated
    assert len(ids) == 37


def test_segment_sample_composition():
    outcomes, invalid_fields, ids = _tally(SAMPLES / "actions_segment.jsonl", segment)
    assert outcomes == Counter(lines=30, not_json=1, records=31, mapped=29, invalid=2)
    assert invalid_fields == Counter({"type": 2})
    # Segment retried one call: the same messageId, so the same transaction id
    assert [tid for tid, count in ids.items() if count > 1] == [
        "c3d5e7f9-1a2b-4c3d-8e5f-6a7b8c9d0e1f"
    ]
    assert len(ids) == 28
