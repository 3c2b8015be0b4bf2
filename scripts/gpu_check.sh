#!/usr/bin/env bash
# The one GPU check (issue "Ready for the first GPU" §3): at most about 8 minutes on one GPU.
#
#   bash scripts/gpu_check.sh [results folder]        # default results/gpu
#
# Installs nothing: runs this checkout (PYTHONPATH) with the machine's Python ($PYTHON, else python3, which on
# the lent H200 image holds torch and triton; the diffusion row needs diffusers, which can travel as a wheel).
# 1. the Triton tests on CUDA tensors with the compiled kernels (no interpreter), log in triton_tests.log;
# 2. benchmarks/gpu_check.py: MLP forward/backward at DeepPCR's sizes, a Mamba-size diagonal recurrence, GRU vs
#    cuDNN, DDPM sampling with the tiny UNet at T = 1000, Mamba's reference loop in the fused loop (inductor's
#    Triton step), a deep MLP in a bfloat16 autocast region, a chain solved inside inductor's CUDA graphs
#    (mode "reduce-overhead"), a chain whose blocks exceed 1/16 of the device (the memory bound's window and
#    peak), seqpar.distributed in a one-rank NCCL group;
#    table.md and raw.json.
# Record device, command and table in benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" - <<'PY' 2>&1 | tee "$OUT/machine.txt" || exit 2
import platform, torch
assert torch.cuda.is_available(), "gpu_check: no CUDA device"
print(platform.node(), torch.__version__, torch.version.cuda, torch.cuda.get_device_name())
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton missing")
PY
status=0
SEQPAR_TRITON_DEVICE=cuda timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/runtime/test_triton_pcr.py 2>&1 \
    | tee "$OUT/triton_tests.log" || status=1
timeout 330 "$PY" benchmarks/gpu_check.py --out "$OUT" --budget 240 || status=1
echo "gpu_check: results in $OUT (exit $status)"
exit $status
