# ninebest: `make demo` and `make test` do all set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup demo test bench bench-gpu lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/ninebest demo --out ninebest-demo

test: setup
	$(PY) -m pytest -q --durations=25

bench: setup
	$(PY) bench/bench_map.py --write BENCHMARKS.md
	$(PY) bench/bench_map.py --model resnet50 --layers layer1,layer2,layer3,layer4 --images 128 --write BENCHMARKS.md
	$(PY) bench/bench_deconv.py --write BENCHMARKS.md
	$(PY) bench/bench_export.py --write BENCHMARKS.md
	$(PY) bench/bench_reduce.py --write BENCHMARKS.md
	$(PY) bench/bench_memory.py --write BENCHMARKS.md
	$(PY) bench/bench_decode.py --write BENCHMARKS.md

bench-gpu: setup  # on a machine with a CUDA GPU
	PY=$(PY) bash bench/gpu.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf ninebest-demo .pytest_cache .ruff_cache
