"""Issue 12, transport and secrets, end to end: the real emulator over HTTP and HTTPS.

Preflight and the HTTP writer against the emulator (a redirect, a private CA), and the real
command against it: redirects, TLS, a stuck collector, DEBUG logs. The writer's own logic
with a fake clock and session is tests/unit/test_transport_hardening.py.
"""

from __future__ import annotations

import datetime
import gzip
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from moesif_beam.transforms.common.errors import CollectorConfigError
from moesif_beam.transforms.delivery.http import _HttpWriter
from moesif_beam.transforms.delivery.policy import RetryPolicy
from moesif_beam.transforms.delivery.transport import Secret, preflight
from moesif_beam.transforms.records import Record
from tests.conftest import run_cli
from tests.fixtures import wso2_line
from tests.helpers import assert_nothing_lost, read_dead_letters
from tests.unit.test_transport_hardening import _deliver

APP_ID = "hardening-app-9c41e7"  # recognisable: it must never show up in any output


# ---------------------------------------------------------------------------------------
# Rows 9 and 10 against the emulator: preflight and the writer over HTTP and HTTPS
# ---------------------------------------------------------------------------------------


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
    batch = [("tls-1", Record(0, json.dumps(event).encode(), b"raw", "f:1"))]

    waits: list[float] = []  # the writer's waits before retries
    untrusting = _HttpWriter(url, Secret(APP_ID), "events", 1, policy, 5.0, sleep=waits.append)
    untrusting.open()
    with pytest.raises(CollectorConfigError, match="--ca_bundle"):
        _deliver(untrusting, batch)
    assert waits == []  # not retried for the budget

    trusting = _HttpWriter(
        url, Secret(APP_ID), "events", 1, policy, 5.0, ca_bundle=str(tls_files["ca"])
    )
    trusting.open()
    letters, counts = _deliver(trusting, batch)
    assert letters == [None]
    assert counts["sent"] == 1
    assert [e["transaction_id"] for e in collector.records("events")] == ["tls-1"]


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
