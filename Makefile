# Two commands do everything on a fresh machine (see README):
#   make demo   set up the venv with the embedded ComfyUI host and run the main job
#   make test   set up the venv, run the Registry checks (make validate) and the whole test suite
#   make test-fast  the suite without its slow tests, for iterating
# With COMFYUI_PATH=<a ComfyUI checkout> the same targets run against that host, in their own venv.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
PORT ?= 8188
ifdef COMFYUI_PATH
VENV ?= .venv-upstream
HOST_REQS = $(COMFYUI_PATH)/requirements.txt
else
VENV ?= .venv
HOST_REQS =
endif
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# pip's notes about this machine's partial local package mirrors are noise; real errors still fail the pipe.
QUIET := 2>&1 | { grep -v -E "is ignored: it is neither|yanked" || true; }
STAMP := $(VENV)/.sefi-ready

# The Comfy Registry's own validator and packer (comfy-cli from PyPI) in a throwaway venv of their own. DO_NOT_TRACK and
# --skip-prompt keep it from asking about telemetry (CI has no stdin); validate and pack need no network.
COMFY_CLI ?= comfy-cli==1.23.0
COMFY_CLI_VENV ?= .venv-comfycli
COMFY := DO_NOT_TRACK=1 $(COMFY_CLI_VENV)/bin/comfy --skip-prompt --no-json
# A peer's pack checker (comfy-test from PyPI), in its own throwaway venv: `comfy-test lint` on the unpacked zip
# (every .py file cp1252-encodable, for Windows consoles; no raw nn layers, autocast or .cuda() in pack code).
COMFY_TEST ?= comfy-test==0.4.15
COMFY_TEST_VENV ?= .venv-comfytest

.PHONY: setup test test-fast validate demo serve tiny-checkpoints node-interface clean-venv browser screenshots

setup: $(STAMP)

$(STAMP): constraints.txt requirements.txt requirements-dev.txt requirements-insightface.txt $(HOST_REQS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0 $(QUIET)
ifdef COMFYUI_PATH
	grep -v -E '^(torch|torchvision|torchaudio)([<>=].*)?$$' $(COMFYUI_PATH)/requirements.txt > $(VENV)/host-requirements.txt
	$(PIP) install -c constraints.txt torchvision==0.28.0 -r $(VENV)/host-requirements.txt $(QUIET)
else
	$(PIP) install -c constraints.txt comfyui==0.0.1 $(QUIET)
endif
	$(PIP) install -c constraints.txt -r requirements.txt -r requirements-dev.txt $(QUIET)
	$(PIP) install --no-deps -r requirements-insightface.txt $(QUIET)
	rm -rf $(VENV)/insightface-0.7.3  # not --upgrade: the wheel's data files would replace its package folder
	$(PIP) install --no-deps --target $(VENV)/insightface-0.7.3 insightface==0.7.3 $(QUIET)
	$(PY) -c "import torch, safetensors, dlib, face_recognition_models, pytest, insightface.app"
	$(MAKE) --no-print-directory browser
ifdef COMFYUI_PATH
	$(PY) -m tools.frontends  # the newest comfyui-frontend-package, the browser test's second frontend
endif
	touch $(STAMP)

# Debian's Chromium for the real-browser test of the workflows (Playwright drives it; no browser download).
browser:
	@if command -v chromium >/dev/null; then true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "chromium is not installed and this user cannot apt-get it: the browser test will be skipped (it fails under CI=true)"; fi

# The README's pictures (docs/screenshots) from the newest frontend; upstream only: make screenshots COMFYUI_PATH=…
screenshots: setup
	$(PY) -m tools.screenshots

test: setup validate
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

# For iterating: the suite without the tests marked slow (tests/pytest.ini) and without the Registry checks.
test-fast: setup
	$(PY) -m pytest tests -q -m "not slow" $(PYTEST_ARGS)

$(COMFY_CLI_VENV)/.ready-$(COMFY_CLI):
	rm -rf $(COMFY_CLI_VENV)
	$(PYTHON) -m venv $(COMFY_CLI_VENV)
	$(COMFY_CLI_VENV)/bin/python -m pip --disable-pip-version-check -q install "$(COMFY_CLI)" $(QUIET)
	touch $@

$(COMFY_TEST_VENV)/.ready-$(COMFY_TEST):
	rm -rf $(COMFY_TEST_VENV)
	$(PYTHON) -m venv $(COMFY_TEST_VENV)
	$(COMFY_TEST_VENV)/bin/python -m pip --disable-pip-version-check -q install "$(COMFY_TEST)" $(QUIET)
	touch $@

# `comfy node validate` (what publishing runs; its security warnings fail here, as the Registry announces they
# will), then `comfy node pack`, tools/check_pack.py on the zip it builds and comfy-test lint on it unpacked.
validate: $(COMFY_CLI_VENV)/.ready-$(COMFY_CLI) $(COMFY_TEST_VENV)/.ready-$(COMFY_TEST)
	$(COMFY) node validate </dev/null 2>&1 | tee $(COMFY_CLI_VENV)/validate.log
	grep -q "All validation checks passed" $(COMFY_CLI_VENV)/validate.log
	rm -f node.zip
	$(COMFY) node pack </dev/null
	mv node.zip $(COMFY_CLI_VENV)/node.zip
	$(PYTHON) -m tools.check_pack $(COMFY_CLI_VENV)/node.zip
	rm -rf $(COMFY_CLI_VENV)/node
	$(PYTHON) -m zipfile -e $(COMFY_CLI_VENV)/node.zip $(COMFY_CLI_VENV)/node
	$(COMFY_TEST_VENV)/bin/comfy-test lint $(COMFY_CLI_VENV)/node

demo: setup
	$(PY) -m tools.demo $(if $(CKPT),--checkpoint "$(CKPT)") $(DEMO_ARGS)

serve: setup
	$(PY) -m tools.dev_server --port $(PORT)

# After appending an input to a node: rewrite tests/data/node_interface.json (every node's inputs, in order) and
# raise pyproject's version; refuses a change that moves, retypes or removes an input (tools/node_interface.py).
node-interface: setup
	$(PY) -m tools.node_interface

tiny-checkpoints: setup
	$(PY) -m tools.tiny_checkpoints $(or $(OUT),models/checkpoints) --family $(or $(FAMILY),all)

clean-venv:
	rm -rf $(VENV)
