#!/usr/bin/env python3
"""Writes a Triton model for a TensorRT-LLM engine from triton_models/tensorrt_llm/config.pbtxt.template.

    python deploy/fill_trtllm_config.py --engine-dir /models/engines/default \\
        --tokenizer-dir /models/tokenizer --max-batch-size 64

writes deploy/models/repository/tensorrt_llm/config.pbtxt and the empty version folder Triton requires
(deploy/models/ is what docker-compose mounts at /models, so paths are given as Triton sees them inside
its container). Run it again with --model-name tensorrt_llm_large and another engine for a second model.
Standard library only: it runs anywhere, without the project's virtual environment.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "triton_models" / "tensorrt_llm" / "config.pbtxt.template"
REPOSITORY = ROOT / "deploy" / "models" / "repository"
SCHEDULER_POLICIES = ("guaranteed_no_evict", "max_utilization")


def _pbtxt_string(value: str) -> str:
    """A value that sits inside double quotes in protobuf text format."""
    if "\n" in value:
        raise ValueError(f"newline in {value!r}")
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Paths are the ones Triton sees inside its container (compose mounts deploy/models at /models).
    p.add_argument("--engine-dir", required=True, help="engine folder (trtllm-build --output_dir)")
    p.add_argument("--tokenizer-dir", required=True, help="the model's Hugging Face tokenizer folder")
    p.add_argument("--max-batch-size", type=_positive, required=True, help="at most trtllm-build's --max_batch_size")
    p.add_argument("--model-name", default="tensorrt_llm", help="Triton model name (a registry's triton_model)")
    p.add_argument("--repository", type=Path, default=REPOSITORY, help=f"where to write (default {REPOSITORY})")
    p.add_argument("--template", type=Path, default=TEMPLATE, help=argparse.SUPPRESS)
    p.add_argument("--kv-cache-free-gpu-mem-fraction", type=_fraction, default=0.9)
    p.add_argument("--no-kv-cache-reuse", action="store_true", help="engines built without paged context FMHA")
    p.add_argument("--max-queue-delay-us", type=_non_negative, default=0, help="Triton queue delay (microseconds)")
    p.add_argument("--max-queue-size", type=_non_negative, default=0, help="requests that may wait (0 = unbounded)")
    p.add_argument("--batch-scheduler-policy", choices=SCHEDULER_POLICIES, default=SCHEDULER_POLICIES[0])
    p.add_argument("--instance-count", type=_positive, default=1, help="executors (more than 1 needs GPU groups)")
    p.add_argument("--gpu-device-ids", default="", help='GPUs per instance, ";" between instances, e.g. "0;1"')
    args = p.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.model_name):
        p.error(f"--model-name: letters, digits, '_', '.', '-' only, got {args.model_name!r}")
    groups = [g for g in args.gpu_device_ids.split(";") if g.strip()] if args.gpu_device_ids else []
    if any(not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", g) for g in groups):
        p.error(f"--gpu-device-ids: comma-separated GPU numbers per instance, got {args.gpu_device_ids!r}")
    if args.instance_count > 1 and len(groups) != args.instance_count:
        p.error(f"--instance-count {args.instance_count} needs that many --gpu-device-ids groups, got {len(groups)}")
    _check_engine(p, Path(args.engine_dir), args.max_batch_size)
    return args


def _check_engine(p: argparse.ArgumentParser, engine_dir: Path, max_batch_size: int) -> None:
    """When the engine is reachable from here, refuse a batch size larger than the one it was built for."""
    config = engine_dir / "config.json"
    if not config.is_file():
        return
    built = json.loads(config.read_text()).get("build_config", {}).get("max_batch_size")
    if isinstance(built, int) and max_batch_size > built:
        p.error(f"--max-batch-size {max_batch_size} exceeds the engine's max_batch_size {built} ({config})")


def render(args: argparse.Namespace) -> str:
    device_parameters = ""
    if args.gpu_device_ids:
        ids = _pbtxt_string(args.gpu_device_ids.replace(" ", ""))
        device_parameters = f'parameters {{ key: "gpu_device_ids" value: {{ string_value: "{ids}" }} }}'
    values = {
        "model_name": args.model_name,
        "max_batch_size": str(args.max_batch_size),
        "engine_dir": _pbtxt_string(args.engine_dir),
        "tokenizer_dir": _pbtxt_string(args.tokenizer_dir),
        "max_queue_delay_microseconds": str(args.max_queue_delay_us),
        "max_queue_size": str(args.max_queue_size),
        "kv_cache_free_gpu_mem_fraction": f"{args.kv_cache_free_gpu_mem_fraction:g}",
        "enable_kv_cache_reuse": "false" if args.no_kv_cache_reuse else "true",
        "batch_scheduler_policy": args.batch_scheduler_policy,
        "instance_count": str(args.instance_count),
        "device_parameters": device_parameters,
    }
    # substitute() raises on a placeholder without a value: a template field nobody fills is a bug here.
    return string.Template(args.template.read_text(encoding="utf-8")).substitute(values)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    text = render(args)
    model_dir = args.repository / args.model_name
    # Triton loads a model only from a numbered version folder; the engine itself lives in --engine-dir.
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    target = model_dir / "config.pbtxt"
    target.write_text(text, encoding="utf-8")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
