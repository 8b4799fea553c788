"""`python -m llmmesh.gateway`: run the gateway, the mesh's one public entry point."""

from llmmesh.common.server import run_service
from llmmesh.gateway.server import GatewaySettings, create_server


def main() -> None:
    settings = GatewaySettings()
    run_service("gateway", settings, lambda: create_server(settings))


if __name__ == "__main__":
    main()
