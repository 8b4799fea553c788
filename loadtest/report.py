"""Turns a results JSON into the report's tables (markdown) and plots (PNG), mesh beside direct."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["markdown", "plot"]

_SERVICES = ("gateway", "preprocess", "infer", "postprocess", "triton", "triton_stub", "loadgen")


def _get(level: dict[str, Any] | None, metric: str, stat: str) -> float | None:
    if level is None or not level.get(metric):
        return None
    value = level[metric].get(stat)
    return float(value) if value is not None else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _key(level: dict[str, Any]) -> tuple[str, float]:
    return (level["mode"], level["concurrency"] if level["mode"] == "closed" else level["rate"])


def pairs(results: dict[str, Any]) -> list[tuple[tuple[str, float], dict[str, Any] | None, dict[str, Any] | None]]:
    """(mode, concurrency or rate), direct level, mesh level: in the order they were run."""
    found: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    for level in results["levels"]:
        found.setdefault(_key(level), {})[level["target"]] = level
    return [(key, by.get("direct"), by.get("mesh")) for key, by in found.items()]


def _errors(level: dict[str, Any] | None) -> str:
    if level is None:
        return "–"
    errors = level.get("errors") or {}
    return ", ".join(f"{k} {v}" for k, v in errors.items()) if errors else "0"


def markdown(results: dict[str, Any]) -> str:
    """Direct vs mesh per level, then each process's cost per 1,000 output tokens and its memory."""
    lines = [
        "| load | direct TTFT p50 | mesh TTFT p50 | added | direct TTFT p99 | mesh TTFT p99 | direct ITL p50 "
        "| mesh ITL p50 | added | direct tok/s | mesh tok/s | mesh/direct | errors (direct / mesh) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (mode, x), direct, mesh in pairs(results):
        d50, m50 = _get(direct, "ttft_ms", "p50"), _get(mesh, "ttft_ms", "p50")
        di, mi = _get(direct, "itl_ms", "p50"), _get(mesh, "itl_ms", "p50")
        dt = direct["output_tokens_per_s"] if direct else None
        mt = mesh["output_tokens_per_s"] if mesh else None
        label = f"c={x:g}" if mode == "closed" else f"{x:g} req/s"
        lines.append(
            f"| {label} | {_fmt(d50)} | {_fmt(m50)} | {_fmt(m50 - d50 if d50 is not None and m50 is not None else None)} "
            f"| {_fmt(_get(direct, 'ttft_ms', 'p99'))} | {_fmt(_get(mesh, 'ttft_ms', 'p99'))} "
            f"| {_fmt(di, 3)} | {_fmt(mi, 3)} | {_fmt(mi - di if di is not None and mi is not None else None, 3)} "
            f"| {_fmt(dt, 0)} | {_fmt(mt, 0)} | {_fmt(mt / dt * 100 if dt and mt is not None else None, 1)} % "
            f"| {_errors(direct)} / {_errors(mesh)} |"
        )
    lines += ["", "Milliseconds; tok/s = output tokens per second, all streams, in the measurement window.", ""]

    levels = [lvl for lvl in results["levels"] if lvl.get("cpu_s_per_1k_tokens")]
    if levels:
        names = [n for n in _SERVICES if any(n in lvl["cpu_s_per_1k_tokens"] for lvl in levels)]
        lines.append("| CPU s per 1,000 output tokens | " + " | ".join(names) + " | mesh services |")
        lines.append("|---|" + "---:|" * (len(names) + 1))
        for lvl in levels:
            cpu = lvl["cpu_s_per_1k_tokens"]
            services = sum(cpu.get(n, 0.0) for n in ("gateway", "preprocess", "infer", "postprocess"))
            label = f"{lvl['target']} c={lvl['concurrency']}" if lvl["mode"] == "closed" else lvl["target"]
            lines.append(
                f"| {label} | " + " | ".join(_fmt(cpu.get(n), 3) for n in names) + f" | {_fmt(services, 3)} |"
            )
        lines.append("")
    peaks = results.get("peak_rss_mib") or {}
    if peaks:
        names = [n for n in _SERVICES if n in peaks]
        lines.append("| peak RSS (MiB) | " + " | ".join(names) + " |")
        lines.append("|---|" + "---:|" * len(names))
        lines.append("| whole run | " + " | ".join(_fmt(peaks[n], 0) for n in names) + " |")
        lines.append("")
    return "\n".join(lines)


def _series(
    rows: Sequence[tuple[tuple[str, float], dict[str, Any] | None, dict[str, Any] | None]], which: int, metric: str, stat: str
) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for (_, x), *levels in rows:
        level = levels[which]
        value = (
            (level["output_tokens_per_s"] if level else None) if metric == "tokens" else _get(level, metric, stat)
        )
        if value is not None:
            xs.append(x)
            ys.append(value)
    return xs, ys


def plot(results: dict[str, Any], out: Path) -> Path:
    """One PNG: TTFT, ITL, end-to-end latency (p50 and p99) and output tokens/s versus load, mesh beside direct."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = pairs(results)
    mode = rows[0][0][0] if rows else "closed"
    xlabel = "concurrency (requests in flight)" if mode == "closed" else "arrival rate (requests/s)"
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    panels = (
        (axes[0][0], "ttft_ms", "time to first token (ms)"),
        (axes[0][1], "itl_ms", "inter-token latency (ms)"),
        (axes[1][0], "latency_ms", "end-to-end latency (ms)"),
        (axes[1][1], "tokens", "output tokens/s (all streams)"),
    )
    styles = {0: ("direct (Triton)", "tab:blue"), 1: ("mesh (gateway)", "tab:orange")}
    for ax, metric, title in panels:
        for which, (name, colour) in styles.items():
            if metric == "tokens":
                xs, ys = _series(rows, which, metric, "")
                ax.plot(xs, ys, "o-", color=colour, label=name)
            else:
                for stat, dash in (("p50", "o-"), ("p99", "s--")):
                    xs, ys = _series(rows, which, metric, stat)
                    ax.plot(xs, ys, dash, color=colour, label=f"{name} {stat}")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        if mode == "closed":
            ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    config = results.get("config", {})
    fig.suptitle(
        f"llmmesh vs direct Triton — instrument at TTFT {config.get('ttft_ms')} ms, ITL {config.get('itl_ms')} ms, "
        f"{config.get('max_tokens')} output tokens ({config.get('workload')})",
        fontsize=11,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
