"""Tests for samples/generate_wso2.py, the synthetic WSO2 analytics event generator."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from samples.generate_wso2 import MALFORMED_KINDS, generate, main, summarize

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "samples" / "wso2_sample.jsonl"
README = ROOT / "samples" / "README.md"
# The command documented in samples/README.md.
SAMPLE_ARGS: dict[str, Any] = {"count": 4000, "seed": 7, "malformed": 12}

FAULT_CLASSES = {
    **{code: ("THROTTLED", 429) for code in range(900800, 900808)},
    900901: ("AUTH", 401),
    900902: ("AUTH", 401),
    900903: ("AUTH", 401),
    900908: ("AUTH", 403),
    101503: ("TARGET_CONNECTIVITY", 503),
    101504: ("TARGET_CONNECTIVITY", 504),
    404: ("OTHER", 404),
}
LATENCIES = (
    "responseLatency",
    "backendLatency",
    "requestMediationLatency",
    "responseMediationLatency",
)


def parse_event(line: bytes) -> dict[str, Any] | None:
    """Return the event if the line is usable, else None (independent of the generator's check)."""
    try:
        event = json.loads(line.decode("utf-8"))
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    for key in ("correlationId", "apiMethod"):
        if not isinstance(event.get(key), str):
            return None
    code = event.get("proxyResponseCode")
    if type(code) is not int:
        return None
    stamp = event.get("requestTimestamp")
    if type(stamp) is int:
        return event
    if not isinstance(stamp, str):
        return None
    try:
        datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return event


def epoch_ms(stamp: str | int) -> int:
    if isinstance(stamp, int):
        return stamp
    return int(datetime.fromisoformat(stamp).timestamp() * 1000)


def split_malformed(count: int, seed: int, malformed: int) -> tuple[list[bytes], list[bytes]]:
    """Separate the malformed lines by diffing against the same run without them."""
    clean = list(generate(count, seed=seed))
    dirty = list(generate(count, seed=seed, malformed=malformed))
    kept: list[bytes] = []
    extra: list[bytes] = []
    for line in dirty:
        if len(kept) < len(clean) and line == clean[len(kept)]:
            kept.append(line)
        else:
            extra.append(line)
    assert kept == clean
    return clean, extra


@pytest.fixture(scope="module")
def lines_5000() -> list[bytes]:
    return list(generate(5000, seed=11))


def test_same_seed_gives_same_bytes() -> None:
    first = list(generate(1500, seed=3, malformed=9))
    assert first == list(generate(1500, seed=3, malformed=9))
    assert first != list(generate(1500, seed=4, malformed=9))


@pytest.mark.parametrize(("count", "malformed"), [(0, 0), (1, 0), (0, 3), (10, 9), (250, 25)])
def test_line_count_is_count_plus_malformed(count: int, malformed: int) -> None:
    lines = list(generate(count, seed=1, malformed=malformed))
    assert len(lines) == count + malformed
    assert all(b"\n" not in line for line in lines)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="negative"):
        list(generate(-1))
    with pytest.raises(ValueError, match="rate"):
        list(generate(10, fault_rate=1.5))


def test_fault_and_dup_rates_roughly_hold(lines_5000: list[bytes]) -> None:
    events = [json.loads(line) for line in lines_5000]
    faults = sum(event["eventType"] == "fault" for event in events)
    assert 0.035 <= faults / len(events) <= 0.065
    seen: dict[str, bytes] = {}
    exact = reemitted = 0
    for line, event in zip(lines_5000, events, strict=True):
        cid = event["correlationId"]
        if cid in seen:
            if seen[cid] == line:
                exact += 1
            else:
                reemitted += 1
        else:
            seen[cid] = line
    assert 0.012 <= (exact + reemitted) / len(events) <= 0.028
    assert exact > reemitted > 0

    custom = [json.loads(line) for line in generate(3000, seed=2, fault_rate=0.3, dup_rate=0.0)]
    assert 0.25 <= sum(e["eventType"] == "fault" for e in custom) / 3000 <= 0.35
    assert len({e["correlationId"] for e in custom}) == 3000


def test_event_lines_are_well_formed(lines_5000: list[bytes]) -> None:
    for line in lines_5000:
        event = parse_event(line)
        assert event is not None, line
        # Compact JSON, as the gateway logs it.
        assert json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode() == line
        assert event["regionId"] == "default"
        assert event["gatewayType"] == "SYNAPSE"
        properties = event["properties"]
        assert properties["apiContext"].startswith("/")
        assert properties["isEgress"] is False
        assert "subType" in properties or "subtype" in properties
        assert isinstance(event["userAgentHeader"], str)
        if event["eventType"] == "response":
            assert event["proxyResponseCode"] == event["targetResponseCode"]
            assert isinstance(event["responseCacheHit"], bool)
            assert all(type(event[key]) is int for key in LATENCIES)
            assert event["keyType"] in ("PRODUCTION", "SANDBOX")
            assert isinstance(event["destination"], str)
            assert isinstance(event["userName"], str)
        else:
            assert event["eventType"] == "fault"
            assert event["targetResponseCode"] == -1
            assert FAULT_CLASSES[event["errorCode"]] == (
                event["errorType"],
                event["proxyResponseCode"],
            )
            assert isinstance(event["errorMessage"], str)
            assert not any(key in event for key in LATENCIES[1:])
            assert "destination" not in event


def test_variety(lines_5000: list[bytes]) -> None:
    events = [json.loads(line) for line in lines_5000]
    properties = [event["properties"] for event in events]
    assert {e["errorType"] for e in events if e["eventType"] == "fault"} == {
        "THROTTLED",
        "AUTH",
        "TARGET_CONNECTIVITY",
        "OTHER",
    }
    assert any(e["eventType"] == "response" and e["proxyResponseCode"] >= 500 for e in events)
    assert any(e["eventType"] == "response" and 400 <= e["proxyResponseCode"] < 500 for e in events)
    assert any(e["userIp"] == "UNKNOWN" for e in events)
    assert any(e.get("userName") == "anonymous" for e in events)
    assert any("@acme.com" in e.get("userName", "") for e in events)
    assert any("platform" in e and "userAgent" in e for e in events)
    assert any("x.tenant.region" in p and "client.version" in p for p in properties)
    assert any(
        isinstance(p.get("tags"), list) and "city.name" in p.get("geo", {}) for p in properties
    )
    assert any(p.get("aiTokenUsage", {}).get("totalTokens", 0) > 0 for p in properties)
    assert any(p.get("x-original-gw-url", "").startswith("https://") for p in properties)
    average = sum(len(line) for line in lines_5000) / len(lines_5000)
    assert 800 <= average <= 1500


def test_timestamps(lines_5000: list[bytes]) -> None:
    events = [json.loads(line) for line in lines_5000]
    assert events[0]["requestTimestamp"] == "2026-11-01T00:00Z"
    stamps = [event["requestTimestamp"] for event in events]
    ints = [s for s in stamps if isinstance(s, int)]
    texts = [s for s in stamps if isinstance(s, str)]
    assert ints
    assert any(s.endswith("+05:30") for s in texts)
    assert any(s.endswith("Z") and s.count(":") == 2 and "." not in s for s in texts)
    assert sum(s.endswith("Z") and s.count(":") == 1 for s in texts) >= 2
    assert sum("." in s for s in texts) > 0.95 * len(texts)
    # First occurrences are non-decreasing and lie within the day.
    first: dict[str, int] = {}
    for event in events:
        first.setdefault(event["correlationId"], epoch_ms(event["requestTimestamp"]))
    times = list(first.values())
    assert times == sorted(times)
    start = epoch_ms("2026-11-01T00:00:00Z")
    assert start <= times[0] and times[-1] < start + 86_400_000


def test_malformed_lines_fail_to_parse_or_miss_fields() -> None:
    clean, extra = split_malformed(600, seed=5, malformed=2 * len(MALFORMED_KINDS))
    assert len(extra) == 2 * len(MALFORMED_KINDS)
    assert all(parse_event(line) is not None for line in clean)
    for line in extra:
        assert parse_event(line) is None, line
    joined = b"\n".join(extra)
    assert b"\xff\xfe" in joined
    assert any(line.startswith(b"[{") for line in extra)
    assert any(b"WARN" in line and not line.startswith((b"{", b"[{")) for line in extra)
    assert b'"proxyResponseCode":"abc"' in joined
    assert b'"requestTimestamp":"yesterday"' in joined
    # The two examples from WSO2's guide, with the guide's missing commas.
    assert b'"userName":"admin@carbon.super" "proxyResponseCode": 202' in joined
    assert b'"apiResourceTemplate": "/publish" "applicationId"' in joined
    missing = [
        line
        for line in extra
        if line.startswith(b'{"') and b'"requestTimestamp"' not in line and line.endswith(b"}}")
    ]
    assert missing


def test_gzip_output(tmp_path: Path) -> None:
    expected = b"".join(line + b"\n" for line in generate(300, seed=9, malformed=4))
    by_suffix = tmp_path / "events.jsonl.gz"
    by_flag = tmp_path / "events.jsonl"
    args = ["--count", "300", "--seed", "9", "--malformed", "4"]
    assert main([*args, "--out", str(by_suffix)]) == 0
    assert main([*args, "--out", str(by_flag), "--gzip"]) == 0
    assert by_suffix.read_bytes()[:2] == b"\x1f\x8b"
    assert by_suffix.read_bytes() == by_flag.read_bytes()  # no name or mtime in the header
    with gzip.open(by_suffix, "rb") as handle:
        assert handle.read() == expected


def test_plain_output_and_stdout(tmp_path: Path) -> None:
    expected = b"".join(line + b"\n" for line in generate(20, seed=3))
    out = tmp_path / "events.jsonl"
    assert main(["--count", "20", "--seed", "3", "--out", str(out)]) == 0
    assert out.read_bytes() == expected
    result = subprocess.run(
        [sys.executable, "samples/generate_wso2.py", "--count", "20", "--seed", "3", "--out", "-"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    assert result.stdout == expected


def test_committed_sample_matches_documented_command() -> None:
    expected = b"".join(line + b"\n" for line in generate(**SAMPLE_ARGS))
    assert SAMPLE.read_bytes() == expected, (
        "samples/wso2_sample.jsonl is stale: rerun the command in samples/README.md"
    )
    assert f"--count {SAMPLE_ARGS['count']} --seed {SAMPLE_ARGS['seed']}" in README.read_text()
    assert SAMPLE.stat().st_size < 6_000_000


def test_readme_counts_match_sample() -> None:
    stats = summarize(SAMPLE.read_bytes().splitlines())
    readme = README.read_text()
    rows = {
        "Lines": stats["lines"],
        "Event lines": stats["events"],
        "Malformed lines": stats["malformed"],
        "Unique correlationIds": stats["unique_ids"],
        "Repeated correlationIds": stats["repeated_ids"],
        "Exact repeats of an earlier line": stats["exact_repeats"],
        "Re-emitted with another timestamp": stats["reemitted"],
        "Success events": stats["success"],
        "Success events with a backend 4xx/5xx": stats["backend_errors"],
        "Fault events": stats["faults"],
        **{f"Faults {kind}": n for kind, n in stats["faults_by_type"].items()},
    }
    for label, value in rows.items():
        assert f"| {label} | {value:,} |" in readme, label
    assert stats["malformed"] == SAMPLE_ARGS["malformed"]
    assert stats["events"] == SAMPLE_ARGS["count"]
