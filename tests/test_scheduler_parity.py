"""Full-sampling-loop parity of `GaussianDiffusionScheduler.step` with diffusers' `DDPMScheduler` / `DDIMScheduler`.

Every loop runs ours and the diffusers scheduler side by side from the same x_T, with the same fixed random
model-output function and two generators seeded alike, in float32, and asserts max |Δx| <= 1e-5 after every step.

Where ours deliberately follows improved-diffusion (IDM) / DDPM instead of DDPMScheduler, the reference is adapted
and the test says so:
    * `variance_type="learned"`: ours reads the extra channels as log σ² (IDM); DDPMScheduler reads them as σ².
      The reference gets exp(v) for the same v.
    * `variance_type="fixed_large_log"`: DDPMScheduler takes sqrt(log β) (NaN); ours samples with σ² = β, so the
      reference is DDPMScheduler with `fixed_large`.
    * chains whose last timestep is > 0 (trailing spacing, `steps_offset`): DDPMScheduler adds noise at the last
      step; ours returns the mean (DDPM Alg. 2, IDM). The last step is compared with DDPMScheduler's mean (a
      `fixed_small` twin, whose noise there is σ = 1e-10).
    * learned_range at the chain's first timestep uses IDM's clipped log β̃, but no noise is added there, so the
      sample is unaffected; the IDM formula itself is tested in test_scheduler.py.
"""

import itertools

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler

SHAPE = (2, 3, 4, 4)  # (B, C, H, W)
SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTIONS = ("epsilon", "sample", "v_prediction")
VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
TOL = 1e-5



def random_model(num_train_timesteps, out_channels, seed=1):
    """A fixed random function (x, t) -> output: tanh(W x + b_t), per-channel W and per-timestep b."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_channels, SHAPE[1], generator=g) * 0.5
    bias = torch.randn(num_train_timesteps, out_channels, generator=g)

    def model(x, t):
        return torch.tanh(torch.einsum("oc,bchw->bohw", weight, x) + bias[int(t)][None, :, None, None])

    return model


def run_ddpm_parity(config, num_inference_steps=None):
    """Run the two sampling loops; return the max abs difference over all steps."""
    variance_type = config["variance_type"]
    ours = GaussianDiffusionScheduler(**config)
    ref_variance = {"fixed_large_log": "fixed_large"}.get(variance_type, variance_type)
    ref = DDPMScheduler(**{**config, "variance_type": ref_variance})
    ref_mean = DDPMScheduler(**{**config, "variance_type": "fixed_small"})
    if num_inference_steps is not None:
        for s in (ours, ref, ref_mean):
            s.set_timesteps(num_inference_steps)
    assert torch.equal(ours.timesteps, ref.timesteps)

    C = SHAPE[1]
    learned = variance_type in ("learned", "learned_range")
    model = random_model(config.get("num_train_timesteps", 1000), 2 * C if learned else C)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    y = x.clone()
    g_ours, g_ref = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    worst = 0.0
    timesteps = ours.timesteps
    for i, t in enumerate(timesteps):
        out = model(x, t)
        if variance_type == "learned":
            # Ours: extra channels are log σ² (IDM). Shift them to a plausible range [-7, -5].
            out = torch.cat([out[:, :C], out[:, C:] - 6.0], dim=1)
        x = ours.step(out, t, x, generator=g_ours).prev_sample

        ref_out = model(y, t)
        if variance_type == "learned":
            ref_out = torch.cat([ref_out[:, :C], torch.exp(ref_out[:, C:] - 6.0)], dim=1)  # diffusers wants σ²
        if i == len(timesteps) - 1 and t > 0:
            y = ref_mean.step(ref_out[:, :C], t, y).prev_sample  # noise-free last step (see module docstring)
        else:
            y = ref.step(ref_out, t, y, generator=g_ref).prev_sample
        assert torch.isfinite(x).all()
        worst = max(worst, (x - y).abs().max().item())
    return worst


CASES = list(itertools.product(SCHEDULES, PREDICTIONS, VARIANCES))
RESPACED = [(n, spacing) for spacing in ("leading", "linspace", "trailing") for n in (10, 50)]


@pytest.mark.parametrize("schedule,prediction,variance", CASES)
def test_step_parity_every_schedule_prediction_variance(schedule, prediction, variance):
    """Each schedule x prediction x variance: a full-length chain (T = 50) and respaced runs with 10 steps for
    every spacing plus one 50-step run (the spacing rotates over the cases, so all spacings get 50 steps)."""
    i = CASES.index((schedule, prediction, variance))
    base = dict(beta_schedule=schedule, prediction_type=prediction, variance_type=variance)
    assert run_ddpm_parity({**base, "num_train_timesteps": 50}) <= TOL
    for spacing in ("leading", "linspace", "trailing"):
        assert run_ddpm_parity({**base, "timestep_spacing": spacing}, 10) <= TOL
    n, spacing = RESPACED[i % len(RESPACED)]
    assert run_ddpm_parity({**base, "timestep_spacing": spacing}, n) <= TOL


T1000_CASES = [
    (SCHEDULES[i % len(SCHEDULES)], PREDICTIONS[i % len(PREDICTIONS)], variance) for i, variance in enumerate(VARIANCES)
]


@pytest.mark.parametrize("schedule,prediction,variance", T1000_CASES)
def test_step_parity_full_chain_T1000(schedule, prediction, variance):
    """The full 1000-step chain (every variance type; schedules and predictions rotate). Near t = 0, 1 − ᾱ is ~1e-4, so
    this checks that float32 sampling reproduces DDPMScheduler's float32 arithmetic, not just its formulas."""
    config = dict(beta_schedule=schedule, prediction_type=prediction, variance_type=variance)
    assert run_ddpm_parity(config) <= TOL


@pytest.mark.parametrize(
    "extra,num_inference_steps",
    [
        (dict(clip_sample=False), None),
        (dict(thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9), 50),
        (dict(clip_sample_range=0.5, variance_type="learned_range"), 50),
        (dict(steps_offset=1, variance_type="fixed_large"), 10),  # last timestep 1 > 0
        (dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"), 50),
        (dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", variance_type="learned_range"), None),
        (dict(trained_betas=torch.linspace(1e-3, 0.05, 100).tolist(), num_train_timesteps=100), None),
        (dict(beta_schedule="laplace", num_train_timesteps=100), 20),
        (dict(timestep_spacing="trailing", num_train_timesteps=999), 7),
    ],
)
def test_step_parity_other_settings(extra, num_inference_steps):
    """Clipping off / range, dynamic thresholding, steps_offset, zero terminal SNR, trained betas, laplace, uneven
    trailing spacing."""
    config = {"prediction_type": "epsilon", "variance_type": "fixed_small", **extra}
    assert run_ddpm_parity(config, num_inference_steps) <= TOL


def test_step_parity_custom_timesteps():
    config = dict(variance_type="learned_range", prediction_type="v_prediction")
    custom = [999, 800, 650, 400, 399, 100, 7, 0]
    ours, ref = GaussianDiffusionScheduler(**config), DDPMScheduler(**config)
    ours.set_timesteps(timesteps=custom)
    ref.set_timesteps(timesteps=custom)
    model = random_model(1000, 6)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    y = x.clone()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for t in ours.timesteps:
        x = ours.step(model(x, t), t, x, generator=g1).prev_sample
        y = ref.step(model(y, t), t, y, generator=g2).prev_sample
        assert (x - y).abs().max().item() <= TOL


def run_ddim_parity(config, num_inference_steps, eta, learned=False):
    ours = GaussianDiffusionScheduler(**config, sampler="ddim", eta=eta)
    ref = DDIMScheduler(**{k: v for k, v in config.items() if k != "variance_type"})
    ours.set_timesteps(num_inference_steps)
    ref.set_timesteps(num_inference_steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    C = SHAPE[1]
    model = random_model(1000, 2 * C if learned else C)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    y = x.clone()
    g_ours, g_ref = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    worst = 0.0
    for t in ours.timesteps:
        x = ours.step(model(x, t), t, x, generator=g_ours).prev_sample
        y = ref.step(model(y, t)[:, :C], t, y, eta=eta, generator=g_ref).prev_sample
        worst = max(worst, (x - y).abs().max().item())
    return worst


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_parity(eta, prediction):
    """`sampler="ddim"` vs DDIMScheduler.step with the same η and generator. DDIMScheduler takes the previous
    timestep as t − T//n, which is the chain's previous timestep for leading and (T % n == 0) trailing spacing."""
    base = dict(prediction_type=prediction)
    assert run_ddim_parity({**base, "timestep_spacing": "leading"}, 10, eta) <= TOL
    assert run_ddim_parity({**base, "timestep_spacing": "trailing"}, 50, eta) <= TOL
    assert run_ddim_parity({**base, "steps_offset": 1, "beta_schedule": "scaled_linear"}, 50, eta) <= TOL


def test_ddim_parity_learned_variance_model_and_no_clipping():
    """A 2C-output model in DDIM mode: the variance half is ignored; clip_sample=False; cosine schedule."""
    config = dict(variance_type="learned_range", clip_sample=False, beta_schedule="squaredcos_cap_v2")
    assert run_ddim_parity(config, 25, 0.5, learned=True) <= TOL


def run_ddim_step_kwargs_parity(ours, ref, num_inference_steps, step_kwargs, ours_step_kwargs=None):
    """Sample with `ours.step(..., **ours_step_kwargs)` and `ref.step(..., **step_kwargs)` from the same x_T, model
    and generator seed; return the max abs difference over all steps."""
    ours.set_timesteps(num_inference_steps)
    ref.set_timesteps(num_inference_steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    model = random_model(1000, SHAPE[1])
    x = 2 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))  # x̂_0 often outside [-1, 1]
    y = x.clone()
    g_ours, g_ref = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    worst = 0.0
    for t in ours.timesteps:
        x = ours.step(model(x, t), t, x, generator=g_ours, **(ours_step_kwargs or step_kwargs)).prev_sample
        y = ref.step(model(y, t), t, y, generator=g_ref, **step_kwargs).prev_sample
        worst = max(worst, (x - y).abs().max().item())
    return worst


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("use_clipped_model_output", [False, True])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_step_eta_clipped_output_and_set_alpha_to_one_match_ddim_scheduler(
    prediction, use_clipped_model_output, set_alpha_to_one
):
    """`step(eta=, use_clipped_model_output=)` and the `set_alpha_to_one` key mean what they mean in
    DDIMScheduler: ours is built with `from_config(DDIMScheduler(...).config)` (which selects sampler="ddim") and
    the per-call η overrides the config's."""
    for eta, spacing, steps in ((0.0, "leading", 10), (0.4, "trailing", 25), (1.0, "leading", 50)):
        config = dict(prediction_type=prediction, set_alpha_to_one=set_alpha_to_one, timestep_spacing=spacing,
                      steps_offset=1 if spacing == "leading" else 0)
        ref = DDIMScheduler(**config)
        ours = GaussianDiffusionScheduler.from_config(ref.config, eta=0.9)  # config η is overridden per call
        assert ours.config.sampler == "ddim" and ours.config.set_alpha_to_one is set_alpha_to_one
        kwargs = dict(eta=eta, use_clipped_model_output=use_clipped_model_output)
        assert run_ddim_step_kwargs_parity(ours, ref, steps, kwargs) <= TOL, (eta, spacing)


def test_set_alpha_to_one_false_changes_the_last_step_as_in_ddim_scheduler():
    """With set_alpha_to_one=False the last DDIM step goes to ᾱ_0, not 1, and η-noise is added there; both
    DDIMScheduler and ours differ from the set_alpha_to_one=True chain by the same amount."""
    ref_true, ref_false = DDIMScheduler(), DDIMScheduler(set_alpha_to_one=False)
    ours_true = GaussianDiffusionScheduler.from_config(ref_true.config)
    ours_false = GaussianDiffusionScheduler.from_config(ref_false.config)
    kwargs = dict(eta=0.5)
    assert run_ddim_step_kwargs_parity(ours_false, ref_false, 10, kwargs) <= TOL
    assert run_ddim_step_kwargs_parity(ours_true, ref_true, 10, kwargs) <= TOL
    assert run_ddim_step_kwargs_parity(ours_false, ref_true, 10, kwargs) > 1e-3  # the key has an effect
    # The DDPM sampler ignores the key (DDPMScheduler has none): it always ends on the data.
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    model = random_model(1000, SHAPE[1])
    for t in (999, 0):
        a = GaussianDiffusionScheduler(set_alpha_to_one=False).step(model(x, t), t, x, torch.Generator().manual_seed(0))
        b = GaussianDiffusionScheduler().step(model(x, t), t, x, torch.Generator().manual_seed(0))
        assert torch.equal(a.prev_sample, b.prev_sample)


def test_ddpm_sampler_refuses_ddim_step_arguments():
    s = GaussianDiffusionScheduler()
    x = torch.randn(SHAPE)
    for kwargs in (dict(eta=0.0), dict(use_clipped_model_output=True)):
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))}=.*sampler='ddim'"):
            s.step(x, 999, x, **kwargs)
    ddim = GaussianDiffusionScheduler(sampler="ddim")
    for bad in (-0.5, float("nan"), "1"):
        with pytest.raises(ValueError, match="eta must be"):
            ddim.step(x, 999, x, eta=bad)
