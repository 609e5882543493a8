"""The pipeline's own read and normalize stages, called by hand (the Beam-free prototypes)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from moesif_beam.transforms.formats.normalize import _NormalizeFn
from moesif_beam.transforms.records import Line
from moesif_beam.transforms.sources.files import _ReadFn

_MAX_LINE = 16 << 20


def normalized(ranges: list) -> Iterator[tuple[str, Any]]:
    """Each ``(transaction_id, Record)`` the pipeline's reader and WSO2 normalize make of ranges.

    One bundle per range, as the runner gives them; what is not a record (dead letters,
    signatures) is left out.
    """
    read = _ReadFn("events", _MAX_LINE)
    normalize = _NormalizeFn("events", "wso2", None, 1 << 20, "name", False, _MAX_LINE)
    normalize.setup()
    for file_range in ranges:
        normalize.start_bundle()
        for line in read.process(file_range):
            if not isinstance(line, Line):
                continue
            for value in normalize.process(line):
                if type(value) is tuple:
                    yield value
        list(normalize.finish_bundle())
