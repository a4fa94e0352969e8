# The only set-up commands a new user needs: `make demo` and `make test`.
# Both create .venv on first use and install the package from this repo's own files.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo_run

.PHONY: demo test lint bench bench-prepare bench-loader bench-contrastive bench-retrieval bench-train bench-optim bench-peer clean install

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv
	# uv resolves the regular torch/torchvision wheels (a CPU-only torch wheel breaks torchvision imports).
	# Bytecode is compiled once here: where PYTHONDONTWRITEBYTECODE is set, every python start would
	# otherwise compile torch & co. again (~20 s per process on 2 cores; tests and the demo start dozens).
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -e '.[dev,s3,ray]'
	touch $(STAMP)

demo: $(STAMP)
	BIN=$(VENV)/bin pipelines/quickstart.sh $(DEMO)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: bench-prepare bench-loader bench-contrastive bench-retrieval bench-train bench-text bench-optim

bench-prepare: $(STAMP)
	$(PY) pipelines/bench/prepare_throughput.py

bench-loader: $(STAMP)
	$(PY) pipelines/bench/loader_throughput.py

bench-contrastive: $(STAMP)
	$(PY) pipelines/bench/contrastive_memory.py

bench-retrieval: $(STAMP)
	$(PY) pipelines/bench/retrieval_eval.py

bench-train: $(STAMP)
	$(PY) pipelines/bench/train_throughput.py

bench-text: $(STAMP)
	$(PY) pipelines/bench/text_branch_cost.py

bench-optim: $(STAMP)
	$(PY) pipelines/bench/optimizer_step.py

# Not in `bench`: it builds its own environment for open_clip_train (.venv-peer, once).
bench-peer: $(STAMP)
	$(PY) pipelines/bench/peer_open_clip.py

clean:
	rm -rf $(DEMO) shards/demo shards/demo-text compare_runs
