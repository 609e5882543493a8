"""Deliver profiles: upserts to Moesif's users/companies batch endpoints, calls to Segment.

Both reuse the events sink's batching and writers (:mod:`moesif_beam.transforms.delivery`):
gzip batches, retries with backoff, ``Retry-After``, split on 413, bisect on 400, the
run-wide retry budget, no redirects, dead letters. Two things differ:

* Counters are prefixed with the output (``users_sent``, ``companies_retries``,
  ``segment_batches``...): the contract's ``sent`` counts input records, and a profile is
  not one.
* Segment's Tracking API takes ``{"batch": [...]}`` with HTTP basic auth (the write key as
  user name, no password), at most 32 KB per call and 500 KB per request. The write key is
  a :class:`~moesif_beam.transforms.delivery.Secret`, scrubbed from every detail.

Dead letters of deliveries (``too_large``, ``collector_rejected``, ``retries_exhausted``)
carry the upsert or call as their payload, ``pipeline`` ``profile-upserts``, and go to
``profile-upserts-<run>-*.avro``,
counted in ``upsert_dead_letters``, never in the input records' ``dead_letters``.
"""

from __future__ import annotations

import base64
import collections
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import orjson
from apache_beam import pvalue

from moesif_beam.transforms.common.counters import counter
from moesif_beam.transforms.common.errors import CollectorConfigError, require_positive
from moesif_beam.transforms.deadletters.letters import DEAD_LETTER, dead_letter
from moesif_beam.transforms.deadletters.streaming import _WriteDeadLettersFn
from moesif_beam.transforms.delivery.http import _FileWriter, _HttpWriter, _new_session, _Writer
from moesif_beam.transforms.delivery.policy import RetryPolicy
from moesif_beam.transforms.delivery.sinks import MAX_IN_FLIGHT, _BatchingFn
from moesif_beam.transforms.delivery.transport import (
    _USER_AGENT,
    Secret,
    batch_url,
    redirect_host,
)
from moesif_beam.transforms.records import Record

__all__ = [
    "LIMITS",
    "SEGMENT_BATCH_BYTES",
    "SEGMENT_CALL_BYTES",
    "UPSERT_PIPELINE",
    "DeliverProfiles",
    "WriteUpsertDeadLetters",
    "segment_url",
]

# The ``pipeline`` of deliveries' dead letters: they hold upserts and calls, not input
# records, so ``deadletters replay`` leaves them to a re-run of profiles.
UPSERT_PIPELINE = "profile-upserts"

# Segment's limits ("32 KB per call, 500 KB per batch"), read as 1,000-byte kilobytes.
SEGMENT_CALL_BYTES = 32_000
SEGMENT_BATCH_BYTES = 500_000
# The batch body's envelope around the calls: {"batch":[ ... ]}.
_ENVELOPE = (b'{"batch":', b"}")

# Largest request and item per output. Moesif documents no limit for users or companies;
# the events limits are the safe choice (reference: profiles-and-segment.md, section 1).
LIMITS = {
    "users": (50_000_000, 1_000_000),
    "companies": (50_000_000, 1_000_000),
    "segment": (SEGMENT_BATCH_BYTES - len(b"".join(_ENVELOPE)), SEGMENT_CALL_BYTES),
}


def segment_url(base_url: str) -> str:
    """Segment's batch endpoint under a base URL (``/v1`` suffix tolerated)."""
    return f"{base_url.rstrip('/').removesuffix('/v1')}/v1/batch"


class _SegmentWriter(_HttpWriter):
    """Posts ``{"batch": [...]}`` to Segment with basic auth; no compression."""

    def _session(self) -> Any:
        session = getattr(self._local, "session", None)
        if session is None:
            token = base64.b64encode(f"{self._application_id.reveal()}:".encode()).decode()
            session = (self._session_factory or _new_session)()
            session.headers.update(
                {
                    "Content-Type": "application/json",
                    "Authorization": f"Basic {token}",
                    "User-Agent": _USER_AGENT,
                }
            )
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _body(self, batch: Any) -> tuple[bytes, bytes]:
        plain = _ENVELOPE[0] + b"[" + b",".join(r.body for _, r in batch) + b"]" + _ENVELOPE[1]
        return plain, plain

    def _fatal_message(self, status: int | None, response: Any) -> str:
        """Segment's refusal, in one line that names Segment (never the write key)."""
        if status in (401, 403):
            why = "the Segment write key was refused; check --segment_write_key or "
            why += "SEGMENT_WRITE_KEY."
        elif status is not None and 300 <= status < 400:
            where = redirect_host(response.headers.get("Location"), self._url)
            why = f"a redirect to {where}; moesif-beam never follows redirects with the "
            why += "write key. Set --segment_base_url to Segment's own URL."
        elif status in (404, 405, 410, 501):
            why = "Segment has no such endpoint; check --segment_base_url."
        else:
            why = "Segment refused the request; check --segment_base_url and the write key."
        return self._scrub(
            f"{CollectorConfigError.SEGMENT_MARKER}: HTTP {status} from {self._url}: {why} "
            "The run stopped; undelivered profiles were not dead-lettered."
        )


class _CountingBatchingFn(_BatchingFn):
    """The sinks' batching DoFn, its counters renamed ``<prefix>_<name>``."""

    def __init__(self, prefix: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._prefix = prefix

    def _deliver(self, batch: Any) -> Any:
        fates, counts = super()._deliver(batch)
        renamed: collections.Counter[str] = collections.Counter()
        for name, n in counts.items():
            renamed[f"{self._prefix}_{name}"] += n
        return fates, renamed


class _EncodeFn(beam.DoFn):
    """Items to ``(id, Record)`` for the writers; an item over the limit is a dead letter."""

    def __init__(self, output: str, max_item_bytes: int) -> None:
        self._output = output
        self._max = max_item_bytes
        self._too_large = counter(f"{output}_too_large")

    def process(self, item: tuple[str, dict[str, Any], int]) -> Iterator[Any]:
        key, body_dict, time_ms = item
        body = orjson.dumps(body_dict)
        source = f"profiles:{self._output}:{key}"
        if len(body) > self._max:
            self._too_large.inc()
            detail = f"{self._output} item is {len(body):,} bytes; the limit is {self._max:,}"
            yield pvalue.TaggedOutput(
                DEAD_LETTER,
                dead_letter("too_large", "send", detail, body, source, UPSERT_PIPELINE),
            )
            return
        yield key, Record(time_ms, body, body, source)


class DeliverProfiles(beam.PTransform):
    """Deliver ``(key, item, time_ms)`` tuples to one output; return the dead letters.

    ``output`` is ``users`` or ``companies`` (Moesif's ``/v1/<output>/batch``, or batch files
    under ``directory`` without a ``secret``) or ``segment`` (Segment's ``/v1/batch``; a
    ``secret``, the write key, is required). Guarantees per batch are those of
    :class:`~moesif_beam.transforms.delivery.PostToMoesif`; every delivered item counts in
    ``<output>_sent``.
    """

    def __init__(
        self,
        output: str,
        *,
        base_url: str = "",
        secret: Secret | None = None,
        directory: str = "",
        max_events: int = 500,
        max_bytes: int | None = None,
        gzip_level: int = 6,
        policy: RetryPolicy | None = None,
        timeout: float = 30.0,
        max_in_flight: int = 1,
        ca_bundle: str | None = None,
    ) -> None:
        super().__init__()
        if output not in LIMITS:
            msg = f"output must be one of {sorted(LIMITS)}, got {output!r}"
            raise ValueError(msg)
        limit, self._max_item = LIMITS[output]
        max_bytes = limit if max_bytes is None else min(max_bytes, limit)
        if max_events < 1 or max_bytes < 1024:
            msg = f"batch limits too small: {max_events} items, {max_bytes} bytes"
            raise ValueError(msg)
        if not 1 <= max_in_flight <= MAX_IN_FLIGHT:
            msg = f"max_in_flight must be between 1 and {MAX_IN_FLIGHT}, got {max_in_flight}"
            raise ValueError(msg)
        require_positive("http_timeout", timeout)
        self._output = output
        writer: _Writer
        if output == "segment":
            if secret is None or not secret.reveal():
                msg = "a Segment write key is required to send to Segment"
                raise ValueError(msg)
            writer = _SegmentWriter(
                segment_url(base_url),
                secret,
                UPSERT_PIPELINE,
                gzip_level,
                policy or RetryPolicy(),
                timeout,
                ca_bundle=ca_bundle,
            )
        elif secret is not None:
            writer = _HttpWriter(
                batch_url(base_url, output),
                secret,
                UPSERT_PIPELINE,
                gzip_level,
                policy or RetryPolicy(),
                timeout,
                ca_bundle=ca_bundle,
            )
        else:
            if not directory:
                msg = "a directory is required to write batch files"
                raise ValueError(msg)
            writer = _FileWriter(directory, UPSERT_PIPELINE, gzip_level)
        self._fn = _CountingBatchingFn(
            output, writer, max_events, max_bytes, None, max_in_flight=max_in_flight
        )

    def expand(self, items: beam.PCollection) -> beam.PCollection:
        encoded = items | "Encode" >> beam.ParDo(
            _EncodeFn(self._output, self._max_item)
        ).with_outputs(DEAD_LETTER, main="records")
        sent = encoded.records | "Post" >> beam.ParDo(self._fn).with_outputs(
            DEAD_LETTER, main="sent"
        )
        return (encoded[DEAD_LETTER], sent[DEAD_LETTER]) | "Letters" >> beam.Flatten()


class _UpsertLettersFn(_WriteDeadLettersFn):
    """The stream's dead-letter writer, counting in ``upsert_dead_letters``."""

    def __init__(self, directory: str, run_id: str) -> None:
        super().__init__(directory, UPSERT_PIPELINE, run_id)
        self._dead_letters = counter("upsert_dead_letters")


class WriteUpsertDeadLetters(beam.PTransform):
    """Write the deliveries' dead letters as Avro, ``profile-upserts-<run_id>-*.avro``.

    One file per bundle with any (bounded and streaming alike), counted in
    ``upsert_dead_letters`` once written.
    """

    def __init__(self, directory: str, run_id: str) -> None:
        super().__init__()
        if not directory or not run_id:
            msg = "a dead-letter directory and a run id are required"
            raise ValueError(msg)
        self._fn = _UpsertLettersFn(directory, run_id)

    def expand(self, pcolls: Any) -> beam.PCollection:
        if isinstance(pcolls, tuple | list):
            pcolls = tuple(pcolls) | "Flatten" >> beam.Flatten()
        return pcolls | "WriteAvro" >> beam.ParDo(self._fn)
