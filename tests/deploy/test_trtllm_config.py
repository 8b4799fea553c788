"""deploy/fill_trtllm_config.py: the TensorRT-LLM model it writes is a valid Triton config with the given
engine, batch size and tokenizer, decoupled in-flight batching, and the tensor contract of the CPU model."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from .deployfiles import DEPLOY, TRITON_MODELS

SCRIPT = DEPLOY / "fill_trtllm_config.py"
ENGINE = "/models/engines/smollm2-1.7b"
TOKENIZER = "/models/tokenizer"


def _fill(repository: Path, *extra: str, engine: str = ENGINE) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, str(SCRIPT), "--engine-dir", engine, "--tokenizer-dir", TOKENIZER]
    args += ["--repository", str(repository), *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def _config(path: Path) -> Any:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _parameters(config: Any) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def _contract(config: Any) -> tuple[dict[str, tuple[int, list[int], bool]], dict[str, tuple[int, list[int]]]]:
    inputs = {i.name: (i.data_type, list(i.dims), i.optional) for i in config.input}
    outputs = {o.name: (o.data_type, list(o.dims)) for o in config.output}
    return inputs, outputs


@pytest.fixture
def filled(tmp_path: Path) -> Any:
    result = _fill(tmp_path, "--max-batch-size", "48")
    assert result.returncode == 0, result.stderr
    return _config(tmp_path / "tensorrt_llm" / "config.pbtxt")


def test_script_needs_only_the_standard_library() -> None:
    """The script runs on a bare GPU host: it imports nothing outside Python's standard library."""
    tree = ast.parse(SCRIPT.read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert modules - {"__future__"} <= set(sys.stdlib_module_names)


def test_writes_the_model_folder_triton_loads(tmp_path: Path) -> None:
    """The model folder holds config.pbtxt and the numbered version folder Triton requires."""
    result = _fill(tmp_path, "--max-batch-size", "8")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tensorrt_llm" / "config.pbtxt").is_file()
    assert (tmp_path / "tensorrt_llm" / "1").is_dir()
    assert "${" not in (tmp_path / "tensorrt_llm" / "config.pbtxt").read_text()


def test_given_engine_batch_size_and_tokenizer_are_in_the_config(filled: Any) -> None:
    """Engine path, max batch size and tokenizer folder are the ones asked for."""
    params = _parameters(filled)
    assert filled.name == "tensorrt_llm" and filled.backend == "tensorrtllm"
    assert filled.max_batch_size == 48
    assert params["gpt_model_path"] == ENGINE
    assert params["tokenizer_dir"] == TOKENIZER


def test_decoupled_inflight_fused_batching_with_kv_cache_settings(filled: Any) -> None:
    """Streaming needs decoupled mode; the engine batches in flight and reuses its KV cache by default."""
    params = _parameters(filled)
    assert filled.model_transaction_policy.decoupled is True
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["kv_cache_free_gpu_mem_fraction"] == "0.9"
    assert params["enable_kv_cache_reuse"] == "true"
    assert params["exclude_input_in_output"] == "true"
    assert params["max_beam_width"] == "1"
    assert params["batch_scheduler_policy"] == "guaranteed_no_evict"
    # The backend reads these unconditionally; empty keeps guided decoding off.
    assert params["guided_decoding_backend"] == params["xgrammar_tokenizer_info_path"] == ""
    assert "gpu_device_ids" not in params


def test_queue_delay_queue_size_and_instances(filled: Any) -> None:
    """No queue delay and an unbounded queue by default; one executor instance on the CPU side."""
    assert filled.dynamic_batching.max_queue_delay_microseconds == 0
    assert filled.dynamic_batching.default_queue_policy.max_queue_size == 0
    (group,) = filled.instance_group
    assert group.count == 1 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


def test_options_reach_the_config(tmp_path: Path) -> None:
    """Every option the script documents changes the field it names."""
    result = _fill(
        tmp_path,
        "--max-batch-size", "16",
        "--model-name", "tensorrt_llm_large",
        "--kv-cache-free-gpu-mem-fraction", "0.85",
        "--no-kv-cache-reuse",
        "--max-queue-delay-us", "100",
        "--max-queue-size", "256",
        "--batch-scheduler-policy", "max_utilization",
        "--instance-count", "2",
        "--gpu-device-ids", "0;1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = _config(tmp_path / "tensorrt_llm_large" / "config.pbtxt")
    params = _parameters(config)
    assert config.name == "tensorrt_llm_large"
    assert params["kv_cache_free_gpu_mem_fraction"] == "0.85"
    assert params["enable_kv_cache_reuse"] == "false"
    assert params["batch_scheduler_policy"] == "max_utilization"
    assert params["gpu_device_ids"] == "0;1"
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 256
    assert config.instance_group[0].count == 2


def test_same_tensor_contract_as_the_cpu_model(filled: Any) -> None:
    """infer drives both models with one request: same input and output names, types, shapes and optionality."""
    assert _contract(filled) == _contract(_config(TRITON_MODELS / "smollm2" / "config.pbtxt"))


def test_paths_are_quoted_safely(tmp_path: Path) -> None:
    """A path with a quote or backslash comes back from the config exactly as given."""
    odd = '/models/engines/my "best"\\engine'
    result = _fill(tmp_path, "--max-batch-size", "4", engine=odd)
    assert result.returncode == 0, result.stderr
    assert _parameters(_config(tmp_path / "tensorrt_llm" / "config.pbtxt"))["gpt_model_path"] == odd


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--max-batch-size", "8", "--kv-cache-free-gpu-mem-fraction", "1.5"], "(0, 1]"),
        (["--max-batch-size", "8", "--instance-count", "2"], "--gpu-device-ids"),
        (["--max-batch-size", "8", "--model-name", "../escape"], "--model-name"),
        (["--max-batch-size", "8", "--gpu-device-ids", "zero"], "--gpu-device-ids"),
    ],
)
def test_bad_settings_are_refused(tmp_path: Path, extra: list[str], message: str) -> None:
    """Invalid settings exit 2 with a message naming the option, and write nothing."""
    result = _fill(tmp_path, *extra)
    assert result.returncode == 2 and message in result.stderr
    assert not any(tmp_path.iterdir())


def test_batch_size_beyond_the_engine_is_refused(tmp_path: Path) -> None:
    """When the engine is reachable, a batch size above the one it was built for is refused."""
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text(json.dumps({"build_config": {"max_batch_size": 32}}))
    repository = tmp_path / "repository"
    assert _fill(repository, "--max-batch-size", "32", engine=str(engine)).returncode == 0
    refused = _fill(repository, "--max-batch-size", "64", engine=str(engine))
    assert refused.returncode == 2 and "max_batch_size 32" in refused.stderr
