"""Negative log-likelihood of data under a diffusion model, in bits/dim (the variational bound).

For x_0 on a grid of ``num_levels`` values in [-1, 1] (IDM, Nichol & Dhariwal 2021, eq. 4-5 and 13;
Ho et al. 2020 eq. 5)::

    −log p(x_0) ≤ L_0 + Σ_{t=1}^{T−1} L_t + L_T
    L_0 = −log p_θ(x_0 | x_1)  (discretised Gaussian decoder)
    L_t = KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t))
    L_T = KL(q(x_T | x_0) ‖ N(0, I))

all in bits and divided by the number of dimensions. :func:`bits_per_dim` evaluates every term
(T network calls per image, one draw of x_t per term, as IDM's ``calc_bpd_loop``);
:func:`estimate_bits_per_dim` evaluates a stratified random subset of the terms and is unbiased for
the same quantity, with a standard error.

Precision: a model in half precision (fp16/bf16 weights, or called inside ``torch.autocast``) gets x_t in its
dtype and its output is upcast at once; x_0, x_t, the scheduler's coefficients and every term are float64. So a
half-precision model's bits/dim differ from its float32 twin's only through the rounding of the network's input
and output (tests/test_mixed_precision.py states the tolerance).

Every bits/dim is the bound of one reverse process, and by default of the one the model samples with: the
predicted x_0 is clipped as the scheduler clips (``clip_denoised=None``), the variance is the scheduler's
``variance_type`` (fixed, learned or analytic), and ``num_inference_steps`` / ``timesteps`` select a respaced chain
t_K > … > t_1 (the bound KL(q(x_{t_K} | x_0) ‖ N(0, I)) + Σ_k KL(q(x_{t_{k−1}} | x_{t_k}, x_0) ‖ p_θ) + L_0 of
that chain, IDM Sec. 4). The result's ``bound`` field says which process it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from .losses import compute_dtype, mean_flat, normal_kl, prior_bpd, vlb_terms


@dataclass
class BitsPerDimOutput(BaseOutput):
    """Result of :func:`bits_per_dim`.

    Args:
        bits_per_dim (`torch.Tensor` of shape `(N,)`): total bound per image.
        prior_bpd (`torch.Tensor` of shape `(N,)`): L_T, KL(q(x_T | x_0) ‖ N(0, I)).
        decoder_bpd (`torch.Tensor` of shape `(N,)`): L_0, the decoder negative log-likelihood.
        terms_bpd (`torch.Tensor` of shape `(N, K)`): the chain's terms, L_t for t = 0 … T−1 on the full chain
            (column 0 is the decoder term).
        mean (`float`): mean of ``bits_per_dim`` over the images.
        standard_error (`float`): std of ``bits_per_dim`` over images / √N (spread of the data).
        bound (`str`): which reverse process this is the bound of (steps, variance, clipping).
        clip_denoised (`bool`): whether the predicted x_0 was clipped (thresholded) before forming the mean.
        chain_timesteps (`torch.Tensor` of shape `(K,)`): the chain's timesteps, descending (K = T: the full chain);
            ``terms_bpd`` then has K columns, column k for the step from ``chain_timesteps[K − 1 − k]``.
    """

    bits_per_dim: torch.Tensor
    prior_bpd: torch.Tensor
    decoder_bpd: torch.Tensor
    terms_bpd: torch.Tensor
    mean: float
    standard_error: float
    bound: str = ""
    clip_denoised: Optional[bool] = None
    chain_timesteps: Optional[torch.Tensor] = None


@dataclass
class BitsPerDimEstimate(BaseOutput):
    """Result of :func:`estimate_bits_per_dim`.

    Args:
        bits_per_dim (`torch.Tensor` of shape `(N,)`): unbiased estimate of the bound per image.
        standard_error (`torch.Tensor` of shape `(N,)`): its Monte-Carlo standard error per image.
        prior_bpd (`torch.Tensor` of shape `(N,)`): L_T (computed exactly).
        mean (`float`): mean estimate over the images.
        mean_standard_error (`float`): Monte-Carlo standard error of ``mean`` for these images
            (√Σσ_i² / N; add the data spread yourself if you want an error about the population).
        timesteps_per_image (`int`): network calls per image.
        stratum_sizes (`torch.Tensor` of shape `(H,)`): |S_h|, number of timesteps in each stratum.
        timesteps (`torch.Tensor` of shape `(N, H, 2)`): the two timesteps drawn in each stratum.
        terms_bpd (`torch.Tensor` of shape `(N, H, 2)`): L_t at those draws (for paired comparisons,
            see :func:`paired_difference`).
        bound (`str`): which reverse process this is the bound of (steps, variance, clipping).
        clip_denoised (`bool`): whether the predicted x_0 was clipped (thresholded) before forming the mean.
        chain_timesteps (`torch.Tensor` of shape `(K,)`): the chain's timesteps, descending; the strata cut the
            chain's K steps (K = T: the full chain).
    """

    bits_per_dim: torch.Tensor
    standard_error: torch.Tensor
    prior_bpd: torch.Tensor
    mean: float
    mean_standard_error: float
    timesteps_per_image: int
    stratum_sizes: torch.Tensor
    timesteps: torch.Tensor
    terms_bpd: torch.Tensor
    bound: str = ""
    clip_denoised: Optional[bool] = None
    chain_timesteps: Optional[torch.Tensor] = None


def _model_device_dtype(unet, fallback: torch.device):
    param = next(iter(unet.parameters()), None) if hasattr(unet, "parameters") else None
    if param is None or not param.is_floating_point():
        return fallback, torch.float32
    return param.device, param.dtype


def _call_unet(unet, sample, timesteps, class_labels):
    out = unet(sample, timesteps) if class_labels is None else unet(sample, timesteps, class_labels=class_labels)
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out.to(compute_dtype(out))  # a half-precision model's output upcast at once; float64 kept


def _check_inputs(images, class_labels, num_levels, batch_size):
    if not isinstance(images, torch.Tensor) or images.ndim < 2:
        raise TypeError(f"images must be a tensor of shape (N, C, ...), got {type(images).__name__}")
    if images.min() < -1.0 - 1e-5 or images.max() > 1.0 + 1e-5:
        raise ValueError(
            f"images must lie in [-1, 1], got range [{images.min().item():.3f}, {images.max().item():.3f}]"
        )
    if not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if class_labels is not None and class_labels.shape[0] != images.shape[0]:
        raise ValueError(f"class_labels has {class_labels.shape[0]} entries for {images.shape[0]} images")


def sampler_clips_x0(scheduler) -> bool:
    """Whether ``scheduler``'s sampler clips (``clip_sample``) or thresholds (``thresholding``) x̂_0: the bound of
    the model as it samples then uses the same x̂_0 in the reverse mean (IDM's ``clip_denoised=True``). The one
    answer used by the trainer, the evaluate CLI and the comparison. Unclipped, the cosine schedule's last step
    (β = 0.999, ᾱ ≈ 2e-9) turns a small ε error into several bits/dim of KL for a model that samples the same."""
    config = scheduler.config
    return bool(config.get("clip_sample", False) or config.get("thresholding", False))


def _resolve_clip(scheduler, clip_denoised: Optional[bool]) -> bool:
    """None: clip (or threshold) x_0 exactly when the scheduler's sampler does."""
    if clip_denoised is None:
        return sampler_clips_x0(scheduler)
    if not isinstance(clip_denoised, (bool, np.bool_)):
        raise TypeError(f"clip_denoised must be None, True or False, got {clip_denoised!r}")
    return bool(clip_denoised)


def _resolve_chain(scheduler, num_inference_steps, timesteps):
    """The scheduler whose chain is evaluated and the chain's timesteps, ascending ((K,) tensor), or None for the
    full training chain. A respaced chain is set on a copy, so the caller's scheduler is untouched."""
    if num_inference_steps is None and timesteps is None:
        return scheduler, None
    chain_scheduler = type(scheduler).from_config(scheduler.config)
    chain_scheduler.set_timesteps(num_inference_steps, timesteps=timesteps)
    ascending = chain_scheduler.timesteps.flip(0).cpu()
    if torch.equal(ascending, torch.arange(scheduler.config.num_train_timesteps)):
        return scheduler, None
    return chain_scheduler, ascending


def _chain_prior_bpd(images: torch.Tensor, scheduler, chain: Optional[torch.Tensor]) -> torch.Tensor:
    """KL(q(x_top | x_0) ‖ N(0, I)) per image in bits/dim at the chain's first (largest) timestep."""
    top = scheduler.config.num_train_timesteps - 1 if chain is None else int(chain[-1])
    if top == scheduler.config.num_train_timesteps - 1:
        return prior_bpd(images.double(), scheduler).float().cpu()
    t = torch.full((images.shape[0],), top, dtype=torch.long)
    mean, _, log_variance = scheduler.q_mean_variance(images.double(), t)
    kl = normal_kl(mean, log_variance.expand_as(mean), torch.zeros_like(mean), torch.zeros_like(mean))
    return (mean_flat(kl) / math.log(2.0)).float().cpu()


def _describe_bound(scheduler, num_steps: int, clip: bool) -> str:
    clipping = "x0 clipped" if clip else "x0 unclipped"
    if clip and scheduler.config.thresholding:
        clipping = "x0 thresholded"
    elif clip:
        clipping += f" to ±{scheduler.config.clip_sample_range:g}"
    same = clip == bool(scheduler.config.thresholding or scheduler.config.clip_sample)
    return (f"variational bound of the {num_steps}-step reverse process, variance_type="
            f"{scheduler.config.variance_type!r}, {clipping} ({'as' if same else 'unlike'} the scheduler's sampler)")


def _terms_for_pairs(
    unet, scheduler, images, class_labels, image_idx, timesteps, generator, num_levels, clip_denoised,
    prev_timesteps=None,
):
    """L_t in bits/dim for (image, t) pairs: one fresh x_t ~ q(x_t | x_0) per pair. Returns (P,)."""
    device, dtype = _model_device_dtype(unet, images.device)
    x0 = images[image_idx].to(device=device, dtype=torch.float32)  # (P, C, ...)
    t = timesteps.to(device)
    noise_device = generator.device if generator is not None else device
    noise = torch.randn(x0.shape, generator=generator, device=noise_device).to(device)
    x_t = scheduler.add_noise(x0, noise, t)
    labels = None if class_labels is None else class_labels[image_idx].to(device)
    model_output = _call_unet(unet, x_t.to(dtype), t, labels)
    # The bound's terms in float64: KLs at small t divide tiny mean differences by tiny variances.
    prev = None if prev_timesteps is None else prev_timesteps.to(device)
    terms = vlb_terms(
        model_output.double(), x0.double(), x_t.double(), t, scheduler, num_levels=num_levels,
        clip_denoised=clip_denoised, prev_timesteps=prev,
    )
    return terms.float().cpu()


@torch.no_grad()
def bits_per_dim(
    unet,
    scheduler,
    images: torch.Tensor,
    num_levels: int = 256,
    class_labels: Optional[torch.Tensor] = None,
    batch_size: int = 256,
    generator: Optional[torch.Generator] = None,
    progress: bool = True,
    clip_denoised: Optional[bool] = None,
    num_inference_steps: Optional[Union[int, str]] = None,
    timesteps: Optional[Sequence[int]] = None,
) -> BitsPerDimOutput:
    """Negative log-likelihood bound in bits/dim with every one of the chain's K terms evaluated.

    Costs N·K network calls (K = T for the full chain), batched ``batch_size`` (image, t) pairs at a time.

    Args:
        unet: any diffusers-style model: ``unet(sample, timesteps[, class_labels=...])`` returning an
            object with ``.sample`` (our ``DDPMUNet2DModel``, diffusers' ``UNet2DModel``) or a tensor.
            Its output must match the scheduler's ``prediction_type`` / ``variance_type``.
        scheduler: a ``GaussianDiffusionScheduler``; its ``variance_type`` (fixed, learned or analytic) is the
            reverse variance. Its own ``set_timesteps`` chain is not used (see ``num_inference_steps``).
        images: (N, C, ...) data in [-1, 1] on the ``num_levels`` grid.
        num_levels: grey levels of the data (256 for 8-bit images, 17 for sklearn digits).
        class_labels: optional (N,) labels passed as ``class_labels=`` to the model.
        batch_size: (image, t) pairs per network call.
        generator: seeds the noise draws (results depend on ``batch_size`` as well).
        progress: show a tqdm bar.
        clip_denoised: clip (or threshold) predicted x_0 before forming the reverse mean; ``None`` (default):
            as the scheduler's sampler does (``clip_sample`` or ``thresholding``), so the bound is that of the
            process the model samples with.
        num_inference_steps: evaluate the bound of this respaced chain instead of the full one: an int (spaced
            by the scheduler's ``timestep_spacing``) or an IDM respacing string such as ``"ddim50"``, as
            ``scheduler.set_timesteps``.
        timesteps: or a custom descending chain of training timesteps (e.g. from
            :func:`diffusers_ddpm_ext.analytic.optimal_trajectory`).

    Returns:
        :class:`BitsPerDimOutput`.
    """
    _check_inputs(images, class_labels, num_levels, batch_size)
    clip_denoised = _resolve_clip(scheduler, clip_denoised)
    scheduler, chain = _resolve_chain(scheduler, num_inference_steps, timesteps)
    num_images = images.shape[0]
    num_timesteps = scheduler.config.num_train_timesteps if chain is None else chain.numel()
    pair_image = torch.arange(num_images).repeat_interleave(num_timesteps)  # (N·K,)
    pair_position = torch.arange(num_timesteps).repeat(num_images)  # (N·K,) position on the chain, 0 = decoder
    pair_t, pair_prev = _chain_steps(chain, pair_position)
    terms = torch.empty(num_images * num_timesteps)
    for start in tqdm(range(0, terms.numel(), batch_size), desc="bits/dim", disable=not progress):
        sl = slice(start, start + batch_size)
        terms[sl] = _terms_for_pairs(
            unet, scheduler, images, class_labels, pair_image[sl], pair_t[sl], generator, num_levels, clip_denoised,
            None if pair_prev is None else pair_prev[sl],
        )
    terms = terms.view(num_images, num_timesteps)  # (N, K)
    prior = _chain_prior_bpd(images, scheduler, chain)  # (N,)
    total = terms.sum(dim=1) + prior
    std = total.std().item() if num_images > 1 else float("nan")
    return BitsPerDimOutput(
        bits_per_dim=total,
        prior_bpd=prior,
        decoder_bpd=terms[:, 0].clone(),
        terms_bpd=terms,
        mean=total.mean().item(),
        standard_error=std / math.sqrt(num_images),
        bound=_describe_bound(scheduler, num_timesteps, clip_denoised),
        clip_denoised=clip_denoised,
        chain_timesteps=_descending(scheduler, chain),
    )


def _chain_steps(chain: Optional[torch.Tensor], positions: torch.Tensor):
    """(t, prev) of chain positions (0 = the step onto the data); prev is None for the full training chain."""
    if chain is None:
        return positions, None
    prev = torch.where(positions > 0, chain[(positions - 1).clamp(min=0)], torch.full_like(positions, -1))
    return chain[positions], prev


def _descending(scheduler, chain: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.arange(scheduler.config.num_train_timesteps - 1, -1, -1) if chain is None else chain.flip(0)


def stratum_edges(num_timesteps: int, num_strata: int) -> torch.Tensor:
    """Boundaries 0 = e_0 < e_1 < … < e_H = T of the strata used by :func:`estimate_bits_per_dim`.

    t = 0 (the decoder term, a different kind of quantity) is a stratum of its own; the rest of
    {1, …, T−1} is cut at quadratically spaced points, so strata are narrow at small t where the
    KL terms are large and change fast, and wide at large t where they are tiny.
    """
    if num_strata < 1 or num_strata > num_timesteps:
        raise ValueError(f"num_strata must be in [1, {num_timesteps}], got {num_strata}")
    if num_strata == 1:
        return torch.tensor([0, num_timesteps])
    rest = num_strata - 1
    edges = [0, 1] + [1 + round((num_timesteps - 1) * (i / rest) ** 2) for i in range(1, rest + 1)]
    for i in range(2, len(edges)):  # strictly increasing ...
        edges[i] = max(edges[i], edges[i - 1] + 1)
    edges[-1] = num_timesteps
    for i in range(len(edges) - 2, 0, -1):  # ... and fitting under T
        edges[i] = min(edges[i], edges[i + 1] - 1)
    return torch.tensor(edges)


@torch.no_grad()
def estimate_bits_per_dim(
    unet,
    scheduler,
    images: torch.Tensor,
    num_timesteps_sampled: int = 50,
    num_levels: int = 256,
    class_labels: Optional[torch.Tensor] = None,
    batch_size: int = 256,
    generator: Optional[torch.Generator] = None,
    progress: bool = True,
    clip_denoised: Optional[bool] = None,
    num_inference_steps: Optional[Union[int, str]] = None,
    timesteps: Optional[Sequence[int]] = None,
) -> BitsPerDimEstimate:
    """Unbiased stratified estimate of :func:`bits_per_dim` from ``num_timesteps_sampled`` calls per image.

    The chain's K steps (K = T for the full chain; positions 0 … K−1, 0 the decoder) are split into
    H = ``num_timesteps_sampled // 2`` strata S_h (see :func:`stratum_edges`).
    In each stratum two timesteps are drawn uniformly (with replacement), each with its own x_t, and
    Σ_h |S_h|·mean(L_{t_h1}, L_{t_h2}) + L_T estimates the bound without bias. The two draws per
    stratum give the unbiased variance estimate Σ_h |S_h|²·(L_{t_h1} − L_{t_h2})²/4, whose root is
    the reported standard error. It accounts for the randomness of both t and x_t, so an exact
    evaluation (which still draws one x_t per term) agrees with it within a few standard errors.

    Args:
        unet: diffusers-style model, as in :func:`bits_per_dim`.
        scheduler: a ``GaussianDiffusionScheduler``.
        images: (N, C, ...) data in [-1, 1] on the ``num_levels`` grid.
        num_timesteps_sampled: network calls per image (even, >= 2; capped at 2K).
        num_levels: grey levels of the data.
        class_labels: optional (N,) labels.
        batch_size: (image, t) pairs per network call.
        generator: seeds the draws of t and of the noise.
        progress: show a tqdm bar.
        clip_denoised: as in :func:`bits_per_dim` (default: as the scheduler's sampler clips).
        num_inference_steps, timesteps: the chain, as in :func:`bits_per_dim` (default: the full chain).

    Returns:
        :class:`BitsPerDimEstimate`.
    """
    _check_inputs(images, class_labels, num_levels, batch_size)
    if not isinstance(num_timesteps_sampled, int) or num_timesteps_sampled < 2:
        raise ValueError(f"num_timesteps_sampled must be an integer >= 2, got {num_timesteps_sampled!r}")
    clip_denoised = _resolve_clip(scheduler, clip_denoised)
    scheduler, chain = _resolve_chain(scheduler, num_inference_steps, timesteps)
    num_images = images.shape[0]
    num_timesteps = scheduler.config.num_train_timesteps if chain is None else chain.numel()
    num_strata = min(num_timesteps_sampled // 2, num_timesteps)
    edges = stratum_edges(num_timesteps, num_strata)
    sizes = (edges[1:] - edges[:-1]).double()  # (H,)
    draw_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(num_images, num_strata, 2, generator=generator, device=draw_device, dtype=torch.float64).cpu()
    draws = edges[:-1].view(1, -1, 1) + (u * sizes.view(1, -1, 1)).long()  # (N, H, 2)
    draws = torch.minimum(draws, edges[1:].view(1, -1, 1) - 1)
    pair_image = torch.arange(num_images).view(-1, 1, 1).expand_as(draws).reshape(-1)
    pair_t, pair_prev = _chain_steps(chain, draws.reshape(-1))
    terms = torch.empty(pair_t.numel())
    for start in tqdm(range(0, terms.numel(), batch_size), desc="bits/dim estimate", disable=not progress):
        sl = slice(start, start + batch_size)
        terms[sl] = _terms_for_pairs(
            unet, scheduler, images, class_labels, pair_image[sl], pair_t[sl], generator, num_levels, clip_denoised,
            None if pair_prev is None else pair_prev[sl],
        )
    terms = terms.view(num_images, num_strata, 2).double()
    prior = _chain_prior_bpd(images, scheduler, chain)
    estimate = (sizes * terms.mean(dim=2)).sum(dim=1) + prior  # (N,)
    variance = (sizes**2 * (terms[..., 0] - terms[..., 1]) ** 2 / 4.0).sum(dim=1)  # (N,)
    return BitsPerDimEstimate(
        bits_per_dim=estimate.float(),
        standard_error=variance.sqrt().float(),
        prior_bpd=prior,
        mean=estimate.mean().item(),
        mean_standard_error=math.sqrt(variance.sum().item()) / num_images,
        timesteps_per_image=2 * num_strata,
        stratum_sizes=sizes.long(),
        timesteps=pair_t.view_as(draws),
        terms_bpd=terms.float(),
        bound=_describe_bound(scheduler, num_timesteps, clip_denoised),
        clip_denoised=clip_denoised,
        chain_timesteps=_descending(scheduler, chain),
    )


def paired_difference(estimate_a: BitsPerDimEstimate, estimate_b: BitsPerDimEstimate) -> tuple:
    """Mean of (b − a) over images and its Monte-Carlo standard error, for two models estimated with the same draws.

    Call :func:`estimate_bits_per_dim` for both models on the same images with the same ``generator`` seed and
    ``batch_size``: the timesteps and the noise are then identical, and differencing per stratum cancels most of
    the sampling noise the two estimates share (common random numbers).

    Returns:
        ``(mean_difference, standard_error)`` in bits/dim.
    """
    if not torch.equal(estimate_a.timesteps, estimate_b.timesteps):
        raise ValueError("the two estimates used different timesteps; estimate both with the same generator seed")
    sizes = estimate_a.stratum_sizes.double()
    diff_terms = estimate_b.terms_bpd.double() - estimate_a.terms_bpd.double()  # (N, H, 2)
    diff = (sizes * diff_terms.mean(dim=2)).sum(dim=1) + (estimate_b.prior_bpd - estimate_a.prior_bpd).double()
    variance = (sizes**2 * (diff_terms[..., 0] - diff_terms[..., 1]) ** 2 / 4.0).sum(dim=1)
    num_images = diff.numel()
    return diff.mean().item(), math.sqrt(variance.sum().item()) / num_images
