"""The traceable Euler adapter, and the sigma tables and input scaling both Euler adapters share."""

from __future__ import annotations

from typing import Any

import torch

from .base import Row, TraceableScheduler


class EulerBase(TraceableScheduler):
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


class TraceableEulerDiscrete(EulerBase):
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
        self._check_prediction_type(("epsilon", "sample", "original_sample", "v_prediction"))

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
        return self._step(model_output, timestep, sample, generator, noise, return_dict,
                          s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)

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
