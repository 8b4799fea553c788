#!/usr/bin/env python3
"""Prints one image's requirements, one a line, from the dependencies declared in pyproject.toml.

    python deploy/requirements_from_pyproject.py services     # gateway, preprocess, infer, postprocess
    python deploy/requirements_from_pyproject.py triton-cpu   # the CPU Triton: server binary and model runtime

The services never import the Triton server binary (nvidia-pytriton, ~145 MB) or the CPU model's engine
(xllamacpp, ~100 MB): leaving them out keeps the four service images small. The CPU Triton needs only
those two and numpy. Reading the pins from pyproject.toml keeps the images on the versions the tests run.
Standard library only: it runs in the image build before anything is installed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# Needed by the CPU model inside Triton, never by a service.
CPU_MODEL_ONLY = frozenset({"nvidia-pytriton", "xllamacpp"})
TRITON_CPU = CPU_MODEL_ONLY | {"numpy"}


def name_of(requirement: str) -> str:
    """The PEP 503 normalized project name of a requirement string ("numpy<2" -> "numpy")."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(image: str, pyproject: Path = PYPROJECT) -> list[str]:
    declared: list[str] = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    if image == "services":
        return [r for r in declared if name_of(r) not in CPU_MODEL_ONLY]
    if image == "triton-cpu":
        return [r for r in declared if name_of(r) in TRITON_CPU]
    raise ValueError(f"unknown image {image!r}: services or triton-cpu")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(requirements(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
