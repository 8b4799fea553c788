"""Modules that sit next to a Triton model's `model.py` (which only Triton's python backend can import),
loaded from their files as Triton would find them."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from llmmesh.infer.triton_server import repository_root


def load_model_module(model: str, name: str) -> ModuleType:
    """triton_models/<model>/1/<name>.py as a module of its own."""
    path = repository_root() / model / "1" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{model}_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
