"""One advisory file lock for the caches the project fills (Kafka's jars, Flink's)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

__all__ = ["exclusive_lock"]


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (a no-op where ``fcntl`` is missing).

    Two processes filling the same cache at once (a test session and a user's command,
    pytest-xdist workers) then download once.
    """
    try:
        import fcntl  # noqa: PLC0415 - POSIX only; elsewhere there is simply no lock
    except ImportError:
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
