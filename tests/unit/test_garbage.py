"""Garbage collection tuned once per process, where records are made and dropped in bulk."""

from __future__ import annotations

import subprocess
import sys

from moesif_beam.transforms.common.garbage import YOUNG_THRESHOLD

_PROBE = """
import gc
before = gc.get_threshold()
from moesif_beam.transforms.common.garbage import collect_garbage_less_often
kept = [[i] for i in range(1000)]
collect_garbage_less_often()
frozen = gc.get_freeze_count()
gc.set_threshold(700, *gc.get_threshold()[1:])  # someone else's setting: left alone
collect_garbage_less_often()
print(before[0], frozen, gc.get_threshold()[0], gc.get_threshold()[1:] == before[1:])
"""


def test_the_first_call_freezes_and_raises_the_young_threshold_once():
    # A fresh interpreter: the setting is process-wide, and this test's own process may
    # already have run a pipeline stage that made it.
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True
    ).stdout.split()
    default, frozen, after, older_kept = out
    assert int(default) < YOUNG_THRESHOLD
    assert int(frozen) >= 1000  # what the process held, the probe's lists included
    # The second call did nothing: the 700 set in between stands.
    assert int(after) == 700
    assert older_kept == "True"
