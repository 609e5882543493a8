"""Issue 12, transport and secrets: redirects, TLS, the scrubber, DEBUG logs, a slow collector.

The HTTP writer driven with a fake clock and session (no waiting, no server); the same rows
against the real emulator, over HTTP and HTTPS, are tests/integration/test_transport_hardening.py.
"""

from __future__ import annotations

import collections
import json
import pickle
import ssl
from typing import Any

import pytest
import requests

from moesif_beam.pipelines.config import PipelineConfig
from moesif_beam.runners.launch import _report_failure
from moesif_beam.transforms.common.errors import CollectorConfigError
from moesif_beam.transforms.delivery.http import _HttpWriter
from moesif_beam.transforms.delivery.policy import RetryPolicy
from moesif_beam.transforms.delivery.sinks import PostToMoesif
from moesif_beam.transforms.delivery.transport import (
    Secret,
    delivery_unknown,
    redirect_host,
    tls_failure,
)
from moesif_beam.transforms.records import Record

APP_ID = "hardening-app-9c41e7"  # recognisable: it must never show up in any output


# ---------------------------------------------------------------------------------------
# Fakes: a clock that only moves when told, and a session that answers from a script
# ---------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeResponse:
    def __init__(self, status: int, headers: dict[str, str] | None = None, text: str = "") -> None:
        self.status_code = status
        self.headers = headers or {}
        self.text = text


class FakeSession:
    """Answers each post with ``answer()``; each post takes ``post_seconds`` of fake time."""

    def __init__(self, clock: FakeClock, answer: Any, post_seconds: float = 1.0) -> None:
        self.clock = clock
        self.answer = answer
        self.post_seconds = post_seconds
        self.headers: dict[str, str] = {}
        self.posts: list[dict[str, Any]] = []

    def post(self, url: str, **kwargs: Any) -> FakeResponse:
        self.posts.append({"url": url, **kwargs})
        self.clock.now += self.post_seconds
        result = self.answer()
        if isinstance(result, BaseException):
            raise result
        return result

    def close(self) -> None:
        pass


def _writer(clock: FakeClock, session: FakeSession, budget: float = 10.0) -> _HttpWriter:
    writer = _HttpWriter(
        "http://collector.test/v1/events/batch",
        Secret(APP_ID),
        "events",
        1,
        RetryPolicy(max_retry_seconds=budget, base_delay=0.5, max_delay=2.0),
        1.0,
        clock=clock,
        wall_clock=clock,
        sleep=clock.sleep,
        session_factory=lambda: session,
    )
    writer.open()
    return writer


def _batch(n: int, prefix: str = "r") -> list[tuple]:
    return [
        (
            f"{prefix}-{i}",
            Record(0, json.dumps({"transaction_id": f"{prefix}-{i}"}).encode(), b"raw", "f:1"),
        )
        for i in range(n)
    ]


def _deliver(writer: _HttpWriter, batch: list[tuple]) -> tuple[list[Any], dict[str, int]]:
    counts: collections.Counter[str] = collections.Counter()
    fates = list(writer.deliver(batch, counts))
    return [letter for _, letter in fates], dict(counts)


# ---------------------------------------------------------------------------------------
# Row 12: the retry time is bounded for the whole run (breaker), timeouts are counted
# ---------------------------------------------------------------------------------------


def test_a_failing_collector_costs_the_budget_once_per_run_not_once_per_batch():
    clock = FakeClock()
    session = FakeSession(clock, lambda: FakeResponse(503))
    writer = _writer(clock, session, budget=10.0)

    letters, counts = _deliver(writer, _batch(3, "a"))
    first_posts = len(session.posts)
    assert first_posts > 3  # the first batch retries for its whole budget
    assert counts["retries_exhausted"] == 3
    assert all(letter["reason"] == "retries_exhausted" for letter in letters)

    # The collector has now failed for (nearly) the whole budget without a break: the
    # budget left is the run's, not a fresh one per batch (the old code gave each 10 s).
    started = clock.now
    posts = []
    for n in range(6):
        session.posts.clear()
        letters, counts = _deliver(writer, _batch(2, f"b{n}"))
        posts.append(len(session.posts))
        assert counts["retries_exhausted"] == 2
    assert posts[1:] == [1] * 5, posts  # once past the budget: one attempt per batch
    assert "run's retry budget" in letters[0]["detail"]
    assert clock.now - started < 10


def test_the_breaker_closes_when_the_collector_answers_again():
    clock = FakeClock()
    answers = {"status": 503}
    session = FakeSession(clock, lambda: FakeResponse(answers["status"]))
    writer = _writer(clock, session, budget=10.0)
    _deliver(writer, _batch(1, "a"))  # the budget...
    _deliver(writer, _batch(1, "a2"))  # ...is spent: the breaker is open
    session.posts.clear()
    _deliver(writer, _batch(1, "b"))
    assert len(session.posts) == 1  # open: one attempt

    answers["status"] = 201
    letters, counts = _deliver(writer, _batch(4, "c"))
    assert letters == [None] * 4
    assert counts["sent"] == 4

    # A new failure gets the whole budget again.
    answers["status"] = 503
    session.posts.clear()
    _deliver(writer, _batch(1, "d"))
    assert len(session.posts) > 3


def test_one_runs_writer_copies_share_a_breaker_and_other_runs_do_not():
    def writer() -> _HttpWriter:
        return _HttpWriter(
            "http://c/v1/events/batch", Secret(APP_ID), "events", 1, RetryPolicy(), 1
        )

    built = writer()
    # Beam unpickles one copy per DoFn instance; copies in one process share the breaker.
    first, second = (pickle.loads(pickle.dumps(built)) for _ in range(2))
    first.open()
    second.open()
    assert first._breaker is second._breaker
    other_run = writer()
    other_run.open()
    assert other_run._breaker is not first._breaker


def test_retry_after_is_honoured_within_the_budget():
    clock = FakeClock()
    answers = iter([FakeResponse(429, {"Retry-After": "4"}), FakeResponse(201)])
    session = FakeSession(clock, lambda: next(answers))
    writer = _writer(clock, session, budget=10.0)
    letters, counts = _deliver(writer, _batch(2))
    assert letters == [None, None]
    assert clock.sleeps == [4.0]
    assert counts["retries"] == 1

    # A Retry-After beyond what is left of the budget gives up at once.
    answers = iter([FakeResponse(503, {"Retry-After": "60"})])
    session.answer = lambda: next(answers)
    clock.sleeps.clear()
    letters, counts = _deliver(writer, _batch(1, "late"))
    assert counts["retries_exhausted"] == 1
    assert clock.sleeps == []


def test_a_timed_out_request_is_counted_and_its_dead_letters_say_delivery_is_unknown():
    clock = FakeClock()
    session = FakeSession(clock, lambda: requests.exceptions.ReadTimeout("read timed out"))
    writer = _writer(clock, session, budget=3.0)
    letters, counts = _deliver(writer, _batch(2))
    assert counts["timeouts"] == len(session.posts) > 1
    assert counts["retries_exhausted"] == 2
    assert all("delivery unknown" in letter["detail"] for letter in letters)
    # Every attempt re-posted the very same body: the same transaction ids.
    assert len({post["data"] for post in session.posts}) == 1

    # A connection that was never made delivered nothing: no "unknown" there.
    session.answer = lambda: requests.exceptions.ConnectTimeout("connect timed out")
    writer2 = _writer(clock, session, budget=3.0)
    letters, counts = _deliver(writer2, _batch(1, "c"))
    assert counts.get("timeouts", 0) == 0
    assert "delivery unknown" not in letters[0]["detail"]


def test_delivery_unknown_classification():
    assert delivery_unknown(requests.exceptions.ReadTimeout())
    assert not delivery_unknown(requests.exceptions.ConnectTimeout())
    assert delivery_unknown(requests.exceptions.ConnectionError("Connection aborted."))


# ---------------------------------------------------------------------------------------
# Rows 9 and 10: redirects and TLS are configuration errors, never followed or retried
# ---------------------------------------------------------------------------------------


def test_a_redirect_from_the_sink_is_fatal_and_names_only_the_host():
    clock = FakeClock()
    location = f"https://evil.example:8443/steal?id={APP_ID}"
    session = FakeSession(clock, lambda: FakeResponse(302, {"Location": location}))
    writer = _writer(clock, session)
    with pytest.raises(CollectorConfigError) as caught:
        _deliver(writer, _batch(2))
    message = str(caught.value)
    assert "evil.example" in message
    assert APP_ID not in message
    assert "\n" not in message
    assert len(session.posts) == 1
    assert session.posts[0]["allow_redirects"] is False


def test_redirect_host():
    assert redirect_host("https://other.example/x", "http://a/v1/config") == "other.example"
    assert redirect_host("/elsewhere", "http://a.example:9/v1/config") == "a.example"
    assert redirect_host(None, "http://a/") == "(no Location header)"


def test_tls_failure_classification():
    eof = requests.exceptions.SSLError(ssl.SSLEOFError(8, "EOF occurred in violation of protocol"))
    assert not tls_failure(eof)  # a cut connection: retried like any other
    bad_cert = requests.exceptions.SSLError(
        ssl.SSLCertVerificationError(1, "certificate verify failed")
    )
    assert tls_failure(bad_cert)
    assert not tls_failure(requests.exceptions.ConnectionError("refused"))


def test_a_tls_failure_in_the_sink_is_fatal_not_retried():
    clock = FakeClock()
    error = requests.exceptions.SSLError(
        ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed certificate")
    )
    session = FakeSession(clock, lambda: error)
    writer = _writer(clock, session)
    with pytest.raises(CollectorConfigError, match=r"TLS failure talking to collector\.test"):
        _deliver(writer, _batch(2))
    assert len(session.posts) == 1
    assert clock.sleeps == []


def test_a_missing_or_bad_ca_bundle_is_refused_at_start(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        PipelineConfig("events", "x", "wso2", ca_bundle=str(tmp_path / "missing.pem"))
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ValueError, match="not a readable PEM"):
        PostToMoesif("events", "https://x", Secret(APP_ID), "events", ca_bundle=str(bad))


# ---------------------------------------------------------------------------------------
# Row 13: the scrubber, the minimum id length
# ---------------------------------------------------------------------------------------


def test_the_scrubber_replaces_the_secret_only_as_a_whole_token():
    secret = Secret("markmark")
    assert secret.scrub("markmarker and remarkmark") == "markmarker and remarkmark"
    assert secret.scrub("id=markmark&x=1, 'markmark' markmark.") == "id=***&x=1, '***' ***."
    assert secret.scrub("markmark markmark") == "*** ***"
    assert Secret("").scrub("text") == "text"
    # Regex characters in an id are taken literally.
    assert Secret("a.b+c*d?e").scrub("a.b+c*d?e axbbcdde") == "*** axbbcdde"


def test_the_failure_report_uses_the_same_scrubber(tmp_path, capsys):
    config = PipelineConfig("events", "x", "wso2", application_id=Secret("markmark"))
    _report_failure(RuntimeError("refused markmark; the marker markmarker stays"), config)
    err = capsys.readouterr().err
    assert "refused ***; the marker markmarker stays" in err


def test_application_ids_shorter_than_8_characters_are_refused():
    with pytest.raises(ValueError, match="too short") as caught:
        PipelineConfig("events", "x", "wso2", application_id=Secret("k"))
    assert "'k'" not in str(caught.value)
    PipelineConfig("events", "x", "wso2", application_id=Secret("12345678"))


# ---------------------------------------------------------------------------------------
# Split (413) and bisect (400), without a server
# ---------------------------------------------------------------------------------------


def _posted_ids(post: dict[str, Any]) -> list[str]:
    import gzip

    return [item["transaction_id"] for item in json.loads(gzip.decompress(post["data"]))]


def test_a_413_splits_the_batch_until_it_fits_and_a_lone_record_is_too_large():
    clock = FakeClock()
    # The collector takes at most two records per batch, and never the record "s-3".
    posts: list[list[str]] = []

    def answer() -> FakeResponse:
        ids = _posted_ids(session.posts[-1])
        posts.append(ids)
        if len(ids) > 2 or "s-3" in ids:
            return FakeResponse(413, text="payload too large")
        return FakeResponse(201)

    session = FakeSession(clock, answer)
    letters, counts = _deliver(_writer(clock, session), _batch(6, "s"))
    assert [letter and letter["reason"] for letter in letters] == [
        None,
        None,
        None,
        "too_large",
        None,
        None,
    ]
    assert counts["sent"] == 5 and counts["too_large"] == 1
    # Halves, in order: [0..5] -> [0,1,2] [3,4,5] -> [0] [1,2] ... never a retry wait.
    assert posts[0] == [f"s-{i}" for i in range(6)]
    assert clock.sleeps == []


def test_a_400_is_bisected_until_the_refused_record_is_isolated():
    clock = FakeClock()

    def answer() -> FakeResponse:
        ids = _posted_ids(session.posts[-1])
        if "b-5" in ids:
            return FakeResponse(400, text='{"error":"bad field in item"}')
        return FakeResponse(201)

    session = FakeSession(clock, answer)
    letters, counts = _deliver(_writer(clock, session), _batch(8, "b"))
    rejected = [i for i, letter in enumerate(letters) if letter is not None]
    assert rejected == [5]
    assert letters[5]["reason"] == "collector_rejected"
    assert "HTTP 400" in letters[5]["detail"]
    assert counts["sent"] == 7 and counts["collector_rejected"] == 1
    # log2(8) + 1 levels of halving, each a post: far fewer than one per record.
    assert len(session.posts) <= 2 * 3 + 1
    assert clock.sleeps == []


def test_the_environment_is_read_once_per_session_with_what_requests_would_read(
    tmp_path, monkeypatch
):
    # requests reads proxies, CA bundles and ~/.netrc on every request unless told not to;
    # the writer reads them once per session and passes them with every post.
    import requests

    from moesif_beam.transforms.delivery.http import _settle_environment

    bundle = tmp_path / "ca.pem"
    bundle.write_text("not read here")
    netrc = tmp_path / "netrc"
    netrc.write_text("machine collector.example login user password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    url = "https://collector.example/v1/events/batch"
    session = requests.Session()
    expected = session.merge_environment_settings(url, {}, None, True, None)
    settings = _settle_environment(session, url, True)
    assert settings["verify"] == expected["verify"] == str(bundle)
    assert settings["proxies"] == expected["proxies"]
    assert settings["proxies"]["https"] == "http://proxy.example:3128"
    assert session.auth == ("user", "secret")
    assert session.trust_env is False  # no more lookups per request
    # A CA bundle given on the command line wins over the environment's, as before.
    assert _settle_environment(requests.Session(), url, "/given.pem")["verify"] == "/given.pem"
    # Sessions that are not requests' own (tests' fakes) get the verify setting alone.
    assert _settle_environment(object(), url, True) == {"verify": True}
