"""Commit Kafka offsets only for records that are done: sent, duplicate, or dead-lettered.

Every Kafka record carries an acknowledgement token ``(partition, offset, previous)``:
``previous`` is the offset of the record the reader emitted before it in that partition.
The terminal stages (the sink after a 2xx, dedup for a duplicate, the dead-letter writer
after its file is closed) send the token here. Per partition, the *frontier* is the last
offset before which everything is done; it advances over a done record only when that
record's ``previous`` is the frontier. Gaps in Kafka offsets (transaction markers,
compaction) need no special case, and acknowledgements may arrive in any order. A message
that held several records (a JSON array) is done when all its parts are.

The committed offset is ``frontier + 1``, Kafka's "next offset to read". A crash loses
nothing: a restarted job resumes from the committed offset and re-delivers what was in
flight, with the same transaction ids.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from moesif_beam.transforms.records import Ack, PartitionStart
from moesif_beam.transforms.sources.kafka import (
    KafkaPartition,
    KafkaSourceConfig,
    _ConsumerFn,
    retry_transient,
)

__all__ = ["CommitOffsets", "PartitionProgress", "advance", "compact_acks"]

_LOG = logging.getLogger(__name__)


@dataclass
class PartitionProgress:
    """What a partition's commit stage remembers.

    Attributes:
        frontier: the last offset before which everything is done; None until the
            partition's start is known.
        done: done records not yet reachable from the frontier: ``previous -> offset``.
        parts: for messages with several records, offset -> indexes acknowledged so far.
    """

    frontier: int | None = None
    done: dict[int, int] = field(default_factory=dict)
    parts: dict[int, set[int]] = field(default_factory=dict)


def advance(progress: PartitionProgress, acks: Iterable[Ack | PartitionStart]) -> bool:
    """Apply acknowledgements and move the frontier as far as the chain allows.

    An :class:`Ack` says every record after ``previous`` up to and including ``offset`` is
    done: one record (whose predecessor in the partition was
    ``previous``), or a run of them merged by :func:`compact_acks`. Stale and overlapping
    acknowledgements (a retried bundle's, or records re-read after a restart) are harmless.

    Args:
        progress: the partition's state, updated in place.
        acks: :class:`PartitionStart` markers and :class:`Ack` acknowledgements (of the
            partition ``progress`` tracks; their ``partition`` is not looked at).

    Returns:
        True if the frontier moved.
    """
    before = progress.frontier
    for ack in acks:
        if isinstance(ack, PartitionStart):
            if progress.frontier is None or ack.before > progress.frontier:
                progress.frontier = ack.before
                _rebase(progress)
            continue
        if ack.parts > 1:
            seen = progress.parts.setdefault(ack.offset, set())
            seen.add(ack.part)
            if len(seen) < ack.parts:
                continue
            del progress.parts[ack.offset]
        _add_done(progress, ack.previous, ack.offset)
    if progress.frontier is not None:
        while progress.frontier in progress.done:
            progress.frontier = progress.done.pop(progress.frontier)
        if progress.frontier != before and progress.done:
            # Entries a run jumped over are never reached; drop them. Acknowledgements
            # arrive compacted into runs, so there are few entries to look at.
            _rebase(progress)
    return progress.frontier != before


def _add_done(progress: PartitionProgress, previous: int, offset: int) -> None:
    frontier = progress.frontier
    if frontier is not None:
        if offset <= frontier:
            return  # the frontier already passed it
        # A run that started before the frontier is done from the frontier on.
        previous = max(previous, frontier)
    known = progress.done.get(previous)
    if known is None or offset > known:
        # Two runs from one point are prefixes of one chain; the longer covers both.
        progress.done[previous] = offset


def _rebase(progress: PartitionProgress) -> None:
    """Drop or clip what lies behind the frontier."""
    frontier = progress.frontier
    if frontier is None:
        return
    behind = [(p, o) for p, o in progress.done.items() if p < frontier]
    for previous, _ in behind:
        del progress.done[previous]
    for previous, offset in behind:
        _add_done(progress, previous, offset)


def compact_acks(acks: Iterable[Ack]) -> list[Ack]:
    """Merge acknowledgements that chain into runs, one per run and partition.

    ``Ack(p, 5, 4)`` and ``Ack(p, 6, 5)`` become ``Ack(p, 6, 4)``: "everything after 4 up
    to 6 is done", which :func:`advance` applies exactly as it would the two. A stage that
    acknowledges a batch of records in partition order sends a handful of tokens instead
    of one per record. Parts of multi-record messages pass through unchanged.
    """
    out: list[Ack] = []
    chains: dict[str, dict[int, int]] = {}
    # Unpacked, and the partition's links looked up when the partition changes: this
    # runs for every record a stream delivers.
    current: str | None = None
    links: dict[int, int] = {}
    for ack in acks:
        partition, offset, previous, parts, _ = ack
        if parts > 1:
            out.append(ack)
            continue
        if partition != current:
            current = partition
            links = chains.setdefault(partition, {})
        if offset > links.get(previous, -1):
            links[previous] = offset
    for name, links in chains.items():
        targets = set(links.values())
        for head in sorted(p for p in links if p not in targets):
            end = links.pop(head)
            while end in links:
                end = links.pop(end)
            out.append(Ack(name, end, head))
    return out


class _CommitFn(_ConsumerFn):
    """Keyed by ``topic/partition``: tracks progress in state, commits at bundle end."""

    PROGRESS = ReadModifyWriteStateSpec("progress", PickleCoder())

    def start_bundle(self) -> None:
        # Kept across bundles when a commit fails, so the next bundle commits it.
        if not hasattr(self, "_moved"):
            self._moved: dict[str, int] = {}

    def process(
        self,
        element: tuple[str, Ack | PartitionStart],
        state: Any = beam.DoFn.StateParam(PROGRESS),
    ) -> Iterator[tuple[str, int]]:
        name, ack = element
        progress = state.read() or PartitionProgress()
        if advance(progress, [ack]) and progress.frontier is not None:
            self._moved[name] = progress.frontier
        state.write(progress)
        return iter(())

    def finish_bundle(self) -> None:
        if not self._moved:
            return
        from confluent_kafka import TopicPartition  # noqa: PLC0415

        offsets = []
        for name, frontier in self._moved.items():
            topic, partition = name.rsplit("/", 1)
            offsets.append(TopicPartition(topic, int(partition), frontier + 1))
        from confluent_kafka import KafkaException  # noqa: PLC0415

        try:
            # Synchronous: a bundle is not finished until its progress is durable in Kafka.
            retry_transient(
                lambda: self._consumer.commit(offsets=offsets, asynchronous=False), 15.0
            )
        except KafkaException as exc:
            # Not committing is safe (the records are re-delivered after a restart, with
            # the same ids); failing the stream over it would not be.
            _LOG.warning("offset commit failed, will retry with the next bundle: %s", exc)
            return
        _LOG.info("committed %s", ", ".join(f"{o.partition}@{o.offset}" for o in offsets))
        self._moved = {}


def _start_marker(partition: KafkaPartition) -> tuple[str, PartitionStart]:
    name = f"{partition.topic}/{partition.partition}"
    return name, PartitionStart(name, partition.start - 1)


def _key_ack(ack: Ack) -> tuple[str, Ack]:
    return ack.partition, ack


class CommitOffsets(beam.PTransform):
    """Commit each partition's offsets as far as its records are done; output nothing.

    Input: ``(acks, partitions)``: acknowledgement tokens from every terminal stage, and
    the partitions being read (their start offsets anchor each frontier). Offsets are
    committed to the consumer group at the end of each bundle that moved a frontier.
    """

    def __init__(self, config: KafkaSourceConfig) -> None:
        super().__init__()
        self._config = config

    def expand(self, pcolls: tuple[beam.PCollection, beam.PCollection]) -> beam.PCollection:
        acks, partitions = pcolls
        # One coder on both inputs of the Flatten: Prism runs a Flatten of differently
        # coded inputs as an extra stage.
        starts = partitions | "PartitionStarts" >> beam.Map(_start_marker).with_output_types(
            tuple[str, tuple]
        )
        keyed = acks | "ByPartition" >> beam.Map(_key_ack).with_output_types(tuple[str, tuple])
        return (
            (starts, keyed)
            | "AllAcks" >> beam.Flatten()
            | "Commit" >> beam.ParDo(_CommitFn(self._config)).with_input_types(tuple[str, tuple])
        )
