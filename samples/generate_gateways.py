"""Deterministic generator of API-gateway access logs: Kong, AWS, Tyk, Azure, Apigee, Envoy, NGINX.

Each format's lines look like what that gateway (or its log shipper) writes, per
``shared/reference/gateways.md``: Kong serializer objects and batch arrays, API Gateway's
JSON access logs alone and inside CloudWatch Logs subscription payloads (gzip + base64,
with a control message) and Firehose records, Tyk Pump analytics records with base64 raw
HTTP messages, Azure GatewayLogs envelopes (camelCase and PascalCase), Apigee
MessageLogging records alone and inside Cloud Logging entries, Istio-style Envoy records
and NGINX ``escape=json`` records with quoted numbers and ``-`` for absent values.

Every file also has exact repeats of earlier records (some inside a different wrapper, so
dedup must see through wrappers) and a few bad lines: not JSON, a required field missing,
a field of the wrong type, and an object no gateway writes. Some requests carry a Bearer
JWT and API keys in headers, so masking and ``--user_id_jwt_claim`` have work to do; some
carry the key where header masking alone would miss it: in the query (Kong's
``key_in_query``, Azure's ``subscription-key``, NGINX's ``api_key`` and the request line
it logs) and in Azure's backend headers, which go to metadata.

The records themselves come from ``gateway_records.py``; this module writes them as lines.
Only the standard library is used; ``seed`` drives every choice, so the same arguments
give the same bytes. Usage::

    python samples/generate_gateways.py --out_dir samples --count 120 --seed 7
    python samples/generate_gateways.py --format kong --count 20 --out -

``--stats`` prints, per file, what a correct run must count: ``records`` (read, good and
repeated), ``unique`` (sent), ``duplicates``, ``bad`` (dead letters) and ``skipped``
(CloudWatch control messages, not records at all).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import random
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    from samples import gateway_records as gw
except ModuleNotFoundError:  # run as a script: python samples/generate_gateways.py
    import gateway_records as gw  # type: ignore[no-redef]

__all__ = ["FORMATS", "Summary", "generate", "main", "mixed"]

FORMATS = gw.FORMATS
DUP_RATE = 0.05

# -- lines: wrappers, repeats and bad lines -----------------------------------------------


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _cloudwatch(records: list[dict[str, Any]], start_id: int, control: bool = False) -> bytes:
    events = [
        {"id": f"{start_id + i:056d}", "timestamp": gw.START_MS, "message": _dumps(r).decode()}
        for i, r in enumerate(records)
    ]
    payload = {
        "messageType": "CONTROL_MESSAGE" if control else "DATA_MESSAGE",
        "owner": "123456789012" if not control else "CloudwatchLogs",
        "logGroup": "API-Gateway-Execution-Logs_a1b2c3d4e5/prod",
        "logStream": "access",
        "subscriptionFilters": ["to-moesif"],
        "logEvents": events
        or [
            {
                "id": "",
                "timestamp": gw.START_MS,
                "message": "CWL CONTROL MESSAGE: Checking health",
            }
        ],
    }
    return base64.b64encode(gzip.compress(_dumps(payload), mtime=0))


def _firehose(records: list[dict[str, Any]], seq: int) -> bytes:
    ndjson = b"\n".join(_dumps(r) for r in records) + b"\n"
    return _dumps(
        {
            "invocationId": str(uuid.UUID(int=seq)),
            "deliveryStreamArn": "arn:aws:firehose:us-east-1:123456789012:"
            "deliverystream/amazon-apigateway-moesif",
            "region": "us-east-1",
            "records": [
                {
                    "recordId": f"{seq:08d}",
                    "approximateArrivalTimestamp": gw.START_MS,
                    "data": base64.b64encode(ndjson).decode(),
                }
            ],
        }
    )


def _group(fmt: str, records: list[dict[str, Any]], index: int) -> bytes:
    """One line holding ``records`` the way ``fmt``'s shippers write several at once."""
    if fmt == "kong":
        return _dumps(records)
    if fmt == "azure":
        return _dumps({"records": records})
    if fmt == "aws":
        return _cloudwatch(records, index) if index % 2 else _firehose(records, index)
    return b"\n".join(_dumps(r) for r in records)


def _bad(rng: random.Random, fmt: str, kind: str, call: gw.Call) -> bytes:
    record = gw.BUILDERS[fmt](rng, call)
    record = record.get("jsonPayload", record)
    missing, spoiled = gw.REQUIRED[fmt]
    if kind == "not_json":
        return _dumps(record)[:60]
    if kind == "missing_field":
        record.pop(missing, None)
        return _dumps(record)
    if kind == "wrong_type":
        node = record
        for key in spoiled[:-1]:
            node = node[key]
        node[spoiled[-1]] = [] if spoiled[-1] == "properties" else "teapot"
        return _dumps(record)
    return _dumps({"event": "deploy", "service": "orders", "at": gw.iso(call.start_ms)})


@dataclass
class Summary:
    """What a correct run over the file counts."""

    lines: int = 0
    records: int = 0
    unique: int = 0
    duplicates: int = 0
    bad: int = 0
    skipped: int = 0


def generate(fmt: str, count: int, seed: int, bad_per_kind: int = 1) -> tuple[bytes, Summary]:
    """``count`` records of ``fmt`` (plus repeats and bad lines) as file bytes."""
    if fmt not in gw.BUILDERS:
        msg = f"format must be one of {', '.join(FORMATS)}, got {fmt!r}"
        raise ValueError(msg)
    rng = random.Random(f"{fmt}:{seed}")
    summary = Summary()
    records: list[dict[str, Any]] = []
    lines: list[bytes] = []
    step = gw.SPAN_MS // max(count, 1)
    i = 0
    while i < count:
        take = rng.choice((1, 1, 1, 1, 2, 3)) if fmt in ("kong", "azure", "aws") else 1
        take = min(take, count - i)
        group = [
            gw.BUILDERS[fmt](
                rng,
                gw.make_call(rng, i + n, gw.START_MS + (i + n) * step + rng.randrange(step)),
            )
            for n in range(take)
        ]
        for _ in group:
            if records and rng.random() < DUP_RATE:
                # An exact repeat of a recent record, written on its own: a retry, or a
                # replay of the same log by another shipper.
                repeat = rng.choice(records[-50:])
                lines.append(_dumps(repeat))
                summary.records += 1
                summary.duplicates += 1
        records.extend(group)
        summary.records += take
        summary.unique += take
        lines.append(_group(fmt, group, i) if take > 1 else _dumps(group[0]))
        i += take
    if fmt == "aws":
        lines.insert(len(lines) // 2, _cloudwatch([], 0, control=True))
        summary.skipped += 1
    for kind in gw.BAD_KINDS:
        for _ in range(bad_per_kind):
            at = rng.randrange(len(lines) + 1)
            lines.insert(at, _bad(rng, fmt, kind, gw.make_call(rng, 10_000 + at, gw.START_MS)))
            summary.bad += 1
    summary.lines = len(lines)
    return b"\n".join(lines) + b"\n", summary


def mixed(files: dict[str, bytes], seed: int) -> bytes:
    """Every format's lines interleaved, as ``--format auto`` reads them."""
    rng = random.Random(seed)
    queues = {fmt: data.splitlines() for fmt, data in files.items()}
    out: list[bytes] = []
    while any(queues.values()):
        fmt = rng.choice([f for f, q in queues.items() if q])
        out.append(queues[fmt].pop(0))
    return b"\n".join(out) + b"\n"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=FORMATS, help="one format (default: all of them)")
    parser.add_argument("--count", type=int, default=120, help="records per format")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--bad", type=int, default=1, help="bad lines of each kind per file")
    parser.add_argument("--out", help="with --format: output path, '-' for stdout")
    parser.add_argument("--out_dir", help="without --format: <format>_sample.jsonl files here")
    parser.add_argument("--mixed", help="without --format: also every format's lines interleaved")
    parser.add_argument("--stats", action="store_true", help="print the counts as JSON")
    args = parser.parse_args(argv)
    if args.format and not args.out:
        parser.error("--format needs --out")
    if not args.format and not args.out_dir:
        parser.error("give --format and --out, or --out_dir")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    stats: dict[str, dict[str, int]] = {}
    if args.format:
        data, summary = generate(args.format, args.count, args.seed, args.bad)
        if args.out == "-":
            sys.stdout.buffer.write(data)
        else:
            Path(args.out).write_bytes(data)
        stats[args.format] = vars(summary)
    else:
        files = {}
        for fmt in FORMATS:
            data, summary = generate(fmt, args.count, args.seed, args.bad)
            files[fmt] = data
            (Path(args.out_dir) / f"{fmt}_sample.jsonl").write_bytes(data)
            stats[fmt] = vars(summary)
        if args.mixed:
            Path(args.mixed).write_bytes(mixed(files, args.seed))
        stats["mixed"] = {
            key: sum(s[key] for s in stats.values()) for key in vars(Summary()) if key != "lines"
        }
    if args.stats:
        print(json.dumps(stats, indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
