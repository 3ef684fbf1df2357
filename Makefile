# Every target does its own set-up: virtual environments in the checkout, each with its world's pinned torch.
#   .venv        the core, the CLI and the demo (current diffusers/transformers)
#   .venv-a1111  everything A1111-facing, under the WebUI's pins (torch 2.1.2, gradio 3.41.2, transformers 4.30.2, ldm)
#   .venv-forge  the panels under Forge's pins (gradio 4.40.0, transformers 4.46.1, diffusers 0.31.0)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
A1111_VENV := .venv-a1111
A1111_BIN := $(A1111_VENV)/bin
A1111_STAMP := $(A1111_VENV)/.installed-stamp
# Tests that need a WebUI's pins: never in the core venv. tests/a1111 and tests/ui run under A1111's pins;
# tests/ui again and tests/forge under Forge's, tests/forge in a pytest process of its own (its stand-in's
# `modules` package and A1111's share a name).
WEBUI_TESTS := tests/a1111 tests/ui tests/forge
A1111_TESTS := tests/a1111 tests/ui
FORGE_VENV := .venv-forge
FORGE_BIN := $(FORGE_VENV)/bin
FORGE_STAMP := $(FORGE_VENV)/.installed-stamp
# The panels run in both WebUIs' Gradio: tests/ui runs again under Forge's pins.
FORGE_TESTS := tests/ui
# Debian's chromium for the browser test (tests/ui/test_browser.py): Playwright drives it, downloads no browser.
CHROMIUM_INSTALL := test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

.PHONY: demo test test-core test-a1111 test-forge lint format clean

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build; an unpinned torch pulls the CUDA packages.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

$(A1111_STAMP): pyproject.toml requirements-a1111.txt
	test -x $(A1111_BIN)/python || $(PYTHON) -m venv $(A1111_VENV)
	# A1111's torch (2.1.2, pinned in the file): not the local CPU build of the other venvs.
	$(A1111_BIN)/python -m pip install -q -r requirements-a1111.txt
	$(A1111_BIN)/python -m pip install -q --no-deps stable-diffusion-sdkit==2.1.5
	$(A1111_BIN)/python -m pip install -q --no-deps -e .
	$(CHROMIUM_INSTALL)
	touch $(A1111_STAMP)

$(FORGE_STAMP): pyproject.toml requirements-forge.txt
	test -x $(FORGE_BIN)/python || $(PYTHON) -m venv $(FORGE_VENV)
	$(FORGE_BIN)/python -m pip install -q torch==2.13.0
	$(FORGE_BIN)/python -m pip install -q -r requirements-forge.txt
	$(FORGE_BIN)/python -m pip install -q --no-deps -e .
	$(CHROMIUM_INSTALL)
	touch $(FORGE_STAMP)

demo: $(STAMP)
	$(BIN)/python -m ti_trainer demo --out runs/demo

test: lint test-core test-a1111 test-forge

test-core: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests $(addprefix --ignore=,$(WEBUI_TESTS))

test-a1111: $(A1111_STAMP)
	$(A1111_BIN)/python -m pytest -q -n 2 $(wildcard $(A1111_TESTS))

test-forge: $(FORGE_STAMP)
	$(FORGE_BIN)/python -m pytest -q -n 2 $(wildcard $(FORGE_TESTS))
	$(FORGE_BIN)/python -m pytest -q -n 2 tests/forge

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(A1111_VENV) $(FORGE_VENV) runs .pytest_cache .ruff_cache
