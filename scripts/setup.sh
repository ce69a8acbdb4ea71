#!/usr/bin/env bash
# Create .venv with the CPU build of torch and the project + test extras. Idempotent.
# A GPU cluster installs the CUDA build of torch instead (see README), then the same `pip install -e`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The pinned CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
