"""Infer gRPC servicer: proto ⇄ domain only; the backend does the work.

A model served by Triton goes through the sharing hub (join, replay, generate); a model served by an
OpenAI-compatible endpoint (`backend: openai`) streams text from `OpenAIBackend`, never shared: the hub
shares token ids, and a remote endpoint's answer is not reproducible enough to replay as another
request's (preprocess marks such requests not shareable and says why).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

import grpc.aio

from llmmesh.common.errors import InvalidArgument
from llmmesh.common.logging import get_logger
from llmmesh.common.mux import Inbox, MuxServer
from llmmesh.infer.backend import Generation
from llmmesh.infer.openai_backend import OpenAIBackend, TextGeneration
from llmmesh.infer.sharing import SharingHub
from llmmesh.stages.v1 import infer_pb2, infer_pb2_grpc
from llmmesh.v1 import generation_pb2

__all__ = ["GENERATE", "InferServicer"]

log = get_logger(__name__)


def _generation_from_proto(req: infer_pb2.InferRequest) -> Generation:
    s = req.sampling
    return Generation(
        request_id=req.request_id,
        model=req.model,
        input_ids=req.input_ids,
        max_tokens=s.max_tokens,
        end_id=req.end_id,
        pad_id=req.pad_id,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        stop_token_ids=[list(w.ids) for w in req.stop_token_ids],
        priority=req.priority,
        return_log_probs=req.return_log_probs,
    )


def _text_generation_from_proto(req: infer_pb2.InferRequest) -> TextGeneration:
    s = req.sampling
    if req.HasField("chat") and req.chat.messages:
        messages = tuple((m.role, m.content) for m in req.chat.messages)
    elif req.prompt:
        messages = (("user", req.prompt),)
    else:
        raise InvalidArgument(
            "chat", f"model {req.model!r} is served by an OpenAI-compatible endpoint: set chat or prompt"
        )
    return TextGeneration(
        request_id=req.request_id,
        model=req.model,
        messages=messages,
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
    )


_REUSE = {
    "none": generation_pb2.REUSE_NONE,
    "not_shareable": generation_pb2.REUSE_NOT_SHAREABLE,
    "joined_in_flight": generation_pb2.REUSE_JOINED_IN_FLIGHT,
    "cache_hit": generation_pb2.REUSE_CACHE_HIT,
    "deduplicated": generation_pb2.REUSE_DEDUPLICATED,
    "disabled": generation_pb2.REUSE_DISABLED,
}
_FINISH = {"stop": generation_pb2.FINISH_REASON_STOP, "length": generation_pb2.FINISH_REASON_LENGTH}


# The per-request method: what each generation on a GenerateStreams call is counted and traced as.
GENERATE = "/llmmesh.stages.v1.InferService/Generate"


def _no_message(op: infer_pb2.InferStreamOp) -> None:
    return None


def _events(events: list[infer_pb2.InferStreamEvent]) -> infer_pb2.InferStreamEvents:
    return infer_pb2.InferStreamEvents(events=events)


class InferServicer(infer_pb2_grpc.InferServiceServicer):
    def __init__(self, hub: SharingHub, text: OpenAIBackend | None = None) -> None:
        self._hub = hub
        self._text = text
        # The GenerateStreams calls: a companion of the service, so that draining ends them.
        self.mux = MuxServer("infer")

    async def Generate(
        self, request: infer_pb2.InferRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[infer_pb2.InferResponse]:
        async for response in self.responses(request, context.time_remaining()):
            yield response

    async def GenerateStreams(
        self, request_iterator: AsyncIterator[infer_pb2.InferStreamOps], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[infer_pb2.InferStreamEvents]:
        async for frame in self.mux.serve(
            request_iterator,
            method=GENERATE,
            message=_no_message,
            handler=self._open,
            event=infer_pb2.InferStreamEvent,
            frame=_events,
        ):
            yield frame

    def _open(
        self, op: infer_pb2.InferStreamOp, inbox: Inbox, timeout: float | None
    ) -> AsyncGenerator[infer_pb2.InferResponse, None]:
        return self.responses(op.open, timeout)

    async def responses(
        self, request: infer_pb2.InferRequest, timeout: float | None
    ) -> AsyncGenerator[infer_pb2.InferResponse, None]:
        """One generation's responses, whichever call it came on."""
        if self._text is not None and self._text.serves(request.model):
            async for response in self._generate_text(request, timeout):
                yield response
            return
        sub = await self._hub.subscribe(
            _generation_from_proto(request),
            request_hash=request.request_hash,
            shareable=request.shareable,
            idempotency_key=request.idempotency_key,
            fresh=request.fresh,
            timeout=timeout,
        )
        first = True
        log_probs = request.return_log_probs
        async for ids in sub:
            response = infer_pb2.InferResponse(token_ids=ids)
            if log_probs and getattr(ids, "log_probs", None) is not None:
                response.log_probs.extend(ids.log_probs)  # type: ignore[attr-defined]
            if first:
                # Known from the first tokens on: a caller that stops early (a stop string) still learns it.
                first = False
                response.reuse = _REUSE[sub.reuse]
            yield response
        yield infer_pb2.InferResponse(
            finish_reason=_FINISH[sub.finish], completion_tokens=sub.completion_tokens, reuse=_REUSE[sub.reuse]
        )

    async def _generate_text(
        self, request: infer_pb2.InferRequest, timeout: float | None
    ) -> AsyncIterator[infer_pb2.InferResponse]:
        assert self._text is not None
        pieces = self._text.generate(_text_generation_from_proto(request), timeout=timeout)
        first = True
        # aclosing: however this call ends (the gateway cancelled, the client left), the HTTP stream is
        # closed before the handler returns, so the upstream request is aborted at once.
        async with contextlib.aclosing(pieces):
            async for piece in pieces:
                if piece.finish is not None:
                    yield infer_pb2.InferResponse(
                        text=piece.text,
                        finish_reason=_FINISH[piece.finish],
                        completion_tokens=piece.completion_tokens,
                        prompt_tokens=piece.prompt_tokens,
                        reuse=generation_pb2.REUSE_NOT_SHAREABLE,
                    )
                elif first:
                    first = False
                    yield infer_pb2.InferResponse(text=piece.text, reuse=generation_pb2.REUSE_NOT_SHAREABLE)
                else:
                    yield infer_pb2.InferResponse(text=piece.text)

    async def Forget(
        self, request: infer_pb2.ForgetRequest, context: grpc.aio.ServicerContext
    ) -> infer_pb2.ForgetResponse:
        await self._hub.forget(request.request_hash)
        return infer_pb2.ForgetResponse()
