"""`python -m llmmesh.postprocess`: run the postprocess service."""

from llmmesh.common.server import run_service
from llmmesh.postprocess.server import PostprocessSettings, create_server


def main() -> None:
    settings = PostprocessSettings()
    run_service("postprocess", settings, lambda: create_server(settings))


if __name__ == "__main__":
    main()
