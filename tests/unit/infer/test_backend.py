from __future__ import annotations

from dataclasses import replace

import grpc
import numpy as np
import pytest

from llmmesh.common.errors import ResourceExhausted
from llmmesh.infer.backend import Generation, build_request, stop_words_tensor, triton_error


def test_stop_words_follow_the_tensorrt_llm_layout() -> None:
    """Row 0 holds the ids end to end, row 1 the cumulative end offsets padded with -1."""
    arr = stop_words_tensor([[5, 6], [7], [8, 9, 10]])
    assert arr.shape == (1, 2, 6) and arr.dtype == np.int32
    assert arr[0, 0].tolist() == [5, 6, 7, 8, 9, 10]
    assert arr[0, 1].tolist() == [2, 3, 6, -1, -1, -1]


def test_request_carries_the_contract_tensors_and_the_final_response_flag() -> None:
    """A request has every TensorRT-LLM input with the right type and shape, and asks for a final response."""
    gen = Generation("r1", "smollm2", [1, 2, 3], 16, 2, 2, 0.0, 0.9, 40, 7, [[11, 12]])
    req = build_request(gen, "smollm2")
    inputs = {
        t.name: (t.datatype, list(t.shape), raw) for t, raw in zip(req.inputs, req.raw_input_contents, strict=True)
    }
    assert req.model_name == "smollm2" and req.id == "r1"
    assert req.parameters["triton_enable_empty_final_response"].bool_param
    assert inputs["input_ids"][:2] == ("INT32", [1, 3])
    assert np.frombuffer(inputs["input_ids"][2], dtype=np.int32).tolist() == [1, 2, 3]
    assert (
        inputs["request_output_len"][0] == "INT32" and np.frombuffer(inputs["request_output_len"][2], np.int32)[0] == 16
    )
    assert inputs["streaming"][0] == "BOOL" and inputs["streaming"][2] == b"\x01"
    assert inputs["temperature"][0] == "FP32" and inputs["runtime_top_p"][0] == "FP32"
    assert inputs["seed"][0] == "UINT64" and np.frombuffer(inputs["seed"][2], np.uint64)[0] == 7
    assert inputs["stop_words_list"][1] == [1, 2, 2]


def test_no_seed_and_no_stop_words_leave_those_inputs_out() -> None:
    """Optional inputs are absent when not requested, so the model uses its defaults."""
    req = build_request(Generation("r", "m", [1], 4, 2, 2, 1.0, 1.0, 0, None), "m")
    names = {t.name for t in req.inputs}
    assert "seed" not in names and "stop_words_list" not in names


def test_priority_reaches_triton_as_its_request_priority() -> None:
    """Interactive (and unspecified) requests get Triton's highest priority level 1, batch requests level 2."""
    base = Generation("r", "m", [1], 4, 2, 2, 1.0, 1.0, 0, None)
    levels = {p: build_request(replace(base, priority=p), "m").parameters["priority"].uint64_param for p in (0, 1, 2)}
    assert levels == {0: 1, 1: 1, 2: 2}


@pytest.mark.parametrize(
    ("message", "code"),
    [
        # Texts as tritonserver sends them on the stream (core and python backend).
        ("[request id: r1] Exceeds maximum queue size", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("Request for unknown model: 'nope' is not found", grpc.StatusCode.FAILED_PRECONDITION),
        ("Request for unknown model: 'smollm2' version 1 is not at ready state", grpc.StatusCode.FAILED_PRECONDITION),
        (
            "[request id: r1] unexpected shape for input 'input_ids' for model 'smollm2'. Expected [-1], got [1,2,3]",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "[request id: r1] inference input 'seed' data-type is 'INT64', but model 'x' expects 'UINT64'",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        ("generation failed: RuntimeError('boom')", grpc.StatusCode.INTERNAL),
    ],
)
def test_triton_errors_are_the_requests_own_answer_never_unavailable(message: str, code: grpc.StatusCode) -> None:
    """Queue full, model not ready, bad input and model failures map to their own statuses (no retry)."""
    error = triton_error("smollm2", message)
    assert error.code == code and message in str(error)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert isinstance(error, ResourceExhausted) and error.retry_after
