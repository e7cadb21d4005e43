#!/usr/bin/env bash
# Install prunesearch into the current Python environment; `--dev` adds the test tools.
# torch is installed first, pinned to 2.13.0, only when no torch is present: an unpinned resolve would pull a
# several-GB CUDA build onto CPU machines, and an existing torch (CUDA or not) is never replaced.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
extra=""
if [ "${1:-}" = "--dev" ]; then extra="[dev]"; fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".${extra}"
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
