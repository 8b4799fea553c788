"""A stand-in for Triton's GRPCInferenceService on a loopback port, for tests about Triton's callers (the
safety classifier's client, and the stages that use it): it records the deadline each ModelInfer arrives
with, answers P(unsafe) = 0.5 per text (or never, while `hang`), and reports the model ready while `ready`.
The real model behind the real Triton is tested end to end (tests/e2e/test_safety_classifier.py)."""

from __future__ import annotations

import asyncio
import contextlib
from array import array
from collections.abc import AsyncIterator

import grpc.aio
from tritonclient.grpc import service_pb2, service_pb2_grpc

__all__ = ["StandInTriton", "standin_triton"]


class StandInTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.url = ""
        self.deadlines: list[float | None] = []
        self.hang = False
        self.ready = True

    async def ModelInfer(
        self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        self.deadlines.append(context.time_remaining())
        if self.hang:
            await asyncio.Event().wait()
        n = request.inputs[0].shape[0]
        response = service_pb2.ModelInferResponse(model_name=request.model_name)
        response.outputs.add(name="PROBABILITY", datatype="FP32", shape=[n, 1])
        response.raw_output_contents.append(array("f", [0.5] * n).tobytes())
        return response

    async def ModelReady(
        self, request: service_pb2.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelReadyResponse:
        return service_pb2.ModelReadyResponse(ready=self.ready)


@contextlib.asynccontextmanager
async def standin_triton() -> AsyncIterator[StandInTriton]:
    """Serves a StandInTriton on a free loopback port (its `url`) until the block ends."""
    servicer = StandInTriton()
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    servicer.url = f"127.0.0.1:{port}"
    await server.start()
    try:
        yield servicer
    finally:
        await server.stop(0)
