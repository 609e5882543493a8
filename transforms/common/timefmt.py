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

__all__ = ["MAX_TIME_MS", "MIN_TIME_MS", "check_time_ms", "format_time_ms", "parse_time_ms"]

# Epoch numbers at or above this are milliseconds (1e11 s is the year 5138; 1e11 ms is 1973),
# below it seconds. Logs never carry dates before 1973 in milliseconds.
_EPOCH_MS_THRESHOLD = 100_000_000_000

# The times ISO 8601 writes with four-digit years: 0001-01-01T00:00:00.000Z through
# 9999-12-31T23:59:59.999Z. A time outside them cannot be formatted for Moesif at all, and a
# number that large (2**70, a 20-digit string) is a corrupt field, not a date.
MIN_TIME_MS = -62_135_596_800_000
MAX_TIME_MS = 253_402_300_799_999


def parse_time_ms(value: object) -> int:
    """Parse a timestamp into integer milliseconds since the Unix epoch, UTC.

    Accepts ISO 8601 strings with or without seconds, fractional digits (any count; beyond
    microseconds they are truncated), a ``Z`` or a numeric offset; a time without a zone is
    read as UTC. Also accepts epoch seconds or milliseconds as a number or a digit string.

    Raises:
        ValueError: if the value is not a time in any of those forms, or is outside years
            1 to 9999 (:data:`MIN_TIME_MS`, :data:`MAX_TIME_MS`). Booleans are refused.
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
        if len(text) > 20:
            # Python refuses to convert digit strings over 4,300 digits, and nothing this
            # long is a time: refuse it before the conversion does the work.
            msg = f"not a time: a {len(text)}-digit number"
            raise ValueError(msg)
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
    return check_time_ms(seconds * 1000 + parsed.microsecond // 1000)


def check_time_ms(ms: int) -> int:
    """Return ``ms`` when it is a time Moesif can be sent (years 1 to 9999).

    Raises:
        ValueError: ``ms`` is outside :data:`MIN_TIME_MS`..:data:`MAX_TIME_MS`.
    """
    if not MIN_TIME_MS <= ms <= MAX_TIME_MS:
        msg = "outside the years 1 to 9999"
        raise ValueError(msg)
    return ms


def _epoch_to_ms(number: float) -> int:
    if not math.isfinite(number):
        msg = "not a finite number"
        raise ValueError(msg)
    # Compared before converting: int(1e308 * 1000) would overflow, and a huge int would
    # make every later step slow.
    if abs(number) >= _EPOCH_MS_THRESHOLD:
        if not MIN_TIME_MS <= number <= MAX_TIME_MS:
            msg = "outside the years 1 to 9999"
            raise ValueError(msg)
        return int(number)
    return check_time_ms(int(number * 1000))


def format_time_ms(ms: int) -> str:
    """Format epoch milliseconds as Moesif's canonical ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (UTC).

    Raises:
        ValueError: ``ms`` is outside the years 1 to 9999.
    """
    check_time_ms(ms)
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
