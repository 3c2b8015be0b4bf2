"""The predictability probe: each chain's largest Lyapunov exponent, from real values at compile time.

"Predictability enables parallelization" (Gonzalez, Kozachkov et al. 2025):
a chain whose largest Lyapunov exponent ``lambda`` is positive amplifies
perturbations like ``exp(lambda L)``, so Newton's linearisation fails there
and the chain should stay sequential. :func:`probe_values` runs the original
graph once on copies of the example inputs (parameters excepted) and keeps
the values the chains read;
:func:`lyapunov_exponent` estimates ``lambda`` along the chain's own
trajectory (:func:`seqpar.runtime.lyapunov.largest_lyapunov_exponent`).
Failures are expected (ops without forward-mode derivatives, fake example
inputs) and cost only the estimate: one INFO line, details at DEBUG.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from ..runtime.lyapunov import largest_lyapunov_exponent, log_probe_failure
from ..runtime.precision import copied
from .chain import Chain, map_state, state_leaves
from .inputs import stacked_inputs
from .module_paths import span
from .lower import state_layout

# The probe averages over at most this many steps (one JVP each, at compile time).
PROBE_STEPS = 256


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps the values of the nodes named in ``wanted`` (detached)."""

    def __init__(self, gm: fx.GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, node):
        result = super().run_node(node)
        if node.name in self.wanted:
            self.values[node.name] = result.detach() if isinstance(result, torch.Tensor) else result
        return result


def probe_values(gm: fx.GraphModule, example_inputs, chains: list[Chain]) -> dict:
    """Real values of the nodes the probe needs (by node name), from one run of the original graph; ``{}`` where
    the inputs are fake or the run fails."""
    if any(isinstance(value, FakeTensor) for value in example_inputs):
        return {}
    wanted = {node.name for chain in chains for node in [*state_leaves(chain.start), *chain.shared]}
    wanted |= {node.name for chain in chains for item in chain.per_step for node in item.nodes}
    recorder = _Recorder(gm, wanted)
    try:
        with torch.no_grad():  # the random streams: Dynamo restores them after a compile
            recorder.run(*copied(example_inputs))
    except Exception as error:
        log_probe_failure("skipped, the graph failed on the example inputs", error)
        return {}
    return recorder.values


def lyapunov_exponent(chain: Chain, values: dict) -> float | None:
    """The probe's estimate for ``chain``, or None without values or where the estimate fails."""
    if not values or any(node.name not in values for node in state_leaves(chain.start)):
        return None
    # The graph's code itself: GraphModule.__call__ prints the generated code and the traceback
    # of any error to stderr (torch.fx _WrappedCall), and the probe's errors are expected.
    step = chain.step.forward
    try:
        layout = state_layout(chain)  # the probe runs on the packed state (N, w), one tensor for a tuple state too
        state = layout.pack(map_state(lambda node: values[node.name], chain.start))
        xs = stacked_inputs(
            chain, lambda node: values[node.name], lambda nodes: torch.stack([values[node.name] for node in nodes]),
            state.device,
        )
        shared = [values[node.name] for node in chain.shared]
        return largest_lyapunov_exponent(
            lambda s, x, sh: layout.pack(step(layout.unpack(s), *x, *sh)), chain.length, state, xs, shared,
            max_steps=PROBE_STEPS,
        )
    except Exception as error:
        log_probe_failure(f"failed for chain at {span(chain.modules)}", error)
        return None
