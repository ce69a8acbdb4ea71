#!/usr/bin/env bash
# Create .venv with the CPU build of torch and the project + test extras. Idempotent.
# A GPU cluster installs the CUDA build of torch instead (see README), then the same `pip install -e`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The pinned CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q --no-compile "torch==2.13.0"
.venv/bin/python -m pip install -q --no-compile -e ".[test]"
# Bytecode on every core at once (pip compiles file by file on one); needed where PYTHONDONTWRITEBYTECODE keeps
# imports from caching it. Like pip, a file that does not compile is skipped quietly, not an error: torch ships
# one only Python 3.12 parses (torch/testing/_internal/py312_intrinsics.py).
.venv/bin/python -m compileall -q -j 0 "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true
