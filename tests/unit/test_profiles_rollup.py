"""Profiles as pure functions: rollups, traits, streaming boundaries, Segment upserts."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesif_beam.transforms.common.timefmt import parse_time_ms
from moesif_beam.transforms.formats import aws
from moesif_beam.transforms.formats.segment_identify import to_profile_upserts
from moesif_beam.transforms.profiles.rollup import (
    DAY_MS,
    Rollup,
    Touch,
    add_touch,
    fold,
    merge_rollups,
    nearest_rank,
    route_of,
    touches_of,
)
from moesif_beam.transforms.profiles.stream import next_boundary, split_due, update_at
from moesif_beam.transforms.profiles.traits import (
    METADATA_KEY,
    Profile,
    company_upsert,
    group_call,
    identify_call,
    message_id,
    user_upsert,
)
from moesif_beam.transforms.profiles.upserts import merge_upserts, recursive_merge

T0 = parse_time_ms("2026-11-01T00:00:00Z")
HOUR = 3_600_000


def _touch(minute: int, tid: str, status: int | None = 200, **extra: object) -> Touch:
    values = {
        "time_ms": T0 + minute * 60_000,
        "transaction_id": tid,
        "status": status,
        "latency_ms": 10 * minute if status is not None else None,
        "route": "GET /a" if status is not None else None,
    }
    values.update(extra)
    return Touch(**values)  # type: ignore[arg-type]


def test_nearest_rank_is_one_of_the_values():
    counts = Counter({10: 1, 20: 1, 30: 1, 40: 1, 50: 1, 60: 1, 70: 1, 80: 1, 90: 1, 100: 1})
    assert nearest_rank(counts, 0.5) == 50
    assert nearest_rank(counts, 0.9) == 90
    assert nearest_rank(Counter({7: 3}), 0.9) == 7
    assert nearest_rank(Counter(), 0.5) == 0


def test_a_company_rollup_has_the_seed_traits_computed_from_the_calls():
    touches = [
        _touch(0, "a", status=401, ip="10.0.0.1", user_agent="curl/8", user_id="u1"),
        _touch(5, "b", status=500, route="POST /b"),
        _touch(90, "c", status=201, ip="10.0.0.2", user_id="u2"),
        _touch(120, "d", status=200, route="POST /b"),
        _touch(121, "e", status=None, user_agent="browser"),  # an action: seen, not a call
    ]
    as_of = T0 + 121 * 60_000
    rollup = fold(touches, as_of)
    assert (rollup.first_seen, rollup.last_seen) == (T0, as_of)
    assert rollup.ip[2] == "10.0.0.2"
    assert rollup.user_agent[2] == "browser"
    assert rollup.user_id[2] == "u2"
    assert rollup.ttfhw_s() == 90 * 60  # first call at 0, first 2xx at 90 minutes
    assert (rollup.calls, rollup.errors) == (4, 2)
    assert rollup.latency_percentile(0.5) == 50
    assert rollup.latency_percentile(0.9) == 1200
    # Most calls first; a tie is broken by the route's name, so the order is deterministic.
    assert rollup.top_routes() == [
        {"route": "GET /a", "calls": 2},
        {"route": "POST /b", "calls": 2},
    ]


def test_no_ttfhw_until_a_successful_call():
    rollup = fold([_touch(0, "a", status=404), _touch(1, "b", status=503)], T0 + HOUR)
    assert rollup.ttfhw_s() is None
    assert (
        "ttfhw_s"
        not in company_upsert(Profile("companies", "c", T0 + HOUR, rollup))["metadata"][
            METADATA_KEY
        ]
    )


def test_the_window_is_the_24_hours_ending_at_as_of_and_later_touches_are_left_out():
    as_of = T0 + 2 * DAY_MS
    touches = [
        Touch(as_of - DAY_MS, "old", status=200),  # exactly 24 h before: outside
        Touch(as_of - DAY_MS + 1, "in", status=200),
        Touch(as_of, "edge", status=500),  # the end is included
        Touch(as_of + 1, "future", status=200),
    ]
    rollup = fold(touches, as_of)
    assert (rollup.calls, rollup.errors) == (2, 1)
    assert rollup.first_seen == as_of - DAY_MS
    assert rollup.last_seen == as_of


_touches = st.lists(
    st.builds(
        Touch,
        time_ms=st.integers(T0, T0 + 2 * DAY_MS),
        transaction_id=st.text("abcdef", min_size=1, max_size=4),
        ip=st.sampled_from([None, "1.1.1.1", "2.2.2.2"]),
        user_agent=st.sampled_from([None, "x", "y"]),
        user_id=st.sampled_from([None, "u1", "u2"]),
        company_id=st.sampled_from([None, "c1"]),
        status=st.sampled_from([None, 200, 204, 404, 500, -1]),
        latency_ms=st.one_of(st.none(), st.integers(0, 5000)),
        route=st.sampled_from([None, "GET /a", "GET /b", "POST /c"]),
    ),
    max_size=40,
)


def _as_dict(rollup: Rollup) -> dict:
    return {**vars(rollup), "latencies": dict(rollup.latencies), "routes": dict(rollup.routes)}


@settings(max_examples=150, deadline=None)
@given(_touches, st.randoms(use_true_random=False), st.integers(1, 5))
def test_a_rollup_depends_on_neither_order_nor_partitioning(touches, rnd, parts):
    as_of = T0 + 2 * DAY_MS
    whole = fold(touches, as_of)
    shuffled = list(touches)
    rnd.shuffle(shuffled)
    # Split among "workers", fold each, merge in a random order: the combiner's shape.
    buckets: list[list[Touch]] = [[] for _ in range(parts)]
    for touch in shuffled:
        buckets[rnd.randrange(parts)].append(touch)
    partials = [fold(bucket, as_of) for bucket in buckets]
    rnd.shuffle(partials)
    assert _as_dict(merge_rollups(partials)) == _as_dict(whole)


@settings(max_examples=100, deadline=None)
@given(_touches, st.integers(1, 6))
def test_streaming_updates_agree_with_a_bounded_fold_at_each_boundary(touches, hours):
    """Folding touches update by update (archive + recent bag) equals one fold as of then."""
    interval = hours * HOUR
    bag: list[Touch] = []
    archive = Rollup()
    for boundary in sorted({next_boundary(t.time_ms, interval) for t in touches}):
        bag = bag + [t for t in touches if boundary - interval < t.time_ms <= boundary]
        profile, bag, archive = split_due(bag, archive, boundary)
        expected = fold([t for t in touches if t.time_ms <= boundary], boundary)
        assert _as_dict(profile) == _as_dict(expected)


def test_a_late_touch_goes_into_the_next_update_never_an_earlier_one():
    assert next_boundary(T0 + 1, HOUR) == T0 + HOUR
    assert next_boundary(T0, HOUR) == T0
    assert update_at(T0 + 1, HOUR, None) == T0 + HOUR
    assert update_at(T0 + 1, HOUR, T0 + 3 * HOUR) == T0 + 4 * HOUR


def test_touches_of_a_moesif_event_and_an_action():
    event = {
        "request": {
            "time": "2026-11-01T00:00:00.000Z",
            "uri": "https://api.example.com/v1/items/7?x=1",
            "verb": "GET",
            "ip_address": "203.0.113.9",
            "headers": {"user-agent": "okhttp/4"},
        },
        "response": {"time": "2026-11-01T00:00:00.250Z", "status": 404, "headers": {}},
        "user_id": "u1",
        "company_id": "c1",
        "metadata": {},
    }
    touch = touches_of("t1", T0, event)
    assert touch == Touch(
        T0, "t1", "203.0.113.9", "okhttp/4", "u1", "c1", 404, 250, "GET /v1/items/7"
    )
    event["metadata"] = {"apiContext": "/v1", "apiResourceTemplate": "/items/{id}"}
    assert route_of(event) == "GET /v1/items/{id}"
    action = {
        "action_name": "Signed Up",
        "request": {"time": "2026-11-01T00:00:00Z", "user_agent_string": "browser"},
        "user_id": "u1",
    }
    touch = touches_of("t2", T0, action)
    assert (touch.status, touch.route, touch.user_agent) == (None, None, "browser")
    rollup = add_touch(Rollup(), touch, in_window=True)
    assert (rollup.calls, rollup.first_seen) == (0, T0)


def _profile(kind: str, pid: str, **user: str) -> Profile:
    touches = [_touch(0, "a", status=200, ip="10.0.0.1", user_agent="ua", **user)]
    return Profile(kind, pid, T0 + HOUR, fold(touches, T0 + HOUR))


def test_upserts_keep_derived_traits_under_one_metadata_key():
    user = user_upsert(_profile("users", "u1", company_id="c1"))
    assert user["user_id"] == "u1"
    assert user["company_id"] == "c1"
    assert (user["ip_address"], user["user_agent_string"]) == ("10.0.0.1", "ua")
    assert user["modified_time"] == "2026-11-01T01:00:00.000Z"
    assert list(user["metadata"]) == [METADATA_KEY]
    derived = user["metadata"][METADATA_KEY]
    assert derived["firstSeenTime"] == "2026-11-01T00:00:00.000Z"
    assert derived["last24HourAggResults"]["calls"] == 1
    assert "ttfhw_s" not in derived  # a company trait
    company = company_upsert(_profile("companies", "c1"))
    assert "user_agent_string" not in company
    assert company["metadata"][METADATA_KEY]["ttfhw_s"] == 0


def test_identify_and_group_have_the_seed_shape_and_deterministic_message_ids():
    company = _profile("companies", "c1", user_id="u1")
    call = identify_call(_profile("users", "u1", company_id="c1"), company)
    assert call["type"] == "identify"
    assert call["userId"] == call["traits"]["id"] == "u1"
    for key in ("firstSeenTime", "lastSeenTime", "last24HourAggResults", "company"):
        assert key in call["traits"]
    assert call["traits"]["company"]["id"] == "c1"
    assert call["traits"]["company"]["ttfhw_s"] == 0
    assert call["traits"]["company"]["ipAddress"] == "10.0.0.1"
    again = identify_call(_profile("users", "u1", company_id="c1"), company)
    assert again["messageId"] == call["messageId"]
    assert identify_call(_profile("users", "u1"), None)["messageId"] != call["messageId"]
    group = group_call(company)
    assert (group["type"], group["groupId"], group["userId"]) == ("group", "c1", "u1")
    lonely = group_call(_profile("companies", "c2"))
    assert lonely["anonymousId"] == "company:c2" and "userId" not in lonely
    assert len(json.dumps(call)) < 32_000


def test_segment_identify_and_group_map_to_upserts():
    _, when, upserts = to_profile_upserts(
        {
            "type": "identify",
            "userId": "u1",
            "messageId": "m-1",
            "timestamp": "2026-11-01T00:00:00Z",
            "traits": {"firstName": "Ana", "email": "a@x.io", "company": {"id": "c1"}},
            "context": {
                "ip": "1.2.3.4",
                "userAgent": "ua",
                "campaign": {"source": "google", "name": "q4"},
                "page": {"referrer": "https://r.example"},
            },
        }
    )
    assert when == T0 and upserts["companies"] == []
    (user,) = upserts["users"]
    assert user["company_id"] == "c1"
    assert user["campaign"] == {
        "utm_source": "google",
        "utm_campaign": "q4",
        "referrer": "https://r.example",
    }
    assert user["metadata"]["first_name"] == "Ana"
    assert user["modified_time"] == "2026-11-01T00:00:00.000Z"
    _, _, upserts = to_profile_upserts(
        {"type": "group", "userId": "u1", "groupId": "c1", "traits": {"website": "acme.io"}}
    )
    assert upserts["companies"][0]["company_domain"] == "acme.io"
    assert upserts["users"] == [{"user_id": "u1", "company_id": "c1"}]


@pytest.mark.parametrize(
    "call",
    [
        {"type": "track", "event": "Signed Up", "userId": "u1"},
        {"type": "identify", "anonymousId": "a1"},
        {"type": "group", "userId": "u1"},
        "not an object",
    ],
)
def test_segment_calls_that_cannot_be_upserts_are_refused(call):
    from moesif_beam.transforms.common.errors import InvalidRecord

    with pytest.raises(InvalidRecord):
        to_profile_upserts(call)


def test_recursive_merge_keeps_other_keys_and_replaces_arrays():
    old = {
        "ip_address": "1.1.1.1",
        "metadata": {"plan": "growth", "moesif_beam": {"a": 1, "routes": [1, 2]}},
    }
    new = {"metadata": {"moesif_beam": {"routes": [3]}}, "ip_address": None}
    assert recursive_merge(old, new) == {
        "ip_address": "1.1.1.1",  # a null means "not set", not "erase"
        "metadata": {"plan": "growth", "moesif_beam": {"a": 1, "routes": [3]}},
    }


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 5),
            st.text("xyz", min_size=1, max_size=3),
            st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 3), max_size=2),
        ),
        max_size=8,
    ),
    st.randoms(use_true_random=False),
)
def test_merged_upserts_do_not_depend_on_input_order(items, rnd):
    stamped = [(t, tid, {"metadata": meta}) for t, tid, meta in items]
    shuffled = list(stamped)
    rnd.shuffle(shuffled)
    assert merge_upserts(shuffled) == merge_upserts(stamped)


def test_an_aws_route_is_its_resource_template_not_the_concrete_path():
    # API Gateway logs the route template (resourcePath); the mapping leaves it in
    # metadata. Without it every order id would be a route of its own in top_routes.
    record = {
        "apiId": "a1b2c3d4e5",
        "requestId": "7d3f9c1e-2b4a-4c8e-9f10-3a5b6c7d8e9f",
        "requestTimeEpoch": "1782820800000",
        "httpMethod": "GET",
        "resourcePath": "/orders/{id}",
        "path": "/prod/orders/42",
        "requestHostHeader": "api.acme.io",
        "status": "200",
        "durationMs": "87",
    }
    _, time_ms, event = aws.to_moesif_event(record)
    assert route_of(event) == "GET /orders/{id}"
    assert touches_of("t1", time_ms, event).route == "GET /orders/{id}"
    del record["resourcePath"]
    _, _, event = aws.to_moesif_event(record)
    assert route_of(event) == "GET /prod/orders/42"


def test_a_new_moesif_beam_version_sends_the_same_message_ids():
    # A re-run after an upgrade must still collapse in Segment's dedup: the library's
    # version in context is not part of what the id stands for.
    call = identify_call(_profile("users", "u1"), None)
    upgraded = json.loads(json.dumps(call))
    upgraded["context"]["library"]["version"] = "99.0.0"
    assert message_id(upgraded) == call["messageId"]
    upgraded["traits"]["lastSeenTime"] = "2026-11-02T00:00:00.000Z"
    assert message_id(upgraded) != call["messageId"]
