"""Analytic-DPM (`variance_type="analytic"`, `diffusers_ddpm_ext.analytic`) against closed forms.

For Gaussian data x_0 ~ N(μ, s² I) everything is known in closed form: x_t ~ N(√ᾱ_t μ, V_t I) with
V_t = ᾱ_t s² + 1 − ᾱ_t, the optimal ε-predictor is E[ε | x_t] = √(1 − ᾱ_t)(x_t − √ᾱ_t μ)/V_t, so
Γ_t = (1 − ᾱ_t)/V_t and Var[x_0 | x_t] = (1 − ᾱ_t) s²/V_t; and the true reverse kernel q(x_s | x_t) is Gaussian with
variance V_s − α'V_s²/V_t (α' = ᾱ_t/ᾱ_s), which is what σ*² (Bao et al. 2022, Theorem 1) must equal for λ² = β̃.
"""

import importlib.util
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel

from diffusers_ddpm_ext.analytic import (
    estimate_analytic_gamma,
    fit_analytic_variance,
    optimal_trajectory,
    step_bound_terms,
)
from diffusers_ddpm_ext.likelihood import bits_per_dim
from diffusers_ddpm_ext.losses import vlb_terms
from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler, analytic_variance

MU, S = 0.2, 0.3  # the Gaussian data's mean and standard deviation


def alphas_cumprod64(scheduler):
    snr = scheduler.snr(torch.arange(scheduler.config.num_train_timesteps), dtype=torch.float64)
    return snr / (1 + snr)


def gaussian_gamma(alpha_bar):
    return (1 - alpha_bar) / (alpha_bar * S**2 + 1 - alpha_bar)


class GaussianOptimal(torch.nn.Module):
    """The exact posterior-mean predictor for x_0 ~ N(MU, S² I), as ε, x_0 or v."""

    def __init__(self, alphas_cumprod, prediction_type="epsilon"):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.double())
        self.prediction_type = prediction_type

    def forward(self, sample, timestep):
        a = self.alphas_cumprod[timestep].view(-1, *([1] * (sample.ndim - 1)))
        x = sample.double()
        var_t = a * S**2 + 1 - a
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / var_t
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        out = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}
        return out[self.prediction_type].to(sample.dtype)


def gaussian_data(n, shape=(1, 4, 4), seed=0):
    return MU + S * torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def exact_analytic(**config):
    """An analytic-variance scheduler whose Γ table is the Gaussian closed form."""
    base = GaussianDiffusionScheduler(**config)
    gamma = gaussian_gamma(alphas_cumprod64(base))
    return GaussianDiffusionScheduler.from_config(base.config, variance_type="analytic", analytic_gamma=gamma.tolist())


def true_reverse_variance(a_t, a_s):
    """Var q(x_s | x_t) for Gaussian data, by Gaussian conditioning of the joint (x_s, x_t)."""
    v_s, v_t = a_s * S**2 + 1 - a_s, a_t * S**2 + 1 - a_t
    return v_s - (a_t / a_s) * v_s**2 / v_t


# ------------------------------------------------------------------------------------------------------------------
# Γ and σ*² against closed forms
# ------------------------------------------------------------------------------------------------------------------


def test_gamma_estimate_and_variances_match_gaussian_closed_forms():
    """Γ_t within 4 reported standard errors of (1 − ᾱ_t)/V_t at every t, with calibrated standard errors
    (‖E[ε|x_t]‖²/d is Γ·χ²_d/d, so the true error is Γ·√(2/(d·M))); the fitted σ² then equals the true reverse
    variance within the propagated error, on the full chain and on a respaced one (α' = ᾱ_t/ᾱ_s)."""
    scheduler = GaussianDiffusionScheduler(num_train_timesteps=200, clip_sample=False)
    model = GaussianOptimal(scheduler.alphas_cumprod)
    num_samples, dims = 400, 16
    est = estimate_analytic_gamma(model, scheduler, gaussian_data(num_samples), num_samples=num_samples,
                                  batch_size=8192, generator=torch.Generator().manual_seed(1), progress=False)
    ab = alphas_cumprod64(scheduler)
    exact = gaussian_gamma(ab)
    assert est.gamma.shape == (200,) and est.num_samples == num_samples
    z = (est.gamma - exact) / est.standard_error
    assert z.abs().max() < 4.5, z.abs().max()
    assert abs(z.mean()) < 0.5  # unbiased (the z's of neighbouring t share images, so not independent)
    ratio = est.standard_error / (exact * math.sqrt(2 / (dims * num_samples)))
    assert 0.8 < ratio.min() and ratio.max() < 1.25, (ratio.min(), ratio.max())
    # the same calls give the x_0 error, Var[x_0|x_t] = (1 − ᾱ)s²/V_t for the exact model (Var·χ²_d/d per image)
    x0_var = (1 - ab) * S**2 / (ab * S**2 + 1 - ab)
    z = (est.x0_mse - x0_var) / (x0_var * math.sqrt(2 / (dims * num_samples)))
    assert z.abs().max() < 4.5, z.abs().max()
    inside = estimate_analytic_gamma(model, scheduler, gaussian_data(50).clamp(-1, 1), num_samples=50,
                                     batch_size=8192, progress=False)
    assert torch.all(inside.x0_mse_clipped <= inside.x0_mse)  # data in [-1, 1]: clipping x̂_0 only helps

    fitted = GaussianDiffusionScheduler.from_config(scheduler.config, variance_type="analytic",
                                                    analytic_gamma=est.gamma.tolist())
    x = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    for chain in (None, [199, 150, 120, 60, 20, 5, 0]):
        t = torch.arange(1, 200) if chain is None else torch.tensor(chain[:-1])
        prev = t - 1 if chain is None else torch.tensor(chain[1:])
        out = fitted.p_mean_variance(x.expand(len(t), 1, 1, 1), x.expand(len(t), 1, 1, 1), t, prev)
        a_t, a_s = ab[t], ab[prev]
        truth = true_reverse_variance(a_t, a_s)
        c_sq = a_s * (1 - a_t / a_s) ** 2 / (1 - a_t) ** 2  # squared posterior-mean coefficient of x_0
        err = c_sq * (1 - a_t) / a_t * est.standard_error[t]  # dσ² = c²(β̄/ᾱ)dΓ
        assert torch.all((out.variance.flatten() - truth).abs() <= 4.5 * err + 1e-15)
        # with the exact Γ, σ*² is the true reverse variance to rounding
        exact_out = exact_analytic(num_train_timesteps=200).p_mean_variance(
            x.expand(len(t), 1, 1, 1), x.expand(len(t), 1, 1, 1), t, prev)
        np.testing.assert_allclose(exact_out.variance.flatten().numpy(), truth.numpy(), rtol=1e-9)


def test_analytic_variance_formula_forms_and_paper_bounds():
    """The issue's form λ² + (√(β̄_n/α_n) − √(β̄_{n−1} − λ²))²(1 − Γ), its DDPM reduction β²/(α β̄)(1 − Γ) + β̃,
    and Theorem 2's bounds λ² ≤ σ*² ≤ λ² + c²r² (data in [−r, r]) for Γ anywhere in [0, 3], both families."""
    ab = alphas_cumprod64(GaussianDiffusionScheduler())
    g = torch.Generator().manual_seed(0)
    t = torch.randint(1, 1000, (5000,), generator=g)
    s = (torch.rand(5000, generator=g, dtype=torch.float64) * t).long()  # 0 <= s < t
    a_t, a_s = ab[t], ab[s]
    beta_step = 1 - a_t / a_s
    beta_tilde = (1 - a_s) / (1 - a_t) * beta_step
    gamma = 3 * torch.rand(5000, generator=g, dtype=torch.float64)
    eta = torch.rand(5000, generator=g, dtype=torch.float64)
    for lambda_sq in (beta_tilde, eta**2 * beta_tilde):  # DDPM, DDIM
        sigma_sq = analytic_variance(a_t, a_s, lambda_sq, gamma)
        extra = ((1 - a_t) / (a_t / a_s)) ** 0.5 - (1 - a_s - lambda_sq) ** 0.5
        c_sq = extra**2 * a_t / (1 - a_t)
        assert torch.all(sigma_sq >= lambda_sq) and torch.all(sigma_sq <= lambda_sq + c_sq * (1 + 1e-12))
        inside = ((1 - a_t) / a_t * (1 - gamma) >= 0) & ((1 - a_t) / a_t * (1 - gamma) <= 1)
        issue_form = lambda_sq + extra**2 * (1 - gamma)
        torch.testing.assert_close(sigma_sq[inside], issue_form[inside], rtol=1e-9, atol=1e-15)
        assert inside.sum() > 500 and (~inside).sum() > 500  # both regimes exercised
        r_sq = 0.25  # data in [−0.5, 0.5]
        narrow = analytic_variance(a_t, a_s, lambda_sq, gamma, data_range=0.5)
        assert torch.all(narrow <= lambda_sq + c_sq * r_sq + 1e-15)
    ddpm = analytic_variance(a_t, a_s, beta_tilde, gamma)
    reduction = beta_tilde + beta_step**2 / ((a_t / a_s) * (1 - a_t)) * (1 - gamma)
    torch.testing.assert_close(ddpm[inside], reduction[inside], rtol=1e-9, atol=1e-15)
    assert torch.equal(analytic_variance(a_t, a_s, beta_tilde, torch.ones_like(gamma)), beta_tilde)  # Γ = 1: λ²
    # zero terminal SNR (ᾱ = 0): finite, at the data-range bound
    zero = analytic_variance(torch.zeros(1, dtype=torch.float64), a_s[:1], beta_step[:1] * 0 + 0.1, gamma[:1])
    assert torch.isfinite(zero).all()


def test_bound_terms_with_the_exact_model_match_theory():
    """With the exact predictor the expected KL term of a step is ½[log(σ²/β̃) + (β̃ + m)/σ² − 1] nats/dim,
    m = c²·Var[x_0|x_t]; σ*² = β̃ + m makes it ½log(1 + m/β̃), the minimum over σ² (below fixed_small's ½m/β̃ and
    fixed_large's). vlb_terms' Monte-Carlo averages match these closed forms for every variance type."""
    n, dims = 3000, 64
    analytic = exact_analytic(clip_sample=False)
    ab = alphas_cumprod64(analytic)
    model = GaussianOptimal(analytic.alphas_cumprod)
    x0 = gaussian_data(n, shape=(1, 8, 8), seed=2).double()
    for t_value in (1, 10, 100, 600):
        t = torch.full((n,), t_value)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t_value), dtype=torch.float64)
        x_t = ab[t_value].sqrt() * x0 + (1 - ab[t_value]).sqrt() * noise
        a_t, a_s = ab[t_value], ab[t_value - 1]
        beta = 1 - a_t / a_s
        beta_tilde = (1 - a_s) / (1 - a_t) * beta
        m = a_s * beta**2 / (1 - a_t) ** 2 * (1 - a_t) * S**2 / (a_t * S**2 + 1 - a_t)
        expected = {}
        for kind, sigma_sq in (("analytic", beta_tilde + m), ("fixed_small", beta_tilde), ("fixed_large", beta)):
            scheduler = GaussianDiffusionScheduler.from_config(analytic.config, variance_type=kind)
            terms = vlb_terms(model(x_t, t), x0, x_t, t, scheduler) * math.log(2)  # nats/dim
            expected[kind] = 0.5 * (math.log(sigma_sq / beta_tilde) + (beta_tilde + m) / sigma_sq - 1)
            se = terms.std().item() / math.sqrt(n)
            assert abs(terms.mean().item() - expected[kind]) < 4 * se + 1e-9 * expected[kind], (t_value, kind)
        assert expected["analytic"] == pytest.approx(0.5 * math.log(1 + m / beta_tilde), rel=1e-12)
        assert expected["analytic"] < expected["fixed_small"] and expected["analytic"] < expected["fixed_large"]


def test_gamma_one_gives_the_fixed_small_process():
    """Γ ≡ 1 (e.g. a point-mass data set and its exact model): σ*² = λ², so the analytic bound and samples are
    fixed_small's exactly (theory: no x_0 uncertainty left to add)."""
    base = GaussianDiffusionScheduler(num_train_timesteps=50)
    ones = GaussianDiffusionScheduler.from_config(base.config, variance_type="analytic", analytic_gamma=[1.0] * 50)
    model = GaussianOptimal(base.alphas_cumprod)
    images = torch.linspace(-1, 1, 17)[torch.randint(0, 17, (6, 1, 4, 4), generator=torch.Generator().manual_seed(0))]
    kw = dict(num_levels=17, progress=False)
    for steps in (None, 10):
        a, b = (bits_per_dim(model, s, images, generator=torch.Generator().manual_seed(3), num_inference_steps=steps,
                             **kw) for s in (base, ones))
        assert torch.equal(a.terms_bpd, b.terms_bpd)
    for sampler in ("ddpm", "ddim"):
        x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
        outs = []
        for s in (base, ones):
            s = GaussianDiffusionScheduler.from_config(s.config, sampler=sampler, eta=1.0)
            s.set_timesteps(10)
            y = x
            for t in s.timesteps:
                y = s.step(model(y, t.expand(2)), t, y, generator=torch.Generator().manual_seed(int(t))).prev_sample
            outs.append(y)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)  # σ² via float64 vs float32


@pytest.mark.parametrize("sampler,eta", [("ddpm", None), ("ddim", 0.0), ("ddim", 0.5)])
def test_analytic_step_keeps_the_marginal_of_gaussian_data(sampler, eta):
    """With the exact model and σ*², one reverse step (DDPM or DDIM family, full or respaced chain) from
    x_t ~ q(x_t) lands exactly on q(x_s) = N(√ᾱ_s μ, V_s): the reverse kernel is the true one. Without the analytic
    variance, deterministic DDIM (η = 0) misses σ*² of the variance."""
    n = 4000
    for steps, index in ((None, 500), (10, 3)):
        scheduler = exact_analytic(clip_sample=False, sampler=sampler, eta=eta or 0.0)
        if steps:
            scheduler.set_timesteps(steps)
        t = int(scheduler.timesteps[index]) if steps else index
        s = scheduler.previous_timestep(t)
        ab = alphas_cumprod64(scheduler)
        g = torch.Generator().manual_seed(steps or 0)
        x_t = ab[t].sqrt() * MU + (ab[t] * S**2 + 1 - ab[t]).sqrt() * torch.randn(n, 1, 4, 4, generator=g)
        model = GaussianOptimal(scheduler.alphas_cumprod)
        kwargs = {} if eta is None else {"eta": eta}
        x_s = scheduler.step(model(x_t, torch.full((n,), t)), t, x_t, generator=g, **kwargs).prev_sample.double()
        v_s = ab[s] * S**2 + 1 - ab[s]
        values = x_s.flatten()
        assert abs(values.mean() - ab[s].sqrt() * MU) < 4 * (v_s / values.numel()).sqrt()
        assert abs(values.var() / v_s - 1) < 4 * math.sqrt(2 / values.numel()), (values.var(), v_s)
        if sampler == "ddim" and eta == 0.0:
            # Analytic-DDIM adds σ*(λ = 0)·z to the deterministic DDIM update: σ*² = c²·Var[x_0|x_t] with
            # c = √ᾱ_s − √((1 − ᾱ_s)ᾱ_t/(1 − ᾱ_t)).
            plain = GaussianDiffusionScheduler.from_config(scheduler.config, variance_type="fixed_small")
            if steps:
                plain.set_timesteps(steps)
            y = plain.step(model(x_t, torch.full((n,), t)), t, x_t).prev_sample.double()
            c = ab[s].sqrt() - ((1 - ab[s]) * ab[t] / (1 - ab[t])).sqrt()
            sigma_sq = c**2 * (1 - ab[t]) * S**2 / (ab[t] * S**2 + 1 - ab[t])
            diff = (x_s - y).flatten()
            assert abs(diff.var() / sigma_sq - 1) < 4 * math.sqrt(2 / diff.numel()), (diff.var(), sigma_sq)


# ------------------------------------------------------------------------------------------------------------------
# Estimation from any model and any data source
# ------------------------------------------------------------------------------------------------------------------


def test_x0_and_v_models_are_converted_to_epsilon():
    """Γ needs ε; an x_0- or v-predicting model is converted with the scheduler's prediction_type (same Γ as the
    ε-model up to float rounding), and an unknown prediction type is refused."""
    scheduler = GaussianDiffusionScheduler(num_train_timesteps=30)
    data = gaussian_data(50)
    kw = dict(num_samples=50, batch_size=512, progress=False)
    ref = estimate_analytic_gamma(GaussianOptimal(scheduler.alphas_cumprod), scheduler, data,
                                  generator=torch.Generator().manual_seed(0), **kw).gamma
    for kind in ("sample", "v_prediction"):
        model = GaussianOptimal(scheduler.alphas_cumprod, kind)
        config_kind = GaussianDiffusionScheduler.from_config(scheduler.config, prediction_type=kind)
        for s, extra in ((config_kind, {}), (scheduler, {"prediction_type": kind})):
            got = estimate_analytic_gamma(model, s, data, generator=torch.Generator().manual_seed(0), **extra, **kw)
            torch.testing.assert_close(got.gamma[1:], ref[1:], rtol=1e-4, atol=1e-6)  # t = 0: √β̄ = 0.01 amplifies
    with pytest.raises(ValueError, match="prediction_type='x0'.*epsilon"):
        estimate_analytic_gamma(GaussianOptimal(scheduler.alphas_cumprod), scheduler, data, prediction_type="x0", **kw)


def tiny_unet(out_channels, num_class_embeds=None):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=out_channels, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       num_class_embeds=num_class_embeds).eval()


def test_unet2d_models_data_loaders_and_diffusers_schedulers():
    """A class-conditional learned-variance `UNet2DModel` (2C outputs: the first C are ε) on a DataLoader of our
    digits dicts with labels; a diffusers DDPMScheduler / DDIMScheduler config is upgraded in one call."""
    from diffusers_ddpm_ext.data import DigitsDataset

    loader = torch.utils.data.DataLoader(DigitsDataset("train", resolution=8), batch_size=16)
    unet = tiny_unet(2, num_class_embeds=10)
    ddpm = DDPMScheduler(num_train_timesteps=20)
    est = estimate_analytic_gamma(unet, ddpm, loader, num_samples=40, batch_size=100, progress=False,
                                  generator=torch.Generator().manual_seed(0))
    assert est.gamma.shape == (20,) and est.num_samples == 40 and torch.isfinite(est.gamma).all()
    images, labels = next(iter(torch.utils.data.DataLoader(DigitsDataset("train", resolution=8), batch_size=40)))\
        .values()
    same = estimate_analytic_gamma(unet, ddpm, images, class_labels=labels, num_samples=40, batch_size=100,
                                   progress=False, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(same.gamma, est.gamma)  # the loader's labels reached the model
    for source, sampler in ((ddpm, "ddpm"), (DDIMScheduler(num_train_timesteps=20), "ddim")):
        fitted = fit_analytic_variance(tiny_unet(1), source, images, num_samples=8, batch_size=160, progress=False)
        assert isinstance(fitted, GaussianDiffusionScheduler) and fitted.config.variance_type == "analytic"
        assert fitted.config.sampler == sampler and len(fitted.config.analytic_gamma) == 20
        pipe = DDPMPipeline(unet=tiny_unet(1), scheduler=fitted)
        pipe.set_progress_bar_config(disable=True)
        images_out = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                          output_type="np").images
        assert np.isfinite(images_out).all()


# ------------------------------------------------------------------------------------------------------------------
# Stored with the scheduler
# ------------------------------------------------------------------------------------------------------------------


def test_table_survives_save_load_pipeline_and_hub_export(tmp_path):
    """The table is a config list: save_pretrained/from_pretrained, a saved DDPMPipeline and the Hub export (whose
    scheduler is the self-contained scheduler.py copy, loaded here from the exported file) keep it bit for bit."""
    from diffusers_ddpm_ext.hub import export_pipeline

    scheduler = exact_analytic(num_train_timesteps=40)
    scheduler.save_pretrained(tmp_path / "s")
    assert '"analytic_gamma": [' in (tmp_path / "s" / "scheduler_config.json").read_text()
    loaded = GaussianDiffusionScheduler.from_pretrained(tmp_path / "s")
    assert torch.equal(loaded.analytic_gamma, scheduler.analytic_gamma)
    pipe = DDPMPipeline(unet=tiny_unet(1), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "p")
    again = DiffusionPipeline.from_pretrained(tmp_path / "p")
    assert torch.equal(again.scheduler.analytic_gamma, scheduler.analytic_gamma)
    export = export_pipeline(pipe, tmp_path / "hub", sample_grid=False)
    spec = importlib.util.spec_from_file_location("exported_scheduler", export / "scheduler/ddpm_ext_scheduler.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["exported_scheduler"] = module
    try:
        spec.loader.exec_module(module)
        remote = module.GaussianDiffusionScheduler.from_pretrained(export / "scheduler")
    finally:
        del sys.modules["exported_scheduler"]
    assert type(remote).__module__ == "exported_scheduler"
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for s in (remote, loaded, again.scheduler):
        s.set_timesteps(7)
        scheduler.set_timesteps(7)
        t = s.timesteps[2]
        a = s.step(x, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
        b = scheduler.step(x, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
        assert torch.equal(a, b)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="variance_type='analytic' needs analytic_gamma.*fit_analytic_variance"):
        GaussianDiffusionScheduler(variance_type="analytic")
    table = exact_analytic(num_train_timesteps=100).config.analytic_gamma
    with pytest.raises(ValueError, match="analytic_gamma has shape .100,. but num_train_timesteps=50.*another"):
        GaussianDiffusionScheduler(num_train_timesteps=50, variance_type="analytic", analytic_gamma=table)
    with pytest.raises(ValueError, match=r"analytic_gamma\[3\] = nan"):
        GaussianDiffusionScheduler(num_train_timesteps=5, analytic_gamma=[1, 1, 1, float("nan"), 1])
    with pytest.raises(ValueError, match=r"analytic_gamma\[0\] = -0.5"):
        GaussianDiffusionScheduler(num_train_timesteps=2, analytic_gamma=[-0.5, 1])
    with pytest.raises(TypeError, match="analytic_gamma must be a sequence of numbers"):
        GaussianDiffusionScheduler(num_train_timesteps=2, analytic_gamma="1, 1")
    scheduler = GaussianDiffusionScheduler(num_train_timesteps=10)
    class ThreeChannels(torch.nn.Module):
        def forward(self, sample, timestep):
            return sample.repeat(1, 3, 1, 1)

    three = ThreeChannels()
    with pytest.raises(ValueError, match=r"shape \(40, 3, 4, 4\).*expected 1 \(or 2\) channels"):
        estimate_analytic_gamma(three, scheduler, gaussian_data(4), progress=False)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        estimate_analytic_gamma(three, scheduler, gaussian_data(4), num_samples=0, progress=False)
    with pytest.raises(ValueError, match="no analytic_gamma table"):
        optimal_trajectory(scheduler, 3)
    with pytest.raises(ValueError, match="num_inference_steps must be an int in \\[2, 10\\]"):
        optimal_trajectory(exact_analytic(num_train_timesteps=10), 11)


# ------------------------------------------------------------------------------------------------------------------
# Optimal trajectory
# ------------------------------------------------------------------------------------------------------------------


def test_optimal_trajectory_is_the_brute_force_minimum():
    """Dynamic programming over the per-step terms equals exhaustive search over every K-step trajectory from
    T − 1 to 0 (T = 14, K = 5), for the optimal-mean cost and for a model's measured x_0 error."""
    import itertools

    base = GaussianDiffusionScheduler(num_train_timesteps=14, beta_schedule="linear", beta_end=0.2)
    ab = alphas_cumprod64(base)
    gamma = gaussian_gamma(ab) * (1 - 0.3 * torch.sin(torch.linspace(0, math.pi, 14)))
    scheduler = GaussianDiffusionScheduler.from_config(base.config, variance_type="analytic",
                                                       analytic_gamma=gamma.tolist())
    x0_mse = (1 - ab) / ab * (1 - gamma) * (1 + torch.rand(14, generator=torch.Generator().manual_seed(0)))
    for mse in (None, x0_mse):
        cost = step_bound_terms(scheduler, mse)
        assert torch.isinf(cost[3, 3]) and torch.isinf(cost[5, 2]) and torch.isfinite(cost[2, 5])
        best, best_chain = float("inf"), None
        for inner in itertools.combinations(range(1, 13), 3):
            chain = [13, *sorted(inner, reverse=True), 0]
            total = sum(cost[s, t].item() for t, s in zip(chain, chain[1:]))
            if total < best:
                best, best_chain = total, chain
        assert optimal_trajectory(scheduler, 5, mse) == best_chain
        assert optimal_trajectory(scheduler, 14, mse) == list(range(13, -1, -1))
        assert optimal_trajectory(scheduler, 2, mse) == [13, 0]
    with pytest.raises(ValueError, match="x0_mse has 3 values"):
        step_bound_terms(scheduler, torch.ones(3))
    with pytest.raises(ValueError, match="no 5-step trajectory has a finite bound"):
        optimal_trajectory(scheduler, 5, torch.full((14,), float("nan")))


def test_bound_terms_of_the_optimal_model_need_only_gamma():
    """For the exact model the measured x_0 error is Var[x_0|x_t], so the model's expected KL term
    ½[log(σ²/λ²) + (λ² + c²e)/σ² − 1] collapses to the optimal-mean form ½log(σ*²/λ²) (Bao et al. 2022, Sec. 4)."""
    scheduler = exact_analytic(num_train_timesteps=100)
    ab = alphas_cumprod64(scheduler)
    x0_var = (1 - ab) * S**2 / (ab * S**2 + 1 - ab)
    with_error, optimal_mean = step_bound_terms(scheduler, x0_var), step_bound_terms(scheduler)
    finite = torch.isfinite(optimal_mean)
    torch.testing.assert_close(with_error[finite], optimal_mean[finite], rtol=1e-8, atol=1e-12)
    assert torch.all(optimal_mean[finite] >= 0)


# ------------------------------------------------------------------------------------------------------------------
# README
# ------------------------------------------------------------------------------------------------------------------


def test_readme_analytic_snippet_runs(tmp_path, monkeypatch):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("## Analytic variances")
    section = text[start:text.find("\n## ", start + 3)]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["scheduler"].config.variance_type == "analytic"
    assert namespace["bpd"].clip_denoised is True and "analytic" in namespace["bpd"].bound
