"""Denoising loops over ``seqpar.diffusion.traceable`` schedulers, for the tests and the benchmarks.

``sampling_loop(scheduler, denoiser, steps)`` builds one configuration: a
traceable DDIM, DDPM or Euler ancestral scheduler with ``steps`` timesteps, a
denoiser (a small MLP, or a tiny diffusers ``UNet2DModel`` with random
weights, float64) and the user's sampling function with its inputs. diffusers
is imported when a scheduler or a UNet is built, not with this module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from seqpar.diffusion import traceable

# name -> (diffusers scheduler class, its config)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", dict(clip_sample=False)),
    "ddpm": ("DDPMScheduler", dict(clip_sample=False)),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
}


class MLPDenoiser(torch.nn.Module):
    """``eps(x, t) = sqrt(1 - abar_t) x + 0.1 mlp(x, t / 1000)`` on (B, D) samples.

    The first term is the exact noise prediction for unit-variance Gaussian
    data, so the sampler behaves like one driven by a trained model (each step
    is close to the identity); the small random MLP makes it nonlinear.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, width: int = 8, hidden: int = 32):
        super().__init__()
        self.register_buffer("abar", alphas_cumprod.double().clone())
        self.inp = torch.nn.Linear(width + 1, hidden)
        self.out = torch.nn.Linear(hidden, width)

    def forward(self, x, t):
        time = (t.to(x.dtype) / 1000).expand(x.shape[0], 1)
        correction = self.out(torch.nn.functional.silu(self.inp(torch.cat([x, time], dim=-1))))
        abar = self.abar.index_select(0, t.reshape(1).long())  # no .item(): stays in the graph
        return (1 - abar).sqrt() * x + 0.1 * correction


class UNetDenoiser(torch.nn.Module):
    """A tiny diffusers ``UNet2DModel`` with random weights, called as ``eps(x, t)``."""

    def __init__(self, channels: int = 1):
        super().__init__()
        from diffusers import UNet2DModel

        self.unet = UNet2DModel(
            sample_size=8,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
        )

    def forward(self, x, t):
        return self.unet(x, t).sample


def make_scheduler(name: str, steps: int):
    cls_name, config = SCHEDULERS[name]
    cls = getattr(importlib.import_module("diffusers"), cls_name)
    sched = traceable(cls(**config))
    sched.set_timesteps(steps)
    return sched


def make_denoiser(kind: str, sched):
    torch.manual_seed(0)
    if kind == "mlp":
        return MLPDenoiser(sched.scheduler.alphas_cumprod).double().eval(), (2, 8)
    return UNetDenoiser().double().eval(), (1, 1, 8, 8)


def make_sample(sched, model, form: str = "loop"):
    """The user's sampling function: the loop over a traceable scheduler with pre-drawn noise rows
    (``form="loop"``: Dynamo unrolls it), or the same loop as ``sched.scan_loop`` (``"scan"``)."""

    def sample(x, noise):
        x = x * sched.init_noise_sigma
        for i, t in enumerate(sched.timesteps):
            x = sched.step(model(sched.scale_model_input(x, t), t), t, x, noise=noise[i]).prev_sample
        return x

    def scan_sample(x, noise):
        return sched.scan_loop(model, x * sched.init_noise_sigma, noise=noise)

    return sample if form == "loop" else scan_sample


def inputs(sched, shape, seed=0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    noise = sched.draw_noise(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return x, noise


@dataclass
class SamplingLoop:
    """One configuration: the scheduler adapter, the denoiser, the user's loop and its inputs."""

    sched: object
    model: torch.nn.Module
    sample: object
    shape: tuple
    x: torch.Tensor
    noise: torch.Tensor


def sampling_loop(scheduler: str, denoiser: str, steps: int, form: str = "loop") -> SamplingLoop:
    sched = make_scheduler(scheduler, steps)
    model, shape = make_denoiser(denoiser, sched)
    return SamplingLoop(sched, model, make_sample(sched, model, form), shape, *inputs(sched, shape))
