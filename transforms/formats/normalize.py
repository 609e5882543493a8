"""Parse and normalize input lines into Moesif records, in one pass per record.

The hot path parses each line once, maps each record once and serializes it once; from
here on the record travels as bytes (through the dedup shuffle and into the batch body)
and is never parsed again. Its metadata is reduced to a type signature on the way, for
:mod:`moesif_beam.transforms.schema.rule`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import apache_beam as beam
import orjson
from apache_beam import pvalue
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from moesif_beam.transforms.common.counters import counter
from moesif_beam.transforms.common.errors import InvalidRecord, require_positive
from moesif_beam.transforms.common.pooled import Wire, in_processes
from moesif_beam.transforms.deadletters.letters import ACK_FIELD, DEAD_LETTER, dead_letter
from moesif_beam.transforms.formats import moesif_actions, segment, segment_identify, wso2
from moesif_beam.transforms.formats.auto import EVENT_MAPPINGS, EVENT_SPLITS
from moesif_beam.transforms.formats.auto import split as split_any
from moesif_beam.transforms.formats.auto import to_moesif_event as any_event
from moesif_beam.transforms.formats.aws import decode_line
from moesif_beam.transforms.formats.gateway import MappingOptions, NoRecords
from moesif_beam.transforms.records import Ack, FirstSeen, Line, new_line, new_record
from moesif_beam.transforms.schema.rule import NO_TIME, SCOPES, SignatureMemo
from moesif_beam.transforms.sources.files import MAX_LINE_BYTES

__all__ = [
    "FORMATS",
    "MAX_EVENT_BYTES",
    "MAX_LINE_BYTES",
    "SIGNATURES",
    "Format",
    "NormalizeRecords",
    "Normalized",
    "parse_json",
]

# Moesif's hard limit for one event or action ("1 MB"); we read it as 10^6 bytes of JSON,
# the stricter reading, so nothing we send can be refused for size.
MAX_EVENT_BYTES = 1_000_000

# Tag of the output that carries one (signature id, first seen, signature) per distinct
# metadata signature per bundle.
SIGNATURES = "signatures"

# Bound on the per-worker memo of signature ids; a stream of ever-new key sets must not
# grow memory without limit.
_SIGNATURE_MEMO_SIZE = 50_000


def _refuse_constant(name: str) -> Any:
    msg = f"{name} is not valid JSON"
    raise ValueError(msg)


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        msg = f"number {text[:40]} overflows a double"
        raise ValueError(msg)
    return value


# The standard library's strict decoder, used only to explain a line orjson refused (its
# messages name what a reader expects) and to read what orjson refuses but JSON allows.
_EXPLAIN = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)

_UTF8_BOM = b"\xef\xbb\xbf"


def parse_json(raw: bytes) -> Any:
    """Parse JSON from bytes as strictly as Moesif will: UTF-8 only, finite numbers only.

    orjson reads every line (a few µs for a 1.2 KB event). A leading UTF-8 byte-order mark
    is skipped. Refused: other encodings (UTF-16, UTF-32), encoded surrogates, ``NaN``,
    ``Infinity`` and numbers that overflow to infinity (``1e400``), and nesting deeper
    than 1,024 levels. Integers beyond 64 bits are read as doubles, as JavaScript reads
    them. An escaped lone surrogate (an escape of U+D800 to U+DFFF) is valid JSON and is
    returned; it cannot be sent as UTF-8, which the mapping stage reports.

    Raises:
        ValueError: not JSON, not UTF-8 (``UnicodeDecodeError``), a non-finite number, or
            nested too deeply.
    """
    if raw[:3] == _UTF8_BOM:
        raw = raw[3:]
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        refused = exc
    # The rare path: say why in the standard library's words, or accept what only orjson
    # refuses (escaped lone surrogates).
    try:
        value = _EXPLAIN.decode(raw.decode("utf-8"))
    except RecursionError as exc:
        msg = "nested too deeply"
        raise ValueError(msg) from exc
    if "surrogate" in str(refused):
        return value
    raise ValueError(str(refused)) from refused


def _parse_wso2(raw: bytes) -> Any:
    return parse_json(wso2.extract_json(raw))


def _parse_aws(raw: bytes) -> Any:
    try:
        return parse_json(raw)
    except ValueError as exc:
        refused = exc
    # Not one JSON value: a wrapper's base64 (CloudWatch Logs, gzip inside) or JSON values
    # written back to back (Firehose to S3).
    try:
        decoded = decode_line(raw)
    except ValueError as exc:
        msg = f"{refused}; nor base64 of JSON or gzip ({exc})"
        raise ValueError(msg) from exc
    if decoded is None:
        raise refused
    return decoded


def _parse_auto(raw: bytes) -> Any:
    try:
        return _parse_aws(raw)
    except ValueError:
        extracted = wso2.extract_json(raw)
        if extracted is raw:
            raise
        return parse_json(extracted)  # a WSO2 gateway log line with a prefix


def _one(value: Any) -> list[tuple[Any, str]]:
    return [(value, "")]


def _unforeseen(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def _encode_problem(exc: BaseException) -> str:
    text = str(exc)
    if "surrogate" in text or isinstance(exc, UnicodeEncodeError):
        return f"a string holds a lone UTF-16 surrogate ({text[:120]})"
    if isinstance(exc, RecursionError) or "Recursion" in text:
        return "the record nests more than 254 levels deep"
    return text[:200]


@dataclass(frozen=True)
class Format:
    """An input format: how to parse a line, split it into records, and map a record.

    Attributes:
        parse: bytes of one line to a JSON value; raises ValueError when it is not JSON.
        split: a parsed line to its records, each with a field-path prefix for errors.
        to_moesif: one record and either the ``company_id_field`` or, with
            ``takes_options``, the :class:`MappingOptions` to ``(transaction_id, time_ms or
            None, moesif_record)``; raises :class:`InvalidRecord`.
        takes_options: ``to_moesif`` takes every identity and masking option.
    """

    parse: Callable[[bytes], Any]
    split: Callable[[Any], list[tuple[Any, str]]]
    to_moesif: Callable[[Any, Any], tuple[str, int | None, dict]]
    takes_options: bool = False


def _gateway(name: str) -> Format:
    parse = _parse_aws if name == "aws" else parse_json
    return Format(parse, EVENT_SPLITS.get(name, _one), EVENT_MAPPINGS[name], takes_options=True)


# pipeline -> format name -> Format
FORMATS: dict[str, dict[str, Format]] = {
    "events": {
        "wso2": Format(_parse_wso2, _one, EVENT_MAPPINGS["wso2"], takes_options=True),
        **{name: _gateway(name) for name in EVENT_MAPPINGS if name != "wso2"},
        "auto": Format(_parse_auto, split_any, any_event, takes_options=True),
    },
    "actions": {
        "moesif": Format(parse_json, moesif_actions.split, moesif_actions.to_moesif_action),
        "segment": Format(parse_json, segment.split, segment.to_moesif_action),
    },
}
# profiles reads what events and actions read (every gateway format, Moesif actions), and
# Segment identify/group calls, which become user and company upserts. Keep this after
# every addition to FORMATS["events"]: it copies that table.
FORMATS["profiles"] = {
    **FORMATS["events"],
    "moesif": FORMATS["actions"]["moesif"],
    "segment": Format(parse_json, segment.split, segment_identify.to_profile_upserts),
}


class Normalized(NamedTuple):
    """Outputs of :class:`NormalizeRecords`."""

    # (transaction_id, Record)
    records: beam.PCollection
    dead_letters: beam.PCollection  # dead-letter dicts
    signatures: beam.PCollection  # (sig_id, FirstSeen)


class _NormalizeFn(beam.DoFn):
    def __init__(
        self,
        pipeline: str,
        fmt: str,
        options: MappingOptions | str | None,
        max_record_bytes: int,
        scope: str,
        inline_signatures: bool = False,
        max_line_bytes: int = 0,
    ) -> None:
        self._pipeline = pipeline
        self._max_line_bytes = max_line_bytes or MAX_LINE_BYTES
        self._inline = inline_signatures
        self._fmt = fmt
        # A company_id_field (or None) alone is still accepted, as before options existed.
        if not isinstance(options, MappingOptions):
            options = MappingOptions(company_id_field=options)
        self._options = options
        self._max_record_bytes = max_record_bytes
        self._scope = scope
        self._read = counter("read")
        self._parse_errors = counter("parse_errors")
        self._invalid = counter("invalid")
        self._too_large = counter("too_large")
        self._internal = counter("internal_errors")
        self._skipped = counter("skipped")

    def setup(self) -> None:
        self._format = FORMATS[self._pipeline][self._fmt]
        # Looked up once here rather than per record: the hot path is a few microseconds.
        self._parse = self._format.parse
        self._split = None if self._format.split is _one else self._format.split
        self._to_moesif = self._format.to_moesif
        options = self._options
        self._setting = options if self._format.takes_options else options.company_id_field
        self._signature = SignatureMemo(self._scope, _SIGNATURE_MEMO_SIZE)

    def start_bundle(self) -> None:
        # signature id -> (earliest (time, transaction_id) seen in this bundle, signature)
        self._seen: dict[bytes, FirstSeen] = {}
        # Counted per bundle, not per record: a counter update per record costs more than
        # the rest of the bookkeeping together.
        self._records_read = 0

    # A list, not a generator: one generator per line was measurable on the hot path.
    def process(self, line: Line) -> list[Any]:
        raw, source, ack, at = line
        if len(raw) > self._max_line_bytes:
            # Files are cut at the reader (transforms/sources.py); this catches a Kafka
            # message or any other source's oversized value.
            self._read.inc()
            self._too_large.inc()
            detail = f"line is {len(raw):,} bytes; --max_line_bytes is {self._max_line_bytes:,}"
            return [self._reject("too_large", "parse", detail, raw, source, ack=ack)]
        try:
            value = self._parse(raw)
            # One record per line: no list to build and unpack.
            items = None if self._split is None else self._split(value)
        except NoRecords as exc:
            # Nothing to deliver and nothing wrong (a CloudWatch Logs control message):
            # skipped like a blank line. A Kafka message must still be acknowledged, and
            # a dead letter is how a message without records is.
            if ack is None:
                self._skipped.inc()
                return []
            self._read.inc()
            self._invalid.inc()
            detail = f"{exc}: nothing to deliver"
            return [self._reject("invalid_record", "parse", detail, raw, source, ack=ack)]
        except UnicodeDecodeError as exc:
            self._read.inc()
            self._parse_errors.inc()
            detail = f"not valid UTF-8: {exc.reason}"
            return [self._reject("parse_error", "parse", detail, raw, source, ack=ack)]
        except (ValueError, RecursionError) as exc:
            self._read.inc()
            self._parse_errors.inc()
            detail = f"not JSON: {exc}"[:300]
            return [self._reject("parse_error", "parse", detail, raw, source, ack=ack)]
        except Exception as exc:
            self._read.inc()
            self._internal.inc()
            return [self._reject("internal_error", "parse", _unforeseen(exc), raw, source, ack=ack)]
        if items is None:
            return [self._record(value, "", raw, source, ack, at)]
        if not items:
            # "[]": a line with no records. It is still something we read, and (in Kafka)
            # a message whose offset must be acknowledged, so it is accounted for here.
            self._read.inc()
            self._invalid.inc()
            return [self._reject("invalid_record", "normalize", "no records", raw, source, ack=ack)]
        if len(items) == 1:
            return [self._record(items[0][0], items[0][1], raw, source, ack, at)]
        # One line, several records (a JSON array of actions). Each record carries its
        # own bytes onward, not the whole line: the dedup spill and the dead letters then
        # cost the line's size once, not once per element (N² for an N-element line).
        outputs = []
        for index, (item, prefix) in enumerate(items):
            # One Kafka message, several records: the message is done when all of them
            # are. The commit stage counts parts (see transforms/offsets.py).
            part_ack = None if ack is None else ack._replace(parts=len(items), part=index)
            try:
                own = orjson.dumps(item)
            except (orjson.JSONEncodeError, RecursionError):
                own = raw  # the element cannot be written alone; its letter keeps the line
            outputs.append(self._record(item, prefix, own, f"{source}{prefix}", part_ack))
        return outputs

    def _record(
        self, item: Any, prefix: str, raw: bytes, source: str, ack: Ack | None, at: int = -1
    ) -> Any:
        """One record's output: ``(transaction_id, value)`` or a dead letter.

        Nothing raised while mapping, encoding or signing one record escapes: what nobody
        foresaw becomes an ``internal_error`` dead letter, and the bundle goes on.
        """
        self._records_read += 1
        try:
            return self._map(item, prefix, raw, source, ack, at)
        except Exception as exc:
            self._internal.inc()
            return self._reject(
                "internal_error", "normalize", _unforeseen(exc), raw, source, ack=ack
            )

    def _map(
        self, item: Any, prefix: str, raw: bytes, source: str, ack: Ack | None, at: int
    ) -> Any:
        try:
            transaction_id, time_ms, record = self._to_moesif(item, self._setting)
            body = orjson.dumps(record)
        except InvalidRecord as exc:
            self._invalid.inc()
            field = ".".join(part for part in (prefix, exc.field) if part)
            return self._reject(
                "invalid_record",
                "normalize",
                exc.detail,
                raw,
                source,
                field=field,
                expected_type=exc.expected_type,
                actual_type=exc.actual_type,
                ack=ack,
            )
        except (orjson.JSONEncodeError, UnicodeEncodeError, RecursionError) as exc:
            # A lone surrogate escape (\ud800) parses but cannot be sent as UTF-8; an
            # integer beyond 64 bits or nesting beyond 254 levels cannot be written.
            self._invalid.inc()
            detail = f"not encodable: {_encode_problem(exc)}"
            return self._reject("invalid_record", "normalize", detail, raw, source, ack=ack)
        if len(body) > self._max_record_bytes:
            self._too_large.inc()
            detail = f"record is {len(body)} bytes; Moesif accepts at most {self._max_record_bytes}"
            return self._reject(
                "too_large",
                "normalize",
                detail,
                raw,
                source,
                transaction_id=transaction_id,
                ack=ack,
            )
        when = NO_TIME if time_ms is None else time_ms
        sig, sig_id = self._signature(record.get("metadata"))
        if not sig:
            return transaction_id, new_record((when, body, raw, source, b"", (), ack, at))
        if self._inline:
            return transaction_id, new_record((when, body, raw, source, sig_id, sig, ack, at))
        first = self._seen.get(sig_id)
        if first is None or (when, transaction_id) < (first.time_ms, first.transaction_id):
            self._seen[sig_id] = FirstSeen(when, transaction_id, sig)
        return transaction_id, new_record((when, body, raw, source, sig_id, (), ack, at))

    def finish_bundle(self) -> Iterator[Any]:
        if self._records_read:
            self._read.inc(self._records_read)
            self._records_read = 0
        window = GlobalWindow()
        for sig_id, first in self._seen.items():
            yield pvalue.TaggedOutput(
                SIGNATURES, WindowedValue((sig_id, first), window.max_timestamp(), (window,))
            )
        self._seen = {}

    def _reject(
        self,
        reason: str,
        stage: str,
        detail: str,
        raw: bytes,
        source: str,
        ack: Any = None,
        **extra: Any,
    ) -> pvalue.TaggedOutput:
        letter = dead_letter(reason, stage, detail, raw, source, self._pipeline, **extra)
        if ack is not None:
            letter[ACK_FIELD] = ack
        return pvalue.TaggedOutput(DEAD_LETTER, letter)


# In a pooled worker, the ack a line had: its outputs carry this mark instead (or a copy
# with their parts), and the stage puts the line's own ack back (see _NormalizeWire).
_ACK_MARK = Ack("", -1, -1)


class _NormalizeWire(Wire):
    """Lines go to a worker as plain tuples without their acks, and records come back so.

    The worker needs only to know whether a line has an ack (a Kafka message with nothing
    in it is then a dead letter, not a skip); the line's own ack goes back on its outputs
    here, with each output's parts. Measured, this hand-off costs a fifth of the pickling
    of the NamedTuples themselves.
    """

    @staticmethod
    def to_worker(lines: list[Any]) -> Any:
        return [(raw, source, ack is not None) for raw, source, ack, _ in lines]

    @staticmethod
    def in_worker(payload: Any) -> list[Any]:
        return [
            new_line((raw, source, _ACK_MARK if acked else None, -1))
            for raw, source, acked in payload
        ]

    @staticmethod
    def outputs(outputs: list[list[Any]], lines: list[Any]) -> Any:
        # One signature object per signature id, so pickle writes each once per chunk; a
        # line's own bytes and source, which the stage still has, are not sent back.
        signatures: dict[bytes, tuple] = {}
        for line_outputs, line in zip(outputs, lines, strict=True):
            for index, output in enumerate(line_outputs):
                if type(output) is pvalue.TaggedOutput:
                    value = output.value
                    if type(value) is dict and ACK_FIELD in value:
                        ack = value[ACK_FIELD]
                        value[ACK_FIELD] = (ack.parts, ack.part)
                    continue
                transaction_id, record = output
                time_ms, body, raw, source, sig_id, signature, ack, _ = record
                if signature:
                    signature = signatures.setdefault(sig_id, signature)
                line_outputs[index] = (
                    transaction_id,
                    (
                        time_ms,
                        body,
                        None if raw is line[0] else raw,
                        None if source is line[1] else source,
                        sig_id,
                        signature,
                        None if ack is None else (ack.parts, ack.part),
                    ),
                )
        return outputs

    @staticmethod
    def restore(payload: Any, lines: list[Any]) -> list[list[Any]]:
        for line_outputs, line in zip(payload, lines, strict=True):
            line_raw, line_source, own, line_at = line
            for index, output in enumerate(line_outputs):
                if type(output) is pvalue.TaggedOutput:
                    value = output.value
                    if type(value) is dict and ACK_FIELD in value:
                        value[ACK_FIELD] = _with_parts(own, value[ACK_FIELD])
                    continue
                transaction_id, (time_ms, body, raw, source, sig_id, signature, parts) = output
                line_outputs[index] = (
                    transaction_id,
                    new_record(
                        (
                            time_ms,
                            body,
                            line_raw if raw is None else raw,
                            line_source if source is None else source,
                            sig_id,
                            signature,
                            None if parts is None else _with_parts(own, parts),
                            line_at if raw is None else -1,
                        )
                    ),
                )
        return payload


def _with_parts(ack: Ack, parts: tuple[int, int]) -> Ack:
    return ack if parts == (1, 0) else ack._replace(parts=parts[0], part=parts[1])


class NormalizeRecords(beam.PTransform):
    """Turn ``(raw_bytes, source, ...)`` lines into keyed, serialized Moesif records.

    Every record is counted in ``read`` (a line holding an array counts each element; a
    line that is not JSON counts once) and leaves either as a record keyed by its
    transaction id, or as a dead letter: ``parse_error`` (not JSON, bad UTF-8, a number
    that overflows, nesting over 1,024 levels), ``invalid_record`` (missing or mistyped
    fields, times outside years 1-9999, metadata nested over 128 levels, what cannot be
    written as JSON), ``too_large`` (over Moesif's per-record limit, or a line over
    ``max_line_bytes``) or ``internal_error`` (an exception nobody foresaw, with its type).
    Nothing raised for one record escapes this stage, and nothing is dropped silently.
    A record from a line holding an array carries that element's own bytes (as orjson
    writes them), not the whole line. A third output carries the metadata
    signatures :class:`~moesif_beam.transforms.schema.rule.EnforceMetadataSchema` decides on; with
    ``inline_signatures`` each record carries its signature itself (``Record.signature``)
    instead, for a check in the same stage (see :class:`~moesif_beam.transforms.dedup.streaming.
    DedupAndCheckInProcess`). ``mapping`` carries the identity and header-masking options
    of the events formats (``company_id_field`` alone is enough for the others). A line
    holding nothing to deliver (a CloudWatch Logs control message) is skipped, counted in
    ``skipped`` and not in ``read``; from Kafka it is an ``invalid_record`` dead letter,
    so its offset is committed.
    """

    def __init__(
        self,
        pipeline: str,
        fmt: str,
        company_id_field: str | None = None,
        max_record_bytes: int = MAX_EVENT_BYTES,
        schema_scope: str = "name",
        *,
        inline_signatures: bool = False,
        max_line_bytes: int = MAX_LINE_BYTES,
        mapping: MappingOptions | None = None,
        processes: int = 0,
    ) -> None:
        super().__init__()
        require_positive("max_line_bytes", max_line_bytes)
        if processes < 0:
            msg = f"processes must be 0 or more, got {processes}"
            raise ValueError(msg)
        self._processes = processes
        if mapping is not None and company_id_field is not None:
            msg = "give company_id_field inside mapping, not beside it"
            raise ValueError(msg)
        options = mapping or MappingOptions(company_id_field=company_id_field)
        if pipeline not in FORMATS:
            msg = f"pipeline must be one of {sorted(FORMATS)}, got {pipeline!r}"
            raise ValueError(msg)
        if fmt not in FORMATS[pipeline]:
            known = ", ".join(sorted(FORMATS[pipeline]))
            msg = f"unknown {pipeline} format {fmt!r}; known: {known}"
            raise ValueError(msg)
        if not 0 < max_record_bytes <= MAX_EVENT_BYTES:
            msg = f"max_record_bytes must be in 1..{MAX_EVENT_BYTES}, got {max_record_bytes}"
            raise ValueError(msg)
        if schema_scope not in SCOPES:
            msg = f"schema_scope must be one of {SCOPES}, got {schema_scope!r}"
            raise ValueError(msg)
        self._fn = _NormalizeFn(
            pipeline,
            fmt,
            options,
            max_record_bytes,
            schema_scope,
            inline_signatures,
            max_line_bytes,
        )

    # How lines and records cross to a parsing worker (transforms/common/pooled.py).

    def stage(self) -> beam.DoFn:
        """This step as a stage of a :class:`~moesif_beam.transforms.common.fused.Fused` chain.

        Keyed records as the main output, dead letters and signatures under their tags.
        """
        return self._fn

    def expand(self, lines: beam.PCollection) -> Normalized:
        fn: beam.DoFn = self._fn
        if self._processes:
            fn = in_processes(fn, self._processes, wire=_NormalizeWire)
        outputs = lines | "Parse" >> beam.ParDo(fn).with_outputs(
            DEAD_LETTER, SIGNATURES, main="records"
        )
        return Normalized(outputs.records, outputs[DEAD_LETTER], outputs[SIGNATURES])
