"""Every service reads the model registry at start: a registry that is not valid stops it before it serves,
and a valid one's names and aliases are what preprocess and postprocess accept, over real gRPC."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import yaml

from llmmesh.common.registry import RegistryError
from llmmesh.common.server import Service
from llmmesh.infer.server import InferSettings
from llmmesh.infer.server import create_server as create_infer
from llmmesh.launcher import free_port
from llmmesh.postprocess.server import PostprocessSettings
from llmmesh.postprocess.server import create_server as create_postprocess
from llmmesh.preprocess.server import PreprocessSettings
from llmmesh.preprocess.server import create_server as create_preprocess
from llmmesh.stages.v1 import postprocess_pb2, postprocess_pb2_grpc, preprocess_pb2, preprocess_pb2_grpc
from llmmesh.v1 import generation_pb2

from .loopback import serving


def registry(tmp_path: Path, *models: dict[str, Any], name: str = "models.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"models": list(models)}))
    return str(path)


def bad_registries(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """A registry and the error it must give, for each way two entries can disagree."""
    return {
        "alias taken": (
            registry(
                tmp_path,
                {"name": "smollm2", "default": True, "triton_model": "smollm2"},
                {"name": "large", "aliases": ["smollm2"], "triton_model": "tensorrt_llm"},
                name="taken.yaml",
            ),
            r"model 'large' \(models\[1\]\): name or alias 'smollm2' is already taken by model 'smollm2'",
        ),
        "no default": (
            registry(tmp_path, {"name": "smollm2", "triton_model": "smollm2"}, name="no-default.yaml"),
            r"exactly one model must have `default: true`",
        ),
    }


CREATE: dict[str, Callable[[str], Awaitable[Service]]] = {
    "preprocess": lambda path: create_preprocess(PreprocessSettings(model_registry=path)),
    "postprocess": lambda path: create_postprocess(PostprocessSettings(model_registry=path)),
    "infer": lambda path: create_infer(InferSettings(model_registry=path, triton_url=f"127.0.0.1:{free_port()}")),
}


@pytest.mark.parametrize("service", CREATE)
async def test_a_service_does_not_start_on_an_invalid_registry(service: str, tmp_path: Path) -> None:
    """create_server raises, naming the file and the entry, before it binds a port."""
    for path, message in bad_registries(tmp_path).values():
        with pytest.raises(RegistryError, match=rf"^{path}: .*{message}"):
            await CREATE[service](path)


@pytest.mark.parametrize("service", ["preprocess", "postprocess"])
async def test_the_tokenizers_are_checked_against_the_registry_at_start(service: str, tmp_path: Path) -> None:
    """A context length above the GGUF's, or a tokenizer file that does not exist, stops the stages at start."""
    too_long = registry(tmp_path, {"name": "smollm2", "default": True, "triton_model": "x", "context_length": 10**6})
    with pytest.raises(RegistryError, match=r"model 'smollm2' \(models\[0\]\): context_length 1000000 exceeds"):
        await CREATE[service](too_long)
    missing = registry(tmp_path, {"name": "smollm2", "default": True, "triton_model": "x", "tokenizer": "/nope.gguf"})
    with pytest.raises(RegistryError, match=r"model 'smollm2' \(models\[0\]\): tokenizer '/nope.gguf': no such file"):
        await CREATE[service](missing)


@pytest.mark.parametrize("service", ["infer", "preprocess"])
def test_the_process_exits_non_zero_with_the_reason(service: str, tmp_path: Path) -> None:
    """`python -m llmmesh.<service>` with a bad registry ends at once, the reason on its last line."""
    path, message = bad_registries(tmp_path)["alias taken"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMMESH_")}
    env[f"LLMMESH_{service.upper()}_MODEL_REGISTRY"] = path
    env[f"LLMMESH_{service.upper()}_PORT"] = str(free_port())
    done = subprocess.run(
        [sys.executable, "-m", f"llmmesh.{service}"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert re.match(rf"llmmesh\.common\.registry\.RegistryError: {path}: {message}", last), last


@pytest.fixture(scope="module")
def aliased(tmp_path_factory: pytest.TempPathFactory) -> str:
    return registry(
        tmp_path_factory.mktemp("aliased"),
        {"name": "smollm2", "aliases": ["small", "default"], "default": True, "triton_model": "smollm2"},
    )


@pytest.fixture
async def preprocess(aliased: str) -> AsyncIterator[preprocess_pb2_grpc.PreprocessServiceStub]:
    async with serving(await create_preprocess(PreprocessSettings(model_registry=aliased))) as channel:
        yield preprocess_pb2_grpc.PreprocessServiceStub(channel)


@pytest.fixture
async def postprocess(aliased: str) -> AsyncIterator[postprocess_pb2_grpc.PostprocessServiceStub]:
    async with serving(await create_postprocess(PostprocessSettings(model_registry=aliased))) as channel:
        yield postprocess_pb2_grpc.PostprocessServiceStub(channel)


async def test_prepare_reports_the_canonical_name_for_an_alias(
    preprocess: preprocess_pb2_grpc.PreprocessServiceStub,
) -> None:
    """An alias and no name at all both come back as the registry's name, which infer routes and Final reports."""
    for model in ("small", "default", "smollm2", ""):
        request = generation_pb2.GenerateRequest(prompt="Hi", model=model)
        reply = await preprocess.Prepare(preprocess_pb2.PrepareRequest(request=request), timeout=10)
        assert reply.model == "smollm2", model
    with pytest.raises(grpc.aio.AioRpcError) as err:
        request = generation_pb2.GenerateRequest(prompt="Hi", model="large")
        await preprocess.Prepare(preprocess_pb2.PrepareRequest(request=request), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "model: unknown model 'large'; served: default, small, smollm2"


async def _process(stub: postprocess_pb2_grpc.PostprocessServiceStub, model: str) -> str:
    P = postprocess_pb2
    messages = [
        P.ProcessRequest(start=P.Start(request_id="r", model=model)),
        P.ProcessRequest(end=P.End(finish_reason=generation_pb2.FINISH_REASON_STOP)),
    ]
    try:
        async for _ in stub.Process(iter(messages), timeout=10):
            pass
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return "OK"


async def test_postprocess_accepts_every_registry_name(
    postprocess: postprocess_pb2_grpc.PostprocessServiceStub,
) -> None:
    """start.model selects the vocabulary through the registry: names and aliases pass, others are refused."""
    for model in ("small", "default", "smollm2", ""):
        assert await _process(postprocess, model) == "OK", model
    assert await _process(postprocess, "large") == "INVALID_ARGUMENT: start.model: unknown model 'large'"
