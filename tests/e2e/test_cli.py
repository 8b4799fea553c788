"""`llmmesh up` as a user runs it: the whole mesh starts, streams a demo answer, and stops on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import orphaned_shm

pytestmark = pytest.mark.e2e


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not running: check its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_up_streams_a_demo_answer_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    """`llmmesh up --demo` reports every address, streams "Paris", and SIGINT leaves no process or shm behind."""
    cmd = [
        sys.executable,
        "-m",
        "llmmesh.cli",
        "up",
        "--free-ports",
        "--log-dir",
        str(tmp_path),
        "--demo",
        "What is the capital of France?",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 240
        for line in proc.stdout:
            lines.append(line)
            if "serving; Ctrl-C stops everything" in line or time.monotonic() > deadline:
                break
        output = "".join(lines)
        assert "serving; Ctrl-C" in output, output
        assert "Paris" in output
        pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", output)]
        assert len(pids) == 4
        for name in ("triton", "preprocess", "infer", "postprocess", "gateway"):
            assert re.search(rf"^\s+{name}\s+.*127\.0\.0\.1:\d+", output, re.MULTILINE), name
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            # SIGTERM first, for an orderly stop (after a SIGKILL the watchdogs would clean up).
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, rest
    assert "stopped:" in rest and "'gateway': 0" in rest
    assert not any(_alive(pid) for pid in pids)
    assert not orphaned_shm()
