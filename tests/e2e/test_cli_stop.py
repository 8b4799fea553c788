"""`llmmesh up` always stops, and nothing it started outlives it: SIGINT or SIGTERM at any moment (starting,
streaming the demo, serving) stops everything in order; SIGKILL of the launcher takes its children with it."""

from __future__ import annotations

import ast
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from llmmesh.launcher import SERVICES

from .conftest import wait_for

pytestmark = pytest.mark.e2e

# From the signal to the launcher's exit: stopping the mesh takes 5-6 s when idle; Triton's own exit timeout
# is 5 s and each service drains for up to 10 s.
STOP_BOUND_S = 40.0
# From SIGKILL of the launcher to the last of its children gone: Triton gets 5 s to exit before its watchdog
# kills it; a service notices its parent's death within a second, then drains.
ORPHAN_BOUND_S = 20.0
START_BOUND_S = 240.0
TRITON_DEFAULT_PORTS = (8000, 8001, 8002)
METRICS_DEFAULT_PORTS = (9464, 9465, 9466, 9467)
SHM_PREFIX = "/dev/shm/triton_python_backend_shm_region_"


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgrp, start time) of `pid`, or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


class ProcessTree:
    """Every process a launcher starts (and theirs: Triton's stubs), and the Triton shared memory they map,
    seen by polling /proc from a thread while it runs. A PID counts as alive only while it is the same,
    not-zombie process that was seen."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[int, int] = {}  # pid -> start time
        self.commands: dict[int, str] = {}
        self.shm: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> ProcessTree:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(0.05)

    def poll(self) -> None:
        stats = {}
        for entry in Path("/proc").glob("[0-9]*"):
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] != "Z":
                stats[int(entry.name)] = stat
        own_group = os.getpgrp()
        with self._lock:
            known = {pid for pid in self.seen if self._alive_locked(pid)} | {self.root}
            groups = {stats[pid][2] for pid in known if pid in stats} - {own_group}
            grew = True
            while grew:
                found = {pid for pid, s in stats.items() if (s[1] in known or s[2] in groups) and pid not in known}
                grew = bool(found)
                known |= found
            for pid in known - {self.root}:
                if pid in stats and (pid not in self.seen or self.seen[pid] == stats[pid][3]):
                    self.seen[pid] = stats[pid][3]
                    # Read again while it lives: a child caught between fork and exec still shows its
                    # parent's command line (a Triton stub once counted as a second tritonserver).
                    try:
                        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    except OSError:
                        command = ""
                    self.commands[pid] = command or self.commands.get(pid, "?")
            for pid in self.seen:
                try:
                    maps = Path(f"/proc/{pid}/maps").read_text()
                except OSError:
                    continue
                self.shm |= {line.split(None, 5)[-1] for line in maps.splitlines() if SHM_PREFIX in line}

    def _alive_locked(self, pid: int) -> bool:
        stat = _stat(pid)
        return stat is not None and stat[0] != "Z" and stat[3] == self.seen.get(pid)

    def alive(self) -> dict[int, str]:
        """The processes seen that still run, with their command lines."""
        with self._lock:
            return {pid: self.commands[pid][:150] for pid in self.seen if self._alive_locked(pid)}

    def count(self, needle: str) -> int:
        """How many processes seen running, alive or not, have `needle` in their command line."""
        with self._lock:
            return sum(needle in cmd for cmd in self.commands.values())

    def count_program(self, name: str) -> int:
        """How many processes seen running, alive or not, run the program `name` (their argv[0]'s file name):
        not the `sh -c` that Triton starts a backend stub with, whose command line may name tritonserver."""
        with self._lock:
            return sum(cmd.split(" ", 1)[0].rsplit("/", 1)[-1] == name for cmd in self.commands.values())

    def shm_left(self) -> list[str]:
        with self._lock:
            return sorted(p.removesuffix(" (deleted)") for p in self.shm if Path(p.removesuffix(" (deleted)")).exists())


class Output:
    """The launcher's combined output, read line by line by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, marker: str, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: any(marker in line for line in self.lines), timeout)

    def close(self) -> None:
        self._thread.join(5)


@contextmanager
def launcher(*args: str) -> Iterator[tuple[subprocess.Popen[str], Output, ProcessTree]]:
    """`llmmesh up ARGS` as a child of this process; whatever is left of it is stopped by PID at the end."""
    cmd = [sys.executable, "-m", "llmmesh.cli", "up", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with ProcessTree(proc.pid) as tree:
        output = Output(proc)
        try:
            yield proc, output, tree
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            tree.poll()
            for pid in tree.alive():
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            output.close()


def port_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:`port` now (as ours do, with SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_gateway_port(rng: random.Random) -> int:
    """A port P below the ephemeral range with P..P+3 free (the gateway and the three stages)."""
    for _ in range(100):
        base = rng.randrange(20000, 30000)
        if all(port_free(base + i) for i in range(4)):
            return base
    raise RuntimeError("no four consecutive free ports")


PHASES = ("start", "demo", "serve")


def test_sigint_or_sigterm_at_random_moments_always_stops_everything(tmp_path: Path) -> None:
    """SIGINT or SIGTERM while the mesh starts, streams its demo or serves: `llmmesh up` exits within the bound,
    0 once it was ready (128 + the signal if it gave up starting), leaving no process or Triton region."""
    seed = int(os.environ.get("LLMMESH_TEST_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    plan = [(phase, sig) for phase in PHASES for sig in (signal.SIGINT, signal.SIGTERM)]
    rng.shuffle(plan)
    for i, (phase, sig) in enumerate(plan):
        where = f"try {i} (LLMMESH_TEST_SEED={seed}): {sig.name} while {phase}"
        args = ["--free-ports", "--log-dir", str(tmp_path / str(i))]
        if phase == "demo":
            args += ["--demo", "Write a long story about a dragon."]
        with launcher(*args) as (proc, output, tree):
            marker, delay = {
                # Starting takes far longer than 2 s (Triton loads two models): the signal lands mid-start.
                "start": ("starting Triton", rng.uniform(0.0, 2.0)),
                "demo": ("demo>", rng.uniform(0.0, 1.5)),
                "serve": ("serving; Ctrl-C", rng.uniform(0.0, 0.5)),
            }[phase]
            assert output.wait_for(marker, START_BOUND_S), f"{where}: no {marker!r}:\n{output.text}"
            time.sleep(delay)
            proc.send_signal(sig)
            signalled = time.monotonic()
            try:
                code = proc.wait(STOP_BOUND_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{where}: still running {STOP_BOUND_S:.0f} s after the signal:\n{output.text}")
            took = time.monotonic() - signalled
            output.close()
            text = output.text
            print(f"{where}: exit {code} after {took:.1f} s, {len(tree.seen)} processes seen")
            ready = "ready in" in text
            if phase == "start":
                assert not ready, f"{where}: the start went on after the signal:\n{text}"
            assert code == (0 if ready else 128 + sig), f"{where}: exit code {code}:\n{text}"
            assert "stopped" in text, f"{where}:\n{text}"
            if ready:
                codes = ast.literal_eval(text.split("stopped: ", 1)[1].splitlines()[0])
                assert all(codes[name] == 0 for name in SERVICES), f"{where}: unclean exits {codes}"
            if phase != "start":
                assert tree.count_program("tritonserver") == 1 and tree.count("-m llmmesh.gateway ") == 1, tree.commands
            assert not tree.alive(), f"{where}: left running: {tree.alive()}"
            assert not tree.shm_left(), f"{where}: shared memory left: {tree.shm_left()}"


def test_sigkill_of_the_launcher_takes_its_children_and_the_next_up_reuses_the_ports(tmp_path: Path) -> None:
    """SIGKILL of a serving `llmmesh up`: tritonserver, its stubs and the four services are gone within the
    bound with their shared memory, every port is free, and a second `llmmesh up` on the same ports serves."""
    fixed = TRITON_DEFAULT_PORTS + METRICS_DEFAULT_PORTS
    if not all(port_free(p) for p in fixed):
        pytest.skip(f"Triton's or the metrics' default ports are taken by another program: {fixed}")
    port = free_gateway_port(random.Random())
    ports = (*range(port, port + 4), *fixed)
    args = ("--port", str(port), "--log-dir")
    with launcher(*args, str(tmp_path / "first")) as (proc, output, tree):
        assert output.wait_for("serving; Ctrl-C", START_BOUND_S), output.text
        stubs = lambda: sum("triton_python_backend_stub" in cmd for cmd in tree.alive().values())  # noqa: E731
        assert wait_for(lambda: stubs() == 3, 5), tree.alive()  # smollm2, gemma3 and the classifier
        assert tree.count_program("tritonserver") == 1 and tree.shm, (tree.commands, tree.shm)
        assert tree.count("-m llmmesh.infer.triton_server --watchdog") == 1, tree.commands
        for service in SERVICES:
            assert tree.count(f"-m llmmesh.{service} ") == 1, tree.commands
        proc.kill()
        proc.wait()
        killed = time.monotonic()
        gone = wait_for(lambda: not tree.alive(), ORPHAN_BOUND_S)
        print(f"children gone {time.monotonic() - killed:.1f} s after SIGKILL of the launcher")
        assert gone, f"outlived the launcher: {tree.alive()}"
        assert wait_for(lambda: not tree.shm_left(), 2), f"shared memory left: {tree.shm_left()}"
        assert wait_for(lambda: all(port_free(p) for p in ports), 2), [p for p in ports if not port_free(p)]

    with launcher(*args, str(tmp_path / "second")) as (proc, output, tree):
        assert output.wait_for("serving; Ctrl-C", START_BOUND_S), output.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STOP_BOUND_S) == 0, output.text
        assert not tree.alive()
