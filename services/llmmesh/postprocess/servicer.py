"""Postprocess gRPC servicer: the stage's `process` behind `PostprocessService.Process`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc.aio

from llmmesh.postprocess.stage import PostprocessStage
from llmmesh.stages.v1 import postprocess_pb2, postprocess_pb2_grpc

__all__ = ["PostprocessServicer"]


class PostprocessServicer(postprocess_pb2_grpc.PostprocessServiceServicer):
    def __init__(self, stage: PostprocessStage) -> None:
        self.stage = stage

    async def Process(
        self,
        request_iterator: AsyncIterator[postprocess_pb2.ProcessRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[postprocess_pb2.ProcessResponse]:
        async for response in self.stage.process(request_iterator, context.time_remaining()):
            yield response
