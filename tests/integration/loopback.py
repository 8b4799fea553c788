"""A grpc.aio server on a loopback port with the services' StatusInterceptor, for tests of an in-process stage
against the same servicer over real gRPC."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import grpc.aio

from llmmesh.common.errors import StatusInterceptor
from llmmesh.common.server import Service


@contextlib.asynccontextmanager
async def loopback_channel(register: Callable[[grpc.aio.Server], None]) -> AsyncIterator[grpc.aio.Channel]:
    """Starts a server with what `register` adds, yields a channel to it, stops the server."""
    server = grpc.aio.server(interceptors=[StatusInterceptor()])
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def serving(service: Service) -> AsyncIterator[grpc.aio.Channel]:
    """Starts a built service (a service's own `create_server`), yields a channel to it, drains it."""
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            yield channel
    finally:
        await service.drain(0)
