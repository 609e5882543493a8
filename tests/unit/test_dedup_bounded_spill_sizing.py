"""The bounded dedup spill's size: partitions grow with the input, write blocks shrink."""

from __future__ import annotations

import pytest

from moesif_beam.transforms.dedup.bounded import (
    DEFAULT_PARTITIONS,
    MAX_PARTITIONS,
    PARTITION_SPILL_BYTES,
    DedupByTransactionId,
    open_file_budget,
    spill_buffer_bytes,
    spill_partitions,
)

GB = 10**9


def test_small_and_unknown_inputs_keep_the_default():
    assert spill_partitions(0) == DEFAULT_PARTITIONS
    assert spill_partitions(118_000_000) == DEFAULT_PARTITIONS  # 100k events


def test_partitions_grow_so_that_one_partition_stays_about_the_same_size():
    one_million, ten_million = spill_partitions(1_178 * 10**6), spill_partitions(11_784 * 10**6)
    assert DEFAULT_PARTITIONS < one_million < ten_million
    for size, parts in ((1_178 * 10**6, one_million), (11_784 * 10**6, ten_million)):
        assert size * 2.3 / parts <= PARTITION_SPILL_BYTES
    assert 9 <= ten_million / one_million <= 11


def test_a_gzip_input_counts_as_its_lines_and_the_count_is_bounded():
    assert spill_partitions(0, GB) > spill_partitions(GB)
    assert spill_partitions(10**15) == MAX_PARTITIONS
    assert spill_partitions(10**15, max_partitions=768) == 768  # an open-file limit of 1024
    with pytest.raises(ValueError, match="input sizes"):
        spill_partitions(-1)


def test_the_open_file_budget_leaves_room_under_the_limit():
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    budget = open_file_budget()
    assert budget >= DEFAULT_PARTITIONS
    if soft != resource.RLIM_INFINITY:
        assert budget <= max(DEFAULT_PARTITIONS, soft - 256)


def test_write_blocks_share_a_bounded_budget():
    assert spill_buffer_bytes(DEFAULT_PARTITIONS) == 256 * 1024
    assert spill_buffer_bytes(1024) == 32 * 1024
    assert spill_buffer_bytes(MAX_PARTITIONS) == 16 * 1024
    for parts in (64, 100, 700, 2000):
        assert parts * spill_buffer_bytes(parts) <= max(32 * 2**20, parts * 16 * 1024)


def test_the_transform_refuses_partitions_out_of_range():
    for bad in (0, MAX_PARTITIONS + 1):
        with pytest.raises(ValueError, match="partitions"):
            DedupByTransactionId("/tmp/x", bad)


def test_a_bounded_file_run_sizes_its_spill_from_its_input(tmp_path):
    from moesif_beam.pipelines.common import _spill_partitions
    from moesif_beam.pipelines.config import PipelineConfig

    big = tmp_path / "big.jsonl"
    with big.open("wb") as f:
        f.truncate(2 * GB)  # sparse: a size, no disk
    spilled = PipelineConfig(
        pipeline="events", input_format="wso2", input=str(big), dedup_spill=True
    )
    expected = spill_partitions(2 * GB, max_partitions=open_file_budget())
    assert _spill_partitions(spilled) == expected > DEFAULT_PARTITIONS
    gzipped = tmp_path / "big.jsonl.gz"
    with gzipped.open("wb") as f:
        f.truncate(GB // 4)
    both = PipelineConfig(
        pipeline="events", input_format="wso2", input=str(tmp_path / "big*"), dedup_spill=True
    )
    expected = spill_partitions(2 * GB, GB // 4, max_partitions=open_file_budget())
    assert _spill_partitions(both) == expected
    shuffled = PipelineConfig(
        pipeline="events", input_format="wso2", input=str(big), dedup_spill=False
    )
    assert _spill_partitions(shuffled) == DEFAULT_PARTITIONS
    missing = PipelineConfig(
        pipeline="events", input_format="wso2", input=str(tmp_path / "no*.jsonl"), dedup_spill=True
    )
    assert _spill_partitions(missing) == DEFAULT_PARTITIONS
