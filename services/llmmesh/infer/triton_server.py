"""Starts and stops a real Triton Inference Server (the binary bundled in `nvidia-pytriton`) on CPU.

Used by `llmmesh up` and by the end-to-end tests. On a GPU host Triton runs from its NGC image
instead (deploy/), and infer only needs its address.

Triton runs in a process group of its own (terminal Ctrl-C reaches only the launcher, which stops it in
order), together with a small watchdog (`python -m llmmesh.infer.triton_server --watchdog FD`): when the
process that started Triton dies, however it dies, the watchdog's pipe reads end-of-file and it stops the
whole group (tritonserver and its python stubs) and removes their shared memory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["StartCancelled", "TritonServer", "TritonStartError", "remove_orphaned_shm", "repository_root"]

_SHM_DIR = Path("/dev/shm")
_SHM_GLOB = "triton_python_backend_shm_region_*"
# After its launcher died: how long the watchdog lets Triton exit on SIGTERM before it SIGKILLs the group.
_WATCHDOG_GRACE_SECONDS = 5.0


class TritonStartError(RuntimeError):
    """Triton did not become ready; the message holds the tail of its log."""


class StartCancelled(Exception):
    """A start gave up, having stopped what it started, because its `cancelled()` turned true (Ctrl-C)."""


def repository_root() -> Path:
    """The `triton_models/` folder of this checkout (override with LLMMESH_TRITON_MODEL_REPOSITORY)."""
    return Path(__file__).resolve().parents[3] / "triton_models"


def _pytriton_root() -> Path:
    import pytriton

    return Path(pytriton.__file__).parent / "tritonserver"


def _maps_in_use(directory: Path = _SHM_DIR) -> set[str]:
    """Paths in `directory` mapped by any live process (so we never delete another server's region)."""
    prefix = f"{directory}/"
    used: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            for line in maps.read_text().splitlines():
                if prefix in line:
                    used.add(line.split(None, 5)[-1])
    return used


def _wait_group_gone(pgid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def remove_orphaned_shm(directory: Path = _SHM_DIR) -> list[str]:
    """Removes python-backend shared-memory regions that no live process maps (left by a killed stub or a
    dead mesh); returns their paths."""
    in_use = _maps_in_use(directory)
    removed = []
    for path in directory.glob(_SHM_GLOB):
        if str(path) not in in_use:
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(str(path))
    return removed


def _group_members(pgid: int) -> set[int]:
    """The live (not zombie) processes of process group `pgid`."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name (field 2) may hold spaces and parentheses: split after its last ")".
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if int(pgrp) == pgid and state != "Z":
                members.add(int(stat.parent.name))
    return members


def _watch_launcher(fd: int, grace: float = _WATCHDOG_GRACE_SECONDS) -> None:
    """Waits for end-of-file on `fd` (its launcher died or let go), then stops the rest of its process group.

    It is a member of Triton's group, so the group's id cannot be reused while it runs; it ignores the
    SIGTERM that an orderly stop sends the group and dies by the SIGKILL that follows.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while os.read(fd, 512):
        pass
    me, pgid = os.getpid(), os.getpgrp()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (others := _group_members(pgid) - {me}) and time.monotonic() < deadline:
        time.sleep(0.05)
    # Not killpg: that would end this process before it removes the shared memory.
    deadline = time.monotonic() + grace
    while others and time.monotonic() < deadline:
        for pid in others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
        others = _group_members(pgid) - {me}
    remove_orphaned_shm()


@dataclass
class TritonServer:
    """One tritonserver process on loopback, serving `models` from `model_repository`."""

    grpc_port: int
    http_port: int
    metrics_port: int
    models: tuple[str, ...] = ("smollm2",)
    model_repository: Path = field(default_factory=repository_root)
    log_path: Path | None = None
    host: str = "127.0.0.1"
    extra_args: tuple[str, ...] = ()
    # OTLP/HTTP traces endpoint (".../v1/traces"); Triton exports JSON. Empty = no tracing.
    trace_url: str = ""
    trace_rate: int = 1
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _watchdog: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    # Our end of the watchdog's pipe: held open while we live, never written.
    _watchdog_fd: int | None = field(default=None, init=False, repr=False)
    _workdir: Path | None = field(default=None, init=False, repr=False)
    _own_log: bool = field(default=False, init=False, repr=False)

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _backend_dir(self, workdir: Path) -> Path:
        root = _pytriton_root()
        python_dir = workdir / "backends" / "python"
        python_dir.mkdir(parents=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            os.symlink(root / "backends" / "python" / name, python_dir / name)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        shutil.copy2(stub, python_dir / "triton_python_backend_stub")
        return workdir / "backends"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        libs = _pytriton_root().parent.parent / "nvidia_pytriton.libs"
        # This interpreter's libpython first: the stub must not load the system's libpython.
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        # The stub takes `python` from PATH: it must be this (virtual environment's) interpreter.
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        env.setdefault("HF_HUB_OFFLINE", "1")
        # numpy's OpenBLAS starts one idle thread per host core in every python stub when it loads, before
        # a model's code runs; the models bound their own threads (config.pbtxt `n_threads`).
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        return env

    def command(self, backend_dir: Path) -> list[str]:
        binary = _pytriton_root() / "bin" / "tritonserver"
        args = [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self.models),
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=true",
            "--pinned-memory-pool-byte-size=0",
            "--cuda-memory-pool-byte-size=0:0",
            "--exit-timeout-secs=5",
            "--log-verbose=0",
            *self._trace_args(),
            *self.extra_args,
        ]
        return args

    def _trace_args(self) -> list[str]:
        if not self.trace_url:
            return []
        # Triton honours a W3C `traceparent` sent with the request: its spans join the caller's trace.
        return [
            "--trace-config=mode=opentelemetry",
            f"--trace-config=rate={self.trace_rate}",
            "--trace-config=level=TIMESTAMPS",
            f"--trace-config=opentelemetry,url={self.trace_url}",
            "--trace-config=opentelemetry,resource=service.name=triton",
        ]

    def start(self) -> None:
        """Starts tritonserver and its watchdog in a new process group; returns at once (see `wait_ready`)."""
        if self._proc is not None:
            raise RuntimeError("Triton already started")
        # A mesh that died without stopping (SIGKILL, out of memory) may have left regions behind.
        remove_orphaned_shm()
        self._workdir = Path(tempfile.mkdtemp(prefix="llmmesh-triton-"))
        backend_dir = self._backend_dir(self._workdir)
        # A log of our own choosing lives in the work folder, which stop() removes: a restart opens a new one
        # there rather than reusing a path inside the removed folder.
        if self.log_path is None or self._own_log:
            self.log_path = self._workdir / "triton.log"
            self._own_log = True
        log_path = self.log_path
        log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed by the OS at exit
        try:
            self._proc = subprocess.Popen(
                self.command(backend_dir),
                env=self._env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Ctrl-C in a terminal reaches us, not Triton; we stop it in order. A group in our
                # session, not a session of its own, so that the watchdog can join it.
                process_group=0,
            )
            self._start_watchdog(self._proc.pid, log)
        except BaseException:
            self.stop()
            raise
        finally:
            log.close()

    def _start_watchdog(self, pgid: int, log: IO[bytes]) -> None:
        # No prctl(PR_SET_PDEATHSIG) between fork and exec: that needs Python code in the child, unsafe in a
        # parent whose gRPC threads run (and the signal would follow the forking thread, not the process).
        read_fd, write_fd = os.pipe()  # not inheritable: no other child holds our end
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-m", "llmmesh.infer.triton_server", "--watchdog", str(read_fd)],
                pass_fds=(read_fd,),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                process_group=pgid,
            )
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        self._watchdog_fd = write_fd

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"{self.http_url}{path}", timeout=2) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, OSError):
            return 0

    def is_ready(self) -> bool:
        return self._get("/v2/health/ready") == 200 and all(
            self._get(f"/v2/models/{m}/ready") == 200 for m in self.models
        )

    def wait_ready(self, timeout: float = 120.0, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Returns once Triton and every model are ready; raises `StartCancelled` once `cancelled()` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cancelled():
                raise StartCancelled("Triton's start was cancelled")
            if self._proc is None or self._proc.poll() is not None:
                raise TritonStartError(f"tritonserver exited early:\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.2)
        raise TritonStartError(f"tritonserver not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; no process of its group, shared memory or folder is left.

        Returns tritonserver's exit code. Known issue (tritonserver 2.51 python backend, measured here):
        after overlapping or back-to-back decoupled requests the model sometimes never finishes
        unloading; Triton then waits `--exit-timeout-secs` (5 s) and exits with 1 although no inference
        was in flight. The python stub it leaves behind is killed here.
        """
        proc, self._proc = self._proc, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            code = proc.returncode
            # The server is gone; its python stubs and the watchdog (same process group) must not outlive it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            if self._watchdog is not None:
                self._watchdog.wait()  # reaped, so that the group is gone
            _wait_group_gone(proc.pid)
        self._watchdog = None
        if self._watchdog_fd is not None:
            os.close(self._watchdog_fd)
            self._watchdog_fd = None
        remove_orphaned_shm()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return code

    def __enter__(self) -> TritonServer:
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__" and sys.argv[1:2] == ["--watchdog"]:
    _watch_launcher(int(sys.argv[2]))
