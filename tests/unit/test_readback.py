"""The spill leaves out lines the input can give back (Record.at, sources/readback.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moesif_beam.transforms.dedup import DedupByTransactionId
from moesif_beam.transforms.records import Record
from moesif_beam.transforms.schema.bounded import conflict_letter
from moesif_beam.transforms.sources.files import _range_lines, iter_range
from moesif_beam.transforms.sources.ranges import plan_ranges
from moesif_beam.transforms.sources.readback import original_bytes
from tests.helpers import spill_files


def _lines(path: Path, range_bytes: int) -> list:
    return [
        line
        for file_range in plan_ranges(str(path), range_bytes)
        for line in _range_lines(*file_range, max_line_bytes=1 << 20)
    ]


def test_each_line_knows_where_it_starts_in_a_clean_file(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b"".join(b'{"n": %d, "pad": "%s"}\n' % (i, b"x" * (i % 13)) for i in range(300))
    )
    data = path.read_bytes()
    lines = _lines(path, 256)
    assert len(lines) == 300
    for line in lines:
        assert line.at >= 0
        assert data[line.at : line.at + len(line.raw)] == line.raw
        assert line.at == 0 or data[line.at - 1 : line.at] == b"\n"
        assert data[line.at + len(line.raw) : line.at + len(line.raw) + 1] == b"\n"


def test_a_line_the_reader_changed_or_may_have_changed_has_no_offset(tmp_path):
    # "\r\n" endings (the line is not the bytes up to "\n"), blank lines, and a last line
    # without a newline: where a range is cut line by line, no offset is claimed at all.
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\r\n{"b": 2}\r\n\n\n{"c": 3}\n{"d": 4}')
    data = path.read_bytes()
    lines = _lines(path, 1 << 20)
    assert [line.raw for line in lines] == [b'{"a": 1}', b'{"b": 2}', b'{"c": 3}', b'{"d": 4}']
    for line in lines:
        assert line.at == -1 or data[line.at : line.at + len(line.raw)] == line.raw
    assert all(line.at == -1 for line in lines[:2])


def test_the_whole_file_reader_gives_no_offsets(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n')
    assert [item for item in iter_range((str(path), 0, -1, 1))] == [
        (b'{"a": 1}', f"{path}:1"),
        (b'{"b": 2}', f"{path}:2"),
    ]


def _spill_and_keep(tmp_path: Path, records: list) -> list:
    dedup = DedupByTransactionId(str(tmp_path / "spill"), partitions=3)
    files = spill_files(dedup.spill_stage(), records)
    keep = dedup.keep_stage()
    return [winner for group in files.items() for run in keep.process(group) for winner in run]


def test_the_spill_leaves_out_located_lines_and_gives_them_back_on_demand(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(b'{"id": "t%d", "i": %d}\n' % (i % 8, i) for i in range(40)))
    records = [
        (f"t{i % 8}", Record(i, b'{"body":%d}' % i, line.raw, line.source, at=line.at))
        for i, line in enumerate(_lines(path, 1 << 20))
    ]
    # One record without an offset (a Kafka message, an array element) keeps its bytes.
    records.append(("kafka", Record(1, b"{}", b"message", "topic/0@3")))
    kept = dict(_spill_and_keep(tmp_path, records))
    assert sorted(kept) == sorted({tid for tid, _ in records})
    for tid, original in records[:8] + records[-1:]:
        winner = kept[tid]
        assert winner.body == original.body and winner.source == original.source
        assert winner.raw == (b"" if original.at >= 0 else original.raw)
        assert original_bytes(winner) == (original.raw, "")


def test_a_type_conflict_after_the_spill_carries_the_input_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"first": 1}\n{"second": 2}\n')
    line = _lines(path, 1 << 20)[1]
    ((tid, spilled),) = _spill_and_keep(
        tmp_path, [("t", Record(1, b"{}", line.raw, line.source, at=line.at))]
    )
    letter = conflict_letter((tid, spilled), ("k", "string", "number"), "events")
    assert letter["payload"] == b'{"second": 2}'
    assert letter["source"] == f"{path}:2"
    assert letter["detail"].endswith("this record sends number")


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda p: p.unlink(), "FileNotFoundError"),
        (lambda p: p.write_bytes(b"x"), "is not that line now"),
        (lambda p: p.write_bytes(b'{"first": 1}\r\n{"other": 3}\r\n'), "is not that line now"),
    ],
)
def test_an_input_changed_during_the_run_gives_the_normalized_record_and_says_so(
    tmp_path, change, why
):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"first": 1}\n{"second": 2}\n')
    line = _lines(path, 1 << 20)[1]
    ((_, spilled),) = _spill_and_keep(
        tmp_path, [("t", Record(1, b'{"normalized":2}', line.raw, line.source, at=line.at))]
    )
    change(path)
    payload, note = original_bytes(spilled)
    assert payload == b'{"normalized":2}'
    assert why in note and "the payload is the record as normalized" in note
