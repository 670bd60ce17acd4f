PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCHREC := torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0

.PHONY: demo test install lint docs docs-gen clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build on this disk; never let pip resolve plain `torch` (a multi-GB CUDA build).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# The torchrec extra's own wheels: torchrec's requires the CUDA fbgemm-gpu, so both without their
	# dependencies (the extra lists the rest); train/sharding.py checks this pair at start.
	$(BIN)/pip install --quiet --no-deps $(TORCHREC)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m heavyranker demo --config configs/local_small.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 tests

lint: $(STAMP)
	$(BIN)/ruff check src tests bench docs/gen

# Regenerates the generated pages: the configuration reference (from the config models) and the benchmark
# tables (from bench/results/*.json). tests/test_docs.py fails when they are stale.
docs-gen: $(STAMP)
	$(BIN)/python docs/gen/config_reference.py
	$(BIN)/python docs/gen/benchmarks.py

# The reference site, in site/; strict: a broken link or anchor fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) data runs site
