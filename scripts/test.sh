#!/usr/bin/env bash
# Set up .venv and run the test suite (slow zoo cases are skipped unless SEQPAR_SLOW=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "triton,test"
if [ "${SEQPAR_SLOW:-0}" = 1 ]; then
    exec .venv/bin/python -m pytest -q -m "slow or not slow" "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
