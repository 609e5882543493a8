"""Helpers shared by the pipeline tests: running small pipelines and reading their outputs."""

from __future__ import annotations

import glob
import gzip
import json
import time
from collections.abc import Callable
from typing import Any

import apache_beam as beam
import fastavro
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline

from moesif_beam.runners.launch import collect_counters


def make_pipeline() -> TestPipeline:
    """A TestPipeline on the FnApiRunner, the runner bounded runs use by default."""
    return TestPipeline(options=PipelineOptions(["--runner=FnApiRunner"]))


def run(pipeline: beam.Pipeline) -> dict[str, int]:
    """Run a pipeline to completion and return its moesif-beam counters."""
    result = pipeline.run()
    result.wait_until_finish()
    return collect_counters(result)


def read_batches(directory: str) -> list[list[dict[str, Any]]]:
    """Every batch file under ``directory``, decoded."""
    return [
        json.loads(gzip.decompress(open(path, "rb").read()))
        for path in sorted(glob.glob(f"{directory}/batch-*.json.gz"))
    ]


def read_dead_letters(directory: str) -> list[dict[str, Any]]:
    """Every dead letter in the Avro files under ``directory``."""
    records: list[dict[str, Any]] = []
    for path in sorted(glob.glob(f"{directory}/*.avro")):
        with open(path, "rb") as handle:
            records.extend(fastavro.reader(handle))
    return records


def assert_nothing_lost(counters: dict[str, int]) -> None:
    """The project's core invariant, with the numbers in the message when it fails."""
    assert (
        counters["read"] == counters["sent"] + counters["duplicates"] + counters["dead_letters"]
    ), counters


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds.

    Tests wait on the event itself with this, never for a fixed time.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def spill_files(spill: Any, records: list) -> dict[int, list[str]]:
    """One bundle of the spill stage over ``records``: the files it wrote, by partition."""
    spill.start_bundle()
    for record in records:
        spill.process(record)
    files: dict[int, list[str]] = {}
    for written in spill.finish_bundle():
        part, path = written.value
        files.setdefault(part, []).append(path)
    return files
