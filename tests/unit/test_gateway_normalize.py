"""NormalizeRecords with the gateway formats: skipped control messages, options, field paths."""

from __future__ import annotations

import base64
import gzip
import json

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from moesif_beam.transforms.formats.gateway import MASK, MappingOptions
from moesif_beam.transforms.formats.normalize import NormalizeRecords
from moesif_beam.transforms.records import Ack, Line
from tests.helpers import make_pipeline, run
from tests.unit.gateway_examples import AWS, AZURE, KONG

CONTROL = base64.b64encode(
    gzip.compress(
        json.dumps(
            {
                "messageType": "CONTROL_MESSAGE",
                "logEvents": [{"id": "", "timestamp": 1, "message": "CWL CONTROL MESSAGE"}],
            }
        ).encode()
    )
)


def test_a_control_message_from_a_file_is_skipped_and_not_read():
    pipeline = make_pipeline()
    lines = [Line(CONTROL, "f:1"), Line(AWS, "f:2")]
    out = pipeline | beam.Create(lines) | NormalizeRecords("events", "aws")
    assert_that(out.records | beam.Map(lambda kv: kv[1].source), equal_to(["f:2"]), label="r")
    assert_that(out.dead_letters, equal_to([]), label="dead")
    counters = run(pipeline)
    assert (counters["read"], counters["skipped"]) == (1, 1)


def test_a_control_message_from_kafka_is_a_dead_letter_so_its_offset_commits():
    pipeline = make_pipeline()
    ack = Ack("t/0", 7, 6)
    out = pipeline | beam.Create([Line(CONTROL, "t/0@7", ack)]) | NormalizeRecords("events", "aws")
    assert_that(
        out.dead_letters | beam.Map(lambda d: (d["reason"], d["_ack"], "control" in d["detail"])),
        equal_to([("invalid_record", ack, True)]),
    )
    counters = run(pipeline)
    assert (counters["read"], counters["invalid"], counters.get("skipped", 0)) == (1, 1, 0)


def test_options_reach_the_mapping_and_fields_carry_their_path_in_the_line():
    bad_azure = AZURE.replace(b'"responseCode":200', b'"responseCode":"x"')
    kong = KONG.replace(b'"host":"api.acme.io"', b'"host":"api.acme.io","x-secret":"s"')
    pipeline = make_pipeline()
    options = MappingOptions(mask_headers=("x-secret",), user_id_field="route.name")
    out = (
        pipeline
        | beam.Create([Line(kong, "f:1"), Line(bad_azure, "f:2")])
        | NormalizeRecords("events", "auto", mapping=options)
    )
    bodies = out.records | beam.Map(lambda kv: json.loads(kv[1].body))
    assert_that(
        bodies | beam.Map(lambda e: (e["user_id"], e["request"]["headers"]["x-secret"])),
        equal_to([("orders", MASK)]),
        label="records",
    )
    assert_that(
        out.dead_letters | beam.Map(lambda d: (d["reason"], d["field"])),
        equal_to([("invalid_record", "records[0].properties.responseCode")]),
        label="dead",
    )
    run(pipeline)


def test_company_id_field_goes_inside_mapping():
    with pytest.raises(ValueError, match="inside mapping"):
        NormalizeRecords("events", "kong", "x", mapping=MappingOptions())
