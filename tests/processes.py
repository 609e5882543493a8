"""Real processes for tests: owners alive and dead, and what a process tree listens on (/proc)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from moesif_beam.runners.engines.run_state import OWNER_FILE, Owner


def dead_owner() -> Owner:
    proc = subprocess.Popen(["sleep", "30"])
    owner = Owner.of(proc.pid)
    proc.kill()
    proc.wait()
    assert owner is not None
    return owner


@contextlib.contextmanager
def live_owner() -> Iterator[Owner]:
    proc = subprocess.Popen(["sleep", "600"])
    try:
        owner = Owner.of(proc.pid)
        assert owner is not None
        yield owner
    finally:
        proc.kill()
        proc.wait()


def leftover(path: Path, owner: Owner | None, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True)
    if owner is not None:
        (path / OWNER_FILE).write_text(owner.encode())
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


def child_pids() -> dict[int, list[int]]:
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


def process_tree(root: int) -> set[int]:
    children = child_pids()
    tree: set[int] = set()
    pending = [root]
    while pending:
        pid = pending.pop()
        tree.add(pid)
        pending.extend(children.get(pid, []))
    return tree


def is_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


def proc_address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    # /proc prints an IPv6 address as four 32-bit words, each in host (little-endian) order.
    return ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))


def listening_sockets(pids: set[int]) -> set[tuple[int, str, int]]:
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
                    found.add((inodes[inode], str(proc_address(host)), int(port, 16)))
    return found


def listening_addresses(pid: int, port: int) -> set[str]:
    return {address for _, address, p in listening_sockets({pid}) if p == port}


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


class ListeningSampler:
    """Lists a process tree's listening sockets every 0.2 s while it runs."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self._proc = proc
        self.seen: set[tuple[int, str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self._proc.poll() is None:
            self.seen |= listening_sockets(process_tree(self._proc.pid))
            self._stop.wait(0.2)

    def stop(self) -> set[tuple[int, str, int]]:
        self._stop.set()
        self._thread.join(10)
        return self.seen
