"""Generates the gRPC stubs (and .pyi type stubs) from protos/ before the package is built.

The stubs land in their own packages of the source root, services/llmmesh/v1/ and services/llmmesh/stages/
(`llmmesh.v1` and `llmmesh.stages.v1`: generated modules only, no hand-written module among them), which git
ignores: they are never committed or edited by hand.
Run `python setup.py build_protos` to regenerate them in place without reinstalling.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import Command, find_packages, setup

ROOT = Path(__file__).parent
PROTOS = ROOT / "protos"
SRC = ROOT / "services"  # the source root, as src/ elsewhere: the package lives in services/llmmesh/
OUT = SRC / "llmmesh"


def generate() -> None:
    import grpc_tools
    from grpc_tools import protoc

    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    staging = ROOT / "build" / "protos"
    staging.mkdir(parents=True, exist_ok=True)
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--python_out={staging}",
            f"--pyi_out={staging}",
            f"--grpc_python_out={staging}",
            *sources,
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    for produced in (staging / "llmmesh").rglob("*.py*"):
        target = OUT / produced.relative_to(staging / "llmmesh")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(produced.read_bytes())
    for folder in (OUT / "v1", OUT / "stages", OUT / "stages" / "v1"):
        (folder / "__init__.py").touch()


class BuildProtos(Command):
    description = "generate gRPC stubs from protos/"
    user_options: list[tuple[str, str | None, str]] = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        generate()


def packages() -> list[str]:
    # The stubs must exist before setuptools lists the packages, so generate them first.
    generate()
    return find_packages(str(SRC))


setup(packages=packages(), cmdclass={"build_protos": BuildProtos})
