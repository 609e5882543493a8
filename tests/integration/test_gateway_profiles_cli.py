"""`moesif-beam profiles --format <gateway>` end to end: a gateway's sample becomes profiles."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from moesif_beam.transforms.common.errors import InvalidRecord
from moesif_beam.transforms.formats.gateway import MappingOptions
from moesif_beam.transforms.formats.normalize import FORMATS
from moesif_beam.transforms.profiles.traits import METADATA_KEY
from samples.generate_gateways import generate
from tests.conftest import run_cli
from tests.helpers import assert_nothing_lost, read_batches

pytestmark = pytest.mark.integration

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "kong_sample.jsonl"
COUNT, SEED = 120, 7  # samples/README.md's command; the unit tests keep the file in step
# Kong's consumer: the user is its custom_id (else its username), the company its app.
COMPANY_FIELD = "consumer.username"
# The sample's six hours (from 2026-11-01T00:00Z) are all inside the day before this.
AS_OF = "2026-11-01T12:00:00Z"
SECRET = re.compile(rb"key_[0-9a-f]{16}|eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def _calls_by_profile() -> tuple[Counter[str], Counter[str], dict[str, str]]:
    """Calls per user and per company, and each user's company, by the pure mapping.

    Each transaction counts once, as the run's dedup does; bad lines count nowhere.
    """
    spec = FORMATS["profiles"]["kong"]
    options = MappingOptions(company_id_field=COMPANY_FIELD)
    events: dict[str, dict[str, Any]] = {}
    for line in SAMPLE.read_bytes().splitlines():
        try:
            items = spec.split(spec.parse(line))
        except ValueError:
            continue
        for item, _ in items:
            try:
                tid, _, event = spec.to_moesif(item, options)
            except InvalidRecord:
                continue
            events.setdefault(tid, event)
    users = Counter(e["user_id"] for e in events.values() if "user_id" in e)
    companies = Counter(e["company_id"] for e in events.values() if "company_id" in e)
    company_of = {e["user_id"]: e["company_id"] for e in events.values() if "user_id" in e}
    return users, companies, company_of


def test_profiles_from_a_kong_log_without_an_application_id(tmp_path):
    _, summary = generate("kong", COUNT, SEED)
    out = tmp_path / "out"
    run = run_cli(
        [
            "profiles",
            "--input",
            str(SAMPLE),
            "--format",
            "kong",
            "--company_id_field",
            COMPANY_FIELD,
            "--as_of",
            AS_OF,
            "--output_dir",
            str(out),
        ],
        metrics=tmp_path / "metrics.json",
    )
    assert run.returncode == 0, run.stderr
    metrics = run.metrics
    assert_nothing_lost(metrics)  # read == sent + duplicates + dead_letters
    assert (metrics["read"], metrics["sent"], metrics["duplicates"], metrics["dead_letters"]) == (
        summary.records + summary.bad,
        summary.unique,
        summary.duplicates,
        summary.bad,
    )

    expected_users, expected_companies, company_of = _calls_by_profile()
    users = {u["user_id"]: u for batch in read_batches(str(out / "users")) for u in batch}
    companies = {
        c["company_id"]: c for batch in read_batches(str(out / "companies")) for c in batch
    }
    # Derived from Kong's consumer: custom ids (u_0001...) and, without one, the username.
    assert set(users) == set(expected_users)
    assert any(re.fullmatch(r"u_\d{4}", user) for user in users)
    assert set(companies) == set(expected_companies)
    assert (metrics["users_sent"], metrics["companies_sent"]) == (len(users), len(companies))
    for user_id, user in users.items():
        assert user["company_id"] == company_of[user_id]
    # Every unique call is in its user's and its company's window, once.
    user_calls = {u: p["metadata"][METADATA_KEY]["last24HourAggResults"] for u, p in users.items()}
    assert Counter({u: agg["calls"] for u, agg in user_calls.items()}) == expected_users
    company_calls = {
        c: p["metadata"][METADATA_KEY]["last24HourAggResults"]["calls"]
        for c, p in companies.items()
    }
    assert Counter(company_calls) == expected_companies
    # A call without a consumer has neither: it feeds no profile and is counted apart.
    assert metrics["unattributed"] == summary.unique - sum(expected_users.values()) > 0
    # The key Kong logs in the query (key_in_query) reaches no profile.
    written = b"".join(orjson.dumps(batch) for batch in read_batches(str(out / "users")))
    assert not SECRET.findall(written)
