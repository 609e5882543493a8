"""Deliver serialized Moesif records in batches: to the Collector API, or to batch files.

Both sinks cut batches by count and by bytes, build the body once (a JSON array of the
already-serialized records, gzip-compressed) and account for every record: it is sent,
or it leaves as a dead letter with its reason. The HTTP sink's retry decisions come from
one pure function, :func:`decide`.
"""

from __future__ import annotations

import collections
import contextlib
import email.utils
import enum
import gzip
import hashlib
import logging
import os
import random
import re
import secrets
import ssl
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import apache_beam as beam
import requests
from apache_beam import pvalue
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from moesif_beam import __version__
from moesif_beam.transforms.counters import counter
from moesif_beam.transforms.deadletter import ACK_FIELD, dead_letter
from moesif_beam.transforms.drain import check_drain_deadline, drain_sleep
from moesif_beam.transforms.errors import CollectorConfigError
from moesif_beam.transforms.offsets import compact_acks

__all__ = [
    "ACKS",
    "BATCH_BYTE_LIMITS",
    "MAX_IN_FLIGHT",
    "MIN_SECRET_LENGTH",
    "Action",
    "Decision",
    "PostToMoesif",
    "RetryPolicy",
    "Secret",
    "WriteBatchFiles",
    "as_item",
    "batch_url",
    "check_ca_bundle",
    "classify",
    "decide",
    "delivery_unknown",
    "encode_batch",
    "parse_retry_after",
    "preflight",
    "redirect_host",
    "tls_failure",
]

_LOG = logging.getLogger(__name__)

# Moesif's request limits per batch endpoint, whether or not the body is compressed.
BATCH_BYTE_LIMITS = {"events": 50_000_000, "actions": 15_000_000}

_USER_AGENT = f"moesif-beam/{__version__}"

# Tag of the output carrying delivered records' Kafka acknowledgement tokens.
ACKS = "acks"

# A record as the sinks see it: (record_json, raw_input, source, transaction_id, ack or None).
_Item = tuple[bytes, bytes, str, str, Any]


# The shortest application id accepted. A shorter secret is too easy to find in ordinary
# text: scrubbing it would mangle messages, and not scrubbing it would leak it.
MIN_SECRET_LENGTH = 8

# Characters that continue a token: the secret is scrubbed only where it is not part of a
# longer word, so an id "mark" never turns "marker" into "***er".
_WORD_CHARS = "A-Za-z0-9_-"


class Secret:
    """A string that never shows itself in reprs, logs, display data or error messages."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret, for the one place that must send it."""
        return self._value

    def scrub(self, text: str) -> str:
        """Replace every whole-token occurrence of the secret in ``text`` with ``***``.

        A whole token is one not preceded or followed by a letter, digit, ``_`` or ``-``.
        This is the one scrubber: the sink's error details and the CLI's failure report
        both use it.
        """
        if not self._value:
            return text
        pattern = rf"(?<![{_WORD_CHARS}]){re.escape(self._value)}(?![{_WORD_CHARS}])"
        return re.sub(pattern, "***", text)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


class Action(enum.Enum):
    """What to do with a batch after one attempt to post it."""

    DONE = "done"  # 2xx: delivered
    RETRY = "retry"  # transient: wait and post the same batch again
    SPLIT = "split"  # 413: too big for the collector; post halves
    BISECT = "bisect"  # 400-like: some record is bad; halve until it is isolated
    GIVE_UP = "give_up"  # transient, but the retry budget is spent: dead-letter the batch
    FATAL = "fatal"  # configuration problem (401/403/404...): stop the run


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`decide`: an action and, for RETRY, how long to wait first."""

    action: Action
    delay: float = 0.0


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter, inside a bounded total time per batch.

    Attributes:
        max_retry_seconds: total time one batch may spend being retried before its
            records become ``retries_exhausted`` dead letters.
        base_delay: the first wait, in seconds; each further wait doubles it.
        max_delay: the cap on one wait, before any Retry-After the collector asks for.
    """

    max_retry_seconds: float = 300.0
    base_delay: float = 0.5
    max_delay: float = 30.0

    def __post_init__(self) -> None:
        if self.max_retry_seconds < 0:
            msg = f"max_retry_seconds must be >= 0, got {self.max_retry_seconds}"
            raise ValueError(msg)
        if not 0 < self.base_delay <= self.max_delay:
            msg = f"need 0 < base_delay <= max_delay, got {self.base_delay}, {self.max_delay}"
            raise ValueError(msg)


def classify(status: int | None) -> Action:
    """Classify one HTTP outcome; ``None`` means no response (connection error, timeout).

    2xx is success. 408, 429, 5xx except 501, and no response are transient. 413 means
    the batch is too large. 400, 409 and 422 blame the body, so some record in it is bad.
    Everything else (401, 403, 404, 405, 501, redirects, ...) means the collector refuses
    our configuration, which no retry or dead letter can fix.
    """
    if status is None:
        return Action.RETRY
    if 200 <= status < 300:
        return Action.DONE
    if status in (408, 429) or (500 <= status < 600 and status != 501):
        return Action.RETRY
    if status == 413:
        return Action.SPLIT
    if status in (400, 409, 422):
        return Action.BISECT
    return Action.FATAL


def decide(
    status: int | None,
    attempt: int,
    elapsed: float,
    retry_after: float | None,
    policy: RetryPolicy,
    jitter: float,
) -> Decision:
    """Decide what follows one attempt to post a batch.

    Args:
        status: the HTTP status, or None when no response arrived.
        attempt: how many retries this batch has had so far (0 after the first post).
        elapsed: seconds since the batch's first post.
        retry_after: seconds the collector asked us to wait (``Retry-After``), if any.
        policy: the backoff policy.
        jitter: a number in [0, 1) that spreads the waits of concurrent workers.

    Returns:
        The action; for RETRY also the wait, which is never shorter than ``retry_after``.
        A retry that would end past ``policy.max_retry_seconds`` becomes GIVE_UP.
    """
    action = classify(status)
    if action is not Action.RETRY:
        return Decision(action)
    ceiling = min(policy.max_delay, policy.base_delay * 2**attempt)
    delay = ceiling * (0.5 + jitter / 2)  # "equal jitter": at least half the backoff
    if retry_after is not None:
        delay = max(delay, retry_after)
    if elapsed + delay > policy.max_retry_seconds:
        return Decision(Action.GIVE_UP)
    return Decision(Action.RETRY, delay)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Read a ``Retry-After`` header (delta seconds or an HTTP date) as seconds from ``now``."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def encode_batch(records: Sequence[bytes]) -> bytes:
    """Join serialized records into the JSON array a batch endpoint takes."""
    return b"[" + b",".join(records) + b"]"


def batch_url(base_url: str, kind: str) -> str:
    """The batch endpoint for ``kind`` under a collector base URL (``/v1`` suffix tolerated)."""
    base = base_url.rstrip("/")
    base = base.removesuffix("/v1")
    return f"{base}/v1/{kind}/batch"


def check_ca_bundle(path: str) -> None:
    """Refuse a ``--ca_bundle`` that is not a readable file of PEM certificates.

    Raises:
        ValueError: naming the path and what is wrong with it, in one line.
    """
    if not os.path.isfile(path):
        msg = f"--ca_bundle {path}: no such file"
        raise ValueError(msg)
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        msg = f"--ca_bundle {path}: not a readable PEM file of CA certificates ({exc})"
        raise ValueError(msg) from None


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).hostname or "?"


def redirect_host(location: str | None, url: str) -> str:
    """The host a redirect's ``Location`` points to (a relative one stays on ``url``'s host).

    Only the host is ever shown: a Location may carry anything, the id included.
    """
    if not location:
        return "(no Location header)"
    return _host(urllib.parse.urljoin(url, location.strip()))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: causes, contexts, urllib3's ``reason``, first arguments."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for inner in (
            current.__cause__,
            current.__context__,
            getattr(current, "reason", None),
            *current.args,
        ):
            if isinstance(inner, BaseException):
                pending.append(inner)


def tls_failure(exc: BaseException) -> bool:
    """Whether a request failed on TLS itself: a certificate, hostname or protocol problem.

    Those are configuration errors: retrying the same handshake gets the same answer. A TLS
    connection cut off mid-handshake (EOF, reset) is only a dropped connection, retried.
    """
    if not isinstance(exc, requests.exceptions.SSLError):
        return False
    return not any(
        isinstance(inner, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionResetError)
        for inner in _chain(exc)
    )


def delivery_unknown(exc: BaseException) -> bool:
    """Whether a request that got no answer may have been delivered all the same.

    A read timeout or a connection lost after the body went out leaves the outcome unknown
    (the collector may have stored the batch); a refused or timed-out connect does not.
    """
    if isinstance(exc, requests.exceptions.ConnectTimeout | requests.exceptions.SSLError):
        return False
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return True
    if isinstance(exc, requests.exceptions.ConnectionError):
        return not any(
            type(inner).__name__ in ("NewConnectionError", "NameResolutionError")
            for inner in _chain(exc)
        )
    return False


def _tls_message(url: str, exc: BaseException, application_id: Secret) -> str:
    reason = next(
        (str(inner) for inner in _chain(exc) if isinstance(inner, ssl.SSLError)), type(exc).__name__
    )
    return application_id.scrub(
        f"{CollectorConfigError.MARKER}: TLS failure talking to {_host(url)}: {reason[:200]}. "
        "Check --moesif_base_url, or trust a private CA with --ca_bundle PATH."
    )


def _redirect_message(url: str, status: int, location: str | None) -> str:
    return (
        f"{CollectorConfigError.MARKER}: HTTP {status} from {url}: a redirect to "
        f"{redirect_host(location, url)}; moesif-beam never follows redirects with the "
        "application id. Set --moesif_base_url to the collector's own URL."
    )


def preflight(
    base_url: str,
    application_id: Secret,
    timeout: float = 10.0,
    *,
    ca_bundle: str | None = None,
) -> None:
    """Check the application id against the collector before any data moves.

    ``GET /v1/config`` is the read Moesif's own SDKs make with the same header. A 401 or
    403, a redirect (never followed: it would carry the id to another host) or a TLS
    failure raises :class:`CollectorConfigError` so the run never starts; an unreachable
    collector only logs a warning, since the sink's retries may still get through.
    """
    url = f"{base_url.rstrip('/').removesuffix('/v1')}/v1/config"
    try:
        response = requests.get(
            url,
            headers={"X-Moesif-Application-Id": application_id.reveal(), "User-Agent": _USER_AGENT},
            timeout=timeout,
            allow_redirects=False,
            verify=ca_bundle or True,
        )
    except requests.RequestException as exc:
        if tls_failure(exc):
            raise CollectorConfigError(_tls_message(url, exc, application_id)) from None
        _LOG.warning("collector preflight: no answer from %s (%s)", url, type(exc).__name__)
        return
    if response.status_code in (401, 403):
        msg = (
            f"{CollectorConfigError.MARKER}: HTTP {response.status_code} from {url}: the Moesif "
            "application id was refused; check --moesif_application_id or "
            "MOESIF_APPLICATION_ID. Nothing was sent."
        )
        raise CollectorConfigError(msg)
    if 300 <= response.status_code < 400:
        location = response.headers.get("Location")
        raise CollectorConfigError(_redirect_message(url, response.status_code, location))


# What one delivered batch reports back: every record's fate, and the counts to add.
_Fates = list[tuple[_Item, dict[str, Any] | None]]
_Counts = collections.Counter[str]


class _Writer:
    """Delivers whole batches and reports every record's fate; opened once per worker.

    ``deliver`` may run on a background thread, where Beam's counters do not reach, so it
    touches no counter: it adds to the ``counts`` it is given, and the DoFn's thread adds
    those to the counters when it collects the batch.
    """

    def __init__(self, pipeline: str, gzip_level: int) -> None:
        self._pipeline = pipeline
        self._gzip_level = gzip_level

    def open(self) -> None:
        """Open clients; called from a DoFn's ``setup``."""

    def close(self) -> None:
        """Release clients; called from a DoFn's ``teardown``."""

    def deliver(self, batch: list[_Item], counts: _Counts) -> Iterator[tuple[_Item, Any]]:
        """Deliver one batch; yield each record with its dead letter, or None if sent."""
        raise NotImplementedError

    def _body(self, batch: Sequence[_Item]) -> tuple[bytes, bytes]:
        plain = encode_batch([item[0] for item in batch])
        # mtime=0 makes the gzip bytes a function of the content alone.
        return plain, gzip.compress(plain, compresslevel=self._gzip_level, mtime=0)

    def _delivered(
        self, batch: Sequence[_Item], body: bytes, counts: _Counts
    ) -> Iterator[tuple[_Item, None]]:
        counts["sent"] += len(batch)
        counts["batches"] += 1
        counts["bytes_sent"] += len(body)
        for item in batch:
            yield item, None

    def _letter(self, reason: str, detail: str, item: _Item) -> dict[str, Any]:
        _, raw, source, transaction_id, ack = item
        letter = dead_letter(
            reason, "send", detail, raw, source, self._pipeline, transaction_id=transaction_id
        )
        if ack is not None:
            letter[ACK_FIELD] = ack
        return letter


class _Breaker:
    """How long the collector has been failing without a break, for all batches of a run.

    Every transient failure (no answer, 408, 429, 5xx) starts or extends the failure; any
    answer that shows the collector working (2xx, 400, 413) ends it. A batch's retry time
    is measured as the longer of its own time and the failure's, so once the collector has
    failed for ``--max_retry_seconds`` without a break, each further batch gets one attempt
    and, if that fails too, gives up at once instead of spending the budget again. Shared
    by every copy of one run's writer in a process (see :func:`_shared_breaker`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failing_since: float | None = None
        self._announced = False

    def failed(self, now: float) -> float:
        """Record a transient failure; return for how long the collector has been failing."""
        with self._lock:
            if self._failing_since is None:
                self._failing_since = now
            return now - self._failing_since

    def succeeded(self) -> None:
        """Record an answer that shows the collector working: the failure is over."""
        with self._lock:
            self._failing_since = None
            self._announced = False

    def failing_for(self, now: float) -> float:
        """For how long the collector has been failing without a break (0 if it is not)."""
        with self._lock:
            return 0.0 if self._failing_since is None else now - self._failing_since

    def announce(self) -> bool:
        """True once per failure: whether to log that the breaker opened."""
        with self._lock:
            first, self._announced = not self._announced, True
            return first


_BREAKERS: weakref.WeakValueDictionary[str, _Breaker] = weakref.WeakValueDictionary()
_BREAKERS_LOCK = threading.Lock()


def _shared_breaker(key: str) -> _Breaker:
    """The breaker of one run's writer in this process: its copies share it, runs do not."""
    with _BREAKERS_LOCK:
        breaker = _BREAKERS.get(key)
        if breaker is None:
            breaker = _Breaker()
            _BREAKERS[key] = breaker
        return breaker


def _new_session() -> requests.Session:
    session = requests.Session()
    # Our own retry policy decides; urllib3's must not retry behind its back.
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@dataclass(frozen=True)
class _Outcome:
    """What came of posting one body: the action, the status, and a scrubbed detail.

    For FATAL, ``detail`` is the whole one-line message the run stops with.
    """

    action: Action
    status: int | None
    detail: str


class _HttpWriter(_Writer):
    """Posts batches to one collector URL, with retries bounded per batch and per run.

    ``clock``, ``wall_clock``, ``sleep`` and ``session_factory`` are there for tests: a
    fake clock and session make the retry, give-up and breaker paths testable without a
    server or real waiting.
    """

    def __init__(
        self,
        url: str,
        application_id: Secret,
        pipeline: str,
        gzip_level: int,
        policy: RetryPolicy,
        timeout: float,
        *,
        ca_bundle: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = drain_sleep,
        session_factory: Callable[[], Any] = _new_session,
    ) -> None:
        super().__init__(pipeline, gzip_level)
        self._url = url
        self._application_id = application_id
        self._policy = policy
        self._timeout = timeout
        self._verify: str | bool = ca_bundle or True
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._session_factory = session_factory
        # Made once, where the pipeline is built, and pickled into every copy of this
        # writer: the copies in one process share a breaker, other runs' writers do not.
        self._breaker_key = f"{url} {secrets.token_hex(8)}"

    def open(self) -> None:
        # One session per delivering thread: requests does not promise that a Session is
        # safe to share between threads.
        self._local = threading.local()
        self._sessions: list[Any] = []
        self._lock = threading.Lock()
        self._rng = random.Random()
        self._breaker = _shared_breaker(self._breaker_key)

    def _session(self) -> Any:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._session_factory()
            session.headers.update(
                {
                    "Content-Type": "application/json",
                    "Content-Encoding": "gzip",
                    "X-Moesif-Application-Id": self._application_id.reveal(),
                    "User-Agent": _USER_AGENT,
                }
            )
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    def deliver(self, batch: list[_Item], counts: _Counts) -> Iterator[tuple[_Item, Any]]:
        pending = [batch]
        while pending:
            part = pending.pop()
            _, body = self._body(part)
            outcome = self._post(body, counts)
            action, status, detail = outcome.action, outcome.status, outcome.detail
            if action is Action.DONE:
                yield from self._delivered(part, body, counts)
            elif action in (Action.SPLIT, Action.BISECT) and len(part) > 1:
                middle = len(part) // 2
                pending.append(part[middle:])
                pending.append(part[:middle])  # popped first: keep the original order
            elif action is Action.SPLIT:
                counts["too_large"] += 1
                yield part[0], self._letter("too_large", f"HTTP {status}: {detail}", part[0])
            elif action is Action.BISECT:
                counts["collector_rejected"] += 1
                letter = self._letter("collector_rejected", f"HTTP {status}: {detail}", part[0])
                yield part[0], letter
            elif action is Action.GIVE_UP:
                counts["retries_exhausted"] += len(part)
                for item in part:
                    yield item, self._letter("retries_exhausted", detail, item)
            else:
                raise CollectorConfigError(detail)

    def _post(self, body: bytes, counts: _Counts) -> _Outcome:
        start = self._clock()
        session = self._session()
        attempt = 0
        unknown = False  # some attempt may have been stored without our hearing of it
        while True:
            status: int | None = None
            retry_after = None
            response: Any = None
            try:
                response = session.post(
                    self._url,
                    data=body,
                    timeout=self._timeout,
                    allow_redirects=False,
                    verify=self._verify,
                )
                status = response.status_code
                retry_after = parse_retry_after(
                    response.headers.get("Retry-After"), self._wall_clock()
                )
                detail = self._scrub(response.text[:500])
            except requests.RequestException as exc:
                if tls_failure(exc):
                    return _Outcome(
                        Action.FATAL, None, _tls_message(self._url, exc, self._application_id)
                    )
                if isinstance(exc, requests.exceptions.ReadTimeout):
                    counts["timeouts"] += 1
                unknown = unknown or delivery_unknown(exc)
                detail = self._scrub(f"{type(exc).__name__}: {exc}"[:500])
            now = self._clock()
            if classify(status) is Action.RETRY:
                failing_for = self._breaker.failed(now)
            else:
                if status is not None and classify(status) is not Action.FATAL:
                    self._breaker.succeeded()
                failing_for = 0.0
            elapsed = now - start
            jitter = self._rng.random()
            # The run-wide bound: a collector failing for the whole budget already leaves a
            # new batch no time to retry.
            spent = max(elapsed, failing_for)
            decision = decide(status, attempt, spent, retry_after, self._policy, jitter)
            if decision.action is Action.RETRY:
                # A drain's time is up before the retry: give up on the batch without a
                # fate (no ack, no dead letter), so its records are read again on restart.
                check_drain_deadline(decision.delay)
                counts["retries"] += 1
                _LOG.warning(
                    "collector: %s; retry %d in %.1fs",
                    f"HTTP {status}" if status else detail,
                    attempt + 1,
                    decision.delay,
                )
                self._sleep(decision.delay)
                attempt += 1
                continue
            if decision.action is Action.GIVE_UP:
                detail = self._give_up_detail(status, detail, attempt, elapsed, failing_for)
                detail += _UNKNOWN if unknown else ""
            elif decision.action is Action.FATAL:
                detail = self._fatal_message(status, response)
            return _Outcome(decision.action, status, detail)

    def _give_up_detail(
        self, status: int | None, detail: str, attempt: int, elapsed: float, failing_for: float
    ) -> str:
        last = f"HTTP {status}" if status else detail
        text = f"gave up after {attempt + 1} attempts in {elapsed:.1f}s; last: {last}"
        budget = self._policy.max_retry_seconds
        if failing_for > elapsed:
            text += (
                f"; the collector has failed without a break for {failing_for:.1f}s of the "
                f"run's retry budget (--max_retry_seconds {budget:g})"
            )
            if failing_for >= budget and self._breaker.announce():
                _LOG.warning(
                    "collector: failing without a break for %.0fs; until it answers again, "
                    "each batch gets one attempt before it is dead-lettered",
                    failing_for,
                )
        return text

    def _fatal_message(self, status: int | None, response: Any) -> str:
        if status is not None and 300 <= status < 400:
            return _redirect_message(self._url, status, response.headers.get("Location"))
        return (
            f"{CollectorConfigError.MARKER}: HTTP {status} from {self._url}: "
            f"{_explain(status)} The run stopped; undelivered records were not "
            "dead-lettered, so a re-run after fixing the configuration loses nothing."
        )

    def _scrub(self, text: str) -> str:
        return self._application_id.scrub(text)


# Added to a retries_exhausted dead letter's detail when an attempt got no answer after
# its body was sent.
_UNKNOWN = (
    "; delivery unknown: a request got no answer after its body was sent, so the collector "
    "may have stored these records (a replay with the same transaction_id is harmless)"
)


def _explain(status: int | None) -> str:
    if status in (401, 403):
        return "the Moesif application id was refused; check --moesif_application_id."
    if status == 402:
        return "the Moesif subscription is inactive."
    if status in (404, 405, 410, 501):
        return "the collector has no such endpoint; check --moesif_base_url."
    return "the collector refused the request; check --moesif_base_url and the application id."


class _FileWriter(_Writer):
    def __init__(self, directory: str, pipeline: str, gzip_level: int) -> None:
        super().__init__(pipeline, gzip_level)
        self._directory = directory

    def open(self) -> None:
        # mkdirs refuses a directory that exists, which is fine here.
        with contextlib.suppress(OSError):
            FileSystems.mkdirs(self._directory)

    def deliver(self, batch: list[_Item], counts: _Counts) -> Iterator[tuple[_Item, Any]]:
        plain, body = self._body(batch)
        # Named by content: a retried bundle rewrites the same file instead of adding one.
        name = f"batch-{hashlib.sha256(plain).hexdigest()[:24]}.json.gz"
        path = FileSystems.join(self._directory, name)
        with FileSystems.create(
            path, mime_type="application/gzip", compression_type=CompressionTypes.UNCOMPRESSED
        ) as handle:
            handle.write(body)
        yield from self._delivered(batch, body, counts)


def as_item(element: tuple[str, tuple]) -> _Item:
    """A keyed record ``(transaction_id, (time_ms, body, raw, source, ...))`` as a sink item."""
    transaction_id, value = element
    return value[1], value[2], value[3], transaction_id, value[5] if len(value) > 5 else None


class _BatchingFn(beam.DoFn):
    """Cuts records into batches by count and bytes and has a writer deliver them.

    A batch is cut when it is full, when its oldest record has waited ``max_delay``
    seconds (if set), and at the end of every bundle, so nothing waits on a timer: bounded
    runs get full batches from their large bundles, streams get batches within a bundle's
    length. The main output is the dead letters; with ``acks``, delivered records'
    acknowledgement tokens go to the ``acks`` output.

    Up to ``max_in_flight`` batches are compressed and delivered on background threads
    while this thread goes on batching (zlib and sockets release the GIL, so this uses a
    second core and overlaps the collector's own time). A bundle finishes only once every
    batch cut in it has an outcome, and every output and counter is emitted from this
    thread, oldest batch first, so a bundle's outputs mean what they meant before.
    """

    def __init__(
        self,
        writer: _Writer,
        max_events: int,
        max_bytes: int,
        max_delay: float | None = None,
        *,
        acks: bool = False,
        max_in_flight: int = 1,
    ) -> None:
        self._writer = writer
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._max_delay = max_delay
        self._acks = acks
        self._max_in_flight = max_in_flight
        self._batch: list[_Item] = []
        self._size = 2
        self._oldest = 0.0
        self._in_flight: collections.deque[Future] = collections.deque()

    def setup(self) -> None:
        self._writer.open()
        self._counters: dict[str, Any] = {}
        self._pool: ThreadPoolExecutor | None = None
        if self._max_in_flight > 1:
            self._pool = ThreadPoolExecutor(self._max_in_flight, thread_name_prefix="deliver")

    def teardown(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self._writer.close()

    def start_bundle(self) -> None:
        self._batch = []
        self._size = 2  # the brackets of the JSON array
        self._in_flight = collections.deque()
        self._done_acks: list[tuple] = []

    def process(self, element: tuple[str, tuple]) -> Iterator[Any]:
        item = as_item(element)
        size = len(item[0]) + 1  # the record and its comma
        if self._batch and (
            len(self._batch) >= self._max_events or self._size + size > self._max_bytes
        ):
            yield from self._flush()
        if not self._batch:
            self._oldest = time.monotonic()
        self._batch.append(item)
        self._size += size
        if self._max_delay is not None and time.monotonic() - self._oldest >= self._max_delay:
            yield from self._flush()
        elif self._in_flight and self._in_flight[0].done():
            yield from self._collect(self._max_in_flight)

    def finish_bundle(self) -> Iterator[Any]:
        window = GlobalWindow()
        outputs = [*self._flush(), *self._collect(0)]
        # A bundle's delivered records are runs of consecutive offsets: a few tokens say
        # the same as one per record, and the commit stage has that much less to shuffle.
        # Emitted here, after every batch of the bundle got its 2xx.
        outputs += [pvalue.TaggedOutput(ACKS, ack) for ack in compact_acks(self._done_acks)]
        self._done_acks = []
        for output in outputs:
            if isinstance(output, pvalue.TaggedOutput):
                yield pvalue.TaggedOutput(
                    output.tag, WindowedValue(output.value, window.max_timestamp(), (window,))
                )
            else:
                yield WindowedValue(output, window.max_timestamp(), (window,))

    def _flush(self) -> Iterator[Any]:
        batch, self._batch, self._size = self._batch, [], 2
        if not batch:
            return
        if self._pool is None:
            done: Future = Future()
            done.set_result(self._deliver(batch))
            self._in_flight.append(done)
        else:
            self._in_flight.append(self._pool.submit(self._deliver, batch))
        yield from self._collect(self._max_in_flight)

    def _deliver(self, batch: list[_Item]) -> tuple[_Fates, _Counts]:
        counts: _Counts = collections.Counter()
        return list(self._writer.deliver(batch, counts)), counts

    def _collect(self, limit: int) -> Iterator[Any]:
        """Emit the outcomes of finished batches, oldest first; wait while over ``limit``."""
        while self._in_flight and (len(self._in_flight) > limit or self._in_flight[0].done()):
            try:
                fates, counts = self._in_flight.popleft().result()
            except BaseException:
                # The bundle fails (a refused application id, say); batches still queued
                # are not posted, and the runner decides what is retried.
                for pending in self._in_flight:
                    pending.cancel()
                self._in_flight.clear()
                raise
            for name, n in counts.items():
                if name not in self._counters:
                    self._counters[name] = counter(name)
                self._counters[name].inc(n)
            for item, letter in fates:
                if letter is not None:
                    yield letter
                elif self._acks and item[4] is not None:
                    self._done_acks.append(item[4])


# Each batch in flight holds up to max_bytes twice (JSON and gzip); more than a few buys
# nothing on one worker, since posting is not where the time goes.
MAX_IN_FLIGHT = 8


def _validate_batching(
    kind: str, max_events: int, max_bytes: int, gzip_level: int, max_in_flight: int
) -> None:
    if kind not in BATCH_BYTE_LIMITS:
        msg = f"kind must be one of {sorted(BATCH_BYTE_LIMITS)}, got {kind!r}"
        raise ValueError(msg)
    if max_events < 1:
        msg = f"batch_max_events must be >= 1, got {max_events}"
        raise ValueError(msg)
    limit = BATCH_BYTE_LIMITS[kind]
    # A record larger than max_bytes still goes out, alone; the per-record limit upstream
    # keeps that within Moesif's batch limit.
    if not 1024 <= max_bytes <= limit:
        msg = f"batch_max_bytes for {kind} must be in 1024..{limit}, got {max_bytes}"
        raise ValueError(msg)
    if not 0 <= gzip_level <= 9:
        msg = f"gzip_level must be in 0..9, got {gzip_level}"
        raise ValueError(msg)
    if not 1 <= max_in_flight <= MAX_IN_FLIGHT:
        msg = f"max_in_flight must be in 1..{MAX_IN_FLIGHT}, got {max_in_flight}"
        raise ValueError(msg)


class _BatchSink(beam.PTransform):
    """What both sinks share: a writer, batch limits, and the batching DoFn built on them."""

    _writer: _Writer
    _max_events: int
    _max_bytes: int
    _max_in_flight: int

    def _batching(self, max_delay: float | None = None, *, acks: bool = False) -> _BatchingFn:
        return _BatchingFn(
            self._writer,
            self._max_events,
            self._max_bytes,
            max_delay,
            acks=acks,
            max_in_flight=self._max_in_flight,
        )

    def in_stream(self, max_delay: float) -> beam.ParDo:
        """The same delivery for a stream: dead letters, plus acks of delivered records."""
        fn = self._batching(max_delay, acks=True)
        return beam.ParDo(fn).with_outputs(ACKS, main="dead_letters")


class PostToMoesif(_BatchSink):
    """Post records to ``/v1/<kind>/batch`` in gzip batches; output the dead letters.

    Input: ``(transaction_id, (time_ms, record_json, raw, source, ...))``. Batches hold at most
    ``max_events`` records and ``max_bytes`` bytes of JSON (uncompressed, so Moesif's limit
    holds however the body compresses). Guarantees, per batch:

    * 2xx: every record counts as ``sent``.
    * 408, 429, 5xx except 501, no response: retried with capped exponential backoff and
      jitter, honouring ``Retry-After``, for at most ``policy.max_retry_seconds``; then
      each record is a ``retries_exhausted`` dead letter.
    * 413: the batch is split in halves; a single record refused for size is ``too_large``.
    * 400: the batch is bisected until the refused records are isolated, each a
      ``collector_rejected`` dead letter with the collector's message; the rest is sent.
    * 401, 403, redirects (never followed), TLS failures and other configuration errors:
      the run stops with :class:`CollectorConfigError`, and nothing is dead-lettered.

    The retry time is bounded for the whole run too: once the collector has failed for
    ``policy.max_retry_seconds`` without a break, each further batch gets one attempt
    before its records are dead-lettered, until the collector answers again. ``ca_bundle``
    is a PEM file of CAs to trust instead of the system's.

    Delivery is at least once: a retried bundle posts again, with the same transaction
    ids, which Moesif deduplicates.
    """

    def __init__(
        self,
        kind: str,
        base_url: str,
        application_id: Secret,
        pipeline: str,
        *,
        max_events: int = 500,
        max_bytes: int = 5_000_000,
        gzip_level: int = 6,
        policy: RetryPolicy | None = None,
        timeout: float = 30.0,
        max_in_flight: int = 2,
        ca_bundle: str | None = None,
    ) -> None:
        super().__init__()
        _validate_batching(kind, max_events, max_bytes, gzip_level, max_in_flight)
        if not base_url.startswith(("http://", "https://")):
            msg = f"moesif_base_url must start with http:// or https://, got {base_url!r}"
            raise ValueError(msg)
        if not isinstance(application_id, Secret) or not application_id.reveal():
            msg = "a Moesif application id is required to post to the collector"
            raise ValueError(msg)
        if timeout <= 0:
            msg = f"timeout must be > 0, got {timeout}"
            raise ValueError(msg)
        if ca_bundle is not None:
            check_ca_bundle(ca_bundle)
        self._writer: _Writer = _HttpWriter(
            batch_url(base_url, kind),
            application_id,
            pipeline,
            gzip_level,
            policy or RetryPolicy(),
            timeout,
            ca_bundle=ca_bundle,
        )
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._max_in_flight = max_in_flight

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        return records | "PostBatches" >> beam.ParDo(self._batching())


class WriteBatchFiles(_BatchSink):
    """Write each batch body, exactly the gzip bytes that would be posted, to a file.

    Files are ``<directory>/batch-<content hash>.json.gz``; ``zcat`` shows the JSON array.
    Used when no application id is configured. Outputs no dead letters (an unwritable
    directory fails the run), but returns an empty PCollection so callers wire it alike.
    """

    def __init__(
        self,
        kind: str,
        directory: str,
        *,
        max_events: int = 500,
        max_bytes: int = 5_000_000,
        gzip_level: int = 6,
        max_in_flight: int = 2,
    ) -> None:
        super().__init__()
        _validate_batching(kind, max_events, max_bytes, gzip_level, max_in_flight)
        if not directory:
            msg = "an output directory is required"
            raise ValueError(msg)
        self._writer: _Writer = _FileWriter(directory, kind, gzip_level)
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._max_in_flight = max_in_flight

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        return records | "WriteBatches" >> beam.ParDo(self._batching())
