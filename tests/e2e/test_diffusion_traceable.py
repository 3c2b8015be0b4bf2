"""seqpar.diffusion.traceable: same numbers as diffusers' schedulers, one Dynamo graph.

Tolerance: exact (``atol = rtol = 0``) in float32 and float64. The adapters
evaluate the same expressions as diffusers in the same order and dtypes, with
coefficients computed by the same 0-d float32 operations (only stacked into
tables), and draw noise with the same ``randn_tensor`` calls; so every floating
point operation sees identical operands and the samples agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DModel,
)

from seqpar.diffusion import traceable  # noqa: E402

SHAPE = (2, 4, 3, 3)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class TinyDenoiser:
    """A fixed random denoiser in plain torch: ``m = tanh(W x + t/1000)`` on the
    channel axis, (B, C, H, W) -> (B, out_channels, H, W)."""

    def __init__(self, channels: int = 4, out_channels: int | None = None):
        g = torch.Generator().manual_seed(1234)
        self.weight = torch.randn(out_channels or channels, channels, generator=g, dtype=torch.float64) * 0.4

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        time = torch.as_tensor(t, dtype=x.dtype) / 1000
        return torch.tanh(torch.einsum("oc,bchw->bohw", self.weight.to(x.dtype), x) + time)


def sample_loop(sched, x, model, generator=None, noise=None, **step_kwargs):
    """The user's unchanged loop (plus the optional pre-drawn noise rows)."""
    for i, t in enumerate(sched.timesteps):
        extra = {}
        if generator is not None:
            extra["generator"] = generator
        if noise is not None:
            extra["noise"] = noise[i]
        model_output = model(sched.scale_model_input(x, t), t)
        x = sched.step(model_output, t, x, **extra, **step_kwargs).prev_sample
    return x


def initial_sample(sched, dtype):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=dtype)
    return x * sched.init_noise_sigma


def seeded():
    return torch.Generator().manual_seed(2024)


def assert_exact(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


class CountGraphs:
    """A torch.compile backend that counts the graphs Dynamo hands it."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


# (scheduler class, config, step options, model output channels)
CASES = {
    "ddim-default": (DDIMScheduler, {}, {}, 4),
    "ddim-offset-noclip-alpha0": (
        DDIMScheduler,
        dict(set_alpha_to_one=False, steps_offset=1, clip_sample=False, beta_schedule="scaled_linear"),
        {},
        4,
    ),
    "ddim-trailing-v-zero-snr": (
        DDIMScheduler,
        dict(timestep_spacing="trailing", prediction_type="v_prediction", rescale_betas_zero_snr=True),
        {},
        4,
    ),
    "ddim-linspace-sample-threshold": (
        DDIMScheduler,
        dict(timestep_spacing="linspace", prediction_type="sample", thresholding=True, sample_max_value=1.5),
        dict(use_clipped_model_output=True),
        4,
    ),
    "ddim-eta": (DDIMScheduler, dict(clip_sample=False), dict(eta=0.7), 4),
    "ddpm-default": (DDPMScheduler, {}, {}, 4),
    "ddpm-small-log-v": (DDPMScheduler, dict(variance_type="fixed_small_log", prediction_type="v_prediction"), {}, 4),
    "ddpm-sample-trailing-offset": (
        DDPMScheduler,
        dict(prediction_type="sample", timestep_spacing="trailing", steps_offset=1, clip_sample=False),
        {},
        4,
    ),
    "ddpm-fixed-large-linspace": (DDPMScheduler, dict(variance_type="fixed_large", timestep_spacing="linspace"), {}, 4),
    "ddpm-learned-range": (DDPMScheduler, dict(variance_type="learned_range", beta_schedule="squaredcos_cap_v2"), {}, 8),
    "euler-default": (EulerDiscreteScheduler, {}, {}, 4),
    "euler-v-leading-offset": (
        EulerDiscreteScheduler,
        dict(prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1),
        {},
        4,
    ),
    "euler-sample-trailing": (EulerDiscreteScheduler, dict(prediction_type="sample", timestep_spacing="trailing"), {}, 4),
    "euler-karras-churn": (
        EulerDiscreteScheduler,
        dict(use_karras_sigmas=True, beta_schedule="scaled_linear"),
        dict(s_churn=2.0, s_tmin=0.5, s_tmax=10.0),
        4,
    ),
    "euler-ancestral-default": (EulerAncestralDiscreteScheduler, {}, {}, 4),
    "euler-ancestral-v-trailing": (
        EulerAncestralDiscreteScheduler,
        dict(prediction_type="v_prediction", timestep_spacing="trailing"),
        {},
        4,
    ),
}


def run_pair(case, steps, dtype, form="loop"):
    """The raw diffusers loop and the traceable loop, same seeds: (raw, traceable, adapter).

    ``form="scan"``: the traceable loop is ``scan_loop``, with the same noise drawn up front."""
    cls, config, step_kwargs, out_channels = CASES[case]
    model = TinyDenoiser(out_channels=out_channels)
    raw = cls(**config)
    raw.set_timesteps(steps)
    sched = traceable(cls(**config))
    sched.set_timesteps(steps)
    x = initial_sample(raw, dtype)
    expected = sample_loop(raw, x, model, generator=seeded(), **step_kwargs)
    if form == "scan":
        noise = sched.draw_noise(SHAPE, generator=seeded(), dtype=dtype, **step_kwargs)
        return expected, sched.scan_loop(model, x, noise=noise, **step_kwargs), sched
    return expected, sample_loop(sched, x, model, generator=seeded(), **step_kwargs), sched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_samples_as_diffusers(case, steps, dtype):
    expected, actual, _ = run_pair(case, steps, dtype)
    assert actual.dtype == expected.dtype
    assert torch.isfinite(expected).all()
    assert_exact(actual, expected)


@pytest.mark.parametrize("cls", [DDIMScheduler, EulerAncestralDiscreteScheduler])
def test_same_samples_as_diffusers_with_a_tiny_unet(cls):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()
    raw, sched = cls(), traceable(cls())
    raw.set_timesteps(10)
    sched.set_timesteps(10)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * raw.init_noise_sigma

    def model(sample, t):
        return unet(sample, t).sample

    with torch.no_grad():
        expected = sample_loop(raw, x, model, generator=seeded())
        actual = sample_loop(sched, x, model, generator=seeded())
    assert_exact(actual, expected)


COMPILE_CASES = ["ddim-default", "ddim-eta", "ddpm-default", "ddpm-learned-range", "euler-karras-churn",
                 "euler-ancestral-v-trailing"]


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_compiled_loop_is_one_graph_and_matches_diffusers(case):
    """fullgraph compile of the loop, noise passed as pre-drawn rows: one graph,
    same samples as the raw scheduler driven by a seeded generator."""
    cls, config, step_kwargs, out_channels = CASES[case]
    model = TinyDenoiser(out_channels=out_channels)
    raw = cls(**config)
    raw.set_timesteps(10)
    x = initial_sample(raw, torch.float32)
    expected = sample_loop(raw, x, model, generator=seeded(), **step_kwargs)

    sched = traceable(cls(**config))
    sched.set_timesteps(10)
    noise = sched.draw_noise(x.shape, generator=seeded(), dtype=x.dtype, **step_kwargs)
    backend = CountGraphs()
    compiled = torch.compile(
        lambda x, noise: sample_loop(sched, x, model, noise=noise, **step_kwargs), backend=backend, fullgraph=True
    )
    actual = compiled(x, noise)
    assert backend.graphs == 1
    assert_exact(actual, expected)
    assert_exact(compiled(x, noise), expected)  # the counter returned to 0: no recompile, same result
    assert backend.graphs == 1


def test_compiled_loop_with_global_rng_matches_eager():
    """No generator, no noise: the steps draw from the global RNG inside the graph."""
    model = TinyDenoiser()
    sched = traceable(DDPMScheduler())
    sched.set_timesteps(10)
    x = initial_sample(sched, torch.float32)
    torch.manual_seed(11)
    expected = sample_loop(sched, x, model)
    backend = CountGraphs()
    compiled = torch.compile(lambda x: sample_loop(sched, x, model), backend=backend, fullgraph=True)
    torch.manual_seed(11)
    assert_exact(compiled(x), expected)
    assert backend.graphs == 1


def test_tiny_unet_loop_compiles_to_one_graph():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()
    sched = traceable(DDIMScheduler())
    sched.set_timesteps(4)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))

    def loop(x):
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
        return x

    backend = CountGraphs()
    with torch.no_grad():
        expected = loop(x)
        actual = torch.compile(loop, backend=backend, fullgraph=True)(x)
    assert backend.graphs == 1
    assert_exact(actual, expected)


def test_a_generator_argument_cannot_be_traced_so_noise_rows_exist():
    """Why draw_noise exists: Dynamo (torch 2.13) cannot put a torch.Generator
    into a graph, so fullgraph compile of a generator loop fails."""
    sched = traceable(EulerAncestralDiscreteScheduler())
    sched.set_timesteps(4)
    x = initial_sample(sched, torch.float32)
    compiled = torch.compile(
        lambda x, g: sample_loop(sched, x, TinyDenoiser(), generator=g), backend="eager", fullgraph=True
    )
    with pytest.raises(torch._dynamo.exc.Unsupported):
        compiled(x, seeded())


def test_draw_noise_draws_only_where_the_scheduler_does():
    sched = traceable(DDPMScheduler())  # leading spacing: the last timestep is 0, no noise there
    sched.set_timesteps(5)
    noise = sched.draw_noise(SHAPE, generator=seeded())
    assert noise.shape == (5, *SHAPE)
    assert torch.count_nonzero(noise[-1]) == 0
    g = seeded()
    expected = torch.stack([torch.randn(SHAPE, generator=g) for _ in range(4)])
    assert_exact(noise[:4], expected)

    ddim = traceable(DDIMScheduler())
    ddim.set_timesteps(5)
    assert torch.count_nonzero(ddim.draw_noise(SHAPE, generator=seeded())) == 0  # eta = 0: deterministic
    assert torch.count_nonzero(ddim.draw_noise(SHAPE, generator=seeded(), eta=1.0)) == 5 * noise[0].numel()


def test_return_dict_false_returns_prev_sample_and_x0():
    raw, sched = DDIMScheduler(), traceable(DDIMScheduler())
    raw.set_timesteps(10)
    sched.set_timesteps(10)
    x = initial_sample(raw, torch.float32)
    t = sched.timesteps[0]
    m = TinyDenoiser()(x, t)
    expected = raw.step(m, t, x, return_dict=False)
    actual = sched.step(m, t, x, return_dict=False)
    assert isinstance(actual, tuple) and len(actual) == 2
    assert_exact(actual[0], expected[0])
    assert_exact(actual[1], expected[1])


def test_set_timesteps_recomputes_and_resets_the_counter():
    model = TinyDenoiser()
    sched = traceable(EulerDiscreteScheduler())
    sched.set_timesteps(50)
    x = initial_sample(sched, torch.float32)
    sched.step(model(x, sched.timesteps[0]), sched.timesteps[0], x)  # leave a loop half-way
    sched.set_timesteps(10)
    assert sched.step_index == 0 and sched.num_inference_steps == 10
    raw = EulerDiscreteScheduler()
    raw.set_timesteps(10)
    assert_exact(sched.timesteps, raw.timesteps)
    assert sched.init_noise_sigma == raw.init_noise_sigma
    x = initial_sample(raw, torch.float32)
    assert_exact(sample_loop(sched, x, model), sample_loop(raw, x, model))


def test_wrapping_a_scheduler_with_timesteps_set_precomputes():
    raw = DDPMScheduler()
    raw.set_timesteps(timesteps=[900, 600, 300, 100, 0])  # custom timesteps
    inner = DDPMScheduler()
    inner.set_timesteps(timesteps=[900, 600, 300, 100, 0])
    sched = traceable(inner)
    assert sched.num_inference_steps == 5
    x = initial_sample(raw, torch.float64)
    model = TinyDenoiser()
    assert_exact(sample_loop(sched, x, model, generator=seeded()), sample_loop(raw, x, model, generator=seeded()))


def test_set_begin_index_runs_a_partial_schedule_like_diffusers():
    model = TinyDenoiser()
    raw, sched = EulerDiscreteScheduler(), traceable(EulerDiscreteScheduler())
    raw.set_timesteps(10)
    sched.set_timesteps(10)
    raw.set_begin_index(4)
    sched.set_begin_index(4)
    x = initial_sample(raw, torch.float32)
    expected, actual = x, x
    for t in raw.timesteps[4:]:
        expected = raw.step(model(raw.scale_model_input(expected, t), t), t, expected).prev_sample
        actual = sched.step(model(sched.scale_model_input(actual, t), t), t, actual).prev_sample
    assert_exact(actual, expected)
    assert sched.step_index == 4  # back at the begin index


def test_a_step_out_of_order_raises_eagerly():
    sched = traceable(DDIMScheduler())
    sched.set_timesteps(10)
    x = initial_sample(sched, torch.float32)
    with pytest.raises(ValueError, match=r"expected timesteps\[0\]"):
        sched.step(x, sched.timesteps[3], x)


def test_step_before_set_timesteps_raises():
    sched = traceable(DDIMScheduler())
    x = initial_sample(sched, torch.float32)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(x, 999, x)


@pytest.mark.parametrize(
    "scheduler, option",
    [
        (DDPMScheduler(variance_type="fixed_large_log"), "variance_type='fixed_large_log'"),
        (EulerAncestralDiscreteScheduler(prediction_type="sample"), "prediction_type='sample'"),
    ],
    ids=["ddpm-fixed_large_log", "euler-ancestral-sample"],
)
def test_unsupported_config_raises_naming_the_option(scheduler, option):
    with pytest.raises(ValueError, match=option):
        traceable(scheduler)


def test_unsupported_scheduler_class_raises_naming_it():
    with pytest.raises(ValueError, match="PNDMScheduler"):
        traceable(PNDMScheduler())


def test_other_attributes_are_read_from_the_scheduler():
    raw = DDIMScheduler()
    sched = traceable(raw)
    assert sched.alphas_cumprod is raw.alphas_cumprod
    assert sched.config is raw.config
    assert sched.order == 1


def test_set_timesteps_on_the_wrapped_scheduler_is_detected():
    sched = traceable(DDIMScheduler())
    sched.set_timesteps(10)
    sched.scheduler.set_timesteps(20)
    x = initial_sample(sched, torch.float32)
    with pytest.raises(ValueError, match="set_timesteps on the adapter"):
        sched.step(x, sched.timesteps[0], x)


# --------------------------------------------------------------------------- #
# scan_loop: the whole loop as scans, same numbers
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_scan_loop_gives_the_same_samples_as_diffusers(case, dtype):
    expected, actual, sched = run_pair(case, 20, dtype, form="scan")
    assert torch.isfinite(expected).all()
    assert_exact(actual, expected)
    assert sched.step_index == 0  # the step counter is not moved


@pytest.mark.parametrize("case, runs", [
    ("ddim-default", [(0, 20, False, {"eta": 0.0, "use_clipped_model_output": False})]),
    ("ddpm-default", [(0, 19, True, {}), (19, 20, False, {})]),  # the last step (t = 0) draws no noise
    ("euler-ancestral-default", [(0, 20, True, {})]),
])
def test_scan_loop_runs_one_scan_per_run_of_positions_that_agree(case, runs):
    cls, config, step_kwargs, _ = CASES[case]
    sched = traceable(cls(**config))
    sched.set_timesteps(20)
    assert sched._runs(**step_kwargs) == runs


def test_euler_churn_splits_the_loop_where_sigma_leaves_the_churn_range():
    cls, config, step_kwargs, _ = CASES["euler-karras-churn"]
    sched = traceable(cls(**config))
    sched.set_timesteps(20)
    runs = sched._runs(**step_kwargs)
    assert [draws for _, _, draws, _ in runs] == [False, True, False]
    assert runs[0][0] == 0 and runs[-1][1] == 20


def test_compiled_scan_loop_is_one_graph_of_scans_and_matches_diffusers():
    expected, _, sched = run_pair("ddpm-default", 20, torch.float32, form="scan")
    x = initial_sample(sched, torch.float32)
    noise = sched.draw_noise(SHAPE, generator=seeded())
    counter = CountGraphs()
    model = TinyDenoiser()
    actual = torch.compile(lambda x, noise: sched.scan_loop(model, x, noise=noise), backend=counter)(x, noise)
    assert counter.graphs == 1
    assert_exact(actual, expected)


def test_scan_loop_starts_at_the_begin_index():
    model = TinyDenoiser()
    sched = traceable(EulerDiscreteScheduler())
    sched.set_timesteps(10)
    sched.set_begin_index(4)
    x = initial_sample(sched, torch.float32)
    expected = x
    for t in sched.timesteps[4:]:
        expected = sched.step(model(sched.scale_model_input(expected, t), t), t, expected).prev_sample
    assert_exact(sched.scan_loop(model, x), expected)


def test_scan_loop_asks_for_noise_where_steps_draw_it():
    sched = traceable(DDPMScheduler())
    sched.set_timesteps(10)
    x = initial_sample(sched, torch.float32)
    with pytest.raises(ValueError, match="these steps draw noise; pass noise=sched.draw_noise"):
        sched.scan_loop(TinyDenoiser(), x)
    with pytest.raises(ValueError, match=r"noise has shape \(10, 2, 4, 3\), expected \(10, 2, 4, 3, 3\)"):
        sched.scan_loop(TinyDenoiser(), x, noise=torch.zeros(10, 2, 4, 3))


def test_scan_loop_before_set_timesteps_raises():
    with pytest.raises(ValueError, match="call set_timesteps"):
        traceable(DDIMScheduler()).scan_loop(TinyDenoiser(), torch.zeros(SHAPE))


def test_the_adapters_are_reachable_after_import_seqpar_as_the_readme_uses_them():
    import seqpar

    assert callable(seqpar.diffusion.traceable)
