"""The retry policy: what follows one attempt to post a batch, as pure functions."""

from __future__ import annotations

import email.utils
import enum
from dataclasses import dataclass
from datetime import UTC

__all__ = ["Action", "Decision", "RetryPolicy", "classify", "decide", "parse_retry_after"]


class Action(enum.Enum):
    """What to do with a batch after one attempt to post it."""

    DONE = "done"  # 2xx: delivered
    RETRY = "retry"  # transient: wait and post the same batch again
    SPLIT = "split"  # 413: too big for the collector; post halves
    BISECT = "bisect"  # 400-like: some record is bad; halve until it is isolated
    GIVE_UP = "give_up"  # transient, but the retry budget is spent: dead-letter the batch
    FATAL = "fatal"  # configuration problem (401/403/404...): stop the run


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`decide`: an action and, for RETRY, how long to wait first."""

    action: Action
    delay: float = 0.0


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter, inside a bounded total time per batch.

    Attributes:
        max_retry_seconds: total time one batch may spend being retried before its
            records become ``retries_exhausted`` dead letters.
        base_delay: the first wait, in seconds; each further wait doubles it.
        max_delay: the cap on one wait, before any Retry-After the collector asks for.
    """

    max_retry_seconds: float = 300.0
    base_delay: float = 0.5
    max_delay: float = 30.0

    def __post_init__(self) -> None:
        if self.max_retry_seconds < 0:
            msg = f"max_retry_seconds must be >= 0, got {self.max_retry_seconds}"
            raise ValueError(msg)
        if not 0 < self.base_delay <= self.max_delay:
            msg = f"need 0 < base_delay <= max_delay, got {self.base_delay}, {self.max_delay}"
            raise ValueError(msg)


def classify(status: int | None) -> Action:
    """Classify one HTTP outcome; ``None`` means no response (connection error, timeout).

    2xx is success. 408, 429, 5xx except 501, and no response are transient. 413 means
    the batch is too large. 400, 409 and 422 blame the body, so some record in it is bad.
    Everything else (401, 403, 404, 405, 501, redirects, ...) means the collector refuses
    our configuration, which no retry or dead letter can fix.
    """
    if status is None:
        return Action.RETRY
    if 200 <= status < 300:
        return Action.DONE
    if status in (408, 429) or (500 <= status < 600 and status != 501):
        return Action.RETRY
    if status == 413:
        return Action.SPLIT
    if status in (400, 409, 422):
        return Action.BISECT
    return Action.FATAL


def decide(
    status: int | None,
    attempt: int,
    elapsed: float,
    retry_after: float | None,
    policy: RetryPolicy,
    jitter: float,
) -> Decision:
    """Decide what follows one attempt to post a batch.

    Args:
        status: the HTTP status, or None when no response arrived.
        attempt: how many retries this batch has had so far (0 after the first post).
        elapsed: seconds since the batch's first post.
        retry_after: seconds the collector asked us to wait (``Retry-After``), if any.
        policy: the backoff policy.
        jitter: a number in [0, 1) that spreads the waits of concurrent workers.

    Returns:
        The action; for RETRY also the wait, which is never shorter than ``retry_after``.
        A retry that would end past ``policy.max_retry_seconds`` becomes GIVE_UP.
    """
    action = classify(status)
    if action is not Action.RETRY:
        return Decision(action)
    ceiling = min(policy.max_delay, policy.base_delay * 2**attempt)
    delay = ceiling * (0.5 + jitter / 2)  # "equal jitter": at least half the backoff
    if retry_after is not None:
        delay = max(delay, retry_after)
    if elapsed + delay > policy.max_retry_seconds:
        return Decision(Action.GIVE_UP)
    return Decision(Action.RETRY, delay)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Read a ``Retry-After`` header (delta seconds or an HTTP date) as seconds from ``now``."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)
