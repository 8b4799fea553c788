"""Gateway gRPC servicer: the public `llmmesh.v1.GenerationService`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc.aio

from llmmesh.gateway.orchestrator import Orchestrator
from llmmesh.v1 import generation_pb2, generation_pb2_grpc

__all__ = ["GatewayServicer"]


class GatewayServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, orchestrator: Orchestrator) -> None:
        self._orchestrator = orchestrator

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        async for response in self._orchestrator.generate(request, context.time_remaining()):
            yield response
