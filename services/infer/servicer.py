"""Infer gRPC servicer: proto ⇄ domain only; the backend does the work."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc.aio

from llmmesh.common.logging import get_logger
from llmmesh.common.streams import coalesce
from llmmesh.infer.backend import Generation, InferenceBackend
from llmmesh.stages.v1 import infer_pb2, infer_pb2_grpc
from llmmesh.v1 import generation_pb2

__all__ = ["InferServicer"]

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
    )


class InferServicer(infer_pb2_grpc.InferServiceServicer):
    def __init__(self, backend: InferenceBackend) -> None:
        self._backend = backend

    async def Generate(
        self, request: infer_pb2.InferRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[infer_pb2.InferResponse]:
        gen = _generation_from_proto(request)
        generated = 0
        async for ids in coalesce(self._backend.generate(gen, timeout=context.time_remaining())):
            generated += len(ids)
            yield infer_pb2.InferResponse(token_ids=ids)
        reason = (
            generation_pb2.FINISH_REASON_LENGTH if generated >= gen.max_tokens else generation_pb2.FINISH_REASON_STOP
        )
        yield infer_pb2.InferResponse(finish_reason=reason, completion_tokens=generated)
