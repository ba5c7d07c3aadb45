# Every target sets itself up: a venv in .venv with torch pinned first (the pinned CPU wheel is on
# the machine; an unpinned torch would pull several GB of CUDA packages), then the package.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
TORCH  ?= torch==2.13.0

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,plot]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/attnpipe run jobs/demo.toml
	$(VENV)/bin/attnpipe inspect out/demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_capture.py
	$(PY) benchmarks/bench_storage.py
	$(PY) benchmarks/bench_extract.py
	$(PY) benchmarks/bench_corpus.py

clean:
	rm -rf $(VENV) out .pytest_cache
