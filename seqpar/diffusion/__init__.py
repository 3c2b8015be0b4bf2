"""Traceable adapters for diffusers schedulers (plain torch).

diffusers' schedulers break Dynamo's graph at every denoising step: they look up
the step by value (``nonzero``, ``.item()``), branch on tensor values
(``prev_t >= 0``, ``s_tmin <= sigma``) and keep a step index that starts as
``None``. ``traceable(scheduler)`` wraps one and gives the user's unchanged loop

    for t in sched.timesteps:
        x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample

as ONE Dynamo graph, with the same numbers as the wrapped scheduler:

* ``set_timesteps`` calls the wrapped scheduler's own ``set_timesteps`` and then
  precomputes every per-step coefficient as a float32 table of shape ``(T,)``
  (``T = len(timesteps)``), each entry computed with the same 0-d float32
  operations diffusers runs inside ``step``, so the values are bit-identical and
  the final step's coefficients (final alpha, final sigma) are the scheduler's own.
* The step is found by position, not by value: a Python ``int`` counter that
  ``step`` advances (diffusers' Euler schedulers do the same with
  ``_step_index``). Dynamo unrolls it with the loop, so every coefficient lookup
  is ``table[i]`` with a constant ``i`` and every "does this step draw noise"
  decision is static Python. The counter starts at ``begin_index`` (0, or
  ``set_begin_index(k)`` for a schedule entered part-way), returns to it after
  the last step (so a loop can run again, and a compiled loop's guard still
  holds), and is reset by ``set_timesteps``. Eagerly (not while compiling) each
  ``step`` checks that ``t == timesteps[i]`` and raises otherwise.
* ``step`` keeps the expressions diffusers evaluates in the same order and the
  same dtypes (coefficients stay 0-d float32 tensors; Euler computes in float32
  like diffusers), hence equal results, not merely close ones.

Noise. Stochastic steps draw noise with diffusers' own ``randn_tensor`` call
(same shape, dtype, device, generator, order), so a seeded generator gives the
same samples as the raw scheduler. A ``torch.Generator`` argument cannot be
traced by Dynamo in torch 2.13 (``Failed to convert args/kwargs to proxy``: a
graph break at every draw, an error under ``fullgraph=True``). The traceable path
pre-draws all noise outside the compiled region and passes one row per step::

    noise = sched.draw_noise(x.shape, generator=g, dtype=x.dtype)   # (T, *x.shape)
    for i, t in enumerate(sched.timesteps):
        x = sched.step(eps(x, t), t, x, noise=noise[i]).prev_sample

``draw_noise`` draws in exactly the order (and only at the steps) the scheduler
would, so this loop equals the generator loop bit for bit. With no generator
and no ``noise``, steps draw from the global RNG inside the graph
(``torch.randn``): equal to eager under ``backend="eager"``; inductor needs
``torch._inductor.config.fallback_random = True`` for the same numbers.

The whole loop as scans. Dynamo traces the user's loop step by step (a UNet
takes about a second per call to trace here, so a 1000-step loop takes
about a quarter of an hour to compile). ``sched.scan_loop(denoiser, x, noise=noise)`` runs the
same loop, with the same numbers, as ``torch.ops.higher_order.scan`` over the
rows of the coefficient tables (one scan per run of positions whose static
step options agree: DDPM's last, noise-free step is a run of its own), so
Dynamo traces the denoiser once and the ``seqpar`` backend finds the scan as a
"denoise" chain.

Modules: ``base`` (``TraceableScheduler``: counter, tables, noise, the one
``step`` template and ``scan_loop``; each adapter supplies its tables and its
arithmetic ``_update``), ``ddim``, ``ddpm``, ``euler`` (with the sigma tables
both Euler adapters share), ``euler_ancestral``.
"""

from __future__ import annotations

from typing import Any

from .base import TraceableScheduler
from .ddim import TraceableDDIM
from .ddpm import TraceableDDPM
from .euler import TraceableEulerDiscrete
from .euler_ancestral import TraceableEulerAncestralDiscrete

__all__ = [
    "traceable",
    "TraceableScheduler",
    "TraceableDDIM",
    "TraceableDDPM",
    "TraceableEulerDiscrete",
    "TraceableEulerAncestralDiscrete",
]


def traceable(scheduler: Any) -> "TraceableScheduler":
    """Wrap a diffusers scheduler in its traceable adapter.

    Supported classes (exact type, not subclasses, since a subclass may change
    ``step``): ``DDIMScheduler``, ``DDPMScheduler``, ``EulerDiscreteScheduler``,
    ``EulerAncestralDiscreteScheduler``. The wrapper shares the scheduler (its
    ``set_timesteps`` is called through) and precomputes at once if the scheduler
    already has timesteps set. Raises ``ValueError`` for another class or for a
    config option the adapter does not reproduce exactly.
    """
    adapters = {cls._diffusers_name: cls for cls in _ADAPTERS}
    name = type(scheduler).__name__
    adapter = adapters.get(name)
    if adapter is None or type(scheduler).__module__.split(".")[0] != "diffusers":
        raise ValueError(
            f"seqpar.diffusion.traceable: scheduler class {type(scheduler).__module__}.{name} is not "
            f"supported; supported are diffusers' {', '.join(sorted(adapters))}. Run the loop with the "
            "scheduler itself (expect graph breaks at every step) or switch schedulers."
        )
    return adapter(scheduler)


_ADAPTERS = (TraceableDDIM, TraceableDDPM, TraceableEulerDiscrete, TraceableEulerAncestralDiscrete)
