"""Preprocess in the caller's own process: the same servicer behind the stub's `Prepare`, no gRPC hop.

With `LLMMESH_GATEWAY_PREPROCESS_URL=inprocess` the gateway builds `PreprocessServicer` from the
`LLMMESH_PREPROCESS_*` settings and calls it through `LocalPreprocessStub`. What goes away is Prepare's
round trip to another process: 0.6 ms back to back and 0.7–1.8 ms when the process is idle, on every
request's way to its first token (loadtest/README.md, "Where the first token's time goes"). Errors reach
the caller as the `grpc.aio.AioRpcError` a gRPC call would have raised, with the same code and message.
"""

from __future__ import annotations

import asyncio
from typing import cast

import grpc.aio

from llmmesh.common.errors import as_rpc_error, rpc_error
from llmmesh.preprocess.servicer import PreprocessServicer
from llmmesh.stages.v1 import preprocess_pb2

__all__ = ["LocalPreprocessStub"]

_METHOD = "/llmmesh.stages.v1.PreprocessService/Prepare (in process)"


class LocalPreprocessStub:
    """`PreprocessServiceStub`'s one method, served by a servicer in this process."""

    def __init__(self, servicer: PreprocessServicer) -> None:
        self._servicer = servicer

    async def Prepare(
        self, request: preprocess_pb2.PrepareRequest, timeout: float | None = None
    ) -> preprocess_pb2.PrepareResponse:
        try:
            # The servicer never looks at its context. The deadline only matters while the prompt
            # classifier (a Triton call) runs.
            async with asyncio.timeout(timeout):
                return await self._servicer.Prepare(request, cast(grpc.aio.ServicerContext, None))
        except TimeoutError:
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except Exception as exc:
            raise as_rpc_error(exc, _METHOD) from None
