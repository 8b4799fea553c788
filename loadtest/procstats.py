"""CPU time and memory of the processes under test, read from /proc (Linux only).

CPU seconds are utime + stime from /proc/<pid>/stat (fields 14 and 15, in clock ticks); memory is
VmRSS (now) and VmHWM (peak resident set since the process started) from /proc/<pid>/status.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProcSample", "children", "cpu_per_1k_tokens", "sample", "sample_all", "stub_model"]

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcSample:
    cpu_s: float
    rss_mib: float
    peak_rss_mib: float


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing parenthesis.
    return text.rsplit(")", 1)[1].split()


def sample(pid: int) -> ProcSample | None:
    """CPU seconds and memory of one process; None when it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    cpu = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime: fields 14, 15 of the whole line
    mem: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                mem[key] = int(value.split()[0]) / 1024.0  # kB -> MiB
    except OSError:
        return None
    return ProcSample(round(cpu, 2), round(mem.get("VmRSS", 0.0), 1), round(mem.get("VmHWM", 0.0), 1))


def children(pid: int) -> list[int]:
    """Direct children of `pid` (Triton's python-backend stubs are children of tritonserver)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(int(stat.parent.name))
        if fields is not None and int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def stub_model(pid: int) -> str | None:
    """The model a Triton python-backend stub serves, from its command line (…/<model>/1/model.py)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for arg in args:
        path = Path(arg.decode(errors="replace"))
        if path.name == "model.py" and len(path.parts) >= 3:
            return path.parts[-3]
    return None


def sample_all(pids: Mapping[str, int]) -> dict[str, ProcSample]:
    return {name: s for name, pid in pids.items() if (s := sample(pid)) is not None}


def cpu_per_1k_tokens(
    before: Mapping[str, ProcSample], after: Mapping[str, ProcSample], tokens: int
) -> dict[str, float]:
    """CPU seconds each process spent per 1,000 output tokens between two samples."""
    if tokens <= 0:
        return {}
    return {
        name: round((after[name].cpu_s - before[name].cpu_s) * 1000.0 / tokens, 3) for name in after if name in before
    }
