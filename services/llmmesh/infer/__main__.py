"""`python -m llmmesh.infer`: run the infer service (a client of Triton)."""

from llmmesh.common.server import run_service
from llmmesh.infer.server import InferSettings, create_server


def main() -> None:
    settings = InferSettings()
    run_service("infer", settings, lambda: create_server(settings))


if __name__ == "__main__":
    main()
