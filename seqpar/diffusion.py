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
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._higher_order_ops.scan import scan

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


class TraceableScheduler:
    """Base adapter: position counter, precomputed tables, noise drawing.

    Attributes mirroring the scheduler: ``scheduler`` (the wrapped one),
    ``config``, ``order`` (1), ``timesteps`` (the scheduler's tensor, shape
    ``(T,)``), ``num_inference_steps`` (``T``), ``init_noise_sigma`` (the
    scheduler's value after ``set_timesteps``), ``step_index``, ``begin_index``.
    Any other attribute (``add_noise``, ``alphas_cumprod``, ...) is read from the
    wrapped scheduler.
    """

    _diffusers_name = ""
    _output_type = ("", "")  # (module, class) of the scheduler's step output
    order = 1

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler
        self.config = scheduler.config
        self._check_config()
        module, name = self._output_type
        self._output_class = getattr(importlib.import_module(module), name)
        self._table: dict[str, torch.Tensor] = {}
        self._num_steps = 0
        self._begin_index = 0
        self._step_index = 0
        self.num_inference_steps: int | None = None
        self.timesteps = scheduler.timesteps
        self.init_noise_sigma = scheduler.init_noise_sigma
        if scheduler.num_inference_steps is not None or getattr(scheduler, "custom_timesteps", False):
            self._precompute()

    def __getattr__(self, name: str) -> Any:
        # Only reached for names this object lacks; forwards the rest of the
        # scheduler API (add_noise, alphas_cumprod, sigmas, ...).
        if name == "scheduler":
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.scheduler).__name__}, steps={self.num_inference_steps})"

    # -- schedule -----------------------------------------------------------------

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        """Call the scheduler's ``set_timesteps(*args, **kwargs)``, then precompute
        the coefficient tables and reset the step counter and begin index to 0."""
        self._check_config()
        self.scheduler.set_timesteps(*args, **kwargs)
        self._begin_index = 0
        self._precompute()

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next loop at position ``begin_index`` (img2img-style partial
        schedules, as diffusers pipelines do); the counter returns here after the
        last step."""
        if not 0 <= begin_index < max(self._num_steps, 1):
            raise ValueError(f"begin_index {begin_index} is outside the {self._num_steps} timesteps")
        self._begin_index = begin_index
        self._step_index = begin_index

    @property
    def step_index(self) -> int:
        """Position of the next ``step`` in ``timesteps``."""
        return self._step_index

    @property
    def begin_index(self) -> int:
        return self._begin_index

    def _precompute(self) -> None:
        sched = self.scheduler
        self.timesteps = sched.timesteps
        self._num_steps = int(self.timesteps.shape[0])
        self.num_inference_steps = self._num_steps
        self.init_noise_sigma = sched.init_noise_sigma
        device = self.timesteps.device
        self._timestep_values = [float(t) for t in self.timesteps.tolist()]
        self._table = {name: torch.stack(values).to(device) for name, values in self._build_tables().items()}
        self._step_index = self._begin_index

    def _build_tables(self) -> dict[str, list[torch.Tensor]]:
        """Per-position coefficients, each a list of T 0-d float32 tensors."""
        raise NotImplementedError

    def _check_config(self) -> None:
        """Raise ValueError naming any config option this adapter cannot reproduce."""

    def _unsupported(self, option: str, value: Any, supported: Sequence[Any]) -> ValueError:
        return ValueError(
            f"seqpar.diffusion.traceable({self._diffusers_name}): config option {option}={value!r} is not "
            f"supported (supported: {', '.join(repr(v) for v in supported)}); use the scheduler itself for it."
        )

    # -- stepping -----------------------------------------------------------------

    def _position(self, timestep: Any) -> int:
        """The position ``i`` of the current step (a Python int, static under Dynamo)."""
        if self.num_inference_steps is None:
            raise ValueError(
                f"{type(self).__name__}: call set_timesteps(...) before step / scale_model_input"
            )
        i = self._step_index
        if not torch.compiler.is_compiling():
            self._check_eager(i, timestep)
        return i

    def _check_eager(self, i: int, timestep: Any) -> None:
        if self.scheduler.timesteps is not self.timesteps:
            raise ValueError(
                f"{type(self).__name__}: the wrapped scheduler's timesteps changed behind the adapter; call "
                "set_timesteps on the adapter (traceable(scheduler).set_timesteps(...)), not on the scheduler."
            )
        if timestep is not None:
            expected = self._timestep_values[i]
            given = float(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
            if given != expected:
                raise ValueError(
                    f"{type(self).__name__}: step expected timesteps[{i}] = {expected:g} but got {given:g}. "
                    "The traceable scheduler steps by position: call step once per entry of "
                    "sched.timesteps in order, set_timesteps(...) to restart, or set_begin_index(k) "
                    "to start part-way."
                )

    def _advance(self) -> None:
        nxt = self._step_index + 1
        self._step_index = self._begin_index if nxt == self._num_steps else nxt

    def _draws_noise(self, i: int, **step_kwargs: Any) -> bool:
        """Whether ``step`` at position ``i`` (with these step options) draws noise."""
        return False

    def draw_noise(
        self,
        shape: Sequence[int],
        generator: torch.Generator | list[torch.Generator] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        **step_kwargs: Any,
    ) -> torch.Tensor:
        """Pre-draw the noise of a whole loop: a tensor ``(T, *shape)``.

        Row ``i`` is what ``step`` at position ``i`` would draw with
        ``randn_tensor(shape, generator=generator, device=device, dtype=dtype)``;
        rows are drawn in position order from ``begin_index``, only where the step
        draws noise (``step_kwargs`` are the step options that decide it, e.g.
        ``eta`` for DDIM, ``s_churn``/``s_tmin``/``s_tmax`` for Euler); other rows
        are zeros and consume no random numbers. ``shape``/``dtype``/``device``
        must be those of ``model_output``. Pass ``noise=rows[i]`` to ``step``.
        """
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(...) before draw_noise")
        shape = tuple(shape)
        rows = []
        for i in range(self._num_steps):
            if i >= self._begin_index and self._draws_noise(i, **step_kwargs):
                rows.append(_randn(shape, generator, device, dtype))
            else:
                rows.append(torch.zeros(shape, device=device, dtype=dtype))
        return torch.stack(rows)

    def _noise(
        self,
        model_output: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        noise: torch.Tensor | None,
    ) -> torch.Tensor:
        """The step's noise: ``noise`` if given (shape of ``model_output``), else
        ``randn_tensor(model_output.shape, generator, model_output.device,
        model_output.dtype)`` exactly as diffusers draws it."""
        if noise is not None:
            if generator is not None:
                raise ValueError("pass either generator or noise to step, not both")
            return noise
        return _randn(model_output.shape, generator, model_output.device, model_output.dtype)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """Identity (DDIM, DDPM); Euler adapters override it."""
        return sample

    def _scale_input(self, row: "Row", sample: torch.Tensor) -> torch.Tensor:
        """The denoiser's input for ``sample`` at the position of ``row``: ``sample`` (DDIM, DDPM)."""
        return sample

    def _row(self, i: int) -> "Row":
        return Row(self._table, i)

    def _static_options(self, i: int, **step_kwargs: Any) -> dict[str, Any]:
        """The keyword arguments of ``_update`` at position ``i`` (Python values, fixed per position)."""
        return {}

    def _update(self, row: "Row", model_output: torch.Tensor, sample: torch.Tensor, z: torch.Tensor | None,
                **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_prev, x0)`` of one step at the position of ``row`` (a table row); ``z`` the noise, or
        ``None`` where the step draws none. The formula is in the class docstring."""
        raise NotImplementedError

    def scan_loop(
        self,
        denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        sample: torch.Tensor,
        noise: torch.Tensor | None = None,
        **step_kwargs: Any,
    ) -> torch.Tensor:
        """The sampling loop from ``begin_index`` to the end, as scans; returns the final sample.

        Equals, bit for bit, the loop ::

            for i in range(begin_index, T):
                t = timesteps[i]
                sample = step(denoiser(scale_model_input(sample, t), t), t, sample,
                              noise=noise[i], **step_kwargs).prev_sample

        (``sample`` is used as given: multiply by ``init_noise_sigma`` first, as
        that loop would). ``denoiser(model_input, t)`` returns the model output
        (``lambda x, t: unet(x, t).sample``; classifier-free guidance inside it
        is one step); ``t`` is a 0-d tensor of ``timesteps``. ``noise``: the
        pre-drawn rows ``draw_noise(sample.shape, ..., **step_kwargs)``,
        needed where a step draws noise. Positions are grouped into runs whose
        static options (``_static_options``, whether the step draws noise)
        agree; each run of two or more steps is one ``scan`` over the rows of
        the coefficient tables, the timesteps and the noise; the step counter
        is not moved.
        """
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(...) before scan_loop")
        runs = self._runs(**step_kwargs)
        if noise is not None and tuple(noise.shape) != (self._num_steps, *sample.shape):
            raise ValueError(f"{type(self).__name__}.scan_loop: noise has shape {tuple(noise.shape)}, expected "
                             f"{(self._num_steps, *sample.shape)} (draw_noise(sample.shape, ...))")
        if noise is None and any(draws for _, _, draws, _ in runs):
            raise ValueError(f"{type(self).__name__}.scan_loop: these steps draw noise; pass "
                             "noise=sched.draw_noise(sample.shape, generator=..., dtype=sample.dtype)")
        for begin, end, draws, options in runs:
            rows = {name: table[begin:end] for name, table in self._table.items()}
            rows["timestep"] = self.timesteps[begin:end]
            if draws:
                rows["noise"] = noise[begin:end]

            def step(x, row, draws=draws, options=options):
                model_output = denoiser(self._scale_input(row, x), row["timestep"])
                prev_sample = self._update(row, model_output, x, row["noise"] if draws else None, **options)[0]
                return prev_sample.contiguous(), ()  # scan's carry keeps one layout (values unchanged)

            if end - begin == 1:
                sample = step(sample, {name: rows[name][0] for name in rows})[0]
            else:
                sample = scan(step, sample.contiguous(), rows)[0]
        return sample

    def _runs(self, **step_kwargs: Any) -> list[tuple[int, int, bool, dict[str, Any]]]:
        """``(begin, end, draws noise, static options)`` of the maximal runs of positions that agree."""
        runs: list[tuple[int, int, bool, dict[str, Any]]] = []
        for i in range(self._begin_index, self._num_steps):
            key = (self._draws_noise(i, **step_kwargs), self._static_options(i, **step_kwargs))
            if runs and (runs[-1][2], runs[-1][3]) == key:
                runs[-1] = (runs[-1][0], i + 1, *key)
            else:
                runs.append((i, i + 1, *key))
        return runs


class Row:
    """Row ``i`` of an adapter's tables: ``row[name] = table[name][i]`` (0-d tensors).

    A ``scan`` body gets the same thing as a dict of 0-d slices, so ``_update``
    reads one row the same way in both loops.
    """

    __slots__ = ("_table", "_index")

    def __init__(self, table: dict[str, torch.Tensor], index: int):
        self._table, self._index = table, index

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._table[name][self._index]


def _randn(shape, generator, device, dtype) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)


def _check_prediction_type(adapter: TraceableScheduler, supported: Sequence[str]) -> None:
    value = adapter.config.prediction_type
    if value not in supported:
        raise adapter._unsupported("prediction_type", value, supported)


def _clip_or_threshold(x0: torch.Tensor, config: Any) -> torch.Tensor:
    """The predicted sample ``x0`` (B, C, *S) after diffusers' ``thresholding``
    (dynamic thresholding, see ``_dynamic_threshold``) or ``clip_sample``
    (``clamp(x0, -r, r)``, ``r = clip_sample_range``); unchanged otherwise."""
    if config.thresholding:
        return _dynamic_threshold(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    if config.clip_sample:
        return x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    return x0


def _dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding of ``x0`` (B, C, *S), per batch element b:

        s_b = clamp(quantile(|x0_b|, ratio), 1, max_value);   x0_b <- clamp(x0_b, -s_b, s_b) / s_b

    computed in float32 for half inputs, like diffusers."""
    dtype = x0.dtype
    batch, channels, *rest = x0.shape
    if dtype not in (torch.float32, torch.float64):
        x0 = x0.float()
    flat = x0.reshape(batch, channels * math.prod(rest))
    s = torch.quantile(flat.abs(), ratio, dim=1)
    s = torch.clamp(s, min=1, max=max_value).unsqueeze(1)
    flat = torch.clamp(flat, -s, s) / s
    return flat.reshape(batch, channels, *rest).to(dtype)


def _output(adapter: TraceableScheduler, prev_sample: torch.Tensor, x0: torch.Tensor, return_dict: bool):
    if not return_dict:
        return (prev_sample, x0)
    return adapter._output_class(prev_sample=prev_sample, pred_original_sample=x0)


class TraceableDDIM(TraceableScheduler):
    """DDIM (Song et al. 2021) with per-position tables.

    For position ``i`` with timestep ``t`` and ``t' = t - N // T`` (N train steps;
    diffusers' rule for every spacing), ``a = alphas_cumprod[t]``,
    ``a' = alphas_cumprod[t']`` or ``final_alpha_cumprod`` (1 if
    ``set_alpha_to_one`` else ``alphas_cumprod[0]``) when ``t' < 0``,
    ``b = 1 - a``, ``b' = 1 - a'``:

        var     = (b' / b) * (1 - a / a'),     std = eta * sqrt(var)
        x0, eps = from the prediction type (epsilon: x0 = (x - sqrt(b) m) / sqrt(a);
                  sample: eps = (x - sqrt(a) x0) / sqrt(b);
                  v_prediction: x0 = sqrt(a) x - sqrt(b) m, eps = sqrt(a) m + sqrt(b) x)
        x0      = clip / threshold(x0)
        x_prev  = sqrt(a') x0 + sqrt(1 - a' - std^2) eps  (+ std z  if eta > 0)

    ``m`` = model_output, ``x`` = sample, ``z`` = noise, all (B, C, *S).
    Tables: ``sqrt_alpha``, ``sqrt_beta``, ``alpha_prev``, ``sqrt_alpha_prev``,
    ``sqrt_variance``, ``direction`` (``sqrt(1 - a')``, the eta = 0 coefficient),
    each (T,) float32.
    """

    _diffusers_name = "DDIMScheduler"
    _output_type = ("diffusers.schedulers.scheduling_ddim", "DDIMSchedulerOutput")

    def _check_config(self) -> None:
        _check_prediction_type(self, ("epsilon", "sample", "v_prediction"))

    def _build_tables(self) -> dict[str, list[torch.Tensor]]:
        sched = self.scheduler
        ratio = self.config.num_train_timesteps // sched.num_inference_steps
        tables: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("sqrt_alpha", "sqrt_beta", "alpha_prev", "sqrt_alpha_prev", "sqrt_variance", "direction")
        }
        for t in self.timesteps.tolist():
            prev_t = t - ratio
            alpha = sched.alphas_cumprod[t]
            alpha_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
            beta, beta_prev = 1 - alpha, 1 - alpha_prev
            variance = (beta_prev / beta) * (1 - alpha / alpha_prev)
            tables["sqrt_alpha"].append(alpha ** (0.5))
            tables["sqrt_beta"].append(beta ** (0.5))
            tables["alpha_prev"].append(alpha_prev.to(torch.float32))
            tables["sqrt_alpha_prev"].append(alpha_prev ** (0.5))
            tables["sqrt_variance"].append(variance ** (0.5))
            std_eta0 = 0.0 * variance ** (0.5)  # diffusers' std at eta = 0
            tables["direction"].append((1 - alpha_prev - std_eta0**2) ** (0.5))
        return tables

    def _draws_noise(self, i: int, eta: float = 0.0, use_clipped_model_output: bool = False) -> bool:
        return eta > 0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        noise: torch.Tensor | None = None,
    ):
        """One DDIM step (formula in the class docstring); ``model_output`` and
        ``sample`` are (B, C, *S). ``noise`` (alias ``variance_noise``) is the
        pre-drawn ``z`` for ``eta > 0``. Returns ``DDIMSchedulerOutput(prev_sample,
        pred_original_sample)`` or that pair as a tuple."""
        i = self._position(timestep)
        z = None
        if eta > 0:
            if variance_noise is not None and noise is not None:
                raise ValueError("pass either variance_noise or noise to step, not both")
            z = self._noise(model_output, generator, noise if noise is not None else variance_noise)
        prev_sample, x0 = self._update(self._row(i), model_output, sample, z,
                                       **self._static_options(i, eta, use_clipped_model_output))
        self._advance()
        return _output(self, prev_sample, x0, return_dict)

    def _static_options(self, i: int, eta: float = 0.0, use_clipped_model_output: bool = False) -> dict[str, Any]:
        return {"eta": eta, "use_clipped_model_output": use_clipped_model_output}

    def _update(self, row, model_output, sample, z, eta: float = 0.0, use_clipped_model_output: bool = False):
        sqrt_alpha, sqrt_beta = row["sqrt_alpha"], row["sqrt_beta"]
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (sample - sqrt_beta * model_output) / sqrt_alpha
            eps = model_output
        elif kind == "sample":
            x0 = model_output
            eps = (sample - sqrt_alpha * x0) / sqrt_beta
        else:  # v_prediction
            x0 = sqrt_alpha * sample - sqrt_beta * model_output
            eps = sqrt_alpha * model_output + sqrt_beta * sample
        x0 = _clip_or_threshold(x0, self.config)
        if use_clipped_model_output:
            eps = (sample - sqrt_alpha * x0) / sqrt_beta
        if eta == 0:
            direction = row["direction"] * eps
        else:
            std = eta * row["sqrt_variance"]
            direction = (1 - row["alpha_prev"] - std**2) ** (0.5) * eps
        prev_sample = row["sqrt_alpha_prev"] * x0 + direction
        if z is not None:
            prev_sample = prev_sample + std * z
        return prev_sample, x0


class TraceableDDPM(TraceableScheduler):
    """DDPM (Ho et al. 2020) ancestral sampling with per-position tables.

    For position ``i`` with timestep ``t``, ``t'`` the next entry of ``timesteps``
    (-1 after the last), ``a = alphas_cumprod[t]``, ``a' = alphas_cumprod[t']`` or
    1 when ``t' < 0``, ``b = 1 - a``, ``b' = 1 - a'``, ``alpha_t = a / a'``,
    ``beta_t = 1 - alpha_t``:

        x0     = from the prediction type (epsilon: (x - sqrt(b) m) / sqrt(a);
                 sample: m; v_prediction: sqrt(a) x - sqrt(b) m), then clip / threshold
        x_prev = (sqrt(a') beta_t / b) x0 + (sqrt(alpha_t) b' / b) x  (+ sigma z  if t > 0)

    with ``v = max(b' / b * beta_t, 1e-20)`` and ``sigma`` = ``sqrt(v)``
    (fixed_small), ``exp(log(v) / 2)`` (fixed_small_log), ``sqrt(beta_t)``
    (fixed_large), ``sqrt(p)`` (learned; ``p`` the second half of the model
    output's channels), ``exp((f log beta_t + (1 - f) log v) / 2)``, ``f = (p+1)/2``
    (learned_range). Shapes (B, C, *S); tables (T,) float32: ``sqrt_alpha``,
    ``sqrt_beta``, ``coef_x0``, ``coef_x``, ``sigma``, ``min_log``, ``max_log``.
    """

    _diffusers_name = "DDPMScheduler"
    _output_type = ("diffusers.schedulers.scheduling_ddpm", "DDPMSchedulerOutput")
    _variance_types = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")

    def _check_config(self) -> None:
        _check_prediction_type(self, ("epsilon", "sample", "v_prediction"))
        if self.config.variance_type not in self._variance_types:
            # fixed_large_log: diffusers takes sqrt(log(beta_t)) of a negative number (NaN).
            raise self._unsupported("variance_type", self.config.variance_type, self._variance_types)

    def _build_tables(self) -> dict[str, list[torch.Tensor]]:
        sched = self.scheduler
        names = ("sqrt_alpha", "sqrt_beta", "coef_x0", "coef_x", "sigma", "min_log", "max_log")
        tables: dict[str, list[torch.Tensor]] = {k: [] for k in names}
        ts = self.timesteps.tolist()
        self._noisy = [t > 0 for t in ts]
        for i, t in enumerate(ts):
            prev_t = ts[i + 1] if i + 1 < len(ts) else -1
            alpha = sched.alphas_cumprod[t]
            alpha_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.one
            beta, beta_prev = 1 - alpha, 1 - alpha_prev
            alpha_t = alpha / alpha_prev
            beta_t = 1 - alpha_t
            variance = torch.clamp((1 - alpha_prev) / (1 - alpha) * beta_t, min=1e-20)
            kind = self.config.variance_type
            if kind == "fixed_small":
                sigma = variance ** 0.5
            elif kind == "fixed_small_log":
                sigma = torch.exp(0.5 * torch.log(variance))
            elif kind == "fixed_large":
                sigma = beta_t ** 0.5
            else:  # learned types: sigma comes from the model output
                sigma = torch.zeros((), dtype=torch.float32)
            tables["sqrt_alpha"].append(alpha ** (0.5))
            tables["sqrt_beta"].append(beta ** (0.5))
            tables["coef_x0"].append((alpha_prev ** (0.5) * beta_t) / beta)
            tables["coef_x"].append(alpha_t ** (0.5) * beta_prev / beta)
            tables["sigma"].append(sigma)
            tables["min_log"].append(torch.log(variance))
            tables["max_log"].append(torch.log(beta_t))
        return tables

    def _draws_noise(self, i: int) -> bool:
        return self._noisy[i]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        noise: torch.Tensor | None = None,
    ):
        """One DDPM step (formula in the class docstring); ``model_output`` is
        (B, C, *S), or (B, 2C, *S) for the learned variance types, ``sample`` is
        (B, C, *S). ``noise`` is the pre-drawn ``z`` (ignored at ``t == 0``, where
        diffusers draws none). Returns ``DDPMSchedulerOutput`` or a tuple."""
        i = self._position(timestep)
        z = self._noise(self._split(model_output, sample)[0], generator, noise) if self._noisy[i] else None
        prev_sample, x0 = self._update(self._row(i), model_output, sample, z)
        self._advance()
        return _output(self, prev_sample, x0, return_dict)

    def _split(self, model_output, sample):
        """``(prediction, predicted variance or None)``: the learned variance types put the
        variance in the model output's second half of channels."""
        kind = self.config.variance_type
        if kind not in ("learned", "learned_range"):
            return model_output, None
        if model_output.shape[1] != sample.shape[1] * 2:
            raise ValueError(
                f"DDPM variance_type={kind!r} needs model_output with twice the sample's channels "
                f"(got {model_output.shape[1]} vs {sample.shape[1]})"
            )
        return torch.split(model_output, sample.shape[1], dim=1)

    def _update(self, row, model_output, sample, z):
        kind = self.config.variance_type
        model_output, predicted_variance = self._split(model_output, sample)
        sqrt_alpha, sqrt_beta = row["sqrt_alpha"], row["sqrt_beta"]
        pred = self.config.prediction_type
        if pred == "epsilon":
            x0 = (sample - sqrt_beta * model_output) / sqrt_alpha
        elif pred == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = sqrt_alpha * sample - sqrt_beta * model_output
        x0 = _clip_or_threshold(x0, self.config)
        prev_sample = row["coef_x0"] * x0 + row["coef_x"] * sample
        if z is not None:
            if kind == "learned":
                prev_sample = prev_sample + (predicted_variance ** 0.5) * z
            elif kind == "learned_range":
                frac = (predicted_variance + 1) / 2
                log_var = frac * row["max_log"] + (1 - frac) * row["min_log"]
                prev_sample = prev_sample + torch.exp(0.5 * log_var) * z
            else:
                prev_sample = prev_sample + row["sigma"] * z
        return prev_sample, x0


class _EulerBase(TraceableScheduler):
    """Shared by the Euler adapters: sigma tables and input scaling.

    ``sigmas`` has T+1 entries (the last is the final sigma, 0 by default);
    ``scale_model_input(x) = x / sqrt(sigma_i^2 + 1)``. Every sigma schedule of
    the scheduler (Karras, exponential, beta, log-linear, custom ``sigmas=`` /
    ``timesteps=``, ``final_sigmas_type``) is supported, since the tables are read
    from the scheduler's own ``sigmas`` after ``set_timesteps``.
    """

    def _sigma_tables(self) -> dict[str, list[torch.Tensor]]:
        sigmas = self.scheduler.sigmas
        self._sigma_values = [float(s) for s in sigmas.tolist()]
        tables: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("sigma", "sigma_next", "dt", "scale_in", "v_out", "v_skip_div")
        }
        for i in range(self._num_steps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            tables["sigma"].append(sigma)
            tables["sigma_next"].append(sigma_next)
            tables["dt"].append(sigma_next - sigma)
            tables["scale_in"].append((sigma**2 + 1) ** 0.5)
            tables["v_out"].append(-sigma / (sigma**2 + 1) ** 0.5)
            tables["v_skip_div"].append(sigma**2 + 1)
        return tables

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """``sample / sqrt(sigma_i^2 + 1)`` for the current position ``i``; (B, C, *S)."""
        return self._scale_input(self._row(self._position(timestep)), sample)

    def _scale_input(self, row: Row, sample: torch.Tensor) -> torch.Tensor:
        """``sample / sqrt(sigma_i^2 + 1)`` at the position ``i`` of ``row``; (B, C, *S)."""
        return sample / row["scale_in"]

    def _x0(self, model_output: torch.Tensor, sample: torch.Tensor, sigma_hat: torch.Tensor, row: Row):
        pred = self.config.prediction_type
        if pred in ("original_sample", "sample"):
            return model_output
        if pred == "epsilon":
            return sample - sigma_hat * model_output
        # v_prediction
        return model_output * row["v_out"] + (sample / row["v_skip_div"])


class TraceableEulerDiscrete(_EulerBase):
    """Euler (Karras et al. 2022, Algorithm 2) with per-position sigma tables.

    At position ``i`` with ``sigma = sigmas[i]``, ``gamma = min(s_churn / T,
    sqrt(2) - 1)`` if ``s_tmin <= sigma <= s_tmax`` else 0 (static Python,
    compared on the float32 sigma in float64), ``sigma_hat = sigma (1 + gamma)``;
    all in float32 like diffusers (``x`` is cast to float32):

        x      = x + s_noise z sqrt(sigma_hat^2 - sigma^2)     (only if gamma > 0)
        x0     = x - sigma_hat m (epsilon) | m (sample) |
                 m (-sigma / sqrt(sigma^2 + 1)) + x / (sigma^2 + 1) (v_prediction)
        x_prev = x + (x - x0) / sigma_hat * (sigmas[i+1] - sigma_hat), cast to m's dtype

    Shapes (B, C, *S). Tables (T,) float32: ``sigma``, ``sigma_next``, ``dt``
    (``sigmas[i+1] - sigma``, the gamma = 0 step), ``scale_in``, ``v_out``,
    ``v_skip_div``.
    """

    _diffusers_name = "EulerDiscreteScheduler"
    _output_type = ("diffusers.schedulers.scheduling_euler_discrete", "EulerDiscreteSchedulerOutput")

    def _check_config(self) -> None:
        _check_prediction_type(self, ("epsilon", "sample", "original_sample", "v_prediction"))

    def _build_tables(self) -> dict[str, list[torch.Tensor]]:
        return self._sigma_tables()

    def _gamma(self, i: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
        if s_churn == 0:  # min(0, ...) = 0 whatever sigma is
            return 0.0
        sigma = self._sigma_values[i]
        return min(s_churn / (len(self._sigma_values) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0

    def _draws_noise(
        self, i: int, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0
    ) -> bool:
        return self._gamma(i, s_churn, s_tmin, s_tmax) > 0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        noise: torch.Tensor | None = None,
    ):
        """One Euler step (formula in the class docstring); ``noise`` is the
        pre-drawn ``z`` for churn steps (``gamma > 0``). Returns
        ``EulerDiscreteSchedulerOutput`` or a tuple."""
        i = self._position(timestep)
        options = self._static_options(i, s_churn, s_tmin, s_tmax, s_noise)
        z = self._noise(model_output, generator, noise) if options["gamma"] > 0 else None
        prev_sample, x0 = self._update(self._row(i), model_output, sample, z, **options)
        self._advance()
        return _output(self, prev_sample, x0, return_dict)

    def _static_options(
        self, i: int, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0
    ) -> dict[str, Any]:
        return {"gamma": self._gamma(i, s_churn, s_tmin, s_tmax), "s_noise": s_noise}

    def _update(self, row, model_output, sample, z, gamma: float = 0.0, s_noise: float = 1.0):
        sample = sample.to(torch.float32)
        sigma = row["sigma"]
        if gamma == 0:  # sigma_hat = sigma * 1.0 = sigma exactly
            sigma_hat, dt = sigma, row["dt"]
        else:
            sigma_hat = sigma * (gamma + 1)
            dt = row["sigma_next"] - sigma_hat
            eps = z * s_noise
            sample = sample + eps * (sigma_hat**2 - sigma**2) ** 0.5
        x0 = self._x0(model_output, sample, sigma_hat, row)
        derivative = (sample - x0) / sigma_hat
        return (sample + derivative * dt).to(model_output.dtype), x0


class TraceableEulerAncestralDiscrete(_EulerBase):
    """Euler ancestral (k-diffusion ``sample_euler_ancestral``) with sigma tables.

    At position ``i``, ``s = sigmas[i]``, ``s' = sigmas[i+1]``, in float32:

        sigma_up   = sqrt(s'^2 (s^2 - s'^2) / s^2),   sigma_down = sqrt(s'^2 - sigma_up^2)
        x0         = x - s m (epsilon) | m (-s / sqrt(s^2 + 1)) + x / (s^2 + 1) (v_prediction)
        x_prev     = x + (x - x0) / s * (sigma_down - s) + sigma_up z,  cast to m's dtype

    ``z`` is drawn at every step (also the last, where ``sigma_up = 0``), as
    diffusers does. Shapes (B, C, *S). Tables (T,) float32: ``sigma``,
    ``scale_in``, ``v_out``, ``v_skip_div``, ``dt`` (= sigma_down - s),
    ``sigma_up``. prediction_type "sample" is unsupported (diffusers raises too).
    """

    _diffusers_name = "EulerAncestralDiscreteScheduler"
    _output_type = ("diffusers.schedulers.scheduling_euler_ancestral_discrete", "EulerAncestralDiscreteSchedulerOutput")

    def _check_config(self) -> None:
        _check_prediction_type(self, ("epsilon", "v_prediction"))

    def _build_tables(self) -> dict[str, list[torch.Tensor]]:
        tables = self._sigma_tables()
        tables["dt"], tables["sigma_up"] = [], []  # dt here is sigma_down - s
        for s, s_next in zip(tables["sigma"], tables["sigma_next"]):
            sigma_up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
            sigma_down = (s_next**2 - sigma_up**2) ** 0.5
            tables["dt"].append(sigma_down - s)
            tables["sigma_up"].append(sigma_up)
        return tables

    def _draws_noise(self, i: int) -> bool:
        return True

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        noise: torch.Tensor | None = None,
    ):
        """One Euler-ancestral step (formula in the class docstring); ``noise`` is
        the pre-drawn ``z``. Returns ``EulerAncestralDiscreteSchedulerOutput`` or a
        tuple."""
        i = self._position(timestep)
        z = self._noise(model_output, generator, noise)
        prev_sample, x0 = self._update(self._row(i), model_output, sample, z)
        self._advance()
        return _output(self, prev_sample, x0, return_dict)

    def _update(self, row, model_output, sample, z):
        sigma = row["sigma"]
        sample = sample.to(torch.float32)
        x0 = self._x0(model_output, sample, sigma, row)
        derivative = (sample - x0) / sigma
        prev_sample = sample + derivative * row["dt"]
        return (prev_sample + z * row["sigma_up"]).to(model_output.dtype), x0


_ADAPTERS = (TraceableDDIM, TraceableDDPM, TraceableEulerDiscrete, TraceableEulerAncestralDiscrete)
