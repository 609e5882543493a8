"""Garbage collection tuned for processes that turn records into many short-lived objects.

Records are parsed into many small objects that die young. With Python's default
threshold (a collection every 700 new container objects), a worker collected its young
generation about a thousand times per million events, and each collection that reached
the older generations walked everything the process had imported (Beam, gRPC): measured,
0.75 s of a bounded worker's 38 s, and 30% of a Kafka stream's process (py-spy
``--native``, the GIL's samples under ``gc_collect_main``).
"""

from __future__ import annotations

import gc
import threading

__all__ = ["collect_garbage_less_often"]

YOUNG_THRESHOLD = 50_000
"""New container objects between young collections (Python's default is 700)."""

_DONE = threading.Event()


def collect_garbage_less_often() -> None:
    """Freeze what this process holds so far and collect the young generation less often.

    Process-wide and idempotent: the first call in a process acts, later ones return.
    What is frozen is never collected, garbage included (whatever the process had not yet
    collected, once). A garbage cycle made afterwards is freed later than before, never
    kept.
    """
    if _DONE.is_set():
        return
    _DONE.set()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
