"""What a process tree listens on, read from /proc (no psutil): TCP ports and UNIX socket paths."""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["listening_tcp", "listening_unix", "mesh_processes", "process_tree"]

_TCP_LISTEN = "0A"
_UNIX_LISTENING = 1 << 16  # __SO_ACCEPTCON in the Flags column of /proc/net/unix


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every live process."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name (field 2) may hold spaces and parentheses: the rest follows its last ')'.
            state, ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if state != "Z":
                table[int(stat.parent.name)] = (int(ppid), int(pgrp))
    return table


def _with_descendants(table: dict[int, tuple[int, int]], pids: set[int]) -> set[int]:
    found, todo = set(pids), list(pids)
    while todo:
        parent = todo.pop()
        for pid, (ppid, _) in table.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                todo.append(pid)
    return found


def mesh_processes(roots: Iterable[int]) -> set[int]:
    """`roots`, every member of their process groups (Triton's watchdog joins Triton's group without being
    its child), and every live descendant of those."""
    table = _process_table()
    groups = {table[r][1] for r in roots if r in table}
    return _with_descendants(table, {*roots, *(pid for pid, (_, pgrp) in table.items() if pgrp in groups)})


def process_tree(root: int) -> set[int]:
    """`root` and every live descendant of it."""
    return _with_descendants(_process_table(), {root})


def _socket_inodes(pids: Iterable[int]) -> dict[int, int]:
    """Socket inode -> the pid that holds it open."""
    inodes: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(fd.path)
                    if target.startswith("socket:["):
                        inodes[int(target[8:-1])] = pid
    return inodes


def _address(hex_address: str) -> tuple[str, int]:
    """An address of /proc/net/tcp{,6} as (IP, port); an IPv4-mapped IPv6 address as its IPv4 address."""
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    # Each 32-bit word is in host (little-endian) order.
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(port, 16)


def listening_tcp(pids: Iterable[int]) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket (IPv4 and IPv6) that one of `pids` holds."""
    inodes = _socket_inodes(pids)
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == _TCP_LISTEN and int(fields[9]) in inodes:
                    found.append(_address(fields[1]))
    return found


def listening_unix(pids: Iterable[int]) -> list[str]:
    """The bound path of every listening UNIX stream socket that one of `pids` holds ("@..." = abstract)."""
    inodes = _socket_inodes(pids)
    found = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and int(fields[3], 16) & _UNIX_LISTENING and int(fields[6]) in inodes:
            found.append(fields[7])
    return found
