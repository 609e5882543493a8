"""The pipeline's own stages, called by hand (the Beam-free prototypes)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from benchmarks._support import APP_ID
from moesif_beam.transforms.delivery import PostToMoesif
from moesif_beam.transforms.delivery.transport import Secret
from moesif_beam.transforms.formats.normalize import _NormalizeFn
from moesif_beam.transforms.records import Line
from moesif_beam.transforms.sources.files import _ReadFn

_MAX_LINE = 16 << 20


def normalize_fn(inline_signatures: bool = False) -> _NormalizeFn:
    """The pipeline's WSO2 normalize DoFn with the events defaults, set up."""
    normalize = _NormalizeFn("events", "wso2", None, 1 << 20, "name", inline_signatures, _MAX_LINE)
    normalize.setup()
    return normalize


def lines(file_range: Any) -> Iterator[Line]:
    """The lines the pipeline's reader reads of one planned range (what is not one is left out)."""
    for line in _ReadFn("events", _MAX_LINE).process(file_range):
        if isinstance(line, Line):
            yield line


def normalized(ranges: list) -> Iterator[tuple[str, Any]]:
    """Each ``(transaction_id, Record)`` the pipeline's reader and WSO2 normalize make of ranges.

    One bundle per range, as the runner gives them; what is not a record (dead letters,
    signatures) is left out.
    """
    normalize = normalize_fn()
    for file_range in ranges:
        normalize.start_bundle()
        for line in lines(file_range):
            for value in normalize.process(line):
                if type(value) is tuple:
                    yield value
        list(normalize.finish_bundle())


class Poster:
    """The pipeline's HTTP batching sink with the events defaults, as one bundle.

    ``post`` each keyed record, then ``close``; ``dead_letters`` counts what the sink gave
    back (its main output is empty, so every output is a dead letter).
    """

    def __init__(self, url: str) -> None:
        self._sink = PostToMoesif("events", url, Secret(APP_ID), "events")._batching()
        self._sink.setup()
        self._sink.start_bundle()
        self.dead_letters = 0

    def post(self, item: tuple[str, Any]) -> None:
        self.dead_letters += len(self._sink.process(item))

    def close(self) -> None:
        self.dead_letters += len(list(self._sink.finish_bundle()))
        self._sink.teardown()
