"""The flags only ``moesif-beam profiles`` has, and the settings they give its config.

``--as_of``, ``--profile_interval``, ``--segment_write_key`` (or env
``SEGMENT_WRITE_KEY``) and ``--segment_base_url``. The write key is a secret like the
application id: it becomes a :class:`~moesif_beam.transforms.delivery.Secret` at once and
is scrubbed from every log line with it (:class:`Secrets`).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from moesif_beam.pipelines.config import DEFAULT_SEGMENT_URL
from moesif_beam.transforms.common.timefmt import parse_time_ms
from moesif_beam.transforms.delivery import Secret

__all__ = ["SEGMENT_KEY_ENV", "Secrets", "add_profiles_flags", "profiles_settings", "write_key"]

SEGMENT_KEY_ENV = "SEGMENT_WRITE_KEY"


class Secrets(Secret):
    """Several secrets scrubbed as one, for the log formatter that takes one."""

    __slots__ = ("_all",)

    def __init__(self, *secrets: Secret | None) -> None:
        super().__init__("")
        self._all = tuple(s for s in secrets if s is not None)

    def scrub(self, text: str) -> str:
        """Scrub every one of the secrets from ``text``."""
        for secret in self._all:
            text = secret.scrub(text)
        return text


def write_key(args: argparse.Namespace) -> Secret | None:
    """The Segment write key from ``--segment_write_key`` or the environment, if any."""
    value = getattr(args, "segment_write_key", None) or os.environ.get(SEGMENT_KEY_ENV)
    return Secret(value) if value else None


def add_profiles_flags(parser: argparse.ArgumentParser) -> None:
    """The profiles command's own flags."""
    group = parser.add_argument_group("profiles")
    group.add_argument(
        "--as_of",
        metavar="TIME",
        help="bounded runs: compute profiles as of this ISO 8601 time (default: the newest "
        "request time in the input, so a backfill is deterministic); later records are left "
        "out and counted in after_as_of",
    )
    group.add_argument(
        "--profile_interval",
        type=float,
        default=3600.0,
        help="streaming: seconds of event time between profile updates (default 3600); a "
        "profile is updated at the end of each interval in which it had activity",
    )
    group.add_argument(
        "--segment_write_key",
        help=f"send identify and group calls to Segment with this source write key (or env "
        f"{SEGMENT_KEY_ENV}); never printed, logged or written to dead letters",
    )
    group.add_argument(
        "--segment_base_url",
        default=DEFAULT_SEGMENT_URL,
        help=f"Segment's Tracking API (default {DEFAULT_SEGMENT_URL}, the US region)",
    )


def profiles_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~moesif_beam.pipelines.config.PipelineConfig` fields the flags set.

    Raises:
        ValueError: ``--as_of`` is not a time.
    """
    as_of_ms = None
    if args.as_of:
        try:
            as_of_ms = parse_time_ms(args.as_of)
        except ValueError as exc:
            msg = f"--as_of {args.as_of!r} is not a time: {exc}"
            raise ValueError(msg) from None
    return {
        "as_of_ms": as_of_ms,
        "profile_interval": args.profile_interval,
        "segment_write_key": write_key(args),
        "segment_base_url": args.segment_base_url,
    }
