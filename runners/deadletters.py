"""``moesif-beam deadletters stats|show|replay``: look at what was rejected, and send it again.

Dead letters are read from Avro files on any Beam filesystem (a directory, or a glob of
``.avro`` files), filtered by reason and by when they were written. ``replay`` feeds their
payloads back through the pipeline named in each record, with the delivery options of
``events``/``actions``; it keeps the records' transaction ids (they are in the payloads),
so a second replay is harmless, and it writes its own dead letters for what fails again.
It never deletes or rewrites the files it reads.
"""

from __future__ import annotations

import argparse
import base64
import collections
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import fastavro
import orjson
from apache_beam.io.filesystems import FileSystems

from moesif_beam.runners.options import ArgumentParser
from moesif_beam.transforms.common.timefmt import format_time_ms, parse_time_ms
from moesif_beam.transforms.deadletters import REASONS

__all__ = ["main", "matching", "read_dead_letters"]

EXIT_USAGE = 2

# The input format a replay uses when none is given, per pipeline (the commands' defaults).
_FORMATS = {"events": "wso2", "actions": "moesif", "profiles": "wso2"}
# Dead letters of deliveries that are not input records: a profile upsert or a Segment call
# is recomputed by re-running profiles (upserts and messageIds make that harmless).
_NOT_REPLAYED = {"profile-upserts": "re-run moesif-beam profiles over the same input instead"}


def read_dead_letters(location: str) -> Iterator[dict[str, Any]]:
    """Every dead letter under ``location``: a directory of ``.avro`` files, or a glob.

    Raises:
        ValueError: nothing matches ``location``.
    """
    pattern = location if any(c in location for c in "*?[") else location.rstrip("/") + "/*.avro"
    paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    if not paths:
        msg = f"--dead_letter {location}: no dead-letter files (.avro) there"
        raise ValueError(msg)
    for path in paths:
        with FileSystems.open(path) as handle:
            for record in fastavro.reader(handle):
                if isinstance(record, dict):
                    yield record


def matching(
    records: Iterator[dict[str, Any]],
    reasons: Sequence[str],
    since_ms: int | None,
    until_ms: int | None,
) -> Iterator[dict[str, Any]]:
    """The records with one of ``reasons`` (all when empty), failed in ``[since, until)``."""
    wanted = set(reasons)
    for record in records:
        failed_at = _millis(record["failed_at"])
        if wanted and record["reason"] not in wanted:
            continue
        if since_ms is not None and failed_at < since_ms:
            continue
        if until_ms is not None and failed_at >= until_ms:
            continue
        yield record


def _millis(value: Any) -> int:
    # fastavro returns timestamp-millis as an aware datetime.
    return int(value.timestamp() * 1000) if hasattr(value, "timestamp") else int(value)


def _stats(records: Iterator[dict[str, Any]]) -> int:
    counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
    first: int | None = None
    last: int | None = None
    for record in records:
        counts[(record["pipeline"], record["reason"], record["stage"])] += 1
        when = _millis(record["failed_at"])
        first = when if first is None else min(first, when)
        last = when if last is None else max(last, when)
    print(f"{'pipeline':<10}{'reason':<20}{'stage':<12}{'count':>10}")
    for (pipeline, reason, stage), n in sorted(counts.items()):
        print(f"{pipeline:<10}{reason:<20}{stage:<12}{n:>10,}")
    print(f"{'total':<42}{sum(counts.values()):>10,}")
    if first is not None and last is not None:
        print(f"failed between {format_time_ms(first)} and {format_time_ms(last)}")
    return 0


def _show(records: Iterator[dict[str, Any]]) -> int:
    for record in records:
        out = dict(record)
        out["failed_at"] = format_time_ms(_millis(record["failed_at"]))
        payload = record["payload"]
        try:
            out["payload"] = payload.decode("utf-8")
        except UnicodeDecodeError:
            # Not text: shown as base64 under its own key, so no reader mistakes it.
            del out["payload"]
            out["payload_base64"] = base64.b64encode(payload).decode("ascii")
        sys.stdout.write(orjson.dumps(out).decode("utf-8") + "\n")
    return 0


def _replay(
    records: Iterator[dict[str, Any]],
    args: argparse.Namespace,
    delivery: list[str],
    deliver: Callable[[Sequence[str]], int],
) -> int:
    by_pipeline: dict[str, list[bytes]] = collections.defaultdict(list)
    not_replayed: collections.Counter[str] = collections.Counter()
    skipped = 0
    for record in records:
        payload = record["payload"]
        # An unreadable file's letter has no payload, and a line holds one record: a
        # payload with a line break cannot be fed back as one line.
        if not payload or b"\n" in payload:
            skipped += 1
            continue
        if record["pipeline"] in _NOT_REPLAYED:
            not_replayed[record["pipeline"]] += 1
            continue
        by_pipeline[record["pipeline"]].append(payload)
    for pipeline, count in sorted(not_replayed.items()):
        print(
            f"moesif-beam deadletters: {count:,} {pipeline} dead letters are not replayed: "
            f"{_NOT_REPLAYED[pipeline]}",
            file=sys.stderr,
        )
    if skipped:
        print(
            f"moesif-beam deadletters: {skipped:,} dead letters have no replayable payload "
            "(unreadable files, or payloads spanning lines); re-run their sources instead",
            file=sys.stderr,
        )
    if not by_pipeline:
        print("moesif-beam deadletters: nothing to replay", file=sys.stderr)
        return 0
    worst = 0
    with tempfile.TemporaryDirectory(prefix="moesif-beam-replay-") as work:
        for pipeline, payloads in sorted(by_pipeline.items()):
            path = os.path.join(work, f"replay-{pipeline}.jsonl")
            with open(path, "wb") as handle:
                handle.write(b"\n".join(payloads) + b"\n")
            fmt = args.format or _FORMATS[pipeline]
            print(
                f"moesif-beam deadletters: replaying {len(payloads):,} {pipeline} records "
                f"(--format {fmt})",
                file=sys.stderr,
                flush=True,
            )
            code = deliver([pipeline, "--input", path, "--format", fmt, *delivery])
            worst = max(worst, code)
    return worst


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="moesif-beam deadletters",
        description="Inspect and replay dead letters (Avro, on any Beam filesystem).",
        allow_abbrev=False,
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("stats", "counts by pipeline, reason and stage, with the time range"),
        ("show", "the records as JSON lines, payloads as text when they are text"),
        (
            "replay",
            "feed the payloads back through their pipeline; every other flag is a delivery "
            "option of `moesif-beam events`/`actions` (--moesif_base_url, --output_dir, ...)",
        ),
    ):
        sub = actions.add_parser(name, help=text, description=text, allow_abbrev=False)
        sub.add_argument(
            "--dead_letter",
            required=True,
            help="a dead-letter directory (e.g. moesif-out/dead_letter) or a glob of .avro files",
        )
        sub.add_argument(
            "--reason",
            action="append",
            default=[],
            choices=REASONS,
            help="only this reason (repeatable)",
        )
        sub.add_argument("--since", help="only dead letters written at or after this time")
        sub.add_argument("--until", help="only dead letters written before this time")
        if name == "replay":
            sub.add_argument(
                "--format",
                help="the input format of the payloads (default: the pipeline's default, "
                "wso2 for events, moesif for actions)",
            )
        sub.set_defaults(parser=sub)
    return parser


def main(argv: Sequence[str], deliver: Callable[[Sequence[str]], int]) -> int:
    """Run ``deadletters`` with ``argv``; ``deliver`` runs a pipeline command (for replay)."""
    parser = _parser()
    args, rest = parser.parse_known_args(list(argv))
    if rest and args.action != "replay":
        args.parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        since = parse_time_ms(args.since) if args.since else None
        until = parse_time_ms(args.until) if args.until else None
        records = matching(read_dead_letters(args.dead_letter), args.reason, since, until)
        if args.action == "stats":
            return _stats(records)
        if args.action == "show":
            return _show(records)
        return _replay(records, args, rest, deliver)
    except (ValueError, OSError) as exc:
        args.parser.error(str(exc))
    return EXIT_USAGE  # not reached: error() exits
