"""The HTTP sink's retry decision: one pure function, tested as a table."""

from __future__ import annotations

import pytest

from moesif_beam.transforms.delivery.http import encode_batch
from moesif_beam.transforms.delivery.policy import (
    Action,
    RetryPolicy,
    classify,
    decide,
    parse_retry_after,
)
from moesif_beam.transforms.delivery.transport import batch_url

POLICY = RetryPolicy(max_retry_seconds=60, base_delay=1, max_delay=8)


@pytest.mark.parametrize(
    ("status", "action"),
    [
        (200, Action.DONE),
        (201, Action.DONE),
        (204, Action.DONE),
        (None, Action.RETRY),  # connection error or timeout
        (408, Action.RETRY),
        (429, Action.RETRY),
        (500, Action.RETRY),
        (502, Action.RETRY),
        (503, Action.RETRY),
        (504, Action.RETRY),
        (599, Action.RETRY),
        (501, Action.FATAL),  # not implemented: retrying cannot help
        (413, Action.SPLIT),
        (400, Action.BISECT),
        (409, Action.BISECT),
        (422, Action.BISECT),
        (401, Action.FATAL),
        (403, Action.FATAL),
        (402, Action.FATAL),
        (404, Action.FATAL),
        (405, Action.FATAL),
        (301, Action.FATAL),
        (302, Action.FATAL),
    ],
)
def test_classify(status, action):
    assert classify(status) is action


@pytest.mark.parametrize(
    ("status", "attempt", "elapsed", "retry_after", "jitter", "action", "delay"),
    [
        (201, 0, 0, None, 0.0, Action.DONE, 0.0),
        (503, 0, 0, None, 0.0, Action.RETRY, 0.5),  # half of base with no jitter
        (503, 0, 0, None, 0.999999, Action.RETRY, 1.0),  # full base at most
        (503, 2, 0, None, 0.0, Action.RETRY, 2.0),  # doubles per attempt
        (503, 10, 0, None, 0.0, Action.RETRY, 4.0),  # capped at max_delay (8), halved
        (429, 0, 0, 5.0, 0.0, Action.RETRY, 5.0),  # Retry-After is honoured
        (429, 3, 0, 0.1, 0.0, Action.RETRY, 4.0),  # ...but never shortens the backoff
        (None, 1, 0, None, 0.0, Action.RETRY, 1.0),
        (503, 0, 59.8, None, 0.0, Action.GIVE_UP, 0.0),  # the budget would be exceeded
        (429, 0, 0, 61.0, 0.0, Action.GIVE_UP, 0.0),  # Retry-After beyond the budget
        (400, 0, 0, None, 0.0, Action.BISECT, 0.0),
        (413, 5, 0, None, 0.0, Action.SPLIT, 0.0),
        (401, 0, 0, None, 0.0, Action.FATAL, 0.0),
    ],
)
def test_decide(status, attempt, elapsed, retry_after, jitter, action, delay):
    decision = decide(status, attempt, elapsed, retry_after, POLICY, jitter)
    assert decision.action is action
    assert decision.delay == pytest.approx(delay, rel=1e-3)


def test_zero_budget_never_retries():
    policy = RetryPolicy(max_retry_seconds=0)
    assert decide(503, 0, 0, None, policy, 0.0).action is Action.GIVE_UP


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_retry_seconds": -1}, "max_retry_seconds"),
        ({"base_delay": 0}, "base_delay"),
        ({"base_delay": 10, "max_delay": 5}, "base_delay"),
    ],
)
def test_policy_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("", None),
        ("7", 7.0),
        ("1.5", 1.5),
        ("-3", 0.0),
        ("Thu, 01 Jan 1970 00:01:40 GMT", 90.0),  # "now" below is 10 s after the epoch
        ("not a date", None),
    ],
)
def test_parse_retry_after(header, seconds):
    assert parse_retry_after(header, now=10.0) == seconds


@pytest.mark.parametrize(
    ("base", "url"),
    [
        ("https://api.moesif.net", "https://api.moesif.net/v1/events/batch"),
        ("https://api.moesif.net/", "https://api.moesif.net/v1/events/batch"),
        ("http://localhost:9500/collector/v1", "http://localhost:9500/collector/v1/events/batch"),
    ],
)
def test_batch_url(base, url):
    assert batch_url(base, "events") == url


def test_encode_batch_is_a_json_array_of_the_records_bytes():
    assert encode_batch([b'{"a":1}', b'{"b":2}']) == b'[{"a":1},{"b":2}]'
    assert encode_batch([]) == b"[]"
