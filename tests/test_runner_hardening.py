"""The runner side of hardening (issue 12): clean state, bounded drains, loopback ports.

Runs get a private ``TMPDIR`` of their own here, so that what they leave (or remove) in it
is theirs alone, whatever else runs on the machine.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from moesif_beam.pipelines.config import PipelineConfig
from moesif_beam.runners import launch
from moesif_beam.runners.loopback import loopback_address, loopback_grpc_servers
from moesif_beam.runners.prism import loopback_only
from moesif_beam.runners.run_state import OWNER_FILE, Owner, remove_abandoned
from moesif_beam.transforms import drain
from moesif_beam.transforms.drain import (
    DRAIN,
    DrainTimedOut,
    check_drain_deadline,
    drain_sleep,
    drain_timed_out,
    start_drain,
)
from moesif_beam.transforms.moesif_sink import RetryPolicy, Secret, _HttpWriter
from tests.conftest import REPO
from tests.fixtures import wso2_line

APP_ID = "hardening-app-id"
TIMEOUT_LINE = "drain timed out after"


@pytest.fixture
def fresh_drain() -> Iterator[None]:
    """The drain flag and deadline are per process: each test starts and ends without one."""

    def reset() -> None:
        drain._deadline = None
        drain._timed_out.clear()
        DRAIN.clear()

    reset()
    yield
    reset()


@pytest.fixture
def private_tmp() -> Iterator[Path]:
    """A short private TMPDIR (a fork server's socket path must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="mbh-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _dead_owner() -> Owner:
    proc = subprocess.Popen(["sleep", "30"])
    owner = Owner.of(proc.pid)
    proc.kill()
    proc.wait()
    assert owner is not None
    return owner


@contextlib.contextmanager
def _live_owner() -> Iterator[Owner]:
    proc = subprocess.Popen(["sleep", "600"])
    try:
        owner = Owner.of(proc.pid)
        assert owner is not None
        yield owner
    finally:
        proc.kill()
        proc.wait()


def _leftover(path: Path, owner: Owner | None, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True)
    if owner is not None:
        (path / OWNER_FILE).write_text(owner.encode())
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


# --- owners and the clean-up rule --------------------------------------------------------


def test_an_owner_is_alive_while_its_process_runs_and_not_after():
    me = Owner.current()
    assert me is not None
    assert me.alive()
    assert Owner.decode(me.encode()) == me
    assert not _dead_owner().alive()
    # Same pid, another start: a reused pid is another process.
    assert not Owner(me.pid, me.started + 1, me.boot).alive()
    assert not Owner(me.pid, me.started, "another-boot").alive()
    assert Owner.decode("not json") is None


def test_remove_abandoned_removes_dead_owners_only(tmp_path):
    dead = _dead_owner()
    with _live_owner() as live:
        gone = _leftover(tmp_path / "moesif-beam-workers-dead", dead, {"fork.sock": b""})
        kept = _leftover(tmp_path / "moesif-beam-workers-live", live, {"fork.sock": b"x"})
        unclaimed = _leftover(tmp_path / "moesif-beam-run-unclaimed", None, {"a": b"1"})
        fresh_empty = _leftover(tmp_path / "moesif-beam-run-new", None, {})
        old_empty = _leftover(tmp_path / "moesif-beam-run-old", None, {})
        os.utime(old_empty, (time.time() - 3600, time.time() - 3600))
        other = _leftover(tmp_path / "someone-else", dead, {"b": b"2"})

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
        addresses = _listening_on_port(os.getpid(), port)
        # gRPC binds 127.0.0.1 on an IPv6 socket: ::ffff:127.0.0.1, loopback still.
        assert addresses
        assert all(_is_loopback(address) for address in addresses), addresses
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


def test_drain_sleep_is_cut_short_by_the_deadline(fresh_drain):
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
    time.sleep(0.2)
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
    time.sleep(0.3)
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


@pytest.mark.integration
def test_the_sink_gives_up_at_the_deadline_without_a_fate(fresh_drain, start_collector):
    collector = start_collector(application_id=APP_ID, fail_rate=1.0, fail_status=503)
    writer = _HttpWriter(
        f"{collector.url}/v1/events/batch",
        Secret(APP_ID),
        "events",
        6,
        RetryPolicy(max_retry_seconds=300),
        timeout=5,
    )
    writer.open()
    batch = [(wso2_line(f"t{i}"), b"raw", f"f:{i}", f"t{i}", (0, i, i - 1)) for i in range(3)]
    fates: list = []
    start_drain(1.5)
    started = time.monotonic()
    try:
        with pytest.raises(DrainTimedOut):
            fates.extend(writer.deliver(batch, collections.Counter()))
    finally:
        writer.close()
    assert time.monotonic() - started < 1.5 + 1
    assert fates == []  # neither sent (no ack) nor dead-lettered
    assert collector.stats()["faults"]["failed"] >= 1


# --- process trees and their listening sockets ------------------------------------------


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _tree(root: int) -> set[int]:
    children = _children()
    tree: set[int] = set()
    pending = [root]
    while pending:
        pid = pending.pop()
        tree.add(pid)
        pending.extend(children.get(pid, []))
    return tree


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    # /proc prints an IPv6 address as four 32-bit words, each in host (little-endian) order.
    return ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))


def _listening(pids: set[int]) -> set[tuple[int, str, int]]:
    """``(pid, address, port)`` of every listening TCP socket the processes hold."""
    inodes: dict[str, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes[link[8:-1]] = pid
    found = set()
    for pid in pids:
        for table in ("tcp", "tcp6"):
            try:
                lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in inodes:
                    host, port = local.split(":")
                    found.add((inodes[inode], str(_address(host)), int(port, 16)))
    return found


def _listening_on_port(pid: int, port: int) -> set[str]:
    return {address for _, address, p in _listening({pid}) if p == port}


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


class _Sampler:
    """Lists a process tree's listening sockets every 0.2 s while it runs."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self._proc = proc
        self.seen: set[tuple[int, str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self._proc.poll() is None:
            self.seen |= _listening(_tree(self._proc.pid))
            self._stop.wait(0.2)

    def stop(self) -> set[tuple[int, str, int]]:
        self._stop.set()
        self._thread.join(10)
        return self.seen


# --- runs --------------------------------------------------------------------------------


def _cli(args: list[str], tmpdir: Path, **popen: object) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MOESIF_APPLICATION_ID"}
    env["TMPDIR"] = str(tmpdir)
    env.update(popen.pop("env", {}))  # type: ignore[arg-type]
    return subprocess.Popen(
        [sys.executable, "-m", "moesif_beam.runners.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,  # type: ignore[call-overload]
    )


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _write_events(path: Path, count: int, prefix: str = "e") -> Path:
    with path.open("wb") as handle:
        for i in range(count):
            handle.write(wso2_line(f"{prefix}-{i:07d}") + b"\n")
    return path


def _ours(tmpdir: Path) -> list[str]:
    return sorted(p.name for p in tmpdir.iterdir() if p.name.startswith("moesif-beam"))


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.mark.integration
def test_a_run_removes_dead_runs_leftovers_and_never_a_live_runs(tmp_path, private_tmp):
    out = tmp_path / "out"
    source = _write_events(tmp_path / "in.jsonl", 50)
    dead = _dead_owner()
    with _live_owner() as live:
        spill = out / ".dedup-spill"
        dead_spill = _leftover(spill / "events-dead", dead, {"0001-a.bin": b"x" * 1000})
        live_spill = _leftover(spill / "actions-live", live, {"0001-b.bin": b"y" * 1000})
        dead_pending = _leftover(out / ".schema-pending" / "events-dead", dead, {"k": b"[]"})
        dead_fork = _leftover(private_tmp / "moesif-beam-workers-x1", dead, {"fork.sock": b""})
        live_fork = _leftover(private_tmp / "moesif-beam-workers-x2", live, {"fork.sock": b""})
        dead_run = _leftover(private_tmp / "moesif-beam-run-x3", dead, {"prism.log": b"log"})
        (dead_run / "tmpabc").mkdir()  # a temp dir Beam made inside the run's
        live_files = [*live_spill.iterdir(), *live_fork.iterdir()]
        live_before = {path: path.read_bytes() for path in live_files}

        code, _, err = _finish(
            _cli(["events", "--input", str(source), "--output_dir", str(out)], private_tmp)
        )

        assert code == 0, err
        for path in (dead_spill, dead_pending, dead_fork, dead_run):
            assert not path.exists(), path
        assert {p: p.read_bytes() for p in live_before} == live_before
        # The run removed its own directories too; the live run's are all that is left.
        assert _ours(private_tmp) == ["moesif-beam-workers-x2"]
        assert sorted(p.name for p in spill.iterdir()) == ["actions-live"]
        assert not (out / ".schema-pending").exists()


@pytest.mark.integration
def test_a_killed_bounded_run_is_cleaned_up_by_the_next_run(tmp_path, private_tmp):
    out = tmp_path / "out"
    big = _write_events(tmp_path / "big.jsonl", 60_000)
    spill = out / ".dedup-spill"
    killed = _cli(
        [
            "events",
            "--input",
            str(big),
            "--output_dir",
            str(out),
            "--direct_num_workers=2",
            "--direct_running_mode=multi_processing",
        ],
        private_tmp,
    )
    try:
        _wait_for(lambda: any(spill.glob("*/*.bin")), 120, "the run to spill")
        tree = _tree(killed.pid)
        os.kill(killed.pid, signal.SIGKILL)
    finally:
        killed.kill()
        killed.communicate(timeout=30)
    # Its fork server and workers end once the launcher is gone.
    _wait_for(lambda: not any(_running(pid) for pid in tree), 60, "the killed run's processes")
    (left,) = spill.iterdir()
    assert (left / OWNER_FILE).exists()
    assert any(left.glob("*.bin"))
    left_tmp = _ours(private_tmp)
    assert any(name.startswith("moesif-beam-run-") for name in left_tmp)
    # The workers' fork server, with its socket, inside the run's temp dir.
    assert list(private_tmp.glob("moesif-beam-run-*/moesif-beam-workers-*/fork.sock"))

    small = _write_events(tmp_path / "small.jsonl", 20, prefix="s")
    code, _, err = _finish(
        _cli(["events", "--input", str(small), "--output_dir", str(out)], private_tmp)
    )
    assert code == 0, err
    assert not left.exists()
    assert not spill.exists()
    assert list(private_tmp.iterdir()) == []


@pytest.mark.integration
def test_every_port_of_a_two_worker_bounded_run_is_loopback(tmp_path, private_tmp):
    source = _write_events(tmp_path / "in.jsonl", 40_000)
    proc = _cli(
        [
            "events",
            "--input",
            str(source),
            "--output_dir",
            str(tmp_path / "out"),
            "--direct_num_workers=2",
            "--direct_running_mode=multi_processing",
        ],
        private_tmp,
    )
    sampler = _Sampler(proc)
    code, _, err = _finish(proc)
    seen = sampler.stop()
    assert code == 0, err
    # The FnApiRunner's control, data, state and logging servers, at least.
    assert len({port for _, _, port in seen}) >= 4, seen
    assert all(_is_loopback(address) for _, address, _ in seen), seen


@pytest.mark.integration
@pytest.mark.usefixtures("prism_runner")
def test_a_stream_on_prism_listens_on_loopback_only_and_leaves_no_temp_files(tmp_path, private_tmp):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    ready = _write_events(inbox / "a.jsonl", 5)
    os.utime(ready, (time.time() - 60, time.time() - 60))
    out = tmp_path / "out"
    proc = _cli(
        [
            "events",
            "--input",
            str(inbox / "*.jsonl"),
            "--follow",
            "--follow_interval",
            "1",
            "--output_dir",
            str(out),
            "--batch_max_delay",
            "1",
        ],
        private_tmp,
    )
    sampler = _Sampler(proc)
    try:
        _wait_for(lambda: any((out / "events").glob("*.json.gz")), 180, "the stream's batch")
        (run_dir,) = private_tmp.glob("moesif-beam-run-*")
        assert (run_dir / "prism.log").exists()  # the run's own log, in a private dir
        assert run_dir.stat().st_mode & 0o077 == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        code, _, err = _finish(proc, timeout=120)
        seen = sampler.stop()
    assert code == 0, err
    pids = {pid for pid, _, _ in seen}
    assert len(pids) >= 2, seen  # Prism's job server, and the LOOPBACK worker pool
    assert all(_is_loopback(address) for _, address, _ in seen), seen
    assert list(private_tmp.iterdir()) == []  # the run's temp dir took Beam's with it
    assert not (private_tmp / "moesif-beam-prism.log").exists()


# --- a drain that cannot finish, on a real broker ----------------------------------------


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for value in values:
        producer.produce(topic, value=value)
    assert producer.flush(30) == 0


def _committed(bootstrap: str, group: str, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        return int(consumer.committed([TopicPartition(topic, 0)], timeout=15)[0].offset)
    finally:
        consumer.close()


@pytest.mark.integration
@pytest.mark.kafka
@pytest.mark.usefixtures("prism_runner")
def test_sigterm_with_the_collector_failing_exits_within_the_drain_timeout_and_loses_nothing(
    tmp_path, private_tmp, kafka_broker, kafka_topic, start_collector
):
    bootstrap = kafka_broker.bootstrap_servers
    topic = kafka_topic(partitions=1)
    ids = [f"drain-{i:04d}" for i in range(40)]
    _produce(bootstrap, topic, [wso2_line(tid) for tid in ids])
    failing = start_collector(application_id=APP_ID, fail_rate=1.0, fail_status=503)
    drain_timeout = 8

    def stream(collector_url: str) -> subprocess.Popen:
        args = [
            "events",
            "--source",
            "kafka",
            "--kafka_bootstrap_servers",
            bootstrap,
            "--kafka_topic",
            topic,
            "--kafka_group_id",
            "draining",
            "--moesif_base_url",
            collector_url,
            "--output_dir",
            str(tmp_path / "out"),
            "--batch_max_delay",
            "1",
            "--drain_timeout",
            str(drain_timeout),
        ]
        return _cli(args, private_tmp, env={"MOESIF_APPLICATION_ID": APP_ID})

    first = stream(failing.url)
    try:
        _wait_for(lambda: failing.stats()["faults"]["failed"] >= 3, 180, "failed deliveries")
        assert first.poll() is None
        first.send_signal(signal.SIGTERM)
        code, _, err = _finish(first, timeout=drain_timeout + 60)
    finally:
        first.kill()
    assert code == 4, err
    assert "Traceback" not in err
    lines = err.splitlines()
    draining = next(i for i, line in enumerate(lines) if "SIGTERM: draining" in line)
    assert [line for line in lines[draining + 1 :] if "collector:" not in line] == [
        f"moesif-beam events: {TIMEOUT_LINE} {drain_timeout}s: undelivered records were "
        "not committed and will be re-read on restart"
    ]
    assert failing.records("events") == []
    assert _committed(bootstrap, "draining", topic) < 1  # nothing acknowledged, nothing committed
    assert not list((tmp_path / "out").glob("dead_letter/*.avro"))

    healthy = start_collector(application_id=APP_ID)
    second = stream(healthy.url)
    try:
        stored = lambda: {e["transaction_id"] for e in healthy.records("events")}  # noqa: E731
        _wait_for(lambda: stored() == set(ids), 180, "every record after the restart")
    finally:
        second.send_signal(signal.SIGTERM)
        code, _, err = _finish(second, timeout=drain_timeout + 60)
    assert code == 0, err
    assert _committed(bootstrap, "draining", topic) == len(ids)
    assert json.dumps(sorted(stored())) == json.dumps(sorted(ids))
    assert list(private_tmp.iterdir()) == []
