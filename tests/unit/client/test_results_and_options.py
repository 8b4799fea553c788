from __future__ import annotations

from pathlib import Path

import pytest

from llmmesh.client import ClientConfig, Credentials, FinalResult, FinishReason, Interrupted, TlsConfig
from llmmesh.client.results import Chunk
from llmmesh.v1 import generation_pb2


def test_final_result_is_converted_from_the_proto() -> None:
    """Finish reason, usage, timings and the stop string survive the conversion."""
    final = generation_pb2.Final(
        finish_reason=generation_pb2.FINISH_REASON_STOP_STRING,
        usage=generation_pb2.Usage(prompt_tokens=3, completion_tokens=4),
        timings=generation_pb2.Timings(
            queue_ms=1, time_to_first_token_ms=2, total_ms=3, time_to_first_speakable_chunk_ms=4
        ),
        request_id="r",
        model="m",
        matched_stop="Paris",
        reuse=generation_pb2.REUSE_NOT_SHAREABLE,
        reuse_detail="sampled without a seed",
    )
    result = FinalResult.from_proto(final)
    assert result.finish_reason is FinishReason.STOP_STRING and result.matched_stop == "Paris"
    assert result.usage.completion_tokens == 4 and result.timings.time_to_first_speakable_chunk_ms == 4
    assert result.reuse == "not_shareable" and result.reuse_detail == "sampled without a seed"


def test_reuse_reads_as_a_short_name_and_tolerates_newer_values() -> None:
    """How the answer was produced, as the mesh said; a value from a newer mesh reads as "unknown"."""
    assert FinalResult.from_proto(generation_pb2.Final(reuse=generation_pb2.REUSE_CACHE_HIT)).reuse == "cache_hit"
    assert FinalResult.from_proto(generation_pb2.Final()).reuse == ""
    assert FinalResult.from_proto(generation_pb2.Final(reuse=99)).reuse == "unknown"  # type: ignore[arg-type]


def test_an_unknown_finish_reason_does_not_break_an_older_client() -> None:
    """A reason added by a newer mesh reads as UNSPECIFIED."""
    assert FinishReason.from_proto(99) is FinishReason.UNSPECIFIED


def test_chunk_and_ack_conversions() -> None:
    """Chunks keep text, ids and the speakable flag; an ack from the mesh is marked acknowledged."""
    chunk = Chunk.from_proto(generation_pb2.Chunk(text="Hi,", token_ids=[5, 6], speakable=True), received_at=1.0)
    assert chunk == Chunk("Hi,", (5, 6), True, 1.0)
    ack = Interrupted.from_proto(generation_pb2.Interrupted(delivered_text="Hi,", delivered_chunks=1, request_id="r"))
    assert ack.acknowledged and ack.delivered_text == "Hi,"


def test_credentials_become_metadata_and_never_show_in_repr() -> None:
    """API key under its header, bearer token as Authorization; repr leaks neither."""
    creds = Credentials(api_key="secret-key", bearer_token="secret-token", api_key_header="x-llmmesh-key")
    assert creds.metadata() == [("x-llmmesh-key", "secret-key"), ("authorization", "Bearer secret-token")]
    assert "secret" not in repr(creds) and "secret" not in repr(ClientConfig(credentials=creds))
    config = ClientConfig(credentials=creds, metadata=[("x-tenant", "a")])
    assert config.call_metadata([("x-extra", "1")])[0] == ("x-tenant", "a")
    assert config.call_metadata([("x-extra", "1")])[-1] == ("x-extra", "1")


def test_tls_config_reads_pem_files_and_bytes(tmp_path: Path) -> None:
    """PEM paths are read, PEM bytes pass through, and the server-name override becomes a channel option."""
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"CA")
    tls = TlsConfig.from_files(ca=ca, cert=b"CERT", key=b"KEY", server_name="gateway.internal")
    assert (tls.root_certificates, tls.certificate_chain, tls.private_key) == (b"CA", b"CERT", b"KEY")
    assert "KEY" not in repr(tls)
    assert ("grpc.ssl_target_name_override", "gateway.internal") in ClientConfig(tls=tls).grpc_options()
    with pytest.raises(ValueError, match="both"):
        TlsConfig.from_files(cert=b"CERT")
