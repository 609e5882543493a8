"""Lenient time parsing, Moesif's time format, and the dot-to-underscore key rule."""

from __future__ import annotations

import pytest

from moesif_beam.transforms.common.errors import json_type
from moesif_beam.transforms.common.timefmt import format_time_ms, parse_time_ms
from moesif_beam.transforms.schema.keys import sanitize_keys


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        ("2022-01-20T03:34:36.451Z", 1642649676451),
        ("2022-01-20T03:34:36.451", 1642649676451),  # no zone: UTC
        ("2022-01-20T03:34:36.451123456Z", 1642649676451),  # nanoseconds truncated
        ("2022-01-20T03:34Z", 1642649640000),
        ("2022-01-20T09:04:36.451+05:30", 1642649676451),
        ("1642649676451", 1642649676451),
        (1642649676451, 1642649676451),
        (1642649676, 1642649676000),  # epoch seconds
        (1642649676.5, 1642649676500),
        ("1969-12-31T23:59:59.999Z", -1),
    ],
)
def test_parse_time_ms(value, ms):
    assert parse_time_ms(value) == ms


@pytest.mark.parametrize(
    "value", ["", "yesterday", True, None, {"t": 1}, float("nan"), "2022-13-01"]
)
def test_parse_time_ms_refuses(value):
    with pytest.raises(ValueError):
        parse_time_ms(value)


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (1642649676451, "2022-01-20T03:34:36.451Z"),
        (0, "1970-01-01T00:00:00.000Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
        (1793528130000, "2026-11-01T10:15:30.000Z"),
    ],
)
def test_format_time_ms(ms, text):
    assert format_time_ms(ms) == text
    assert parse_time_ms(text) == ms


def test_sanitize_keys_seed_example():
    # Moesif's documented example: dots in keys become underscores, values keep theirs.
    assert sanitize_keys({"so.me_str.ing": "I am a string", "some.int": 77.23}) == {
        "so_me_str_ing": "I am a string",
        "some_int": 77.23,
    }


def test_sanitize_keys_recurses_into_objects_and_arrays():
    value = {"a.b": {"c.d": [{"e.f": 1}, 2, "g.h"]}, "plain": {"x": [1]}}
    assert sanitize_keys(value) == {"a_b": {"c_d": [{"e_f": 1}, 2, "g.h"]}, "plain": {"x": [1]}}


def test_sanitize_keys_does_not_copy_clean_input_or_mutate():
    clean = {"a": {"b": [1, {"c": 2}]}}
    assert sanitize_keys(clean) is clean
    dotted = {"a.b": {"c": 1}}
    sanitize_keys(dotted)
    assert dotted == {"a.b": {"c": 1}}


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("s", "string"),
        (1, "number"),
        (1.5, "number"),
        (True, "boolean"),
        (None, "null"),
        ({}, "object"),
        ([], "array"),
    ],
)
def test_json_type(value, name):
    assert json_type(value) == name


def test_sanitize_keys_recurses_into_dict_subclasses():
    from collections import OrderedDict

    value = {"plain": OrderedDict({"a.b": 1})}
    assert sanitize_keys(value) == {"plain": {"a_b": 1}}
