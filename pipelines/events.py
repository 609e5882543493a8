"""The events pipeline: gateway logs to Moesif's ``/v1/events/batch``.

``files -> parse + normalize -> dedup by transaction_id -> batch -> Moesif (or files)``,
with every reject flowing to one dead-letter sink.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.config import PipelineConfig
from transforms.deadletter import WriteDeadLetters
from transforms.dedup import DedupByTransactionId
from transforms.moesif_sink import PostToMoesif, WriteBatchFiles
from transforms.normalize import NormalizeRecords
from transforms.sources import ReadLines

__all__ = ["build"]


def build(config: PipelineConfig, options: PipelineOptions) -> beam.Pipeline:
    """Wire the events pipeline for ``config``; the caller runs it.

    Guarantee for a completed bounded run: every non-blank input line is counted in
    ``read`` and ends up ``sent``, counted as a duplicate, or in the dead letters.
    """
    pipeline = beam.Pipeline(options=options)
    lines = pipeline | "ReadFiles" >> ReadLines(config.input)
    normalized = lines | "Normalize" >> NormalizeRecords(
        config.input_format, config.pipeline, config.company_id_field
    )
    unique = normalized.records | "Dedup" >> DedupByTransactionId()
    rejected = unique | "Deliver" >> _sink(config)
    (normalized.dead_letters, rejected) | "DeadLetters" >> WriteDeadLetters(
        config.dead_letter_dir, config.pipeline, config.run_id
    )
    return pipeline


def _sink(config: PipelineConfig) -> beam.PTransform:
    if config.application_id is None:
        return WriteBatchFiles(
            config.pipeline,
            config.batch_dir,
            max_events=config.batch_max_events,
            max_bytes=config.batch_max_bytes,
            gzip_level=config.gzip_level,
        )
    return PostToMoesif(
        config.pipeline,
        config.base_url,
        config.application_id,
        config.pipeline,
        max_events=config.batch_max_events,
        max_bytes=config.batch_max_bytes,
        gzip_level=config.gzip_level,
        policy=config.retry,
        timeout=config.http_timeout,
    )
