"""Child processes (brokers, runners, job servers) that must never outlive moesif-beam.

Options that tie them to us, a free loopback port to give them, the end of their log for
an error message, and a stop that always ends them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

__all__ = ["child_options", "free_port", "log_tail", "stop_process"]

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


def free_port() -> int:
    """A port free on 127.0.0.1 now (the usual race: the caller binds it right away)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: str, lines: int = 15) -> str:
    """The end of a log, for an error message."""
    try:
        text = Path(path).read_text(errors="replace").strip()
    except OSError:
        return ""
    return ":\n" + "\n".join(text.splitlines()[-lines:]) if text else ""


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
