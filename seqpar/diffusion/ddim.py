"""The traceable DDIM adapter."""

from __future__ import annotations

from typing import Any

import torch

from .base import TraceableScheduler, clip_or_threshold


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
        self._check_prediction_type(("epsilon", "sample", "v_prediction"))

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
        if eta > 0 and variance_noise is not None and noise is not None:
            raise ValueError("pass either variance_noise or noise to step, not both")
        return self._step(model_output, timestep, sample, generator, noise if noise is not None else variance_noise,
                          return_dict, eta=eta, use_clipped_model_output=use_clipped_model_output)

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
        x0 = clip_or_threshold(x0, self.config)
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
