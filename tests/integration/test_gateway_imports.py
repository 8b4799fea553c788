"""A gateway imports a stage's implementation only when it runs that stage in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = (
    "tokenizers",
    "llmmesh.common.gguf_vocab",
    "hyperscan",
    "jinja2",
    "llmmesh.common.model_assets",
    "llmmesh.common.safety",
)

# Builds the gateway's server (stages configured by the environment, nothing needs to answer), then
# prints which heavy modules the process holds.
SCRIPT = f"""
import asyncio, json, sys
from llmmesh.gateway.server import GatewaySettings, create_server

async def main():
    service = await create_server(GatewaySettings(host="127.0.0.1", port=0))
    await service.server.stop(None)

asyncio.run(main())
print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
"""


def _loaded(env: dict[str, str]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    ("in_process", "expected"),
    [
        ((), []),
        (
            ("preprocess",),
            [
                "tokenizers",
                "llmmesh.common.gguf_vocab",
                "jinja2",
                "llmmesh.common.model_assets",
                "llmmesh.common.safety",
            ],
        ),
        (
            ("postprocess",),
            [
                "tokenizers",
                "llmmesh.common.gguf_vocab",
                "hyperscan",
                "llmmesh.common.model_assets",
                "llmmesh.common.safety",
            ],
        ),
    ],
    ids=["four processes", "preprocess in the gateway", "postprocess in the gateway"],
)
def test_a_gateway_loads_a_stage_only_to_run_it(in_process: tuple[str, ...], expected: list[str]) -> None:
    """A four-process gateway loads no tokenizer, GGUF reader or hyperscan; one that runs a stage does."""
    env = {f"LLMMESH_GATEWAY_{name.upper()}_URL": "inprocess" for name in in_process}
    loaded = _loaded(env)
    if not expected:
        assert loaded == []
    else:
        assert set(expected) <= set(loaded), loaded
