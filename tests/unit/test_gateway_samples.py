"""The gateway sample files: made by their generator, and mapped as the counts say.

Each sample is mapped with the pure functions NormalizeRecords uses, so these tests say
what an ``events --format <gateway>`` run over the file must count, without a pipeline.
"""

from __future__ import annotations

import base64
import gzip
import re
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from moesif_beam.transforms.common.errors import InvalidRecord, json_type
from moesif_beam.transforms.formats.gateway import MASK, MappingOptions, NoRecords
from moesif_beam.transforms.formats.normalize import FORMATS
from samples.generate_gateways import FORMATS as GATEWAYS
from samples.generate_gateways import Summary, generate, mixed

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
# The command in samples/README.md: --out_dir samples --count 120 --seed 7
COUNT, SEED = 120, 7
# What must never reach Moesif: API keys and bearer tokens, wherever the log had them.
SECRET = re.compile(rb"key_[0-9a-f]{16}|eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


class Outcome:
    """What mapping a file gives: events, and the counts a run reports."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.bad = 0
        self.skipped = 0
        self.secrets: set[bytes] = set()
        # secrets the input holds outside the request and response headers: in a query
        # string (a URL's or a parsed one) or in headers that go to metadata
        self.hidden: set[bytes] = set()

    @property
    def ids(self) -> set[str]:
        return {event["transaction_id"] for event in self.events}

    def agrees_with(self, summary: Summary) -> None:
        assert len(self.events) == summary.records
        assert len(self.ids) == summary.unique
        assert len(self.events) - len(self.ids) == summary.duplicates
        assert (self.bad, self.skipped) == (summary.bad, summary.skipped)


def _haystack(item: Any) -> bytes:
    text = orjson.dumps(item)
    if isinstance(item, dict):  # Tyk's raw HTTP messages hide headers in base64
        for key in ("raw_request", "raw_response"):
            if isinstance(item.get(key), str):
                text += base64.b64decode(item[key])
    return text.replace(b"\\n", b"\n")


def _outside_headers(value: Any, key: str = "") -> bytes:
    """The parts of a record where a secret is not in a mapped request/response header.

    Query strings (any string holding ``?``, any object or string under a key naming a
    query) and headers that are not the request's or response's own (Azure's
    ``backendRequestHeaders``...), as text to search.
    """
    name = key.lower()
    if isinstance(value, dict):
        if "querystring" in name or ("header" in name and "backend" in name):
            return orjson.dumps(value)
        return b"\n".join(_outside_headers(item, k) for k, item in value.items())
    if isinstance(value, list):
        return b"\n".join(_outside_headers(item, key) for item in value)
    if isinstance(value, str) and ("?" in value or "backend" in name):
        return value.encode()
    return b""


def run(fmt: str, data: bytes, options: MappingOptions | None = None) -> Outcome:
    spec = FORMATS["events"][fmt]
    options = options or MappingOptions()
    out = Outcome()
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            items = spec.split(spec.parse(line))
        except NoRecords:
            out.skipped += 1
            continue
        except ValueError:
            out.bad += 1
            continue
        for item, _ in items:
            out.secrets.update(SECRET.findall(_haystack(item)))
            out.hidden.update(SECRET.findall(_outside_headers(item)))
            try:
                out.events.append(spec.to_moesif(item, options)[2])
            except InvalidRecord:
                out.bad += 1
    return out


@pytest.fixture(scope="module")
def generated() -> dict[str, tuple[bytes, Summary]]:
    return {fmt: generate(fmt, COUNT, SEED) for fmt in GATEWAYS}


def _inflated(data: bytes) -> list[bytes]:
    """The lines, with CloudWatch payloads decompressed: zlib builds may compress alike
    data to other bytes, and the content is what must not go stale."""
    # "H4sI" is base64 of gzip's magic number
    return [
        gzip.decompress(base64.b64decode(line)) if line[:4] == b"H4sI" else line
        for line in data.splitlines()
    ]


@pytest.mark.parametrize("fmt", GATEWAYS)
def test_sample_file_is_what_the_generator_makes(fmt, generated):
    kept = (SAMPLES / f"{fmt}_sample.jsonl").read_bytes()
    assert _inflated(kept) == _inflated(generated[fmt][0]), (
        f"samples/{fmt}_sample.jsonl is stale: run "
        "python samples/generate_gateways.py --out_dir samples --count 120 --seed 7"
    )


@pytest.mark.parametrize("fmt", GATEWAYS)
def test_sample_maps_as_counted_with_no_secret_left(fmt, generated):
    data, summary = generated[fmt]
    assert summary.duplicates > 0 and summary.bad == 4
    outcome = run(fmt, data)
    outcome.agrees_with(summary)
    for event in outcome.events:
        uuid.UUID(event["transaction_id"])
        assert event["request"]["time"].endswith("Z")
        assert isinstance(event["response"]["status"], int)
    delivered = b"\n".join(orjson.dumps(event) for event in outcome.events)
    if fmt not in ("envoy", "apigee"):  # their logs carry no credentials
        assert outcome.secrets, "the sample should hold secrets for masking to remove"
    assert not SECRET.findall(delivered)


@pytest.mark.parametrize("fmt", ["kong", "azure", "nginx"])
def test_secrets_in_query_strings_and_metadata_headers_are_masked(fmt, generated):
    # The samples plant keys where header masking alone would miss them: Kong's
    # key_in_query (url, uri, querystring, upstream_uri), Azure's backend headers and
    # subscription-key in the url and backendUrl, NGINX's api_key in request_uri and the
    # request line it logs.
    data, _ = generated[fmt]
    outcome = run(fmt, data)
    assert outcome.hidden, "the sample should hold secrets outside the mapped headers"
    masked_uris = 0
    for event in outcome.events:
        uri = event["request"]["uri"]
        assert not SECRET.findall(uri.encode()), uri
        assert not SECRET.findall(orjson.dumps(event.get("metadata", {}))), event["metadata"]
        masked_uris += f"={MASK}" in uri
    assert masked_uris, "no uri had a parameter to mask"
    metadata = [event["metadata"] for event in outcome.events]
    if fmt == "kong":
        assert any(m["request_querystring"].get("apikey") == MASK for m in metadata)
        assert any(m["upstream_uri"].endswith(f"apikey={MASK}") for m in metadata)
    if fmt == "azure":
        backend = [m["backendRequestHeaders"] for m in metadata if "backendRequestHeaders" in m]
        assert backend and all(h["Ocp-Apim-Subscription-Key"] == MASK for h in backend)
        assert any(f"Set-Cookie: {MASK}" in m.get("backendResponseHeaders", "") for m in metadata)
        assert any(f"subscription-key={MASK}" in m.get("backendUrl", "") for m in metadata)
    if fmt == "nginx":
        assert any(f"?api_key={MASK} HTTP/1.1" in m["request_line"] for m in metadata)


def test_jwt_claim_names_users_nginx_logs_leave_anonymous(generated):
    data, _ = generated["nginx"]
    assert not [e for e in run("nginx", data).events if "user_id" in e]  # remote_user is "-"
    claimed = run("nginx", data, MappingOptions(user_id_jwt_claim="sub")).events
    users = [e["user_id"] for e in claimed if "user_id" in e]
    assert users
    assert all(re.fullmatch(r"u_\d{4}", user) for user in users)


def _types(value: Any, seen: dict[str, set[str]]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if item is not None:
                seen.setdefault(key, set()).add(json_type(item))
            _types(item, seen)
    elif isinstance(value, list):
        for item in value:
            _types(item, seen)


def test_metadata_keys_keep_one_type_across_every_gateway(generated):
    # Moesif types a metadata key by its name at any depth, and the schema is shared by
    # every run: the formats must not contradict themselves or each other.
    seen: dict[str, set[str]] = {}
    for fmt, (data, _) in generated.items():
        for event in run(fmt, data).events:
            _types(event["metadata"], seen)
    assert {key: kinds for key, kinds in seen.items() if len(kinds) > 1} == {}


def test_auto_over_every_format_mixed(generated):
    files = {fmt: data for fmt, (data, _) in generated.items()}
    outcome = run("auto", mixed(files, SEED))
    total = Summary()
    for _, summary in generated.values():
        for key in ("records", "unique", "duplicates", "bad", "skipped"):
            setattr(total, key, getattr(total, key) + getattr(summary, key))
    outcome.agrees_with(total)
    each = set().union(*(run(fmt, data).ids for fmt, data in files.items()))
    assert outcome.ids == each  # auto gives every record its own format's id
