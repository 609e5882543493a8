"""The metadata type rule in a stream: keyed decisions per key, a gate per signature.

Also :class:`PersistSchemaInStream`, which merges decided keys into the store as they come.

The first type to arrive for a key wins (or the stored one); records wait at a gate until
their signature has a verdict. Decisions are kept in worker memory per stage.
"""

from __future__ import annotations

import threading
import uuid
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.coders import PickleCoder, StrUtf8Coder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from moesif_beam.transforms.common.worker_memory import worker_memory
from moesif_beam.transforms.deadletters.letters import DEAD_LETTER
from moesif_beam.transforms.records import Keyed
from moesif_beam.transforms.schema.bounded import SchemaChecked, _CheckFn
from moesif_beam.transforms.schema.rule import SCOPES, Signature, _remember
from moesif_beam.transforms.schema.store import _checked, decide_in_store, save_schema

__all__ = ["EnforceMetadataSchemaInStream", "PersistSchemaInStream"]


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
        self.held: dict[tuple[bytes, int], list[Keyed]] = {}  # awaiting verdicts
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

    def __init__(
        self, stored: Mapping[str, str], stage_id: str, store: tuple[str, str] | None = None
    ) -> None:
        self._stored = dict(stored)
        self._stage_id = stage_id
        self._store = store

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
                        decided = self._stored.get(key) or self._decide(key, kind)
                        decided_state.write(decided)
                        first = key not in self._stored
                    _remember(memory.decided, key, decided)
        if first:
            yield pvalue.TaggedOutput("new", (key, decided))
        yield sig_id, (key, decided, kind, size)

    def _decide(self, key: str, kind: str) -> str:
        # With a store, the decision is written there before any record carrying it moves
        # on: state can be lost (a new job) or rolled back (a restored checkpoint), the
        # store cannot, so a later decision for this key reads the same type.
        if self._store is None:
            return kind
        path, scope = self._store
        return decide_in_store(path, scope, key, kind)[0]


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

    def _route(self, record: Keyed, verdict: tuple, sig_id: bytes) -> Iterator[Any]:
        conflicts = {} if verdict == _OK else {sig_id: verdict[1:]}
        yield from self._check.process(record, conflicts)


# What the gate takes in, records and verdicts alike. Both inputs of its Flatten must have
# this one coder: Prism runs a Flatten whose inputs are coded differently as an extra
# stage, which re-encodes every record once more.
_GateInput = tuple[tuple[bytes, int], tuple[str, Any]]


def _to_gate(element: Keyed, shards: int) -> _GateInput:
    # Records without metadata pass through the gate too (it lets them straight on), so
    # that every record leaves from one stage and delivery fuses with it.
    transaction_id, value = element
    shard = zlib.crc32(transaction_id.encode("utf-8")) % shards
    return (value.sig_id, shard), ("record", element)


class EnforceMetadataSchemaInStream(beam.PTransform):
    """The metadata type rule for unbounded runs, decided in keyed state.

    Same inputs and outputs as :class:`EnforceMetadataSchema`. In a stream there is no
    "earliest" to wait for, so the first type to *arrive* for a key wins (or the persisted
    one). Each key's decision lives in that key's state, so no two workers can accept
    different types for one key. Records wait at a gate keyed by (signature, shard) until
    every key of their signature is decided; ``shards`` spreads a popular signature over
    that many keys, so heavy traffic of one shape does not funnel through one worker.
    ``new_fields`` carries each newly decided key once, for periodic persistence.

    With ``store`` (the schema store's path and scope), a key's first decision is written
    to the store, under a lock for local paths, before any record carrying it moves on,
    and a key another run already stored takes that run's type. Beam state is lost when
    a job is started anew and rolled back when a checkpoint is restored; the store is
    neither, so a key never gets two types across restarts, rescales or concurrent runs.
    """

    def __init__(
        self,
        stored: Mapping[str, str],
        pipeline: str,
        shards: int = 16,
        store: tuple[str, str] | None = None,
    ) -> None:
        super().__init__()
        if shards < 1:
            msg = f"shards must be >= 1, got {shards}"
            raise ValueError(msg)
        if store is not None and (not store[0] or store[1] not in SCOPES):
            msg = f"store must be (path, scope) with scope in {sorted(SCOPES)}, got {store!r}"
            raise ValueError(msg)
        self._store = store
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
            >> beam.ParDo(
                _DecideKeyTypeFn(self._stored, f"{self._stage_id}/decide", self._store)
            ).with_outputs("new", main="decided")
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


class _PersistSchemaFn(beam.DoFn):
    def __init__(self, path: str, scope: str) -> None:
        self._path = path
        self._scope = scope

    def start_bundle(self) -> None:
        self._new: list[tuple[str, str]] = []

    def process(self, key_type: tuple[str, str]) -> None:
        self._new.append(key_type)

    def finish_bundle(self) -> None:
        if self._new:
            save_schema(self._path, self._scope, self._new)
            self._new = []


class PersistSchemaInStream(beam.PTransform):
    """Merge newly decided metadata keys into the schema store as they are decided.

    Each bundle with new keys re-reads the store and adds them (first wins), so the store
    is never more than a bundle behind the pipeline's decisions.
    """

    def __init__(self, path: str, scope: str) -> None:
        super().__init__()
        self._fn = _PersistSchemaFn(path, scope)

    def expand(self, new_fields: beam.PCollection) -> beam.PCollection:
        return new_fields | "Persist" >> beam.ParDo(self._fn)
