"""What the traceable adapters share: the position counter, the coefficient tables, the noise,
the step template and the whole loop as scans (``TraceableScheduler``), and the clipping and
dynamic thresholding of a predicted sample."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._higher_order_ops.scan import scan


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

    def _check_prediction_type(self, supported: Sequence[str]) -> None:
        value = self.config.prediction_type
        if value not in supported:
            raise self._unsupported("prediction_type", value, supported)

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

    def _noise_like(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The tensor whose shape, dtype and device the step's noise takes: ``model_output``."""
        return model_output

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

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        noise: torch.Tensor | None = None,
    ):
        """One step at the current position (formula in the class docstring); ``model_output`` and
        ``sample`` are (B, C, *S). ``noise`` is the pre-drawn ``z`` of a step that draws noise (see
        ``draw_noise``). Returns the scheduler's step output (``prev_sample``,
        ``pred_original_sample``) or that pair as a tuple."""
        return self._step(model_output, timestep, sample, generator, noise, return_dict)

    def _step(self, model_output, timestep, sample, generator, noise, return_dict, **step_kwargs):
        """Every adapter's ``step``: find the position ``i`` (checked against ``timestep`` eagerly),
        take the noise where the step draws it (``_draws_noise``), apply ``_update`` to the row of
        the tables at ``i`` with the static options of ``i`` (``_static_options``; ``step_kwargs``
        are the scheduler's step options), advance the counter."""
        i = self._position(timestep)
        z = None
        if self._draws_noise(i, **step_kwargs):
            z = self._noise(self._noise_like(model_output, sample), generator, noise)
        prev_sample, x0 = self._update(self._row(i), model_output, sample, z, **self._static_options(i, **step_kwargs))
        self._advance()
        if not return_dict:
            return (prev_sample, x0)
        return self._output_class(prev_sample=prev_sample, pred_original_sample=x0)

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


def clip_or_threshold(x0: torch.Tensor, config: Any) -> torch.Tensor:
    """The predicted sample ``x0`` (B, C, *S) after diffusers' ``thresholding``
    (dynamic thresholding, see ``dynamic_threshold``) or ``clip_sample``
    (``clamp(x0, -r, r)``, ``r = clip_sample_range``); unchanged otherwise."""
    if config.thresholding:
        return dynamic_threshold(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    if config.clip_sample:
        return x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    return x0


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
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
