# moesif-beam: `make run` and `make test` work on a fresh machine with Python 3.11+.
# Everything installs into .venv; pip's cache lives under ~/.cache/pip.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATAFLOW_VENV  ?= .venv-dataflow
DATAFLOW_STAMP := $(DATAFLOW_VENV)/.installed
SAMPLE := samples/wso2_sample.jsonl
OUT    ?= moesif-out

.PHONY: run test lint unit integration install dataflow-venv collector bench bench-stream clean

run: $(STAMP)
	$(BIN)/moesif-beam events --input $(SAMPLE) --format wso2 \
	    --output_dir $(OUT) --metrics_out $(OUT)/metrics.json

# Lint, then the unit tests (seconds), then the integration tests (real services, minutes):
# a lint or unit failure stops before the slow part starts.
test: $(STAMP) $(DATAFLOW_STAMP) lint
	$(BIN)/pytest tests/unit
	$(BIN)/pytest tests/integration

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest tests/unit

integration: $(STAMP) $(DATAFLOW_STAMP)
	$(BIN)/pytest tests/integration

install: $(STAMP)

$(STAMP): setup.py moesif_beam/__init__.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,dev]"
	touch $(STAMP)

# The dataflow extra (apache-beam[gcp]) in a virtualenv of its own, for the offline Dataflow
# test (tests/integration/test_dataflow.py): its 83 packages add about 45 s to an install and
# 0.5 s to every `import apache_beam`, which .venv, its tests and benchmarks do not pay.
dataflow-venv: $(DATAFLOW_STAMP)

$(DATAFLOW_STAMP): setup.py moesif_beam/__init__.py
	test -x $(DATAFLOW_VENV)/bin/python || $(PYTHON) -m venv $(DATAFLOW_VENV)
	$(DATAFLOW_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DATAFLOW_VENV)/bin/python -m pip install --quiet -e ".[dataflow]"
	touch $(DATAFLOW_STAMP)

collector: $(STAMP)
	$(BIN)/moesif-beam collector --port 9500 --data_dir $(OUT)/collector

bench: $(STAMP)
	$(BIN)/python benchmarks/events_throughput.py --client

bench-stream: $(STAMP)
	$(BIN)/python benchmarks/streaming_latency.py

clean:
	rm -rf $(OUT) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
