"""The GPU rows that matter, in one run that fits a lent GPU's minutes (issue "Ready for the first GPU" §3).

    python benchmarks/gpu_check.py --out results/gpu          # on a CUDA machine (scripts/gpu_check.sh)
    python benchmarks/gpu_check.py --smoke --device cpu       # tiny sizes on CPU: checks the script itself

Rows (float32; each time is the median of ``--repeats`` calls, CUDA
synchronised before and after each; ratios are the sequential baseline's time
over seqpar's, measured in the same run):

* ``mlp``: ``s_l = tanh(W_l s_{l-1} + b_l)`` at DeepPCR's sizes (L = 1024 and
  4096, w = 4, 16, 32, batch 1 and 64): the eager loop against
  ``seqpar.solve_chain`` (Newton, full Jacobian), forward alone and forward
  plus backward (the parallel adjoint against autograd through the loop);
* ``diag``: a Mamba-size diagonal linear recurrence ``s_l = a_l * s_{l-1} +
  u_l`` (batch 1, 1536 x 16 state values, L = 2048): the eager loop against
  ``solve_chain(jacobian="diag")`` (exact after one Newton iteration) and the
  affine scan kernel alone;
* ``gru``: ``nn.GRU`` with 16 hidden units over T = 1024 and 4096 steps,
  batch 1: cuDNN against ``seqpar.scan_rnn`` compiled with ``backend="seqpar"``;
* ``diffusion``: DDPM sampling with the tests' tiny UNet at T = 1000 (needs
  diffusers): the loop against windowed Picard (``solve_chain`` on the
  scheduler's step, window 32);
* ``fused``: Mamba's reference loop (``seqpar.testing.models.SelectiveScan``,
  width 768, state 16, L = 1024, batch 1) compiled with ``backend="seqpar"``:
  kept sequential, its step compiled by inductor (Triton on CUDA) and called
  per step (the fused loop), against the eager loop, timed after the speed
  trials (``timing.past_trials``);
* ``autocast``: a 256-layer tanh MLP (width 64, batch 64; ``seqpar.testing.models.deep_mlp``) compiled with
  ``backend="seqpar"`` and called inside ``torch.autocast(device, bfloat16)``, forward and training step,
  against eager in the same region (timed after the speed trials); its error is against float32 without
  autocast, next to eager's own (``eager_err``: bfloat16's rounding, the bound seqpar's is held to);
* ``memory``: an Elman chain ``s = tanh(s W^T + x_l)`` whose whole-chain dense blocks exceed
  ``1 / DEVICE_MEMORY_SHARE`` of the device (w = 32, batch 1024, L = 4096: 16 GiB of blocks): the Newton
  forward over the sliding window the device's memory allows (``seqpar.runtime.budget``), and a training step
  (parallel adjoint in runs), against the eager loop; the window and the solve's peak (``max_memory_allocated``
  over what was allocated before) in units of one window's blocks: the multiple the share assumes (2-3x);
* ``cudagraphs``: a deep tanh MLP between two pointwise ops, compiled with the option ``mode="reduce-overhead"``
  (inductor's CUDA graphs) and the chain solved in parallel: the chain ops stay out of the captured graphs
  (``cudagraph_unsafe``), so every call's solve is its own; the error is the largest over six calls with
  inputs of different scales (a replayed solve would give an earlier call's iterations);
* ``distributed``: ``seqpar.distributed.solve_chain`` in a one-rank group
  (NCCL on CUDA, gloo on CPU) against ``seqpar.solve_chain`` on the MLP chain
  (L = 4096, w = 16): the collectives' path on the device, and its overhead.

Writes ``table.md`` (one markdown table) and ``raw.json`` (every time, the
errors against the sequential result, the device, torch and triton versions)
under ``--out``; a row that fails records its error and the run goes on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

import seqpar
from timing import past_trials

SIZES = {
    "full": {"mlp": [(L, w, B) for L in (1024, 4096) for w in (4, 16, 32) for B in (1, 64)],
             "diag": [(2048, 1536 * 16)], "gru": [1024, 4096], "diffusion": [1000], "fused": [(1024, 768, 16)],
             "distributed": [(4096, 16)], "autocast": [(256, 64, 64)], "memory": [(4096, 32, 1024)],
             "cudagraphs": [(1024, 16, 64)]},
    "smoke": {"mlp": [(64, 4, 2)], "diag": [(64, 32)], "gru": [32], "diffusion": [20], "fused": [(32, 32, 8)],
              "distributed": [(64, 4)], "autocast": [(48, 8, 4)], "memory": [(64, 4, 2)], "cudagraphs": [(48, 4, 2)]},
}


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up (synchronised on CUDA)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def mlp_rows(device, sizes, repeats):
    def step(s, x):
        W, b = x
        return torch.tanh(torch.nn.functional.linear(s, W, b))

    def loop(s, W, b):
        states = []
        for l in range(W.shape[0]):
            s = step(s, (W[l], b[l]))
            states.append(s)
        return torch.stack(states)

    for L, w, B in sizes:
        generator = torch.Generator().manual_seed(0)
        W = (torch.randn(L, w, w, generator=generator) * 0.9 / w**0.5).to(device)
        b = (torch.randn(L, w, generator=generator) * 0.1).to(device)
        s0 = torch.randn(B, w, generator=generator).to(device)
        with torch.no_grad():
            want = loop(s0, W, b)
            got = seqpar.solve_chain(step, s0, (W, b))
            forward = (timed(lambda: loop(s0, W, b), device, repeats),
                       timed(lambda: seqpar.solve_chain(step, s0, (W, b)), device, repeats))
        Wg, bg = W.clone().requires_grad_(), b.clone().requires_grad_()

        def train(solve):
            states = solve()
            states[-1].square().sum().backward()
            Wg.grad = bg.grad = None

        backward = (timed(lambda: train(lambda: loop(s0, Wg, bg)), device, repeats),
                    timed(lambda: train(lambda: seqpar.solve_chain(step, s0, (Wg, bg), adjoint="parallel")),
                          device, repeats))
        yield {"row": "mlp", "case": f"L={L} w={w} B={B}", "baseline": "eager loop",
               "forward_s": forward, "train_s": backward, "rel_err": relative_error(got, want)}


def memory_rows(device, sizes, repeats):
    from seqpar.runtime import budget, spec

    def step(s, x, W):
        return torch.tanh(s @ W.T + x)

    def loop(s, xs, W):
        return torch.stack(list(itertools.accumulate(xs, lambda state, x: step(state, x, W), initial=s))[1:])

    for L, w, B in sizes:
        generator = torch.Generator().manual_seed(3)
        W = (torch.randn(w, w, generator=generator) / (2 * w**0.5)).to(device)
        xs = torch.randn(L, B, w, generator=generator).to(device)
        s0 = torch.zeros(B, w, device=device)
        blocks = L * B * w * w * 4
        memory = budget.device_memory(device)
        device_memory = budget.device_memory
        if memory is None or blocks * spec.DEVICE_MEMORY_SHARE <= memory:  # --smoke: a device that holds L / 4
            budget.device_memory = lambda _: blocks * spec.DEVICE_MEMORY_SHARE // 4
        try:
            with torch.no_grad():
                want = loop(s0, xs, W)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                got, stats = seqpar.solve_chain(step, s0, xs, (W,), jacobian="full", return_stats=True)
                peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
                forward = (timed(lambda: loop(s0, xs, W), device, repeats),
                           timed(lambda: seqpar.solve_chain(step, s0, xs, (W,), jacobian="full"), device, repeats))
            Wg = W.clone().requires_grad_()

            def train(solve):
                solve()[-1].square().sum().backward()
                Wg.grad = None

            training = (timed(lambda: train(lambda: loop(s0, xs, Wg)), device, repeats),
                        timed(lambda: train(lambda: seqpar.solve_chain(step, s0, xs, (Wg,), jacobian="full",
                                                                       adjoint="parallel")), device, repeats))
        finally:
            budget.device_memory = device_memory
        window = stats.window or L
        held = "-" if peak is None else f"{peak / 2**30:.2f} GiB = {peak * L / (window * blocks):.1f}x its blocks"
        yield {"row": "memory", "case": f"L={L} w={w} B={B} ({blocks / 2**30:.1f} GiB of blocks)",
               "baseline": "eager loop", "forward_s": forward, "train_s": training,
               "rel_err": relative_error(got, want), "window": window,
               "memory": f"window {window}, {stats.iterations} iterations, peak {held}"}


def diag_rows(device, sizes, repeats):
    from seqpar.runtime.pcr import solve_affine_recurrence

    def step(s, x):
        a, u = x
        return a * s + u

    for L, D in sizes:
        generator = torch.Generator().manual_seed(1)
        a = torch.rand(L, 1, D, generator=generator).mul(0.5).add(0.45).to(device)  # decays in (0.45, 0.95)
        u = torch.randn(L, 1, D, generator=generator).to(device)
        s0 = torch.zeros(1, D, device=device)

        def loop():
            s, states = s0, []
            for l in range(L):
                s = a[l] * s + u[l]
                states.append(s)
            return torch.stack(states)

        with torch.no_grad():
            want = loop()
            got = seqpar.solve_chain(step, s0, (a, u), jacobian="diag")
            times = (timed(loop, device, repeats),
                     timed(lambda: seqpar.solve_chain(step, s0, (a, u), jacobian="diag"), device, repeats),
                     timed(lambda: solve_affine_recurrence(a, u, "diag"), device, repeats))
        yield {"row": "diag", "case": f"L={L} N=1 w={D}", "baseline": "eager loop", "forward_s": times[:2],
               "scan_kernel_s": times[2], "rel_err": relative_error(got, want)}


def gru_rows(device, sizes, repeats):
    for T in sizes:
        torch.manual_seed(2)
        gru = nn.GRU(16, 16, batch_first=True).to(device).eval()
        x = torch.randn(1, T, 16, device=device)
        torch._dynamo.reset()
        compile_start = time.perf_counter()
        compiled = torch.compile(seqpar.scan_rnn(gru), backend="seqpar")
        with torch.no_grad():
            got = compiled(x)[0]
            compile_seconds = time.perf_counter() - compile_start
            want = gru(x)[0]
            times = (timed(lambda: gru(x), device, repeats), timed(lambda: compiled(x), device, repeats))
        yield {"row": "gru", "case": f"T={T} hidden=16 B=1", "baseline": "nn.GRU (cuDNN on CUDA)",
               "forward_s": times, "compile_s": compile_seconds, "rel_err": relative_error(got, want)}


def diffusion_rows(device, sizes, repeats):
    from diffusion_sampling import loop_as_chain  # needs diffusers (seqpar.testing.sampling builds the tiny UNet)
    from seqpar.testing.sampling import sampling_loop

    for T in sizes:
        loop = sampling_loop("ddpm", "unet", T)
        model = loop.model.to(device, torch.float32).eval()  # the tests build it in float64
        step, s0, xs, shared = loop_as_chain(loop.sched, model, loop.x.to(device, torch.float32),
                                             loop.noise.to(device, torch.float32))
        xs = pytree.tree_map(lambda tensor: tensor.to(device), xs)

        def sequential():
            return seqpar.solve_chain(step, s0, xs, shared, forward="sequential")

        def picard():
            return seqpar.solve_chain(step, s0, xs, shared, jacobian="identity", window=32, tol=1e-5)

        with torch.no_grad():
            want, got = sequential(), picard()
            times = (timed(sequential, device, repeats), timed(picard, device, repeats))
        yield {"row": "diffusion", "case": f"DDPM tiny UNet T={T} window 32", "baseline": "sequential loop",
               "forward_s": times, "rel_err": relative_error(got[-1], want[-1])}


def fused_rows(device, sizes, repeats):
    from seqpar.backend import SeqparBackend
    from seqpar.testing.models import SelectiveScan

    for L, d, n in sizes:
        torch.manual_seed(3)
        model = SelectiveScan(d=d, n=n).to(device).eval()
        x = torch.randn(1, L, d, device=device)
        torch._dynamo.reset()
        backend = SeqparBackend({})
        compiled = torch.compile(model, backend=backend)
        with torch.no_grad():
            compile_start = time.perf_counter()
            compiled(x)
            compile_seconds = time.perf_counter() - compile_start
            past_trials(lambda: compiled(x), backend)  # the loop's and the graph's speed trials
            got, want = compiled(x), model(x)
            times = (timed(lambda: model(x), device, repeats), timed(lambda: compiled(x), device, repeats))
        loops = [program.loop for graph in backend.graphs for _, program in graph.programs]
        yield {"row": "fused", "case": f"Mamba loop L={L} d={d} n={n} B=1 (loop: {', '.join(loops) or 'none'})",
               "baseline": "eager loop", "forward_s": times, "compile_s": compile_seconds,
               "rel_err": relative_error(got, want)}


def autocast_rows(device, sizes, repeats):
    from seqpar.backend import SeqparBackend
    from seqpar.testing.models import deep_mlp

    for L, w, B in sizes:
        model, (x,) = deep_mlp(depth=L, width=w, batch=B)
        model, x = model.to(device), x.to(device)
        with torch.no_grad():
            exact = model(x)
        torch._dynamo.reset()
        backend = SeqparBackend({})
        compiled = torch.compile(model, backend=backend)

        def forward(fn):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                return fn(x).float()

        def train(fn):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = fn(x)
            out.float().square().mean().backward()
            model.zero_grad(set_to_none=True)

        past_trials(lambda: forward(compiled), backend)  # the fused loop's trials, then the graphs' speed trials
        past_trials(lambda: train(compiled), backend)
        got, want = forward(compiled), forward(model)
        times = (timed(lambda: forward(model), device, repeats), timed(lambda: forward(compiled), device, repeats))
        train_times = (timed(lambda: train(model), device, repeats), timed(lambda: train(compiled), device, repeats))
        yield {"row": "autocast", "case": f"deep MLP L={L} w={w} B={B} in bfloat16 autocast", "baseline": "eager",
               "forward_s": times, "train_s": train_times, "rel_err": relative_error(got, exact),
               "eager_err": relative_error(want, exact)}


def cudagraph_rows(device, sizes, repeats):
    from seqpar.backend import SeqparBackend
    from seqpar.testing.models import deep_mlp

    for L, w, B in sizes:
        model, _ = deep_mlp(depth=L, width=w, batch=B)
        model = model.to(device)
        energy = lambda x: model(torch.sin(x)).square().sum(-1)  # noqa: E731  (compute around the chain)
        torch._dynamo.reset()
        compiled = torch.compile(energy, backend=SeqparBackend({"mode": "reduce-overhead", "policy": "parallel"}))
        generator = torch.Generator().manual_seed(5)
        inputs = [(torch.randn(B, w, generator=generator) * scale).to(device) for scale in (1, 3, 0.1, 2, 0.5, 1)]
        with torch.no_grad():
            errors = [relative_error(compiled(x).clone(), energy(x)) for x in inputs]
            x = inputs[0]
            times = (timed(lambda: energy(x), device, repeats), timed(lambda: compiled(x), device, repeats))
        yield {"row": "cudagraphs", "case": f"deep MLP L={L} w={w} B={B}, mode reduce-overhead, chain parallel",
               "baseline": "eager", "forward_s": times, "rel_err": max(errors)}


def distributed_rows(device, sizes, repeats):
    import torch.distributed as dist

    import seqpar.distributed as sd

    def step(s, x):
        return torch.tanh(torch.nn.functional.linear(s, x[0], x[1]))

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    try:
        for L, w in sizes:
            generator = torch.Generator().manual_seed(4)
            W = (torch.randn(L, w, w, generator=generator) * 0.9 / w**0.5).to(device)
            b = (torch.randn(L, w, generator=generator) * 0.1).to(device)
            s0 = torch.randn(1, w, generator=generator).to(device)
            with torch.no_grad():
                want, got = seqpar.solve_chain(step, s0, (W, b)), sd.solve_chain(step, s0, (W, b))
                times = (timed(lambda: seqpar.solve_chain(step, s0, (W, b)), device, repeats),
                         timed(lambda: sd.solve_chain(step, s0, (W, b)), device, repeats))
            yield {"row": "distributed", "case": f"one rank ({dist.get_backend()}) L={L} w={w} B=1",
                   "baseline": "seqpar.solve_chain", "forward_s": times, "rel_err": relative_error(got, want)}
    finally:
        dist.destroy_process_group()


# In order of value per second: rows not started when the budget is spent are skipped (diffusion is the longest).
ROWS = {"mlp": mlp_rows, "diag": diag_rows, "fused": fused_rows, "gru": gru_rows, "autocast": autocast_rows,
        "memory": memory_rows, "distributed": distributed_rows, "cudagraphs": cudagraph_rows,
        "diffusion": diffusion_rows}


def table(results: list[dict]) -> str:
    lines = ["| row | case | baseline | baseline ms | seqpar ms | ratio | train: baseline / seqpar ms (ratio) | "
             "other | rel. error |", "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        if "error" in result:
            lines.append(f"| {result['row']} | {result['case']} | - | - | - | - | - | failed: {result['error']} | - |")
            continue
        base, ours = result["forward_s"]
        train = "-"
        if "train_s" in result:
            tb, ts = result["train_s"]
            train = f"{tb * 1e3:.2f} / {ts * 1e3:.2f} ({tb / ts:.2f}x)"
        other = []
        if "scan_kernel_s" in result:
            other.append(f"scan kernel {result['scan_kernel_s'] * 1e3:.3f} ms")
        if "compile_s" in result:
            other.append(f"compile {result['compile_s']:.0f} s")
        if "memory" in result:
            other.append(result["memory"])
        if "eager_err" in result:
            other.append(f"eager's error {result['eager_err']:.1e}")
        lines.append(f"| {result['row']} | {result['case']} | {result['baseline']} | {base * 1e3:.2f} | "
                     f"{ours * 1e3:.2f} | **{base / ours:.2f}x** | {train} | {'; '.join(other) or '-'} | "
                     f"{result['rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/gpu")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (checks the script; times mean nothing)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=360.0, help="seconds; rows not started by then are skipped")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --device cpu --smoke to check the script)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = SIZES["smoke" if args.smoke else "full"]
    began = time.perf_counter()
    results = []
    for name in args.rows:
        if time.perf_counter() - began > args.budget:
            results.append({"row": name, "case": "all", "error": f"skipped: the {args.budget:g} s budget was spent"})
            continue
        try:
            for result in ROWS[name](device, sizes[name], args.repeats):
                results.append(result)
                print(table([result]).splitlines()[-1], flush=True)
        except Exception as error:  # one row's failure must not cost the others their minutes
            traceback.print_exc()
            results.append({"row": name, "case": "all", "error": f"{type(error).__name__}: {str(error)[:200]}"})
    described = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "smoke": args.smoke,
        "seconds": round(time.perf_counter() - began, 1),
    }
    try:
        import triton

        described["triton"] = triton.__version__
    except ImportError:
        described["triton"] = None
    header = ", ".join(f"{key} {value}" for key, value in described.items())
    (out / "table.md").write_text(f"{header}\n\n{table(results)}")
    (out / "raw.json").write_text(json.dumps({**described, "results": results}, indent=2, default=str))
    print(f"\n{header}\n\n{table(results)}")
    failed = [result for result in results if "error" in result and not result["error"].startswith("skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
