"""Issue 12, transport and secrets: redirects, TLS, the scrubber, DEBUG logs, a slow collector.

Unit tests drive the HTTP writer with a fake clock and session (no waiting, no server);
the integration tests run the real command against the real emulator, over HTTP and HTTPS.
"""

from __future__ import annotations

import collections
import datetime
import gzip
import ipaddress
import json
import pickle
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from moesif_beam.pipelines.config import PipelineConfig
from moesif_beam.runners.launch import _report_failure
from moesif_beam.transforms.errors import CollectorConfigError
from moesif_beam.transforms.moesif_sink import (
    PostToMoesif,
    RetryPolicy,
    Secret,
    _HttpWriter,
    delivery_unknown,
    preflight,
    redirect_host,
    tls_failure,
)
from tests.conftest import run_cli
from tests.fixtures import wso2_line
from tests.helpers import assert_nothing_lost, read_dead_letters

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
            json.dumps({"transaction_id": f"{prefix}-{i}"}).encode(),
            b"raw",
            "f:1",
            f"{prefix}-{i}",
            None,
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


def test_preflight_never_follows_a_redirect(start_collector):
    target = start_collector()  # "another host": it must never see the id
    other = target.url.replace("127.0.0.1", "localhost")
    redirecting = start_collector(redirect_to=other)
    with pytest.raises(CollectorConfigError) as caught:
        preflight(redirecting.url, Secret(APP_ID), timeout=5)
    message = str(caught.value)
    assert "redirect to localhost" in message
    assert APP_ID not in message
    assert target.stats()["requests"] == {}
    assert redirecting.stats()["requests"]["/v1/config"] == {"307": 1}


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


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> dict[str, Path]:
    """A private CA and a server certificate for 127.0.0.1 and localhost, signed by it."""
    pytest.importorskip("cryptography")  # a dependency of apache-beam
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("moesif-beam test CA"))
        .issuer_name(name("moesif-beam test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = {
        "ca": directory / "ca.pem",
        "cert": directory / "server.pem",
        "key": directory / "server.key",
    }
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


def _tls_collector(start_collector, tls_files):
    return start_collector(
        application_id=APP_ID, tls_cert=str(tls_files["cert"]), tls_key=str(tls_files["key"])
    )


def test_preflight_refuses_an_untrusted_certificate_and_trusts_a_ca_bundle(
    start_collector, tls_files
):
    collector = _tls_collector(start_collector, tls_files)
    assert collector.url.startswith("https://")
    with pytest.raises(
        CollectorConfigError, match=r"TLS failure talking to 127\.0\.0\.1"
    ) as caught:
        preflight(collector.url, Secret(APP_ID), timeout=5)
    assert APP_ID not in str(caught.value)
    preflight(collector.url, Secret(APP_ID), timeout=5, ca_bundle=str(tls_files["ca"]))
    assert collector.stats()["requests"]["/v1/config"] == {"200": 1}


def test_the_sink_posts_over_tls_with_a_ca_bundle_and_stops_without_one(start_collector, tls_files):
    collector = _tls_collector(start_collector, tls_files)
    url = f"{collector.url}/v1/events/batch"
    policy = RetryPolicy(max_retry_seconds=30)
    event = {
        "request": {
            "time": "2099-01-01T00:00:00.000Z",
            "uri": "https://x/y",
            "verb": "GET",
            "headers": {},
        },
        "response": {"time": "2099-01-01T00:00:00.100Z", "status": 200, "headers": {}},
        "transaction_id": "tls-1",
    }
    batch = [(json.dumps(event).encode(), b"raw", "f:1", "tls-1", None)]

    untrusting = _HttpWriter(url, Secret(APP_ID), "events", 1, policy, 5.0)
    untrusting.open()
    started = time.monotonic()
    with pytest.raises(CollectorConfigError, match="--ca_bundle"):
        _deliver(untrusting, batch)
    assert time.monotonic() - started < 5  # not retried for the budget

    trusting = _HttpWriter(
        url, Secret(APP_ID), "events", 1, policy, 5.0, ca_bundle=str(tls_files["ca"])
    )
    trusting.open()
    letters, counts = _deliver(trusting, batch)
    assert letters == [None]
    assert counts["sent"] == 1
    assert [e["transaction_id"] for e in collector.records("events")] == ["tls-1"]


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
# Integration: the real command against the real emulator
# ---------------------------------------------------------------------------------------


def _input(path: Path, count: int, **overrides: Any) -> Path:
    lines = [wso2_line(f"00000000-0000-4000-8000-{i:012d}", **overrides) for i in range(count)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _events(tmp_path: Path, url: str, *extra: str, app_id: str | None = APP_ID):
    args = [
        "events",
        "--input",
        str(tmp_path / "in.jsonl"),
        "--moesif_base_url",
        url,
        "--output_dir",
        str(tmp_path / "out"),
        *extra,
    ]
    return run_cli(args, app_id=app_id, metrics=tmp_path / "metrics.json")


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.integration
def test_cli_a_redirecting_collector_is_a_configuration_error(tmp_path, start_collector):
    target = start_collector()
    other = target.url.replace("127.0.0.1", "localhost")
    redirecting = start_collector(redirect_to=other)
    _input(tmp_path / "in.jsonl", 5)
    run = _events(tmp_path, redirecting.url)
    assert run.returncode == 3, run.stderr
    line = _one_line(run.stderr)
    assert "redirect to localhost" in line
    assert APP_ID not in run.stderr + run.stdout
    assert target.stats()["requests"] == {}  # the id never reached the other host


@pytest.mark.integration
def test_cli_an_untrusted_certificate_is_exit_3_and_a_ca_bundle_delivers(
    tmp_path, start_collector, tls_files
):
    collector = _tls_collector(start_collector, tls_files)
    _input(tmp_path / "in.jsonl", 20)
    run = _events(tmp_path, collector.url, "--max_retry_seconds", "30")
    assert run.returncode == 3, run.stderr
    line = _one_line(run.stderr)
    assert "TLS failure talking to 127.0.0.1" in line
    assert "--ca_bundle" in line
    assert APP_ID not in run.stderr
    assert read_dead_letters(str(tmp_path / "out" / "dead_letter")) == []

    run = _events(tmp_path, collector.url, "--ca_bundle", str(tls_files["ca"]))
    assert run.returncode == 0, run.stderr
    assert run.metrics["sent"] == 20
    assert run.metrics["retries_exhausted"] == 0
    assert len(collector.records("events")) == 20


@pytest.mark.integration
def test_cli_bad_ca_bundle_and_short_id_are_usage_errors(tmp_path):
    _input(tmp_path / "in.jsonl", 1)
    run = _events(tmp_path, "https://127.0.0.1:9", "--ca_bundle", str(tmp_path / "nope.pem"))
    assert run.returncode == 2
    assert "--ca_bundle" in run.stderr and "no such file" in run.stderr
    run = _events(tmp_path, "https://127.0.0.1:9", app_id="k")
    assert run.returncode == 2
    assert "too short" in run.stderr


@pytest.mark.integration
def test_cli_a_stuck_collector_costs_the_retry_budget_once(tmp_path, start_collector):
    # Row 12: every request is answered after 2 s, the client waits 0.5 s. Before, every
    # batch spent the whole budget (about 5 attempts each); now the run spends it once and
    # each further batch gets one attempt.
    collector = start_collector(application_id=APP_ID, latency_ms=2000)
    batches = 24
    _input(tmp_path / "in.jsonl", batches * 2)
    started = time.monotonic()
    run = _events(
        tmp_path,
        collector.url,
        "--batch_max_events",
        "2",
        "--http_timeout",
        "0.5",
        "--max_retry_seconds",
        "3",
        "--max_in_flight",
        "1",
    )
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stderr
    assert_nothing_lost(run.metrics)
    assert run.metrics["retries_exhausted"] == batches * 2
    assert run.metrics["timeouts"] >= batches
    assert "timeouts" in run.stdout
    letters = read_dead_letters(str(tmp_path / "out" / "dead_letter"))
    assert all("delivery unknown" in letter["detail"] for letter in letters)
    posts = sum(collector.stats()["requests"].get("/v1/events/batch", {}).values())
    attempts = run.metrics["timeouts"]
    assert attempts < batches + 12, attempts  # the old code: about 5 per batch
    assert posts <= attempts
    assert elapsed < 60, elapsed


@pytest.mark.integration
def test_cli_debug_logs_never_print_records(tmp_path):
    # Beam logs whole elements at DEBUG ("Processing [...]"): records must not appear.
    marker_id = "zq7debugleak0id"
    marker_key = "zq7debugleakkey"
    lines = [
        wso2_line(
            f"{marker_id}-{i}",
            userAgent=f"zq7debugleakvalue-{i}",
            properties={"apiContext": "/a", marker_key: f"v{i}"},
        )
        for i in range(12)
    ]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join([*lines, b"{not json zq7debugleak"]) + b"\n")
    run = run_cli(
        [
            "events",
            "--input",
            str(tmp_path / "in.jsonl"),
            "--output_dir",
            str(tmp_path / "out"),
            "--log_level",
            "DEBUG",
        ]
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "DEBUG" in run.stderr  # DEBUG logging is on...
    assert "zq7debugleak" not in run.stderr  # ...and no record's id, key or value is in it
    sent = [
        json.loads(gzip.decompress(path.read_bytes()))
        for path in (tmp_path / "out" / "events").glob("batch-*.json.gz")
    ]
    assert sum(len(batch) for batch in sent) == 12
