"""Moesif's metadata type rule: pure functions, the persisted store, and the Beam transform."""

from __future__ import annotations

import json
import random

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from moesif_beam.transforms.dedup.bounded import DedupByTransactionId
from moesif_beam.transforms.formats.normalize import NormalizeRecords
from moesif_beam.transforms.records import Line
from moesif_beam.transforms.schema import (
    SCOPES,
    EnforceMetadataSchema,
    SignatureMemo,
    find_conflict,
    load_schema,
    merge_schema,
    save_schema,
    seed_pairs,
    signature,
    signature_id,
    type_name,
    types_of,
)
from tests.helpers import make_pipeline, run

# Moesif's documented example: some_string is first seen as a string at the top level...
FIRST = {"some_string": "I am a string", "some_int": 77, "some_object": {"some_sub_field": "v"}}
# ...so a later record sending it as a number, one level down, is not accepted.
SECOND = {"some_int": 77, "some_object": {"some_string": 23, "some_sub_field": "v"}}


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("s", "string"),
        (1, "number"),
        (1.5, "number"),
        (True, "boolean"),
        (False, "boolean"),
        ({}, "object"),
        ([], "array"),
        (None, None),
    ],
)
def test_type_name(value, name):
    assert type_name(value) == name


def test_types_by_name_at_any_depth_including_arrays():
    metadata = {"a": 1, "o": {"b": "x", "c": None}, "l": [{"d": True}, [{"e": []}], 3]}
    assert sorted(types_of(metadata)) == [
        ("a", "number"),
        ("b", "string"),
        ("d", "boolean"),
        ("e", "array"),
        ("l", "array"),
        ("o", "object"),
    ]


def test_types_by_path():
    metadata = {"a": 1, "o": {"b": "x"}, "l": [{"d": True}]}
    assert sorted(types_of(metadata, "path")) == [
        ("a", "number"),
        ("l", "array"),
        ("l[].d", "boolean"),
        ("o", "object"),
        ("o.b", "string"),
    ]


def test_signature_is_sorted_distinct_and_ignores_nulls():
    assert signature({"b": 1, "a": {"b": 2}, "n": None}) == (
        ("a", "object"),
        ("b", "number"),
    )
    assert signature({}) == signature(None) == signature([1]) == ()
    assert signature_id(signature(FIRST)) == signature_id(signature(dict(reversed(FIRST.items()))))
    assert signature_id(signature(FIRST)) != signature_id(signature(SECOND))


def test_signature_memo_agrees_with_signature_for_every_shape():
    rng = random.Random(7)
    values = [
        *(None, True, 0, 1.5, "s", {"x": 1}, {"x": "a"}, [1], [{"y": True}], []),
        # Nested shapes, which the memo keys by shape too.
        [{"y": True}, {"y": "s"}],
        [{"y": "s"}, {"y": True}, {"y": "s"}],
        [[{"z": 1}], 2],
        {"x": {"w": [1, {"v": None}]}},
        {"x": {"w": [{"v": 1.5}]}},
    ]
    memos = {scope: SignatureMemo(scope, size=8) for scope in SCOPES}
    for _ in range(2000):
        keys = rng.sample(["a", "b", "c", "d", "x", "y"], rng.randint(0, 4))
        metadata = {key: rng.choice(values) for key in keys}
        for scope, memo in memos.items():
            sig, sig_id = memo(metadata)
            assert sig == signature(metadata, scope)
            assert sig_id == (signature_id(sig) if sig else b"")
    # Same keys and types, different nested content: the memo must not answer by shape.
    memo = SignatureMemo("name")
    assert memo({"a": {"x": 1}})[0] == (("a", "object"), ("x", "number"))
    assert memo({"a": {"x": "s"}})[0] == (("a", "object"), ("x", "string"))
    assert memo("not an object") == ((), b"")

    class Tagged(dict):  # a dict subclass has no plain shape; it is signed, not memoized
        pass

    assert memo({"a": Tagged(x=1)})[0] == (("a", "object"), ("x", "number"))
    assert memo({"a": Tagged(x="s")})[0] == (("a", "object"), ("x", "string"))
    assert memo({"a": [Tagged(x=True)]})[0] == (("a", "array"), ("x", "boolean"))
    with pytest.raises(ValueError, match="scope"):
        SignatureMemo("depth")


def test_the_seed_example_conflicts_on_some_string():
    schema = merge_schema({}, signature(FIRST))
    assert find_conflict(signature(SECOND), schema) == ("some_string", "string", "number")
    assert find_conflict(signature(FIRST), schema) is None


def test_null_matches_any_type_and_ints_and_floats_are_one_type():
    schema = merge_schema({}, signature({"x": 1, "y": "s"}))
    assert find_conflict(signature({"x": 2.5, "y": None}), schema) is None
    assert find_conflict(signature({"x": True}), schema) == ("x", "number", "boolean")


def test_merge_keeps_the_first_type():
    assert merge_schema({"a": "string"}, [("a", "number"), ("b", "array"), ("b", "object")]) == {
        "a": "string",
        "b": "array",
    }


def test_store_round_trip_and_first_wins_across_saves(tmp_path):
    path = str(tmp_path / "nested" / "schema.json")
    assert load_schema(path, "name") == {}
    save_schema(path, "name", [("a", "string")])
    written = save_schema(path, "name", [("a", "number"), ("b", "boolean")])
    assert written == {"a": "string", "b": "boolean"}
    assert load_schema(path, "name") == written
    document = json.loads((tmp_path / "nested" / "schema.json").read_text())
    assert document["scope"] == "name" and document["version"] == 1


def test_store_refuses_another_scope_and_garbage(tmp_path):
    path = str(tmp_path / "schema.json")
    save_schema(path, "path", [("o.b", "string")])
    with pytest.raises(ValueError, match="tracks keys by path"):
        load_schema(path, "name")
    (tmp_path / "bad.json").write_text('{"no": "fields"}')
    with pytest.raises(ValueError, match="not a moesif-beam schema"):
        load_schema(str(tmp_path / "bad.json"), "name")
    (tmp_path / "types.json").write_text('{"fields": {"a": "integer"}}')
    with pytest.raises(ValueError, match="unknown types"):
        load_schema(str(tmp_path / "types.json"), "name")


def test_seed_pairs_from_examples_and_from_a_type_map(tmp_path):
    examples = tmp_path / "examples.jsonl"
    examples.write_text(
        json.dumps({"action_name": "x", "metadata": {"so.me": "s", "n": 1}})
        + "\n"
        + json.dumps({"plain": [1]})
        + "\n"
    )
    assert sorted(seed_pairs(str(examples), "name")) == [
        ("n", "number"),
        ("plain", "array"),
        ("so_me", "string"),
    ]
    types = tmp_path / "types.json"
    types.write_text('{"amount": "number", "currency": "string"}')
    assert seed_pairs(str(types), "name", types_map=True) == [
        ("amount", "number"),
        ("currency", "string"),
    ]
    types.write_text('{"amount": "float"}')
    with pytest.raises(ValueError, match="unknown types"):
        seed_pairs(str(types), "name", types_map=True)


def _action(tid: str, time: str, metadata: dict) -> Line:
    line = {
        "action_name": "Did",
        "transaction_id": tid,
        "request": {"time": time},
        "metadata": metadata,
    }
    return Line(json.dumps(line).encode(), f"f:{tid}")


def _decide(lines, stored=None, scope="name"):
    """Run normalize, dedup and the schema stage; return (accepted ids, conflicts, new keys)."""
    pipeline = make_pipeline()
    normalized = (
        pipeline | beam.Create(lines) | NormalizeRecords("actions", "moesif", schema_scope=scope)
    )
    unique = normalized.records | DedupByTransactionId()
    checked = (unique, normalized.signatures) | EnforceMetadataSchema(stored or {}, "actions")
    return pipeline, checked


def test_first_seen_is_the_earliest_event_time_not_the_input_order():
    lines = [
        _action("b-later", "2026-11-02T00:00:00Z", SECOND),
        _action("a-first", "2026-11-01T00:00:00Z", FIRST),
        _action("c-agrees", "2026-11-03T00:00:00Z", {"some_string": None, "some_int": 1.5}),
    ]
    for _ in range(3):
        random.shuffle(lines)
        pipeline, checked = _decide(list(lines))
        assert_that(
            checked.records | beam.Keys(), equal_to(["a-first", "c-agrees"]), label="accepted"
        )
        assert_that(
            checked.dead_letters
            | beam.Map(
                lambda d: (
                    d["transaction_id"],
                    d["reason"],
                    d["field"],
                    d["expected_type"],
                    d["actual_type"],
                    d["stage"],
                )
            ),
            equal_to([("b-later", "type_conflict", "some_string", "string", "number", "schema")]),
            label="conflicts",
        )
        assert_that(
            checked.new_fields,
            equal_to(
                [
                    ("some_string", "string"),
                    ("some_int", "number"),
                    ("some_object", "object"),
                    ("some_sub_field", "string"),
                ]
            ),
            label="new keys",
        )
        assert run(pipeline)["type_conflicts"] == 1


def test_ties_in_time_are_broken_by_transaction_id():
    lines = [
        _action("id-2", "2026-11-01T00:00:00Z", {"k": 1}),
        _action("id-1", "2026-11-01T00:00:00Z", {"k": "one"}),
    ]
    pipeline, checked = _decide(lines)
    assert_that(checked.records | beam.Keys(), equal_to(["id-1"]))
    run(pipeline)


def test_the_stored_schema_wins_over_this_runs_records():
    lines = [
        _action("a", "2026-11-01T00:00:00Z", {"k": 1}),
        _action("b", "2026-11-02T00:00:00Z", {"k": "s", "new": True}),
    ]
    pipeline, checked = _decide(lines, stored={"k": "string"})
    assert_that(checked.records | beam.Keys(), equal_to(["b"]), label="accepted")
    assert_that(checked.new_fields, equal_to([("new", "boolean")]), label="new keys")
    run(pipeline)


def test_a_record_conflicting_with_itself_and_path_scope():
    same_name = {"id": "x", "nested": {"id": 7}}
    pipeline, checked = _decide([_action("a", "2026-11-01T00:00:00Z", same_name)])
    assert_that(checked.records | beam.Keys(), equal_to([]), label="name scope refuses")
    run(pipeline)
    pipeline, checked = _decide([_action("a", "2026-11-01T00:00:00Z", same_name)], scope="path")
    assert_that(checked.records | beam.Keys(), equal_to(["a"]), label="path scope accepts")
    run(pipeline)


def test_dotted_keys_are_checked_after_conversion():
    lines = [
        _action("a", "2026-11-01T00:00:00Z", {"so.me_str.ing": "I am a string"}),
        _action("b", "2026-11-02T00:00:00Z", {"so_me_str_ing": 5}),
    ]
    pipeline, checked = _decide(lines)
    assert_that(checked.records | beam.Keys(), equal_to(["a"]), label="accepted")
    assert_that(checked.new_fields, equal_to([("so_me_str_ing", "string")]), label="keys")
    run(pipeline)
