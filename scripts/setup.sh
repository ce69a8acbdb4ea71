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
# Bytecode on every core at once (pip compiles file by file on one). Like pip, a file that does not compile is
# left to be compiled when imported, not an error. Needed where PYTHONDONTWRITEBYTECODE keeps imports from caching it.
.venv/bin/python -m compileall -q -j 0 "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true
