#!/usr/bin/env bash
# Create .venv with the pinned CPU torch and seqpar (editable) plus the given extras, at the versions the tests
# last passed with (scripts/constraints.txt).
# On a GPU machine with your own torch: python -m venv --system-site-packages .venv, or
# set SEQPAR_TORCH to the torch requirement you want (e.g. SEQPAR_TORCH=torch).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-triton}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "${SEQPAR_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -c scripts/constraints.txt -e ".[${extras}]"
