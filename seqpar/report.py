"""Plain records of what the backend did: per chain, per graph, per compile."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

from .passes.module_paths import span


@dataclass
class ChainReport:
    """One chain as ``seqpar.explain`` and the debug dump show it.

    ``kind``: "layers", "residual", "denoise", "recurrent" or "transformer";
    ``decision``: "parallel" (a direction solved in parallel), "sequential",
    "rejected" or "distributed" (a ``seqpar.distributed.LayerParallel`` stack,
    solved across ranks outside the compiled graph); ``method``/``adjoint``: forward and backward solves;
    ``form``: "solver", "rolled", "unrolled", "scan" (a ``scan`` call left
    to the inner backend) or "" for rejected ones; ``origin``: "unrolled"
    (segments of a loop Dynamo unrolled) or "scan" (one ``scan`` call);
    ``stats``: the last solve's :class:`~seqpar.runtime.stats.SolveStats` as a
    dict (``None`` before the first call), and ``step_cost``: what the chosen
    form cost per step on that call, and whether it was measured
    (:func:`step_cost_text`); both are read from ``last_solve`` when asked
    for, so a compiled call does no reporting work. ``outputs``: how many
    per-step outputs the chain serves besides its states (values each step
    computes that are read after the chain); ``step_code`` and
    ``output_code``: the step's graph and the per-step outputs' (the debug
    dump writes them beside the graphs).
    """

    kind: str
    length: int
    state_shape: tuple | None  # the state's shape, or a tuple of shapes for a tuple state
    modules: list[str]
    decision: str
    reason: str
    jacobian: str = ""
    method: str = ""
    adjoint: str = ""
    form: str = ""
    lyapunov: float | None = None
    origin: str = "unrolled"
    outputs: int = 0
    step_code: str = field(default="", repr=False)
    output_code: str = field(default="", repr=False)
    last_solve: Callable[[], object] | None = field(default=None, repr=False, compare=False)

    @property
    def stats(self) -> dict | None:
        solve = self.last_solve() if self.last_solve is not None else None
        return None if solve is None else dict(vars(solve))

    @property
    def step_cost(self) -> str:
        return step_cost_text(self.form, self.stats)

    def as_dict(self) -> dict:
        """The report's fields and its ``stats`` and ``step_cost``, as plain values (the debug dump's JSON)."""
        values = {item.name: getattr(self, item.name) for item in fields(self)
                  if item.name not in ("last_solve", "step_code", "output_code")}
        return {**values, "stats": self.stats, "step_cost": self.step_cost}


def step_cost_text(form: str, stats: dict | None) -> str:
    """Per-step cost of a chain's form, from its last solve's stats (``seconds``, ``loop``, ``length``).

    ``"rolled: 4.1 us per step (generated loop; measured on the last call)"``,
    ``"solver: 0.6 us per step (7 parallel iterations, parameters stacked; measured ...)"``;
    a form whose steps run in the inner backend's code (``"unrolled"``,
    ``"scan"``) is not measured by seqpar, and says so.
    """
    if form in ("unrolled", "scan"):
        return f"{form}: not measured (the steps run in the inner backend's code)"
    if not stats or not stats.get("seconds") or not stats.get("length"):
        return ""
    per_step = stats["seconds"] / stats["length"] * 1e6
    how = {"generated": "generated loop", "step calls": "the step called per step",
           "compiled": "compiled C loop", "fused": "step compiled by inductor"}.get(stats.get("loop", ""), "")
    if not how and stats.get("iterations"):
        how = f"{stats['iterations']} parallel iterations, parameters stacked"
    what = f"{how}; " if how else ""
    return f"{form}: {per_step:.3g} us per step ({what}measured on the last call)"


def shape_text(state_shape: tuple | None) -> str:
    """``4x8`` for one tensor, ``(4x8, 4x8)`` for a tuple state, ``-`` when unknown."""
    if not state_shape:
        return "-"
    if all(isinstance(shape, tuple) for shape in state_shape):
        return "(" + ", ".join("x".join(map(str, shape)) or "scalar" for shape in state_shape) + ")"
    return "x".join(map(str, state_shape))


def format_table(chains: list[ChainReport]) -> str:
    """A fixed-width table of chains, one line each, reasons last."""
    if not chains:
        return "no chains found"
    header = ("#", "kind", "L", "state", "outputs", "modules", "decision", "fwd", "bwd", "form", "jacobian")
    rows = []
    for index, chain in enumerate(chains):
        modules = span(chain.modules)
        rows.append((
            str(index), chain.kind, str(chain.length), shape_text(chain.state_shape), str(chain.outputs or "-"),
            modules, chain.decision, chain.method or "-", chain.adjoint or "-", chain.form or "-", chain.jacobian or "-",
        ))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.append("")
    lines += [f"[{index}] {chain.reason}" + (f"; {chain.step_cost}" if chain.step_cost else "")
              for index, chain in enumerate(chains)]
    return "\n".join(lines)


# More graphs than this for one call suggest a loop broken into pieces.
FRAGMENTED_GRAPHS = 8
# Unrolled chains from this length on took Dynamo long to trace (~1 s per 100 blocks, seconds per UNet call).
LONG_UNROLLED = {"layers": 256, "residual": 256, "transformer": 64, "denoise": 100}


def hints_for(chains: list[ChainReport], graph_count: int) -> list[str]:
    """What the user could change, from the chains of ``graph_count`` graphs compiled for one function:
    a call split into many graphs (a sampling loop whose scheduler breaks the graph), and long chains that
    reached the backend unrolled (the rolled way to write them, which Dynamo traces once; for blocks, also
    torch's guard filter against the per-call guards on every parameter)."""
    hints = []
    if graph_count >= FRAGMENTED_GRAPHS:
        hints.append(
            f"the call was split into {graph_count} graphs (graph breaks): no backend sees a loop that "
            "arrives in pieces. For diffusers sampling loops wrap the scheduler with "
            "seqpar.diffusion.traceable(scheduler); torch._dynamo.explain(fn)(...) lists the breaks."
        )
    for index, chain in enumerate(chains):
        if chain.origin != "unrolled" or chain.length < LONG_UNROLLED.get(chain.kind, float("inf")):
            continue
        if chain.kind == "denoise":
            hints.append(
                f"chain {index}: Dynamo traced {chain.length} denoiser calls one by one; "
                "sched.scan_loop(denoiser, x, noise=...) on a seqpar.diffusion.traceable scheduler runs the same "
                "loop as scans, so Dynamo traces the denoiser once"
            )
        else:
            hints.append(
                f"chain {index}: Dynamo traced {chain.length} blocks one by one, and guards every parameter at "
                "every call; seqpar.scan_layers(blocks) runs identical blocks as one scan over their stacked "
                "parameters, so Dynamo traces one block and guards two tensors; or keep the blocks and pass "
                "options={'guard_filter_fn': torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe} (torch's "
                "opt-in: no recompile when a parameter's shape, dtype or requires_grad changes)"
            )
    return hints


@dataclass
class Report:
    """What ``seqpar.explain`` found: ``chains`` over all compiled graphs, and hints."""

    chains: list[ChainReport] = field(default_factory=list)
    graph_count: int = 0
    hints: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"seqpar: {self.graph_count} graph(s), {len(self.chains)} chain(s)\n" + format_table(self.chains)
        if self.hints:
            text += "\n" + "\n".join(f"hint: {hint}" for hint in self.hints)
        return text
