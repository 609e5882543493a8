"""Injected faults: latency, dropped connections and error statuses; redirects; TLS.

Faults apply to ingestion POSTs only, in this order: latency, then a dropped connection, then
a failure. A faulted request stores nothing.
"""

from __future__ import annotations

import random
import ssl
import threading
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from moesif_beam.runners.emulators.collector.config import CollectorConfig


_Fault = Literal["drop", "fail"]


class _FaultSchedule:
    """Which ingestion POSTs are delayed, dropped or failed, and how many were; thread-safe.

    Deterministic (``latency_first``, ``drop_first``, ``fail_first``) or random with
    ``seed``. A new schedule starts over, so a reset emulator behaves like a fresh one.
    """

    def __init__(self, config: CollectorConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._latency_candidates = 0
        self._drop_candidates = 0
        self._fail_candidates = 0
        self._dropped = 0
        self._failed = 0
        self._rng = random.Random(config.seed)

    def next_latency(self) -> float:
        """Seconds to delay the next ingestion POST (latency_ms, within latency_first)."""
        config = self.config
        if not config.latency_ms:
            return 0.0
        with self._lock:
            self._latency_candidates += 1
            if config.latency_first and self._latency_candidates > config.latency_first:
                return 0.0
        return config.latency_ms / 1000

    def next_fault(self) -> _Fault | None:
        """Decides the fault for the next ingestion POST: drop first, then fail."""
        config = self.config
        with self._lock:
            self._drop_candidates += 1
            if self._drop_candidates <= config.drop_first or (
                config.drop_connection_rate > 0 and self._rng.random() < config.drop_connection_rate
            ):
                self._dropped += 1
                return "drop"
            # fail_first counts the requests that got this far, so drop_first=1, fail_first=1
            # gives: dropped, failed, accepted.
            self._fail_candidates += 1
            if self._fail_candidates <= config.fail_first or (
                config.fail_rate > 0 and self._rng.random() < config.fail_rate
            ):
                self._failed += 1
                return "fail"
        return None

    def counts(self) -> dict[str, int]:
        """``dropped`` and ``failed``: the requests faulted so far."""
        with self._lock:
            return {"dropped": self._dropped, "failed": self._failed}


def _fault_answer(config: CollectorConfig) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, body and headers of an injected failure (``Retry-After`` on 429 and 503)."""
    headers: dict[str, str] = {}
    if config.retry_after is not None and config.fail_status in (429, 503):
        headers["Retry-After"] = _format_seconds(config.retry_after)
    return (
        config.fail_status,
        {"error": f"injected fault: {_status_phrase(config.fail_status)}"},
        headers,
    )


def _redirect_location(config: CollectorConfig, path: str) -> str | None:
    """Where ``redirect_to`` sends a ``/v1`` request, or None when it is not redirected."""
    if config.redirect_to is None or not path.startswith("/v1/"):
        return None
    return config.redirect_to.rstrip("/") + path


def _tls_context(config: CollectorConfig) -> ssl.SSLContext | None:
    """The server's TLS context with ``tls_cert`` and ``tls_key``, or None to serve HTTP."""
    if config.tls_cert is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


def _format_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


def _status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return f"status {status}"
