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


def by_level(results: dict[str, Any]) -> list[tuple[tuple[str, float], dict[str, dict[str, Any]]]]:
    """(mode, concurrency or rate) -> {target: level}, in the order the levels were run."""
    found: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    for level in results["levels"]:
        found.setdefault(_key(level), {})[level["target"]] = level
    return list(found.items())


def pairs(results: dict[str, Any]) -> list[tuple[tuple[str, float], dict[str, Any] | None, dict[str, Any] | None]]:
    """(mode, concurrency or rate), direct level, mesh level: in the order they were run."""
    return [(key, by.get("direct"), by.get("mesh")) for key, by in by_level(results)]


def _hops(results: dict[str, Any]) -> list[str]:
    """Where the added latency arises: Triton alone, + the infer stage, + everything else (the mesh)."""
    rows = [(key, by) for key, by in by_level(results) if "infer" in by and "direct" in by]
    if not rows:
        return []
    lines = [
        "| load | TTFT p50: direct | + infer stage | + rest of mesh | ITL p50: direct | + infer stage "
        "| + rest of mesh | tok/s: direct | infer stage | mesh |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (mode, x), by in rows:
        d, i, m = by["direct"], by["infer"], by.get("mesh")
        cells = []
        for metric, digits in (("ttft_ms", 2), ("itl_ms", 3)):
            dv, iv, mv = _get(d, metric, "p50"), _get(i, metric, "p50"), _get(m, metric, "p50")
            cells += [
                _fmt(dv, digits),
                _fmt(iv - dv if iv is not None and dv is not None else None, digits),
                _fmt(mv - iv if mv is not None and iv is not None else None, digits),
            ]
        tps = [_fmt(lvl["output_tokens_per_s"], 0) if lvl else "–" for lvl in (d, i, m)]
        label = f"c={x:g}" if mode == "closed" else f"{x:g} req/s"
        lines.append(f"| {label} | " + " | ".join(cells + tps) + " |")
    return [*lines, ""]


def _chunks(results: dict[str, Any]) -> list[str]:
    """Beside ITL (an average per request), what the client saw chunk by chunk: the gap between consecutive
    chunks and the tokens each carried. Text held back and released in a burst shows here, not in ITL."""
    rows = [(key, by) for key, by in by_level(results) if any(lvl.get("chunk_gap_ms") for lvl in by.values())]
    if not rows:
        return []
    lines = [
        "| load | target | ITL p50 | chunk gap p50 | chunk gap p99 | tokens/chunk mean | tokens/chunk p99 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (mode, x), by in rows:
        label = f"c={x:g}" if mode == "closed" else f"{x:g} req/s"
        for target, lvl in by.items():
            cells = [
                _fmt(_get(lvl, "itl_ms", "p50"), 3),
                _fmt(_get(lvl, "chunk_gap_ms", "p50"), 3),
                _fmt(_get(lvl, "chunk_gap_ms", "p99"), 3),
                _fmt(_get(lvl, "tokens_per_chunk", "mean"), 2),
                _fmt(_get(lvl, "tokens_per_chunk", "p99"), 0),
            ]
            lines.append(f"| {label} | {target} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "A chunk: a response that carries text (mesh) or tokens (direct, infer); gaps in ms between consecutive "
        "chunks of a request, as the client received them.",
        "",
    ]
    return lines


def _errors(level: dict[str, Any] | None) -> str:
    if level is None:
        return "–"
    errors = level.get("errors") or {}
    return ", ".join(f"{k} {v}" for k, v in errors.items()) if errors else "0"


def _services_cpu(level: dict[str, Any] | None) -> float | None:
    cpu = (level or {}).get("cpu_s_per_1k_tokens") or {}
    names = ("gateway", "preprocess", "infer", "postprocess")
    return sum(cpu.get(n, 0.0) for n in names) if any(n in cpu for n in names) else None


def _variant(results: dict[str, Any]) -> list[str]:
    """This checkout's mesh beside a patched copy's (--variant), measured in the same run."""
    rows = [(key, by) for key, by in by_level(results) if "variant" in by and "mesh" in by]
    if not rows:
        return []
    lines = [
        "| load | TTFT p50: direct | mesh | variant | ITL p50: mesh | variant | tok/s: direct | mesh | variant "
        "| variant/mesh | services CPU s/1k tok: mesh | variant | tokens/message: mesh | variant |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (mode, x), by in rows:
        d, m, v = by.get("direct"), by["mesh"], by["variant"]
        mt, vt = m["output_tokens_per_s"], v["output_tokens_per_s"]
        label = f"c={x:g}" if mode == "closed" else f"{x:g} req/s"
        cells = [
            _fmt(_get(d, "ttft_ms", "p50")),
            _fmt(_get(m, "ttft_ms", "p50")),
            _fmt(_get(v, "ttft_ms", "p50")),
            _fmt(_get(m, "itl_ms", "p50"), 3),
            _fmt(_get(v, "itl_ms", "p50"), 3),
            _fmt(d["output_tokens_per_s"] if d else None, 0),
            _fmt(mt, 0),
            _fmt(vt, 0),
            f"{_fmt(vt / mt * 100 if mt else None, 1)} %",
            _fmt(_services_cpu(m), 3),
            _fmt(_services_cpu(v), 3),
            _fmt(m.get("tokens_per_message"), 3),
            _fmt(v.get("tokens_per_message"), 3),
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


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
        added_ttft = m50 - d50 if d50 is not None and m50 is not None else None
        lines.append(
            f"| {label} | {_fmt(d50)} | {_fmt(m50)} | {_fmt(added_ttft)} "
            f"| {_fmt(_get(direct, 'ttft_ms', 'p99'))} | {_fmt(_get(mesh, 'ttft_ms', 'p99'))} "
            f"| {_fmt(di, 3)} | {_fmt(mi, 3)} | {_fmt(mi - di if di is not None and mi is not None else None, 3)} "
            f"| {_fmt(dt, 0)} | {_fmt(mt, 0)} | {_fmt(mt / dt * 100 if dt and mt is not None else None, 1)} % "
            f"| {_errors(direct)} / {_errors(mesh)} |"
        )
    lines += ["", "Milliseconds; tok/s = output tokens per second, all streams, in the measurement window.", ""]
    lines += _chunks(results)
    lines += _hops(results)
    lines += _variant(results)

    levels = [lvl for lvl in results["levels"] if lvl.get("cpu_s_per_1k_tokens")]
    if levels:
        names = [n for n in _SERVICES if any(n in lvl["cpu_s_per_1k_tokens"] for lvl in levels)]
        lines.append("| CPU s per 1,000 output tokens | " + " | ".join(names) + " | mesh services |")
        lines.append("|---|" + "---:|" * (len(names) + 1))
        for lvl in levels:
            cpu = lvl["cpu_s_per_1k_tokens"]
            services = sum(cpu.get(n, 0.0) for n in ("gateway", "preprocess", "infer", "postprocess"))
            load = f"c={lvl['concurrency']}" if lvl["mode"] == "closed" else f"{lvl['rate']:g} req/s"
            label = f"{lvl['target']} {load}"
            lines.append(f"| {label} | " + " | ".join(_fmt(cpu.get(n), 3) for n in names) + f" | {_fmt(services, 3)} |")
        lines.append("")
        framed = [lvl for lvl in levels if lvl.get("items_per_frame")]
        if framed:
            # The multiplexed stage calls: how many requests' messages one gRPC message carried.
            keys = ["infer to_stage", "infer from_stage", "postprocess to_stage", "postprocess from_stage"]
            lines.append(
                "| requests' messages per frame | gateway → infer | infer → gateway | gateway → postprocess "
                "| postprocess → gateway |"
            )
            lines.append("|---|---:|---:|---:|---:|")
            for lvl in framed:
                per = lvl["items_per_frame"]
                load = f"c={lvl['concurrency']}" if lvl["mode"] == "closed" else f"{lvl['rate']:g} req/s"
                lines.append(f"| {lvl['target']} {load} | " + " | ".join(_fmt(per.get(k), 2) for k in keys) + " |")
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
    rows: Sequence[tuple[tuple[str, float], dict[str, dict[str, Any]]]], target: str, metric: str, stat: str
) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for (_, x), by in rows:
        level = by.get(target)
        value = (level["output_tokens_per_s"] if level else None) if metric == "tokens" else _get(level, metric, stat)
        if value is not None:
            xs.append(x)
            ys.append(value)
    return xs, ys


def plot(results: dict[str, Any], out: Path) -> Path:
    """One PNG: TTFT, ITL, end-to-end latency (p50, p99) and output tokens/s versus load, mesh beside direct."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = by_level(results)
    mode = rows[0][0][0] if rows else "closed"
    xlabel = "concurrency (requests in flight)" if mode == "closed" else "arrival rate (requests/s)"
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    panels = (
        (axes[0][0], "ttft_ms", "time to first token (ms)"),
        (axes[0][1], "itl_ms", "inter-token latency (ms)"),
        (axes[1][0], "latency_ms", "end-to-end latency (ms)"),
        (axes[1][1], "tokens", "output tokens/s (all streams)"),
    )
    styles = {
        "direct": ("direct (Triton)", "tab:blue"),
        "infer": ("infer stage", "tab:green"),
        "mesh": ("mesh (gateway)", "tab:orange"),
        "variant": ("mesh variant", "tab:red"),
    }
    present = {t for _, by in rows for t in by}
    for ax, metric, title in panels:
        for target, (name, colour) in styles.items():
            if target not in present:
                continue
            if metric == "tokens":
                xs, ys = _series(rows, target, metric, "")
                ax.plot(xs, ys, "o-", color=colour, label=name)
            else:
                for stat, dash in (("p50", "o-"), ("p99", "s--")):
                    xs, ys = _series(rows, target, metric, stat)
                    ax.plot(xs, ys, dash, color=colour, label=f"{name} {stat}")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        if mode == "closed":
            ax.set_xscale("log", base=2)
            ax.set_xticks([x for (_, x), _ in rows])
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
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
