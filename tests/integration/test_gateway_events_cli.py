"""`moesif-beam events --format <gateway>` end to end: the samples, the command, the emulator."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

from samples.generate_gateways import FORMATS as GATEWAYS
from samples.generate_gateways import Summary, generate, mixed
from tests.conftest import run_cli
from tests.helpers import assert_nothing_lost, read_dead_letters

pytestmark = pytest.mark.integration

APP_ID = "test-app-id-7e41d0"
SECRET = re.compile(rb"key_[0-9a-f]{16}|eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
COUNT, SEED = 40, 11

# Identity flags ride along on one format each, so every flag goes through the command once.
EXTRA = {
    "nginx": ["--user_id_jwt_claim", "sub", "--company_id_field", "host"],
    "envoy": ["--user_id_field", "x_user_id", "--session_token_field", "header:X-Request-Id"],
    "kong": ["--mask_headers", "authorization,x-api-key,user-agent"],
}


def _input(tmp_path: Path, fmt: str) -> Summary:
    if fmt != "auto":
        data, summary = generate(fmt, COUNT, SEED)
        (tmp_path / "in.jsonl").write_bytes(data)
        return summary
    files, total = {}, Summary()
    for name in GATEWAYS:
        files[name], part = generate(name, COUNT // 4, SEED)
        for key in ("records", "unique", "duplicates", "bad", "skipped"):
            setattr(total, key, getattr(total, key) + getattr(part, key))
    (tmp_path / "in.jsonl").write_bytes(mixed(files, SEED))
    return total


@pytest.mark.parametrize("fmt", [*GATEWAYS, "auto"])
def test_each_gateway_format_delivers_deduplicated_masked_events(tmp_path, start_collector, fmt):
    collector = start_collector(application_id=APP_ID)
    expected = _input(tmp_path, fmt)
    args = [
        "events",
        "--input",
        str(tmp_path / "in.jsonl"),
        "--format",
        fmt,
        "--moesif_base_url",
        collector.url,
        "--output_dir",
        str(tmp_path / "out"),
        *EXTRA.get(fmt, []),
    ]
    run = run_cli(args, app_id=APP_ID, metrics=tmp_path / "metrics.json")
    assert run.returncode == 0, run.stderr
    metrics = run.metrics
    assert_nothing_lost(metrics)
    assert (metrics["read"], metrics["sent"], metrics["duplicates"], metrics["dead_letters"]) == (
        expected.records + expected.bad,
        expected.unique,
        expected.duplicates,
        expected.bad,
    )
    stored = collector.records("events")
    assert len({event["transaction_id"] for event in stored}) == len(stored) == expected.unique
    assert not SECRET.findall(b"\n".join(orjson.dumps(event) for event in stored))

    dead = read_dead_letters(str(tmp_path / "out" / "dead_letter"))
    assert sorted(letter["reason"] for letter in dead).count("parse_error") >= 1
    invalid = [letter for letter in dead if letter["reason"] == "invalid_record"]
    assert invalid and all(letter["detail"] for letter in invalid)
    if fmt == "auto":
        assert any("matches no events format" in letter["detail"] for letter in invalid)
    else:
        assert any(letter["field"] for letter in invalid)  # the field is named

    if fmt == "nginx":
        assert any(re.fullmatch(r"u_\d{4}", e.get("user_id", "")) for e in stored)
        assert all(f"//{e['company_id']}/" in e["request"]["uri"] for e in stored)
    if fmt == "envoy":
        assert any(e.get("user_id", "").startswith("u_") for e in stored)
        assert all(e["session_token"] == e["transaction_id"] for e in stored)
    if fmt == "kong":
        assert all(e["request"]["headers"]["user-agent"] == "*****" for e in stored)
    assert APP_ID not in run.stdout + run.stderr
