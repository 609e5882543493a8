"""The emulator's settings (:class:`CollectorConfig`), its limits and record kinds."""

from __future__ import annotations

import dataclasses
from typing import Final

#: Record kinds, in the order they are reported.
KINDS: Final = ("events", "actions", "users", "companies", "subscriptions")
#: Largest request body, compressed or decompressed, on every route but ``/v1/actions/batch``.
BODY_LIMIT_BYTES: Final = 50_000_000
#: Largest ``/v1/actions/batch`` body, compressed or decompressed (15 MB since Nov 2024).
ACTIONS_BATCH_LIMIT_BYTES: Final = 15_000_000
#: Largest single event or action, measured as compact UTF-8 JSON.
ITEM_LIMIT_BYTES: Final = 1_000_000

# CollectorConfig.metadata_types: refuse type changes, or only convert dots in keys.
_METADATA_MODES: Final = ("enforce", "off")
# CollectorConfig.validation: check every item's fields, or only the body's shape.
_VALIDATION_MODES: Final = ("full", "off")
# Kinds stored as upserts, and the field that identifies each record of them.
_PROFILE_KEYS: Final = {
    "users": "user_id",
    "companies": "company_id",
    "subscriptions": "subscription_id",
}


@dataclasses.dataclass(frozen=True)
class CollectorConfig:
    """Settings of one emulator instance; validated on construction.

    Attributes:
        host: Interface to listen on.
        port: TCP port; 0 picks a free one (read it back from ``RunningCollector.url``).
        data_dir: Directory for ``collector.db`` (created with its parents); None keeps the
            data in memory.
        application_id: When set, the only ``X-Moesif-Application-Id`` accepted; when None, any
            non-empty id is. Never shown in ``repr``.
        fail_rate: Probability that an ingestion POST fails with ``fail_status``.
        fail_status: Status of injected failures (400-599).
        fail_first: The first N ingestion POSTs that are not dropped fail, deterministically.
        retry_after: Seconds sent in ``Retry-After`` on injected 429 and 503 answers.
        latency_ms: Delay added before an ingestion POST is handled. The request is still
            handled (and stored) after the delay, even if the client has given up by then:
            that is how a client timeout turns into a redelivery for dedup to absorb.
        latency_first: When > 0, only the first N ingestion POSTs are delayed; 0 delays all.
        drop_connection_rate: Probability that an ingestion POST's connection is closed with
            no answer at all.
        drop_first: The first N ingestion POSTs have their connection dropped.
        seed: Seed of the random generator behind the fault rates (None: unpredictable).
        store: ``"sqlite"`` keeps every record; ``"count"`` validates, deduplicates in memory
            and counts, keeping no bodies (the fast mode for benchmarks).
        reject_older_than_days: When set, events and actions whose ``request.time`` is older
            are rejected with 400, as Moesif does past 30 days without backfill.
        metadata_types: ``"enforce"`` refuses event and action metadata that sends a key with
            another JSON type than the first one seen (see the package docstring); ``"off"``
            checks no types and learns none, but still converts dots in keys.
        validation: ``"full"`` checks every item's fields (the 400s above); ``"off"`` only
            requires the body to parse into items of the right shape (the fast count-only
            mode for benchmarks, so the collector costs the clients it compares little).
        redirect_to: When set, every ``/v1`` request (the config read and ingestion alike)
            is answered ``307`` with ``Location: <redirect_to><path>``, before any auth,
            as a hostile or misconfigured proxy would: a client must not follow it.
        tls_cert: PEM certificate chain to serve HTTPS with (``tls_key`` required too);
            ``RunningCollector.url`` then starts with ``https://``.
        tls_key: PEM private key of ``tls_cert``.
        arrival_lags: Keep each accepted event's and action's lag behind its
            ``request.time`` for ``arrival_lag_ms`` in the stats (the streaming benchmark's
            latency). ``False`` skips parsing the times (about 0.8 µs an event), for
            benchmarks that do not read them; the stats then report a count of 0.
    """

    host: str = "127.0.0.1"
    port: int = 0
    data_dir: str | None = None
    application_id: str | None = dataclasses.field(default=None, repr=False)
    fail_rate: float = 0.0
    fail_status: int = 503
    fail_first: int = 0
    retry_after: float | None = None
    latency_ms: int = 0
    latency_first: int = 0
    drop_connection_rate: float = 0.0
    drop_first: int = 0
    seed: int | None = None
    store: str = "sqlite"
    reject_older_than_days: int | None = None
    metadata_types: str = "enforce"
    validation: str = "full"
    redirect_to: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    arrival_lags: bool = True

    def __post_init__(self) -> None:
        if not self.host:
            msg = "host must be a non-empty host name or address"
            raise ValueError(msg)
        if not 0 <= self.port <= 65535:
            msg = f"port must be in 0..65535 (0 picks a free port), got {self.port}"
            raise ValueError(msg)
        if self.application_id is not None and not self.application_id.strip():
            # The value itself is a secret, so the message never contains it.
            msg = "application_id must be non-empty when set (None accepts any id)"
            raise ValueError(msg)
        for name in ("fail_rate", "drop_connection_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                msg = f"{name} must be in [0, 1], got {rate}"
                raise ValueError(msg)
        if not 400 <= self.fail_status <= 599:
            msg = f"fail_status must be an HTTP error status in 400..599, got {self.fail_status}"
            raise ValueError(msg)
        for name in ("fail_first", "drop_first", "latency_ms", "latency_first"):
            value = getattr(self, name)
            if value < 0:
                msg = f"{name} must be >= 0, got {value}"
                raise ValueError(msg)
        if self.retry_after is not None and self.retry_after < 0:
            msg = f"retry_after must be >= 0 seconds, got {self.retry_after}"
            raise ValueError(msg)
        if self.store not in ("sqlite", "count"):
            msg = f"store must be 'sqlite' or 'count', got {self.store!r}"
            raise ValueError(msg)
        if self.reject_older_than_days is not None and self.reject_older_than_days < 1:
            msg = f"reject_older_than_days must be >= 1, got {self.reject_older_than_days}"
            raise ValueError(msg)
        if self.metadata_types not in _METADATA_MODES:
            msg = f"metadata_types must be 'enforce' or 'off', got {self.metadata_types!r}"
            raise ValueError(msg)
        if self.validation not in _VALIDATION_MODES:
            msg = f"validation must be 'full' or 'off', got {self.validation!r}"
            raise ValueError(msg)
        if self.redirect_to is not None and not self.redirect_to.startswith(
            ("http://", "https://")
        ):
            msg = f"redirect_to must be an http(s) URL, got {self.redirect_to!r}"
            raise ValueError(msg)
        if (self.tls_cert is None) != (self.tls_key is None):
            msg = "tls_cert and tls_key go together"
            raise ValueError(msg)
