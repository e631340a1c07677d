import math

import pytest
import torch
from diffusers import UNet2DModel
from scipy import stats

from diffusers_ddpm_ext.likelihood import bits_per_dim, estimate_bits_per_dim, paired_difference, stratum_edges
from diffusers_ddpm_ext.losses import prior_bpd
from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler

K = 17  # grey levels, as the built-in digits
DATA_STD = 0.35


def discretised_gaussian_data():
    """Levels x_k on [-1, 1] and probabilities π_k: N(0, DATA_STD²) integrated over the decoder's bins."""
    levels = torch.linspace(-1, 1, K, dtype=torch.float64)
    h = 1.0 / (K - 1)
    upper = stats.norm.cdf((levels + h).numpy() / DATA_STD)
    lower = stats.norm.cdf((levels - h).numpy() / DATA_STD)
    upper[-1], lower[0] = 1.0, 0.0
    probs = torch.tensor(upper - lower)
    return levels, probs


class OptimalEpsilon(torch.nn.Module):
    """Exact posterior-mean ε-predictor for 1-D data with P(x_0 = x_k) = π_k.

    E[x_0 | x_t] = Σ_k x_k softmax_k(log π_k − (x_t − √ᾱ_t x_k)² / (2(1 − ᾱ_t))), and
    ε̂ = (x_t − √ᾱ_t E[x_0 | x_t]) / √(1 − ᾱ_t): the minimiser of L_simple, i.e. a perfectly trained network.
    """

    def __init__(self, levels, probs, alphas_cumprod):
        super().__init__()
        self.register_buffer("levels", levels.double())
        self.register_buffer("log_probs", probs.double().log())
        self.register_buffer("alphas_cumprod", alphas_cumprod.double())

    def forward(self, sample, timestep):
        x = sample.double().reshape(-1, 1)  # (B, 1)
        a = self.alphas_cumprod[timestep].reshape(-1, 1)
        logits = self.log_probs - (x - a.sqrt() * self.levels) ** 2 / (2 * (1 - a))  # (B, K)
        x0 = (logits.softmax(dim=1) * self.levels).sum(dim=1, keepdim=True)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return eps.reshape(sample.shape).float()


def make_problem(num_timesteps):
    scheduler = GaussianDiffusionScheduler(
        num_train_timesteps=num_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        variance_type="fixed_small",
    )
    levels, probs = discretised_gaussian_data()
    return scheduler, OptimalEpsilon(levels, probs, scheduler.alphas_cumprod), levels, probs


def expected_bpd(num_timesteps, replicas, seed=0):
    """E_data[bound] for the optimal denoiser: exact over the K data values, Monte Carlo over x_t."""
    scheduler, model, levels, probs = make_problem(num_timesteps)
    images = levels.float().repeat_interleave(replicas).view(-1, 1, 1, 1)  # (K·R, 1, 1, 1)
    out = bits_per_dim(
        model, scheduler, images, num_levels=K, batch_size=65536,
        generator=torch.Generator().manual_seed(seed), progress=False,
    )
    per_level = out.bits_per_dim.double().view(K, replicas)
    mean = (probs * per_level.mean(1)).sum().item()
    stderr = math.sqrt((probs**2 * per_level.var(1) / replicas).sum().item())
    return mean, stderr, out


def test_bound_is_above_entropy_and_approaches_it_as_T_grows():
    """Discretised Gaussian data (17 levels, entropy 3.53 bits) with its exact posterior-mean denoiser.

    The model (reverse chain + discretised decoder) is a proper distribution over the 17 levels, so its
    expected bound can never be below the data entropy. With fixed_small (β̃) variances and the cosine
    schedule the gap shrinks as T grows once steps are fine enough to resolve the level spacing
    (measured: T=100 1.20±0.11, T=300 0.39±0.06, T=1000 0.115±0.028, T=3000 0.020±0.016 bits).
    For very short chains it is not monotone: at T≈10 the coarse decoder absorbs the discreteness.
    """
    _, probs = discretised_gaussian_data()
    entropy_bits = -(probs * probs.log2()).sum().item()  # 1 dim: bits/dim = bits
    assert entropy_bits == pytest.approx(3.5306, abs=1e-3)
    gaps, stderrs = {}, {}
    for num_timesteps, replicas in ((100, 64), (300, 64), (1000, 32)):
        mean, stderr, out = expected_bpd(num_timesteps, replicas=replicas)
        gaps[num_timesteps], stderrs[num_timesteps] = mean - entropy_bits, stderr
        # A proper model of discrete data can never beat the data entropy (up to Monte-Carlo noise).
        assert gaps[num_timesteps] > -4 * stderr, (num_timesteps, mean, entropy_bits, stderr)
        assert out.terms_bpd.shape == (K * replicas, num_timesteps)
        assert torch.all(out.terms_bpd[:, 1:] > -1e-5)  # KL terms are non-negative
    # ... and it approaches the entropy as the chain gets finer.
    print("gap (bits) by T:", gaps, "stderr:", stderrs)
    assert gaps[100] > gaps[300] > gaps[1000], gaps
    assert gaps[1000] < 0.2, (gaps, stderrs)  # tolerance reached at T = 1000: < 0.2 bits of 3.53


def test_prior_term_matches_formula():
    scheduler = GaussianDiffusionScheduler(num_train_timesteps=1000, beta_schedule="linear")
    x0 = torch.linspace(-1, 1, 24).view(2, 3, 2, 2)
    abar = scheduler.alphas_cumprod[-1].double()
    kl = 0.5 * (-1 - torch.log1p(-abar) + (1 - abar) + abar * x0.double() ** 2)  # KL(N(√ᾱx, 1−ᾱ) ‖ N(0, 1))
    expected = kl.mean(dim=(1, 2, 3)) / math.log(2)
    got = prior_bpd(x0, scheduler)
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-9)
    assert 0 < got.max() < 1e-3  # linear schedule ends at ᾱ_T ≈ 4e-5


def test_estimate_agrees_with_exact_within_standard_errors():
    num_timesteps = 200
    scheduler, model, levels, probs = make_problem(num_timesteps)
    chosen = levels[[1, 5, 8, 12, 16]].float()
    replicas = 24
    exact = bits_per_dim(
        model, scheduler, chosen.repeat_interleave(replicas).view(-1, 1, 1, 1), num_levels=K,
        batch_size=65536, generator=torch.Generator().manual_seed(1), progress=False,
    )
    exact_mean = exact.bits_per_dim.double().view(5, replicas).mean(1)
    exact_se = exact.bits_per_dim.double().view(5, replicas).std(1) / math.sqrt(replicas)
    reps = 16
    est = estimate_bits_per_dim(
        model, scheduler, chosen.repeat(reps).view(-1, 1, 1, 1), num_timesteps_sampled=20, num_levels=K,
        batch_size=4096, generator=torch.Generator().manual_seed(2), progress=False,
    )
    assert est.timesteps_per_image == 20
    est_bpd = est.bits_per_dim.double().view(reps, 5)  # (reps, images)
    est_var = est.standard_error.double().view(reps, 5) ** 2
    # Unbiased: the average of the estimates agrees with the exact bound within a few standard errors.
    diff = (est_bpd.mean(0) - exact_mean).mean()
    diff_se = math.sqrt(est_var.sum().item() / (reps * 5) ** 2 + (exact_se**2).sum().item() / 25)
    assert abs(diff) < 4 * diff_se, (diff, diff_se)
    # Calibrated: the reported variances match the actual spread of repeated estimates
    # (E[se²] = Var(estimate); the per-stratum two-draw variance has few degrees of freedom, so
    # compare totals over images rather than single z-scores).
    ratio = est_bpd.var(0).sum().item() / est_var.mean(0).sum().item()
    assert 0.5 < ratio < 2.0, ratio
    assert est.mean_standard_error == pytest.approx(
        math.sqrt((est.standard_error.double() ** 2).sum().item()) / (reps * 5), rel=1e-5
    )


def test_stratum_edges():
    edges = stratum_edges(1000, 25)
    assert edges[0] == 0 and edges[1] == 1 and edges[-1] == 1000 and len(edges) == 26
    assert torch.all(edges[1:] > edges[:-1])
    widths = edges[1:] - edges[:-1]
    assert widths[1] < widths[-1]  # narrow at small t
    assert torch.equal(stratum_edges(7, 7), torch.arange(8))
    with pytest.raises(ValueError):
        stratum_edges(10, 11)


def tiny_unet(out_channels, num_class_embeds=None):
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=out_channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=num_class_embeds,
    ).eval()


def grid_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, K, (n, 1, 8, 8), generator=g).float() / (K - 1) * 2 - 1


def test_runs_with_diffusers_unet_learned_range_and_class_labels():
    scheduler = GaussianDiffusionScheduler(num_train_timesteps=12, variance_type="learned_range")
    unet = tiny_unet(2, num_class_embeds=3)
    images = grid_images(3)
    labels = torch.tensor([0, 2, 1])
    kw = dict(num_levels=K, class_labels=labels, batch_size=7, progress=False)
    a = bits_per_dim(unet, scheduler, images, generator=torch.Generator().manual_seed(0), **kw)
    b = bits_per_dim(unet, scheduler, images, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a.bits_per_dim, b.bits_per_dim)  # seeded
    assert a.bits_per_dim.shape == a.prior_bpd.shape == a.decoder_bpd.shape == (3,)
    assert a.terms_bpd.shape == (3, 12)
    assert torch.allclose(a.bits_per_dim, a.terms_bpd.sum(1) + a.prior_bpd)
    assert torch.equal(a.decoder_bpd, a.terms_bpd[:, 0])
    assert torch.isfinite(a.terms_bpd).all() and a.mean == pytest.approx(a.bits_per_dim.mean().item())
    # An untrained network is a poor model: far worse than the 4.09 bits of uniform 17-level data.
    assert a.mean > math.log2(K)
    est = estimate_bits_per_dim(unet, scheduler, images, num_timesteps_sampled=6,
                                generator=torch.Generator().manual_seed(0), **kw)
    assert est.bits_per_dim.shape == est.standard_error.shape == (3,)
    assert torch.all(est.standard_error >= 0)


def test_bad_inputs():
    scheduler = GaussianDiffusionScheduler(num_train_timesteps=4)
    unet = tiny_unet(1)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        bits_per_dim(unet, scheduler, grid_images(2) * 2, progress=False)
    with pytest.raises(ValueError, match="num_levels"):
        bits_per_dim(unet, scheduler, grid_images(2), num_levels=1, progress=False)
    with pytest.raises(ValueError, match="num_timesteps_sampled"):
        estimate_bits_per_dim(unet, scheduler, grid_images(2), num_timesteps_sampled=1, progress=False)
    with pytest.raises(ValueError, match="class_labels"):
        bits_per_dim(unet, scheduler, grid_images(2), class_labels=torch.tensor([0]), progress=False)


def test_paired_difference_uses_common_random_numbers():
    scheduler, model, levels, probs = make_problem(100)
    images = levels[[2, 8, 14]].float().repeat(8).view(-1, 1, 1, 1)
    worse = OptimalEpsilon(levels, torch.full_like(probs, 1.0 / K), scheduler.alphas_cumprod)  # wrong prior
    kw = dict(num_timesteps_sampled=16, num_levels=K, batch_size=4096, progress=False)
    a = estimate_bits_per_dim(model, scheduler, images, generator=torch.Generator().manual_seed(5), **kw)
    b = estimate_bits_per_dim(worse, scheduler, images, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a.timesteps, b.timesteps)
    diff, se = paired_difference(a, b)
    assert diff == pytest.approx(b.mean - a.mean, abs=1e-5)
    assert paired_difference(a, a) == (0.0, 0.0)
    # Shared draws cancel: the paired error is below the unpaired one.
    assert se < math.sqrt(a.mean_standard_error**2 + b.mean_standard_error**2)
    c = estimate_bits_per_dim(worse, scheduler, images, generator=torch.Generator().manual_seed(6), **kw)
    with pytest.raises(ValueError, match="same generator"):
        paired_difference(a, c)


# ------------------------------------------------------------------------------------------------------------------
# The bound of the process the model samples with: clipping, respaced chains, the `bound` field
# ------------------------------------------------------------------------------------------------------------------


def test_clipping_defaults_to_the_schedulers_and_the_result_names_the_bound():
    """clip_denoised=None clips exactly when the scheduler's sampler does (clip_sample or thresholding); an explicit
    True/False still wins, and the result says which bound it is."""
    unet = tiny_unet(1)  # untrained: predicted x_0 far outside [-1, 1], so clipping matters
    images = grid_images(3)
    kw = dict(num_levels=K, batch_size=64, progress=False)
    clipping = GaussianDiffusionScheduler(num_train_timesteps=12)  # clip_sample=True, diffusers' default
    runs = {clip: bits_per_dim(unet, clipping, images, generator=torch.Generator().manual_seed(0),
                               clip_denoised=clip, **kw) for clip in (None, True, False)}
    assert torch.equal(runs[None].bits_per_dim, runs[True].bits_per_dim)
    assert not torch.equal(runs[None].bits_per_dim, runs[False].bits_per_dim)
    assert runs[None].clip_denoised is True and runs[False].clip_denoised is False
    assert runs[None].bound == ("variational bound of the 12-step reverse process, variance_type='fixed_small', "
                                "x0 clipped to ±1 (as the scheduler's sampler)")
    assert "x0 unclipped (unlike the scheduler's sampler)" in runs[False].bound
    unclipped = GaussianDiffusionScheduler(num_train_timesteps=12, clip_sample=False)
    default = bits_per_dim(unet, unclipped, images, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(default.bits_per_dim, runs[False].bits_per_dim)
    assert default.clip_denoised is False and "x0 unclipped (as the scheduler's sampler)" in default.bound
    thresholding = GaussianDiffusionScheduler(num_train_timesteps=12, clip_sample=False, thresholding=True)
    est = estimate_bits_per_dim(unet, thresholding, images, num_timesteps_sampled=6, **kw)
    assert est.clip_denoised is True and "x0 thresholded (as the scheduler's sampler)" in est.bound
    with pytest.raises(TypeError, match="clip_denoised must be None, True or False"):
        bits_per_dim(unet, clipping, images, clip_denoised="yes", **kw)


class OnChain(torch.nn.Module):
    """`model` seen through a rebuilt K-step schedule: local timestep k is the chain's k-th kept timestep."""

    def __init__(self, model, ascending):
        super().__init__()
        self.model = model
        self.register_buffer("ascending", ascending)

    def forward(self, sample, timestep):
        return self.model(sample, self.ascending[timestep])


def test_respaced_chain_bound_equals_the_rebuilt_schedule():
    """IDM Sec. 4: the K-step chain t_K > … > t_1 is the diffusion with β'_k = 1 − ᾱ_{t_k}/ᾱ_{t_{k−1}}. Its bound
    (prior at t_K, K − 1 KL terms, the decoder from t_1) equals the full-chain bound of a scheduler rebuilt from
    those β' with the model re-indexed, for the same draws; "leading" spacing puts t_K = 180 < T − 1."""
    scheduler, model, levels, probs = make_problem(200)
    images = levels[[0, 3, 8, 12, 16]].float().repeat(4).view(-1, 1, 1, 1)
    kw = dict(num_levels=K, batch_size=1000, progress=False)
    out = bits_per_dim(model, scheduler, images, generator=torch.Generator().manual_seed(0), num_inference_steps=10,
                       **kw)
    chain = torch.arange(0, 200, 20)
    assert torch.equal(out.chain_timesteps, chain.flip(0)) and out.terms_bpd.shape == (20, 10)
    assert "10-step reverse process" in out.bound
    ab = scheduler.alphas_cumprod.double()[chain]
    beta_prime = 1 - ab / torch.cat([ab.new_ones(1), ab[:-1]])
    rebuilt = GaussianDiffusionScheduler(num_train_timesteps=10, trained_betas=beta_prime.tolist())
    ref = bits_per_dim(OnChain(model, chain), rebuilt, images, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(out.prior_bpd, ref.prior_bpd, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.terms_bpd, ref.terms_bpd, rtol=1e-3, atol=1e-5)  # float32 ᾱ of the two tables
    assert out.prior_bpd.min() > 10 * prior_bpd(images.double(), scheduler).max()  # the prior is taken at t = 180
    custom = bits_per_dim(model, scheduler, images, generator=torch.Generator().manual_seed(0),
                          timesteps=chain.flip(0).tolist(), **kw)
    assert torch.equal(custom.bits_per_dim, out.bits_per_dim)
    same_as_full = bits_per_dim(model, scheduler, images, generator=torch.Generator().manual_seed(0),
                                num_inference_steps=200, **kw)
    full = bits_per_dim(model, scheduler, images, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(same_as_full.bits_per_dim, full.bits_per_dim)


def test_estimate_on_a_chain_is_unbiased():
    """The stratified estimate over a chain's K steps agrees with the exact chain bound; drawn timesteps lie on
    the chain."""
    scheduler, model, levels, probs = make_problem(300)
    images = levels[[2, 8, 14]].float().repeat(40).view(-1, 1, 1, 1)
    kw = dict(num_levels=K, batch_size=4096, progress=False, num_inference_steps="ddim30")
    exact = bits_per_dim(model, scheduler, images, generator=torch.Generator().manual_seed(1), **kw)
    est = estimate_bits_per_dim(model, scheduler, images, num_timesteps_sampled=12,
                                generator=torch.Generator().manual_seed(2), **kw)
    chain = set(range(0, 300, 10))
    assert set(est.timesteps.flatten().tolist()) <= chain and len(est.chain_timesteps) == 30
    diff = est.mean - exact.mean
    se = math.sqrt(est.mean_standard_error**2 + exact.standard_error**2)
    assert abs(diff) < 4 * se, (diff, se)
