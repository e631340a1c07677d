"""GaussianDiffusionScheduler: schedules, timesteps, closed forms, IDM conventions, errors, config interchange and
end-to-end sampling through DDPMPipeline. Full-loop step parity with diffusers is in test_scheduler_parity.py."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel

from diffusers_ddpm_ext.scheduler import (
    GaussianDiffusionModelOutput,
    GaussianDiffusionScheduler,
    GaussianDiffusionSchedulerOutput,
    make_betas,
    parse_respacing,
)

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
PREDICTIONS = ("epsilon", "sample", "v_prediction")



def public(config):
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def alphas_cumprod64(scheduler):
    """ᾱ recomputed independently in float64 from the configured β."""
    c = scheduler.config
    betas = make_betas(c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule, c.trained_betas,
                       c.rescale_betas_zero_snr, dtype=torch.float64).numpy()
    return np.cumprod(1 - betas)


# ------------------------------------------------------------------------------------------------------------------
# Schedules and diffusers interchange
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("rescale", [False, True])
def test_betas_and_alphas_cumprod_equal_diffusers(schedule, rescale):
    ours = GaussianDiffusionScheduler(beta_schedule=schedule, rescale_betas_zero_snr=rescale)
    ref = DDPMScheduler(beta_schedule=schedule, rescale_betas_zero_snr=rescale)
    for name in ("betas", "alphas", "alphas_cumprod"):
        assert getattr(ours, name).dtype == torch.float32
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name


def test_trained_betas_and_cosine_alias():
    betas = np.linspace(1e-3, 0.03, 50)
    ours = GaussianDiffusionScheduler(num_train_timesteps=50, trained_betas=betas)
    assert torch.equal(ours.alphas_cumprod, DDPMScheduler(num_train_timesteps=50, trained_betas=betas).alphas_cumprod)
    cos = GaussianDiffusionScheduler(beta_schedule="cosine")
    assert cos.config.beta_schedule == "squaredcos_cap_v2"  # stored under the diffusers name
    assert torch.equal(cos.betas, DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas)


def test_cosine_schedule_matches_formula():
    """SPEC §5 / IDM eq. 17: ᾱ(t) = cos²(((t/T + s)/(1 + s))·π/2), s = 0.008, β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999)."""
    T, s = 1000, 0.008
    f = lambda t: np.cos(((t / T + s) / (1 + s)) * np.pi / 2) ** 2  # noqa: E731
    t = np.arange(T, dtype=np.float64)
    expected = np.minimum(1 - f(t + 1) / f(t), 0.999)
    ours64 = make_betas(T, 0, 0, "cosine", dtype=torch.float64).numpy()
    np.testing.assert_allclose(ours64, expected, rtol=1e-12, atol=0)
    assert expected[-1] == 0.999  # the cap is active at the end
    sched = GaussianDiffusionScheduler(beta_schedule="cosine")
    np.testing.assert_allclose(sched.betas.numpy(), expected, rtol=1e-6)
    # ᾱ_t ≈ f(t + 1)/f(0) until the cap bites
    np.testing.assert_allclose(alphas_cumprod64(sched)[:900], (f(t + 1) / f(0))[:900], rtol=1e-9)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("offset", [0, 1])
def test_set_timesteps_equal_diffusers(spacing, offset):
    ours = GaussianDiffusionScheduler(timestep_spacing=spacing, steps_offset=offset)
    ref = DDPMScheduler(timestep_spacing=spacing, steps_offset=offset)
    ddim = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    assert torch.equal(ours.timesteps, ref.timesteps)  # before set_timesteps: the full chain
    for n in (1, 7, 10, 50, 333, 999):
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        ddim.set_timesteps(n)
        assert ours.timesteps.dtype == torch.int64 and ours.num_inference_steps == n
        assert torch.equal(ours.timesteps, ref.timesteps), n
        assert torch.equal(ours.timesteps, ddim.timesteps), n
    ours.set_timesteps(timesteps=[900, 500, 3])
    ref.set_timesteps(timesteps=[900, 500, 3])
    assert torch.equal(ours.timesteps, ref.timesteps)


def test_add_noise_and_velocity_equal_diffusers():
    ours, ref = GaussianDiffusionScheduler(beta_schedule="squaredcos_cap_v2"), DDPMScheduler(
        beta_schedule="squaredcos_cap_v2"
    )
    t = torch.tensor([0, 1, 500, 999])
    for dtype in (torch.float32, torch.float64):
        x0, noise = randn(4, 3, 5, 5, seed=1, dtype=dtype), randn(4, 3, 5, 5, seed=2, dtype=dtype)
        assert torch.equal(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
        assert torch.equal(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t))
    # add_noise is a draw from q(x_t | x_0): (x_t − mean)/σ recovers the noise. (add_noise uses the float32 ᾱ as
    # diffusers does, so compare with q_mean_variance on the same table.)
    x0, noise = x0.float(), noise.float()
    mean, var, log_var = ours.q_mean_variance(x0, t, compute_dtype=torch.float32)
    torch.testing.assert_close((ours.add_noise(x0, noise, t) - mean) / var.sqrt(), noise, rtol=0, atol=1e-4)
    mean64, var64, _ = ours.q_mean_variance(x0, t)  # float64 ᾱ: close, not equal, to the float32 table
    torch.testing.assert_close(var64, var, rtol=1e-3, atol=0)
    torch.testing.assert_close(log_var, var.log())


def test_interface_attributes():
    s = GaussianDiffusionScheduler(num_train_timesteps=123)
    assert len(s) == 123 and s.order == 1 and s.init_noise_sigma == 1.0
    assert "DDPMScheduler" in s._compatibles and "DDIMScheduler" in s._compatibles
    assert DDPMScheduler in s.compatibles
    x = randn(2, 3, 4, 4)
    assert s.scale_model_input(x, 5) is x
    assert s.previous_timestep(5) == 4 and s.previous_timestep(0) == -1
    s.set_timesteps(10)
    assert s.previous_timestep(int(s.timesteps[0])) == int(s.timesteps[1])
    assert s.previous_timestep(int(s.timesteps[-1])) == -1
    batch = s.previous_timestep(s.timesteps)  # vectorised
    assert batch.tolist() == s.timesteps[1:].tolist() + [-1]
    with pytest.raises(ValueError, match="not in the current schedule"):
        s.previous_timestep(int(s.timesteps[0]) - 1)


def test_from_config_both_ways_and_save_load(tmp_path):
    shared = dict(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                  prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing", steps_offset=1,
                  thresholding=True, sample_max_value=2.0, rescale_betas_zero_snr=True)
    ours = GaussianDiffusionScheduler(**shared, sampler="ddim", eta=0.3)
    ref = DDPMScheduler.from_config(ours.config)
    ref_direct = DDPMScheduler(**shared)
    back = GaussianDiffusionScheduler.from_config(DDPMScheduler(**shared).config)
    for key, value in shared.items():
        assert ref.config[key] == value and back.config[key] == value, key
    assert torch.equal(ref.alphas_cumprod, ours.alphas_cumprod)
    assert torch.equal(ref_direct.alphas_cumprod, back.alphas_cumprod)
    assert back.config.sampler == "ddpm" and back.config.eta == 0.0  # our defaults where diffusers has none
    ddim = DDIMScheduler.from_config(ours.config)  # what DDIMPipeline does
    assert ddim.config.prediction_type == "v_prediction" and torch.equal(ddim.alphas_cumprod, ours.alphas_cumprod)

    ours.save_pretrained(tmp_path / "ours")
    loaded = GaussianDiffusionScheduler.from_pretrained(tmp_path / "ours")
    assert public(loaded.config) == public(ours.config)
    assert DDPMScheduler.from_pretrained(tmp_path / "ours").config.variance_type == "learned_range"
    DDPMScheduler(**shared).save_pretrained(tmp_path / "ref")
    loaded = GaussianDiffusionScheduler.from_pretrained(tmp_path / "ref")
    assert all(loaded.config[k] == v for k, v in shared.items())


# ------------------------------------------------------------------------------------------------------------------
# Closed forms
# ------------------------------------------------------------------------------------------------------------------


def bayes_posterior(a_t, a_prev, x0, xt):
    """q(x_prev | x_t, x_0) by Gaussian conditioning, independent of the scheduler's formula:
    prior x_prev ~ N(√ᾱ_prev x0, 1 − ᾱ_prev); likelihood x_t | x_prev ~ N(√α' x_prev, 1 − α'), α' = ᾱ_t/ᾱ_prev."""
    alpha = a_t / a_prev
    precision = 1 / (1 - a_prev) + alpha / (1 - alpha)
    var = 1 / precision
    mean = var * (math.sqrt(a_prev) * x0 / (1 - a_prev) + math.sqrt(alpha) * xt / (1 - alpha))
    return mean, var


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_posterior_matches_gaussian_conditioning(schedule):
    s = GaussianDiffusionScheduler(beta_schedule=schedule)
    ab = alphas_cumprod64(s)
    x0, xt = randn(5, 2, 3, 3, seed=1, dtype=torch.float64), randn(5, 2, 3, 3, seed=2, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 500, 999])
    prev_custom = torch.tensor([0, 0, 3, 250, 0])
    for prev in (None, prev_custom):
        mean, var, log_var = s.q_posterior_mean_variance(x0, xt, t, prev)
        assert mean.dtype == torch.float64 and var.shape == (5, 1, 1, 1)
        p = (t - 1) if prev is None else prev
        for i in range(5):
            m_ref, v_ref = bayes_posterior(ab[t[i]], ab[p[i]], x0[i].numpy(), xt[i].numpy())
            np.testing.assert_allclose(mean[i].numpy(), m_ref, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(var[i].item(), v_ref, rtol=1e-9)
            np.testing.assert_allclose(log_var[i].item(), math.log(v_ref), rtol=1e-12)


def test_posterior_formula_and_idm_clipping_at_t0():
    """Ho et al. eq. 7 with β_t directly: β̃_t = β_t(1 − ᾱ_{t−1})/(1 − ᾱ_t); at t = 0 (β̃ = 0, mean = x_0) IDM's
    clipped log variance is log β̃_1."""
    s = GaussianDiffusionScheduler()
    betas = make_betas(1000, 1e-4, 0.02, "linear", dtype=torch.float64).numpy()
    ab = np.cumprod(1 - betas)
    x0, xt = randn(3, 1, 2, 2, seed=1, dtype=torch.float64), randn(3, 1, 2, 2, seed=2, dtype=torch.float64)
    t = torch.tensor([0, 1, 700])
    mean, var, log_var = s.q_posterior_mean_variance(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        a_prev = ab[ti - 1] if ti > 0 else 1.0
        coef0 = math.sqrt(a_prev) * betas[ti] / (1 - ab[ti])
        coeft = math.sqrt(1 - betas[ti]) * (1 - a_prev) / (1 - ab[ti])
        np.testing.assert_allclose(mean[i].numpy(), coef0 * x0[i].numpy() + coeft * xt[i].numpy(), rtol=1e-10)
        np.testing.assert_allclose(var[i].item(), betas[ti] * (1 - a_prev) / (1 - ab[ti]), rtol=1e-10, atol=0)
    beta_tilde_1 = betas[1] * (1 - ab[0]) / (1 - ab[1])
    assert var[0].item() == 0.0
    torch.testing.assert_close(mean[0], x0[0])
    np.testing.assert_allclose(log_var[0].item(), math.log(beta_tilde_1), rtol=1e-12)


def test_float64_default_is_more_accurate_than_float32_arithmetic():
    """Near t = 0, 1 − ᾱ ≈ 1e-4: float32 coefficients (diffusers' arithmetic, used by step for parity) are off by
    ~1e-4 relative; the default float64 path matches the closed form to ~1e-12."""
    s = GaussianDiffusionScheduler()
    x0, xt = randn(1, 1, 8, 8, seed=1), randn(1, 1, 8, 8, seed=2)
    t = torch.tensor([1])
    exact = s.q_posterior_mean_variance(x0.double(), xt.double(), t)[1].item()
    f64 = s.q_posterior_mean_variance(x0, xt, t)[1]
    f32 = s.q_posterior_mean_variance(x0, xt, t, compute_dtype=torch.float32)[1]
    assert f64.dtype == f32.dtype == torch.float32  # outputs follow the inputs' dtype
    assert abs(f64.item() / exact - 1) < 1e-6
    assert abs(f32.item() / exact - 1) > abs(f64.item() / exact - 1)


def test_snr():
    s = GaussianDiffusionScheduler()
    t = torch.tensor([0, 10, 999])
    ab = alphas_cumprod64(s)[t.numpy()]
    np.testing.assert_allclose(s.snr(t).numpy(), ab / (1 - ab), rtol=1e-6)
    assert s.snr(t, dtype=torch.float64).dtype == torch.float64
    from diffusers.training_utils import compute_snr

    torch.testing.assert_close(s.snr(t), compute_snr(DDPMScheduler(), t), rtol=2e-4, atol=0)


# ------------------------------------------------------------------------------------------------------------------
# Respacing
# ------------------------------------------------------------------------------------------------------------------


def test_parse_respacing_values():
    assert parse_respacing("ddim50", 1000) == list(range(0, 1000, 20))
    assert parse_respacing("10", 100) == list(range(0, 100, 11))
    assert parse_respacing("4", 10) == [0, 3, 6, 9]
    kept = parse_respacing("10,15,20", 1000)
    assert len(kept) == 45
    # sections of 334, 333, 333 steps; each section's first and last step are kept
    for start, size, count in ((0, 334, 10), (334, 333, 15), (667, 333, 20)):
        section = [k for k in kept if start <= k < start + size]
        assert len(section) == count and section[0] == start and section[-1] == start + size - 1
    k250 = parse_respacing("250", 1000)
    assert len(k250) == 250 and k250[0] == 0 and k250[-1] == 999
    np.testing.assert_allclose(k250, np.arange(250) * 999 / 249, atol=0.5 + 1e-9)  # nearest-integer rounding
    assert parse_respacing([2, 3], 10) == [0, 4, 5, 7, 9]
    assert parse_respacing("1000", 1000) == list(range(1000))


@pytest.mark.parametrize("spec", ["ddim50", "10,15,20", "25", [3, 0, 7]])
def test_respaced_chain_equals_rebuilt_schedule(spec):
    """IDM's construction: a respaced chain is the diffusion with β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}}. Building a new
    scheduler from those β' (trained_betas) must give the same posteriors and model distributions (all variance
    types), including the clipped log variance at the first step."""
    base = GaussianDiffusionScheduler(beta_schedule="squaredcos_cap_v2")
    base.set_timesteps(respacing=spec)
    kept = base.timesteps.flip(0)  # ascending
    ab = alphas_cumprod64(base)
    ab_kept = ab[kept.numpy()]
    beta_prime = 1 - ab_kept / np.concatenate([[1.0], ab_kept[:-1]])
    n = len(kept)
    x0, xt = randn(n, 2, 3, 3, seed=1, dtype=torch.float64), randn(n, 2, 3, 3, seed=2, dtype=torch.float64)
    out = randn(n, 4, 3, 3, seed=3, dtype=torch.float64).tanh()
    prev = base.previous_timestep(kept)
    assert prev[0] == -1 and torch.equal(prev[1:], kept[:-1])
    for variance_type in ("fixed_small", "fixed_large", "learned", "learned_range"):
        spaced = GaussianDiffusionScheduler.from_config(base.config, variance_type=variance_type)
        spaced.set_timesteps(respacing=spec)
        rebuilt = GaussianDiffusionScheduler(num_train_timesteps=n, trained_betas=beta_prime,
                                             variance_type=variance_type)
        local = torch.arange(n)
        for a, b in zip(spaced.q_posterior_mean_variance(x0, xt, kept, prev),
                        rebuilt.q_posterior_mean_variance(x0, xt, local)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        pa = spaced.p_mean_variance(out, xt, kept, prev, clip_denoised=True)
        pb = rebuilt.p_mean_variance(out, xt, local, clip_denoised=True)
        for key in ("mean", "variance", "log_variance", "pred_original_sample", "pred_epsilon"):
            torch.testing.assert_close(pa[key], pb[key], rtol=1e-9, atol=1e-12)
    # the β' used by the chain is the direct ratio of the kept ᾱ
    large = GaussianDiffusionScheduler.from_config(base.config, variance_type="fixed_large")
    large.set_timesteps(respacing=spec)
    var_large = large.p_mean_variance(out[:, :2], xt, kept, prev).variance.flatten()[1:]
    np.testing.assert_allclose(var_large.numpy(), beta_prime[1:], rtol=1e-10)


def test_respacing_through_num_inference_steps_string():
    s = GaussianDiffusionScheduler()
    s.set_timesteps("ddim50")
    assert s.timesteps.tolist() == list(range(980, -1, -20)) and s.num_inference_steps == 50
    s.set_timesteps(respacing="10,15,20")
    assert len(s.timesteps) == 45 and s.timesteps[-1] == 0


# ------------------------------------------------------------------------------------------------------------------
# p_mean_variance: prediction and variance types
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_p_mean_variance_recovers_posterior_from_exact_prediction(prediction):
    """An exact prediction (ε, x_0 or v) of a known draw gives x̂_0 = x_0, ε̂ = ε and the true posterior mean."""
    s = GaussianDiffusionScheduler(prediction_type=prediction)
    x0, noise = randn(4, 3, 4, 4, seed=1, dtype=torch.float64), randn(4, 3, 4, 4, seed=2, dtype=torch.float64)
    t = torch.tensor([0, 5, 400, 999])
    mean, var, _ = s.q_mean_variance(x0, t)
    xt = mean + var.sqrt() * noise  # float64 draw from q(x_t | x_0)
    velocity = (mean / x0) * noise - var.sqrt() * x0  # √ᾱ ε − √(1 − ᾱ) x_0
    target = {"epsilon": noise, "sample": x0, "v_prediction": velocity}[prediction]
    out = s.p_mean_variance(target, xt, t)
    assert isinstance(out, GaussianDiffusionModelOutput)
    torch.testing.assert_close(out.pred_original_sample, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(out.pred_epsilon, noise, rtol=0, atol=1e-9)
    mean_q = s.q_posterior_mean_variance(x0, xt, t)[0]
    torch.testing.assert_close(out.mean, mean_q, rtol=0, atol=1e-10)


def test_p_mean_variance_variance_types_follow_idm():
    """IDM Sec. 3.1 and eq. 15. At t = 0 (the chain's first step) ours follows IDM, not DDPMScheduler:
    fixed_small/learned_range use the clipped log β̃ = log β̃_1 (DDPMScheduler: log 1e-20) and fixed_large uses
    β̃_1 (IDM's better decoder); elsewhere fixed_large is β_t."""
    betas = make_betas(1000, 1e-4, 0.02, "linear", dtype=torch.float64).numpy()
    ab = np.cumprod(1 - betas)
    beta_tilde = lambda t: betas[t] * (1 - ab[t - 1]) / (1 - ab[t])  # noqa: E731  (t >= 1)
    t = torch.tensor([0, 1, 600])
    xt = randn(3, 2, 2, 2, seed=1, dtype=torch.float64)
    eps = randn(3, 2, 2, 2, seed=2, dtype=torch.float64)
    v = randn(3, 2, 2, 2, seed=3, dtype=torch.float64).tanh()
    out2c = torch.cat([eps, v], dim=1)
    outs = {k: GaussianDiffusionScheduler(variance_type=k).p_mean_variance(
        out2c if k.startswith("learned") else eps, xt, t) for k in
        ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")}
    clipped_log = np.log([beta_tilde(1), beta_tilde(1), beta_tilde(600)])
    small_var = [0.0, beta_tilde(1), beta_tilde(600)]
    large_var = [beta_tilde(1), betas[1], betas[600]]
    for k in ("fixed_small", "fixed_small_log"):
        np.testing.assert_allclose(outs[k].variance.flatten().numpy(), small_var, rtol=1e-10)
        np.testing.assert_allclose(outs[k].log_variance.flatten().numpy(), clipped_log, rtol=1e-12)
    for k in ("fixed_large", "fixed_large_log"):
        np.testing.assert_allclose(outs[k].variance.flatten().numpy(), large_var, rtol=1e-10)
        np.testing.assert_allclose(outs[k].log_variance.flatten().numpy(), np.log(large_var), rtol=1e-12)
    torch.testing.assert_close(outs["learned"].log_variance, v)
    torch.testing.assert_close(outs["learned"].variance, v.exp())
    frac = (v + 1) / 2
    max_log = torch.tensor(np.log(betas[t.numpy()])).view(3, 1, 1, 1)
    expected = frac * max_log + (1 - frac) * torch.tensor(clipped_log).view(3, 1, 1, 1)
    torch.testing.assert_close(outs["learned_range"].log_variance, expected, rtol=1e-12, atol=1e-12)
    for k in outs:  # means do not depend on the variance type
        torch.testing.assert_close(outs[k].mean, outs["fixed_small"].mean)


def test_p_mean_variance_clip_and_dtype():
    s = GaussianDiffusionScheduler(prediction_type="sample")
    xt, x0 = randn(2, 1, 3, 3, seed=1), 3 * randn(2, 1, 3, 3, seed=2)
    t = torch.tensor([10, 20])
    assert torch.equal(s.p_mean_variance(x0, xt, t).pred_original_sample, x0)
    clipped = s.p_mean_variance(x0, xt, t, clip_denoised=True)
    assert torch.equal(clipped.pred_original_sample, x0.clamp(-1, 1))
    assert clipped.mean.dtype == torch.float32 and clipped.log_variance.shape == (2, 1, 1, 1)
    th = GaussianDiffusionScheduler(prediction_type="sample", thresholding=True, sample_max_value=2.0,
                                    dynamic_thresholding_ratio=0.5)
    out = th.p_mean_variance(x0, xt, t, clip_denoised=True).pred_original_sample
    for i in range(2):  # per-sample scale s = clamp(median |x0|, 1, 2); x0 ← clamp(x0, ±s)/s
        scale = x0[i].abs().flatten().quantile(0.5).clamp(1, 2)
        torch.testing.assert_close(out[i], x0[i].clamp(-scale, scale) / scale)


def test_split_model_output():
    x = randn(2, 3, 4, 4)
    learned = GaussianDiffusionScheduler(variance_type="learned_range")
    fixed = GaussianDiffusionScheduler()
    out = randn(2, 6, 4, 4)
    pred, var = learned.split_model_output(out, x)
    assert torch.equal(pred, out[:, :3]) and torch.equal(var, out[:, 3:])
    pred, var = fixed.split_model_output(out, x)  # a 2C model with a fixed variance: variance half dropped
    assert torch.equal(pred, out[:, :3]) and var is None
    assert fixed.split_model_output(x, x) == (x, None)
    with pytest.raises(ValueError, match="2 x 3 channels"):
        learned.split_model_output(x, x)
    with pytest.raises(ValueError, match="does not match"):
        fixed.split_model_output(randn(2, 4, 4, 4), x)


# ------------------------------------------------------------------------------------------------------------------
# step
# ------------------------------------------------------------------------------------------------------------------


def test_step_last_step_is_the_mean_and_generator_reproducible():
    s = GaussianDiffusionScheduler(variance_type="fixed_large", timestep_spacing="trailing")
    s.set_timesteps(10)
    x, out = randn(2, 3, 4, 4, seed=1), randn(2, 3, 4, 4, seed=2)
    last = s.timesteps[-1]
    assert last > 0  # trailing: the chain ends at t = 99
    a = s.step(out, last, x, generator=torch.Generator().manual_seed(0)).prev_sample
    b = s.step(out, last, x, generator=torch.Generator().manual_seed(1)).prev_sample
    mean = s.p_mean_variance(out, x, torch.full((2,), int(last)), torch.full((2,), -1), clip_denoised=True,
                             compute_dtype=torch.float32).mean
    assert torch.equal(a, b) and torch.equal(a, mean)
    first = s.timesteps[0]
    a = s.step(out, first, x, generator=torch.Generator().manual_seed(0))
    b = s.step(out, first, x, generator=torch.Generator().manual_seed(0))
    c = s.step(out, first, x, generator=torch.Generator().manual_seed(1))
    assert isinstance(a, GaussianDiffusionSchedulerOutput)
    assert torch.equal(a.prev_sample, b.prev_sample) and not torch.equal(a.prev_sample, c.prev_sample)
    prev, x0 = s.step(out, first, x, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert torch.equal(prev, a.prev_sample) and torch.equal(x0, a.pred_original_sample)


def test_step_float64_and_python_int_timestep():
    s = GaussianDiffusionScheduler(variance_type="learned_range")
    x, out = randn(1, 2, 3, 3, dtype=torch.float64), randn(1, 4, 3, 3, dtype=torch.float64)
    res = s.step(out, 500, x, generator=torch.Generator().manual_seed(0))
    assert res.prev_sample.dtype == torch.float64 and torch.isfinite(res.prev_sample).all()


# ------------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(beta_schedule="quadratic"), "beta_schedule='quadratic'.*linear"),
        (dict(prediction_type="x0"), "prediction_type='x0'.*epsilon"),
        (dict(variance_type="small"), "variance_type='small'.*fixed_small"),
        (dict(timestep_spacing="even"), "timestep_spacing='even'.*leading"),
        (dict(sampler="euler"), "sampler='euler'.*ddim"),
        (dict(eta=-1.0), "eta"),
        (dict(num_train_timesteps=0), "num_train_timesteps"),
        (dict(trained_betas=[0.1, 0.2]), "trained_betas"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianDiffusionScheduler(**kwargs)


@pytest.mark.parametrize(
    "call,match",
    [
        (dict(num_inference_steps=1001), "cannot exceed"),
        (dict(timesteps=[10, 20]), "strictly descending"),
        (dict(timesteps=[500, 500]), "strictly descending"),
        (dict(timesteps=[1000, 5]), r"\[0, 1000\)"),
        (dict(timesteps=[5, -1]), r"\[0, 1000\)"),
        (dict(respacing="ddimx"), "malformed respacing"),
        (dict(respacing="10,a"), "malformed respacing"),
        (dict(respacing=""), "malformed respacing"),
        (dict(respacing="-5"), "malformed respacing"),
        (dict(respacing="600,600"), "cannot take 600"),
        (dict(respacing="ddim999"), "no integer stride"),
        (dict(num_inference_steps=10, timesteps=[5]), "exactly one"),
        (dict(), "exactly one"),
        (dict(num_inference_steps=0), "positive int"),
    ],
)
def test_set_timesteps_errors(call, match):
    with pytest.raises(ValueError, match=match):
        GaussianDiffusionScheduler().set_timesteps(**call)


def test_timestep_range_and_learned_variance_errors():
    s = GaussianDiffusionScheduler(variance_type="learned")
    x = randn(2, 3, 4, 4)
    bad = torch.tensor([3, 1000])
    for fn in (lambda: s.add_noise(x, x, bad), lambda: s.get_velocity(x, x, bad), lambda: s.q_mean_variance(x, bad),
               lambda: s.q_posterior_mean_variance(x, x, torch.tensor([-1, 3])), lambda: s.snr(bad),
               lambda: s.p_mean_variance(torch.cat([x, x], 1), x, bad), lambda: s.previous_timestep(1000)):
        with pytest.raises(ValueError, match=r"\[0, 1000\)"):
            fn()
    with pytest.raises(ValueError, match="prev < t"):
        s.q_posterior_mean_variance(x, x, torch.tensor([5, 5]), torch.tensor([5, 2]))
    with pytest.raises(ValueError, match="2 x 3 channels"):
        s.step(x, 10, x)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="not in the current schedule"):
        s.step(torch.cat([x, x], 1), 5, x)


# ------------------------------------------------------------------------------------------------------------------
# End to end through diffusers pipelines
# ------------------------------------------------------------------------------------------------------------------


def tiny_unet(in_channels=1, out_channels=1):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=in_channels, out_channels=out_channels,
                       block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


@pytest.mark.parametrize(
    "config,out_channels",
    [
        (dict(), 1),
        (dict(variance_type="learned_range", beta_schedule="squaredcos_cap_v2"), 2),  # 2C learned-variance UNet
        (dict(prediction_type="v_prediction", timestep_spacing="linspace", variance_type="fixed_large"), 1),
    ],
)
def test_ddpm_pipeline_matches_diffusers(config, out_channels):
    """`pipeline(num_inference_steps=50)` runs our respaced chain and gives diffusers' images (same generator)."""
    unet = tiny_unet(out_channels=out_channels).eval()
    ours = DDPMPipeline(unet=unet, scheduler=GaussianDiffusionScheduler(**config))
    ours.set_progress_bar_config(disable=True)
    ref = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**config))
    ref.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=2, num_inference_steps=50, output_type="np")
    a = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert ours.scheduler.num_inference_steps == 50 and len(ours.scheduler.timesteps) == 50
    ref.scheduler.set_timesteps(50)
    assert torch.equal(ours.scheduler.timesteps, ref.scheduler.timesteps)
    b = ref(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.shape == (2, 8, 8, 1) and np.isfinite(a).all()
    assert np.abs(a - b).max() <= 1e-5


def test_ddim_mode_in_ddpm_pipeline_matches_ddim_pipeline():
    unet = tiny_unet().eval()
    ours = DDPMPipeline(unet=unet, scheduler=GaussianDiffusionScheduler(sampler="ddim", eta=0.5))
    ours.set_progress_bar_config(disable=True)
    ddim = DDIMPipeline(unet=unet, scheduler=GaussianDiffusionScheduler())  # converts to DDIMScheduler
    ddim.set_progress_bar_config(disable=True)
    assert isinstance(ddim.scheduler, DDIMScheduler)
    a = ours(batch_size=2, num_inference_steps=20, generator=torch.Generator().manual_seed(0), output_type="np")
    b = ddim(batch_size=2, num_inference_steps=20, eta=0.5, generator=torch.Generator().manual_seed(0),
             output_type="np")
    assert np.abs(a.images - b.images).max() <= 1e-5


def test_pipeline_save_and_load(tmp_path):
    unet = tiny_unet(out_channels=2).eval()
    pipe = DDPMPipeline(unet=unet, scheduler=GaussianDiffusionScheduler(variance_type="learned_range"))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, GaussianDiffusionScheduler)
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    a = pipe(batch_size=1, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np")
    b = loaded(batch_size=1, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np")
    np.testing.assert_allclose(a.images, b.images, rtol=0, atol=1e-5)  # reloaded conv weights: ~1e-6 float noise


def test_pipeline_with_ddpm_unet():
    """Our UNet (2C learned-variance output) sampled through DDPMPipeline with our scheduler."""
    from diffusers_ddpm_ext.unet import DDPMUNet2DModel

    torch.manual_seed(0)
    unet = DDPMUNet2DModel.from_preset("digits-small", out_channels=2).eval()
    pipe = DDPMPipeline(unet=unet, scheduler=GaussianDiffusionScheduler(variance_type="learned_range"))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 16, 16, 1) and np.isfinite(images).all()


# ------------------------------------------------------------------------------------------------------------------
# Structure: one vocabulary, coefficient tables built once per chain
# ------------------------------------------------------------------------------------------------------------------


def test_vocabulary_is_defined_once_in_the_scheduler():
    import typing

    from diffusers_ddpm_ext import losses, scheduler

    assert losses.PREDICTION_TYPES is scheduler.PREDICTION_TYPES
    assert losses.LEARNED_VARIANCE_TYPES is scheduler.LEARNED_VARIANCE_TYPES
    assert set(scheduler.LEARNED_VARIANCE_TYPES) < set(scheduler.VARIANCE_TYPES)
    hints = typing.get_type_hints(GaussianDiffusionScheduler.__init__)
    for name, allowed in (("variance_type", scheduler.VARIANCE_TYPES), ("prediction_type", scheduler.PREDICTION_TYPES),
                          ("timestep_spacing", scheduler.TIMESTEP_SPACINGS), ("sampler", scheduler.SAMPLERS)):
        assert typing.get_args(hints[name]) == allowed, name  # the signature's Literal is the checked tuple


def test_coefficient_tables_are_built_once_per_chain(monkeypatch):
    """As in improved-diffusion: tables are built in __init__ and set_timesteps, and sampling only reads them."""
    import diffusers_ddpm_ext.scheduler as module

    builds = []
    real = module._step_table
    monkeypatch.setattr(module, "_step_table", lambda *a, **k: builds.append(1) or real(*a, **k))
    for sampler in ("ddpm", "ddim"):
        s = GaussianDiffusionScheduler(sampler=sampler, eta=0.5, variance_type="learned_range")
        s.set_timesteps(20)
        built = len(builds)
        x = randn(2, 1, 4, 4)
        for t in s.timesteps:
            out = randn(2, 2, 4, 4, seed=int(t)).tanh()
            x = s.step(out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
        s.p_mean_variance(randn(2, 2, 4, 4), x, torch.tensor([3, 7]))  # the training chain: a read too
        assert len(builds) == built, sampler


def test_from_config_of_a_ddim_folder_samples_as_ddim(tmp_path):
    DDIMScheduler(set_alpha_to_one=False, prediction_type="v_prediction").save_pretrained(tmp_path)
    loaded = GaussianDiffusionScheduler.from_pretrained(tmp_path)
    assert loaded.config.sampler == "ddim" and loaded.config.set_alpha_to_one is False
    assert GaussianDiffusionScheduler.from_pretrained(tmp_path, sampler="ddpm").config.sampler == "ddpm"
    assert GaussianDiffusionScheduler.from_config(DDPMScheduler().config).config.sampler == "ddpm"


# ------------------------------------------------------------------------------------------------------------------
# Swapping schedulers without diffusers' "config attributes ... are not expected" warning
# ------------------------------------------------------------------------------------------------------------------

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import diffusers  # noqa: E402
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers  # noqa: E402
from diffusers.utils import DummyObject  # noqa: E402

from diffusers_ddpm_ext import scheduler as scheduler_module  # noqa: E402

OWN_KEYS = ("sampler", "eta", "analytic_gamma")  # our keys that no diffusers scheduler takes
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "saved_c44c80e", "unconditional", "scheduler")
# Every scheduler of KarrasDiffusionSchedulers that is installed (DPMSolverSDEScheduler needs torchsde).
KARRAS = [getattr(diffusers, e.name) for e in KarrasDiffusionSchedulers
          if not isinstance(getattr(diffusers, e.name), DummyObject)]


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def diffusers_warnings(fn, *args, **kwargs):
    """(result, warnings logged by diffusers while calling fn); diffusers' loggers do not propagate to the root."""
    handler = _Warnings()
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        result = fn(*args, **kwargs)
    finally:
        logger.removeHandler(handler)
    return result, handler.messages


def non_default_scheduler(T=50):
    return GaussianDiffusionScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", sampler="ddim",
                                      eta=0.5, set_alpha_to_one=False, variance_type="analytic",
                                      analytic_gamma=[1.0 + t / T for t in range(T)])


def test_every_karras_scheduler_swaps_from_ours_and_back_without_warning(tmp_path):
    assert len(KARRAS) >= len(KarrasDiffusionSchedulers) - 1
    non_default = non_default_scheduler()
    non_default.save_pretrained(tmp_path / "non_default")
    GaussianDiffusionScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(tmp_path / "default")
    sources = {
        "built in memory": non_default,
        "saved, non-default keys": GaussianDiffusionScheduler.from_pretrained(tmp_path / "non_default"),
        "saved, defaults": GaussianDiffusionScheduler.from_pretrained(tmp_path / "default"),
        "saved by an earlier release": GaussianDiffusionScheduler.from_pretrained(FIXTURE),
    }
    for label, ours in sources.items():
        for cls in KARRAS:
            theirs, messages = diffusers_warnings(cls.from_config, ours.config)
            assert messages == [], (label, cls.__name__)
            back, messages = diffusers_warnings(GaussianDiffusionScheduler.from_config, theirs.config)
            assert messages == [], (label, cls.__name__)
            # both ways keep working: the keys the diffusers scheduler does not take come back unchanged
            for key in (*OWN_KEYS, "set_alpha_to_one", "beta_schedule", "num_train_timesteps", "variance_type"):
                assert back.config[key] == ours.config[key], (label, cls.__name__, key)
        if "num_train_timesteps" in theirs.config:
            assert theirs.config.num_train_timesteps == ours.config.num_train_timesteps


def test_saved_config_leaves_out_only_default_valued_keys_and_loads_the_same(tmp_path):
    def saved(scheduler, name):
        scheduler.save_pretrained(tmp_path / name)
        text = json.loads((tmp_path / name / "scheduler_config.json").read_text())
        return text, GaussianDiffusionScheduler.from_pretrained(tmp_path / name)

    default = GaussianDiffusionScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range")
    text, loaded = saved(default, "default")
    assert not set(text) & {*OWN_KEYS, "set_alpha_to_one"} and text["variance_type"] == "learned_range"
    assert public(loaded.config) == public(default.config)
    non_default = non_default_scheduler()
    text, loaded = saved(non_default, "non_default")
    assert (text["sampler"], text["eta"], text["set_alpha_to_one"]) == ("ddim", 0.5, False)
    assert len(text["analytic_gamma"]) == 50 and public(loaded.config) == public(non_default.config)
    # ddpm sampler with set_alpha_to_one=False: both written, else the file would read as a DDIMScheduler's
    odd = GaussianDiffusionScheduler(set_alpha_to_one=False)
    text, loaded = saved(odd, "odd")
    assert (text["sampler"], text["set_alpha_to_one"]) == ("ddpm", False) and loaded.config.sampler == "ddpm"
    # A file of an earlier release lists every key: it loads with the same meaning.
    old = json.loads(open(os.path.join(FIXTURE, "scheduler_config.json")).read())
    assert {"sampler", "eta"} <= set(old)
    from_old = GaussianDiffusionScheduler.from_pretrained(FIXTURE)
    assert all(from_old.config[k] == v for k, v in old.items() if not k.startswith("_"))
    assert from_old.config.set_alpha_to_one is True and from_old.config.analytic_gamma is None
    # ... and so does a new file in the loading code of an earlier release, which reads a config with
    # set_alpha_to_one but no sampler as a DDIM config: that combination is never written.
    for name in ("default", "non_default", "odd"):
        text = json.loads((tmp_path / name / "scheduler_config.json").read_text())
        assert "sampler" in text or "set_alpha_to_one" not in text, name


FRESH_PROCESS = textwrap.dedent(
    """
    import importlib.util, json, logging, sys
    import diffusers
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers
    from diffusers.utils import DummyObject

    messages = []

    class Handler(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                messages.append(record.getMessage())

    logging.getLogger("diffusers").addHandler(Handler())
    classes = [getattr(diffusers, e.name) for e in KarrasDiffusionSchedulers
               if not isinstance(getattr(diffusers, e.name), DummyObject)]
    out = {"saved": {}, "remote": {}}
    for cls in classes:  # a saved folder of ours, loaded by plain diffusers
        messages.clear()
        cls.from_pretrained(sys.argv[1])
        out["saved"][cls.__name__] = list(messages)
    # a copy of scheduler.py loaded as remote code (Hub export with trust_remote_code), non-default keys
    spec = importlib.util.spec_from_file_location("ddpm_ext_scheduler", sys.argv[2])
    module = importlib.util.module_from_spec(spec)
    sys.modules["ddpm_ext_scheduler"] = module
    spec.loader.exec_module(module)
    remote = module.GaussianDiffusionScheduler(num_train_timesteps=50, sampler="ddim", eta=0.5,
                                               set_alpha_to_one=False)
    for cls in classes:
        messages.clear()
        theirs = cls.from_config(remote.config)
        back = module.GaussianDiffusionScheduler.from_config(theirs.config)
        out["remote"][cls.__name__] = list(messages) + (
            [] if (back.config.sampler, back.config.eta) == ("ddim", 0.5) else ["lost keys"])
    out["package_imported"] = "diffusers_ddpm_ext" in sys.modules
    print(json.dumps(out))
    """
)


def test_swaps_without_warning_where_our_package_is_not_imported(tmp_path):
    """Plain diffusers (no diffusers_ddpm_ext): a saved config of ours with the default sampler, and a remote-code
    copy of scheduler.py (what a Hub export's model card tells users to swap from)."""
    GaussianDiffusionScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range").save_pretrained(
        tmp_path / "saved")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "saved"), scheduler_module.__file__],
                         capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["package_imported"] is False
    assert len(out["saved"]) == len(out["remote"]) == len(KARRAS)
    assert {name: m for name, m in out["remote"].items() if m} == {}
    # EDMEulerScheduler takes none of the β keys (it has its own σ schedule) and, unlike the others, lists no
    # compatible schedulers: without our class at hand diffusers names those keys, never ours.
    warned = {name: m for name, m in out["saved"].items() if m}
    assert set(warned) <= {"EDMEulerScheduler"}, warned
    for message in warned.get("EDMEulerScheduler", []):
        assert "beta_schedule" in message and not any(f"'{key}'" in message for key in OWN_KEYS), message
