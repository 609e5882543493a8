"""Every stage's rejects reach the dead-letter sink by construction, or the build fails."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from moesif_beam.pipelines import common
from moesif_beam.pipelines.config import PipelineConfig
from moesif_beam.transforms.deadletters import (
    DeadLetters,
    UnconsumedDeadLetters,
    WriteDeadLetters,
    verify_dead_letters,
)
from moesif_beam.transforms.formats.normalize import NormalizeRecords
from moesif_beam.transforms.records import Line
from moesif_beam.transforms.sources.kafka import KafkaPartition, KafkaSourceConfig
from tests.fixtures import wso2_line


def _normalized(pipeline: beam.Pipeline):
    lines = pipeline | beam.Create([Line(wso2_line("a"), "f:1"), Line(b"not json", "f:2")])
    return lines | "Normalize" >> NormalizeRecords("events", "wso2")


def test_a_reject_stream_nobody_consumes_fails_the_build():
    pipeline = beam.Pipeline()
    normalized = _normalized(pipeline)
    _ = normalized.records | beam.Map(print)
    with pytest.raises(UnconsumedDeadLetters, match="Normalize"):
        verify_dead_letters(pipeline)


def test_rejects_handed_to_the_collector_pass(tmp_path):
    pipeline = beam.Pipeline()
    normalized = _normalized(pipeline)
    rejects = DeadLetters()
    rejects.add(normalized.dead_letters)
    rejects.write("DeadLetters", WriteDeadLetters(str(tmp_path), "events", "run"))
    verify_dead_letters(pipeline)
    with pytest.raises(RuntimeError, match="already written"):
        rejects.add(normalized.dead_letters)


def _configs(tmp_path):
    sample = tmp_path / "in.jsonl"
    sample.write_bytes(wso2_line("a") + b"\n")
    kafka = KafkaSourceConfig(
        bootstrap_servers="127.0.0.1:1", topic="t", group_id="g", start="earliest"
    )
    partitions = (KafkaPartition("t", 0, 0, 10),)
    base = {"pipeline": "events", "input_format": "wso2", "output_dir": str(tmp_path / "out")}
    return {
        "bounded files": PipelineConfig(input=str(sample), **base),
        "streaming Kafka (keyed)": PipelineConfig(
            input="", kafka=kafka, kafka_partitions=partitions, streaming=True, **base
        ),
        "streaming Kafka (one process)": PipelineConfig(
            input="",
            kafka=kafka,
            kafka_partitions=partitions,
            streaming=True,
            single_process=True,
            **base,
        ),
        "streaming --follow": PipelineConfig(
            input=str(sample), follow=True, streaming=True, **base
        ),
    }


@pytest.mark.parametrize(
    "shape",
    [
        "bounded files",
        "streaming Kafka (keyed)",
        "streaming Kafka (one process)",
        "streaming --follow",
    ],
)
def test_every_shape_builds_with_all_rejects_wired_and_fails_without_one(
    tmp_path, monkeypatch, shape
):
    config = _configs(tmp_path)[shape]
    options = PipelineOptions(["--streaming"] if config.streaming else [])
    common.build_delivery(config, options, {})  # every stage's rejects reach the sink

    # Forget one stage's rejects (the delivery stage's, the last one added): the build
    # now fails, before a record is read.
    added: list = []
    original = DeadLetters.add

    def forgetful(self, *streams):
        added.extend(streams)
        if len(added) <= 2:
            original(self, *streams)

    monkeypatch.setattr(DeadLetters, "add", forgetful)
    with pytest.raises(UnconsumedDeadLetters):
        common.build_delivery(config, options, {})
