"""Measuring trained recipes: held-out bits/dim (both bounds), samples, sample quality and sampling cost.

**Bits/dim** is reported for the reverse process each model samples with: x̂_0 clipped exactly when its
scheduler clips (``clip_sample``), as ``train.py``'s Trainer and ``python -m diffusers_ddpm_ext.evaluate``
compute it; the unclipped bound is given beside it. Both are the stratified unbiased estimate
(`estimate_bits_per_dim`) with the same draws (the same seeded generator), so their difference is the clipping
alone. A `DDPMScheduler` is evaluated through ``GaussianDiffusionScheduler.from_config`` of its config (same β,
same fixed_small variance, same clipping).

**Samples** come from `diffusers.DDPMPipeline` (EMA weights, the same seeds for every recipe), chunk by chunk
in turn so that sampling wall times see the same load.

**Sample quality** (:func:`quality`): the weight-free multi-scale sliced Wasserstein distance (SWD ×10³ per pyramid
level and averaged, ± bootstrap standard errors) always, and FD/KID/precision/recall in the features of the
extractor when there is one (``--feature_extractor auto`` without an encoder to load: SWD only). Real training
images scored the same way (`run`'s ``real_data_reference``) give each figure's real-data floor at that N.
"""

from __future__ import annotations

import copy
import time
from typing import Dict, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusers_ddpm_ext.likelihood import bits_per_dim, estimate_bits_per_dim, sampler_clips_x0

from .measure import peak_memory_bytes, tensor_bytes


def bpd_scheduler(scheduler):
    """Our scheduler for the bound (the likelihood needs its posterior): a `DDPMScheduler` through its config."""
    from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler

    if isinstance(scheduler, GaussianDiffusionScheduler):
        return scheduler
    return GaussianDiffusionScheduler.from_config(scheduler.config)


def held_out_bits_per_dim(model, scheduler, images: torch.Tensor, num_levels: int, num_timesteps_sampled: int,
                          seed: int, batch_size: int = 256, exact_images: int = 0, progress: bool = False) -> dict:
    """Bits/dim of ``images`` under the model's sampling process, and unclipped, with the same draws.

    The estimate uses ``torch.Generator(device).manual_seed(seed)``, as ``Trainer.evaluate_bpd`` does, so the
    same model, images and seed give the Trainer's number.

    Returns:
        dict: ``bits_per_dim`` and ``standard_error`` (Monte-Carlo error of the estimate for these images) of the
        bound as sampled, ``clip_denoised``, ``bound`` (its description), ``unclipped`` (the same for x̂_0 not
        clipped), ``num_images``, ``network_calls_per_image``, ``method`` and ``exact`` (the exact bound as
        sampled on the first ``exact_images``, or None).
    """
    sched = bpd_scheduler(scheduler)
    clip = sampler_clips_x0(sched)
    device = next(model.parameters()).device

    def estimate(clip_denoised: bool):
        with torch.random.fork_rng(devices=[]):
            return estimate_bits_per_dim(
                model, sched, images.to(device), num_timesteps_sampled=num_timesteps_sampled, num_levels=num_levels,
                batch_size=batch_size, generator=torch.Generator(device=device).manual_seed(seed), progress=progress,
                clip_denoised=clip_denoised)

    sampled = estimate(clip)
    unclipped = estimate(False) if clip else sampled
    out = {
        "bits_per_dim": sampled.mean,
        "standard_error": sampled.mean_standard_error,
        "standard_error_kind": "Monte-Carlo error of the estimate for these images",
        "clip_denoised": clip,
        "bound": sampled.bound,
        "unclipped": {"bits_per_dim": unclipped.mean, "standard_error": unclipped.mean_standard_error,
                      "bound": unclipped.bound},
        "method": "stratified unbiased estimate of the full-chain bound (estimate_bits_per_dim)",
        "num_images": int(images.shape[0]),
        "num_levels": int(num_levels),
        "network_calls_per_image": int(sampled.timesteps_per_image),
        "exact": None,
    }
    if exact_images:
        subset = images[:exact_images].to(device)
        with torch.random.fork_rng(devices=[]):
            exact = bits_per_dim(model, sched, subset, num_levels=num_levels, batch_size=batch_size,
                                 generator=torch.Generator(device=device).manual_seed(seed + 2), progress=progress,
                                 clip_denoised=clip)
        out["exact"] = {"bits_per_dim": exact.mean, "standard_error": exact.standard_error,
                        "standard_error_kind": "spread over images / sqrt(N)", "num_images": int(subset.shape[0]),
                        "clip_denoised": clip, "decoder_bpd": float(exact.decoder_bpd.mean()),
                        "prior_bpd": float(exact.prior_bpd.mean())}
    return out


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------


def sample_seed(seed: int, steps: int, chunk: int) -> int:
    return (seed * 1_000_003 + steps * 10_007 + chunk) % (2**63)


def sample_images(model, scheduler, num_images: int, num_inference_steps: int, seed: int,
                  progress: bool = False) -> tuple:
    """Generate with `diffusers.DDPMPipeline` as a user would; returns ``(images (N, C, H, W) in [-1, 1], s)``."""
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline(unet=model, scheduler=copy.deepcopy(scheduler))
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    t0 = time.perf_counter()
    images = pipe(batch_size=num_images, generator=torch.Generator().manual_seed(seed),
                  num_inference_steps=num_inference_steps, output_type="pt").images  # (N, C, H, W) in [0, 1]
    return images * 2 - 1, time.perf_counter() - t0


def sample_interleaved(models: Dict[str, tuple], steps: int, num_images: int, config, progress: bool) -> dict:
    """Sample every recipe chunk by chunk in turn; ``{name: (images, seconds)}``."""
    out = {name: ([], 0.0) for name in models}
    starts = list(range(0, num_images, config.sample_batch_size))
    names = list(models)
    bar = tqdm(total=len(starts) * len(names), desc=f"sampling {steps} steps", disable=not progress,
               dynamic_ncols=True)
    for k, start in enumerate(starts):
        b = min(config.sample_batch_size, num_images - start)
        for j in range(len(names)):
            name = names[(k + j) % len(names)]
            model, scheduler = models[name]
            images, seconds = sample_images(model, scheduler, b, steps, sample_seed(config.seed, steps, k),
                                            progress=progress and steps >= 200)
            chunks, total = out[name]
            chunks.append(images)
            out[name] = (chunks, total + seconds)
            bar.update(1)
    bar.close()
    return {name: (torch.cat(chunks), seconds) for name, (chunks, seconds) in out.items()}


def sampling_speed(models: Dict[str, tuple], config, progress: bool) -> Dict[str, dict]:
    """Seconds per denoising step of `DDPMPipeline` at ``sample_batch_size`` images: the median over interleaved
    rounds of ``speed_steps_per_call``-step calls (one warm-up round discarded; the order rotates per round)."""
    from diffusers import DDPMPipeline

    names = list(models)
    pipes = {}
    for name, (model, scheduler) in models.items():
        pipes[name] = DDPMPipeline(unet=model.eval(), scheduler=copy.deepcopy(scheduler))
        pipes[name].set_progress_bar_config(disable=True)
    batch, k = config.sample_batch_size, config.speed_steps_per_call
    per_step = {name: [] for name in names}
    bar = tqdm(total=(config.speed_rounds + 1) * len(names), desc="sampling speed", disable=not progress,
               dynamic_ncols=True)
    for r in range(config.speed_rounds + 1):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            start = time.perf_counter()
            pipes[name](batch_size=batch, generator=torch.Generator().manual_seed(config.seed), num_inference_steps=k,
                        output_type="pt")
            if r > 0:
                per_step[name].append((time.perf_counter() - start) / k)
            bar.update(1)
    bar.close()
    return {name: {"batch_size": batch, "steps_per_call": k, "rounds": config.speed_rounds,
                   "seconds_per_step_median": float(np.median(v)), "seconds_per_step": v,
                   "image_steps_per_s": batch / float(np.median(v))} for name, v in per_step.items()}


def sample_memory(model, scheduler, batch: int, shape) -> dict:
    """Peak memory of one sampling step (network call + scheduler step) at ``batch`` images."""
    model = model.eval()
    x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0))
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(min(50, sched.config.num_train_timesteps))
    t = sched.timesteps[0]

    def step():
        with torch.no_grad():
            sched.step(model(x, t).sample, t, x, generator=torch.Generator().manual_seed(0))

    live = tensor_bytes([dict(model.state_dict())])
    extra = peak_memory_bytes(step)
    return {"live_bytes": live, "step_extra_bytes": extra, "peak_bytes": None if extra is None else live + extra}


QUALITY_KEYS = ("fd", "fd_standard_error", "kid_mean", "kid_std", "precision", "recall", "mode_coverage",
                "class_kl_uniform", "n_generated", "n_reference", "extractor", "extractor_heldout_accuracy")


def reference_features_of(extractor, reference) -> Optional[np.ndarray]:
    """The reference's features, or None for an extractor without features (``evaluate.FeaturesUnavailable``)."""
    from diffusers_ddpm_ext.evaluate import has_features
    from diffusers_ddpm_ext.metrics import extract_features

    return extract_features(extractor, reference) if has_features(extractor) else None


def quality(images, reference, extractor, seed: int, fd_bootstrap: int,
            reference_features: Optional[np.ndarray] = None, swd_bootstrap: Optional[int] = None) -> dict:
    """SWD ×10³ (per level and averaged, ± bootstrap s.e.; no weights) and, with features, FD (± bootstrap s.e.),
    KID, precision/recall and mode coverage of ``images`` against ``reference``.

    Returns:
        :data:`QUALITY_KEYS` (None without features) and the keys of
        :func:`~diffusers_ddpm_ext.metrics.sliced_wasserstein_figures` (``swd``, ``swd_standard_error``,
        ``swd_<px>`` and ``swd_<px>_standard_error``, ``swd_resolutions``, ``swd_num_bootstrap``, ``swd_method``).
    """
    from diffusers_ddpm_ext.evaluate import has_features
    from diffusers_ddpm_ext.metrics import sample_quality, sliced_wasserstein_figures

    if has_features(extractor):
        q = sample_quality(images, reference, extractor=extractor, seed=seed, fd_bootstrap=fd_bootstrap,
                           reference_features=reference_features)
        out = {k: q.get(k) for k in QUALITY_KEYS}
    else:
        out = dict.fromkeys(QUALITY_KEYS)
    out.update(sliced_wasserstein_figures(images, reference, seed=seed, num_bootstrap=swd_bootstrap))
    return out
