"""Delivery in a stream: the same batching and sinks as bounded runs, with acknowledgements.

Every delivered record's acknowledgement token is output once the collector has taken it,
so the commit stage can advance Kafka offsets only past delivered records.
"""

from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam

from moesif_beam.transforms.common.errors import require_positive
from moesif_beam.transforms.deadletters.letters import DEAD_LETTER
from moesif_beam.transforms.delivery.sinks import ACKS, PostToMoesif, WriteBatchFiles

__all__ = ["BatchAndDeliverInStream", "Delivered"]


class Delivered(NamedTuple):
    """Outputs of :class:`BatchAndDeliverInStream`."""

    dead_letters: beam.PCollection
    acks: beam.PCollection  # tokens of the records the collector accepted


class BatchAndDeliverInStream(beam.PTransform):
    """Batch a stream by count, bytes and delay, and deliver each batch with ``sink``'s writer.

    ``sink`` is a configured :class:`PostToMoesif` or :class:`WriteBatchFiles`; its
    guarantees per batch (retries, split, bisect, dead letters) hold unchanged. A batch is
    delivered when full, when its oldest record has waited ``max_delay`` seconds, and at
    every bundle end; nothing waits on a timer (a stream's bundles last about a second).
    Delivered records are acknowledged. With ``journal`` (a directory and a TTL in ms),
    each bundle's delivered ids are written to that journal (``delivery.journal``) before
    its acknowledgements leave it.
    """

    def __init__(
        self,
        sink: PostToMoesif | WriteBatchFiles,
        max_delay: float,
        journal: tuple[str, int] | None = None,
    ) -> None:
        super().__init__()
        require_positive("batch_max_delay", max_delay)
        if journal is not None:
            if not journal[0]:
                msg = "the delivered-ids journal directory must not be empty"
                raise ValueError(msg)
            if journal[1] < 1:
                msg = f"the journal's TTL must be at least 1 ms, got {journal[1]}"
                raise ValueError(msg)
        self._sink = sink
        self._max_delay = max_delay
        self._journal = journal

    def stage(self) -> beam.DoFn:
        """This step as a stage of a chain: records in, dead letters and acks out (tagged)."""
        return self._sink.stream_stage(self._max_delay, self._journal)

    def expand(self, records: beam.PCollection) -> Delivered:
        out = records | "Batch" >> self._sink.in_stream(self._max_delay, self._journal)
        return Delivered(out[DEAD_LETTER], out[ACKS])
