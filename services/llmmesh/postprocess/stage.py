"""The postprocess stage: token ids in, checked whole-character text out (detokenize, stop strings, safety,
speakable chunks), for one stream at a time. A model whose backend sends text (an OpenAI-compatible
endpoint) streams Text messages instead of Tokens (never both): no detokenizer, the same rest.

`PostprocessStage.process` is what the gateway calls, in its own process (this object) or over gRPC
(`llmmesh.gateway.stages.RemotePostprocess`, served by `PostprocessServicer`). It knows nothing of gRPC:
it reads `ProcessRequest`s (Start, Tokens..., End) from any async iterable and yields `ProcessResponse`s
(Deltas, then one Done); closing the iterator ends the stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterable, Callable

from opentelemetry import trace

from llmmesh.common.errors import InvalidArgument
from llmmesh.common.metrics import SAFETY_BLOCKS
from llmmesh.postprocess.domain import Finish, Output, TextPipeline
from llmmesh.stages.v1 import postprocess_pb2
from llmmesh.v1 import generation_pb2

__all__ = ["FINISH_TO_PROTO", "PostprocessStage"]

_tracer = trace.get_tracer("llmmesh.postprocess")

_FINISH_FROM_PROTO = {
    generation_pb2.FINISH_REASON_STOP: Finish.STOP,
    generation_pb2.FINISH_REASON_LENGTH: Finish.LENGTH,
    generation_pb2.FINISH_REASON_CANCELLED: Finish.CANCELLED,
}
FINISH_TO_PROTO = {
    Finish.STOP: generation_pb2.FINISH_REASON_STOP,
    Finish.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    Finish.STOP_STRING: generation_pb2.FINISH_REASON_STOP_STRING,
    Finish.CONTENT_FILTER: generation_pb2.FINISH_REASON_CONTENT_FILTER,
    Finish.CANCELLED: generation_pb2.FINISH_REASON_CANCELLED,
}


def _to_proto(out: Output) -> list[postprocess_pb2.ProcessResponse]:
    messages = [
        postprocess_pb2.ProcessResponse(
            delta=postprocess_pb2.Delta(text=p.text, token_ids=p.ids, speakable=p.speakable)
        )
        for p in out.pieces
        if p.text
    ]
    if out.finish is not None:
        done = postprocess_pb2.Done(
            finish_reason=FINISH_TO_PROTO[out.finish],
            matched_stop=out.matched_stop,
            filter_category=out.category,
            token_ids=out.leftover_ids,
            completion_tokens=out.completion_tokens,
        )
        messages.append(postprocess_pb2.ProcessResponse(done=done))
    return messages


class PostprocessStage:
    def __init__(self, make_pipeline: Callable[[postprocess_pb2.Start, float | None], TextPipeline]) -> None:
        # make_pipeline(start, deadline): the stream's pipeline; deadline on time.monotonic()'s clock.
        self._make_pipeline = make_pipeline

    async def process(
        self, requests: AsyncIterable[postprocess_pb2.ProcessRequest], timeout: float | None = None
    ) -> AsyncGenerator[postprocess_pb2.ProcessResponse, None]:
        """The stream's responses; `timeout` (seconds) bounds the safety classifier's calls."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # One span for the stream's text work (detokenize, stop strings, safety): per-token spans would
        # cost more than the work they measure.
        with _tracer.start_as_current_span("detokenize_and_filter") as span:
            tokens = 0
            pipeline: TextPipeline | None = None
            async for message in requests:
                kind = message.WhichOneof("kind")
                if pipeline is None:
                    if kind != "start":
                        raise InvalidArgument("start", "the first message must be start")
                    pipeline = self._make_pipeline(message.start, deadline)
                    continue
                if kind == "tokens":
                    tokens += len(message.tokens.ids)
                    out = await pipeline.feed(message.tokens.ids)
                elif kind == "text":
                    tokens += 1
                    out = await pipeline.feed_text(message.text.text)
                elif kind == "end":
                    reason = _FINISH_FROM_PROTO.get(message.end.finish_reason)
                    if reason is None:
                        raise InvalidArgument("end.finish_reason", "must be STOP, LENGTH or CANCELLED")
                    out = await pipeline.finish(reason, message.end.completion_tokens)
                else:
                    raise InvalidArgument("start", "sent twice")
                if out.finish is Finish.CONTENT_FILTER:
                    SAFETY_BLOCKS.labels(out.category).inc()
                    span.add_event("safety_block", {"llmmesh.safety.category": out.category})
                if out.finish is not None:
                    span.set_attributes({"llmmesh.tokens": tokens, "llmmesh.finish_reason": out.finish.value})
                for response in _to_proto(out):
                    yield response
                if pipeline.finished:
                    return
