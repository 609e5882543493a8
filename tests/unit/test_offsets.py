"""The offset frontier: commit only past records that are done, whatever the ack order."""

from __future__ import annotations

import itertools
import random

import pytest

from moesif_beam.transforms.records import Ack, PartitionStart
from moesif_beam.transforms.sources.offsets import PartitionProgress, advance, compact_acks


def _typed(ack):
    """The tables below in short: ("start", n), (offset, previous[, parts, part])."""
    if isinstance(ack, Ack | PartitionStart):
        return ack
    if ack[0] == "start":
        return PartitionStart("p/0", ack[1])
    return Ack("p/0", *ack)


def _acks(*acks):
    return [Ack(*a) for a in acks]


def _run(acks):
    progress = PartitionProgress()
    advance(progress, [_typed(a) for a in acks])
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
        ([("start", 9), (14, 9), (11, 10)], 14),  # a run (from compact_acks) covers 11
        ([("start", 12), (14, 9)], 14),  # a run straddling the start counts from there
        ([(14, 9), ("start", 12)], 14),  # ... whichever arrives first
        ([("start", 9), (12, 9), (14, 9)], 14),  # two runs from one point: the longer wins
    ],
)
def test_advance(acks, frontier):
    assert _run(acks) == frontier


def test_every_order_of_the_same_acks_ends_at_the_same_frontier():
    acks = [("start", 99), (100, 99), (101, 100), (105, 101), (106, 105, 2, 0), (106, 105, 2, 1)]
    assert {_run(list(order)) for order in itertools.permutations(acks)} == {106}


def test_advance_reports_movement_and_forgets_what_it_passed():
    progress = PartitionProgress()
    assert advance(progress, [PartitionStart("p/0", 0)])
    assert not advance(progress, [Ack("p/0", 2, 1)])
    assert advance(progress, [Ack("p/0", 1, 0)])
    assert progress.frontier == 2
    assert progress.done == {} and progress.parts == {}


def test_compact_acks_merges_chains_per_partition():
    acks = _acks(("p/0", 5, 4), ("p/1", 7, 3), ("p/0", 6, 5), ("p/0", 9, 6), ("p/0", 20, 11))
    assert sorted(compact_acks(acks)) == _acks(("p/0", 9, 4), ("p/0", 20, 11), ("p/1", 7, 3))


def test_compact_acks_passes_message_parts_through():
    parts = _acks(("p/0", 12, 11, 3, 0), ("p/0", 12, 11, 3, 2))
    assert compact_acks([*parts, Ack("p/0", 11, 10)]) == [*parts, Ack("p/0", 11, 10)]


def test_compacted_acks_in_any_bundling_and_order_reach_the_same_frontier():
    """Acks compacted per bundle, bundles retried and reordered: the same frontier."""
    rng = random.Random(7)
    for _ in range(300):
        offsets = sorted(rng.sample(range(100, 160), rng.randint(1, 40)))
        previous = [99, *offsets[:-1]]
        acks = [Ack("p/0", o, p) for p, o in zip(previous, offsets, strict=True)]
        done = [a for a in acks if rng.random() < 0.9]  # some records still in flight
        rng.shuffle(done)
        bundles, i = [], 0
        while i < len(done):
            n = rng.randint(1, 8)
            bundles.append(compact_acks(done[i : i + n]))
            i += n
        bundles += [b for b in bundles if rng.random() < 0.2]  # retried bundles repeat
        rng.shuffle(bundles)
        start = [("start", 99)]
        cut = rng.randint(0, len(bundles))
        compacted = [a[1:] for b in bundles[:cut] for a in b]
        compacted += start + [a[1:] for b in bundles[cut:] for a in b]
        assert _run(compacted) == _run(start + [a[1:] for a in done])


def test_entries_a_run_jumps_over_are_dropped():
    progress = PartitionProgress()
    advance(progress, [PartitionStart("p/0", 0), *(Ack("p/0", n + 1, n) for n in range(5, 3000))])
    assert len(progress.done) == 2995  # waiting for 1..5
    advance(progress, [Ack("p/0", 10_000, 0)])  # a run covering all of them
    assert progress.frontier == 10_000
    assert progress.done == {}


def test_partition_consumers_one_per_partition_and_close_never_hangs():
    from moesif_beam.transforms.sources.kafka import _PartitionConsumers

    class Closable:
        closed = False

        def close(self) -> None:
            self.closed = True

    consumers = _PartitionConsumers()
    first = consumers.slot("t", 0)
    assert consumers.slot("t", 0) is first
    assert consumers.slot("t", 1) is not first
    first.consumer, busy = Closable(), consumers.slot("t", 1)
    busy.consumer = Closable()
    busy.lock.acquire()  # a read that never ends
    idle = first.consumer
    consumers.close(wait=0.1)
    assert idle.closed and first.consumer is None
    assert busy.consumer is not None and not busy.consumer.closed
    assert consumers.slot("t", 0) is not first  # a later read starts afresh
