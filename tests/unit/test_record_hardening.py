"""Issue 12, the record path: one bad record never stops a run, and what is sent is valid JSON.

The campaign's cases (rows 1, 3, 4 and 6) as regression tests, run through the real
normalize DoFn without a pipeline, plus property tests (Hypothesis): for any JSON value and
any bytes, every input format returns records or dead letters and never raises; the
metadata rules and the batch serializer always give finite, valid JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
from apache_beam import pvalue
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesif_beam.transforms.common.errors import InvalidRecord
from moesif_beam.transforms.dedup.bounded import DedupByTransactionId
from moesif_beam.transforms.delivery.http import encode_batch
from moesif_beam.transforms.formats.normalize import (
    FORMATS,
    MAX_EVENT_BYTES,
    NormalizeRecords,
    _NormalizeFn,
)
from moesif_beam.transforms.records import Ack, Line, Record, RecordCoder
from moesif_beam.transforms.schema import signature
from moesif_beam.transforms.schema.keys import MAX_DEPTH, sanitize_keys
from tests.unit.gateway_examples import EXAMPLES

REPO = Path(__file__).resolve().parents[2]
WSO2_LINE = (REPO / "samples" / "wso2_sample.jsonl").read_bytes().splitlines()[0]
ACTION_LINE = (REPO / "samples" / "actions_moesif.jsonl").read_bytes().splitlines()[0]
SEGMENT_LINE = (REPO / "samples" / "actions_segment.jsonl").read_bytes().splitlines()[0]

FORMAT_CASES = [(pipeline, fmt) for pipeline, formats in FORMATS.items() for fmt in formats]


def _refuse(name: str) -> Any:
    raise ValueError(name)


def strict_loads(body: bytes) -> Any:
    """What Moesif's collector accepts: JSON with finite numbers only."""
    return json.loads(body, parse_constant=_refuse)


def normalize(pipeline: str, fmt: str, raw: bytes, **settings: Any) -> tuple[list, list]:
    """Run one line through the normalize DoFn; return (records, dead letters)."""
    fn = _NormalizeFn(pipeline, fmt, None, MAX_EVENT_BYTES, "name", **settings)
    fn.setup()
    fn.start_bundle()
    out = list(fn.process(Line(raw, "test:1")))
    records = [o for o in out if not isinstance(o, pvalue.TaggedOutput)]
    letters = [o.value for o in out if isinstance(o, pvalue.TaggedOutput)]
    for _, value in records:
        strict_loads(value[1])  # every record body is valid, finite JSON
    return records, letters


def _with(line: bytes, **fields: Any) -> bytes:
    record = json.loads(line)
    record.update(fields)
    return json.dumps(record).encode()


def _replace_field(line: bytes, key: str, literal: str) -> bytes:
    """Set ``key`` to a raw JSON literal that json.dumps cannot write (1e400)."""
    record = json.loads(line)
    record[key] = "__PLACEHOLDER__"
    return json.dumps(record).encode().replace(b'"__PLACEHOLDER__"', literal.encode())


def _nested_arrays(depth: int) -> str:
    return "[" * depth + "]" * depth


# Row 1: numbers that do not fit, in every format's time or number fields.
CAMPAIGN_NUMBERS = [
    ("events", "wso2", _replace_field(WSO2_LINE, "responseLatency", "1e400"), "parse_error"),
    ("events", "wso2", _replace_field(WSO2_LINE, "responseLatency", "1e308"), "invalid_record"),
    ("events", "wso2", _replace_field(WSO2_LINE, "responseLatency", str(2**70)), "invalid_record"),
    (
        "events",
        "wso2",
        _replace_field(WSO2_LINE, "requestTimestamp", str(2**70)),
        "invalid_record",
    ),
    ("events", "wso2", _with(WSO2_LINE, requestTimestamp="1" * 20), "invalid_record"),
    ("events", "wso2", _with(WSO2_LINE, proxyResponseCode=2**62), "invalid_record"),
    (
        "actions",
        "moesif",
        _with(ACTION_LINE, request={"time": 2**70}),
        "invalid_record",
    ),
    ("actions", "moesif", _with(ACTION_LINE, request={"time": "9" * 20}), "invalid_record"),
    ("actions", "segment", _with(SEGMENT_LINE, timestamp=2**70), "invalid_record"),
    ("actions", "segment", _with(SEGMENT_LINE, timestamp=-(2**70)), "invalid_record"),
    ("actions", "segment", _replace_field(SEGMENT_LINE, "timestamp", "1e400"), "parse_error"),
]


@pytest.mark.parametrize(("pipeline", "fmt", "raw", "reason"), CAMPAIGN_NUMBERS)
def test_numbers_that_do_not_fit_are_dead_letters_not_crashes(pipeline, fmt, raw, reason):
    records, letters = normalize(pipeline, fmt, raw)
    assert records == []
    assert [letter["reason"] for letter in letters] == [reason]
    assert letters[0]["payload"] == raw


def test_times_at_the_edges_of_the_four_digit_years_are_sent():
    for when in ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999Z"):
        raw = _with(WSO2_LINE, requestTimestamp=when, responseLatency=0)
        records, letters = normalize("events", "wso2", raw)
        assert letters == []
        assert strict_loads(records[0][1][1])["request"]["time"][:4] in ("0001", "9999")


@pytest.mark.parametrize("depth", [130, 490, 990])
def test_deep_metadata_is_an_invalid_record(depth):
    # Row 3: arrays nested 490-990 deep inside metadata, in a line of about a kilobyte.
    raw = _replace_field(WSO2_LINE, "deep", _nested_arrays(depth))
    records, letters = normalize("events", "wso2", raw)
    assert records == []
    assert letters[0]["reason"] == "invalid_record"
    assert "nests more than" in letters[0]["detail"]


def test_metadata_up_to_the_limit_is_sent():
    raw = _replace_field(WSO2_LINE, "deep", _nested_arrays(MAX_DEPTH - 1))
    records, letters = normalize("events", "wso2", raw)
    assert letters == []
    assert len(records) == 1


def test_nesting_beyond_what_json_parsers_take_is_a_parse_error():
    raw = _replace_field(WSO2_LINE, "deep", _nested_arrays(5000))
    records, letters = normalize("events", "wso2", raw)
    assert records == []
    assert letters[0]["reason"] == "parse_error"


def test_a_deep_request_body_is_an_invalid_record_not_a_crash():
    props = json.loads(WSO2_LINE)["properties"]
    props["requestBody"] = "__BODY__"
    raw = _with(WSO2_LINE, properties=props).replace(b'"__BODY__"', _nested_arrays(600).encode())
    records, letters = normalize("events", "wso2", raw)
    assert records == []
    assert letters[0]["reason"] == "invalid_record"
    assert "254 levels" in letters[0]["detail"]


def test_non_finite_values_never_reach_a_batch():
    # Row 4: a metadata value of 1e400 is refused; a body string holding NaN is not JSON,
    # so it is sent base64 like any other non-JSON text.
    raw = _replace_field(WSO2_LINE, "custom", "1e400")
    assert normalize("events", "wso2", raw)[1][0]["reason"] == "parse_error"
    props = json.loads(WSO2_LINE)["properties"]
    props["requestBody"] = '{"a":NaN}'
    records, letters = normalize("events", "wso2", _with(WSO2_LINE, properties=props))
    assert letters == []
    event = strict_loads(records[0][1][1])
    assert event["request"]["transfer_encoding"] == "base64"
    assert encode_batch([value[1] for _, value in records]).startswith(b"[{")


def test_an_unforeseen_exception_is_an_internal_error_dead_letter(monkeypatch):
    # A mapping bug for one record: that record is dead-lettered, its neighbours in the
    # same line go on.
    from moesif_beam.transforms.formats import moesif_actions

    original = moesif_actions.to_moesif_action

    def flaky(value: Any, company_id_field: str | None = None) -> Any:
        if value.get("action_name") == "boom":
            raise KeyError("a bug")
        return original(value, company_id_field)

    fmt = FORMATS["actions"]["moesif"]
    monkeypatch.setitem(FORMATS["actions"], "moesif", fmt.__class__(fmt.parse, fmt.split, flaky))
    line = json.dumps([{"action_name": "ok"}, {"action_name": "boom"}, {"action_name": "ok2"}])
    records, letters = normalize("actions", "moesif", line.encode())
    assert len(records) == 2
    assert [(d["reason"], d["source"]) for d in letters] == [("internal_error", "test:1[1]")]
    assert letters[0]["detail"].startswith("KeyError")
    assert json.loads(letters[0]["payload"]) == {"action_name": "boom"}


def test_a_line_over_max_line_bytes_is_too_large():
    records, letters = normalize("events", "wso2", WSO2_LINE, max_line_bytes=100)
    assert records == []
    assert letters[0]["reason"] == "too_large"
    assert "--max_line_bytes" in letters[0]["detail"]


def test_array_elements_carry_their_own_bytes_not_the_whole_line():
    line = json.dumps([{"action_name": f"a{i}", "metadata": {"i": i}} for i in range(50)])
    records, _ = normalize("actions", "moesif", line.encode())
    assert len(records) == 50
    raws = [value[2] for _, value in records]
    assert sum(map(len, raws)) < len(line)
    assert json.loads(raws[7]) == {"action_name": "a7", "metadata": {"i": 7}}


def test_a_line_of_100k_actions_spills_linear_bytes(tmp_path):
    # Row 6: every element used to carry the whole line into the dedup spill (N² bytes).

    from tests.helpers import make_pipeline, run

    n = 100_000
    line = json.dumps(
        [{"action_name": "Clicked", "transaction_id": f"t-{i}"} for i in range(n)]
    ).encode()
    spill = tmp_path / "spill"
    pipeline = make_pipeline()
    records = (
        pipeline | beam.Create([Line(line, "big.jsonl:1")]) | NormalizeRecords("actions", "moesif")
    ).records
    _ = records | DedupByTransactionId(str(spill), partitions=4)
    counters = run(pipeline)
    assert counters["read"] == n
    spilled = sum(p.stat().st_size for p in spill.rglob("*") if p.is_file())
    # Each record spills its body, its own bytes, its id, source and a header: a few times
    # its share of the line, never the line itself (which would be n * len(line)).
    assert spilled < 6 * len(line), (spilled, len(line))


# Property tests: any JSON value, any bytes.

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)

_FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _object_like(pipeline: str, fmt: str) -> st.SearchStrategy[dict]:
    """Records close to valid, so the property reaches the mapping, not only its guard."""
    lines = {"wso2": WSO2_LINE, "moesif": ACTION_LINE, "segment": SEGMENT_LINE, **EXAMPLES}
    base = json.loads(lines.get(fmt, EXAMPLES["kong"]))  # auto: any format's record
    return st.dictionaries(st.sampled_from(sorted(base)), json_values, max_size=6).map(
        lambda changes: {**base, **changes}
    )


@pytest.mark.parametrize(("pipeline", "fmt"), FORMAT_CASES)
@_FAST
@given(data=st.data())
def test_any_json_value_gives_records_or_dead_letters(pipeline, fmt, data):
    value = data.draw(json_values | _object_like(pipeline, fmt))
    raw = json.dumps(value).encode()
    records, letters = normalize(pipeline, fmt, raw)
    assert len(records) + len(letters) >= 1
    for letter in letters:
        assert letter["reason"] in {"parse_error", "invalid_record", "too_large"}, letter


@pytest.mark.parametrize(("pipeline", "fmt"), FORMAT_CASES)
@_FAST
@given(raw=st.binary(max_size=200))
def test_any_bytes_give_records_or_dead_letters(pipeline, fmt, raw):
    records, letters = normalize(pipeline, fmt, raw)
    assert len(records) + len(letters) >= 1
    assert all(letter["reason"] != "internal_error" for letter in letters)


@_FAST
@given(value=json_values)
def test_metadata_rules_take_any_json(value):
    metadata = {"m": value}
    try:
        clean = sanitize_keys(metadata)
    except InvalidRecord:
        return
    assert all("." not in key for key, _ in signature(clean))
    for key, kind in signature(clean):
        assert kind in {"string", "number", "boolean", "object", "array"}, (key, kind)


@_FAST
@given(values=st.lists(json_values, max_size=5))
def test_batch_bodies_are_finite_valid_json(values):
    import orjson

    bodies = []
    for value in values:
        try:
            bodies.append(orjson.dumps(value))
        except orjson.JSONEncodeError:
            continue  # integers beyond 64 bits: normalize refuses them as invalid_record
    batch = encode_batch(bodies)
    decoded = strict_loads(batch)
    assert len(decoded) == len(bodies)
    for item in decoded:
        _assert_finite(item)


def _assert_finite(value: Any) -> None:
    if isinstance(value, float):
        assert math.isfinite(value)
    elif isinstance(value, dict):
        for item in value.values():
            _assert_finite(item)
    elif isinstance(value, list):
        for item in value:
            _assert_finite(item)


@pytest.mark.parametrize("source", ["events.jsonl:3", "évé.jsonl:3", "f\udcff\udcfe.jsonl:7"])
def test_the_record_coder_keeps_any_source(source):
    """A non-UTF-8 file name (decoded with surrogate escapes) crosses a shuffle unchanged."""
    coder = RecordCoder()
    record = Record(5, b"{}", b"raw", source, b"id", (), Ack("t-0", 9, 8, 1, 0))
    assert coder.decode(coder.encode(record)) == record
    assert coder.decode(coder.encode(record._replace(ack=None))) == record._replace(ack=None)
