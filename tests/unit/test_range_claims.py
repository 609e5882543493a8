"""Claiming planned ranges as the read goes (transforms/sources/ranges.py)."""

from __future__ import annotations

import multiprocessing
import os

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from moesif_beam.pipelines.common import _range_claims
from moesif_beam.pipelines.config import PipelineConfig
from moesif_beam.transforms.sources.files import ReadLines, iter_lines
from moesif_beam.transforms.sources.ranges import (
    RangeClaims,
    claim,
    claimed_ranges,
    plan_ranges,
    tokens_over,
)
from tests.helpers import make_pipeline, run


def _lines_file(path, count: int) -> None:
    path.write_bytes(b"".join(b'{"n": %d}\n' % n for n in range(count)))


def test_a_range_is_claimed_by_one_caller_only(tmp_path):
    assert claim(str(tmp_path), 3)
    assert not claim(str(tmp_path), 3)
    assert claim(str(tmp_path), 4)


def test_tokens_are_alike_and_in_file_order(tmp_path):
    ranges = [("b", 0, 5, 1), ("a", 10, 20, 3), ("a", 0, 10, 1)]
    tokens = tokens_over(ranges, str(tmp_path), 3)
    assert (
        tokens
        == [RangeClaims(str(tmp_path), (("a", 0, 10, 1), ("a", 10, 20, 3), ("b", 0, 5, 1)))] * 3
    )
    with pytest.raises(ValueError, match="tokens"):
        tokens_over(ranges, str(tmp_path), 0)


def _claim_all(token: RangeClaims, out) -> None:
    out.put([r[1] for r in claimed_ranges(token)])


def test_processes_reading_alike_tokens_read_every_range_once(tmp_path):
    path = tmp_path / "in.jsonl"
    _lines_file(path, 4000)
    ranges = plan_ranges(str(path), 512)
    assert len(ranges) > 50
    token = tokens_over(ranges, str(tmp_path / "claims"), 1)[0]
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(token, out)) for _ in range(4)]
    for proc in procs:
        proc.start()
    starts = [start for _ in procs for start in out.get(timeout=60)]
    for proc in procs:
        proc.join()
    assert sorted(starts) == [r[1] for r in ranges]  # each once, none left out
    assert len(os.listdir(tmp_path / "claims")) == len(ranges)
    # A token read after all are claimed reads nothing.
    assert list(claimed_ranges(token)) == []


def test_read_lines_with_claims_reads_every_line_once(tmp_path):
    path = tmp_path / "in.jsonl"
    _lines_file(path, 500)
    pipeline = make_pipeline()
    read = ReadLines(
        str(path), range_bytes=256, claims_dir=str(tmp_path / "claims"), claim_tokens=3
    )
    lines = (pipeline | read).lines
    pairs = lines | beam.Map(lambda line: (line.raw, line.source))  # Line.at aside
    assert_that(pairs, equal_to(list(iter_lines(str(path)))))
    run(pipeline)
    assert len(os.listdir(tmp_path / "claims")) == len(plan_ranges(str(path), 256))


def test_read_lines_refuses_claims_it_cannot_share(tmp_path):
    with pytest.raises(ValueError, match="claims_dir must be a local directory"):
        ReadLines(str(tmp_path / "x"), claims_dir="gs://bucket/claims")
    with pytest.raises(ValueError, match="claim_tokens"):
        ReadLines(str(tmp_path / "x"), claims_dir=str(tmp_path), claim_tokens=0)


@pytest.mark.parametrize(
    ("runner", "output_dir", "claims"),
    [
        ("FnApiRunner", "out", True),
        ("moesif_beam.runners.engines.local_workers.LocalRunner", "out", True),
        ("FlinkRunner", "out", False),  # retries bundles: a retry would find its ranges claimed
        ("DataflowRunner", "gs://bucket/out", False),
        ("FnApiRunner", "gs://bucket/out", False),  # claims need a local directory
    ],
)
def test_only_runs_that_never_retry_claim_ranges(tmp_path, runner, output_dir, claims):
    out = output_dir if "://" in output_dir else str(tmp_path / output_dir)
    config = PipelineConfig(
        pipeline="events", input="in.jsonl", input_format="wso2", output_dir=out, dedup_spill=True
    )
    options = PipelineOptions([f"--runner={runner}", "--direct_num_workers=3"])
    got = _range_claims(config, options)
    if claims:
        assert got == {"claims_dir": f"{config.spill_dir}/range-claims", "claim_tokens": 6}
    else:
        assert got == {}
