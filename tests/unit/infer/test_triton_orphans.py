"""Nothing of Triton outlives its launcher: the watchdog stops Triton's process group when the launcher's pipe
closes, and shared-memory regions whose owners died are removed while live ones are kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from llmmesh.infer import triton_server
from llmmesh.infer.triton_server import remove_orphaned_shm

# Maps the file named by argv[1], says so, then waits to be killed.
MAPPER = """
import mmap, sys, time
with open(sys.argv[1], "r+b") as f:
    region = mmap.mmap(f.fileno(), 0)
print("mapped", flush=True)
time.sleep(60)
"""


@contextmanager
def mapped_by_a_process(path: Path) -> Iterator[subprocess.Popen[str]]:
    """A process that maps `path`, killed by PID at the end."""
    path.write_bytes(b"\0" * 4096)
    proc = subprocess.Popen([sys.executable, "-c", MAPPER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "mapped\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_region_whose_owner_died_is_removed_and_a_mapped_one_kept(tmp_path: Path) -> None:
    """Regions no live process maps (their owner was SIGKILLed) are removed; one that a live process maps stays."""
    stale = tmp_path / "triton_python_backend_shm_region_stale"
    live = tmp_path / "triton_python_backend_shm_region_live"
    other = tmp_path / "not_a_triton_region"
    other.write_bytes(b"")
    with mapped_by_a_process(stale):
        pass  # its owner is SIGKILLed here, as in a mesh that died without stopping
    with mapped_by_a_process(live):
        assert remove_orphaned_shm(tmp_path) == [str(stale)]
        assert live.exists() and other.exists() and not stale.exists()


def test_the_watchdog_stops_its_process_group_when_the_launcher_goes() -> None:
    """Closing the launcher's end of the pipe (as its death does) makes the watchdog stop every other member
    of its process group, then exit itself; while the pipe is open it waits."""
    member = subprocess.Popen(["sleep", "60"], process_group=0)
    read_fd, write_fd = os.pipe()
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "llmmesh.infer.triton_server", "--watchdog", str(read_fd)],
        pass_fds=(read_fd,),
        process_group=member.pid,
    )
    os.close(read_fd)
    launcher_alive = True
    try:
        time.sleep(0.5)
        assert member.poll() is None and watchdog.poll() is None
        os.close(write_fd)
        launcher_alive = False
        assert member.wait(5) == -signal.SIGTERM
        assert watchdog.wait(5) == 0
    finally:
        if launcher_alive:
            os.close(write_fd)
        for proc in (member, watchdog):
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()


def test_start_clears_stale_regions_and_puts_triton_and_its_watchdog_in_one_group_that_stop_empties(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`TritonServer.start` first removes orphaned regions, then runs the server and its watchdog in a new
    process group (not ours); `stop` leaves no member of that group."""
    cleaned: list[str] = []

    def record() -> list[str]:
        cleaned.append("shm")
        return []

    monkeypatch.setattr(triton_server, "remove_orphaned_shm", record)
    monkeypatch.setattr(triton_server.TritonServer, "command", lambda self, backend_dir: ["sleep", "60"])
    server = triton_server.TritonServer(0, 0, 0, log_path=tmp_path / "triton.log")
    server.start()
    try:
        pid = server.pid
        assert pid is not None and cleaned == ["shm"]
        assert os.getpgid(pid) == pid != os.getpgrp()
        assert wait_for(lambda: len(_members(pid)) == 2), _members(pid)  # the server and the watchdog
    finally:
        server.stop()
    assert not _members(pid)
    assert cleaned == ["shm", "shm"]


def _members(pgid: int) -> list[int]:
    """The processes of group `pgid`, zombies included."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                out.append(int(stat.parent.name))
    return out


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_server_with_its_own_log_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a log path the log lives in the work folder that stop() removes: a second start makes a new one."""
    monkeypatch.setattr(triton_server, "remove_orphaned_shm", list)
    monkeypatch.setattr(triton_server.TritonServer, "command", lambda self, backend_dir: ["sleep", "60"])
    server = triton_server.TritonServer(0, 0, 0)
    for _ in range(2):
        server.start()
        try:
            assert server.log_path is not None and server.log_path.parent.is_dir()
        finally:
            server.stop()
