"""Postprocess gRPC servicer: the stage's `process` behind `PostprocessService.Process`, and the same for
each stream of a `ProcessStreams` call (llmmesh.common.mux)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

import grpc.aio

from llmmesh.common.mux import Inbox, MuxServer
from llmmesh.postprocess.stage import PostprocessStage
from llmmesh.stages.v1 import postprocess_pb2, postprocess_pb2_grpc

__all__ = ["PROCESS", "PostprocessServicer"]

# The per-stream method: what each stream on a ProcessStreams call is counted and traced as.
PROCESS = "/llmmesh.stages.v1.PostprocessService/Process"


def _op_kind(op: postprocess_pb2.ProcessStreamOp) -> str:
    return op.WhichOneof("kind") or "none"


def _message(op: postprocess_pb2.ProcessStreamOp) -> postprocess_pb2.ProcessRequest:
    return op.message


def _events(events: list[postprocess_pb2.ProcessStreamEvent]) -> postprocess_pb2.ProcessStreamEvents:
    return postprocess_pb2.ProcessStreamEvents(events=events)


class PostprocessServicer(postprocess_pb2_grpc.PostprocessServiceServicer):
    def __init__(self, stage: PostprocessStage) -> None:
        self.stage = stage
        # The ProcessStreams calls: a companion of the service, so that draining ends them.
        self.mux = MuxServer("postprocess")

    async def Process(
        self,
        request_iterator: AsyncIterator[postprocess_pb2.ProcessRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[postprocess_pb2.ProcessResponse]:
        async for response in self.stage.process(request_iterator, context.time_remaining()):
            yield response

    async def ProcessStreams(
        self,
        request_iterator: AsyncIterator[postprocess_pb2.ProcessStreamOps],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[postprocess_pb2.ProcessStreamEvents]:
        async for frame in self.mux.serve(
            request_iterator,
            method=PROCESS,
            kind=_op_kind,
            message=_message,
            handler=self._stream,
            event=postprocess_pb2.ProcessStreamEvent,
            frame=_events,
        ):
            yield frame

    def _stream(
        self, op: postprocess_pb2.ProcessStreamOp, inbox: Inbox, timeout: float | None
    ) -> AsyncGenerator[postprocess_pb2.ProcessResponse, None]:
        return self.stage.process(inbox, timeout)
