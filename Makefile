# pacsnode: `make run` starts the node, `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config/pacsnode.toml
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the tests talk to: dcmtk (storescu/echoscu/dsr2html), Orthanc, dicom3tools (dciodvfy),
# chromium (headless screenshots of Orthanc's web page showing our results), systemd (systemd-analyze
# verify of the units in systemd/)
SYSTEM_TOOLS := storescu:dcmtk echoscu:dcmtk dsr2html:dcmtk dcmj2pnm:dcmtk Orthanc:orthanc dciodvfy:dicom3tools chromium:chromium systemd-analyze:systemd

.PHONY: run test bench install install-test system-deps lint typecheck weights clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, from its CPU wheel, so nothing pulls the CUDA builds
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  pkgs=$$(echo $$missing | tr ' ' '\n' | sort -u | tr '\n' ' '); \
	  echo "installing Debian packages: $$pkgs"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$pkgs; \
	fi

run: install
	$(BIN)/pacsnode --config $(CONFIG) db upgrade
	exec $(BIN)/pacsnode --config $(CONFIG) serve

lint: install-test
	$(BIN)/ruff check pacsnode tests benchmarks
	$(BIN)/ruff format --check pacsnode tests benchmarks

typecheck: install-test
	$(BIN)/mypy pacsnode

test: install-test system-deps lint typecheck
	$(BIN)/pytest -q

# Speed against references measured in the same run (see benchmarks/ and the README table)
bench: install-test system-deps
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/latency.py
	$(BIN)/python benchmarks/inference.py

# Retrain the demo weights and input gates on synthetic phantoms (see each models/*/MODEL_CARD.md
# and models/gates/*/MODEL_CARD.md)
weights: install-test  # the training scripts measure with scikit-learn (test extra)
	$(BIN)/python -m pacsnode.models.train_cxr --out models/cxr-chexnet
	$(BIN)/python -m pacsnode.models.train_pe --out models/ct-pe --seed 0
	$(BIN)/python -m pacsnode.models.train_kidney --out models/ct-kidney --seed 0
	$(BIN)/python -m pacsnode.gates.train_ct --out models/gates/ct-region-contrast --seed 0
	$(BIN)/python -m pacsnode.gates.train_radiograph --out models/gates/radiograph-view --seed 0
	# out-of-distribution statistics: after the models and the CT gate they are measured with
	$(BIN)/python -m pacsnode.gates.train_ood --model cxr-chexnet
	$(BIN)/python -m pacsnode.gates.train_ood --model ct-pe
	$(BIN)/python -m pacsnode.gates.train_ood --model ct-kidney

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
