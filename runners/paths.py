"""Local paths on engines whose workers do not share the launcher's working directory.

On the local runners every worker runs on this machine in this directory, and paths stay
as given. Elsewhere a relative path means nothing to a worker:

- workers on this machine (Flink ``[local]``, a Flink cluster or job server on a loopback
  address, Prism, Spark's ``local[...]``): relative local paths become absolute;
- workers on other machines (Dataflow; Flink, Spark or a portable job service at a
  non-loopback address): a relative local path is refused in one line. Dataflow workers
  never see this machine's files, so there every local path is refused; a remote Flink
  cluster may share a mounted filesystem, so an absolute path is taken as that promise.

``--metrics_out`` is written by this process after the run, never by a worker: it is made
absolute like the others and never refused. ``--ca_bundle`` is made absolute on this
machine; elsewhere it must exist at that path on every worker (a custom container).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from apache_beam.io.filesystems import FileSystems

from moesif_beam.runners.options import UsageError, runs_locally

__all__ = ["LAUNCHER_PATHS", "WORKER_PATHS", "Workers", "place_paths", "where_workers_run"]

# Flag -> what the workers do with it.
WORKER_PATHS = {
    "input": "read",
    "output_dir": "write",
    "dead_letter": "write",
    "schema_store": "read and write",
    "dedup_journal": "read and write",
}
# Made absolute where workers need it, never refused (see the module docstring).
LAUNCHER_PATHS = ("metrics_out", "ca_bundle")

_THIS_MACHINE_FLINK = frozenset({"[local]", "[auto]", "[collection]"})


@dataclass(frozen=True)
class Workers:
    """Where a run's workers are.

    Attributes:
        where: ``local`` (the local runners: this directory), ``this-machine`` or
            ``elsewhere``.
        who: the workers, named for a message ("Dataflow workers").
        remote_only: whether they can see no local file at all (Dataflow).
        hint: what to give instead of a local path.
    """

    where: str
    who: str = ""
    remote_only: bool = False
    hint: str = ""


def _is_loopback(address: str) -> bool:
    """Whether ``host[:port]`` (or a URL of it) names this machine by a loopback address."""
    rest = address.split("://", 1)[-1].split("/", 1)[0]
    if rest.startswith("["):  # [::1]:8081
        host = rest[1:].split("]", 1)[0]
    else:
        host = rest.rsplit(":", 1)[0] if rest.count(":") == 1 else rest
    if host in ("", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def where_workers_run(beam_args: Sequence[str]) -> Workers:
    """Where the workers of a run with these Beam flags are."""
    if runs_locally(list(beam_args)):
        return Workers("local")
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--runner", "--flink_master", "--job_endpoint", "--spark_master_url"):
        parser.add_argument(flag, default="")
    known, _ = parser.parse_known_args(list(beam_args))
    runner = str(known.runner).rsplit(".", 1)[-1].lower()
    if runner in ("dataflowrunner", "testdataflowrunner"):
        return Workers("elsewhere", "Dataflow workers", remote_only=True, hint="gs://BUCKET/...")
    address, who = "", ""
    if runner == "flinkrunner":
        master = known.flink_master or "[auto]"
        if master in _THIS_MACHINE_FLINK:
            return Workers("this-machine")
        address, who = master, f"the workers of the Flink cluster at {master}"
    elif runner == "sparkrunner":
        master = known.spark_master_url or "local[4]"
        if master.startswith("local"):
            return Workers("this-machine")
        address, who = master, f"the workers of the Spark cluster at {master}"
    elif runner == "portablerunner" and known.job_endpoint not in ("", "embed"):
        address = known.job_endpoint
        who = f"the workers of the job service at {known.job_endpoint}"
    if address and not _is_loopback(address):
        return Workers("elsewhere", who, hint="an absolute path on a filesystem they all mount")
    # A loopback address, Prism, or a runner we cannot place: on this machine, as far as
    # we know; an absolute path is never worse there than a relative one.
    return Workers("this-machine")


def place_paths(
    paths: Mapping[str, str | None],
    beam_args: Sequence[str],
    defaults: Mapping[str, str | None] | None = None,
) -> dict[str, str | None]:
    """The path flags' values as the run's workers need them.

    Args:
        paths: flag name (without ``--``) to value, for the flags in :data:`WORKER_PATHS`
            and :data:`LAUNCHER_PATHS`; empty or None values are left alone.
        beam_args: the run's Beam flags (with the profile applied).
        defaults: the flags' defaults, to say "(the default)" when one is refused.

    Raises:
        UsageError: a local path the workers cannot see, one line naming the flag.
    """
    workers = where_workers_run(beam_args)
    if workers.where == "local":
        return dict(paths)
    placed: dict[str, str | None] = {}
    for name, value in paths.items():
        if not value or FileSystems.get_scheme(value) is not None:  # a URL: gs://, s3://...
            placed[name] = value
            continue
        verb = WORKER_PATHS.get(name)
        relative = not os.path.isabs(value)
        if verb and workers.where == "elsewhere" and (relative or workers.remote_only):
            default = " (the default)" if defaults and defaults.get(name) == value else ""
            kind = "a local path" if workers.remote_only else "a relative local path"
            msg = (
                f"--{name} {value}{default} is {kind}; {workers.who} cannot {verb} it: "
                f"use {workers.hint}"
            )
            raise UsageError(msg)
        placed[name] = os.path.abspath(value)
    return placed
