"""Postprocess: settings and server assembly."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from llmmesh.common.errors import InvalidArgument
from llmmesh.common.model_assets import load_model_assets
from llmmesh.common.server import Service, build_server
from llmmesh.common.settings import ServiceSettings
from llmmesh.postprocess.chunker import ChunkingMode
from llmmesh.postprocess.domain import BlocklistSafety, TextPipeline
from llmmesh.postprocess.servicer import PostprocessServicer
from llmmesh.postprocess.textmatch import BlockedTerm
from llmmesh.stages.v1 import postprocess_pb2, postprocess_pb2_grpc
from llmmesh.v1 import generation_pb2

__all__ = ["PostprocessSettings", "create_server", "read_blocklist"]

DEFAULT_BLOCKLIST = Path(__file__).with_name("blocklist.txt")
CHUNKING_FROM_PROTO = {
    generation_pb2.CHUNKING_MODE_UNSPECIFIED: ChunkingMode.TOKEN,
    generation_pb2.CHUNKING_MODE_TOKEN: ChunkingMode.TOKEN,
    generation_pb2.CHUNKING_MODE_CLAUSE: ChunkingMode.CLAUSE,
    generation_pb2.CHUNKING_MODE_SENTENCE: ChunkingMode.SENTENCE,
}


class PostprocessSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LLMMESH_POSTPROCESS_", frozen=True, extra="ignore")

    default_model: str = "smollm2"
    gguf_path: str = ""
    # Blocklist file ("category<TAB>term" per line); empty = the built-in list.
    blocklist_path: str = ""
    # More blocked terms (category "custom"), JSON list in the environment.
    extra_blocked_terms: list[str] = Field(default_factory=list)


def read_blocklist(path: Path) -> list[BlockedTerm]:
    terms = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        category, _, term = line.partition("\t")
        terms.append(BlockedTerm(term.strip(), category.strip()) if term else BlockedTerm(category.strip(), "blocked"))
    return terms


async def create_server(settings: PostprocessSettings) -> Service:
    assets = load_model_assets(settings.gguf_path or None)
    blocked = read_blocklist(Path(settings.blocklist_path) if settings.blocklist_path else DEFAULT_BLOCKLIST)
    blocked += [BlockedTerm(t, "custom") for t in settings.extra_blocked_terms]

    def make_pipeline(start: postprocess_pb2.Start) -> TextPipeline:
        if start.model and start.model != settings.default_model:
            raise InvalidArgument("start.model", f"unknown model {start.model!r}")
        chunking = CHUNKING_FROM_PROTO.get(start.chunking)
        if chunking is None:
            raise InvalidArgument("start.chunking", f"unknown chunking mode {start.chunking}")
        return TextPipeline(assets.token_bytes, list(start.stop), BlocklistSafety(blocked), chunking)

    name = postprocess_pb2.DESCRIPTOR.services_by_name["PostprocessService"].full_name
    service = build_server(
        "postprocess",
        settings,
        [name],
        lambda server: postprocess_pb2_grpc.add_PostprocessServiceServicer_to_server(
            PostprocessServicer(make_pipeline), server
        ),
    )
    await service.set_serving(True)
    return service
