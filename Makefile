# Two commands on a fresh machine: `make demo` (the whole flow on the embedded default) and `make test`.
# `make check`: the fast tier while you work (units and ONE real tritonserver start, <= 2 min here); `make test`
# stays the full suite CI runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_EXTRAS ?= cpu,dev
STAMP := $(VENV)/.installed

# make test's and make check's two pytest-xdist workers: much of the suite waits (tritonserver starts, Locust,
# subprocess CLIs, recovery polls), so two overlap it on two cores; a file's tests stay on one worker (its module
# fixtures and server start once), tests/conftest.py hands out the longest files first, and a test marked `alone`
# runs while the other worker waits. `make test XDIST=` runs serially.
XDIST ?= -n 2 --dist loadfile --no-loadscope-reorder

# demo knobs: a slice of the corpus keeps the demo to minutes on 2 cores
DEMO_LIMIT ?= 8000
DEMO_EPOCHS ?= 1
DEMO_DIR ?= demo

.PHONY: install demo check test test-all finetune-full soak clean

# the fast tier: unit tests (no server) and the served contract on one real tritonserver (test_serving's
# module server: parity with PyTorch over HTTP and gRPC, raw KServe v2 JSON, bad input, metrics, CLI)
CHECK_TESTS := tests/test_common.py tests/test_contract.py tests/test_code_shape.py tests/test_loadtest_units.py \
	tests/test_import_graph.py tests/test_exporter_units.py tests/test_finetune_data.py tests/test_cli.py \
	tests/test_serving.py::test_parity_with_pytorch tests/test_serving.py::test_plain_kserve_v2_http_json \
	tests/test_serving.py::test_metrics_endpoint_on_loopback tests/test_serving.py::test_undecodable_bytes_are_invalid_argument \
	tests/test_serving.py::test_bad_requests_over_http tests/test_serving.py::test_cli_classify_and_health

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[$(PIP_EXTRAS)]'
	touch $(STAMP)

demo: install
	bash scripts/demo.sh $(PY) $(DEMO_DIR) $(DEMO_LIMIT) $(DEMO_EPOCHS)

check: install
	$(PY) -m pytest -m "not slow and not gpu" -q $(XDIST) --timeout 300 $(CHECK_TESTS)

test: install
	$(PY) -m pytest -m "not slow and not gpu" $(XDIST) --timeout 1200 --durations=25

test-all: install
	$(PY) -m pytest -m "not gpu" --timeout 3600

# the full fine-tune whose numbers the README quotes (47 min measured here on 2 shared cores; ~15 min idle)
finetune-full: install
	$(PY) -m finetune data --out data/
	$(PY) -m finetune train --data data/ --out finetuned_model

soak: install
	$(PY) -m loadtest soak --duration 600

clean:
	rm -rf $(DEMO_DIR) build model_repository results
