"""The prepared GPU check runs end to end here on CPU at tiny sizes (``--smoke``), so that a lent GPU's minutes
are not spent finding a broken script (issue "Ready for the first GPU" §3)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_script_runs_every_row_on_cpu(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--device", "cpu", "--repeats", "1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )  # this checkout's seqpar, as scripts/gpu_check.sh runs it
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    raw = json.loads((tmp_path / "raw.json").read_text())
    rows = {entry["row"] for entry in raw["results"]}
    assert rows == {"mlp", "diag", "gru", "diffusion", "fused", "distributed", "autocast", "memory", "cudagraphs"}
    assert not [entry for entry in raw["results"] if "error" in entry]
    # Every solve agrees with its sequential baseline to float32 rounding (the smoke chains are contractive);
    # under bfloat16 autocast, with float32 no closer than eager in the same region (twice its distance, as
    # tests/e2e/test_trust.py holds the autocast region).
    for entry in raw["results"]:
        assert entry["rel_err"] <= (2 * entry["eager_err"] if entry["row"] == "autocast" else 1e-4)
    assert [entry["eager_err"] > 1e-4 for entry in raw["results"] if entry["row"] == "autocast"] == [True]
    assert (tmp_path / "table.md").read_text().count("\n| ") == 1 + len(raw["results"])
    # The memory row's chain does not fit the (smoke: simulated) device: Newton over a window of L / 4.
    assert [entry["window"] for entry in raw["results"] if entry["row"] == "memory"] == [16]
