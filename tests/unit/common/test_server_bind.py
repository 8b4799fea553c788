"""A service's port is its own: a second server on a port already served fails to start, loudly.

grpc's servers set SO_REUSEPORT by default, so a second llmmesh service (another mesh on the same host, or a
stage given a port another stage has) bound the same port without a word and the kernel split the incoming
connections between the two: a gateway's calls to "postprocess" could reach another process entirely.
"""

from __future__ import annotations

import pytest

from llmmesh.common.server import build_server
from llmmesh.common.settings import ServiceSettings


async def test_a_second_server_on_the_same_port_fails_to_start() -> None:
    first = build_server("first", ServiceSettings(), [], lambda _server: None)
    try:
        with pytest.raises(OSError, match=rf"second: cannot bind 127\.0\.0\.1:{first.port}"):
            build_server("second", ServiceSettings(port=first.port), [], lambda _server: None)
    finally:
        await first.server.stop(None)
