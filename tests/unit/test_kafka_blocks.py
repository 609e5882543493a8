"""A Kafka consumer batch read as one block: the same claims, acks and stops as per message."""

from __future__ import annotations

from typing import Any

import pytest
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.runners.sdf_utils import ThreadsafeRestrictionTracker
from confluent_kafka import KafkaError

from moesif_beam.transforms.records import Ack
from moesif_beam.transforms.sources.kafka import _take_block


class _Message:
    def __init__(self, offset: int, value: bytes | None, stamp: int = 1_000, eof: bool = False):
        self._offset, self._value, self._stamp, self._eof = offset, value, stamp, eof

    def error(self) -> Any:
        if not self._eof:
            return None

        class _Eof:
            def code(self) -> int:
                return KafkaError._PARTITION_EOF

        return _Eof()

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return (1, self._stamp)

    def value(self) -> bytes | None:
        return self._value


def _tracker(start: int, stop: int = 10**9) -> ThreadsafeRestrictionTracker:
    """Beam's own tracker, wrapped as the SDK wraps it for a splittable DoFn."""
    return ThreadsafeRestrictionTracker(OffsetRestrictionTracker(OffsetRange(start, stop)))


class _SplitAfterLook(ThreadsafeRestrictionTracker):
    """A runner's split landing between the block's look at its range and its claim."""

    def __init__(self, start: int, stop: int, split_at: int) -> None:
        super().__init__(OffsetRestrictionTracker(OffsetRange(start, stop)))
        self._split_at = split_at
        self._looked = False

    def current_restriction(self) -> Any:
        seen = super().current_restriction()
        if not self._looked:
            self._looked = True
            inner = self._restriction_tracker
            inner._range = OffsetRange(inner._range.start, self._split_at)  # the primary
        return seen


def test_a_block_holds_each_message_with_its_ack_and_time():
    messages = [_Message(5, b"a", 1_000), _Message(7, None, 2_000), _Message(8, b"c", 1_500)]
    tracker = _tracker(5)
    block, previous, caught_up, finished = _take_block(messages, tracker, "t/0", 4, 100)
    assert [line.raw for line in block.lines] == [b"a", b"", b"c"]
    assert [line.source for line in block.lines] == ["t/0@5", "t/0@7", "t/0@8"]
    # Each ack says everything since the previous message is done (gaps: compacted topics).
    assert [line.ack for line in block.lines] == [
        Ack("t/0", 5, 4),
        Ack("t/0", 7, 5),
        Ack("t/0", 8, 7),
    ]
    assert all(line.ack.parts == 1 and line.ack.part == 0 for line in block.lines)
    assert block.times_ms == [1_000, 2_000, 1_500]
    assert (previous, caught_up, finished) == (8, False, False)
    # One claim covers the block: the next offset the tracker takes is 9.
    with pytest.raises(ValueError, match="strictly increase"):
        tracker.try_claim(8)
    assert tracker.try_claim(9)


def test_a_block_stops_where_the_range_was_split_or_ends():
    messages = [_Message(offset, b"x") for offset in range(10, 20)]
    tracker = _tracker(10, 18)
    assert tracker.try_claim(10)
    primary, _ = tracker.try_split(0.5)  # a runner's split, before the next block
    assert primary.stop == 14
    block, previous, _, finished = _take_block(messages[1:], tracker, "t/0", 10, 18)
    assert [line.ack.offset for line in block.lines] == [11, 12, 13]
    assert (previous, finished) == (13, True)
    tracker.check_done()
    block, previous, _, finished = _take_block(messages, _tracker(10), "t/0", 9, 16)
    assert [line.ack.offset for line in block.lines] == [10, 11, 12, 13, 14, 15]
    assert (previous, finished) == (15, True)
    block, previous, _, finished = _take_block(messages, _tracker(10, 12), "t/0", 9, 100)
    assert [line.ack.offset for line in block.lines] == [10, 11]
    assert (previous, finished) == (11, True)


@pytest.mark.parametrize(("split_at", "kept"), [(14, [10, 11, 12, 13]), (10, [])])
def test_a_split_between_the_look_and_the_claim_keeps_what_stays_in_the_range(split_at, kept):
    """The claim fails; the offsets still in the range are emitted, the rest are not."""
    messages = [_Message(offset, b"x") for offset in range(10, 20)]
    tracker = _SplitAfterLook(10, 100, split_at)
    block, previous, _, finished = _take_block(messages, tracker, "t/0", 9, 100)
    assert [line.ack.offset for line in block.lines] == kept
    assert (previous, finished) == ((kept or [9])[-1], True)
    tracker.check_done()  # the range counts as done: nothing in it is left unread


def test_end_of_partition_is_noted_and_an_error_raises():
    block, _, caught_up, _ = _take_block(
        [_Message(0, b"x"), _Message(1, None, eof=True)], _tracker(0), "t/0", -1, 100
    )
    assert len(block.lines) == 1 and caught_up

    class _Broken(_Message):
        def error(self) -> Any:
            class _Err:
                def code(self) -> int:
                    return -1

                def __str__(self) -> str:
                    return "broker gone"

            return _Err()

    with pytest.raises(RuntimeError, match="broker gone"):
        _take_block([_Broken(0, b"x")], _tracker(0), "t/0", -1, 100)
