"""Lenient time parsing and Moesif's canonical time format.

Moesif reads ISO 8601 times; we always send UTC with exactly three fractional digits
and a ``Z`` (``2026-11-01T03:34:36.451Z``). Sources are less tidy: WSO2 drops zero
seconds and milliseconds (``...T10:15Z``), some logs carry offsets, and epoch
milliseconds happen. Everything here is a pure function over plain values.
"""

from __future__ import annotations

import functools
import math
import time
from datetime import UTC, datetime

__all__ = ["format_time_ms", "parse_time_ms"]

# Epoch numbers at or above this are milliseconds (1e11 s is the year 5138; 1e11 ms is 1973),
# below it seconds. Logs never carry dates before 1973 in milliseconds.
_EPOCH_MS_THRESHOLD = 100_000_000_000


def parse_time_ms(value: object) -> int:
    """Parse a timestamp into integer milliseconds since the Unix epoch, UTC.

    Accepts ISO 8601 strings with or without seconds, fractional digits (any count; beyond
    microseconds they are truncated), a ``Z`` or a numeric offset; a time without a zone is
    read as UTC. Also accepts epoch seconds or milliseconds as a number or a digit string.

    Raises:
        ValueError: if the value is not a time in any of those forms. Booleans are refused.
    """
    if isinstance(value, bool):
        msg = "a boolean is not a time"
        raise ValueError(msg)
    if isinstance(value, int | float):
        return _epoch_to_ms(value)
    if not isinstance(value, str):
        msg = f"expected a string or number, got {type(value).__name__}"
        raise ValueError(msg)
    text = value.strip()
    if not text:
        msg = "empty time"
        raise ValueError(msg)
    if text.isdigit() or (text[0] == "-" and text[1:].isdigit()):
        return _epoch_to_ms(int(text))
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        msg = f"not an ISO 8601 time: {text[:40]!r}"
        raise ValueError(msg) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    # timestamp() goes through float; integer arithmetic keeps milliseconds exact.
    seconds = int(parsed.timestamp() // 1)
    return seconds * 1000 + parsed.microsecond // 1000


def _epoch_to_ms(number: float) -> int:
    if not math.isfinite(number):
        msg = "not a finite number"
        raise ValueError(msg)
    if abs(number) >= _EPOCH_MS_THRESHOLD:
        return int(number)
    return int(number * 1000)


def format_time_ms(ms: int) -> str:
    """Format epoch milliseconds as Moesif's canonical ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (UTC)."""
    seconds, millis = divmod(ms, 1000)
    return f"{_second(seconds)}.{millis:03d}Z"


# This runs twice per event, and a log's events crowd into few seconds: remembering the
# formatted second makes most calls a dictionary lookup.
@functools.lru_cache(maxsize=4096)
def _second(seconds: int) -> str:
    t = time.gmtime(seconds)
    return (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    )
