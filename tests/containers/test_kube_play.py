"""The Kubernetes CPU manifests (deploy/k8s-cpu) run as real containers with `podman kube play`: the pods
start from the same YAML (with what only a cluster provides replaced: tests/containers/kube.py), the gateway
turns SERVING once its stages and Triton are ready, and an answer streams through it. Runs after the
compose module (the images are built there, or here when run alone); `podman kube down` removes the pods.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from llmmesh.healthcheck import check
from llmmesh.v1 import generation_pb2, generation_pb2_grpc
from tests.deploy.deployfiles import free_port_besides, kustomize_build
from tests.e2e.otlp_receiver import OtlpReceiver

from . import engine
from .kube import for_kube_play, volume_names

pytestmark = [pytest.mark.e2e, pytest.mark.containers, pytest.mark.timeout(3600)]

DEPLOYMENTS = ("triton", "redis", "preprocess", "infer", "postprocess", "gateway")


class KubePlay:
    def __init__(self, run_dir: Path) -> None:
        self.ports: dict[tuple[str, int], int] = {}
        self.otlp = OtlpReceiver()
        documents = for_kube_play(
            kustomize_build(engine.DEPLOY / "k8s-cpu"), self.port_for, f"http://127.0.0.1:{self.otlp.http_port}"
        )
        self.volumes = volume_names(documents)
        self.file = run_dir / "k8s-cpu.yaml"
        self.file.write_text(yaml.safe_dump_all(documents, sort_keys=False))
        self.gateway = f"127.0.0.1:{self.port_for('gateway', 50051)}"

    def port_for(self, deployment: str, container_port: int) -> int:
        if (deployment, container_port) not in self.ports:
            self.ports[(deployment, container_port)] = free_port_besides(self.ports.values())
        return self.ports[(deployment, container_port)]

    def pods(self) -> dict[str, dict[str, str]]:
        """Deployment name -> {container name: state} of the pods kube play made from the file."""
        out = engine.podman("pod", "ps", "--format", "json", timeout=30).stdout
        found = {}
        for pod in json.loads(out or "[]"):
            name = pod["Name"].removesuffix("-pod-0").removesuffix("-pod")
            if name in DEPLOYMENTS:
                found[name] = {c["Names"]: c["Status"] for c in pod.get("Containers", [])}
        return found


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubePlay]:
    reason = engine.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    run_dir = tmp_path_factory.mktemp("kube")
    engine.build_images(engine.base_image(), run_dir)  # warm after the compose module: seconds
    play = KubePlay(run_dir)
    play.otlp.start()
    try:
        began = time.monotonic()
        started = engine.podman("kube", "play", str(play.file), check=False, timeout=600)
        assert started.returncode == 0, started.stderr[-4000:]
        deadline = time.monotonic() + 300
        while check(play.gateway, timeout=2) != "SERVING":
            assert time.monotonic() < deadline, f"the gateway pod is not SERVING after 300 s: {play.pods()}"
            time.sleep(1)
        print(f"\nkube play: gateway SERVING {time.monotonic() - began:.0f} s after `podman kube play`")
        yield play
    finally:
        # `kube down` stops and removes the file's pods (after a failed play, whatever it had made).
        engine.podman("kube", "down", str(play.file), check=False, timeout=300)
        for name in play.pods():
            engine.podman("pod", "rm", "-f", f"{name}-pod-0", check=False, timeout=120)
        for volume in play.volumes:
            engine.podman("volume", "rm", "-f", volume, check=False, timeout=60)
        play.otlp.stop()
        assert not play.pods(), play.pods()


def test_every_deployment_runs_as_a_pod(kube: KubePlay) -> None:
    pods = kube.pods()
    assert set(pods) == set(DEPLOYMENTS), pods
    for name, containers in pods.items():
        assert containers and all(state == "running" for state in containers.values()), (name, containers)


def test_an_answer_streams_through_the_gateway_pod(kube: KubePlay) -> None:
    stub = generation_pb2_grpc.GenerationServiceStub(grpc.insecure_channel(kube.gateway))
    req = generation_pb2.GenerateRequest(
        prompt="Describe Paris in three sentences.",
        sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=64),
    )
    chunks, final = [], None
    for response in stub.Generate(req, timeout=120):
        if response.HasField("chunk"):
            chunks.append(response.chunk)
        else:
            final = response.final
    assert final is not None and final.model == "smollm2"
    assert "Paris" in "".join(c.text for c in chunks) and len(chunks) > 1
    assert final.usage.completion_tokens == sum(len(c.token_ids) for c in chunks)


def test_the_openai_port_of_the_gateway_pod_answers(kube: KubePlay) -> None:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
    req = urllib.request.Request(
        f"http://127.0.0.1:{kube.port_for('gateway', 8080)}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        reply = json.loads(resp.read())
    assert reply["choices"][0]["message"]["content"] and reply["model"] == "smollm2"
