# The only set-up commands a new user needs: `make demo` and `make test`.
# Both create .venv on first use and install the package from this repo's own files.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo_run

.PHONY: demo test lint bench bench-prepare bench-loader bench-contrastive bench-retrieval bench-train clean install

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv
	# uv resolves the regular torch/torchvision wheels (a CPU-only torch wheel breaks torchvision imports).
	$(VENV)/bin/uv pip install -q --python $(PY) -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmpretrain demo-data --out $(DEMO)/raw
	$(VENV)/bin/mmpretrain prepare $(DEMO)/raw/folder $(DEMO)/raw/manifest.csv --out shards/demo --image-size 64 --workers 2 --val-fraction 0.05 --shard-size 500
	$(VENV)/bin/mmpretrain prepare $(DEMO)/raw/corpus.txt --text-only --out shards/demo-text --val-fraction 0.05 --shard-size 500
	$(VENV)/bin/mmpretrain inspect shards/demo --grid $(DEMO)/contact.png
	$(VENV)/bin/mmpretrain inspect shards/demo-text

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: bench-prepare bench-loader bench-contrastive bench-retrieval bench-train

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

clean:
	rm -rf $(DEMO) shards/demo shards/demo-text
