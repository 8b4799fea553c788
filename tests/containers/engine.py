"""A real container engine for the containers test: Debian's podman (rootful, daemonless), driven by Debian's
docker-compose 1.29 through podman's Docker-compatible API socket.

What this machine needs, and why (the errors each works around are in ../shared/DESIGN.md's measurements,
copied into README.md, "Run it in containers"):
- a private containers.conf (CONTAINERS_CONF): host networking by default, cgroupfs and a file event log
  (no systemd), and default ulimits within what the VM allows (podman's default nofile cannot be set:
  "error setting rlimit type 7: operation not permitted");
- a base image made locally with mmdebstrap from the machine's apt sources (no registry), with the host's
  extra CA certificates and pip's certificate setting so that builds reach PyPI as the host does;
- health checks run from a loop here (`podman healthcheck run`): podman schedules them with systemd
  timers, and there is no systemd.

Images are tagged by what they are built from, so a second run on the same machine reuses the base image
and podman's layer cache (a cold build is minutes, a warm one seconds).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
HERE = Path(__file__).resolve().parent
# Kept between runs on one machine: the containers.conf and the base image's build files.
STATE = Path(os.environ.get("LLMMESH_CONTAINERS_STATE", "/var/tmp/llmmesh-containers"))
# Every image of deploy/Dockerfile that a deployment runs (the build stages are built along the way).
DOCKERFILE_TARGETS = ("triton-cpu", "preprocess", "postprocess", "infer", "gateway", "gateway-with-stages")
# The tag the test's images carry (compose's LLMMESH_VERSION), so a user's `dev` images are left alone.
VERSION = "containers-test"
TEST_IMAGES = {"redis": HERE / "Containerfile.redis", "prometheus": HERE / "Containerfile.prometheus"}

CONTAINERS_CONF = """\
# Written by tests/containers/engine.py for the containers test (CONTAINERS_CONF points here).
[containers]
netns = "host"
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

BASE_PACKAGES = (
    "python3.11",
    "python3.11-venv",
    "libpython3.11",
    "python-is-python3",
    "python3-pip",
    "ca-certificates",
    "netbase",
    "tzdata",
)
# Run by mmdebstrap in the finished tree ($1): the host's extra CA certificates (the ones beyond Debian's
# bundle, e.g. an egress proxy's) and pip's certificate setting, so pip and apt in builds reach what the
# host reaches; pip may install into the system Python (a build's venv is made from it anyway); and
# libpython where Triton's python backend stub looks for it (/usr/local/lib, as in the python images).
BASE_HOOK = """\
set -e
root="$1"
for cert in /usr/local/share/ca-certificates/*.crt; do
  [ -e "$cert" ] && cp "$cert" "$root/usr/local/share/ca-certificates/"
done
chroot "$root" update-ca-certificates >/dev/null 2>&1
printf '[global]\\ncert = /etc/ssl/certs/ca-certificates.crt\\n' > "$root/etc/pip.conf"
rm -f "$root/usr/lib/python3.11/EXTERNALLY-MANAGED"
ln -sf /usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0 "$root/usr/local/lib/libpython3.11.so.1.0"
"""
APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")


def unavailable_reason() -> str | None:
    """Why no container can run here, or None. `make containerdeps` installs what is missing."""
    for tool in ("podman", "mmdebstrap", "catatonit", "docker-compose"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (`make containerdeps` installs it with podman's other tools)"
    if os.geteuid() != 0:
        return "the containers test runs rootful podman (host networking, no user namespaces): run it as root"
    if not APT_SOURCES.exists():
        return f"{APT_SOURCES} is missing: the base image is made from the machine's own Debian apt sources"
    probe = podman("info", "--format", "json", check=False, timeout=60)
    if probe.returncode != 0:
        return f"podman cannot start here: `podman info` failed: {probe.stderr.strip()[-500:]}"
    return None


def engine_env() -> dict[str, str]:
    STATE.mkdir(parents=True, exist_ok=True)
    conf = STATE / "containers.conf"
    if not conf.exists() or conf.read_text() != CONTAINERS_CONF:
        conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(*args: str, check: bool = True, timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["podman", *args], env=engine_env(), capture_output=True, text=True, timeout=timeout, check=False, **kw
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def _base_recipe() -> str:
    certs = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    parts = [BASE_HOOK, " ".join(BASE_PACKAGES), APT_SOURCES.read_text(), *(c.read_text() for c in certs)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def base_image() -> str:
    """The locally made Debian bookworm base (Python 3.11), made once per recipe and kept."""
    name = f"localhost/llmmesh-test/debian:bookworm-{_base_recipe()}"
    if podman("image", "exists", name, check=False).returncode == 0:
        return name
    hook = STATE / "base-hook.sh"
    hook.write_text(BASE_HOOK)
    tar = STATE / "base.tar"
    subprocess.run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--mode=root",
            "--format=tar",
            "--include=" + ",".join(BASE_PACKAGES),
            f'--customize-hook=sh {hook} "$1"',
            '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin',
            "bookworm",
            str(tar),
            str(APT_SOURCES),
        ],
        check=True,
        capture_output=True,
        timeout=900,
    )
    try:
        podman("import", "--change", "ENV LANG=C.UTF-8", str(tar), name)
    finally:
        tar.unlink(missing_ok=True)
    return name


_BUILT: dict[str, dict[str, float]] = {}


def build_images(base: str, log_dir: Path) -> dict[str, float]:
    """Every image of deploy/Dockerfile from the local base (its PYTHON_IMAGE argument), then the test's
    Redis and Prometheus, once per test session. Returns seconds per image; a failed build raises with its
    log's tail."""
    if base in _BUILT:
        return _BUILT[base]
    seconds: dict[str, float] = {}

    def build(tag: str, args: list[str], name: str) -> None:
        began = time.monotonic()
        log = log_dir / f"build-{name}.log"
        with open(log, "w") as out:
            done = subprocess.run(
                ["podman", "build", "--network", "host", "--format", "docker", "--pull=never", "-t", tag, *args],
                env=engine_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=1800,
                cwd=ROOT,
            )
        if done.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            raise RuntimeError(f"building {tag} failed:\n{tail}")
        seconds[name] = time.monotonic() - began

    for target in DOCKERFILE_TARGETS:
        build(
            f"llmmesh/{target}:{VERSION}",
            [
                "-f",
                str(DEPLOY / "Dockerfile"),
                "--ignorefile",
                str(DEPLOY / "Dockerfile.dockerignore"),
                "--target",
                target,
                "--build-arg",
                f"PYTHON_IMAGE={base}",
                ".",
            ],
            target,
        )
    for name, containerfile in TEST_IMAGES.items():
        build(
            f"localhost/llmmesh-test/{name}:bookworm",
            ["-f", str(containerfile), "--build-arg", f"BASE={base}", str(HERE)],
            name,
        )
    _BUILT[base] = seconds
    return seconds


class ApiService:
    """`podman system service` on a private socket: the Docker-compatible API docker-compose talks to."""

    def __init__(self, run_dir: Path) -> None:
        self.socket = run_dir / "podman.sock"
        self.log = open(run_dir / "podman-service.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{self.socket}"],
            env=engine_env(),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"podman system service did not start: {self.proc.returncode}")
            time.sleep(0.1)

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.socket.unlink(missing_ok=True)


class HealthLoop:
    """Runs every health check of the project's running containers every `interval` seconds, as Docker's
    engine would (podman needs systemd for that); compose's `service_healthy` gating reads the results."""

    def __init__(self, project: str, interval: float = 2.0) -> None:
        self.project = project
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                for cid in running_containers(self.project).values():
                    podman("healthcheck", "run", cid, check=False, timeout=30)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def running_containers(project: str) -> dict[str, str]:
    """Service name -> container id of the project's running containers."""
    out = podman(
        "ps",
        "--filter",
        f"label=com.docker.compose.project={project}",
        "--format",
        "{{.ID}} {{.Labels}}",
        "--no-trunc",
        timeout=30,
    ).stdout
    found = {}
    for line in out.splitlines():
        cid, _, _ = line.partition(" ")
        labels = inspect(cid)["Config"]["Labels"]
        found[labels["com.docker.compose.service"]] = cid
    return found


def inspect(container: str) -> dict[str, Any]:
    return dict(json.loads(podman("inspect", container, timeout=30).stdout)[0])


class Compose:
    """docker-compose 1.29 against the API service, on one merged configuration file."""

    def __init__(self, project: str, config: Path, docker_host: str) -> None:
        self.project = project
        self.config = config
        self.env = {**engine_env(), "DOCKER_HOST": docker_host, "COMPOSE_HTTP_TIMEOUT": "600"}

    def __call__(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        cmd = ["docker-compose", "-p", self.project, "-f", str(self.config), *args]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=DEPLOY)

    def container(self, service: str) -> str:
        return running_containers(self.project)[service]


def compose_config(files: list[Path], variables: Mapping[str, str], out: Path) -> dict[str, Any]:
    """The files merged by docker-compose itself (`config`), with the one edit an override cannot make: the
    gateway's `ports:`, which docker-compose 1.29 refuses under host networking (with host networking the
    gateway's own port is the published one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMMESH_")}
    env.update(variables)
    args = ["docker-compose", *(a for f in files for a in ("-f", str(f))), "config"]
    done = subprocess.run(args, cwd=DEPLOY, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"docker-compose config failed:\n{done.stderr}")
    config = yaml.safe_load(done.stdout)
    for service in config["services"].values():
        if service.get("network_mode") == "host":
            service.pop("ports", None)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return dict(config)


@contextlib.contextmanager
def api_service(run_dir: Path) -> Iterator[ApiService]:
    service = ApiService(run_dir)
    try:
        yield service
    finally:
        service.stop()


def hard_limits() -> dict[str, str]:
    """This machine's hard limit for locked memory (bytes): what a container may be given without
    CAP_SYS_RESOURCE."""
    import resource

    def hard(kind: int, unlimited: int) -> str:
        limit = resource.getrlimit(kind)[1]
        return str(unlimited if limit == resource.RLIM_INFINITY else limit)

    return {
        "CT_MEMLOCK_BYTES": hard(resource.RLIMIT_MEMLOCK, 64 * 1024 * 1024),
    }
