"""Analytic-DPM: the optimal reverse variance of any trained ε-model, with no training.

Bao, Li, Zhu & Zhang, "Analytic-DPM: an Analytic Estimate of the Optimal Reverse Variance in Diffusion
Probabilistic Models" (ICLR 2022), Theorem 1: the KL-optimal isotropic variance of each reverse step depends on
the model only through one number per timestep,

    Γ_t = E_{q(x_t)} ‖ε_θ(x_t, t)‖² / d,

the mean squared noise prediction over training data (their Sec. 3.1 estimates it by Monte Carlo). Once the table
is known, `GaussianDiffusionScheduler(variance_type="analytic", analytic_gamma=...)` uses it in `step` (DDPM and
DDIM families), in the likelihood and on every respaced chain (see `scheduler.analytic_variance`)::

    scheduler = fit_analytic_variance(unet, scheduler, train_images)      # one call; ~T·num_samples network calls
    pipeline = DDPMPipeline(unet=unet, scheduler=scheduler)                # sample with fewer steps

:func:`optimal_trajectory` picks the K sampling timesteps that minimise the bound by dynamic programming over the
per-step terms (their Sec. 4), with the model's measured x_0 error when given (more robust than the paper's
optimal-mean form for models that are not fully trained).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, List, Optional, Union

import numpy as np
import torch
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from .scheduler import PREDICTION_TYPES, GaussianDiffusionScheduler, analytic_variance


@dataclass
class AnalyticGammaEstimate(BaseOutput):
    """Result of :func:`estimate_analytic_gamma`.

    Args:
        gamma (`torch.Tensor` of shape `(T,)`, float64): Γ_t = E‖ε_θ(x_t, t)‖²/d for t = 0 … T−1.
        standard_error (`torch.Tensor` of shape `(T,)`, float64): its Monte-Carlo standard error (the spread of
            ‖ε_θ‖²/d over the images, / √num_samples).
        num_samples (`int`): images (each with a fresh x_t) averaged per timestep.
        x0_mse (`torch.Tensor` of shape `(T,)`, float64): E‖x_0 − x̂_0(x_t)‖²/d, the model's error on x_0 from the
            same calls; with the analytic σ² it gives each step's expected bound term for
            :func:`optimal_trajectory`.
        x0_mse_clipped (`torch.Tensor` of shape `(T,)`, float64): the same with x̂_0 clipped to
            ±`clip_sample_range`, as a clipping sampler forms its mean.
    """

    gamma: torch.Tensor
    standard_error: torch.Tensor
    num_samples: int
    x0_mse: Optional[torch.Tensor] = None
    x0_mse_clipped: Optional[torch.Tensor] = None


def _take_images(data, num_samples: int, class_labels: Optional[torch.Tensor]):
    """The first `num_samples` images (and labels) of a tensor or an iterable of batches: tensors, (images, labels)
    tuples or dicts with "pixel_values"/"images" and optional "class_labels"/"labels" (our data loaders)."""
    if isinstance(data, torch.Tensor):
        images = data[:num_samples]
        labels = None if class_labels is None else torch.as_tensor(class_labels)[:num_samples]
        return images, labels
    if class_labels is not None:
        raise ValueError("class_labels is for a tensor of images; a data loader brings its own labels")
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a tensor of images or an iterable of batches, got {type(data).__name__}")
    images, labels, count = [], [], 0
    for batch in data:
        if isinstance(batch, dict):
            key = next((k for k in ("pixel_values", "images", "input") if k in batch), None)
            if key is None:
                raise ValueError(f"a batch dict needs 'pixel_values' or 'images', got keys {sorted(batch)}")
            x, y = batch[key], batch.get("class_labels", batch.get("labels"))
        elif isinstance(batch, (tuple, list)):
            x, y = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, y = batch, None
        images.append(torch.as_tensor(x))
        labels.append(None if y is None else torch.as_tensor(y))
        count += images[-1].shape[0]
        if count >= num_samples:
            break
    if not images:
        raise ValueError("data yielded no images")
    images = torch.cat(images)[:num_samples]
    labels = None if any(y is None for y in labels) else torch.cat(labels)[:num_samples]
    return images, labels


def _epsilon_prediction(model, x_t, t, labels, alphas_cumprod, prediction_type: str) -> torch.Tensor:
    """ε_θ(x_t, t) in float64, from any diffusers-style model: `model(x, t).sample` (or a tensor), the first C
    channels of a 2C learned-variance output, and x_0 / v predictions converted to the ε they imply
    (ε̂ = (x_t − √ᾱ x̂_0)/√(1 − ᾱ); ε̂ = √ᾱ v + √(1 − ᾱ) x_t, Salimans & Ho 2022)."""
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    dtype = param.dtype if param is not None and param.is_floating_point() else x_t.dtype
    out = model(x_t.to(dtype), t) if labels is None else model(x_t.to(dtype), t, class_labels=labels)
    out = out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, (tuple, list)) else out)
    channels = x_t.shape[1]
    if out.shape[1] == 2 * channels:
        out = out[:, :channels]  # a learned-variance model: the variance half plays no part in Γ
    if out.shape != x_t.shape:
        raise ValueError(f"the model output has shape {tuple(out.shape)} for inputs of shape {tuple(x_t.shape)}; "
                         f"expected {channels} (or {2 * channels}) channels")
    out, x_t = out.double(), x_t.double()
    a = alphas_cumprod[t].double().view(-1, *([1] * (x_t.ndim - 1)))  # (B, 1, ...)
    if prediction_type == "epsilon":
        return out
    if prediction_type == "sample":
        return (x_t - a.sqrt() * out) / (1 - a).sqrt()
    return a.sqrt() * out + (1 - a).sqrt() * x_t  # v_prediction


@torch.no_grad()
def estimate_analytic_gamma(
    model,
    scheduler,
    data,
    num_samples: int = 100,
    batch_size: int = 256,
    class_labels: Optional[torch.Tensor] = None,
    prediction_type: Optional[str] = None,
    generator: Optional[torch.Generator] = None,
    progress: bool = True,
) -> AnalyticGammaEstimate:
    """Monte-Carlo estimate of Γ_t = E_{q(x_t)}‖ε_θ(x_t, t)‖²/d for every training timestep (Bao et al. 2022 Sec. 3.1).

    The first `num_samples` images x_0 of `data` are each noised to x_t ~ q(x_t | x_0) (a fresh draw per timestep)
    at all T timesteps; the (image, t) pairs go through the model `batch_size` at a time, T·num_samples calls in
    all (the paper finds ~100 images enough).

    Args:
        model: any diffusers-style ε-model: `model(x_t, t[, class_labels=...])` returning `.sample` or a tensor
            (our `DDPMUNet2DModel`, diffusers' `UNet2DModel`); with 2C output channels the first C are ε.
        scheduler: the noise schedule the model was trained with (`GaussianDiffusionScheduler` or diffusers'
            `DDPMScheduler`/`DDIMScheduler`, whose `add_noise` makes x_t).
        data: a tensor (N, C, ...) of training images in the model's input range, or an iterable of batches
            (tensors, `(images, labels)` tuples, or dicts with `"pixel_values"` / `"images"` and optionally
            `"class_labels"`), e.g. a `torch.utils.data.DataLoader`.
        num_samples (`int`, defaults to 100): images per timestep (fewer if `data` has fewer).
        batch_size (`int`, defaults to 256): (image, t) pairs per network call.
        class_labels (`torch.Tensor`, *optional*): (N,) labels for a tensor `data` (class-conditional models).
        prediction_type (`str`, *optional*): what the model predicts, `"epsilon"`, `"sample"` (x_0) or
            `"v_prediction"`; default `scheduler.config.prediction_type`. x_0 and v are converted to the ε they
            imply, which is what Γ needs.
        generator (`torch.Generator`, *optional*): seeds the noise.
        progress (`bool`, defaults to `True`): show a tqdm bar.

    Returns:
        :class:`AnalyticGammaEstimate`.

    Raises:
        ValueError: unknown `prediction_type`, `num_samples`/`batch_size` < 1, empty data, or a model output with
            the wrong number of channels.
    """
    prediction_type = prediction_type or scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}")
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    images, labels = _take_images(data, num_samples, class_labels)
    images = images.float()
    num_images, num_timesteps = images.shape[0], scheduler.config.num_train_timesteps
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    device = param.device if param is not None else images.device
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    pair_image = torch.arange(num_images).repeat(num_timesteps)  # (T·M,) image index, timestep-major
    pair_t = torch.arange(num_timesteps).repeat_interleave(num_images)  # (T·M,)
    mean_square = torch.empty(pair_t.numel(), dtype=torch.float64)  # ‖ε_θ‖²/d per pair
    x0_error = torch.empty(2, pair_t.numel(), dtype=torch.float64)  # ‖x_0 − x̂_0‖²/d per pair, unclipped / clipped
    clip_range = float(getattr(scheduler.config, "clip_sample_range", 1.0))
    noise_device = generator.device if generator is not None else torch.device("cpu")
    for start in tqdm(range(0, pair_t.numel(), batch_size), desc="analytic Γ", disable=not progress):
        sl = slice(start, start + batch_size)
        x0 = images[pair_image[sl]].to(device)  # (P, C, ...)
        t = pair_t[sl].to(device)
        noise = torch.randn(x0.shape, generator=generator, device=noise_device).to(device)
        x_t = scheduler.add_noise(x0, noise, t)
        y = None if labels is None else labels[pair_image[sl]].to(device)
        eps = _epsilon_prediction(model, x_t, t, y, alphas_cumprod, prediction_type)
        mean_square[sl] = eps.reshape(eps.shape[0], -1).pow(2).mean(dim=1).cpu()
        a = alphas_cumprod[t].double().view(-1, *([1] * (x0.ndim - 1)))
        x0_hat = (x_t.double() - (1 - a).sqrt() * eps) / a.sqrt()  # Ho et al. 2020 eq. 15
        for row, estimate in enumerate((x0_hat, x0_hat.clamp(-clip_range, clip_range))):
            x0_error[row, sl] = (estimate - x0.double()).reshape(x0.shape[0], -1).pow(2).mean(dim=1).cpu()
    per_timestep = mean_square.view(num_timesteps, num_images)  # (T, M)
    spread = per_timestep.std(dim=1) if num_images > 1 else torch.full((num_timesteps,), float("nan"))
    x0_mse = x0_error.view(2, num_timesteps, num_images).mean(dim=2)  # (2, T)
    return AnalyticGammaEstimate(
        gamma=per_timestep.mean(dim=1), standard_error=spread / math.sqrt(num_images), num_samples=num_images,
        x0_mse=x0_mse[0], x0_mse_clipped=x0_mse[1],
    )


def fit_analytic_variance(model, scheduler, data, **kwargs) -> GaussianDiffusionScheduler:
    """One call: estimate Γ (see :func:`estimate_analytic_gamma`, whose keyword arguments it takes) and return a
    `GaussianDiffusionScheduler` with `variance_type="analytic"` and the table in its config; every other setting
    is `scheduler`'s (ours or a diffusers `DDPMScheduler`/`DDIMScheduler` config)."""
    estimate = estimate_analytic_gamma(model, scheduler, data, **kwargs)
    return GaussianDiffusionScheduler.from_config(
        scheduler.config, variance_type="analytic", analytic_gamma=estimate.gamma.tolist()
    )


def _require_gamma(scheduler) -> torch.Tensor:
    gamma = getattr(scheduler, "analytic_gamma", None)
    if gamma is None:
        raise ValueError("the scheduler has no analytic_gamma table; build it with fit_analytic_variance(...)")
    return gamma


def step_bound_terms(scheduler, x0_mse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Expected KL term, in nats per dimension, of every reverse step t → s (0 <= s < t < T) of the DDPM family with
    the scheduler's analytic variance σ²; entry [s, t], +inf where s >= t. Steps onto the data (the decoder) are
    not included: every trajectory ends with one from timestep 0.

    With the model's x_0 error e_t = E‖x_0 − x̂_0(x_t)‖²/d (`x0_mse`, from :func:`estimate_analytic_gamma`), the
    term is exactly E KL(N(μ̃, λ²) ‖ N(μ_θ, σ²)) = ½[log(σ²/λ²) + (λ² + c²e_t)/σ² − 1] (μ̃ − μ_θ = c(x_0 − x̂_0),
    c the posterior-mean coefficient of x_0, λ² = β̃ of the step). Without it, the model's mean is taken to be the
    optimal one, c²e_t = σ*² − λ², which leaves ½·log(σ*²/λ²) (Bao et al. 2022, Sec. 4); that form trusts Γ and
    makes steps through timesteps with an estimated Γ_t >= 1 look free, which a poorly fit model exploits.
    """
    gamma = _require_gamma(scheduler)
    num_timesteps = scheduler.config.num_train_timesteps
    snr = scheduler.snr(torch.arange(num_timesteps), dtype=torch.float64)
    alphas_cumprod = snr / (1 + snr)  # the float64 ᾱ
    a_s, a_t = alphas_cumprod.view(-1, 1), alphas_cumprod.view(1, -1)  # (T, 1), (1, T)
    later = torch.arange(num_timesteps).view(-1, 1) < torch.arange(num_timesteps).view(1, -1)  # s < t
    a_s = torch.where(later, a_s, torch.ones_like(a_s))
    beta_step = 1 - a_t / a_s
    lambda_sq = ((1 - a_s) / (1 - a_t) * beta_step).clamp(min=1e-300)  # β̃ of the step t → s
    sigma_sq = analytic_variance(a_t, a_s, lambda_sq, gamma.view(1, -1), scheduler.config.clip_sample_range)
    if x0_mse is None:
        terms = 0.5 * torch.log(sigma_sq / lambda_sq)
    else:
        x0_mse = torch.as_tensor(x0_mse, dtype=torch.float64).view(1, -1)
        if x0_mse.numel() != num_timesteps:
            raise ValueError(f"x0_mse has {x0_mse.numel()} values for num_train_timesteps={num_timesteps}")
        c_sq = a_s * beta_step**2 / (1 - a_t) ** 2
        terms = 0.5 * (torch.log(sigma_sq / lambda_sq) + (lambda_sq + c_sq * x0_mse) / sigma_sq - 1)
    return torch.where(later, terms, torch.full_like(terms, float("inf")))


def optimal_trajectory(scheduler, num_inference_steps: int, x0_mse: Optional[torch.Tensor] = None) -> List[int]:
    """The `num_inference_steps` timesteps (descending, from T − 1 down to 0) whose summed bound terms
    (:func:`step_bound_terms`) are smallest, by dynamic programming (Bao et al. 2022, Sec. 4).

    The prior term (at T − 1) is the same for every such trajectory; the decoder term (from 0, whose variance IDM
    takes from the next kept step) is left out of the objective, as in the paper. Pass `x0_mse` (the estimate's
    `x0_mse_clipped` for a clipping sampler) to minimise the model's actual bound rather than the optimal-mean
    one. Use the result as `scheduler.set_timesteps(timesteps=...)` or in the likelihood functions.
    O(K·T²) time, O(T²) memory (T = 1000: about a second, 8 MB).

    Raises:
        ValueError: no Γ table; `num_inference_steps` outside [2, T]; no finite-cost trajectory.
    """
    num_timesteps = scheduler.config.num_train_timesteps
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or not (
        min(2, num_timesteps) <= num_inference_steps <= num_timesteps
    ):
        raise ValueError(f"num_inference_steps must be an int in [2, {num_timesteps}], got {num_inference_steps!r}")
    cost = step_bound_terms(scheduler, x0_mse).numpy()  # (T, T): [s, t]
    if num_inference_steps == num_timesteps:
        return list(range(num_timesteps - 1, -1, -1))
    # best[t]: least cost of a path 0 = t_1 < … < t_k = t with k nodes; parents[k][t]: its t_{k−1}.
    best = np.full(num_timesteps, np.inf)
    best[0] = 0.0
    parents = []
    for _ in range(num_inference_steps - 1):
        total = best[:, None] + cost  # (s, t)
        parent = np.argmin(total, axis=0)
        best = total[parent, np.arange(num_timesteps)]
        parents.append(parent)
    if not np.isfinite(best[-1]):
        raise ValueError(f"no {num_inference_steps}-step trajectory has a finite bound (check x0_mse for inf/nan)")
    chain = [num_timesteps - 1]
    for parent in reversed(parents):
        chain.append(int(parent[chain[-1]]))
    return chain
