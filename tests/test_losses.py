import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from diffusers_ddpm_ext.losses import (
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    min_snr_weights,
    normal_kl,
    vlb_terms,
)
from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler


# ---------------------------------------------------------------- closed forms vs numerical integration


@pytest.mark.parametrize("m1,lv1,m2,lv2", [(0.0, 0.0, 0.0, 0.0), (0.3, -1.0, -0.5, 0.7), (2.0, 1.2, -1.0, -0.4)])
def test_normal_kl_matches_numerical_integral(m1, lv1, m2, lv2):
    s1, s2 = math.exp(0.5 * lv1), math.exp(0.5 * lv2)
    p, q = stats.norm(m1, s1), stats.norm(m2, s2)
    expected, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), m1 - 12 * s1, m1 + 12 * s1)
    got = normal_kl(torch.tensor(m1), torch.tensor(lv1), torch.tensor(m2), torch.tensor(lv2))
    assert got.item() == pytest.approx(expected, abs=1e-6, rel=1e-5)


def test_normal_kl_broadcasts_and_accepts_floats():
    m1 = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    kl = normal_kl(m1, torch.zeros(3, 4), 0.0, 0.0)
    assert kl.shape == (3, 4)
    assert torch.allclose(kl, 0.5 * m1**2)
    assert torch.all(normal_kl(m1, torch.zeros(1), m1, torch.zeros(1)).abs() < 1e-7)


@pytest.mark.parametrize("num_levels", [256, 17, 2])
def test_discretized_gaussian_matches_integrated_density_and_normalises(num_levels):
    levels = torch.linspace(-1, 1, num_levels, dtype=torch.float64)
    h = 1.0 / (num_levels - 1)
    for mean, log_scale in [(0.1, -2.0), (-0.7, -4.0), (0.95, 0.3)]:
        logp = discretized_gaussian_log_likelihood(
            levels.float(), torch.tensor(mean), torch.tensor(log_scale), num_levels
        ).double()
        # Probabilities over the grid sum to one: edge bins reach ±inf.
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
        dist = stats.norm(mean, math.exp(log_scale))
        for i in sorted({0, 1, num_levels // 2, num_levels - 2, num_levels - 1}):
            lo = -np.inf if i == 0 else levels[i].item() - h
            hi = np.inf if i == num_levels - 1 else levels[i].item() + h
            mass, _ = integrate.quad(dist.pdf, lo, hi, points=None if np.isinf(lo) or np.isinf(hi) else [mean])
            if mass > 1e-9:
                assert logp[i].item() == pytest.approx(math.log(mass), abs=2e-4, rel=1e-4)


def test_discretized_gaussian_tails_are_accurate():
    # Far-tail bins where Φ(b) − Φ(a) underflows or cancels in float32: compare with scipy in float64.
    n = 256
    h = 1.0 / (n - 1)
    x = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2])
    means = torch.tensor([-0.8, 0.8, -0.1, 0.1, 0.1])
    log_scales = torch.full((5,), math.log(0.05))
    got = discretized_gaussian_log_likelihood(x, means, log_scales, n).double().numpy()
    s = 0.05
    expected = [
        stats.norm.logsf((1.0 - h - (-0.8)) / s),
        stats.norm.logcdf((-1.0 + h - 0.8) / s),
        math.log(stats.norm.sf((0.5 - h + 0.1) / s) - stats.norm.sf((0.5 + h + 0.1) / s)),
        math.log(stats.norm.cdf((-0.5 + h - 0.1) / s) - stats.norm.cdf((-0.5 - h - 0.1) / s)),
        math.log(stats.norm.cdf((0.1 + h) / s) - stats.norm.cdf((0.1 - h) / s)),
    ]
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expected, rtol=2e-4)
    with pytest.raises(ValueError, match="num_levels"):
        discretized_gaussian_log_likelihood(x, means, log_scales, 1)


# ---------------------------------------------------------------- losses with the scheduler

LN2 = math.log(2.0)


def make_batch(scheduler, channels=2, size=4, seed=0, timesteps=None, out_factor=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    batch = 6
    x0 = (torch.randint(0, 17, (batch, channels, size, size), generator=g).to(dtype) / 16) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=dtype)
    if timesteps is None:
        timesteps = torch.tensor([0, 1, 2, 7, 13, scheduler.config.num_train_timesteps - 1])
    model_output = torch.randn(batch, out_factor * channels, size, size, generator=g, dtype=dtype)
    if out_factor == 2:  # variance values in a sensible range
        model_output[:, channels:] = model_output[:, channels:].tanh()
    return x0, noise, timesteps, model_output


def hand_chain(scheduler, t):
    """ᾱ_t, ᾱ_{t-1}, β_t, β̃_t, clipped log β̃_t recomputed from the betas (float64)."""
    betas = scheduler.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_log_clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    return abar[t], abar_prev[t], betas[t], post_var[t], post_log_clipped[t]


def test_vlb_terms_match_hand_formulas_fixed_small_epsilon():
    scheduler = GaussianDiffusionScheduler(num_train_timesteps=20, beta_schedule="squaredcos_cap_v2")
    x0, noise, t, eps_hat = make_batch(scheduler, dtype=torch.float64)
    x_t = scheduler.add_noise(x0, noise, t)
    got = vlb_terms(eps_hat, x0, x_t, t, scheduler, num_levels=17)
    ab, ab_prev, beta, _, logvar = (v.view(-1, 1, 1, 1) for v in hand_chain(scheduler, t))
    x0_hat = (x_t - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
    c0, ct = ab_prev.sqrt() * beta / (1 - ab), (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
    mu_q, mu_p = c0 * x0 + ct * x_t, c0 * x0_hat + ct * x_t
    kl = ((mu_q - mu_p) ** 2 / (2 * logvar.exp())).mean(dim=(1, 2, 3)) / LN2  # equal variances: KL = Δμ²/2σ²
    for i in range(1, 6):
        assert got[i].item() == pytest.approx(kl[i].item(), rel=1e-4)
    # t = 0: −log of the discretised Gaussian decoder, via scipy.
    s = math.exp(0.5 * logvar[0].item())
    h = 1 / 16
    x, m = x0[0].numpy().ravel(), mu_p[0].numpy().ravel()
    hi = np.where(x > 1 - h, np.inf, x + h)
    lo = np.where(x < -1 + h, -np.inf, x - h)
    nll = -np.log(stats.norm.cdf((hi - m) / s) - stats.norm.cdf((lo - m) / s)).mean() / LN2
    assert got[0].item() == pytest.approx(nll, rel=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_simple_loss_regresses_the_right_target(prediction_type):
    from diffusers import DDPMScheduler

    scheduler = GaussianDiffusionScheduler(num_train_timesteps=20, prediction_type=prediction_type)
    x0, noise, t, out = make_batch(scheduler)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "sample":
        target = x0
    else:
        target = DDPMScheduler(num_train_timesteps=20).get_velocity(x0, noise, t)
    res = diffusion_loss(out, x0, noise, t, scheduler)
    assert res.vlb is None
    assert torch.allclose(res.mse, ((out - target) ** 2).mean(dim=(1, 2, 3)), rtol=1e-6)
    assert torch.equal(res.loss, res.mse) and torch.equal(res.unweighted_loss, res.mse)
    weights = torch.linspace(0.5, 2.0, 6)
    assert torch.allclose(diffusion_loss(out, x0, noise, t, scheduler, weights=weights).loss, res.mse * weights)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_min_snr_gamma_weights_match_diffusers_snr(prediction_type):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = GaussianDiffusionScheduler(num_train_timesteps=20, prediction_type=prediction_type)
    x0, noise, t, out = make_batch(scheduler)
    snr = compute_snr(DDPMScheduler(num_train_timesteps=20), t)
    gamma = 5.0
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    expected = {"epsilon": clipped / snr, "sample": clipped, "v_prediction": clipped / (snr + 1)}[prediction_type]
    res = diffusion_loss(out, x0, noise, t, scheduler, snr_gamma=gamma)
    # diffusers forms 1 − ᾱ in float32 (SNR off by 2e-4 relative at t = 0); ours uses float64.
    assert torch.allclose(res.loss, res.mse * expected, rtol=5e-4)
    assert not torch.allclose(expected, torch.ones_like(expected))  # the weighting does something here


def test_min_snr_epsilon_is_finite_at_zero_terminal_snr():
    scheduler = GaussianDiffusionScheduler(num_train_timesteps=20, rescale_betas_zero_snr=True)
    snr = scheduler.snr(torch.tensor([19, 0]))
    assert snr[0] == 0
    w = min_snr_weights(snr, 5.0, "epsilon")
    assert w[0] == 1.0 and w[1] == pytest.approx(5.0 / snr[1].item())
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weights(snr, 5.0, "flow")
    with pytest.raises(ValueError, match="snr_gamma"):
        min_snr_weights(snr, 0.0, "epsilon")


@pytest.mark.parametrize("variance_type", ["learned_range", "learned"])
def test_hybrid_vlb_gradient_reaches_only_the_variance_half(variance_type):
    scheduler = GaussianDiffusionScheduler(
        num_train_timesteps=20, beta_schedule="squaredcos_cap_v2", variance_type=variance_type
    )
    C = 2
    x0, noise, t, out = make_batch(scheduler, channels=C, out_factor=2, dtype=torch.float64)
    if variance_type == "learned":  # log-variances near the posterior ones
        out[:, C:] = hand_chain(scheduler, t)[4].view(-1, 1, 1, 1) + 0.3 * out[:, C:]
    kw = dict(num_levels=17, vlb_weight=1e-3)

    def grad(loss_type, output):
        output = output.clone().requires_grad_(True)
        res = diffusion_loss(output, x0, noise, t, scheduler, loss_type=loss_type, **kw)
        res.loss.sum().backward()
        return res, output.grad

    hybrid, g_hybrid = grad("hybrid", out)
    simple, g_simple = grad("simple", out)
    # Mean half: exactly the L_simple gradient — the VLB term contributes nothing there.
    assert torch.equal(g_hybrid[:, :C], g_simple[:, :C])
    assert torch.count_nonzero(g_simple[:, C:]) == 0
    assert torch.allclose(hybrid.loss, simple.mse + 1e-3 * 20 * hybrid.vlb)
    # Variance half: nonzero, and equal to the analytic derivative of λ·T·KL/(ln2·D) for t > 0.
    g_var = g_hybrid[:, C:]
    assert torch.all(g_var.abs().sum(dim=(1, 2, 3)) > 0)
    ab, ab_prev, beta, _, log_post = (v.view(-1, 1, 1, 1) for v in hand_chain(scheduler, t))
    x_t = scheduler.add_noise(x0, noise, t)
    x0_hat = (x_t - (1 - ab).sqrt() * out[:, :C]) / ab.sqrt()
    c0 = ab_prev.sqrt() * beta / (1 - ab)
    v = out[:, C:]
    if variance_type == "learned_range":
        logvar_p = (v + 1) / 2 * beta.log() + (1 - v) / 2 * log_post
        dlogvar_dv = 0.5 * (beta.log() - log_post)
    else:
        logvar_p, dlogvar_dv = v, torch.ones_like(v)
    dkl_dlogvar = 0.5 * (1 - torch.exp(log_post - logvar_p) - (c0 * (x0 - x0_hat)) ** 2 * torch.exp(-logvar_p))
    D = C * 4 * 4
    expected = 1e-3 * 20 / (LN2 * D) * dkl_dlogvar * dlogvar_dv
    assert torch.allclose(g_var[1:], expected[1:], rtol=1e-3, atol=1e-12)
    # ... and matches central finite differences everywhere, including the decoder term at t = 0.
    for b, c, i, j in [(0, 0, 1, 2), (0, 1, 3, 0), (2, 1, 0, 0), (5, 0, 2, 3)]:
        eps = 1e-6
        up, down = out.clone(), out.clone()
        up[b, C + c, i, j] += eps
        down[b, C + c, i, j] -= eps
        fd = (
            diffusion_loss(up, x0, noise, t, scheduler, loss_type="hybrid", **kw).loss.sum()
            - diffusion_loss(down, x0, noise, t, scheduler, loss_type="hybrid", **kw).loss.sum()
        ) / (2 * eps)
        assert g_var[b, c, i, j].item() == pytest.approx(fd.item(), rel=1e-4, abs=1e-10)


def test_kl_loss_is_rescaled_vlb_and_trains_the_mean():
    scheduler = GaussianDiffusionScheduler(num_train_timesteps=20, variance_type="learned_range")
    x0, noise, t, out = make_batch(scheduler, out_factor=2)
    out.requires_grad_(True)
    res = diffusion_loss(out, x0, noise, t, scheduler, loss_type="kl", num_levels=17)
    x_t = scheduler.add_noise(x0, noise, t)
    assert torch.allclose(res.loss, 20 * vlb_terms(out, x0, x_t, t, scheduler, num_levels=17))
    res.loss.sum().backward()
    assert torch.count_nonzero(out.grad[:, :2]) > 0 and torch.count_nonzero(out.grad[:, 2:]) > 0
    # With a fixed variance the bound still trains the mean.
    fixed = GaussianDiffusionScheduler(num_train_timesteps=20)
    res = diffusion_loss(out[:, :2], x0, noise, t, fixed, loss_type="kl", num_levels=17)
    assert torch.all(torch.isfinite(res.loss)) and torch.all(res.vlb[1:] >= 0)


def test_bad_arguments_raise_clear_errors():
    fixed = GaussianDiffusionScheduler(num_train_timesteps=20)
    learned = GaussianDiffusionScheduler(num_train_timesteps=20, variance_type="learned_range")
    x0, noise, t, out = make_batch(fixed)
    with pytest.raises(ValueError, match="fixed_small"):
        diffusion_loss(out, x0, noise, t, fixed, loss_type="hybrid")
    with pytest.raises(ValueError, match="loss_type"):
        diffusion_loss(out, x0, noise, t, fixed, loss_type="mse")
    with pytest.raises(ValueError, match="snr_gamma"):
        diffusion_loss(out, x0, noise, t, fixed, loss_type="kl", snr_gamma=5.0)
    with pytest.raises(ValueError, match="timesteps"):
        diffusion_loss(out, x0, noise, t[:3], fixed)
    with pytest.raises(ValueError, match="channels"):  # learned variance needs 2C channels
        diffusion_loss(out, x0, noise, t, learned, loss_type="hybrid")
