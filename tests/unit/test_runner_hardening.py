"""The runner side of hardening (issue 12): clean state, bounded drains, loopback ports.

Runs get a private ``TMPDIR`` of their own here, so that what they leave (or remove) in it
is theirs alone, whatever else runs on the machine.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from moesif_beam.pipelines.config import PipelineConfig
from moesif_beam.runners import launch
from moesif_beam.runners.engines.loopback import loopback_address, loopback_grpc_servers
from moesif_beam.runners.engines.prism import loopback_only
from moesif_beam.runners.engines.run_state import OWNER_FILE, Owner, remove_abandoned
from moesif_beam.transforms.sources import drain
from moesif_beam.transforms.sources.drain import (
    DRAIN,
    DrainTimedOut,
    check_drain_deadline,
    drain_sleep,
    drain_timed_out,
    start_drain,
)
from tests.helpers import wait_for
from tests.processes import dead_owner, is_loopback, leftover, listening_addresses, live_owner

APP_ID = "hardening-app-id"
TIMEOUT_LINE = "drain timed out after"


# --- owners and the clean-up rule --------------------------------------------------------


def test_an_owner_is_alive_while_its_process_runs_and_not_after():
    me = Owner.current()
    assert me is not None
    assert me.alive()
    assert Owner.decode(me.encode()) == me
    assert not dead_owner().alive()
    # Same pid, another start: a reused pid is another process.
    assert not Owner(me.pid, me.started + 1, me.boot).alive()
    assert not Owner(me.pid, me.started, "another-boot").alive()
    assert Owner.decode("not json") is None


def test_remove_abandoned_removes_dead_owners_only(tmp_path):
    dead = dead_owner()
    with live_owner() as live:
        gone = leftover(tmp_path / "moesif-beam-workers-dead", dead, {"fork.sock": b""})
        kept = leftover(tmp_path / "moesif-beam-workers-live", live, {"fork.sock": b"x"})
        unclaimed = leftover(tmp_path / "moesif-beam-run-unclaimed", None, {"a": b"1"})
        fresh_empty = leftover(tmp_path / "moesif-beam-run-new", None, {})
        old_empty = leftover(tmp_path / "moesif-beam-run-old", None, {})
        os.utime(old_empty, (time.time() - 3600, time.time() - 3600))
        other = leftover(tmp_path / "someone-else", dead, {"b": b"2"})

        removed = remove_abandoned([(str(tmp_path), "moesif-beam-")])

        assert sorted(removed) == sorted([str(gone), str(old_empty)])
        assert not gone.exists()
        assert not old_empty.exists()
        assert (kept / "fork.sock").read_bytes() == b"x"
        assert (kept / OWNER_FILE).read_text() == live.encode()
        assert (unclaimed / "a").exists()
        assert fresh_empty.exists()
        assert (other / "b").exists()  # not a name of ours


# --- loopback ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("[::]:0", "127.0.0.1:0"),
        ("[::]:8099", "127.0.0.1:8099"),
        ("0.0.0.0:5", "127.0.0.1:5"),
        (":7", "127.0.0.1:7"),
        ("localhost:9", "localhost:9"),
        ("127.0.0.1:0", "127.0.0.1:0"),
        ("[::1]:0", "[::1]:0"),
        ("10.1.2.3:80", "10.1.2.3:80"),
    ],
)
def test_loopback_address(address, expected):
    assert loopback_address(address) == expected


def test_grpc_servers_made_in_a_run_bind_loopback_only():
    import grpc
    from apache_beam.utils import thread_pool_executor

    with loopback_grpc_servers():
        server = grpc.server(thread_pool_executor.shared_unbounded_instance())
        port = server.add_insecure_port("[::]:0")  # what Beam asks for
    try:
        server.start()
        addresses = listening_addresses(os.getpid(), port)
        # gRPC binds 127.0.0.1 on an IPv6 socket: ::ffff:127.0.0.1, loopback still.
        assert addresses
        assert all(is_loopback(address) for address in addresses), addresses
    finally:
        server.stop(0)
    assert grpc.server.__module__.startswith("grpc")  # restored


def test_prism_is_built_to_listen_on_loopback():
    source = 'x\n\tlis, err := net.Listen("tcp", fmt.Sprintf(":%d", port))\ny\n'
    assert 'net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))' in loopback_only(source)
    with pytest.raises(RuntimeError, match="loopback"):
        loopback_only("package jobservices\n")


# --- drain deadline ----------------------------------------------------------------------


def test_no_deadline_without_a_timed_drain(fresh_drain):
    check_drain_deadline(1e9)
    start_drain()  # untimed: the sources stop, nothing gives up
    check_drain_deadline(1e9)
    assert DRAIN.is_set()
    assert not drain_timed_out()
    drain_sleep(0.01)


class _WatchedEvent(threading.Event):
    """A ``threading.Event`` that tells when someone starts waiting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


def test_drain_sleep_is_cut_short_by_the_deadline(fresh_drain, monkeypatch):
    drain_flag = _WatchedEvent()
    monkeypatch.setattr(drain, "DRAIN", drain_flag)
    woke = threading.Event()
    failure: list[BaseException] = []

    def sleeper() -> None:
        try:
            drain_sleep(60)
        except DrainTimedOut as exc:
            failure.append(exc)
        woke.set()

    thread = threading.Thread(target=sleeper)
    thread.start()
    assert drain_flag.waiting.wait(10)  # the sleeper is waiting for a drain
    assert not woke.is_set()
    start_drain(0.5)  # the wait would end after the deadline: give up at once
    assert woke.wait(5)
    thread.join()
    assert len(failure) == 1
    assert DrainTimedOut.MARKER in str(failure[0])
    assert drain_timed_out()


def test_a_second_drain_does_not_extend_the_deadline(fresh_drain):
    start_drain(0.2)
    start_drain(3600)
    wait_for(drain_timed_out, 10, "the first drain's deadline")  # not the second's hour
    assert drain_timed_out()
    with pytest.raises(DrainTimedOut):
        check_drain_deadline()


def test_drain_timeout_must_be_positive():
    with pytest.raises(ValueError, match="--drain_timeout"):
        PipelineConfig("events", "x.jsonl", "wso2", drain_timeout=0)
    assert PipelineConfig("events", "x.jsonl", "wso2").drain_timeout == 30


def test_a_drain_stuck_elsewhere_is_cancelled_then_ended(fresh_drain, monkeypatch, capsys):
    monkeypatch.setattr(launch, "_CANCEL_GRACE_S", 0.2)
    monkeypatch.setattr(launch, "_EXIT_GRACE_S", 0.4)
    exits: list[int] = []
    ended = threading.Event()

    def fake_exit(code: int) -> None:
        exits.append(code)
        ended.set()

    monkeypatch.setattr(launch.os, "_exit", fake_exit)

    class StuckResult:
        cancels = 0

        def cancel(self) -> None:
            StuckResult.cancels += 1  # and the run goes on regardless

    config = PipelineConfig("events", "x.jsonl", "wso2", drain_timeout=0.1)
    with launch._drain_watchdog(StuckResult(), config):
        start_drain(config.drain_timeout)
        assert ended.wait(10)
    assert StuckResult.cancels == 1
    assert exits == [launch.EXIT_DRAIN_TIMEOUT]
    assert "drain timed out after 0.1s" in capsys.readouterr().err
