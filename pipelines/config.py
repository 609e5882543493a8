"""Typed, validated configuration shared by the pipelines.

The CLI turns flags into one frozen :class:`PipelineConfig`; pipelines and transforms take
plain typed values from it and never see argparse.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from moesif_beam.transforms.delivery import (
    BATCH_BYTE_LIMITS,
    MAX_IN_FLIGHT,
    MIN_SECRET_LENGTH,
    RetryPolicy,
    Secret,
    check_ca_bundle,
)
from moesif_beam.transforms.formats.normalize import FORMATS
from moesif_beam.transforms.schema import SCOPES
from moesif_beam.transforms.sources.files import MAX_LINE_BYTES
from moesif_beam.transforms.sources.kafka import KafkaPartition, KafkaSourceConfig

__all__ = ["DEFAULT_BASE_URL", "PipelineConfig", "new_run_id"]

DEFAULT_BASE_URL = "https://api.moesif.net"


def new_run_id() -> str:
    """A sortable, unique label for one run: UTC time plus a little randomness."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclass(frozen=True)
class PipelineConfig:
    """Everything a pipeline needs besides Beam's own options.

    Attributes:
        pipeline: ``events`` or ``actions``; picks the endpoint and the batch limit.
        input: a file glob (local or any Beam filesystem; ``.gz`` is decompressed).
        kafka: read from Kafka instead of files.
        kafka_partitions: the partitions' offset ranges, resolved before the run.
        input_format: the input format's name, e.g. ``wso2``.
        application_id: the Moesif application id; None writes batch files instead.
        base_url: the collector's base URL.
        output_dir: where batch files (without an application id) and, by default,
            dead letters go.
        dead_letter: the dead-letter directory; empty means ``<output_dir>/dead_letter``.
        company_id_field: an input field whose value becomes ``company_id``.
        batch_max_events / batch_max_bytes: batch limits (bytes of uncompressed JSON).
        batch_max_delay: how long a partial batch may wait in streaming runs, in seconds.
        retry: the HTTP retry policy.
        http_timeout: seconds to wait for the collector's answer to one request.
        ca_bundle: a PEM file of CA certificates to trust for the collector's TLS
            certificate instead of the system's (a private CA).
        gzip_level: compression level of batch bodies.
        max_in_flight: batches each worker compresses and posts at once, beside batching.
        metrics_out: where to write the run's counters as JSON, if anywhere.
        schema_store: the persisted metadata type schema (JSON, any Beam filesystem);
            empty means ``<output_dir>/metadata_schema.json``, shared by both pipelines.
        schema_scope: track a metadata key's type by its ``name`` at any depth (Moesif's
            rule) or by its full ``path``.
        streaming: an unbounded run (Kafka without a stop, or --follow).
        follow: keep watching the ``input`` glob for new files (streaming).
        follow_interval: seconds between looks for new files.
        dedup_ttl: in streaming, how long a transaction id is remembered, in seconds.
        drain_timeout: in streaming, how long a drain (SIGTERM, Ctrl-C) may take, in
            seconds; what is undelivered then is not committed and is read again.
        dedup_spill: bounded runs deduplicate through files partitioned by id under
            ``spill_dir`` instead of the engine's shuffle (for local runners, whose
            shuffle lives in memory).
        single_process: a stream whose workers all run in this one process (the default
            streaming runner: Prism with in-process workers). Dedup and the metadata type
            rule then decide in that process's memory, in the reader's stage, instead of
            in keyed stages that every record is shuffled to.
        max_line_bytes: the longest input line (or Kafka message) read; a longer one is a
            ``too_large`` dead letter.
        run_id: labels this run's dead-letter files.
    """

    pipeline: str
    input: str
    input_format: str
    kafka: KafkaSourceConfig | None = None
    kafka_partitions: tuple[KafkaPartition, ...] = ()
    application_id: Secret | None = None
    base_url: str = DEFAULT_BASE_URL
    output_dir: str = "./moesif-out"
    dead_letter: str = ""
    company_id_field: str | None = None
    batch_max_events: int = 500
    batch_max_bytes: int = 5_000_000
    batch_max_delay: float = 2.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    http_timeout: float = 30.0
    ca_bundle: str | None = None
    gzip_level: int = 6
    max_in_flight: int = 2
    metrics_out: str | None = None
    schema_store: str = ""
    schema_scope: str = "name"
    streaming: bool = False
    follow: bool = False
    follow_interval: float = 5.0
    dedup_ttl: float = 3600.0
    drain_timeout: float = 30.0
    dedup_spill: bool = False
    single_process: bool = False
    max_line_bytes: int = MAX_LINE_BYTES
    run_id: str = field(default_factory=new_run_id)

    def __post_init__(self) -> None:
        if self.pipeline not in BATCH_BYTE_LIMITS:
            msg = f"pipeline must be one of {sorted(BATCH_BYTE_LIMITS)}, got {self.pipeline!r}"
            raise ValueError(msg)
        if not self.input and self.kafka is None:
            msg = "--input is required: a file glob such as 'logs/*.jsonl.gz'"
            raise ValueError(msg)
        if self.input and self.kafka is not None:
            msg = "--input reads files; it cannot be combined with --source kafka"
            raise ValueError(msg)
        if self.input_format not in FORMATS[self.pipeline]:
            known = ", ".join(sorted(FORMATS[self.pipeline]))
            msg = f"--format {self.input_format!r} is not a {self.pipeline} format; known: {known}"
            raise ValueError(msg)
        if self.schema_scope not in SCOPES:
            msg = f"--schema_scope must be one of {', '.join(SCOPES)}, got {self.schema_scope!r}"
            raise ValueError(msg)
        if not self.base_url.startswith(("http://", "https://")):
            msg = f"--moesif_base_url must start with http:// or https://, got {self.base_url!r}"
            raise ValueError(msg)
        if self.batch_max_events < 1:
            msg = f"--batch_max_events must be at least 1, got {self.batch_max_events}"
            raise ValueError(msg)
        limit = BATCH_BYTE_LIMITS[self.pipeline]
        if not 1024 <= self.batch_max_bytes <= limit:
            msg = (
                f"--batch_max_bytes must be between 1024 and {limit} "
                f"(Moesif's {self.pipeline} batch limit), got {self.batch_max_bytes}"
            )
            raise ValueError(msg)
        if self.batch_max_delay <= 0:
            msg = f"--batch_max_delay must be positive, got {self.batch_max_delay}"
            raise ValueError(msg)
        if self.http_timeout <= 0:
            msg = f"--http_timeout must be positive, got {self.http_timeout}"
            raise ValueError(msg)
        if self.application_id is not None and (
            len(self.application_id.reveal()) < MIN_SECRET_LENGTH
        ):
            # Never the id itself, nor its length: only what is wrong.
            msg = (
                f"the Moesif application id is too short (under {MIN_SECRET_LENGTH} "
                "characters); check --moesif_application_id or MOESIF_APPLICATION_ID"
            )
            raise ValueError(msg)
        if self.ca_bundle is not None:
            check_ca_bundle(self.ca_bundle)
        if not 0 <= self.gzip_level <= 9:
            msg = f"--gzip_level must be between 0 and 9, got {self.gzip_level}"
            raise ValueError(msg)
        if not 1 <= self.max_in_flight <= MAX_IN_FLIGHT:
            msg = f"--max_in_flight must be between 1 and {MAX_IN_FLIGHT}, got {self.max_in_flight}"
            raise ValueError(msg)
        if self.dedup_ttl <= 0:
            msg = f"--dedup_ttl must be positive, got {self.dedup_ttl}"
            raise ValueError(msg)
        if self.drain_timeout <= 0:
            msg = f"--drain_timeout must be positive, got {self.drain_timeout}"
            raise ValueError(msg)
        if self.follow and self.kafka is not None:
            msg = "--follow watches files; it cannot be combined with --source kafka"
            raise ValueError(msg)
        if self.follow_interval <= 0:
            msg = f"--follow_interval must be positive, got {self.follow_interval}"
            raise ValueError(msg)
        unbounded_kafka = self.kafka is not None and not self.kafka.bounded
        if self.streaming and not (unbounded_kafka or self.follow):
            msg = (
                "streaming runs read Kafka without --kafka_stop, or files with --follow; "
                "otherwise drop --streaming"
            )
            raise ValueError(msg)
        if not self.output_dir:
            msg = "--output_dir must not be empty"
            raise ValueError(msg)
        if self.max_line_bytes < 1:
            msg = f"--max_line_bytes must be positive, got {self.max_line_bytes}"
            raise ValueError(msg)

    @property
    def dead_letter_dir(self) -> str:
        """The directory dead letters are written to."""
        return self.dead_letter or f"{self.output_dir.rstrip('/')}/dead_letter"

    @property
    def schema_store_path(self) -> str:
        """Where the metadata type schema is persisted."""
        return self.schema_store or f"{self.output_dir.rstrip('/')}/metadata_schema.json"

    @property
    def spill_dir(self) -> str:
        """Where a bounded run with ``dedup_spill`` spills records; removed after the run."""
        return f"{self.output_dir.rstrip('/')}/.dedup-spill/{self.pipeline}-{self.run_id}"

    @property
    def schema_pending_dir(self) -> str:
        """Where a run writes the keys it adds, until the launcher merges them."""
        return f"{self.output_dir.rstrip('/')}/.schema-pending/{self.pipeline}-{self.run_id}"

    @property
    def batch_dir(self) -> str:
        """The directory batch files are written to when there is no application id."""
        return f"{self.output_dir.rstrip('/')}/{self.pipeline}"
