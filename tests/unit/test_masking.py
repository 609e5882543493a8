"""Secret masking outside bodies (formats/masking.py): the leaks a review reproduced."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from moesif_beam.transforms.formats.gateway import MASK, SENSITIVE_PARAMS, MappingOptions
from moesif_beam.transforms.formats.masking import mask_query, mask_secrets

KEY = "key_0123456789abcdef"  # a secret: must not reach Moesif anywhere in an event
DEFAULT = MappingOptions()


def masked_metadata(metadata: dict[str, Any], options: MappingOptions = DEFAULT) -> Any:
    event = {"request": {"uri": "https://api.acme.io/v1"}, "metadata": metadata}
    return mask_secrets(event, options)["metadata"]


# -- a. a query string's "?" inside a value ------------------------------------------------


def test_a_question_mark_in_a_query_value_does_not_move_the_query_start():
    text = f"apikey={KEY}&next=/a?b=c"
    assert mask_query(text, SENSITIVE_PARAMS, whole=True) == f"apikey={MASK}&next=/a?b=c"
    assert mask_query(f"?{text}", SENSITIVE_PARAMS, whole=True) == f"?apikey={MASK}&next=/a?b=c"
    assert masked_metadata({"query_string": text}) == {"query_string": f"apikey={MASK}&next=/a?b=c"}
    # a query-named key holding a whole URI is still read from its "?"
    uri = f"/v1/orders?apikey={KEY}"
    assert mask_query(uri, SENSITIVE_PARAMS, whole=True) == f"/v1/orders?apikey={MASK}"


# -- b. a space inside a query ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "whole", "expected"),
    [
        (f"q=a b&apikey={KEY}", True, f"q=a b&apikey={MASK}"),
        (f"/p?q=a b&apikey={KEY}", False, f"/p?q=a b&apikey={MASK}"),
        (f"/p?q=a\tb&token={KEY}#frag", False, f"/p?q=a\tb&token={MASK}#frag"),
        # a logged request line still ends its query at " HTTP/"
        (f"GET /p?q=a b&apikey={KEY} HTTP/1.1", False, f"GET /p?q=a b&apikey={MASK} HTTP/1.1"),
        (f"GET /p?apikey={KEY} HTTP/2", False, f"GET /p?apikey={MASK} HTTP/2"),
    ],
)
def test_a_space_inside_a_query_does_not_end_it(text, whole, expected):
    assert mask_query(text, SENSITIVE_PARAMS, whole=whole) == expected


def test_a_space_inside_a_metadata_uri_does_not_end_its_query():
    metadata = {"request": f"/p?q=a b&apikey={KEY}", "args": f"q=a b&apikey={KEY}"}
    assert masked_metadata(metadata) == {
        "request": f"/p?q=a b&apikey={MASK}",
        "args": f"q=a b&apikey={MASK}",
    }


# -- c. metadata keys named after a secret ---------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "authorization",
        "Authorization",
        "x_api_key",
        "api_key",
        "apiKey",
        "http_authorization",
        "HTTP_X_API_KEY",
        "request_header_authorization",
        "response_header_set_cookie",
        "http_cookie",
        "access_token",
        "subscription-key",
    ],
)
def test_a_metadata_key_named_after_a_secret_is_masked(key):
    value = f"Bearer {KEY}"
    metadata = {key: value, "nested": {key: value}}
    masked = masked_metadata(metadata)
    assert masked == {key: MASK, "nested": {key: MASK}}
    assert metadata == {key: value, "nested": {key: value}}  # the input is not changed


@pytest.mark.parametrize(
    "metadata",
    [
        {"keyword": "abc", "tokens": "3", "authorization_mode": "oauth", "monkey": "x"},
        {"authorization": "", "apikey": 42, "token": None, "key": True},
        {"http_host": "api.acme.io", "request_header_accept": "*/*"},
    ],
)
def test_keys_merely_like_a_secret_or_holding_no_string_are_kept(metadata):
    assert masked_metadata(dict(metadata)) == metadata


def test_secret_keys_follow_the_mask_headers_flag():
    metadata = {"x_secret": "s3", "authorization": "Bearer b", "apikey": KEY}
    custom = masked_metadata(dict(metadata), MappingOptions(mask_headers=("X-Secret",)))
    # the header list replaces the defaults; the sensitive parameters stay
    assert custom == {"x_secret": MASK, "authorization": "Bearer b", "apikey": MASK}
    assert masked_metadata(dict(metadata), MappingOptions(mask_headers=())) == metadata


# -- d. header lists under a header-named key ------------------------------------------------


def test_header_lists_under_a_header_named_key_are_masked():
    metadata = {
        "request_headers": [
            {"name": "Authorization", "value": f"Bearer {KEY}"},
            {"name": "Accept", "value": "*/*"},
        ],
        "backendResponseHeaders": [["Set-Cookie", f"sid={KEY}"], ["Vary", "Accept"]],
        "headers": [{"Name": "X-Api-Key", "Value": KEY}],
        "raw_headers": [f"Authorization: Bearer {KEY}", "Accept: */*"],
    }
    assert masked_metadata(metadata) == {
        "request_headers": [
            {"name": "Authorization", "value": MASK},
            {"name": "Accept", "value": "*/*"},
        ],
        "backendResponseHeaders": [["Set-Cookie", MASK], ["Vary", "Accept"]],
        "headers": [{"Name": "X-Api-Key", "Value": MASK}],
        "raw_headers": [f"Authorization: {MASK}", "Accept: */*"],
    }
    assert KEY in orjson.dumps(metadata).decode()  # the input is not changed


def test_header_lists_without_a_secret_come_back_as_they_are():
    headers = [{"name": "Accept", "value": "*/*"}, ["Vary", "Accept"], "Vary: x", "x", 1]
    metadata = {"request_headers": headers}
    assert masked_metadata(metadata)["request_headers"] is headers


# -- JSON header text keeps its own spelling --------------------------------------------


def test_json_header_text_is_masked_in_place_keeping_the_rest_of_the_text():
    text = (
        '{ "Authorization" : "Bearer x\\"}", "X-Count": 12345678901234567890123,'
        ' "X-Ratio": 1.0e3, "X-Nested": {"cookie": [1, "}"]},\n "Cookie":{"sid":"s"},'
        ' "Authoriz\\u0061tion": 7, "X-Esc": "caf\\u00e9" }'
    )
    expected = (
        '{ "Authorization" : "*****", "X-Count": 12345678901234567890123,'
        ' "X-Ratio": 1.0e3, "X-Nested": {"cookie": [1, "}"]},\n "Cookie":"*****",'
        ' "Authoriz\\u0061tion": "*****", "X-Esc": "caf\\u00e9" }'
    )
    assert masked_metadata({"backendRequestHeaders": text}) == {"backendRequestHeaders": expected}
    clean = '{"Accept": "*/*", "X-Count": 12345678901234567890123}'
    assert masked_metadata({"request_headers": clean})["request_headers"] is clean
