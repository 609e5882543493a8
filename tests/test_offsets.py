"""The offset frontier: commit only past records that are done, whatever the ack order."""

from __future__ import annotations

import itertools

import pytest

from transforms.offsets import PartitionProgress, advance


def _run(acks):
    progress = PartitionProgress()
    advance(progress, acks)
    return progress.frontier


@pytest.mark.parametrize(
    ("acks", "frontier"),
    [
        ([("start", 9)], 9),  # nothing done yet: commit 10, where the run started
        ([("start", 9), (10, 9), (11, 10)], 11),
        ([("start", 9), (11, 10)], 9),  # 10 is not done: 11 cannot be committed
        ([(11, 10), (10, 9), ("start", 9)], 11),  # any order, start last
        ([("start", 9), (10, 9), (13, 10), (14, 13)], 14),  # gaps (11, 12 are markers)
        ([("start", 9), (10, 9), (10, 9)], 10),  # a repeated ack changes nothing
        ([("start", 9), (12, 11, 3, 0), (12, 11, 3, 2)], 9),  # 2 of 3 parts done
        ([("start", 11), (12, 11, 3, 0), (12, 11, 3, 2), (12, 11, 3, 1)], 12),
        ([("start", 20), (15, 14), (21, 20)], 21),  # acks from before the start are ignored
        ([(10, 9)], None),  # start unknown: nothing can be committed
    ],
)
def test_advance(acks, frontier):
    assert _run(acks) == frontier


def test_every_order_of_the_same_acks_ends_at_the_same_frontier():
    acks = [("start", 99), (100, 99), (101, 100), (105, 101), (106, 105, 2, 0), (106, 105, 2, 1)]
    assert {_run(list(order)) for order in itertools.permutations(acks)} == {106}


def test_advance_reports_movement_and_forgets_what_it_passed():
    progress = PartitionProgress()
    assert advance(progress, [("start", 0)])
    assert not advance(progress, [(2, 1)])
    assert advance(progress, [(1, 0)])
    assert progress.frontier == 2
    assert progress.done == {} and progress.parts == {}
