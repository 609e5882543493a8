"""Options for child processes (brokers, runners) that must never outlive moesif-beam."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, Final

__all__ = ["child_options"]

_PR_SET_PDEATHSIG: Final = 1


def _load_prctl() -> Any:
    """The C library's ``prctl`` on Linux, else None; loaded before fork, called in the child."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL: Final = _load_prctl()


def _die_with_parent_preexec(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn`` making the kernel SIGKILL the child when its parent thread dies.

    It runs between fork and exec and only calls ``prctl``, ``getppid`` and ``kill``: no Python
    locks are taken, so ``preexec_fn``'s caveat about threads does not apply. SIGKILL rather than
    SIGTERM because nothing else would come to end a broker whose shutdown hangs; Kafka recovers
    its logs after a kill.
    """

    def preexec() -> None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
        # The parent may have died between fork() and prctl(); then nobody would kill us later.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def child_options() -> dict[str, Any]:
    """``subprocess`` options for our children (brokers, runners), so they never outlive us."""
    preexec = None
    # PR_SET_PDEATHSIG fires when the *thread* that forked exits; only the main thread lives as
    # long as the process, so from other threads we rely on stop() and atexit instead.
    if _PRCTL is not None and threading.current_thread() is threading.main_thread():
        preexec = _die_with_parent_preexec(os.getpid())
    return {
        # Its own session: a Ctrl-C in our terminal reaches only us, and we stop the broker in
        # order instead of both racing to shut down.
        "start_new_session": True,
        "preexec_fn": preexec,
    }
