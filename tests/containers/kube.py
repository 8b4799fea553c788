"""deploy/k8s-cpu as `podman kube play` can run it on one machine with no cluster: the same manifests
(rendered the way `kubectl kustomize deploy/k8s-cpu` renders them), with only what a cluster would provide
replaced, each for its reason:

- Services, autoscalers, disruption budgets and the Namespace are dropped: kube play has no control plane.
  An address of a Service (`triton:8001`, `dns:///infer:50053`) becomes the loopback port standing for it:
  there is no Service DNS, and podman 4.3 ignores a pod's `hostAliases` under `hostNetwork` (seen here:
  /etc/hosts without them).
- Every pod runs on the host's network (`hostNetwork`; a bridge would change the machine's network
  configuration, which tests leave alone). Pods then share ports, so each container port of the manifests
  is moved to a free loopback port chosen by the test, every listener binds 127.0.0.1, not 0.0.0.0, and
  every address (env values, Triton's and Redis's flags) follows.
- Images: the test's local builds (`llmmesh/*:containers-test`; Redis from Debian's package).
- Probes are removed: there is no kubelet to run them (podman would turn them into systemd-timed health
  checks, and there is no systemd); the test waits on the gateway's gRPC health instead.
- Traces go to the test's OTLP receiver in place of the cluster's collector.
- Pod volumes get names of the test's own (podman keeps named volumes after `kube down`; the test removes
  them), and the CPU Triton's /dev/shm volume is podman's own /dev/shm (below).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

from . import engine

KEPT_KINDS = ("ConfigMap", "Deployment")
VOLUME_PREFIX = "llmmesh-kube-test-"
_HOST_PORT = re.compile(r"(?<![\w.-])(?P<host>[a-z][a-z0-9-]*):(?P<port>\d+)")
_PORT_FLAG = re.compile(r"^--(?P<kind>grpc|http|metrics)-port=(?P<port>\d+)$")
_OTLP = re.compile(r"http://otel-collector[\w.-]*:\d+")


def test_image(image: str) -> str:
    name = image.rsplit(":", 1)[0]
    if name.startswith("llmmesh/"):
        return f"{name}:{engine.VERSION}"
    if name == "redis":
        return "localhost/llmmesh-test/redis:bookworm"
    raise AssertionError(f"no local image stands for {image}")


def for_kube_play(
    documents: list[dict[str, Any]], port_for: Callable[[str, int], int], otlp_endpoint: str
) -> list[dict[str, Any]]:
    """The documents kube play gets. `port_for(deployment, container_port)` gives the loopback port that
    stands for a container port of a deployment's pods (each Service has the name of its deployment)."""
    kept = [copy.deepcopy(d) for d in documents if d["kind"] in KEPT_KINDS]
    names = sorted(d["metadata"]["name"] for d in kept if d["kind"] == "Deployment")

    def translate(value: str) -> str:
        value = _OTLP.sub(otlp_endpoint, value)

        def sub(m: re.Match[str]) -> str:
            if m["host"] not in names:
                return m[0]
            return f"127.0.0.1:{port_for(m['host'], int(m['port']))}"

        return _HOST_PORT.sub(sub, value)

    for doc in kept:
        doc["metadata"].pop("namespace", None)
        if doc["kind"] != "Deployment":
            continue
        name = doc["metadata"]["name"]
        doc["spec"]["replicas"] = 1
        pod = doc["spec"]["template"]["spec"]
        pod["hostNetwork"] = True
        # podman makes each pod volume a named volume, kept after `kube down`: named for this test, so the
        # test removes exactly these (`volume_names`).
        renamed = {v["name"]: f"{VOLUME_PREFIX}{name}-{v['name']}" for v in pod.get("volumes", [])}
        for v in pod.get("volumes", []):
            v["name"] = renamed[v["name"]]
        # podman makes an emptyDir a root-owned directory, not the world-writable one a kubelet makes: the
        # CPU Triton (uid 10001) cannot create its python backend's shared memory in the manifests' /dev/shm
        # volume ("Unable to initialize shared memory key ..."); podman's own /dev/shm (tmpfs, 1777) is used.
        for c in pod["containers"]:
            c["volumeMounts"] = [m for m in c.get("volumeMounts", []) if m["mountPath"] != "/dev/shm"]
            for m in c["volumeMounts"]:
                m["name"] = renamed[m["name"]]
        used = {m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
        pod["volumes"] = [v for v in pod.get("volumes", []) if v["name"] in used]
        for c in pod["containers"]:
            c["image"] = test_image(c["image"])
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                c.pop(probe, None)
            c.pop("ports", None)
            for var in c.get("env", []):
                if "value" not in var:
                    continue
                value = str(var["value"])
                if var["name"].endswith("_HOST") and value == "0.0.0.0":
                    var["value"] = "127.0.0.1"
                elif var["name"].endswith("_PORT") and value.isdigit():
                    var["value"] = str(port_for(name, int(value)))
                else:
                    var["value"] = translate(value)
            args = [translate(str(a)) for a in c.get("args", [])]
            if args and args[0] == "tritonserver":
                moved = []
                for a in args:
                    m = _PORT_FLAG.match(a)
                    if m:
                        moved += [
                            f"--{m['kind']}-address=127.0.0.1",
                            f"--{m['kind']}-port={port_for(name, int(m['port']))}",
                        ]
                    else:
                        moved.append(a)
                args = moved
            elif name == "redis":
                args += ["--bind", "127.0.0.1", "--port", str(port_for(name, 6379))]
            if args:
                c["args"] = args
    return kept


def volume_names(documents: list[dict[str, Any]]) -> set[str]:
    """The named volumes kube play makes for these documents: one per pod volume, and one per ConfigMap a
    pod mounts (named after the ConfigMap)."""
    volumes = [
        v for d in documents if d["kind"] == "Deployment" for v in d["spec"]["template"]["spec"].get("volumes", [])
    ]
    return {v["name"] for v in volumes} | {v["configMap"]["name"] for v in volumes if "configMap" in v}
