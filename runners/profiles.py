"""Runner profiles: one flag (``--profile``) for the Beam options that make an engine work.

A profile is a set of default Beam flags and the flags its engine cannot do without. The
user's own flags always win: a profile's default is added only when the user did not give
that flag. Whatever the profile, a Dataflow run (``--runner DataflowRunner``) needs
``--project``, ``--region`` and ``--temp_location``; their absence is one line, named
before anything is built.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import moesif_beam
from moesif_beam.runners.options import UsageError

__all__ = [
    "DATAFLOW_REQUIRED",
    "PROFILES",
    "Profile",
    "add_profile_flag",
    "apply_profile",
    "given_flags",
    "package_setup_file",
]

# What a Dataflow job cannot be created without (Beam asks for the first and last; the
# region is where the job runs, which Beam would otherwise guess from gcloud's config).
DATAFLOW_REQUIRED = ("project", "region", "temp_location")
_DATAFLOW_EXAMPLE = "--project my-project --region us-central1 --temp_location gs://my-bucket/tmp"


@dataclass(frozen=True)
class Profile:
    """One engine's Beam options.

    Attributes:
        name: the value of ``--profile``.
        use: when to choose it, in a phrase (shown in ``--help``).
        defaults: Beam flags and values added unless the user gives the flag.
        required: Beam flags (without ``--``) the user must give.
        example: how the required flags look, for the error message.
    """

    name: str
    use: str
    defaults: tuple[tuple[str, str], ...] = ()
    required: tuple[str, ...] = ()
    example: str = ""


PROFILES: dict[str, Profile] = {
    profile.name: profile
    for profile in (
        Profile(
            "local",
            "this machine, Beam's local runners (the default: FnApiRunner, Prism for streams)",
        ),
        Profile(
            "flink-local",
            "the single-machine Flink cluster of `moesif-beam flink-local` (REST on 8081)",
            (("runner", "FlinkRunner"), ("flink_master", "127.0.0.1:8081"), ("parallelism", "2")),
        ),
        Profile(
            "flink-cluster",
            "a Flink cluster elsewhere, named by --flink_master HOST:PORT",
            (("runner", "FlinkRunner"),),
            ("flink_master",),
            "--flink_master flink-jobmanager:8081",
        ),
        Profile(
            "dataflow",
            "Google Cloud Dataflow; ships this package to the workers with --setup_file",
            (("runner", "DataflowRunner"),),
            DATAFLOW_REQUIRED,
            _DATAFLOW_EXAMPLE,
        ),
    )
}


def add_profile_flag(parser: argparse.ArgumentParser) -> None:
    """The ``--profile`` flag of ``events`` and ``actions``."""
    parser.add_argument(
        "--profile",
        default="local",
        choices=list(PROFILES),
        help="the engine, with the Beam options it needs (your own Beam flags win): "
        + "; ".join(f"{p.name}: {p.use}" for p in PROFILES.values()),
    )


def given_flags(beam_args: Sequence[str]) -> set[str]:
    """The names (without ``--``) of the flags in ``beam_args``."""
    return {
        arg[2:].split("=", 1)[0]
        for arg in beam_args
        if arg.startswith("--") and len(arg) > 2 and arg[2:3] != "-"
    }


def package_setup_file() -> str | None:
    """This package's ``setup.py``, for ``--setup_file``; None when installed from a wheel.

    In a checkout, an editable install and the Flex Template image (which installs the
    source tree) the package folder ``moesif_beam/`` sits next to the ``setup.py`` that
    builds it.
    """
    candidate = Path(moesif_beam.__file__).resolve().parent.parent / "setup.py"
    try:
        text = candidate.read_text(encoding="utf-8")
    except OSError:
        return None
    return str(candidate) if 'name="moesif-beam"' in text else None


def _runner(beam_args: Sequence[str]) -> str:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--runner", default="")
    known, _ = parser.parse_known_args(list(beam_args))
    return str(known.runner).rsplit(".", 1)[-1].lower()


def _flags(names: Sequence[str]) -> str:
    flags = [f"--{name}" for name in names]
    return flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} and {flags[-1]}"


def apply_profile(name: str, beam_args: Sequence[str]) -> list[str]:
    """The Beam flags of a run: the profile's defaults the user did not override, then theirs.

    Raises:
        UsageError: an unknown profile, or a flag the profile (or Dataflow) needs is missing.
    """
    profile = PROFILES.get(name)
    if profile is None:
        msg = f"unknown --profile {name!r}; profiles: {', '.join(PROFILES)}"
        raise UsageError(msg)
    given = given_flags(beam_args)
    defaults = [f"--{flag}={value}" for flag, value in profile.defaults if flag not in given]
    if profile.name == "dataflow" and not given & {"setup_file", "sdk_container_image"}:
        setup_file = package_setup_file()
        if setup_file is None:
            msg = (
                "--profile dataflow ships this package with --setup_file, but no setup.py "
                "is next to it (installed from a wheel?): give --setup_file PATH/setup.py of "
                "a moesif-beam checkout, or --sdk_container_image IMAGE with moesif-beam in it"
            )
            raise UsageError(msg)
        defaults.append(f"--setup_file={setup_file}")
    resolved = [*defaults, *beam_args]
    required, example = list(profile.required), profile.example
    who = f"--profile {profile.name}"
    if _runner(resolved) in ("dataflowrunner", "testdataflowrunner"):
        required += [flag for flag in DATAFLOW_REQUIRED if flag not in required]
        example = _DATAFLOW_EXAMPLE
        if profile.name != "dataflow":
            who = "--runner DataflowRunner"
    missing = [flag for flag in required if flag not in given]
    if missing:
        msg = f"{who} needs {_flags(missing)} (for example {example})"
        raise UsageError(msg)
    return resolved
