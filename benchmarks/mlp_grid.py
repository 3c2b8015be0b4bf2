"""DeepPCR's MLP grid on CPU: seqpar's parallel chain solve against the sequential loop.

The chain is ``s_l = tanh(W_l s_{l-1} + b_l)``, ``l = 1..L``, with ``W_l ~ N(0, g^2 / w)``
(gain ``g``), ``b_l ~ N(0, 0.1^2)`` and ``s_0 ~ N(0, 1)`` of shape ``(B, w)``; the
loss is ``sum(s_L^2)``. Modes:

* ``forward``: all states, no autograd (``torch.no_grad``);
* ``backward``: ``loss.backward()`` alone, after an untimed forward;
* ``train``: forward and backward together (one training step without the optimizer).

The sequential baseline is the eager loop over per-layer parameter tensors
(``F.linear`` + ``tanh``, what ``nn.Sequential`` of ``nn.Linear`` does); with
``--inductor`` also that loop compiled by ``torch.compile`` (inductor), whose
compile time is recorded: unrolled up to ``--inductor-max-L`` layers, beyond
that the rolled loop (``torch``'s ``scan`` over the stacked parameters; the
unrolled graph takes inductor minutes from L ~ 512), marked in the table.
seqpar is ``seqpar.runtime.solve_chain`` on the stacked ``W`` (``(L, w, w)``)
and ``b`` (``(L, w)``).

Reported per configuration: median times (``time.perf_counter``, after warm-up),
ratio = sequential time / seqpar time (> 1: seqpar is faster), Newton steps,
the largest error against the float64 sequential loop (states for ``forward``,
gradients relative to their largest entry otherwise), the same error of the
float32 sequential loop itself (on a chaotic chain, gain 2 at larger widths,
both are O(1): rounding differences grow like ``e^{lambda l}``, and no float32
computation follows the float64 trajectory), and, for the training
step, the peak of live CPU tensor memory during one call, from the torch
profiler's memory timeline (inputs included; not the process RSS; profiling the
sequential loop at L = 4096 takes about a minute: ``--no-memory`` skips it).

Example::

    .venv/bin/python benchmarks/mlp_grid.py --L 1024 4096 --w 2 4 --B 1 --gain 1 --modes forward backward
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch._higher_order_ops.scan import scan  # noqa: E402

from seqpar.runtime import solve_chain  # noqa: E402
from timing import median_time  # noqa: E402

MODES = ("forward", "backward", "train", "train-hybrid")
OUT = Path(__file__).resolve().parent / "out"


def step(s, x):
    """One layer on the stacked parameters: ``tanh(s W_l^T + b_l)``."""
    weight, bias = x
    return torch.tanh(s @ weight.transpose(-1, -2) + bias)


def sequential(s0, weights, biases):
    """The eager loop over per-layer tensors; returns ``s_L``."""
    s = s0
    for weight, bias in zip(weights, biases):
        s = torch.tanh(F.linear(s, weight, bias))
    return s


def sequential_states(s0, weights, biases):
    """All states of the eager loop, stacked: ``(L, B, w)``."""
    states, s = [], s0
    for weight, bias in zip(weights, biases):
        s = torch.tanh(F.linear(s, weight, bias))
        states.append(s)
    return torch.stack(states)


@dataclass
class Problem:
    L: int
    w: int
    B: int
    gain: float
    s0: torch.Tensor
    W: torch.Tensor  # (L, w, w)
    b: torch.Tensor  # (L, w)

    @classmethod
    def make(cls, L, w, B, gain, seed=0):
        generator = torch.Generator().manual_seed(seed)
        W = torch.randn(L, w, w, generator=generator, dtype=torch.float64) * (gain / math.sqrt(w))
        b = torch.randn(L, w, generator=generator, dtype=torch.float64) * 0.1
        s0 = torch.randn(B, w, generator=generator, dtype=torch.float64)
        return cls(L, w, B, gain, s0, W, b)

    def leaves(self, dtype, grad):
        """``(s0, W, b, per-layer W list, per-layer b list)`` as fresh leaf tensors."""
        s0, W, b = (t.to(dtype).clone().requires_grad_(grad) for t in (self.s0, self.W, self.b))
        Ws = [w.clone().requires_grad_(grad) for w in W.detach().unbind(0)]
        bs = [v.clone().requires_grad_(grad) for v in b.detach().unbind(0)]
        return s0, W, b, Ws, bs


def peak_memory(fn):
    """Peak bytes of live CPU tensors during ``fn()`` (torch profiler memory timeline)."""
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
            fn()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
        return max((sum(s) for s in sizes), default=0)
    except Exception:  # private API: report nothing rather than fail the benchmark
        return None


@dataclass
class Row:
    L: int
    w: int
    B: int
    gain: float
    mode: str
    t_seq: float
    t_par: float
    iters: int
    error: float
    error_seq: float = float("nan")  # the float32 sequential loop's own error, same measure
    t_ind: float | None = None
    inductor_form: str = ""
    compile_s: float | None = None
    mem_seq: int | None = None
    mem_par: int | None = None
    fallback: bool = False
    notes: list = field(default_factory=list)

    @property
    def ratio(self):
        return self.t_seq / self.t_par

    @property
    def ratio_ind(self):
        return None if self.t_ind is None else self.t_ind / self.t_par


def rolled_sequential(s0, W, b):
    """The sequential loop as ``torch``'s ``scan`` over the stacked parameters; returns ``s_L``.

    Written as inductor (torch 2.13) accepts it: the body's carry and output
    are distinct tensors ("+ 0", "* 1"; equal ones fail its aliasing check),
    and it is compiled with ``fullgraph=True`` (without, inductor's while-loop
    lowering of the scan raises a data-dependent error).
    """

    def layer(s, parameters):
        weight, bias = parameters
        s = torch.tanh(s @ weight.T + bias)
        return s + 0, s * 1

    return scan(layer, s0, (W, b))[0]


def inductor_baseline(mode, s0, W, b, Ws, bs, max_unrolled):
    """(the timed call of the inductor-compiled sequential loop, its form).

    Up to ``max_unrolled`` layers the per-layer loop is compiled unrolled (what
    ``torch.compile`` does to an ``nn.Sequential``; inductor takes minutes from
    L ~ 512 on); beyond, the rolled loop (:func:`rolled_sequential`, compiled in seconds).
    """
    if W.shape[0] <= max_unrolled:
        compiled = torch.compile(sequential, backend="inductor", dynamic=False)
        form, last = "unrolled", lambda: compiled(s0, Ws, bs)
    else:
        compiled = torch.compile(rolled_sequential, backend="inductor", dynamic=False, fullgraph=True)
        form, last = "rolled", lambda: compiled(s0, W, b)
    if mode == "forward":
        def call():
            with torch.no_grad():
                last()
    elif mode == "backward":
        def call():
            loss = last().square().sum()
            start = time.perf_counter()
            loss.backward()
            return time.perf_counter() - start
    else:
        def call():
            last().square().sum().backward()
    return call, form


def state_error(states, reference) -> float:
    """Largest absolute difference from the float64 loop's states."""
    return float((states.double() - reference["states"]).abs().max())


def gradient_error(grads, reference) -> float:
    """Largest difference from the float64 loop's gradients of ``(s0, W, b)``, relative to each one's largest entry."""
    return max(
        float((mine.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        for mine, ref in zip(grads, reference["grads"])
    )


def run_config(problem: Problem, modes, args, reference):
    rows = []
    dtype = torch.float32
    jacobian = args.jacobian
    for mode in modes:
        grad = mode != "forward"
        # "train-hybrid": the sequential loop forward (inside the op) and the parallel
        # adjoint backward, as the backend's CPU policy runs a training step.
        forward = "sequential" if mode == "train-hybrid" else "parallel"
        s0, W, b, Ws, bs = problem.leaves(dtype, grad)

        if mode == "forward":
            def seq_call():
                with torch.no_grad():
                    sequential(s0, Ws, bs)

            def par_call():
                with torch.no_grad():
                    solve_chain(step, s0, (W, b), jacobian=jacobian)
        elif mode == "backward":
            def seq_call():
                loss = sequential(s0, Ws, bs).square().sum()
                start = time.perf_counter()
                loss.backward()
                return time.perf_counter() - start

            def par_call():
                loss = solve_chain(step, s0, (W, b), jacobian=jacobian)[-1].square().sum()
                start = time.perf_counter()
                loss.backward()
                return time.perf_counter() - start
        else:
            def seq_call():
                sequential(s0, Ws, bs).square().sum().backward()

            def par_call():
                solve_chain(step, s0, (W, b), jacobian=jacobian, forward=forward)[-1].square().sum().backward()

        t_par = median_time(par_call, args.repeats, warmup=2)
        t_seq = median_time(seq_call, args.repeats, warmup=1)

        # Newton steps, and the errors of seqpar and of the float32 sequential loop against the float64 loop.
        if mode == "forward":
            with torch.no_grad():
                states, stats = solve_chain(step, s0, (W, b), jacobian=jacobian, return_stats=True)
                error = state_error(states, reference)
                error_seq = state_error(sequential_states(s0, Ws, bs), reference)
        else:
            states, stats = solve_chain(
                step, s0, (W, b), jacobian=jacobian, forward=forward, return_stats=True
            )
            error = gradient_error(torch.autograd.grad(states[-1].square().sum(), (s0, W, b)), reference)
            loss = sequential(s0, Ws, bs).square().sum()
            grads = torch.autograd.grad(loss, (s0, *Ws, *bs))
            length = problem.L
            per_layer = (grads[0], torch.stack(grads[1 : 1 + length]), torch.stack(grads[1 + length :]))
            error_seq = gradient_error(per_layer, reference)
        row = Row(problem.L, problem.w, problem.B, problem.gain, mode, t_seq, t_par, stats.iterations, error,
                  error_seq=error_seq, fallback=stats.fallback is not None)

        if args.inductor:
            ind_call, row.inductor_form = inductor_baseline(mode, s0, W, b, Ws, bs, args.inductor_max_L)
            torch._dynamo.reset()
            start = time.perf_counter()
            ind_call()
            row.compile_s = time.perf_counter() - start
            row.t_ind = median_time(ind_call, args.repeats, warmup=1)

        if mode.startswith("train") and not args.no_memory:  # the training step's peak bounds the other modes'
            row.mem_seq = peak_memory(seq_call)
            row.mem_par = peak_memory(par_call)
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def reference_of(problem: Problem):
    """float64 sequential states and gradients of ``sum(s_L^2)`` w.r.t. ``(s0, W, b)``."""
    s0, W, b, _, _ = problem.leaves(torch.float64, True)
    states = sequential_states(s0, W.unbind(0), b.unbind(0))
    grads = torch.autograd.grad(states[-1].square().sum(), (s0, W, b))
    return {"states": states.detach(), "grads": grads}


HEADER = (
    "| L | w | B | gain | mode | sequential ms | seqpar ms | ratio | inductor ms | ratio vs inductor "
    "| compile s | Newton steps | max error | sequential's error | peak MB seq / seqpar |"
)
RULE = "|" + "---|" * 15


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def format_row(row: Row) -> str:
    mem = (
        "-"
        if row.mem_seq is None or row.mem_par is None
        else f"{row.mem_seq / 2**20:.3g} / {row.mem_par / 2**20:.3g}"
    )
    steps = f"{row.iters}" + (" (fallback)" if row.fallback else "")
    return (
        f"| {row.L} | {row.w} | {row.B} | {row.gain:g} | {row.mode} | {row.t_seq * 1e3:.2f} | {row.t_par * 1e3:.2f} "
        f"| **{row.ratio:.2f}** | {_fmt(None if row.t_ind is None else row.t_ind * 1e3, '.2f')} "
        f"| {_fmt(row.ratio_ind, '.2f')}{' (' + row.inductor_form + ')' if row.inductor_form else ''} | {_fmt(row.compile_s, '.1f')} | {steps} "
        f"| {row.error:.1e} | {row.error_seq:.1e} | {mem} |"
    )


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r.mode == m for r in rows)]
    batches = sorted({r.B for r in rows})
    gains = sorted({r.gain for r in rows})
    gain = 1.0 if 1.0 in gains else gains[0]
    fig, axes = plt.subplots(len(modes), len(batches), figsize=(5 * len(batches), 3.6 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            for w in sorted({r.w for r in rows}):
                points = sorted((r.L, r.ratio) for r in rows if r.mode == mode and r.B == batch and r.w == w and r.gain == gain)
                if points:
                    ax.plot(*zip(*points), marker="o", label=f"w={w}")
            ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("L (layers)")
            ax.set_ylabel("sequential / seqpar")
            ax.set_title(f"{mode}, B={batch}, gain={gain:g}")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--L", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--w", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--B", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--gain", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--jacobian", choices=("auto", "full", "diag", "identity"), default="auto")
    parser.add_argument("--quick", action="store_true", help="L 256 1024, w 2 4, B 1, gain 1, 3 repeats, no memory")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--inductor", action="store_true", help="also time the torch.compile'd sequential loop")
    parser.add_argument(
        "--inductor-max-L", type=int, default=256, help="largest L compiled unrolled with --inductor (rolled above)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--out", type=Path, default=OUT, help="directory for the table and the plot")
    parser.add_argument("--name", default="mlp_grid", help="file name stem in --out")
    args = parser.parse_args(argv)
    if args.quick:
        args.L, args.w, args.B, args.gain = [256, 1024], [2, 4], [1], [1.0]
        args.repeats, args.no_memory = 3, True
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    print(f"# seqpar MLP grid: torch {torch.__version__}, {threads} threads, float32, jacobian={args.jacobian}")
    print(HEADER)
    print(RULE, flush=True)
    rows = []
    for L in args.L:
        for w in args.w:
            for B in args.B:
                for gain in args.gain:
                    problem = Problem.make(L, w, B, gain)
                    rows += run_config(problem, args.modes, args, reference_of(problem))

    args.out.mkdir(parents=True, exist_ok=True)
    table = "\n".join([HEADER, RULE, *map(format_row, rows)])
    command = "python benchmarks/mlp_grid.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (args.out / f"{args.name}.md").write_text(
        f"`{command}` ({threads} threads, torch {torch.__version__})\n\n{table}\n"
    )
    try:
        plot(rows, args.out / f"{args.name}.png")
    except Exception as error:  # the table matters more than the picture
        print(f"plot failed: {error}", file=sys.stderr)
    print()
    print(table)


if __name__ == "__main__":
    main()
