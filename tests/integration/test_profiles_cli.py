"""`moesif-beam profiles` end to end: the real command, over real HTTP, against both emulators."""

from __future__ import annotations

import base64
import gzip
import json
import os
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from moesif_beam.runners.emulators.segment import RunningSegment, SegmentConfig, start_in_thread
from moesif_beam.transforms.profiles.traits import METADATA_KEY
from tests.conftest import REPO, CliRun, run_cli
from tests.fixtures import wso2_line
from tests.helpers import assert_nothing_lost, read_batches, read_dead_letters

pytestmark = pytest.mark.integration

APP_ID = "profiles-app-id-5d1e"
WRITE_KEY = "segment-wk-8c2f4a9b"  # a recognisable secret: it must never show up in outputs


@pytest.fixture
def start_segment() -> Iterator[Callable[..., RunningSegment]]:
    """Start Segment emulators on free loopback ports; stopped after the test."""
    running: list[RunningSegment] = []

    def start(**settings: Any) -> RunningSegment:
        emulator = start_in_thread(SegmentConfig(**settings))
        running.append(emulator)
        return emulator

    yield start
    for emulator in running:
        emulator.stop()


def _call(tid: str, minute: int, user: str, app: str, status: int, latency: int, **extra: Any):
    """One WSO2 call ``minute`` minutes after 2026-11-01T10:00Z."""
    return wso2_line(
        tid,
        userName=f"{user}@carbon.super",
        applicationName=app,
        requestTimestamp=f"2026-11-01T{10 + minute // 60:02d}:{minute % 60:02d}:00.000Z",
        proxyResponseCode=status,
        responseLatency=latency,
        userIp=f"10.0.0.{minute % 250}",
        **extra,
    )


def _traffic(path: Path) -> Path:
    """Two users of one company, a third alone, a replayed call and a poison line."""
    lines = [
        _call("00000000-0000-4000-8000-000000000001", 0, "ana", "acme", 401, 10),
        _call("00000000-0000-4000-8000-000000000002", 5, "ana", "acme", 500, 20),
        _call("00000000-0000-4000-8000-000000000003", 30, "ana", "acme", 200, 30),
        _call("00000000-0000-4000-8000-000000000004", 45, "bob", "acme", 200, 40),
        _call("00000000-0000-4000-8000-000000000005", 50, "cy", "solo", 201, 50),
    ]
    replayed = lines[2]  # the same correlationId again: it must count once
    path.write_bytes(b"\n".join([*lines, replayed, b"not json"]) + b"\n")
    return path


def _profiles(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> CliRun:
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        return run_cli(
            [
                "profiles",
                "--output_dir",
                str(tmp_path / "out"),
                "--company_id_field",
                "applicationName",
                *args,
            ],
            app_id=APP_ID if "--moesif_base_url" in args else None,
            metrics=tmp_path / "metrics.json",
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _derived(record: dict[str, Any]) -> dict[str, Any]:
    return record["metadata"][METADATA_KEY]


def _secret_forms(secret: str) -> list[str]:
    """A secret as it could leak: as is, and base64-encoded at each of the three alignments.

    For each alignment, only the characters made of the secret's bits alone: they appear in
    any base64 text that holds the secret (a basic-auth token ``secret:`` included).
    """
    raw = secret.encode()
    forms = [secret]
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw).decode()
        first, end = -(-8 * shift // 6), 8 * (shift + len(raw)) // 6
        forms.append(encoded[first:end])
    return forms


def _run_outputs(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """What a run wrote, as a reader sees it, named: its files, inflated, and dead letters.

    Every file under out/ and the metrics file, raw; .gz files (batch files) inflated too;
    and every dead letter as the dead-letter reader decodes it (the files are deflated).
    """
    files = [tmp_path / "metrics.json", *sorted((tmp_path / "out").rglob("*"))]
    for path in files:
        if path.is_file():
            data = path.read_bytes()
            yield str(path), data
            if path.name.endswith(".gz"):
                yield f"{path} (inflated)", gzip.decompress(data)
    letter_dirs = sorted({p.parent for p in (tmp_path / "out").rglob("*.avro")})
    for directory in letter_dirs:
        for letter in read_dead_letters(str(directory)):
            fields = (v if isinstance(v, bytes) else str(v).encode() for v in letter.values())
            yield f"dead letter {letter['source']} in {directory}", b"\n".join(fields)


def _assert_no_secrets(run: CliRun, tmp_path: Path) -> None:
    """Neither the application id nor the write key, as is or in base64, in any output."""
    outputs = [("stdout", run.stdout.encode()), ("stderr", run.stderr.encode())]
    outputs += _run_outputs(tmp_path)
    assert any(name.endswith("metrics.json") for name, _ in outputs), "no metrics file"
    for secret in (APP_ID, WRITE_KEY):
        for form in _secret_forms(secret):
            for name, data in outputs:
                assert form.encode() not in data, (name, form)


def test_users_companies_and_segment_calls_from_the_traffic(
    tmp_path, start_collector, start_segment
):
    collector = start_collector(application_id=APP_ID)
    segment = start_segment(write_key=WRITE_KEY)
    # A customer's own metadata on a user: Moesif's recursive merge must keep it.
    requests.post(
        f"{collector.url}/v1/users",
        json={"user_id": "ana", "metadata": {"plan": "growth"}},
        headers={"X-Moesif-Application-Id": APP_ID},
        timeout=10,
    ).raise_for_status()
    source = _traffic(tmp_path / "in.jsonl")
    args = (
        "--input",
        str(source),
        "--moesif_base_url",
        collector.url,
        "--segment_base_url",
        segment.url,
    )
    run = _profiles(tmp_path, *args, env={"SEGMENT_WRITE_KEY": WRITE_KEY})
    assert run.returncode == 0, run.stderr
    metrics = run.metrics
    assert_nothing_lost(metrics)
    assert (metrics["read"], metrics["sent"], metrics["duplicates"]) == (7, 5, 1)
    assert (metrics["dead_letters"], metrics["parse_errors"]) == (1, 1)
    assert (metrics["users_sent"], metrics["companies_sent"], metrics["segment_sent"]) == (3, 2, 5)
    assert metrics["upsert_dead_letters"] == 0

    users = {u["user_id"]: u for u in collector.records("users")}
    companies = {c["company_id"]: c for c in collector.records("companies")}
    assert set(users) == {"ana", "bob", "cy"} and set(companies) == {"acme", "solo"}
    ana = users["ana"]
    assert ana["metadata"]["plan"] == "growth"  # the customer's key survived the upsert
    assert ana["company_id"] == "acme"
    assert ana["ip_address"] == "10.0.0.30"
    assert ana["modified_time"] == "2026-11-01T10:50:00.000Z"  # as of the newest call
    traits = _derived(ana)
    assert traits["firstSeenTime"] == "2026-11-01T10:00:00.000Z"
    assert traits["lastSeenTime"] == "2026-11-01T10:30:00.000Z"
    # The replayed call counted once: three calls, two errors.
    assert traits["last24HourAggResults"] == {
        "calls": 3,
        "errors": 2,
        "latency_p50_ms": 20,
        "latency_p90_ms": 30,
        "top_routes": [{"route": "GET /api1/2.0.0/*", "calls": 3}],
    }
    acme = _derived(companies["acme"])
    assert acme["ttfhw_s"] == 30 * 60  # first call 10:00, first 2xx 10:30
    assert acme["last24HourAggResults"]["calls"] == 4
    assert _derived(companies["solo"])["ttfhw_s"] == 0

    identify = {m["userId"]: m for m in segment.messages("identify")}
    groups = {m["groupId"]: m for m in segment.messages("group")}
    assert set(identify) == {"ana", "bob", "cy"} and set(groups) == {"acme", "solo"}
    company = identify["ana"]["traits"]["company"]
    assert company["id"] == "acme"
    assert company["ttfhw_s"] == 30 * 60
    assert company["firstSeenTime"] == "2026-11-01T10:00:00.000Z"
    assert identify["ana"]["traits"]["last24HourAggResults"] == traits["last24HourAggResults"]
    assert groups["acme"]["userId"] == "bob"  # the company's latest user
    assert segment.stats()["requests"] == {"/v1/batch 200": 1}
    _assert_no_secrets(run, tmp_path)

    # A re-run sends the same messageIds: Segment's dedup collapses every call.
    again = _profiles(tmp_path, *args, env={"SEGMENT_WRITE_KEY": WRITE_KEY})
    assert again.returncode == 0, again.stderr
    assert segment.stats()["duplicates"] == 5
    assert len(segment.messages()) == 5


def test_segment_outages_are_retried_and_a_refused_key_stops_the_run(
    tmp_path, start_collector, start_segment
):
    collector = start_collector(application_id=APP_ID)
    segment = start_segment(write_key=WRITE_KEY, fail_first=2, fail_status=503)
    source = _traffic(tmp_path / "in.jsonl")
    base = ("--input", str(source), "--moesif_base_url", collector.url)
    run = _profiles(
        tmp_path,
        *base,
        "--segment_base_url",
        segment.url,
        "--segment_write_key",
        WRITE_KEY,
    )
    assert run.returncode == 0, run.stderr
    assert run.metrics["segment_retries"] == 2
    assert run.metrics["segment_sent"] == 5
    _assert_no_secrets(run, tmp_path)

    wrong = start_segment(write_key="another-key-123456")
    refused = _profiles(
        tmp_path, *base, "--segment_base_url", wrong.url, env={"SEGMENT_WRITE_KEY": WRITE_KEY}
    )
    assert refused.returncode == 3, refused.stderr
    # One line, naming Segment (not the collector, which accepted the id).
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("moesif-beam: Segment refused the configuration: HTTP 401 "), line
    assert "the Segment write key was refused" in line
    _assert_no_secrets(refused, tmp_path)


def test_segment_limits_hold_on_the_sending_side(tmp_path, start_collector, start_segment):
    """Calls over 32 KB are dead letters; the others go in requests of at most 500 KB."""
    collector = start_collector(application_id=APP_ID)
    segment = start_segment(write_key=WRITE_KEY)
    # 150 users of 10 companies, each with a 4 KB user agent: identify calls of about 9 KB
    # (the agent is in context and in traits), over a megabyte in all, so the 500 KB
    # request limit, not --batch_max_events (500), is what splits the batches.
    lines = [
        _call(
            f"00000000-0000-4000-8000-{i:012d}",
            i % 60,
            f"user{i:03d}",
            f"co{i % 10}",
            200,
            10 + i,
            userAgentHeader=f"agent-{i}/" + "a" * 4_000,
        )
        for i in range(150)
    ]
    # One more user, alone in a company, with a 20 KB user agent: its identify call holds
    # it twice (over 32,000 bytes), its company's group call once (under).
    lines.append(
        _call(
            "00000000-0000-4000-8000-999999999999",
            59,
            "zed",
            "zed-co",
            200,
            5,
            userAgentHeader="long-agent/" + "z" * 20_000,
        )
    )
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    run = _profiles(
        tmp_path,
        "--input",
        str(source),
        "--moesif_base_url",
        collector.url,
        "--segment_base_url",
        segment.url,
        env={"SEGMENT_WRITE_KEY": WRITE_KEY},
    )
    assert run.returncode == 0, run.stderr
    metrics = run.metrics
    assert_nothing_lost(metrics)
    assert (metrics["read"], metrics["sent"], metrics["dead_letters"]) == (151, 151, 0)
    users, companies = 151, 11
    assert (metrics["users_sent"], metrics["companies_sent"]) == (users, companies)

    # Segment: exactly the one oversized call held back, every other call delivered.
    assert metrics["segment_too_large"] == 1
    assert metrics["upsert_dead_letters"] == 1
    assert metrics["segment_sent"] == users + companies - 1
    identify = {m["userId"] for m in segment.messages("identify")}
    assert len(identify) == users - 1 and "zed" not in identify
    assert {m["groupId"] for m in segment.messages("group")} == {
        *(f"co{i}" for i in range(10)),
        "zed-co",
    }
    stats = segment.stats()
    assert metrics["segment_bytes_sent"] > 2 * 500_000  # one request could not have held it
    assert stats["largest_request_bytes"] <= 500_000, stats
    assert set(stats["requests"]) == {"/v1/batch 200"}, stats  # none refused for size
    assert stats["requests"]["/v1/batch 200"] > 1, stats
    assert metrics["segment_batches"] == stats["requests"]["/v1/batch 200"]

    letters = read_dead_letters(str(tmp_path / "out" / "dead_letter"))
    (letter,) = letters
    assert (letter["reason"], letter["pipeline"]) == ("too_large", "profile-upserts")
    call = json.loads(letter["payload"])
    assert (call["type"], call["userId"]) == ("identify", "zed")
    assert len(letter["payload"]) > 32_000
    for form in _secret_forms(WRITE_KEY):
        assert form not in letter["payload"].decode() + letter["detail"] + letter["source"]
    _assert_no_secrets(run, tmp_path)


def test_without_an_application_id_profiles_go_to_batch_files(tmp_path):
    source = _traffic(tmp_path / "in.jsonl")
    run = _profiles(tmp_path, "--input", str(source), "--as_of", "2026-11-02T10:40:00Z")
    assert run.returncode == 0, run.stderr
    assert_nothing_lost(run.metrics)
    users = {u["user_id"]: u for b in read_batches(str(tmp_path / "out" / "users")) for u in b}
    companies = [c for b in read_batches(str(tmp_path / "out" / "companies")) for c in b]
    assert set(users) == {"ana", "bob", "cy"} and len(companies) == 2
    # As of a day later, 10:40: only the calls after 10:40 on the 1st are in the window.
    assert _derived(users["ana"])["last24HourAggResults"]["calls"] == 0
    assert _derived(users["bob"])["last24HourAggResults"]["calls"] == 1
    assert users["ana"]["modified_time"] == "2026-11-02T10:40:00.000Z"


# The issue's "Done means" command, over the bundled sample.
SAMPLE = "samples/wso2_sample.jsonl"
# Placeholders that are no identity (README, "From other gateways to Moesif").
_NO_IDENTITY = frozenset({"", "-", "null", "N/A", "anonymous", "UNKNOWN"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _time_ms(value: Any) -> int:
    """An ISO 8601 time (or, in the sample, epoch milliseconds) as epoch milliseconds."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return (parsed - _EPOCH) // timedelta(milliseconds=1)


def _sample_event(line: bytes) -> tuple[int, dict[str, Any]] | None:
    """``(request time, event)`` of a sample line, or None for a malformed one.

    An event line, as samples/README.md defines it: a JSON object with a string
    correlationId and apiMethod, an integer proxyResponseCode and an ISO 8601 or
    epoch-milliseconds requestTimestamp.
    """
    try:
        event = json.loads(line)
    except ValueError:  # not JSON, or not UTF-8
        return None
    if not isinstance(event, dict):
        return None
    status = event.get("proxyResponseCode")
    if not (
        isinstance(event.get("correlationId"), str)
        and isinstance(event.get("apiMethod"), str)
        and isinstance(status, int)
        and not isinstance(status, bool)
    ):
        return None
    try:
        return _time_ms(event.get("requestTimestamp")), event
    except (TypeError, ValueError):
        return None


def _sample_identities(event: dict[str, Any]) -> tuple[str | None, str | None]:
    """The user and the company of a sample event, as the README maps them.

    The user is ``userName``, else ``properties.userName``, less ``@carbon.super``; the
    company is ``applicationName`` (``--company_id_field applicationName``).
    """
    user = None
    for name in (event.get("userName"), (event.get("properties") or {}).get("userName")):
        if name is not None and name not in _NO_IDENTITY:
            user = name.removesuffix("@carbon.super") or None
            break
    company = event.get("applicationName")
    return user, None if company in _NO_IDENTITY else company


def test_the_issue_done_means_command_over_the_wso2_sample(
    tmp_path, start_collector, start_segment, monkeypatch
):
    """The issue's command, with an application id and a write key, checked against the sample.

    ``moesif-beam profiles --input samples/wso2_sample.jsonl --format wso2
    --company_id_field applicationName``, as a new user runs it.
    """
    # What the sample implies, computed from its lines alone: the earliest copy of each
    # correlationId (the dedup rule), its user and company, and their times.
    lines = (REPO / SAMPLE).read_bytes().splitlines()
    events = [e for e in map(_sample_event, lines) if e is not None]
    unique: dict[str, tuple[int, dict[str, Any]]] = {}
    for time_ms, event in events:
        kept = unique.get(event["correlationId"])
        if kept is None or time_ms < kept[0]:
            unique[event["correlationId"]] = (time_ms, event)
    seen: dict[tuple[str, str], list[int]] = {}
    first_ok: dict[str, int] = {}
    for time_ms, event in unique.values():
        user, company = _sample_identities(event)
        if user is not None:
            seen.setdefault(("user", user), []).append(time_ms)
        if company is not None:
            seen.setdefault(("company", company), []).append(time_ms)
            if 200 <= event["proxyResponseCode"] <= 299:
                first_ok[company] = min(time_ms, first_ok.get(company, time_ms))
    users = {key for kind, key in seen if kind == "user"}
    companies = {key for kind, key in seen if kind == "company"}
    ttfhw = {c: (first_ok[c] - min(seen[("company", c)])) // 1000 for c in first_ok}

    collector = start_collector(application_id=APP_ID)
    segment = start_segment(write_key=WRITE_KEY)
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    command = ["profiles", "--input", SAMPLE, "--format", "wso2"]
    command += ["--company_id_field", "applicationName"]
    run = run_cli(
        [
            *command,
            "--moesif_base_url",
            collector.url,
            "--segment_base_url",
            segment.url,
            "--output_dir",
            str(tmp_path / "out"),
        ],
        app_id=APP_ID,
        metrics=tmp_path / "metrics.json",
    )
    assert run.returncode == 0, run.stderr
    metrics = run.metrics
    assert_nothing_lost(metrics)
    assert metrics["read"] == len(lines)
    assert metrics["dead_letters"] == len(lines) - len(events)
    assert metrics["duplicates"] == len(events) - len(unique)
    assert metrics["sent"] == len(unique)
    assert (metrics["users_sent"], metrics["companies_sent"]) == (len(users), len(companies))
    assert metrics["segment_sent"] == len(users) + len(companies)
    assert metrics["upsert_dead_letters"] == 0

    moesif_users = {u["user_id"]: u for u in collector.records("users")}
    moesif_companies = {c["company_id"]: c for c in collector.records("companies")}
    identify = {m["userId"]: m for m in segment.messages("identify")}
    groups = {m["groupId"]: m for m in segment.messages("group")}
    assert set(moesif_users) == users == set(identify)
    assert set(moesif_companies) == companies == set(groups)
    assert len(segment.messages()) == len(users) + len(companies)  # one call each

    # First and last seen of every profile, and every company's ttfhw_s (0 throughout:
    # in the sample each application's first call succeeded), as Moesif holds them.
    for kind, records in (("user", moesif_users), ("company", moesif_companies)):
        for key, record in records.items():
            traits, times = _derived(record), seen[(kind, key)]
            assert _time_ms(traits["firstSeenTime"]) == min(times), (kind, key)
            assert _time_ms(traits["lastSeenTime"]) == max(times), (kind, key)
    assert {c: _derived(moesif_companies[c]).get("ttfhw_s") for c in companies} == {
        c: ttfhw.get(c) for c in companies
    }
    # The busiest user's identify call and the busiest company's group call carry the same.
    user = max(users, key=lambda u: (len(seen[("user", u)]), u))
    company = max(companies, key=lambda c: (len(seen[("company", c)]), c))
    user_traits, company_traits = identify[user]["traits"], groups[company]["traits"]
    assert _time_ms(user_traits["firstSeenTime"]) == min(seen[("user", user)])
    assert _time_ms(user_traits["lastSeenTime"]) == max(seen[("user", user)])
    assert _time_ms(company_traits["firstSeenTime"]) == min(seen[("company", company)])
    assert _time_ms(company_traits["lastSeenTime"]) == max(seen[("company", company)])
    assert company_traits["ttfhw_s"] == ttfhw[company]
    _assert_no_secrets(run, tmp_path)


def _segment_line(**call: Any) -> bytes:
    return json.dumps(call).encode()


def test_segment_identify_and_group_calls_become_upserts(tmp_path, start_collector):
    collector = start_collector(application_id=APP_ID)
    lines = [
        # Out of time order: the later identify must win, whatever the file's order.
        _segment_line(
            type="identify",
            userId="u1",
            messageId="m-2",
            timestamp="2026-11-01T12:00:00Z",
            traits={"email": "new@acme.io", "company": {"id": "acme"}},
        ),
        _segment_line(
            type="identify",
            userId="u1",
            messageId="m-1",
            timestamp="2026-11-01T11:00:00Z",
            traits={"email": "old@acme.io", "firstName": "Ana"},
            context={"ip": "203.0.113.9", "campaign": {"source": "google"}},
        ),
        _segment_line(
            type="group",
            userId="u1",
            groupId="acme",
            messageId="m-3",
            timestamp="2026-11-01T11:30:00Z",
            traits={"name": "Acme", "website": "acme.io", "plan": "growth"},
        ),
        _segment_line(type="track", event="Signed Up", userId="u1", messageId="m-4"),
        _segment_line(
            type="identify", userId="u1", messageId="m-1", timestamp="2026-11-01T11:00:00Z"
        ),
    ]
    source = tmp_path / "segment.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    run = _profiles(
        tmp_path, "--input", str(source), "--format", "segment", "--moesif_base_url", collector.url
    )
    assert run.returncode == 0, run.stderr
    metrics = run.metrics
    assert_nothing_lost(metrics)
    assert (metrics["read"], metrics["sent"], metrics["duplicates"]) == (5, 3, 1)
    assert (metrics["dead_letters"], metrics["invalid"]) == (1, 1)
    (letter,) = read_dead_letters(str(tmp_path / "out" / "dead_letter"))
    assert "track calls go to moesif-beam actions" in letter["detail"]
    (user,) = collector.records("users")
    assert user["metadata"]["email"] == "new@acme.io"  # the later call wins
    assert user["metadata"]["first_name"] == "Ana"  # merged from the earlier one
    assert user["company_id"] == "acme"
    assert user["campaign"] == {"utm_source": "google"}
    assert user["modified_time"] == "2026-11-01T12:00:00.000Z"
    (company,) = collector.records("companies")
    assert company["company_domain"] == "acme.io"
    assert company["metadata"]["plan"] == "growth"


def test_undeliverable_profiles_are_dead_letters_of_their_own(tmp_path, start_collector):
    collector = start_collector(application_id=APP_ID, fail_rate=1.0, fail_status=503)
    source = _traffic(tmp_path / "in.jsonl")
    run = _profiles(
        tmp_path,
        "--input",
        str(source),
        "--moesif_base_url",
        collector.url,
        "--max_retry_seconds",
        "0.5",
    )
    assert run.returncode == 0, run.stderr
    metrics = run.metrics
    # The input records are all accounted for; the profiles that could not be delivered
    # are counted apart, and kept as dead letters holding the upsert.
    assert_nothing_lost(metrics)
    assert (metrics["users_retries_exhausted"], metrics["companies_retries_exhausted"]) == (3, 2)
    assert metrics["upsert_dead_letters"] == 5
    letters = read_dead_letters(str(tmp_path / "out" / "dead_letter"))
    upserts = [d for d in letters if d["pipeline"] == "profile-upserts"]
    assert {json.loads(d["payload"]).get("user_id") for d in upserts} == {"ana", "bob", "cy", None}
    assert all(d["reason"] == "retries_exhausted" for d in upserts)
    replay = run_cli(
        [
            "deadletters",
            "replay",
            "--dead_letter",
            str(tmp_path / "out" / "dead_letter"),
            "--reason",
            "retries_exhausted",
            "--output_dir",
            str(tmp_path / "replay"),
        ]
    )
    assert replay.returncode == 0, replay.stderr
    assert "5 profile-upserts dead letters are not replayed" in replay.stderr
    _assert_no_secrets(run, tmp_path)


def _upserts(out: Path) -> dict[str, list[str]]:
    return {
        kind: sorted(
            json.dumps(item, sort_keys=True)
            for batch in read_batches(str(out / kind))
            for item in batch
        )
        for kind in ("users", "companies")
    }


def test_profiles_depend_on_neither_input_order_nor_parallelism(tmp_path):
    sample = Path(__file__).resolve().parents[2] / "samples" / "wso2_sample.jsonl"
    lines = sample.read_bytes().splitlines()
    random.Random(7).shuffle(lines)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_bytes(b"\n".join(lines) + b"\n")
    runs = {
        "one": run_cli(
            [
                "profiles",
                "--input",
                str(sample),
                "--output_dir",
                str(tmp_path / "one"),
                "--company_id_field",
                "applicationName",
            ]
        ),
        "two": run_cli(
            [
                "profiles",
                "--input",
                str(shuffled),
                "--output_dir",
                str(tmp_path / "two"),
                "--company_id_field",
                "applicationName",
                "--direct_num_workers",
                "2",
                "--direct_running_mode",
                "multi_processing",
            ]
        ),
    }
    for run in runs.values():
        assert run.returncode == 0, run.stderr
    one, two = _upserts(tmp_path / "one"), _upserts(tmp_path / "two")
    assert len(one["users"]) > 100 and len(one["companies"]) > 10
    assert one == two
