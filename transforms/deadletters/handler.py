"""One collector of dead letters per pipeline, and a build-time check that none is forgotten.

Every fallible stage emits its rejects on an output tagged :data:`DEAD_LETTER` (the
convention Beam's ``with_exception_handling`` and error handlers follow). A pipeline hands
each such stream to one :class:`DeadLetters` collector, which writes them all through one
sink. :func:`verify_dead_letters` then walks the built graph: a reject stream that no
transform consumes fails the build, in bounded and streaming shapes alike, before a
single record is read.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
from apache_beam.pipeline import AppliedPTransform, PipelineVisitor

from moesif_beam.transforms.deadletters.letters import DEAD_LETTER

__all__ = ["DeadLetters", "UnconsumedDeadLetters", "verify_dead_letters"]


class UnconsumedDeadLetters(ValueError):
    """A stage's reject stream reaches no dead-letter sink: its records would be lost."""


class DeadLetters:
    """Gathers the reject streams of a pipeline's stages for one dead-letter sink.

    ``add`` takes one stream and returns it; ``write`` flattens everything added through
    the given sink once, and refuses any ``add`` afterwards, so a stage wired after the sink
    cannot slip past it.
    """

    def __init__(self) -> None:
        self._streams: list[beam.PCollection] = []
        self._written = False

    def add(self, *streams: beam.PCollection) -> None:
        """Register reject streams; each must be written by :meth:`write`."""
        if self._written:
            msg = "dead letters were already written; register every stage before write()"
            raise RuntimeError(msg)
        self._streams.extend(streams)

    def write(self, label: str, sink: beam.PTransform) -> Any:
        """Apply ``sink`` to every registered stream (as one tuple); return its output."""
        if self._written:
            msg = "dead letters can be written once"
            raise RuntimeError(msg)
        if not self._streams:
            msg = "no reject stream was registered"
            raise RuntimeError(msg)
        self._written = True
        return tuple(self._streams) | label >> sink


class _Consumers(PipelineVisitor):
    def __init__(self) -> None:
        self.rejects: dict[int, str] = {}  # id of a reject stream -> its stage
        self.consumed: set[int] = set()

    def visit_transform(self, node: AppliedPTransform) -> None:
        for pcoll in node.inputs:
            self.consumed.add(id(pcoll))
        for pcoll in node.side_inputs:
            self.consumed.add(id(pcoll.pvalue))
        for tag, pcoll in node.outputs.items():
            if tag == DEAD_LETTER:
                self.rejects[id(pcoll)] = node.full_label


def verify_dead_letters(pipeline: beam.Pipeline) -> None:
    """Fail if any stage's :data:`DEAD_LETTER` output is consumed by no transform.

    Raises:
        UnconsumedDeadLetters: naming every stage whose rejects would be dropped.
    """
    visitor = _Consumers()
    pipeline.visit(visitor)
    lost = sorted(label for key, label in visitor.rejects.items() if key not in visitor.consumed)
    if lost:
        msg = f"reject streams reach no dead-letter sink: {', '.join(lost)}"
        raise UnconsumedDeadLetters(msg)
