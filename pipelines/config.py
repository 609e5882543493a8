"""Typed, validated configuration shared by the pipelines.

The CLI turns flags into one frozen :class:`PipelineConfig`; pipelines and transforms take
plain typed values from it and never see argparse.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moesif_beam.transforms.common.errors import require_positive
from moesif_beam.transforms.delivery import (
    BATCH_BYTE_LIMITS,
    MIN_SECRET_LENGTH,
    RetryPolicy,
    Secret,
)
from moesif_beam.transforms.delivery.sinks import (
    DEFAULT_GZIP_LEVEL,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_EVENTS,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_TIMEOUT,
    validate_batching,
    validate_collector,
)
from moesif_beam.transforms.formats.gateway import DEFAULT_MASKED_HEADERS, MappingOptions
from moesif_beam.transforms.formats.normalize import FORMATS
from moesif_beam.transforms.schema import SCOPES
from moesif_beam.transforms.sources.files import MAX_LINE_BYTES
from moesif_beam.transforms.sources.kafka import KafkaPartition, KafkaSourceConfig

__all__ = ["DEFAULT_BASE_URL", "DEFAULT_SEGMENT_URL", "PipelineConfig", "new_run_id"]

DEFAULT_BASE_URL = "https://api.moesif.net"
# Segment's HTTP Tracking API, US region (the Moesif source is US-only too).
DEFAULT_SEGMENT_URL = "https://api.segment.io"


def new_run_id() -> str:
    """A sortable, unique label for one run: UTC time plus a little randomness."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def _as_flags(check: Callable[..., None], *args: Any) -> None:
    """Run a transform's own check; name the setting as the command's flag."""
    try:
        check(*args)
    except ValueError as exc:
        text = str(exc)
        msg = text if text.startswith("--") else f"--{text}"
        raise ValueError(msg) from None


# More parsing processes than this only compete with the stream's own for the cores.
_MAX_PARSE_PROCESSES = 64


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
        company_id_field: an input field (or ``header:NAME``) whose value becomes
            ``company_id``.
        user_id_field: an input field or ``header:NAME`` for ``user_id`` (events).
        session_token_field: an input field or ``header:NAME`` for ``session_token``.
        user_id_jwt_claim: the Bearer JWT claim that becomes ``user_id`` (events).
        mask_headers: headers whose values are masked (events).
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
        dedup_journal: in streaming, where delivered transaction ids are journaled so a
            restarted stream still drops their copies (any Beam filesystem the workers
            share); empty means ``<output_dir>/.delivered-ids/<pipeline>-<destination>``.
        drain_timeout: in streaming, how long a drain (SIGTERM, Ctrl-C) may take, in
            seconds; what is undelivered then is not committed and is read again.
        dedup_spill: bounded runs deduplicate through files partitioned by id under
            ``spill_dir`` instead of the engine's shuffle (for local runners, whose
            shuffle lives in memory).
        single_process: a stream whose workers all run in this one process (the default
            streaming runner: Prism with in-process workers). Dedup and the metadata type
            rule then decide in that process's memory, in the reader's stage, instead of
            in keyed stages that every record is shuffled to.
        parse_processes: with ``single_process``, how many worker processes parse and
            map records for the stage (0: the stage's own process does).
        max_line_bytes: the longest input line (or Kafka message) read; a longer one is a
            ``too_large`` dead letter.
        run_id: labels this run's dead-letter files.
        as_of_ms: profiles, bounded: the time profiles are computed as of (epoch ms); None
            means the newest request time in the input.
        profile_interval: profiles, streaming: seconds of event time between updates.
        segment_write_key: profiles: send identify/group calls to Segment with this key.
        segment_base_url: Segment's Tracking API base URL.
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
    user_id_field: str | None = None
    session_token_field: str | None = None
    user_id_jwt_claim: str | None = None
    mask_headers: tuple[str, ...] = DEFAULT_MASKED_HEADERS
    batch_max_events: int = DEFAULT_MAX_EVENTS
    batch_max_bytes: int = DEFAULT_MAX_BYTES
    batch_max_delay: float = 2.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    http_timeout: float = DEFAULT_TIMEOUT
    ca_bundle: str | None = None
    gzip_level: int = DEFAULT_GZIP_LEVEL
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    metrics_out: str | None = None
    schema_store: str = ""
    schema_scope: str = "name"
    streaming: bool = False
    follow: bool = False
    follow_interval: float = 5.0
    dedup_ttl: float = 3600.0
    dedup_journal: str = ""
    drain_timeout: float = 30.0
    dedup_spill: bool = False
    single_process: bool = False
    parse_processes: int = 0
    max_line_bytes: int = MAX_LINE_BYTES
    run_id: str = field(default_factory=new_run_id)
    as_of_ms: int | None = None
    profile_interval: float = 3600.0
    segment_write_key: Secret | None = None
    segment_base_url: str = DEFAULT_SEGMENT_URL

    def __post_init__(self) -> None:
        if self.pipeline not in (*BATCH_BYTE_LIMITS, "profiles"):
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
        _ = self.mapping  # the identity options' own checks, named by their flags
        if self.schema_scope not in SCOPES:
            msg = f"--schema_scope must be one of {', '.join(SCOPES)}, got {self.schema_scope!r}"
            raise ValueError(msg)
        # The transforms' own checks, so each rule is written once; a message that starts
        # with a setting's name gets the flag's dashes.
        _as_flags(validate_collector, self.base_url, self.http_timeout, self.ca_bundle)
        _as_flags(
            validate_batching,
            # profiles posts users and companies, whose batches are held to the events limit
            "events" if self.pipeline == "profiles" else self.pipeline,
            self.batch_max_events,
            self.batch_max_bytes,
            self.gzip_level,
            self.max_in_flight,
        )
        for name in (
            "batch_max_delay",
            "dedup_ttl",
            "drain_timeout",
            "follow_interval",
            "profile_interval",
            "max_line_bytes",
        ):
            _as_flags(require_positive, name, getattr(self, name))
        if not 0 <= self.parse_processes <= _MAX_PARSE_PROCESSES:
            msg = (
                f"--parse_processes must be 0 to {_MAX_PARSE_PROCESSES}, got {self.parse_processes}"
            )
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
        if self.follow and self.kafka is not None:
            msg = "--follow watches files; it cannot be combined with --source kafka"
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
        self._check_profiles()

    def _check_profiles(self) -> None:
        """The profiles settings: only for ``profiles``, and coherent (issue 16)."""
        if self.pipeline != "profiles":
            if self.segment_write_key is not None or self.as_of_ms is not None:
                msg = "--segment_write_key and --as_of are options of moesif-beam profiles"
                raise ValueError(msg)
            return
        if self.as_of_ms is not None and self.streaming:
            msg = "--as_of fixes a bounded run's time; a stream's profiles follow event time"
            raise ValueError(msg)
        if self.segment_write_key is not None:
            if self.input_format == "segment":
                msg = (
                    "--format segment reads Segment calls; sending them back to Segment is refused"
                )
                raise ValueError(msg)
            if len(self.segment_write_key.reveal()) < MIN_SECRET_LENGTH:
                msg = (
                    f"the Segment write key is too short (under {MIN_SECRET_LENGTH} characters);"
                    " check --segment_write_key or SEGMENT_WRITE_KEY"
                )
                raise ValueError(msg)
            if not self.segment_base_url.startswith(("http://", "https://")):
                msg = (
                    "--segment_base_url must start with http:// or https://, "
                    f"got {self.segment_base_url!r}"
                )
                raise ValueError(msg)

    @property
    def mapping(self) -> MappingOptions:
        """The identity and header-masking options the input formats take."""
        return MappingOptions(
            user_id_field=self.user_id_field,
            company_id_field=self.company_id_field,
            session_token_field=self.session_token_field,
            user_id_jwt_claim=self.user_id_jwt_claim,
            mask_headers=self.mask_headers,
        )

    @property
    def dead_letter_dir(self) -> str:
        """The directory dead letters are written to."""
        return self.dead_letter or f"{self.output_dir.rstrip('/')}/dead_letter"

    @property
    def schema_store_path(self) -> str:
        """Where the metadata type schema is persisted."""
        return self.schema_store or f"{self.output_dir.rstrip('/')}/metadata_schema.json"

    @property
    def dedup_journal_dir(self) -> str:
        """Where a stream journals its delivered ids (``dedup_journal`` or its default).

        The default names the destination (batch files, or a hash of the collector's URL),
        so a run to batch files or another collector never makes a stream to Moesif drop
        ids it did not send there.
        """
        if self.dedup_journal:
            return self.dedup_journal
        if self.application_id is None:
            destination = "batch-files"
        else:
            digest = hashlib.sha256(self.base_url.encode("utf-8")).hexdigest()[:12]
            destination = f"collector-{digest}"
        return f"{self.output_dir.rstrip('/')}/.delivered-ids/{self.pipeline}-{destination}"

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
