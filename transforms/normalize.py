"""Parse and normalize input lines into Moesif records, in one pass per record.

The hot path parses each line once, maps it once and serializes the Moesif record once;
from here on the record travels as bytes (through the dedup shuffle and into the batch
body) and is never parsed again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam import pvalue

from transforms.counters import counter
from transforms.deadletter import DEAD_LETTER, dead_letter
from transforms.errors import InvalidRecord
from transforms.formats import wso2

__all__ = ["EVENT_FORMATS", "MAX_EVENT_BYTES", "NormalizeRecords", "Normalized", "parse_json"]

# Moesif's hard limit for one event or action ("1 MB"); we read it as 10^6 bytes of JSON,
# the stricter reading, so nothing we send can be refused for size.
MAX_EVENT_BYTES = 1_000_000


def _refuse_constant(name: str) -> Any:
    msg = f"{name} is not valid JSON"
    raise ValueError(msg)


def parse_json(raw: bytes) -> Any:
    """Parse JSON from bytes as strictly as Moesif will: UTF-8 only, no NaN or Infinity.

    Raises:
        ValueError: not JSON, not UTF-8 (``UnicodeDecodeError``), or a non-finite constant.
    """
    return json.loads(raw, parse_constant=_refuse_constant)


def _parse_wso2(raw: bytes) -> Any:
    return parse_json(wso2.extract_json(raw))


# format name -> (parse bytes to a JSON value, map the value to (tid, time_ms, record))
EVENT_FORMATS: dict[str, tuple[Callable[[bytes], Any], Callable[..., tuple[str, int, dict]]]] = {
    "wso2": (_parse_wso2, wso2.to_moesif_event),
}


class Normalized(NamedTuple):
    """Outputs of :class:`NormalizeRecords`."""

    records: beam.PCollection  # (transaction_id, (time_ms, record_json, raw, source))
    dead_letters: beam.PCollection  # dead-letter dicts


class _NormalizeFn(beam.DoFn):
    def __init__(
        self, fmt: str, pipeline: str, company_id_field: str | None, max_record_bytes: int
    ) -> None:
        self._fmt = fmt
        self._pipeline = pipeline
        self._company_id_field = company_id_field
        self._max_record_bytes = max_record_bytes
        self._read = counter("read")
        self._parse_errors = counter("parse_errors")
        self._invalid = counter("invalid")
        self._too_large = counter("too_large")

    def setup(self) -> None:
        self._parse, self._map = EVENT_FORMATS[self._fmt]
        self._encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)

    def process(self, element: tuple[bytes, str]) -> Iterator[Any]:
        raw, source = element
        self._read.inc()
        try:
            value = self._parse(raw)
        except UnicodeDecodeError as exc:
            self._parse_errors.inc()
            detail = f"not valid UTF-8: {exc.reason}"
            yield self._reject("parse_error", "parse", detail, raw, source)
            return
        except (ValueError, RecursionError) as exc:
            self._parse_errors.inc()
            yield self._reject("parse_error", "parse", f"not JSON: {exc}"[:300], raw, source)
            return
        try:
            transaction_id, time_ms, record = self._map(value, self._company_id_field)
            body = self._encoder.encode(record).encode("utf-8")
        except InvalidRecord as exc:
            self._invalid.inc()
            yield self._reject(
                "invalid_record",
                "normalize",
                exc.detail,
                raw,
                source,
                field=exc.field,
                expected_type=exc.expected_type,
                actual_type=exc.actual_type,
            )
            return
        except UnicodeEncodeError as exc:
            # A lone surrogate escape (\ud800) parses but cannot be sent as UTF-8.
            self._invalid.inc()
            yield self._reject("invalid_record", "normalize", f"not encodable: {exc}", raw, source)
            return
        if len(body) > self._max_record_bytes:
            self._too_large.inc()
            detail = f"record is {len(body)} bytes; Moesif accepts at most {self._max_record_bytes}"
            yield self._reject(
                "too_large", "normalize", detail, raw, source, transaction_id=transaction_id
            )
            return
        yield transaction_id, (time_ms, body, raw, source)

    def _reject(
        self, reason: str, stage: str, detail: str, raw: bytes, source: str, **extra: Any
    ) -> pvalue.TaggedOutput:
        return pvalue.TaggedOutput(
            DEAD_LETTER, dead_letter(reason, stage, detail, raw, source, self._pipeline, **extra)
        )


class NormalizeRecords(beam.PTransform):
    """Turn ``(raw_bytes, source)`` lines into keyed, serialized Moesif records.

    Every input is counted in ``read`` and leaves either as a record keyed by its
    transaction id, or as a dead letter: ``parse_error`` (not JSON, bad UTF-8),
    ``invalid_record`` (missing or mistyped fields) or ``too_large`` (over Moesif's
    per-record limit). Nothing is dropped silently.
    """

    def __init__(
        self,
        fmt: str,
        pipeline: str,
        company_id_field: str | None = None,
        max_record_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        super().__init__()
        if fmt not in EVENT_FORMATS:
            msg = f"unknown format {fmt!r}; known: {', '.join(sorted(EVENT_FORMATS))}"
            raise ValueError(msg)
        if not 0 < max_record_bytes <= MAX_EVENT_BYTES:
            msg = f"max_record_bytes must be in 1..{MAX_EVENT_BYTES}, got {max_record_bytes}"
            raise ValueError(msg)
        self._fn = _NormalizeFn(fmt, pipeline, company_id_field, max_record_bytes)

    def expand(self, lines: beam.PCollection) -> Normalized:
        outputs = lines | "Parse" >> beam.ParDo(self._fn).with_outputs(DEAD_LETTER, main="records")
        return Normalized(outputs.records, outputs[DEAD_LETTER])
