"""Every Triton kernel specialisation compiles for sm_80 and sm_90 without a GPU.

The compile runs in a child process without ``TRITON_INTERPRET`` (the suite sets it, and under it
``triton.jit`` builds interpreter functions that cannot be compiled): ``python -m
seqpar.runtime.kernels.triton_aot``, whose JSON lines are the per-specialisation results. CI compiles
the representative subset (every code path once); the whole enumeration is ``slow``.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from seqpar.runtime.kernels import triton_aot, triton_pcr  # noqa: E402

pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def enumerated():
    return triton_aot.specialisations()


def compile_in_child(subset):
    """The results of ``triton_aot`` for every target, compiled in a process without the interpreter."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning
    child = subprocess.run(
        [sys.executable, "-m", "seqpar.runtime.kernels.triton_aot", "--subset", subset],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600,
    )
    lines = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    if lines and "unavailable" in lines[0]:
        pytest.skip(f"cannot compile Triton kernels here: {lines[0]['unavailable']}")
    assert lines, f"triton_aot printed no results (exit {child.returncode}):\n{child.stderr[-4000:]}"
    return lines


def assert_all_compiled(results, expected):
    failures = [f"{r['target']} {r['label']}: {r['error'][:2000]}" for r in results if r["error"]]
    assert not failures, f"{len(failures)} of {len(results)} compiles failed:\n" + "\n\n".join(failures)
    assert {r["target"] for r in results} == {"sm_80", "sm_90"}
    assert len(results) == 2 * expected


def test_representative_specialisations_compile_for_sm80_and_sm90():
    expected = len(triton_aot.representative(enumerated()))
    assert_all_compiled(compile_in_child("representative"), expected)


@pytest.mark.slow
def test_every_specialisation_compiles_for_sm80_and_sm90():
    assert_all_compiled(compile_in_child("all"), len(enumerated()))


@pytest.mark.parametrize("shape", [(5000, 3, 7), (40, 100, 1), (70, 2, 64)], ids=lambda s: "L{}-N{}-w{}".format(*s))
@pytest.mark.parametrize("kind", ["full", "diag", "identity"])
def test_enumeration_holds_every_launch_of_the_dispatcher(kind, shape):
    # Odd shapes, half and mixed operands, both directions: each launch solve_chunked makes is enumerated.
    labels = {spec.label for spec in enumerated()}
    launched = set()

    def record(*arguments, summary):
        _, args, meta = triton_pcr.launch_arguments(*arguments, summary=summary)
        launched.add(triton_aot.pcr_label(args, meta))

    for a_dtype, c_dtype in triton_aot.OPERAND_DTYPES:
        c = torch.empty(shape, dtype=c_dtype, device="meta")
        A = {"full": torch.empty((*shape, shape[-1]), dtype=a_dtype, device="meta"),
             "diag": torch.empty(shape, dtype=a_dtype, device="meta"), "identity": None}[kind]
        for reverse in (False, True):
            triton_pcr.solve_chunked(A, c, kind, reverse, launch=record)
    assert launched and launched <= labels, sorted(launched - labels)
