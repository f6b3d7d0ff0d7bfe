# The two commands a newcomer runs: `make demo` (the main job on the bundled model) and `make test`.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-quick test test-slow lint bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/loramoe demo --out outputs/demo

demo-quick: setup
	.venv/bin/loramoe demo --quick --out outputs/demo-quick

test: setup
	.venv/bin/python -m pytest -q

test-slow: setup
	.venv/bin/python -m pytest -q -m slow

lint: setup
	.venv/bin/ruff check src tests benchmarks experiments
	.venv/bin/ruff format --check src tests benchmarks experiments

bench: setup
	.venv/bin/python benchmarks/run.py
