"""Writers that deliver one whole batch: to the Collector API over HTTP, or to a file.

Each reports every record's fate (sent, or a dead letter with its reason) and never
touches Beam counters itself: it may run on a background thread.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import hashlib
import logging
import random
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import requests
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from isal import igzip

from moesif_beam.transforms.common.errors import CollectorConfigError
from moesif_beam.transforms.common.live import observe_post
from moesif_beam.transforms.deadletters.letters import ACK_FIELD, dead_letter
from moesif_beam.transforms.delivery.direct import DirectSession, goes_direct
from moesif_beam.transforms.delivery.policy import (
    Action,
    RetryPolicy,
    classify,
    decide,
    parse_retry_after,
)
from moesif_beam.transforms.delivery.transport import (
    _USER_AGENT,
    Secret,
    _redirect_message,
    _tls_message,
    delivery_unknown,
    tls_failure,
)
from moesif_beam.transforms.records import Keyed
from moesif_beam.transforms.sources.drain import check_drain_deadline, drain_sleep
from moesif_beam.transforms.sources.readback import original_bytes

__all__ = ["encode_batch", "gzip_body"]

_LOG = logging.getLogger(__name__)


# A record as the sinks see it: (record_json, raw_input, source, transaction_id, ack or None).
# A record as the writers see it: ``(transaction_id, Record)``.
_Item = Keyed


def encode_batch(records: Sequence[bytes]) -> bytes:
    """Join serialized records into the JSON array a batch endpoint takes."""
    return b"[" + b",".join(records) + b"]"


# Levels compressed by ISA-L's igzip (its levels 1 to 3); 0 and 4 to 9 by zlib.
_ISAL_LEVELS = range(1, 4)


def gzip_body(plain: bytes, level: int) -> bytes:
    """``plain`` as one gzip member, a function of the content alone (mtime 0).

    Levels 1 to 3 use ISA-L's igzip (the ``isal`` package) at that level; 0 (stored) and 4
    to 9 use zlib. Any gzip reader reads both. Measured on batches of 500 WSO2 events (1.4 KB
    of JSON each), CPU per event and bytes sent per event: igzip 2 1.5 µs and 182 bytes,
    zlib 3 7.3 µs and 171 bytes, zlib 6 13.8 µs and 134 bytes (docs/performance.md).
    """
    if level in _ISAL_LEVELS:
        return igzip.compress(plain, level, mtime=0)
    return gzip.compress(plain, compresslevel=level, mtime=0)


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
        plain = encode_batch([record.body for _, record in batch])
        return plain, gzip_body(plain, self._gzip_level)

    def _delivered(
        self, batch: Sequence[_Item], body: bytes, counts: _Counts
    ) -> Iterator[tuple[_Item, None]]:
        counts["sent"] += len(batch)
        counts["batches"] += 1
        counts["bytes_sent"] += len(body)
        for item in batch:
            yield item, None

    def _letter(self, reason: str, detail: str, item: _Item) -> dict[str, Any]:
        transaction_id, record = item
        raw, note = original_bytes(record)
        source, ack = record.source, record.ack
        letter = dead_letter(
            reason,
            "send",
            detail + note,
            raw,
            source,
            self._pipeline,
            transaction_id=transaction_id,
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


def _settle_environment(session: Any, url: str, verify: str | bool) -> dict[str, Any]:
    """What requests would read from the environment for ``url``, read once per session.

    requests looks for proxies, CA bundles and ``~/.netrc`` on every request (measured:
    about 1% of a bounded run's CPU, in file-system calls). The session then stops
    looking, and each post passes these settings: the same as reading them every time,
    for a run whose environment does not change.
    """
    if not isinstance(session, requests.Session) or not session.trust_env:
        return {"verify": verify}
    settings = session.merge_environment_settings(url, {}, None, verify, None)
    auth = requests.utils.get_netrc_auth(url)
    if auth and session.auth is None:
        session.auth = auth
    session.trust_env = False
    return {"verify": settings["verify"], "proxies": settings["proxies"], "cert": settings["cert"]}


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
        session_factory: Callable[[], Any] | None = None,
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
            session = self._new_session()
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

    def _new_session(self) -> Any:
        """This thread's session: a direct connection where requests would go straight there.

        The environment (proxies, CA bundles, ``~/.netrc``) is read once, as requests reads
        it (see :func:`_settle_environment`); a proxy, credentials or a client certificate
        keep requests (transforms/delivery/direct.py says why the rest does not).
        """
        if self._session_factory is not None:
            return self._session_factory()
        session = _new_session()
        settings = _settle_environment(session, self._url, self._verify)
        if not goes_direct(self._url, settings, session.auth):
            self._local.settings = settings
            return session
        session.close()
        self._local.settings = {}
        return DirectSession(self._url, settings["verify"])

    def _settings(self, session: Any) -> dict[str, Any]:
        """This thread's session's environment settings (see :func:`_settle_environment`)."""
        settings = getattr(self._local, "settings", None)
        if settings is None:
            settings = self._local.settings = _settle_environment(session, self._url, self._verify)
        return settings

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
            posted = time.perf_counter()
            try:
                response = session.post(
                    self._url,
                    data=body,
                    timeout=self._timeout,
                    allow_redirects=False,
                    **self._settings(session),
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
            observe_post(time.perf_counter() - posted, status)
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
