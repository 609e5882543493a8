"""Moesif's metadata type rule, enforced in the pipeline: the first JSON type seen for a key wins.

Moesif keeps one metadata schema per organization. Once a key has been seen with a JSON type
(string, number, boolean, object, array), a record that sends another type for that key, at
any depth, is not accepted; null matches any type. Moesif reports nothing when that happens.
moesif-beam catches it before sending: the record becomes a ``type_conflict`` dead letter
naming the key and both types.

How the bounded pipeline decides, deterministically and in parallel:

1. While normalizing, each record's metadata is reduced to a *signature*: the sorted set of
   ``(key, type)`` pairs it carries (by key name at any depth, or by full path with
   ``--schema_scope path``). Records travel with a short signature id, not the signature.
2. Each distinct signature is kept once, with the earliest ``(event time, transaction_id)``
   of the records that carry it.
3. Per key, the winning type is the one of the earliest ``(event time, transaction_id)``
   carrying the key, unless the persisted schema already knows the key: then it wins.
   This is a combine per key, so many keys spread over many workers.
4. Each distinct signature gets a verdict against the winners; records whose signature
   conflicts become dead letters.

The answer depends only on the input and the persisted schema, not on input order, bundle
boundaries, the number of workers or the runner. A key's type is fixed by the earliest
record carrying it even if that record is rejected for another key: the rule stays a
per-key decision, so it can be computed in parallel.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
import zlib
from collections import ChainMap
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.coders import PickleCoder, StrUtf8Coder
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from moesif_beam.transforms.counters import counter
from moesif_beam.transforms.deadletter import ACK_FIELD, DEAD_LETTER, dead_letter
from moesif_beam.transforms.errors import json_type
from moesif_beam.transforms.metadata import sanitize_keys
from moesif_beam.transforms.worker_memory import worker_memory

__all__ = [
    "NO_TIME",
    "SCOPES",
    "EnforceMetadataSchema",
    "EnforceMetadataSchemaInStream",
    "SchemaChecked",
    "SignatureMemo",
    "find_conflict",
    "load_schema",
    "merge_schema",
    "save_schema",
    "seed_pairs",
    "signature",
    "signature_id",
    "type_name",
    "types_of",
]

SCOPES = ("name", "path")
# Sorts after every real time: records without an event time are "seen" last.
NO_TIME = 2**62
_STORE_VERSION = 1

Signature = tuple[tuple[str, str], ...]


def type_name(value: Any) -> str | None:
    """The JSON type Moesif tracks for a value, or None for null (which matches any type)."""
    return None if value is None else json_type(value)


def types_of(metadata: Mapping[str, Any], scope: str = "name") -> Iterator[tuple[str, str]]:
    """Yield ``(key, type)`` for every non-null value in ``metadata``, at every depth.

    With scope ``name`` the key is the bare key name; with ``path`` it is the dotted path
    from the metadata root, ``[]`` marking array elements (``tags[].label``). Keys are
    expected to be sanitized already (no dots).
    """
    stack: list[tuple[str, Any]] = [("", metadata)]
    by_path = scope == "path"
    while stack:
        prefix, obj = stack.pop()
        if isinstance(obj, dict):
            for key, value in obj.items():
                if value is None:
                    continue
                kind = json_type(value)
                name = f"{prefix}{key}" if by_path else key
                yield name, kind
                if kind == "object":
                    stack.append((f"{name}." if by_path else "", value))
                elif kind == "array":
                    stack.append((f"{name}[]." if by_path else "", value))
        elif isinstance(obj, list):
            for item in obj:
                if isinstance(item, dict | list):
                    stack.append((prefix, item))


def signature(metadata: Any, scope: str = "name") -> Signature:
    """The sorted, distinct ``(key, type)`` pairs of a metadata object (empty if not one)."""
    if not isinstance(metadata, dict) or not metadata:
        return ()
    return tuple(sorted(set(types_of(metadata, scope))))


# Bound on the decisions a worker remembers per stage (each a few dozen bytes).
_VERDICT_MEMO_SIZE = 100_000


def _remember(memo: dict[Any, Any], key: Any, value: Any, size: int = _VERDICT_MEMO_SIZE) -> Any:
    """Store ``value`` in a memo that starts over once it holds ``size`` entries."""
    if len(memo) >= size:
        memo.clear()
    memo[key] = value
    return value


class SignatureMemo:
    """:func:`signature` and :func:`signature_id` of metadata, remembered by shape.

    Records of one source mostly share a metadata shape: the same keys, in the same order,
    with values of the same types. For metadata without nested objects or arrays that
    shape decides the signature, so it is computed once per shape instead of once per
    record. At most ``size`` shapes are kept; the memo starts over when full, so an
    endless variety of shapes costs time, never unbounded memory.
    """

    def __init__(self, scope: str, size: int = 50_000) -> None:
        if scope not in SCOPES:
            msg = f"scope must be one of {SCOPES}, got {scope!r}"
            raise ValueError(msg)
        self._scope = scope
        self._size = size
        self._by_shape: dict[tuple, tuple[Signature, bytes]] = {}
        self._by_signature: dict[Signature, bytes] = {}

    def __call__(self, metadata: Any) -> tuple[Signature, bytes]:
        """``(signature, signature_id)``; ``((), b"")`` for empty or missing metadata."""
        if type(metadata) is not dict or not metadata:
            return (), b""
        types = tuple(map(type, metadata.values()))
        nested = dict in types or list in types
        if nested:
            return self._of_signature(signature(metadata, self._scope))
        shape = (tuple(metadata), types)
        known = self._by_shape.get(shape)
        if known is None:
            of_shape = self._of_signature(signature(metadata, self._scope))
            known = _remember(self._by_shape, shape, of_shape, self._size)
        return known

    def _of_signature(self, sig: Signature) -> tuple[Signature, bytes]:
        if not sig:
            return (), b""
        sig_id = self._by_signature.get(sig)
        if sig_id is None:
            sig_id = _remember(self._by_signature, sig, signature_id(sig), self._size)
        return sig, sig_id


def signature_id(sig: Signature) -> bytes:
    """A short, stable id for a signature (16 bytes of BLAKE2b)."""
    text = "\x1e".join(f"{key}\x1f{kind}" for key, kind in sig)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def find_conflict(sig: Signature, schema: Mapping[str, str]) -> tuple[str, str, str] | None:
    """The first ``(key, expected_type, actual_type)`` of ``sig`` that ``schema`` refuses."""
    for key, kind in sig:
        expected = schema.get(key)
        if expected is not None and expected != kind:
            return key, expected, kind
    return None


def merge_schema(current: Mapping[str, str], new: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Add new keys to a schema; a key already present keeps its type (first wins)."""
    merged = dict(current)
    for key, kind in new:
        merged.setdefault(key, kind)
    return merged


def load_schema(path: str, scope: str) -> dict[str, str]:
    """Read a persisted schema; a missing file is an empty schema.

    Raises:
        ValueError: the file is not a schema document, or tracks keys in another scope.
    """
    if not FileSystems.exists(path):
        return {}
    with FileSystems.open(path) as handle:
        raw = handle.read()
    try:
        document = json.loads(raw)
    except ValueError as exc:
        msg = f"--schema_store {path} is not JSON: {exc}"
        raise ValueError(msg) from exc
    if not isinstance(document, dict) or not isinstance(document.get("fields"), dict):
        msg = f"--schema_store {path} is not a moesif-beam schema document (no 'fields')"
        raise ValueError(msg)
    stored_scope = document.get("scope", "name")
    if stored_scope != scope:
        msg = (
            f"--schema_store {path} tracks keys by {stored_scope}; this run uses "
            f"--schema_scope {scope}. Use the same scope, or another store."
        )
        raise ValueError(msg)
    fields = document["fields"]
    bad = {k: v for k, v in fields.items() if v not in _TYPES}
    if bad:
        msg = f"--schema_store {path} has unknown types: {dict(list(bad.items())[:3])}"
        raise ValueError(msg)
    return dict(fields)


_TYPES = frozenset({"string", "number", "boolean", "object", "array"})


def save_schema(path: str, scope: str, new: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Merge new keys into the persisted schema (first wins) and write it back.

    The store is re-read just before writing, so keys another run added meanwhile are kept
    and win. Local files are replaced atomically.

    Returns:
        The schema as written.
    """
    merged = merge_schema(load_schema(path, scope), new)
    document = {
        "version": _STORE_VERSION,
        "scope": scope,
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fields": dict(sorted(merged.items())),
    }
    data = json.dumps(document, indent=2).encode("utf-8") + b"\n"
    temporary = f"{path}.tmp-{time.time_ns()}"
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent and "://" not in path and not FileSystems.exists(parent):
        FileSystems.mkdirs(parent)
    with FileSystems.create(temporary, mime_type="application/json") as handle:
        handle.write(data)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temporary], [path])
    return merged


def seed_pairs(path: str, scope: str, *, types_map: bool = False) -> list[tuple[str, str]]:
    """Read ``(key, type)`` pairs to seed a schema with, in file order (first wins).

    Args:
        path: a file on any Beam filesystem.
        scope: ``name`` or ``path``, as the schema tracks keys.
        types_map: the file is one JSON object mapping keys to type names (or a schema
            document with ``fields``). Otherwise it holds example records as JSON lines or
            one JSON array: events or actions (their ``metadata`` is read) or bare metadata
            objects, whose types are inferred, dots in keys turned into ``_`` first.

    Raises:
        ValueError: the file is not in the expected shape.
    """
    with FileSystems.open(path) as handle:
        text = handle.read().decode("utf-8")
    if types_map:
        document = json.loads(text)
        fields = document.get("fields", document) if isinstance(document, dict) else None
        if not isinstance(fields, dict):
            msg = f"{path}: expected a JSON object of key -> type"
            raise ValueError(msg)
        bad = {k: v for k, v in fields.items() if v not in _TYPES}
        if bad:
            msg = f"{path}: unknown types {dict(list(bad.items())[:3])}; use {sorted(_TYPES)}"
            raise ValueError(msg)
        return list(fields.items())
    stripped = text.lstrip()
    examples = (
        json.loads(stripped)
        if stripped.startswith("[")
        else [json.loads(line) for line in text.splitlines() if line.strip()]
    )
    pairs: list[tuple[str, str]] = []
    for example in examples:
        if not isinstance(example, dict):
            continue
        metadata = example.get("metadata", example)
        if isinstance(metadata, dict):
            pairs.extend(types_of(sanitize_keys(metadata), scope))
    return pairs


def _checked(stored: Mapping[str, str]) -> dict[str, str]:
    bad = sorted(k for k, v in stored.items() if v not in _TYPES)
    if bad:
        msg = f"stored schema has keys with unknown types: {bad[:5]}"
        raise ValueError(msg)
    return dict(stored)


class SchemaChecked(NamedTuple):
    """Outputs of :class:`EnforceMetadataSchema`."""

    records: beam.PCollection  # records whose metadata agrees with the schema
    dead_letters: beam.PCollection  # type_conflict dead letters
    new_fields: beam.PCollection  # (key, type) pairs this run adds to the schema


def _earliest(values: Iterable[tuple]) -> tuple:
    return min(values)


def _explode(element: tuple[bytes, tuple[int, str, Signature]]) -> Iterator[tuple]:
    _, (time_ms, transaction_id, sig) = element
    for key, kind in sig:
        yield key, (time_ms, transaction_id, kind)


def _verdict(
    element: tuple[bytes, tuple[int, str, Signature]],
    stored: dict[str, str],
    winners: dict[str, str],
) -> Iterator[tuple[bytes, tuple[str, str, str]]]:
    sig_id, (_, _, sig) = element
    # The persisted type of a key wins over this run's first-seen one.
    conflict = find_conflict(sig, ChainMap(stored, winners))
    if conflict is not None:
        yield sig_id, conflict


class _CheckFn(beam.DoFn):
    def __init__(self, pipeline: str) -> None:
        self._pipeline = pipeline
        self._conflicts = counter("type_conflicts")

    def process(
        self, element: tuple[str, tuple], conflicts: Mapping[bytes, tuple[str, str, str]]
    ) -> Iterator[Any]:
        value = element[1]
        conflict = conflicts.get(value[4]) if conflicts else None
        if conflict is None:
            yield element
            return
        self._conflicts.inc()
        yield pvalue.TaggedOutput(DEAD_LETTER, conflict_letter(element, conflict, self._pipeline))


def conflict_letter(
    element: tuple[str, tuple], conflict: tuple[str, str, str], pipeline: str
) -> dict[str, Any]:
    """The ``type_conflict`` dead letter of a record, with its acknowledgement if any."""
    transaction_id, value = element
    key, expected, actual = conflict
    detail = f"metadata key {key!r} is {expected} in the schema; this record sends {actual}"
    letter = dead_letter(
        "type_conflict",
        "schema",
        detail,
        value[2],
        value[3],
        pipeline,
        transaction_id=transaction_id,
        field=key,
        expected_type=expected,
        actual_type=actual,
    )
    if len(value) > 5 and value[5] is not None:
        letter[ACK_FIELD] = value[5]
    return letter


class InProcessSchema:
    """The metadata type rule for a stream whose workers are all one process.

    The first type to arrive for a key wins (or the stored one), decided under one lock,
    so concurrent bundles agree. A signature's verdict is computed once and remembered
    (bounded, like every memo here). Only valid where one process sees every record: on
    runners with several worker processes use :class:`EnforceMetadataSchemaInStream`.
    """

    def __init__(self, stored: Mapping[str, str]) -> None:
        self._decided = dict(_checked(stored))
        self._verdicts: dict[bytes, tuple[str, str, str] | None] = {}
        self._lock = threading.Lock()

    def check(self, sig_id: bytes, sig: Signature) -> tuple[tuple[str, str, str] | None, list]:
        """``(conflict or None, keys decided for the first time as (key, type))``."""
        verdicts = self._verdicts
        if sig_id in verdicts:
            return verdicts[sig_id], []
        with self._lock:
            if sig_id in verdicts:
                return verdicts[sig_id], []
            decided = self._decided
            new = []
            for key, kind in sig:
                if key not in decided:  # a key twice in one signature: its first type wins
                    decided[key] = kind
                    new.append((key, kind))
            verdict = find_conflict(sig, decided)
            _remember(verdicts, sig_id, verdict)
        return verdict, new


class EnforceMetadataSchema(beam.PTransform):
    """Dead-letter records whose metadata contradicts the first type seen for a key.

    Takes ``(records, signatures)``: records are ``(transaction_id, (time_ms, record_json,
    raw, source, signature_id))`` and signatures ``(signature_id, (time_ms, transaction_id,
    signature))`` as :class:`~moesif_beam.transforms.normalize.NormalizeRecords` emits them.
    Returns the
    records that agree, ``type_conflict`` dead letters (counted in ``type_conflicts``), and
    the ``(key, type)`` pairs this run adds to the persisted schema.
    """

    def __init__(self, stored: Mapping[str, str], pipeline: str) -> None:
        super().__init__()
        self._stored = _checked(stored)
        self._pipeline = pipeline

    def expand(self, pcolls: tuple[beam.PCollection, beam.PCollection]) -> SchemaChecked:
        records, signatures = pcolls
        distinct = signatures | "DistinctSignatures" >> beam.CombinePerKey(_earliest)
        winners = (
            distinct
            | "KeyTypes" >> beam.FlatMap(_explode)
            | "FirstTypePerKey" >> beam.CombinePerKey(_earliest)
            | "WinningType" >> beam.MapTuple(lambda key, first: (key, first[2]))
        )
        conflicts = distinct | "Verdicts" >> beam.FlatMap(
            _verdict, stored=self._stored, winners=beam.pvalue.AsDict(winners)
        )
        checked = records | "Check" >> beam.ParDo(
            _CheckFn(self._pipeline), conflicts=beam.pvalue.AsDict(conflicts)
        ).with_outputs(DEAD_LETTER, main="records")
        stored = self._stored
        new_fields = winners | "NewKeys" >> beam.Filter(lambda kv: kv[0] not in stored)
        return SchemaChecked(checked.records, checked[DEAD_LETTER], new_fields)


# -- Streaming: keyed state decides, so no two workers can disagree ---------------------------

_OK = ("ok",)


def _fan_out(
    element: tuple[bytes, tuple[int, str, Signature]],
) -> Iterator[tuple[str, tuple[bytes, str, int]]]:
    sig_id, (_, _, sig) = element
    for key, kind in sig:
        yield key, (sig_id, kind, len(sig))


class _StageMemory:
    """What one keyed stage knows in this worker, shared by all its DoFn instances.

    Prism was measured to run bundles of one key concurrently: a record put in a state bag
    by one bundle while another bundle released the bag stayed there for good (2 to 45
    records in 30,000), and a signature whose decisions went to a bag from two bundles at
    once never got its verdict. So these stages decide under a lock in worker memory
    (keyed routing brings every element of a key to the same worker), and write state
    only as a durable copy. A decision, once made, never changes, which is also why
    remembering it needs no state read, a blocking round trip to the runner.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.decided: dict[Any, Any] = {}  # key -> type, or signature -> verdict
        self.pending: dict[bytes, dict[str, tuple[str, str]]] = {}  # decisions so far
        self.held: dict[tuple[bytes, int], list[tuple[str, tuple]]] = {}  # awaiting verdicts
        self.checked: set[tuple[bytes, int]] = set()  # gate keys whose state was read


def _stage_memory(stage_id: str) -> _StageMemory:
    return worker_memory(stage_id, _StageMemory)


class _DecideKeyTypeFn(beam.DoFn):
    """Keyed by metadata key: the first type to arrive (or the stored one) is the key's type.

    One key is decided once, under its worker's lock, so one key has one type. Emits
    ``(sig_id, (key, decided, sent, keys_in_signature))`` and, on the tagged output
    ``new``, each key decided for the first time.
    """

    TYPE = ReadModifyWriteStateSpec("type", StrUtf8Coder())

    def __init__(self, stored: Mapping[str, str], stage_id: str) -> None:
        self._stored = dict(stored)
        self._stage_id = stage_id

    def setup(self) -> None:
        self._memory = _stage_memory(self._stage_id)

    def process(
        self,
        element: tuple[str, tuple[bytes, str, int]],
        decided_state: Any = beam.DoFn.StateParam(TYPE),
    ) -> Iterator[Any]:
        key, (sig_id, kind, size) = element
        memory = self._memory
        decided = memory.decided.get(key)
        first = False
        if decided is None:
            with memory.lock:
                decided = memory.decided.get(key)
                if decided is None:
                    decided = decided_state.read()
                    if decided is None:
                        decided = self._stored.get(key) or kind
                        decided_state.write(decided)
                        first = key not in self._stored
                    _remember(memory.decided, key, decided)
        if first:
            yield pvalue.TaggedOutput("new", (key, decided))
        yield sig_id, (key, decided, kind, size)


class _AssembleVerdictFn(beam.DoFn):
    """Keyed by signature: once every key of the signature is decided, publish the verdict.

    The verdict goes to each gate shard of the signature, once per worker lifetime (a
    restarted worker may publish it again: the same verdict, which the gate takes twice
    without harm).
    """

    DONE = ReadModifyWriteStateSpec("done", PickleCoder())

    def __init__(self, shards: int, stage_id: str) -> None:
        self._shards = shards
        self._stage_id = stage_id

    def setup(self) -> None:
        self._memory = _stage_memory(self._stage_id)

    def process(
        self,
        element: tuple[bytes, tuple[str, str, str, int]],
        done: Any = beam.DoFn.StateParam(DONE),
    ) -> Iterator[_GateInput]:
        sig_id, (key, decided, sent, size) = element
        memory = self._memory
        with memory.lock:
            if sig_id in memory.decided:
                return
            decisions = memory.pending.setdefault(sig_id, {})
            decisions[key] = (decided, sent)
            if len(decisions) < size:
                return
            del memory.pending[sig_id]
            _remember(memory.decided, sig_id, True)
        verdict: tuple = _OK
        for name in sorted(decisions):
            decided, sent = decisions[name]
            if decided != sent:
                verdict = ("conflict", name, decided, sent)
                break
        done.write(verdict)
        for shard in range(self._shards):
            yield (sig_id, shard), ("verdict", verdict)


class _GateFn(beam.DoFn):
    """Keyed by (signature, shard): holds records until their signature's verdict is known.

    A record is held, or a verdict published, under one lock in worker memory (see
    :class:`_StageMemory`), so the verdict finds the record or the record finds the
    verdict. A record held when its worker dies was never acknowledged, so its Kafka
    offset was not committed and a restart reads it again.
    """

    VERDICT = ReadModifyWriteStateSpec("verdict", PickleCoder())

    def __init__(self, pipeline: str, stage_id: str) -> None:
        self._check = _CheckFn(pipeline)
        self._stage_id = stage_id

    def setup(self) -> None:
        self._memory = _stage_memory(self._stage_id)

    def process(
        self,
        element: tuple[tuple[bytes, int], tuple[str, Any]],
        verdict_state: Any = beam.DoFn.StateParam(VERDICT),
    ) -> Iterator[Any]:
        key, (kind, payload) = element
        sig_id = key[0]
        if not sig_id:
            yield payload  # no metadata, nothing to check
            return
        memory = self._memory
        if kind == "verdict":
            verdict_state.write(payload)
            with memory.lock:
                _remember(memory.decided, sig_id, payload)
                held = memory.held.pop(key, [])
            for record in held:
                yield from self._route(record, payload, sig_id)
            return
        verdict = memory.decided.get(sig_id)
        if verdict is None:
            # State is read once per key in a worker's life, for a verdict stored before a
            # restart; any later verdict reaches this worker's memory directly.
            verdict = None if key in memory.checked else verdict_state.read()
            with memory.lock:
                memory.checked.add(key)
                if verdict is not None:
                    _remember(memory.decided, sig_id, verdict)
                else:
                    verdict = memory.decided.get(sig_id)
                    if verdict is None:
                        memory.held.setdefault(key, []).append(payload)
                        return
        yield from self._route(payload, verdict, sig_id)

    def _route(self, record: tuple[str, tuple], verdict: tuple, sig_id: bytes) -> Iterator[Any]:
        conflicts = {} if verdict == _OK else {sig_id: verdict[1:]}
        yield from self._check.process(record, conflicts)


# What the gate takes in, records and verdicts alike. Both inputs of its Flatten must have
# this one coder: Prism runs a Flatten whose inputs are coded differently as an extra
# stage, which re-encodes every record once more.
_GateInput = tuple[tuple[bytes, int], tuple[str, Any]]


def _to_gate(element: tuple[str, tuple], shards: int) -> _GateInput:
    # Records without metadata pass through the gate too (it lets them straight on), so
    # that every record leaves from one stage and delivery fuses with it.
    transaction_id, value = element
    shard = zlib.crc32(transaction_id.encode("utf-8")) % shards
    return (value[4], shard), ("record", element)


class EnforceMetadataSchemaInStream(beam.PTransform):
    """The metadata type rule for unbounded runs, decided in keyed state.

    Same inputs and outputs as :class:`EnforceMetadataSchema`. In a stream there is no
    "earliest" to wait for, so the first type to *arrive* for a key wins (or the persisted
    one). Each key's decision lives in that key's state, so no two workers can accept
    different types for one key. Records wait at a gate keyed by (signature, shard) until
    every key of their signature is decided; ``shards`` spreads a popular signature over
    that many keys, so heavy traffic of one shape does not funnel through one worker.
    ``new_fields`` carries each newly decided key once, for periodic persistence.
    """

    def __init__(self, stored: Mapping[str, str], pipeline: str, shards: int = 16) -> None:
        super().__init__()
        if shards < 1:
            msg = f"shards must be >= 1, got {shards}"
            raise ValueError(msg)
        self._stored = _checked(stored)
        self._pipeline = pipeline
        self._shards = shards
        # Names this transform's memory in the workers; fixed when the pipeline is built.
        self._stage_id = uuid.uuid4().hex

    def expand(self, pcolls: tuple[beam.PCollection, beam.PCollection]) -> SchemaChecked:
        records, signatures = pcolls
        decided = (
            signatures
            | "FanOutKeys"
            >> beam.FlatMap(_fan_out).with_output_types(tuple[str, tuple[bytes, str, int]])
            | "DecideKeyType"
            >> beam.ParDo(_DecideKeyTypeFn(self._stored, f"{self._stage_id}/decide")).with_outputs(
                "new", main="decided"
            )
        )
        verdicts = decided.decided | "AssembleVerdict" >> beam.ParDo(
            _AssembleVerdictFn(self._shards, f"{self._stage_id}/assemble")
        ).with_input_types(tuple[bytes, tuple[str, str, str, int]]).with_output_types(_GateInput)
        routed = records | "ToGate" >> beam.Map(_to_gate, self._shards).with_output_types(
            _GateInput
        )
        gated = (verdicts, routed) | "JoinVerdicts" >> beam.Flatten()
        checked = gated | "Gate" >> beam.ParDo(
            _GateFn(self._pipeline, f"{self._stage_id}/gate")
        ).with_input_types(_GateInput).with_outputs(DEAD_LETTER, main="records")
        return SchemaChecked(checked.records, checked[DEAD_LETTER], decided.new)
