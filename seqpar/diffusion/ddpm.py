"""The traceable DDPM adapter."""

from __future__ import annotations

import torch

from .base import TraceableScheduler, clip_or_threshold


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
    (learned_range). Shapes (B, C, *S), the model output (B, 2C, *S) for the
    learned types; ``step``'s ``noise`` is ignored at ``t == 0``, where diffusers
    draws none. Tables (T,) float32: ``sqrt_alpha``, ``sqrt_beta``, ``coef_x0``,
    ``coef_x``, ``sigma``, ``min_log``, ``max_log``.
    """

    _diffusers_name = "DDPMScheduler"
    _output_type = ("diffusers.schedulers.scheduling_ddpm", "DDPMSchedulerOutput")
    _variance_types = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")

    def _check_config(self) -> None:
        self._check_prediction_type(("epsilon", "sample", "v_prediction"))
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

    def _noise_like(self, model_output, sample):
        """The prediction part of ``model_output`` (its first C channels for the learned variance types)."""
        return self._split(model_output, sample)[0]

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
        x0 = clip_or_threshold(x0, self.config)
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
