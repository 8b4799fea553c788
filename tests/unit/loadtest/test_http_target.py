"""loadtest's HTTP target and the AIPerf comparison: the OpenAI body a mesh request becomes, and the rows
read from AIPerf's and loadtest's summaries."""

from __future__ import annotations

import json

from llmmesh.v1 import generation_pb2
from loadtest.aiperf_http import _aiperf_row, _loadtest_row
from loadtest.clients import _openai_body


def test_a_chat_request_becomes_the_same_openai_body() -> None:
    request = generation_pb2.GenerateRequest(
        chat=generation_pb2.Chat(messages=[generation_pb2.ChatMessage(role="user", content="Hi")]),
        model="instrument",
        sampling=generation_pb2.SamplingParams(max_tokens=256, temperature=0.0, seed=7, stop=["END"]),
    )
    body = json.loads(_openai_body(request))
    assert body == {
        "model": "instrument",
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 256,
        "temperature": 0.0,
        "seed": 7,
        "stop": ["END"],
    }


def test_a_prompt_request_becomes_one_user_turn() -> None:
    body = json.loads(_openai_body(generation_pb2.GenerateRequest(prompt="Once")))
    assert body["messages"] == [{"role": "user", "content": "Once"}]
    assert "temperature" not in body and "seed" not in body


def test_rows_read_the_two_tools_summaries() -> None:
    aiperf = {
        "time_to_first_token": {"unit": "ms", "p50": 21.5, "p99": 30.0, "avg": 22.0},
        "inter_token_latency": {"unit": "ms", "p50": 10.01, "p99": 10.5},
        "output_token_throughput": {"unit": "tokens/sec", "avg": 812.5},
        "request_count": {"avg": 40},
    }
    row = _aiperf_row(aiperf)
    assert (row["ttft_p50_ms"], row["itl_p99_ms"]) == (21.5, 10.5)
    assert (row["output_tokens_per_s"], row["requests"]) == (812.5, 40)
    assert row["errors"] == 0.0
    ours = {
        "completed": 40,
        "errors": {"UNAVAILABLE": 1},
        "output_tokens_per_s": 800.0,
        "ttft_ms": {"p50": 22.0, "p99": 31.0},
        "itl_ms": {"p50": 10.0, "p99": 10.4},
    }
    row = _loadtest_row(ours)
    assert (row["ttft_p50_ms"], row["itl_p50_ms"], row["output_tokens_per_s"], row["errors"]) == (22.0, 10.0, 800.0, 1)
