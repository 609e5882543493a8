"""Memory a keyed stage keeps in its worker, shared by every DoFn instance of the stage.

Runners create several instances of one DoFn in a worker process (one per concurrent
bundle). Stages that keep working state in memory instead of Beam state (see
:mod:`moesif_beam.transforms.dedup.streaming` and :mod:`moesif_beam.transforms.schema.rule` for why)
look it up here by a
name fixed when the pipeline is built, so all of a stage's instances in a process share
one object. Keyed routing brings a key's elements to one worker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["worker_memory"]

T = TypeVar("T")

_MEMORIES: dict[str, Any] = {}
_LOCK = threading.Lock()


def worker_memory(name: str, factory: Callable[[], T]) -> T:
    """The object this process keeps under ``name``, made by ``factory`` on first use."""
    with _LOCK:
        memory = _MEMORIES.get(name)
        if memory is None:
            memory = _MEMORIES[name] = factory()
        return memory
