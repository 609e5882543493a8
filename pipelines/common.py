"""The delivery pipeline both ``events`` and ``actions`` are made of.

``files or Kafka -> parse + normalize -> dedup by transaction_id -> metadata type schema -> batch ->
Moesif (or batch files)``, every reject flowing to one dead-letter sink (by construction:
a pipeline with a stage whose rejects reach no sink fails to build), and the keys this
run adds to the metadata schema written aside for the launcher to merge into the store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from moesif_beam.pipelines.config import PipelineConfig
from moesif_beam.transforms.common.fused import Fused
from moesif_beam.transforms.common.in_workers import InWorkers
from moesif_beam.transforms.deadletters.handler import DeadLetters, verify_dead_letters
from moesif_beam.transforms.deadletters.letters import DEAD_LETTER, WriteDeadLetters
from moesif_beam.transforms.deadletters.streaming import WriteDeadLettersInStream
from moesif_beam.transforms.dedup.bounded import (
    DEFAULT_PARTITIONS,
    DedupByTransactionId,
    never_retries,
    open_file_budget,
    removes_spill_as_read,
    spill_partitions,
)
from moesif_beam.transforms.dedup.streaming import (
    NEW_FIELDS,
    DedupAndCheckInProcess,
    DedupInStream,
)
from moesif_beam.transforms.delivery import PostToMoesif, WriteBatchFiles
from moesif_beam.transforms.delivery.sinks import ACKS
from moesif_beam.transforms.delivery.streaming import BatchAndDeliverInStream
from moesif_beam.transforms.formats.normalize import SIGNATURES, Normalized, NormalizeRecords
from moesif_beam.transforms.schema import (
    EnforceMetadataSchema,
    EnforceMetadataSchemaInStream,
    PersistSchemaInStream,
)
from moesif_beam.transforms.sources.files import FollowFiles, ReadLines
from moesif_beam.transforms.sources.kafka import ReadKafka
from moesif_beam.transforms.sources.offsets import CommitOffsets

__all__ = ["build_delivery", "builder"]


def builder(
    pipeline_name: str,
) -> Callable[[PipelineConfig, PipelineOptions, Mapping[str, str] | None], beam.Pipeline]:
    """The ``build(config, options, stored_schema)`` of one named pipeline."""

    def build(
        config: PipelineConfig,
        options: PipelineOptions,
        stored_schema: Mapping[str, str] | None = None,
    ) -> beam.Pipeline:
        if config.pipeline != pipeline_name:
            msg = f"the {pipeline_name} pipeline got a {config.pipeline!r} config"
            raise ValueError(msg)
        return build_delivery(config, options, stored_schema or {})

    return build


def build_delivery(
    config: PipelineConfig, options: PipelineOptions, stored_schema: Mapping[str, str]
) -> beam.Pipeline:
    """Wire one delivery pipeline for ``config``; the caller runs it.

    Guarantee for a completed bounded run: every record read is ``sent``, counted as a
    duplicate, or in the dead letters, so ``read == sent + duplicates + dead_letters``.
    """
    if config.streaming:
        return _build_streaming(config, options, stored_schema)
    pipeline = beam.Pipeline(options=options)
    rejects = DeadLetters()
    if config.dedup_spill:
        new_fields = _fused_bounded(pipeline, config, stored_schema, rejects)
    else:
        normalized, _ = read_and_normalize(pipeline, config, rejects)
        unique = normalized.records | "Dedup" >> DedupByTransactionId()
        checked = (unique, normalized.signatures) | "MetadataSchema" >> EnforceMetadataSchema(
            stored_schema, config.pipeline
        )
        rejects.add(checked.dead_letters)
        rejects.add(checked.records | "Deliver" >> _sink(config))
        new_fields = checked.new_fields
    rejects.write(
        "DeadLetters",
        WriteDeadLetters(
            config.dead_letter_dir, config.pipeline, config.run_id, config.input_format
        ),
    )
    _ = (
        new_fields
        | "SchemaLine" >> beam.MapTuple(lambda key, kind: json.dumps([key, kind]))
        | "PendingSchema"
        >> beam.io.WriteToText(f"{config.schema_pending_dir}/keys", file_name_suffix=".jsonl")
    )
    verify_dead_letters(pipeline)
    return pipeline


def _fused_bounded(
    pipeline: beam.Pipeline,
    config: PipelineConfig,
    stored_schema: Mapping[str, str],
    rejects: DeadLetters,
) -> beam.PCollection:
    """The bounded shape on the local runner, its steps fused into two; the new schema keys.

    The same stages as the general shape (read, normalize, the dedup spill; then each
    partition's dedup, the schema check and delivery), each called by the one before it
    (:class:`Fused`) instead of handed every record by the runner: measured, that was
    a tenth of a local run's CPU. Between the two steps are the runner's own: the spill
    files grouped by partition, and the schema decided from every signature.
    """
    dedup = DedupByTransactionId(config.spill_dir, _spill_partitions(config))
    schema = EnforceMetadataSchema(stored_schema, config.pipeline)
    runner = pipeline.options.view_as(StandardOptions).runner
    first = [_normalize(config).stage(), dedup.spill_stage()]
    if config.kafka is not None:
        start = _read_kafka(pipeline, config).records
    else:
        read = _read_lines(config, **_range_claims(config, pipeline.options))
        start = pipeline | "PlanRanges" >> read.ranges()
        first.insert(0, read.stage())
    spilled = start | "ReadNormalizeSpill" >> Fused(first, tags=(DEAD_LETTER, SIGNATURES))
    rejects.add(spilled[DEAD_LETTER])
    conflicts, new_fields = schema.decide(spilled[SIGNATURES])
    delivered = (
        spilled.main
        | "GroupPartitionFiles" >> beam.GroupByKey()
        | "DedupCheckDeliver"
        >> Fused(
            [
                dedup.keep_stage(removes_spill_as_read(runner)),
                schema.check_stage(),
                _sink(config).stage(),
            ],
            tags=(DEAD_LETTER,),
            side_inputs={"conflicts": beam.pvalue.AsDict(conflicts)},
        )
    )
    rejects.add(delivered[DEAD_LETTER])
    return new_fields


def _spill_partitions(config: PipelineConfig) -> int:
    """Partitions for the dedup spill: from the input's size when it is files."""
    if not config.dedup_spill or config.kafka is not None or not config.input:
        return DEFAULT_PARTITIONS
    plain = gzip = 0
    try:
        for match in FileSystems.match([config.input])[0].metadata_list:
            if match.path.endswith(".gz"):
                gzip += match.size_in_bytes
            else:
                plain += match.size_in_bytes
    except Exception:
        return DEFAULT_PARTITIONS
    return spill_partitions(plain, gzip, max_partitions=open_file_budget())


def read_and_normalize(
    pipeline: beam.Pipeline,
    config: PipelineConfig,
    rejects: DeadLetters,
    inline_signatures: bool = False,
) -> tuple[Normalized, Any]:
    """Read the configured source and normalize its lines; ``(normalized, kafka read)``.

    The source is Kafka (bounded or not, per its config), followed files in a stream, or
    files read once. Every reject of the read and of normalizing is added to ``rejects``.
    The Kafka read's outputs (with its partitions, for committing) are returned, or None.
    """
    lines, read = read_lines(pipeline, config, rejects)
    normalized = lines | "Normalize" >> _normalize(config, inline_signatures)
    rejects.add(normalized.dead_letters)
    return normalized, read


def read_lines(
    pipeline: beam.Pipeline,
    config: PipelineConfig,
    rejects: DeadLetters,
    ranges: bool = False,
) -> tuple[beam.PCollection, Any]:
    """Read the configured source; ``(lines, kafka read)`` (see :func:`read_and_normalize`).

    With ``ranges``, Kafka is read as offset ranges for others to read
    (:class:`~moesif_beam.transforms.sources.kafka_ranges.KafkaRange`).
    """
    read = None
    if config.kafka is not None:
        read = _read_kafka(pipeline, config, ranges)
        lines = read.records
    elif config.streaming:
        followed = pipeline | "FollowFiles" >> FollowFiles(
            config.input,
            config.follow_interval,
            pipeline=config.pipeline,
            max_line_bytes=config.max_line_bytes,
        )
        lines = followed.lines
        rejects.add(followed.dead_letters)
    else:
        files = pipeline | "ReadFiles" >> _read_lines(config)
        lines = files.lines
        rejects.add(files.dead_letters)
    return lines, read


def _read_kafka(pipeline: beam.Pipeline, config: PipelineConfig, ranges: bool = False) -> Any:
    assert config.kafka is not None
    return pipeline | "ReadKafka" >> ReadKafka(
        config.kafka, list(config.kafka_partitions), ranges=ranges
    )


def _read_lines(config: PipelineConfig, **claims: Any) -> ReadLines:
    return ReadLines(
        config.input, pipeline=config.pipeline, max_line_bytes=config.max_line_bytes, **claims
    )


def _range_claims(config: PipelineConfig, options: PipelineOptions) -> dict[str, Any]:
    """How a bounded run on the local runner shares its input's ranges between workers.

    Claimed as the read goes (see transforms/sources/ranges.py), where every bundle runs
    once and the spill directory is local: there the claims live beside the spill and go
    with it. Two tokens per worker, so that every worker gets one whatever the runner's
    split; a worker's second token finds the ranges claimed and ends at once.
    """
    if not never_retries(options.view_as(StandardOptions).runner) or "://" in config.spill_dir:
        return {}
    # Beam reads 0 workers as one per core.
    workers = options.view_as(DirectOptions).direct_num_workers or os.cpu_count() or 1
    return {"claims_dir": f"{config.spill_dir}/range-claims", "claim_tokens": 2 * max(workers, 1)}


def _normalize(config: PipelineConfig, inline_signatures: bool = False) -> NormalizeRecords:
    return NormalizeRecords(
        config.pipeline,
        config.input_format,
        schema_scope=config.schema_scope,
        mapping=config.mapping,
        inline_signatures=inline_signatures,
        max_line_bytes=config.max_line_bytes,
        # Only where one process holds every stage (Prism; see PipelineConfig).
        processes=config.parse_processes if config.single_process else 0,
    )


def _build_streaming(
    config: PipelineConfig, options: PipelineOptions, stored_schema: Mapping[str, str]
) -> beam.Pipeline:
    """The unbounded shape: keyed state and timers instead of global groupings.

    Every record's fate ends as an acknowledgement; offsets are committed only as far as
    every record before them is done.
    """
    pipeline = beam.Pipeline(options=options)
    rejects = DeadLetters()
    if config.single_process and config.parse_processes:
        new_fields, acks, read = _parse_apart(pipeline, config, stored_schema, rejects)
    else:
        new_fields, acks, read = _in_stages(pipeline, config, stored_schema, rejects)
    _ = new_fields | "PersistSchema" >> PersistSchemaInStream(
        config.schema_store_path, config.schema_scope
    )
    dead_acks = rejects.write(
        "DeadLetters",
        WriteDeadLettersInStream(
            config.dead_letter_dir, config.pipeline, config.run_id, config.input_format
        ),
    )
    if config.kafka is not None:
        acks = (*acks, dead_acks) | "Acks" >> beam.Flatten()
        _ = (acks, read.partitions) | "CommitOffsets" >> CommitOffsets(config.kafka)
    verify_dead_letters(pipeline)
    return pipeline


def _parse_apart(
    pipeline: beam.Pipeline,
    config: PipelineConfig,
    stored_schema: Mapping[str, str],
    rejects: DeadLetters,
) -> tuple[beam.PCollection, tuple[beam.PCollection, ...], Any]:
    """The fused stream with parsing and delivery in worker processes: one step.

    Parsing, mapping and delivery run in ``config.parse_processes`` workers, each record
    in the worker that parsed it; dedup and the type rule run here, on each record's id,
    time and signature (transforms/common/in_workers.py; measured: bringing every record
    back here to deliver it cost as much CPU as the reference loop's whole job).
    """
    # From Kafka, offset ranges that the workers read themselves (measured: 1.02x to
    # 1.21x the rate of handing them the messages; docs/performance.md, session 22).
    ranges = config.kafka is not None
    lines, read = read_lines(pipeline, config, rejects, ranges=ranges)
    out = lines | "ParseDedupDeliver" >> InWorkers(
        _normalize(config, inline_signatures=True).stage(),
        _dedup_and_check(config, stored_schema).stage(),
        _deliver(config).stage(),
        config.parse_processes,
        tags=(DEAD_LETTER, SIGNATURES, ACKS, NEW_FIELDS),
        kafka=config.kafka,
        # A partition's ranges stay with one worker, whose consumer keeps prefetching, when
        # the partitions share out evenly: with 3 partitions on 2 workers, one worker
        # would carry two thirds of a backlog while the other idled.
        sticky=len(config.kafka_partitions) % max(config.parse_processes, 1) == 0,
    )
    rejects.add(out[DEAD_LETTER])
    return out[NEW_FIELDS], (out[ACKS],), read


def _dedup_and_check(
    config: PipelineConfig, stored_schema: Mapping[str, str]
) -> DedupAndCheckInProcess:
    return DedupAndCheckInProcess(
        config.dedup_ttl,
        stored_schema,
        config.pipeline,
        store=(config.schema_store_path, config.schema_scope),
        journal=config.dedup_journal_dir,
    )


def _deliver(config: PipelineConfig) -> BatchAndDeliverInStream:
    return BatchAndDeliverInStream(
        _sink(config),
        config.batch_max_delay,
        journal=(config.dedup_journal_dir, int(config.dedup_ttl * 1000)),
    )


def _in_stages(
    pipeline: beam.Pipeline,
    config: PipelineConfig,
    stored_schema: Mapping[str, str],
    rejects: DeadLetters,
) -> tuple[beam.PCollection, tuple[beam.PCollection, ...], Any]:
    """The stream as separate steps: fused in one process, or keyed on a cluster."""
    normalized, read = read_and_normalize(
        pipeline, config, rejects, inline_signatures=config.single_process
    )
    if config.single_process:
        # One process sees every record: no shuffle to dedup shards or schema gates, so
        # records go from the reader to delivery in one fused stage (measured: the
        # shuffles' encoding was a third of a 2,000 events/s stream's CPU).
        checked = normalized.records | "DedupAndCheck" >> _dedup_and_check(config, stored_schema)
        duplicate_acks = checked.acks
    else:
        unique = normalized.records | "Dedup" >> DedupInStream(
            config.dedup_ttl, journal=config.dedup_journal_dir
        )
        duplicate_acks = unique.acks
        checked = (unique.records, normalized.signatures) | "MetadataSchema" >> (
            EnforceMetadataSchemaInStream(
                stored_schema,
                config.pipeline,
                store=(config.schema_store_path, config.schema_scope),
            )
        )
    rejects.add(checked.dead_letters)
    delivered = checked.records | "Deliver" >> _deliver(config)
    rejects.add(delivered.dead_letters)
    return checked.new_fields, (duplicate_acks, delivered.acks), read


def _sink(config: PipelineConfig) -> PostToMoesif | WriteBatchFiles:
    if config.application_id is None:
        return WriteBatchFiles(
            config.pipeline,
            config.batch_dir,
            max_events=config.batch_max_events,
            max_bytes=config.batch_max_bytes,
            gzip_level=config.gzip_level,
            max_in_flight=config.max_in_flight,
        )
    return PostToMoesif(
        config.pipeline,
        config.base_url,
        config.application_id,
        config.pipeline,
        max_events=config.batch_max_events,
        max_bytes=config.batch_max_bytes,
        gzip_level=config.gzip_level,
        max_in_flight=config.max_in_flight,
        policy=config.retry,
        timeout=config.http_timeout,
        ca_bundle=config.ca_bundle,
    )
