#!/usr/bin/env python3
"""Prints one image's requirements, one a line, from the dependencies declared in pyproject.toml.

    python deploy/requirements_from_pyproject.py services        # gateway, preprocess, infer, postprocess
    python deploy/requirements_from_pyproject.py triton-server   # the CPU Triton's server binary (--no-deps)
    python deploy/requirements_from_pyproject.py triton-models   # what its models import (with dependencies)

The services never import the Triton server binary (nvidia-pytriton, ~145 MB), the CPU model's engine
(xllamacpp, ~100 MB) or the safety classifier's model (alt-profanity-check with scikit-learn and scipy,
~120 MB): those run inside Triton's python backend, so leaving them out keeps the four service images small.
The CPU Triton needs exactly those and numpy. Of nvidia-pytriton only the bundled server files are used, so
it is installed without its dependencies; the models' packages are installed with theirs (scikit-learn
brings scipy, joblib and threadpoolctl, which triton_models/safety_classifier imports). Reading the pins from
pyproject.toml keeps the images on the versions the tests run. Standard library only: it runs in the image
build before anything is installed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# The CPU Triton's server binary, and what the models in triton_models/ import inside it (smollm2: llama.cpp;
# safety_classifier: alt-profanity-check); never needed by a service.
TRITON_SERVER = frozenset({"nvidia-pytriton"})
TRITON_MODELS = frozenset({"xllamacpp", "alt-profanity-check", "numpy"})
TRITON_ONLY = TRITON_SERVER | (TRITON_MODELS - {"numpy"})


def name_of(requirement: str) -> str:
    """The PEP 503 normalized project name of a requirement string ("numpy<2" -> "numpy")."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(image: str, pyproject: Path = PYPROJECT) -> list[str]:
    declared: list[str] = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    if image == "services":
        return [r for r in declared if name_of(r) not in TRITON_ONLY]
    if image == "triton-server":
        return [r for r in declared if name_of(r) in TRITON_SERVER]
    if image == "triton-models":
        return [r for r in declared if name_of(r) in TRITON_MODELS]
    raise ValueError(f"unknown image {image!r}: services, triton-server or triton-models")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(requirements(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
