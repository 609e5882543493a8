"""The Dataflow Flex Template: its metadata, made from the command's own flags, and its launcher.

``metadata.json`` beside this file documents every parameter of ``events``, ``actions`` and
``profiles``,
generated from the argparse parser (``python -m moesif_beam.runners.dataflow.flex_template
--write``); a unit test keeps it in sync. A template takes parameters only as
``--name=value``, so one more parameter, ``pipeline``, chooses the command, and switches
(``--follow``) are given as ``true`` or ``false``. :func:`main` is what the template's
launcher runs (``template_main.py``): it turns those parameters back into a command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["METADATA_FILE", "main", "metadata", "template_argv"]

METADATA_FILE = Path(__file__).resolve().parent / "metadata.json"
_PIPELINES = ("events", "actions", "profiles")
_NUMBER = {int: r"^[0-9]+$", float: r"^[0-9]+(\.[0-9]+)?$"}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from moesif_beam.runners.cli import _parser  # noqa: PLC0415 - the command imports Beam

    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: commands.choices[name] for name in _PIPELINES}


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        action
        for action in parser._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction)
    ]


def _switches() -> set[str]:
    """The flags that take no value (``--follow``), by parameter name."""
    return {
        action.option_strings[0][2:]
        for parser in _subparsers().values()
        for action in _flags(parser)
        if action.nargs == 0
    }


def _describe(action: argparse.Action) -> str:
    text = (action.help or "").strip()
    if action.nargs == 0:
        return f"{text}. true or false (default false)" if text else "true or false"
    default = action.default
    if default not in (None, "", False) and "default" not in text:
        text = f"{text} (default {default})" if text else f"default {default}"
    return text


def _parameter(name: str, actions: dict[str, argparse.Action]) -> dict[str, Any]:
    """One template parameter for a flag of one or both pipelines."""
    texts = {pipeline: _describe(action) for pipeline, action in actions.items()}
    if len(set(texts.values())) == 1:
        help_text = next(iter(texts.values()))
    else:  # --format: each pipeline its own formats
        help_text = "; ".join(f"{pipeline}: {text}" for pipeline, text in texts.items())
    parameter: dict[str, Any] = {
        "name": name,
        "label": f"--{name}",
        "helpText": help_text or f"see moesif-beam {'/'.join(actions)} --help",
        "isOptional": True,
    }
    first = next(iter(actions.values()))
    choices = sorted({c for action in actions.values() for c in (action.choices or ())})
    if first.nargs == 0:
        parameter["regexes"] = ["^(true|false)$"]
    elif choices:
        parameter["regexes"] = [f"^({'|'.join(choices)})$"]
    elif first.type in _NUMBER:
        parameter["regexes"] = [_NUMBER[first.type]]
    return parameter


def metadata() -> dict[str, Any]:
    """The Flex Template metadata: every parameter of ``events``, ``actions`` and ``profiles``."""
    by_name: dict[str, dict[str, argparse.Action]] = {}
    for pipeline, parser in _subparsers().items():
        for action in _flags(parser):
            by_name.setdefault(action.option_strings[0][2:], {})[pipeline] = action
    parameters = [
        {
            "name": "pipeline",
            "label": "Pipeline",
            "helpText": "events: API-gateway logs to /v1/events/batch; actions: action "
            "streams to /v1/actions/batch; profiles: users and companies computed from the "
            "traffic to /v1/users/batch and /v1/companies/batch (and Segment)",
            "isOptional": False,
            "regexes": [f"^({'|'.join(_PIPELINES)})$"],
        },
        *(_parameter(name, actions) for name, actions in by_name.items()),
    ]
    return {
        "name": "moesif-beam",
        "description": "Deliver API-gateway logs (events) or action streams (actions) to "
        "Moesif's Collector API, with deduplication, Moesif's metadata rules and dead "
        "letters, or the users and companies computed from them (profiles). Every parameter "
        "is a flag of `moesif-beam events|actions|profiles`; Dataflow's "
        "own options (project, region, temp location, workers) are the launcher's.",
        "parameters": parameters,
    }


def render() -> str:
    """``metadata.json`` as it is kept in the repository."""
    return json.dumps(metadata(), indent=2) + "\n"


def template_argv(argv: Sequence[str]) -> list[str]:
    """The ``moesif-beam`` command line for the launcher's ``--name=value`` arguments.

    ``--pipeline=events`` becomes the command; ``--follow=true`` becomes ``--follow`` and
    ``--follow=false`` nothing; without ``--profile`` or ``--runner`` the run is a
    Dataflow one (``--profile dataflow``). Everything else passes as it came.
    """
    switches = _switches()
    pipeline = None
    rest: list[str] = []
    for arg in argv:
        name, _, value = arg.partition("=")
        if name == "--pipeline":
            pipeline = value
        elif name[2:] in switches and value:
            if value.lower() == "true":
                rest.append(name)
            elif value.lower() != "false":
                msg = f"{name} takes true or false, got {value!r}"
                raise ValueError(msg)
        else:
            rest.append(arg)
    if pipeline not in _PIPELINES:
        msg = f"--pipeline must be one of {', '.join(_PIPELINES)}, got {pipeline!r}"
        raise ValueError(msg)
    if not any(a.startswith(("--profile", "--runner")) for a in rest):
        rest.append("--profile=dataflow")
    return [pipeline, *rest]


def main(argv: Sequence[str] | None = None) -> int:
    """The Flex Template launcher's entry point: run the chosen pipeline's command."""
    from moesif_beam.runners import cli  # noqa: PLC0415

    try:
        command = template_argv(list(sys.argv[1:] if argv is None else argv))
    except ValueError as exc:
        print(f"moesif-beam flex template: {exc}", file=sys.stderr, flush=True)
        return 2
    return cli.main(command)


def _write_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print or --write metadata.json.")
    parser.add_argument("--write", action="store_true", help=f"write {METADATA_FILE}")
    args = parser.parse_args(argv)
    if args.write:
        METADATA_FILE.write_text(render(), encoding="utf-8")
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(_write_main())
