# The two commands of the README. Both create .venv on first use.
#   make demo   install Veil and run the main job on the embedded default
#   make test   install the test extras, then lint, type-check and run the test suite
#   make test-slow  the tests marked slow (each over ~10 s), the second stage of CI

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch first, pinned: this CPU build lies on the machines' disks; any other torch request
# would pull a CUDA build of several GB. pyproject.toml declares torch>=2.6, which it satisfies.
TORCH  := torch==2.13.0
PYTEST_ARGS ?= -m "not slow" -n 2

.PHONY: demo test test-slow test-all lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	@echo "== 1/2  eight hospitals as real processes on loopback: mutual TLS, secure aggregation, =="
	@echo "==       and client-level differential privacy with noise added by the hospitals      =="
	$(BIN)/veil run examples/hospitals_private.toml --out runs/demo-hospitals
	@echo "== 2/2  five hospitals with record-level differential privacy (ε = 1 per patient) =="
	$(BIN)/veil run examples/medical_diagnosis_dp.toml --out runs/demo-dp
	@echo "== reports (self-contained HTML, open in any browser): =="
	@echo "runs/demo-hospitals/report.html"
	@echo "runs/demo-dp/report.html"

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The slow set alone (CI's second stage, after `make test`): two workers, like `make test`.
test-slow: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m slow -n 2

test-all:
	$(MAKE) test PYTEST_ARGS=""

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/simulation.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache .hypothesis
