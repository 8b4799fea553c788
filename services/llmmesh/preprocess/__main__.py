"""`python -m llmmesh.preprocess`: run the preprocess service."""

from llmmesh.common.server import run_service
from llmmesh.preprocess.server import PreprocessSettings, create_server


def main() -> None:
    settings = PreprocessSettings()
    run_service("preprocess", settings, lambda: create_server(settings))


if __name__ == "__main__":
    main()
