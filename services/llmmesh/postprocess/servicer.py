"""Postprocess gRPC servicer: the stage's `process` behind `PostprocessService.Process`, and the same for
each stream of a `ProcessStreams` call (llmmesh.common.mux)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator

import grpc.aio

from llmmesh.common.errors import FailedPrecondition, Unavailable
from llmmesh.common.mux import Inbox, MuxServer
from llmmesh.gateway.stages import Infer, generate_retried
from llmmesh.postprocess.stage import PostprocessStage
from llmmesh.stages.v1 import infer_pb2, postprocess_pb2, postprocess_pb2_grpc

__all__ = ["PROCESS", "PostprocessServicer"]

# The per-stream method: what each stream on a ProcessStreams call is counted and traced as.
PROCESS = "/llmmesh.stages.v1.PostprocessService/Process"


def _message(op: postprocess_pb2.ProcessStreamOp) -> postprocess_pb2.ProcessRequest:
    return op.message


def _events(events: list[postprocess_pb2.ProcessStreamEvent]) -> postprocess_pb2.ProcessStreamEvents:
    return postprocess_pb2.ProcessStreamEvents(events=events)


class PostprocessServicer(postprocess_pb2_grpc.PostprocessServiceServicer):
    def __init__(self, stage: PostprocessStage, infer: Infer | None = None) -> None:
        self.stage = stage
        # The other hop order (Start.infer): this stage reads the generation from infer itself.
        self.infer = infer
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
            message=_message,
            handler=self._stream,
            event=postprocess_pb2.ProcessStreamEvent,
            frame=_events,
        ):
            yield frame

    def _stream(
        self, op: postprocess_pb2.ProcessStreamOp, inbox: Inbox, timeout: float | None
    ) -> AsyncGenerator[postprocess_pb2.ProcessResponse, None]:
        if op.message.start.HasField("infer"):
            return self._chained(op.message.start, timeout)
        return self.stage.process(inbox, timeout)

    async def _chained(
        self, start: postprocess_pb2.Start, timeout: float | None
    ) -> AsyncGenerator[postprocess_pb2.ProcessResponse, None]:
        """Start.infer: the generation's token ids read from infer here, not relayed by the gateway; what infer
        said about it (reuse, a text backend's prompt tokens) goes back on Done."""
        if self.infer is None:
            raise FailedPrecondition("postprocess has no infer_url: it cannot read generations itself")
        said = infer_pb2.InferResponse()

        async def messages() -> AsyncGenerator[postprocess_pb2.ProcessRequest, None]:
            yield postprocess_pb2.ProcessRequest(start=start)
            assert self.infer is not None
            deadline = None if timeout is None else time.monotonic() + timeout
            generation = generate_retried(
                self.infer, start.infer, lambda: None if deadline is None else deadline - time.monotonic()
            )
            async with contextlib.aclosing(generation):
                async for response in generation:
                    if response.reuse:
                        said.reuse = response.reuse
                    if response.token_ids:
                        yield postprocess_pb2.ProcessRequest(tokens=postprocess_pb2.Tokens(ids=response.token_ids))
                    elif response.text:
                        yield postprocess_pb2.ProcessRequest(text=postprocess_pb2.Text(text=response.text))
                    if response.finish_reason:
                        said.finish_reason = response.finish_reason
                        said.completion_tokens = response.completion_tokens
                        said.prompt_tokens = response.prompt_tokens
            if not said.finish_reason:
                raise Unavailable("infer ended the stream without a finish reason")
            end = postprocess_pb2.End(finish_reason=said.finish_reason)
            if not start.infer.input_ids:  # a text backend: its own token count
                end.completion_tokens = said.completion_tokens
            yield postprocess_pb2.ProcessRequest(end=end)

        requests = messages()
        outputs = self.stage.process(requests, timeout)
        async with contextlib.aclosing(requests), contextlib.aclosing(outputs):
            async for response in outputs:
                if response.HasField("done"):
                    response.done.reuse = said.reuse
                    response.done.prompt_tokens = said.prompt_tokens
                yield response
