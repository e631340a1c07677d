"""Training objectives for Gaussian diffusion: L_simple, the IDM hybrid loss, the pure VLB and min-SNR-γ.

Every quantity here is elementwise or per example; reductions over pixels are means ("per dim"), so
VLB terms come out in bits/dim as in IDM (Nichol & Dhariwal 2021, "Improved DDPM", below "IDM").

The one entry point a training loop needs is :func:`diffusion_loss`::

    timesteps, weights = sampler.sample(batch_size, device)
    noise = torch.randn_like(x0)
    noisy = scheduler.add_noise(x0, noise, timesteps)
    model_output = unet(noisy, timesteps).sample
    out = diffusion_loss(model_output, x0, noise, timesteps, scheduler, loss_type="hybrid", weights=weights)
    out.loss.mean().backward()
    sampler.update(timesteps, out.unweighted_loss.detach())
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from diffusers.utils import BaseOutput

from .scheduler import LEARNED_VARIANCE_TYPES, PREDICTION_TYPES  # the vocabulary lives in scheduler.py

LOSS_TYPES = ("simple", "hybrid", "kl")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def compute_dtype(*tensors) -> torch.dtype:
    """The dtype the loss terms are computed in: the inputs' promoted dtype, at least float32.

    Half-precision model outputs (fp16 / bf16 autocast) are upcast here, at the boundary: exp(±log σ²) of a
    learned log-variance overflows float16 beyond |log σ²| ≈ 11, KLs reach 10^3 bits/dim at the last cosine step
    (fp16 resolves 0.5 there) and a sum over pixels in half precision loses the small terms.
    """
    dtype = torch.float32
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) ‖ N(mean2, exp(logvar2))) elementwise, in nats.

    Arguments broadcast against each other; at least one must be a tensor.
    """
    tensor = next(x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, torch.Tensor))
    dtype = compute_dtype(mean1, logvar1, mean2, logvar2)  # half precision in: float32 out
    mean1, logvar1, mean2, logvar2 = (x.to(dtype) if isinstance(x, torch.Tensor)
                                      else torch.tensor(x, dtype=dtype, device=tensor.device)
                                      for x in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def _log_normal_cdf_difference(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """log(Φ(upper) − Φ(lower)) for upper > lower, accurate in both tails.

    Φ(b) − Φ(a) loses every digit when a and b sit far in the right tail; there Φ(−a) − Φ(−b) does not,
    so we reflect the interval whenever it lies right of 0.
    """
    reflect = lower > 0
    lo = torch.where(reflect, -upper, lower)
    hi = torch.where(reflect, -lower, upper)
    log_hi = torch.special.log_ndtr(hi)
    log_lo = torch.special.log_ndtr(lo)
    # log Φ(hi) + log(1 − Φ(lo)/Φ(hi)); the clamp only guards a degenerate zero-width bin.
    return log_hi + torch.log(torch.clamp(-torch.expm1(log_lo - log_hi), min=1e-30))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor, num_levels: int = 256
) -> torch.Tensor:
    """Elementwise log-probability (nats) of quantised data under a discretised Gaussian (IDM eq. 13 decoder).

    The data take ``num_levels`` evenly spaced values in [-1, 1]; each value owns the bin of half-width
    1/(num_levels − 1) around it, and the two edge bins extend to ∓∞ so the probabilities over the
    ``num_levels`` values sum to one. Exact normal CDFs are used (IDM uses a tanh approximation).

    Args:
        x: data in [-1, 1] on the grid, any shape.
        means: Gaussian means, broadcastable to ``x``.
        log_scales: log standard deviations (½·log variance), broadcastable to ``x``.
        num_levels: number of quantisation levels (256 for 8-bit images, 17 for sklearn digits).

    Returns:
        Tensor of the broadcast shape with log p(x) in nats.
    """
    if not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}")
    dtype = compute_dtype(x, means, log_scales)  # half precision CDFs are too coarse
    x, means, log_scales = (t.to(dtype) for t in torch.broadcast_tensors(x, means, log_scales))
    half_width = 1.0 / (num_levels - 1)
    inv_scale = torch.exp(-log_scales)
    upper = (x - means + half_width) * inv_scale
    lower = (x - means - half_width) * inv_scale
    log_cdf_upper = torch.special.log_ndtr(upper)  # lowest bin: (-∞, -1 + h]
    log_sf_lower = torch.special.log_ndtr(-lower)  # highest bin: [1 - h, ∞)
    log_bin = _log_normal_cdf_difference(lower, upper)
    # A bin much narrower than σ (a large predicted variance): Φ(b) − Φ(a) cancels to 0 in float32 (the clamp
    # above, a wrong value and no gradient), so integrate the density directly: the midpoint rule with its
    # second-order correction, ∫ φ = w·φ(m)·(1 + (m² − 1)·w²/24 + O(w⁴(1 + m⁴))), w = b − a, m = (a + b)/2.
    width = 2.0 * half_width * inv_scale
    narrow = width * (1.0 + (x - means).abs() * inv_scale) < 0.05
    mid = torch.where(narrow, (x - means) * inv_scale, torch.zeros_like(x))
    w = torch.where(narrow, width, torch.zeros_like(x))
    log_narrow = (math.log(2.0 * half_width) - log_scales - 0.5 * mid**2 - 0.5 * math.log(2.0 * math.pi)
                  + torch.log1p((mid**2 - 1.0) * w**2 / 24.0))
    log_bin = torch.where(narrow, log_narrow, log_bin)
    # Compare against the midpoint between the edge level and its neighbour, robust to float noise.
    return torch.where(
        x < -1.0 + half_width, log_cdf_upper, torch.where(x > 1.0 - half_width, log_sf_lower, log_bin)
    )


def _check_scheduler_learns_variance(scheduler, loss_type: str) -> None:
    variance_type = scheduler.config.variance_type
    if loss_type == "hybrid" and variance_type not in LEARNED_VARIANCE_TYPES:
        raise ValueError(
            f"loss_type='hybrid' trains the variance head and needs variance_type in {LEARNED_VARIANCE_TYPES}, "
            f"got variance_type={variance_type!r}; use loss_type='simple' (or 'kl') with a fixed variance."
        )


def vlb_terms(
    model_output: torch.Tensor,
    original_samples: torch.Tensor,
    noisy_samples: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,
    num_levels: int = 256,
    detach_mean: bool = False,
    clip_denoised: bool = False,
    prev_timesteps: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One term of the variational bound per example, in bits/dim (IDM eq. 4-5 and 13).

    L_t = KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t)) for t > 0 and L_0 = −log p_θ(x_0 | x_1) with the
    discretised Gaussian decoder at t = 0.

    Args:
        model_output: raw network output (B, C or 2C, ...).
        original_samples: x_0 on the ``num_levels`` grid in [-1, 1] (B, C, ...).
        noisy_samples: x_t (B, C, ...).
        timesteps: (B,) long training timesteps.
        scheduler: a ``GaussianDiffusionScheduler``.
        num_levels: quantisation levels of the data for the decoder term.
        detach_mean: stop the gradient through the predicted mean (IDM hybrid loss: only the
            variance head learns from the VLB).
        clip_denoised: clip the predicted x_0 to [-1, 1] before forming the mean.
        prev_timesteps: previous timesteps of a respaced chain (−1 means ᾱ_prev = 1); ``None`` = t − 1.
            With respacing the decoder term is taken where ``prev_timesteps`` is −1.

    Returns:
        (B,) tensor, bits per dimension, in float32 (float64 for float64 inputs) whatever the inputs' precision.
    """
    dtype = compute_dtype(model_output, original_samples, noisy_samples)  # fp16/bf16 outputs: upcast here
    model_output, original_samples, noisy_samples = (
        t.to(dtype) for t in (model_output, original_samples, noisy_samples))
    if detach_mean:
        prediction, variance_values = scheduler.split_model_output(model_output, noisy_samples)
        if variance_values is None:
            raise ValueError(
                f"detach_mean=True needs a learned variance (variance_type in {LEARNED_VARIANCE_TYPES}), "
                f"got variance_type={scheduler.config.variance_type!r}"
            )
        model_output = torch.cat([prediction.detach(), variance_values], dim=1)
    true_mean, _, true_log_variance = scheduler.q_posterior_mean_variance(
        original_samples, noisy_samples, timesteps, prev_timesteps=prev_timesteps
    )
    out = scheduler.p_mean_variance(
        model_output, noisy_samples, timesteps, prev_timesteps=prev_timesteps, clip_denoised=clip_denoised
    )
    model_mean = out.mean
    model_log_variance = out.log_variance
    if model_log_variance.shape != model_mean.shape:
        model_log_variance = model_log_variance.expand_as(model_mean)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / math.log(2.0)
    decoder_nll = -mean_flat(
        discretized_gaussian_log_likelihood(original_samples, model_mean, 0.5 * model_log_variance, num_levels)
    ) / math.log(2.0)
    first = (timesteps == 0) if prev_timesteps is None else (prev_timesteps < 0)
    return torch.where(first.to(kl.device), decoder_nll, kl)


def prior_bpd(original_samples: torch.Tensor, scheduler) -> torch.Tensor:
    """KL(q(x_T | x_0) ‖ N(0, I)) per example in bits/dim: the prior term of the bound (IDM eq. 5, L_T)."""
    original_samples = original_samples.to(compute_dtype(original_samples))
    batch = original_samples.shape[0]
    last = torch.full((batch,), scheduler.config.num_train_timesteps - 1, dtype=torch.long, device=original_samples.device)
    mean, _, log_variance = scheduler.q_mean_variance(original_samples, last)
    kl = normal_kl(mean, log_variance.expand_as(mean), torch.zeros_like(mean), torch.zeros_like(mean))
    return mean_flat(kl) / math.log(2.0)


def min_snr_weights(snr: torch.Tensor, snr_gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, eq. 8 and its ε / v forms) for each example's MSE.

    The ε weight min(SNR, γ)/SNR is written as 1 below γ so that SNR = 0 (zero-terminal-SNR schedules)
    gives its limit 1 instead of 0/0.

    Args:
        snr: (B,) signal-to-noise ratios ᾱ_t / (1 − ᾱ_t).
        snr_gamma: γ > 0 (5 in the paper).
        prediction_type: "epsilon" (min(SNR, γ)/SNR), "sample" (min(SNR, γ)) or "v_prediction"
            (min(SNR, γ)/(SNR + 1)).
    """
    if not snr_gamma > 0:
        raise ValueError(f"snr_gamma must be positive, got {snr_gamma!r}")
    clipped = torch.clamp(snr, max=snr_gamma)
    if prediction_type == "epsilon":
        return torch.where(snr < snr_gamma, torch.ones_like(snr), snr_gamma / snr)
    if prediction_type == "sample":
        return clipped
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def training_target(original_samples, noise, timesteps, scheduler) -> torch.Tensor:
    """What the network regresses for L_simple: ε, x_0 or v = √ᾱ ε − √(1−ᾱ) x_0, per ``prediction_type``."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return original_samples
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(original_samples, noise, timesteps)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


@dataclass
class DiffusionLossOutput(BaseOutput):
    """Per-example losses returned by :func:`diffusion_loss`.

    Args:
        loss (`torch.Tensor` of shape `(B,)`): what to minimise (take ``.mean()``): importance weights applied.
        unweighted_loss (`torch.Tensor` of shape `(B,)`): the same before the timestep-sampler weights;
            feed it (detached) to ``LossSecondMomentSampler.update``.
        mse (`torch.Tensor` of shape `(B,)`): mean squared error on the prediction target, no weighting.
        vlb (`torch.Tensor` of shape `(B,)` or `None`): the VLB term L_t in bits/dim (before the λ·T
            scaling), ``None`` for ``loss_type="simple"``.
    """

    loss: torch.Tensor
    unweighted_loss: torch.Tensor
    mse: torch.Tensor
    vlb: Optional[torch.Tensor] = None


def diffusion_loss(
    model_output: torch.Tensor,
    original_samples: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,
    loss_type: str = "simple",
    snr_gamma: Optional[float] = None,
    vlb_weight: float = 1e-3,
    num_levels: int = 256,
    weights: Optional[torch.Tensor] = None,
    noisy_samples: Optional[torch.Tensor] = None,
) -> DiffusionLossOutput:
    """Per-example training loss for one batch, for any prediction and variance type of the scheduler.

    - ``"simple"``: L_simple = ‖target − prediction‖² averaged over dims (Ho et al. 2020 eq. 14), with
      the target ε, x_0 or v as the scheduler's ``prediction_type`` says; optionally min-SNR-γ weighted.
      With a learned variance the variance half of the output receives no gradient.
    - ``"hybrid"``: L_simple + λ·T·L_vlb(t) (IDM eq. 16 with λ = ``vlb_weight``, the IDM code's T/1000
      rescaling), L_vlb computed on the **detached** mean so only the variance head learns from it.
      Needs ``variance_type`` "learned" or "learned_range".
    - ``"kl"``: T·L_vlb(t) alone (IDM's rescaled KL), the mean not detached: a single-sample unbiased
      estimate of the full bound when t is uniform. Works with fixed variances too (then only the mean
      is trained, with the bound's weighting). ``snr_gamma`` is rejected: there is no MSE term to weight.

    Args:
        model_output: network output (B, C, ...) or (B, 2C, ...) with learned variance.
        original_samples: x_0 (B, C, ...) in [-1, 1] (on the ``num_levels`` grid for an exact decoder term).
        noise: ε used to make x_t (B, C, ...).
        timesteps: (B,) long training timesteps.
        scheduler: a ``GaussianDiffusionScheduler``.
        loss_type: "simple", "hybrid" or "kl".
        snr_gamma: γ for min-SNR-γ weighting of the MSE term (None = off; 5 is the paper's value).
        vlb_weight: λ of the hybrid loss.
        num_levels: grey levels of the data for the decoder term at t = 0.
        weights: (B,) importance weights from a timestep sampler (None = all ones).
        noisy_samples: x_t if the caller already has it; recomputed with ``scheduler.add_noise`` otherwise.

    Returns:
        :class:`DiffusionLossOutput`.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "kl" and snr_gamma is not None:
        raise ValueError("snr_gamma applies to the MSE term; loss_type='kl' has none. Pass snr_gamma=None.")
    _check_scheduler_learns_variance(scheduler, loss_type)
    if timesteps.ndim != 1 or timesteps.shape[0] != original_samples.shape[0]:
        raise ValueError(
            f"timesteps must have shape (B,) = ({original_samples.shape[0]},), got {tuple(timesteps.shape)}"
        )
    if noisy_samples is None:
        noisy_samples = scheduler.add_noise(original_samples, noise, timesteps)

    prediction, _ = scheduler.split_model_output(model_output, noisy_samples)
    target = training_target(original_samples, noise, timesteps, scheduler)
    dtype = compute_dtype(model_output)  # never reduce in half precision
    mse = mean_flat((prediction.to(dtype) - target.to(dtype)) ** 2)  # (B,)

    num_timesteps = scheduler.config.num_train_timesteps
    vlb = None
    if loss_type != "simple":
        vlb = vlb_terms(
            model_output.to(dtype),
            original_samples.to(dtype),
            noisy_samples.to(dtype),
            timesteps,
            scheduler,
            num_levels=num_levels,
            detach_mean=loss_type == "hybrid",
        )  # (B,) bits/dim
    if loss_type == "kl":
        unweighted = num_timesteps * vlb
    else:
        unweighted = mse
        if snr_gamma is not None:
            snr = scheduler.snr(timesteps).to(mse.device, mse.dtype)
            unweighted = mse * min_snr_weights(snr, snr_gamma, scheduler.config.prediction_type)
        if vlb is not None:
            unweighted = unweighted + vlb_weight * num_timesteps * vlb
    loss = unweighted if weights is None else unweighted * weights.to(unweighted)
    return DiffusionLossOutput(loss=loss, unweighted_loss=unweighted, mse=mse, vlb=vlb)
