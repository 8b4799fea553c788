"""Preprocess gRPC servicer: the stage's `prepare` and `check_prompt` behind `PreprocessService`."""

from __future__ import annotations

import grpc.aio

from llmmesh.preprocess.stage import PreprocessStage
from llmmesh.stages.v1 import preprocess_pb2, preprocess_pb2_grpc

__all__ = ["PreprocessServicer"]


class PreprocessServicer(preprocess_pb2_grpc.PreprocessServiceServicer):
    def __init__(self, stage: PreprocessStage) -> None:
        self.stage = stage

    async def Prepare(
        self, request: preprocess_pb2.PrepareRequest, context: grpc.aio.ServicerContext
    ) -> preprocess_pb2.PrepareResponse:
        return await self.stage.prepare(request.request, context.time_remaining(), request.defer_prompt_classifier)

    async def CheckPrompt(
        self, request: preprocess_pb2.PrepareRequest, context: grpc.aio.ServicerContext
    ) -> preprocess_pb2.CheckPromptResponse:
        return await self.stage.check_prompt(request.request, context.time_remaining())
