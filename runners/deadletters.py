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
import dataclasses
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import fastavro
import orjson
from apache_beam.io.filesystems import FileSystems

from moesif_beam.runners.options import DEFAULTS, ArgumentParser
from moesif_beam.transforms.common.timefmt import format_time_ms, parse_time_ms
from moesif_beam.transforms.deadletters import REASONS
from moesif_beam.transforms.formats.normalize import FORMATS

__all__ = [
    "ReplayPlan",
    "main",
    "matching",
    "plan_replay",
    "read_dead_letters",
    "replay_format",
    "replay_summary",
    "replay_totals",
    "show_line",
    "stats_lines",
]

EXIT_USAGE = 2

# The input format of a dead letter that names none (written before dead letters recorded
# `format`), per pipeline: `auto` decides each events record by its shape, WSO2 lines
# included, with the transaction ids of its own format; actions and profiles take their
# command's default.
_FALLBACK_FORMATS = {"events": "auto", "actions": "moesif", "profiles": "wso2"}
# Dead letters of deliveries that are not input records: a profile upsert or a Segment call
# is recomputed by re-running profiles (upserts and messageIds make that harmless). Nor are
# the input records of profiles: profiles computed from the replayed records alone would
# overwrite, in Moesif and Segment, the traits computed from all of the input (an older
# lastSeenTime, a 24-hour rollup of a few calls).
_RERUN_PROFILES = "re-run moesif-beam profiles over the whole input (the lines fixed) instead"
_NOT_REPLAYED = {
    "profile-upserts": "re-run moesif-beam profiles over the same input instead",
    "profiles": _RERUN_PROFILES
    + ": profiles computed from these records alone would overwrite the traits of all of it",
}


def read_dead_letters(location: str) -> Iterator[dict[str, Any]]:
    """Every dead letter under ``location``: a directory of ``.avro`` files, or a glob.

    Each is read with its file's own schema: letters written before a field existed lack
    that key (``format``, for one).

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
    records: Iterable[dict[str, Any]],
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


def stats_lines(records: Iterable[dict[str, Any]]) -> list[str]:
    """The ``stats`` table: counts by pipeline, reason and stage, a total, the time range."""
    counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
    first: int | None = None
    last: int | None = None
    for record in records:
        counts[(record["pipeline"], record["reason"], record["stage"])] += 1
        when = _millis(record["failed_at"])
        first = when if first is None else min(first, when)
        last = when if last is None else max(last, when)
    # profile-upserts is wider than the header.
    width = max([10, *(len(pipeline) + 2 for pipeline, _, _ in counts)])
    lines = [f"{'pipeline':<{width}}{'reason':<20}{'stage':<12}{'count':>10}"]
    for (pipeline, reason, stage), n in sorted(counts.items()):
        lines.append(f"{pipeline:<{width}}{reason:<20}{stage:<12}{n:>10,}")
    lines.append(f"{'total':<{width + 32}}{sum(counts.values()):>10,}")
    if first is not None and last is not None:
        lines.append(f"failed between {format_time_ms(first)} and {format_time_ms(last)}")
    return lines


def show_line(record: dict[str, Any]) -> str:
    """One dead letter as a JSON line: the payload as text when it is UTF-8, else base64."""
    out = dict(record)
    out["failed_at"] = format_time_ms(_millis(record["failed_at"]))
    payload = record["payload"]
    try:
        out["payload"] = payload.decode("utf-8")
    except UnicodeDecodeError:
        # Not text: shown as base64 under its own key, so no reader mistakes it.
        del out["payload"]
        out["payload_base64"] = base64.b64encode(payload).decode("ascii")
    return orjson.dumps(out).decode("utf-8")


def replay_format(record: dict[str, Any], given: str | None) -> str | None:
    """The ``--format`` to replay ``record`` with: ``given``, else the letter's, else a default.

    The default (for letters that record no format) is ``auto`` for events and the
    command's default for actions and profiles; None for a pipeline replay does not know.
    """
    return given or record.get("format") or _FALLBACK_FORMATS.get(record["pipeline"])


@dataclasses.dataclass
class ReplayPlan:
    """What a replay will run: payloads grouped by (pipeline, format), and what it leaves out.

    Attributes:
        groups: ``(pipeline, format)`` to the payloads of one run, in the letters' order.
        not_replayed: letters of pipelines replay leaves to another command, by pipeline.
        no_payload: letters with nothing to feed back (an unreadable file's letter, or a
            payload spanning lines, which a line-based input cannot carry as one record).
    """

    groups: dict[tuple[str, str], list[bytes]] = dataclasses.field(default_factory=dict)
    not_replayed: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    no_payload: int = 0


def plan_replay(records: Iterable[dict[str, Any]], given_format: str | None) -> ReplayPlan:
    """Group the replayable letters' payloads by pipeline and by the format to read them as.

    A run reads one format, so letters of one pipeline written by runs of different
    formats (or recording none) become separate runs.

    Raises:
        ValueError: a letter's pipeline is unknown, or its format is not one of its
            pipeline's (naming the format, and ``--format`` if it came from there).
    """
    plan = ReplayPlan()
    for record in records:
        payload = record["payload"]
        if not payload or b"\n" in payload:
            plan.no_payload += 1
            continue
        pipeline = record["pipeline"]
        if pipeline in _NOT_REPLAYED:
            plan.not_replayed[pipeline] += 1
            continue
        fmt = replay_format(record, given_format)
        if pipeline not in FORMATS or fmt is None:
            msg = f"dead letters of an unknown pipeline {pipeline!r} cannot be replayed"
            raise ValueError(msg)
        if fmt not in FORMATS[pipeline]:
            origin = "--format" if given_format else "their format field says"
            known = ", ".join(sorted(FORMATS[pipeline]))
            msg = f"{pipeline} dead letters: {origin} {fmt!r}, not a {pipeline} format ({known})"
            raise ValueError(msg)
        plan.groups.setdefault((pipeline, fmt), []).append(payload)
    return plan


def replay_totals(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The counters of a replay's runs (their ``--metrics_out`` documents), summed.

    Every counter is the sum over the runs; ``invariant_holds`` holds when it holds for each;
    ``runs`` keeps each run's own document.
    """
    totals: dict[str, Any] = {}
    for run in runs:
        for key, value in run.items():
            if isinstance(value, int) and not isinstance(value, bool):
                totals[key] = totals.get(key, 0) + value
    totals["elapsed_seconds"] = round(sum(run.get("elapsed_seconds", 0.0) for run in runs), 3)
    totals["invariant_holds"] = all(run.get("invariant_holds", False) for run in runs)
    totals["runs"] = list(runs)
    return totals


def replay_summary(totals: dict[str, Any], dead_letter_dir: str) -> list[str]:
    """The replay's closing lines: what was sent and, loudly, what failed again and where."""
    read = totals.get("read", 0)
    dead = totals.get("dead_letters", 0)
    runs = len(totals["runs"])
    lines = [
        f"moesif-beam deadletters replay: {read:,} records in {runs} run{'s' * (runs != 1)}: "
        f"sent {totals.get('sent', 0):,}, duplicates {totals.get('duplicates', 0):,}, "
        f"dead letters again {dead:,}"
    ]
    if dead:
        what = "every replayed record" if dead == read else f"{dead:,} of {read:,} records"
        lines.append(
            f"  {what} failed again -> {dead_letter_dir}; see why with: "
            f"moesif-beam deadletters stats --dead_letter {dead_letter_dir}"
        )
    return lines


def _stats(records: Iterable[dict[str, Any]]) -> int:
    for line in stats_lines(records):
        print(line)
    return 0


def _show(records: Iterable[dict[str, Any]]) -> int:
    for record in records:
        sys.stdout.write(show_line(record) + "\n")
    return 0


def _replay_dead_letter_dir(delivery: Sequence[str]) -> str:
    """Where the replay's runs write their own dead letters: under their ``--output_dir``."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--output_dir", default=DEFAULTS["output_dir"])
    known, _ = parser.parse_known_args(list(delivery))
    return f"{known.output_dir.rstrip('/')}/dead_letter"


def _replay(
    records: Iterable[dict[str, Any]],
    args: argparse.Namespace,
    delivery: list[str],
    deliver: Callable[[Sequence[str]], int],
) -> int:
    plan = plan_replay(records, args.format)
    for pipeline, count in sorted(plan.not_replayed.items()):
        print(
            f"moesif-beam deadletters: {count:,} {pipeline} dead letters are not replayed: "
            f"{_NOT_REPLAYED[pipeline]}",
            file=sys.stderr,
        )
    if plan.no_payload:
        print(
            f"moesif-beam deadletters: {plan.no_payload:,} dead letters have no replayable "
            "payload (unreadable files, or payloads spanning lines); re-run their sources "
            "instead",
            file=sys.stderr,
        )
    if not plan.groups:
        print("moesif-beam deadletters: nothing to replay", file=sys.stderr)
        return 0
    worst = 0
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="moesif-beam-replay-") as work:
        for (pipeline, fmt), payloads in sorted(plan.groups.items()):
            path = os.path.join(work, f"replay-{pipeline}-{fmt}.jsonl")
            with open(path, "wb") as handle:
                handle.write(b"\n".join(payloads) + b"\n")
            print(
                f"moesif-beam deadletters: replaying {len(payloads):,} {pipeline} records "
                f"(--format {fmt})",
                file=sys.stderr,
                flush=True,
            )
            # Each run's counters go to a file of ours: the replay sums them (into the
            # user's --metrics_out, if given) instead of each run overwriting the last's.
            metrics = os.path.join(work, f"metrics-{pipeline}-{fmt}.json")
            argv = [pipeline, "--input", path, "--format", fmt, *delivery]
            code = deliver([*argv, "--metrics_out", metrics])
            worst = max(worst, code)
            if os.path.exists(metrics):
                with open(metrics, "rb") as handle:
                    runs.append({**orjson.loads(handle.read()), "format": fmt})
            else:  # it stopped before counting (a refused id, a bad flag): say so
                print(
                    f"moesif-beam deadletters: the {pipeline} run (--format {fmt}, "
                    f"{len(payloads):,} records) exited {code} without counts; "
                    "the totals below leave it out",
                    file=sys.stderr,
                    flush=True,
                )
    if runs:
        totals = replay_totals(runs)
        lines = replay_summary(totals, _replay_dead_letter_dir(delivery))
        print("\n".join(lines), flush=True)
        if args.metrics_out:
            with FileSystems.create(args.metrics_out, mime_type="application/json") as handle:
                handle.write(orjson.dumps(totals, option=orjson.OPT_INDENT_2) + b"\n")
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
                help="read every payload in this input format (default: the format each "
                "dead letter records; for letters that record none, auto for events and "
                "the command's default for actions and profiles)",
            )
            sub.add_argument(
                "--metrics_out",
                help="write the replay's counters, summed over its runs (one per pipeline "
                "and format), as JSON",
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
