"""The load generator's helpers: workload building, /proc sampling, profiles, perf_analyzer exports, reports."""

from __future__ import annotations

import json
import os
from array import array
from pathlib import Path

import pytest

from llmmesh.common.model_assets import ModelAssets
from loadtest import procstats
from loadtest.harness import instrument_repository
from loadtest.perf_analyzer import profile_records
from loadtest.profile import aggregate
from loadtest.report import markdown, plot
from loadtest.sequence import check
from loadtest.workload import WORKLOADS, build, expected_instrument_output, instrument_sequence


def _tensor(request: object, name: str) -> list[int]:
    for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):  # type: ignore[attr-defined]
        if tensor.name == name:
            return array("i", raw).tolist()
    raise KeyError(name)


def test_direct_requests_carry_preprocess_tokenization_of_the_mesh_prompts(assets: ModelAssets) -> None:
    """The direct request holds the ids preprocess makes of the same prompt (template, system turn included)."""
    built = build(WORKLOADS["chat-256"], "instrument", assets=assets)
    assert len(built.mesh_requests) == len(built.direct_requests) == len(WORKLOADS["chat-256"].prompts)
    for mesh, direct in zip(built.mesh_requests, built.direct_requests, strict=True):
        ids = _tensor(direct, "input_ids")
        assert direct.model_name == "instrument"
        assert _tensor(direct, "request_output_len") == [256] == [mesh.sampling.max_tokens]
        text = assets.decode(ids)
        assert mesh.prompt in text and "You are a helpful assistant." in text
        assert ids == assets.encode(
            assets.render_chat(
                [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": mesh.prompt},
                ]
            )
        )


def test_expected_output_is_the_sequence_start_cut_at_end_id() -> None:
    """The instrument's output: the first max_tokens ids of its sequence, stopped before end_id."""
    sequence = [5, 6, 7, 8, 9]
    assert expected_instrument_output(sequence, 3, end_id=2) == (5, 6, 7)
    assert expected_instrument_output(sequence, 10, end_id=2) == (5, 6, 7, 8, 9)
    assert expected_instrument_output(sequence, 10, end_id=8) == (5, 6, 7)


def test_instrument_sequence_is_the_tokenization_of_its_text(assets: ModelAssets) -> None:
    """sequence.json's ids are SmolLM2's tokenization of its text, long enough for the 256-token benchmark."""
    assert check(assets=assets)
    assert len(instrument_sequence()) >= 512


def test_instrument_repository_rewrites_only_the_timing(tmp_path: Path) -> None:
    """A benchmark repository copies the instrument with the requested TTFT and ITL."""
    repo = instrument_repository(tmp_path, ttft_ms=5, itl_ms=0.5)
    config = (repo / "instrument" / "config.pbtxt").read_text()
    assert 'key: "ttft_ms" value: { string_value: "5" }' in config
    assert 'key: "itl_ms" value: { string_value: "0.5" }' in config
    assert (repo / "instrument" / "1" / "model.py").exists() and (repo / "instrument" / "1" / "sequence.json").exists()


def test_procstats_reads_this_process() -> None:
    """/proc gives this process's CPU seconds and resident memory; a missing PID gives None."""
    sample = procstats.sample(os.getpid())
    assert sample is not None and sample.cpu_s > 0 and 0 < sample.rss_mib <= sample.peak_rss_mib
    assert procstats.sample(2**22 + 12345) is None
    assert os.getpid() in procstats.children(os.getppid())


def test_profile_aggregate_counts_self_and_inclusive_shares() -> None:
    """py-spy's collapsed stacks become per-function shares, line numbers merged."""
    raw = "main (a.py:1);loop (b.py:2);send (c.py:3) 6\nmain (a.py:1);loop (b.py:9) 3\nmain (a.py:1);recv (c.py:7) 1\n"
    prof = aggregate(raw)
    assert prof["samples"] == 10
    assert prof["self_pct"][0] == ("send (c.py)", 60.0)
    assert dict(prof["inclusive_pct"])["loop (b.py)"] == 90.0
    assert dict(prof["inclusive_pct"])["main (a.py)"] == 100.0


def test_perf_analyzer_export_becomes_records() -> None:
    """Each perf_analyzer request (ns timestamps) becomes a record: one token per response; warm-up skipped."""
    export = {
        "experiments": [
            {
                "requests": [
                    {"timestamp": 2_000_000_000, "response_timestamps": [2_020_000_000, 2_030_000_000, 2_040_000_000]},
                    {"timestamp": 1_000_000_000, "response_timestamps": [1_021_000_000]},
                    {"timestamp": 3_000_000_000, "response_timestamps": []},
                ]
            }
        ]
    }
    records = profile_records(export, skip=1)
    assert len(records) == 2
    first = records[0]
    assert first.ttft == pytest.approx(0.020) and first.output_tokens == 3 and first.latency == pytest.approx(0.040)
    assert records[1].error == "INCOMPLETE"


def _level(target: str, c: int, ttft: float, itl: float, tps: float) -> dict[str, object]:
    dist = {"count": 10, "mean": ttft, "min": ttft, "max": ttft, "p50": ttft, "p90": ttft, "p99": ttft}
    return {
        "target": target,
        "mode": "closed",
        "concurrency": c,
        "rate": None,
        "errors": {},
        "output_tokens_per_s": tps,
        "ttft_ms": dist,
        "itl_ms": {**dist, "p50": itl, "p99": itl},
        "latency_ms": dist,
        "cpu_s_per_1k_tokens": {"gateway": 0.1, "triton": 0.05},
    }


def test_report_puts_mesh_beside_direct(tmp_path: Path) -> None:
    """The table pairs each level's direct and mesh figures with the added latency and the throughput ratio."""
    results = {
        "config": {"ttft_ms": 20, "itl_ms": 10, "max_tokens": 256, "workload": "chat-256"},
        "levels": [_level("direct", 1, 21.0, 10.0, 100.0), _level("mesh", 1, 22.5, 10.1, 95.0)],
        "peak_rss_mib": {"gateway": 70.0},
    }
    table = markdown(results)
    row = next(line for line in table.splitlines() if line.startswith("| c=1 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["21.00", "22.50", "1.50"]
    assert cells[8] == "0.100" and cells[11] == "95.0 %"
    assert "| whole run | 70 |" in table
    png = plot(results, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(results)  # what `run` writes stays plain JSON


def test_report_puts_chunk_gaps_and_tokens_per_chunk_beside_itl() -> None:
    """Each level and target gets a row with ITL, the chunk gap's p50 and p99 and tokens per chunk: a mesh
    whose ITL matches direct's still shows its bunched chunks there."""
    direct, mesh = _level("direct", 1, 21.0, 10.0, 100.0), _level("mesh", 1, 22.5, 9.96, 95.0)
    direct["chunk_gap_ms"] = {"count": 99, "mean": 10.0, "p50": 10.0, "p99": 10.2}
    direct["tokens_per_chunk"] = {"count": 100, "mean": 1.0, "p50": 1.0, "p99": 1.0}
    mesh["chunk_gap_ms"] = {"count": 40, "mean": 24.0, "p50": 0.05, "p99": 60.1}
    mesh["tokens_per_chunk"] = {"count": 41, "mean": 2.44, "p50": 1.0, "p99": 7.0}
    table = markdown({"config": {}, "levels": [direct, mesh]})
    rows = {
        cells[1]: cells[2:]
        for line in table.splitlines()
        if line.startswith("| c=1 |") and len(cells := [c.strip() for c in line.strip("|").split("|")]) == 7
    }
    assert rows == {
        "direct": ["10.000", "10.000", "10.200", "1.00", "1"],
        "mesh": ["9.960", "0.050", "60.100", "2.44", "7"],
    }
    assert "chunk gap p99" in table


def test_cpu_floor_sets_the_bare_reader_beside_half_of_triton_and_stub(tmp_path: Path) -> None:
    from loadtest.cpu_floor import rows

    def level(target: str, concurrency: int, cpu: dict[str, float]) -> dict[str, object]:
        return {"target": target, "concurrency": concurrency, "cpu_s_per_1k_tokens": cpu}

    services = {"gateway": 0.1, "preprocess": 0.01, "infer": 0.2, "postprocess": 0.15}
    run = {
        "config": {"pii_redaction": "on"},
        "levels": [
            level("direct", 64, {"loadgen": 0.18, "triton": 0.2, "triton_stub": 0.1}),
            level("mesh", 64, {**services, "triton": 0.18, "triton_stub": 0.12, "loadgen": 0.09}),
            level("mesh", 8, {**services, "triton": 0.3, "triton_stub": 0.2}),  # no direct at c=8: left out
        ],
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    (row,) = rows(path)
    assert row["concurrency"] == 64
    assert row["allowance"] == pytest.approx(0.15)  # half of the mesh run's triton + stub
    assert row["bare_reader"] == 0.18
    assert row["services"] == pytest.approx(0.46)
    assert row["bare_reader_over_allowance"] == pytest.approx(1.2)
    assert row["infer_over_bare_reader"] == pytest.approx(1.11)
    (tmp_path / "other.json").write_text(json.dumps({"command": "not a run"}))
    assert rows(tmp_path / "other.json") == []


def test_hop_floor_chain_forwards_every_call_to_the_origin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loadtest import hop_floor

    monkeypatch.setattr(hop_floor, "RESULTS", tmp_path / "hop_floor.json")
    hop_floor.main(["--rounds", "4"])
    result = json.loads((tmp_path / "hop_floor.json").read_text())
    for mode in ("a call per request", "a message on an open call"):
        times = result[mode]["first_response_ms"]
        assert set(times) == {f"{n} relays" for n in hop_floor.RELAYS}
        assert all(t["p50"] > 0 for t in times.values())


def test_ab_blocks_alternate_and_the_summary_pools_every_answer() -> None:
    """policy_ab and layout_ab: A first in even blocks, B first in odd ones; each arm's median over the floor
    is over all its answers (not a median of block medians), with the halves of its blocks apart."""
    from loadtest.policy_ab import arm_order, summarise

    assert [arm_order(b) for b in range(3)] == [("A", "B"), ("B", "A"), ("A", "B")]
    result = summarise({"A": [[1.0, 2.0, 30.0], [-4.0]], "B": [[5.0], [6.0, 7.0]]})
    a, b = result["summary"]["A"], result["summary"]["B"]
    assert (a["answers"], a["over_floor_p50_ms"], a["within_floor"]) == (4, 1.5, 1)
    assert (a["first_half_p50_ms"], a["second_half_p50_ms"]) == (2.0, -4.0)
    assert (b["answers"], b["over_floor_p50_ms"], b["within_floor"]) == (3, 6.0, 0)
    assert result["b_minus_a_p50_ms"] == 4.5


def test_layout_ab_puts_the_named_stages_in_gateway_b_and_refuses_others() -> None:
    from loadtest.layout_ab import b_environment, main

    assert b_environment(("preprocess", "postprocess"), [("LLMMESH_GATEWAY_HOP_ORDER", "gateway")]) == {
        "LLMMESH_GATEWAY_PREPROCESS_URL": "inprocess",
        "LLMMESH_GATEWAY_POSTPROCESS_URL": "inprocess",
        "LLMMESH_GATEWAY_HOP_ORDER": "gateway",
    }
    assert b_environment((), []) == {}
    with pytest.raises(SystemExit):
        main(["--b-in-gateway", "infer", "--name", "x"])
    with pytest.raises(SystemExit):
        main(["--b-env", "NOEQUALS", "--name", "x"])
