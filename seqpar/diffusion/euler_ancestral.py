"""The traceable Euler ancestral adapter."""

from __future__ import annotations

import torch

from .euler import EulerBase


class TraceableEulerAncestralDiscrete(EulerBase):
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
        self._check_prediction_type(("epsilon", "v_prediction"))

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

    def _update(self, row, model_output, sample, z):
        sigma = row["sigma"]
        sample = sample.to(torch.float32)
        x0 = self._x0(model_output, sample, sigma, row)
        derivative = (sample - x0) / sigma
        prev_sample = sample + derivative * row["dt"]
        return (prev_sample + z * row["sigma_up"]).to(model_output.dtype), x0
