"""Evaluate a trained pipeline on held-out data: bits/dim, and SWD, FD/KID/precision/recall at chosen step counts.

Command line (the data flags are those of ``training/train.py``; the built-in digits by default)::

    python -m diffusers_ddpm_ext.evaluate --pipeline ddpm-digits --output_dir eval-digits \\
        --num_inference_steps 50 100 250 --num_images 500

    python -m diffusers_ddpm_ext.evaluate --pipeline my-user/my-ddpm --train_data_dir ./photos \\
        --output_dir eval-photos --num_inference_steps 50 250 --num_images 1000

What it measures, on the held-out split of :func:`diffusers_ddpm_ext.data.load_train_validation_split` (the
same split ``train.py`` holds out, given the same ``--validation_size`` and ``--validation_split_seed``):

* **bits/dim** of the first ``--bpd_num_images`` validation images: the variational bound of the reverse
  process the pipeline samples with (x̂_0 clipped when the scheduler clips or thresholds it), estimated
  without bias from ``--bpd_timesteps`` network calls per image with its standard error
  (:func:`~diffusers_ddpm_ext.likelihood.estimate_bits_per_dim`), or exact with ``--bpd_exact`` (T calls).
* **sample quality** at each ``--num_inference_steps``: ``--num_images`` images (the same N and the same
  initial noise at every step count) sampled with the pipeline's own ``__call__`` (class labels round-robin
  for class-conditional pipelines), compared with the validation images:

  - always, weight-free: the multi-scale sliced Wasserstein distance (SWD ×10³, Karras et al. 2018) per pyramid
    level and averaged, ± bootstrap standard errors, beside its **real-data floor**: the SWD of N training images
    against the same validation images (what "as good as real" reads at this N; computed once);
  - in the features of the digits classifier (digits) or of a pretrained ``transformers`` encoder
    (``facebook/dinov2-base`` by default: FD_DINOv2): FD with a bootstrap standard error, KID with its spread over
    subsets, precision/recall with binomial standard errors. With ``--feature_extractor auto`` and no encoder to
    load (offline and not cached), one warning line says so and only SWD is reported; an encoder named explicitly
    that cannot be loaded is an error (exit code 2) before anything is computed.
* a sample grid per step count, ``report.json`` and ``report.md``.

Everything the run needs is checked before anything is computed: the arguments, the output folder (absent or
empty, and writable), the pipeline's weights, the data (the held-out images and the training images of the floor
are read first) and the encoder (loaded, or the fallback decided; whether the Hub can be reached is asked once,
with a short timeout, or not at all under ``HF_HUB_OFFLINE=1``).

:func:`evaluate_pipeline` is the same as a function; it returns the report dict.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import sys
import time
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .images import DataChannelsError
from .metrics import EncoderUnavailableError
from .unet import NonFiniteWeightsError, check_finite_weights

logger = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
DIGITS_EXTRACTOR = "digits-classifier"
"""``--feature_extractor`` value naming the digits classifier of :mod:`diffusers_ddpm_ext.metrics`."""
FD_SMALL_N_WARNING = (
    "FD (and, less so, KID and precision/recall) depends on N: the Fréchet distance is biased upward at small N "
    "(the bias shrinks roughly like 1/N), so compare FDs only at equal N, with the same reference split and the "
    "same feature extractor. Its standard error here is a bootstrap over both sets: sampling noise at this N, "
    "not the bias."
)


SWD_FLOOR_NOTE = (
    "SWD, like FD, is biased upward at small N: a model is as good as real images when its SWD reaches the real-data "
    "floor (N training images against the same reference), not 0. Compare SWDs only at equal N and reference."
)


def _grid_file(steps: int) -> str:
    return f"samples_{steps}_steps.png"


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse an existing, non-empty ``output_dir`` unless ``overwrite`` (then only our report files are replaced),
    and a folder that could not be written: the folder, or where it would be created (its nearest existing parent),
    must be writable. Creates nothing."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"--output_dir {output_dir!r} exists and is not a folder")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(f"--output_dir {output_dir!r} already exists and is not empty; pass --overwrite "
                              f"(overwrite=True) to replace its report, or choose another folder")
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"--output_dir {output_dir!r} cannot be created: {existing!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"--output_dir {output_dir!r} cannot be written: no write permission in {existing!r}")


def load_pipeline(pipeline, device: Optional[Union[str, torch.device]] = None, **from_pretrained_kwargs):
    """Load a saved folder or Hub repo id, move it to ``device`` and turn its progress bar off.

    ``diffusers.DiffusionPipeline.from_pretrained`` (our classes are registered by importing this package);
    where diffusers cannot build the pipeline class itself (a ``save_pretrained`` folder of our
    ``ClassConditionalDDPMPipeline``, or a Hub export that names remote-code files), the same folder or repo is
    loaded into the installed classes with :func:`diffusers_ddpm_ext.hub.load_pipeline`. A loaded pipeline is
    used as it is. A UNet whose weights hold NaN or infinite values is refused
    (:class:`~diffusers_ddpm_ext.unet.NonFiniteWeightsError`, naming the tensor) before anything is computed.
    """
    import diffusers

    import diffusers_ddpm_ext  # noqa: F401  (registers our UNet, scheduler and pipeline for from_pretrained)

    source = str(pipeline) if isinstance(pipeline, (str, os.PathLike)) else type(pipeline).__name__
    if isinstance(pipeline, (str, os.PathLike)):
        name = str(pipeline)
        try:
            pipeline = diffusers.DiffusionPipeline.from_pretrained(name, **from_pretrained_kwargs)
        except NonFiniteWeightsError:
            raise  # loaded, and refused: another loader would read the same weights
        except (OSError, ValueError, AttributeError) as first:
            from .hub import load_pipeline as load_into_installed_classes

            try:
                pipeline = load_into_installed_classes(name, **from_pretrained_kwargs)
            except NonFiniteWeightsError:
                raise
            except Exception as e:
                raise ValueError(f"could not load the pipeline {name!r} (a folder written by save_pretrained or a "
                                 f"Hub repo id): DiffusionPipeline.from_pretrained: {type(first).__name__}: {first}; "
                                 f"diffusers_ddpm_ext.hub.load_pipeline: {type(e).__name__}: {e}") from e
    for component in ("unet", "scheduler"):
        if getattr(pipeline, component, None) is None:
            raise ValueError(f"the pipeline {type(pipeline).__name__} has no {component}; evaluation needs a "
                             f"DDPM-style pipeline with `unet` and `scheduler`")
    if isinstance(pipeline.unet, torch.nn.Module):  # any UNet class, also one loaded before this call
        check_finite_weights(pipeline.unet, f"{source}: unet")
    if device is not None:
        pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _bpd_scheduler(scheduler):
    """Our scheduler for the bound: diffusers' DDPMScheduler is converted through its config (same β, variance)."""
    from .scheduler import GaussianDiffusionScheduler

    if isinstance(scheduler, GaussianDiffusionScheduler):
        return scheduler
    return GaussianDiffusionScheduler.from_config(scheduler.config)


def _is_conditional(pipeline) -> bool:
    return (getattr(pipeline.unet.config, "num_class_embeds", None) is not None
            and "class_labels" in inspect.signature(pipeline.__call__).parameters)


def evaluate_bits_per_dim(unet, scheduler, images: torch.Tensor, class_labels: Optional[torch.Tensor],
                          num_levels: int, split: str, exact: bool = False, num_timesteps_sampled: int = 50,
                          batch_size: int = 256, seed: int = 0, progress: bool = True) -> dict:
    """Held-out bits/dim of a model on ``images``, with its split, N, method and standard error.

    The bound is that of the reverse process the model samples with: x̂_0 is clipped iff the scheduler clips or
    thresholds it (:func:`~diffusers_ddpm_ext.likelihood.sampler_clips_x0`), as in ``train.py``. A diffusers
    ``DDPMScheduler`` is evaluated through ``GaussianDiffusionScheduler.from_config`` of its config.

    Args:
        unet: the denoiser (on the device to run on).
        scheduler: the pipeline's scheduler.
        images: ``(N, C, H, W)`` in ``[-1, 1]`` on the ``num_levels`` grid.
        class_labels: ``(N,)`` labels for a class-conditional model, else ``None``.
        num_levels: grey levels per channel (17 for the digits, 256 for 8-bit images).
        split: the split's name, reported beside the figure.
        exact: all T terms (T calls per image) instead of the stratified estimate.
        num_timesteps_sampled: network calls per image of the estimate.
        batch_size: (image, t) pairs per network call.
        seed: seed of the draws.
        progress: show a progress bar.

    Returns:
        dict with ``bits_per_dim``, ``standard_error`` (over the population of images: the spread of the
        per-image values / √N, which includes the Monte-Carlo noise of an estimate), ``monte_carlo_standard_error``
        (estimate only: the error from sampling timesteps for these images), ``method``, ``split``,
        ``num_images``, ``num_levels``, ``clip_denoised``, ``num_train_timesteps``, ``network_calls_per_image``.
    """
    from .likelihood import bits_per_dim, estimate_bits_per_dim, sampler_clips_x0

    scheduler = _bpd_scheduler(scheduler)
    clip_denoised = sampler_clips_x0(scheduler)  # thresholding too, as train.py's report
    device = unet.device
    num_timesteps = int(scheduler.config.num_train_timesteps)
    generator = torch.Generator(device=device).manual_seed(seed)
    labels = None if class_labels is None else class_labels.to(device)
    with torch.random.fork_rng(devices=[]):  # the draws use `generator`; the global CPU RNG stays as it was
        if exact:
            result = bits_per_dim(unet, scheduler, images.to(device), num_levels=num_levels, class_labels=labels,
                                  batch_size=batch_size, generator=generator, progress=progress,
                                  clip_denoised=clip_denoised)
            per_image, mc_se, calls = result.bits_per_dim, None, num_timesteps
            method = f"exact: all {num_timesteps} terms of the bound per image plus the prior term"
        else:
            result = estimate_bits_per_dim(unet, scheduler, images.to(device),
                                           num_timesteps_sampled=num_timesteps_sampled, num_levels=num_levels,
                                           class_labels=labels, batch_size=batch_size, generator=generator,
                                           progress=progress, clip_denoised=clip_denoised)
            per_image, mc_se, calls = result.bits_per_dim, result.mean_standard_error, result.timesteps_per_image
            method = (f"stratified unbiased estimate: {calls} of the {num_timesteps} terms per image "
                      f"(estimate_bits_per_dim)")
    if labels is not None:
        method += ", conditional on the images' class labels"
    n = int(per_image.numel())
    spread = float(per_image.double().std()) / math.sqrt(n) if n > 1 else float("nan")
    return {"bits_per_dim": float(per_image.double().mean()), "standard_error": spread,
            "monte_carlo_standard_error": mc_se, "method": method, "split": split, "num_images": n,
            "num_levels": int(num_levels), "clip_denoised": clip_denoised, "num_train_timesteps": num_timesteps,
            "network_calls_per_image": int(calls)}


def generate_images(pipeline, num_images: int, num_inference_steps: int, batch_size: int = 64, seed: int = 0,
                    num_classes: Optional[int] = None, guidance_scale: float = 1.0,
                    progress: bool = True) -> torch.Tensor:
    """``num_images`` samples from the pipeline's own ``__call__`` (``output_type="np"``).

    Batch ``b`` uses a CPU generator seeded ``(seed, b)``, so every step count starts from the same noise
    (common random numbers make the step counts' figures directly comparable); the samples depend on
    ``batch_size``. Class-conditional pipelines get labels ``i mod num_classes`` (round-robin).

    Returns:
        ``(N, C, H, W)`` float32 in ``[-1, 1]``.
    """
    from tqdm.auto import tqdm

    conditional = _is_conditional(pipeline)
    if conditional and not num_classes:
        num_classes = int(pipeline.unet.config.num_class_embeds)
    out = []
    starts = range(0, num_images, batch_size)
    for b, start in enumerate(tqdm(starts, desc=f"sampling ({num_inference_steps} steps)", disable=not progress,
                                   leave=False)):
        count = min(batch_size, num_images - start)
        state = int(np.random.SeedSequence([int(seed), b]).generate_state(1, np.uint64)[0]) & ((1 << 63) - 1)
        kwargs = dict(num_inference_steps=int(num_inference_steps), output_type="np",
                      generator=torch.Generator(device="cpu").manual_seed(state))
        if conditional:
            labels = [(start + i) % num_classes for i in range(count)]
            images = pipeline(class_labels=labels, guidance_scale=guidance_scale, **kwargs).images
        else:
            images = pipeline(batch_size=count, **kwargs).images
        out.append(torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2))  # (b, C, H, W)
    return torch.cat(out) * 2 - 1  # (N, C, H, W) in [-1, 1]


class FeaturesUnavailable:
    """What ``--feature_extractor auto`` resolves to where no image encoder can be loaded (offline and not cached):
    no features, so sample quality is the weight-free figures only (SWD and its real-data floor). Not callable;
    :func:`has_features` tells it from an extractor.

    Attributes:
        tried: the encoder that could not be loaded.
        reason: why, in one line.
    """

    name = None

    def __init__(self, tried: str, reason: str):
        self.tried, self.reason = tried, reason

    @property
    def metadata(self) -> dict:
        return {"tried": self.tried, "skipped": self.reason}

    def __repr__(self) -> str:
        return f"FeaturesUnavailable(tried={self.tried!r})"


def has_features(extractor) -> bool:
    """Whether ``extractor`` gives features (FD/KID/precision/recall); None and :class:`FeaturesUnavailable` do not."""
    return extractor is not None and not isinstance(extractor, FeaturesUnavailable)


_WARNED: set = set()


def load_feature_extractor(feature_extractor: Union[str, Callable, None] = "auto", digits: bool = False,
                           device: Union[str, torch.device, None] = None, batch_size: int = 64,
                           cache_dir: Optional[str] = None):
    """The feature extractor of sample quality.

    Args:
        feature_extractor: ``"auto"`` (the digits classifier when ``digits``, else
            :data:`~diffusers_ddpm_ext.metrics.DEFAULT_IMAGE_ENCODER`, i.e. FD_DINOv2), ``"digits-classifier"``,
            any ``transformers`` image encoder id or folder (:func:`~diffusers_ddpm_ext.metrics.load_image_encoder`),
            or a callable, returned as it is.
        digits: the data are the built-in digits.
        device: where it runs (default :func:`~diffusers_ddpm_ext.metrics.default_device`).
        batch_size: images per encoder forward pass.
        cache_dir: ``transformers`` cache folder.

    Returns:
        The extractor; for ``"auto"`` where the default encoder cannot be loaded (not cached while the Hub cannot be
        used, :func:`~diffusers_ddpm_ext.metrics.hub_offline_reason`), a :class:`FeaturesUnavailable` after one
        warning line (once per process) naming ``--feature_extractor`` and what was tried: sample quality is then
        the weight-free SWD alone. Never waits on the Hub client's retries.

    Raises:
        EncoderUnavailableError: an encoder named explicitly cannot be loaded (one line).
    """
    from . import metrics

    if callable(feature_extractor) and not isinstance(feature_extractor, str):
        return feature_extractor
    name = feature_extractor or "auto"
    auto = name == "auto"
    if auto:
        name = DIGITS_EXTRACTOR if digits else metrics.DEFAULT_IMAGE_ENCODER
    device = torch.device(device) if device is not None else metrics.default_device()
    if name == DIGITS_EXTRACTOR:
        return metrics.load_digits_classifier().to(device)
    try:
        return metrics.load_image_encoder(name, device=device, batch_size=batch_size, cache_dir=cache_dir)
    except EncoderUnavailableError as error:
        if not auto:
            raise
        unavailable = FeaturesUnavailable(name, error.cause)
    if name not in _WARNED:
        _WARNED.add(name)
        logger.warning("--feature_extractor auto: tried %s: %s; sample quality is the weight-free SWD beside its "
                       "real-data floor, without FD/KID/precision/recall (pass --feature_extractor <a local folder of "
                       "a transformers image encoder> for them)", name, unavailable.reason)
    return unavailable


def training_subset(train, num_images: int) -> torch.Tensor:
    """The real images of the SWD floor: :func:`~diffusers_ddpm_ext.metrics.floor_indices` of ``train`` (a tensor
    ``(M, C, H, W)`` in ``[-1, 1]`` or a dataset of ``{"pixel_values"}`` items), read with the global RNG untouched."""
    from .metrics import floor_indices

    index = floor_indices(len(train), num_images)
    if isinstance(train, torch.Tensor):
        return train[index]
    with torch.random.fork_rng(devices=[]):  # a dataset's random crop or flip must not move the caller's RNG
        return torch.stack([train[i]["pixel_values"] for i in index])  # (N, C, H, W)


def sample_quality_at_steps(
    pipeline,
    reference: torch.Tensor,
    num_inference_steps: Sequence[int],
    num_images: int,
    extractor,
    *,
    split: str,
    reference_features: Optional[np.ndarray] = None,
    sample_batch_size: int = 64,
    seed: int = 0,
    num_classes: Optional[int] = None,
    guidance_scale: float = 1.0,
    fd_bootstrap: int = 20,
    kid_num_subsets: int = 100,
    feature_batch_size: int = 64,
    progress: bool = True,
    on_samples: Optional[Callable[[int, torch.Tensor], None]] = None,
    train_images=None,
    train_split: str = "train",
    swd_bootstrap: Optional[int] = None,
) -> list:
    """SWD (weight-free) and FD/KID/precision/recall of ``num_images`` samples at each step count against
    ``reference``.

    The same N and the same initial noise at every step count (:func:`generate_images`); the reference's features
    and the real-data floor of SWD are computed once.

    Args:
        pipeline: a DDPM-style pipeline (``__call__`` with ``num_inference_steps``, ``output_type="np"``).
        reference: ``(M, C, H, W)`` held-out images in ``[-1, 1]``.
        num_inference_steps: sampling step counts.
        num_images: generated images per step count.
        extractor: a feature extractor (:func:`load_feature_extractor`); None or :class:`FeaturesUnavailable`:
            SWD only (the FD/KID/precision/recall keys are None and ``fd_method`` says why).
        split: the reference's split name, reported beside the figures.
        reference_features: the reference's features if already computed.
        sample_batch_size, seed, num_classes, guidance_scale: see :func:`generate_images`.
        fd_bootstrap, kid_num_subsets: see :func:`~diffusers_ddpm_ext.metrics.sample_quality`.
        feature_batch_size: images per feature-extraction batch.
        progress: show progress bars.
        on_samples: called as ``on_samples(steps, images)`` with each step count's samples (e.g. to save a grid).
        train_images: the training split (tensor or dataset; never the reference's images): N of them
            (:func:`training_subset`) give ``swd_real_data_floor``; None: no floor (``None`` in the entries).
        train_split: its name, reported.
        swd_bootstrap: bootstrap resamples of the SWD standard errors (None: ``metrics.SWD_SETTINGS``).

    Returns:
        One dict per step count: ``num_inference_steps``, ``split``, ``num_generated``, ``num_reference``,
        ``network_calls_per_image``, ``sampling_wall_time_s``, ``fd_method``, ``kid_method``, ``pr_method``, the
        figures of :func:`~diffusers_ddpm_ext.metrics.sample_quality` and of
        :func:`~diffusers_ddpm_ext.metrics.sliced_wasserstein_figures` (``swd``, ``swd_standard_error``,
        ``swd_<px>``, ``swd_<px>_standard_error``, ``swd_resolutions``, ``swd_num_bootstrap``, ``swd_method``) and
        ``swd_real_data_floor`` (:func:`~diffusers_ddpm_ext.metrics.swd_real_data_floor`).
    """
    from .metrics import extract_features, sample_quality, sliced_wasserstein_figures, swd_real_data_floor

    features = has_features(extractor)
    if features and reference_features is None:
        reference_features = extract_features(extractor, reference, feature_batch_size, progress,
                                              "features (reference)")
    name = extractor_info(extractor)["name"] if features else None
    skipped = ("not computed: no feature extractor" + (f" ({extractor.tried}: {extractor.reason})"
                                                       if isinstance(extractor, FeaturesUnavailable) else ""))
    floor = None
    if train_images is not None:
        floor = swd_real_data_floor(training_subset(train_images, num_images), reference, num_bootstrap=swd_bootstrap,
                                    real_split=train_split, reference_split=split)
    conditional = _is_conditional(pipeline)
    guided = conditional and guidance_scale not in (0.0, 1.0)  # guided steps run the UNet on 2B samples
    results = []
    for steps in num_inference_steps:
        t0 = time.time()
        generated = generate_images(pipeline, num_images, steps, sample_batch_size, seed, num_classes,
                                    guidance_scale, progress)
        sampling_s = time.time() - t0
        if on_samples is not None:
            on_samples(steps, generated)
        swd = sliced_wasserstein_figures(generated, reference, seed=seed, num_bootstrap=swd_bootstrap)
        if features:
            q = sample_quality(generated, reference, extractor, reference_features=reference_features,
                               fd_bootstrap=fd_bootstrap, kid_num_subsets=kid_num_subsets, seed=seed,
                               batch_size=feature_batch_size, progress=progress)
        else:
            q = {k: None for k in _FEATURE_KEYS}
            q.update(n_generated=swd["n_generated"], n_reference=swd["n_reference"])
        entry = {"num_inference_steps": int(steps), "split": split, "num_generated": q["n_generated"],
                 "num_reference": q["n_reference"], "network_calls_per_image": int(steps) * (2 if guided else 1),
                 "sampling_wall_time_s": sampling_s,
                 "fd_method": (f"Fréchet distance of Gaussians fitted to {name} features; standard error: "
                               + (f"bootstrap, {fd_bootstrap} resamples" if fd_bootstrap else "not computed"))
                 if features else skipped,
                 "kid_method": f"unbiased MMD², cubic kernel, {q['kid_num_subsets']} subsets of "
                               f"{q['kid_subset_size']}; ± is the std over subsets" if features else skipped,
                 "pr_method": f"improved precision/recall, k = {q['pr_k']}; ± is binomial" if features else skipped}
        entry.update({k: v for k, v in q.items() if k != "extractor"})
        entry.update({k: v for k, v in swd.items() if k not in ("n_generated", "n_reference")})
        entry["swd_real_data_floor"] = floor
        results.append(entry)
        logger.info("sample quality at %d steps, N = %d generated vs %d %s images: %s", steps,
                    entry["num_generated"], entry["num_reference"], split, quality_summary(entry))
    return results


# The keys of metrics.sample_quality, None when there are no features.
_FEATURE_KEYS = ("fd", "fd_standard_error", "kid_mean", "kid_std", "precision", "recall", "precision_standard_error",
                 "recall_standard_error", "mode_coverage", "class_kl_uniform", "class_tv_uniform", "class_histogram",
                 "reference_mode_coverage", "feature_dim", "kid_subset_size", "kid_num_subsets", "pr_k",
                 "fd_bootstrap", "extractor_heldout_accuracy")


def quality_summary(entry: dict) -> str:
    """One line of a sample-quality entry: SWD ± s.e. (real-data floor ± s.e.) and, with features, FD ± s.e."""
    floor = entry.get("swd_real_data_floor")
    text = f"SWD×10³ {_fmt(entry.get('swd'))} ± {_fmt(entry.get('swd_standard_error'), 2)}"
    if floor:
        text += (f" (real-data floor {_fmt(floor['swd'])} ± {_fmt(floor['swd_standard_error'], 2)}, "
                 f"{floor['n_real']} {floor['split']})")
    if entry.get("fd") is not None:
        text += f", FD {_fmt(entry['fd'])} ± {_fmt(entry.get('fd_standard_error'), 2)}"
    return text


def extractor_info(extractor) -> Optional[dict]:
    """What a report says about the feature extractor; for :class:`FeaturesUnavailable` ``{"name": None, "tried",
    "skipped"}``, for None None."""
    if extractor is None:
        return None
    if isinstance(extractor, FeaturesUnavailable):
        return {"name": None, **extractor.metadata}
    meta = getattr(extractor, "metadata", None)
    info = {"name": getattr(extractor, "name", None) or type(extractor).__name__}
    if isinstance(meta, dict):
        info.update({k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, dict, list))})
    if type(extractor).__name__ == "DigitsClassifier":
        info["name"] = DIGITS_EXTRACTOR
        info["heldout_accuracy"] = extractor.heldout_accuracy
    return info


def _save_grid(images: torch.Tensor, path: str, num: int) -> None:
    from .viz import make_image_grid

    x = ((images[:num] + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # (n, H, W, C) in [0, 1]
    make_image_grid(x, min_tile=64).save(path)


def evaluate_pipeline(
    pipeline,
    output_dir: Optional[str] = None,
    *,
    dataset_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    image_column: Optional[str] = None,
    class_column: Optional[str] = None,
    cache_dir: Optional[str] = None,
    resolution: Optional[int] = None,
    skip_bad_images: bool = False,
    validation_size: Optional[Union[int, float]] = None,
    validation_split_seed: int = 0,
    num_inference_steps: Sequence[int] = (50, 100),
    num_images: int = 500,
    num_reference_images: Optional[int] = None,
    guidance_scale: float = 1.0,
    feature_extractor: Union[str, Callable, None] = "auto",
    feature_batch_size: int = 64,
    sample_batch_size: int = 64,
    fd_bootstrap: int = 20,
    kid_num_subsets: int = 100,
    bpd_num_images: int = 256,
    bpd_timesteps: int = 50,
    bpd_exact: bool = False,
    bpd_batch_size: int = 256,
    grid_num_images: int = 64,
    seed: int = 0,
    device: Union[str, torch.device, None] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Evaluate a saved pipeline on the held-out split of a data source; see the module doc.

    Args:
        pipeline: a folder written by ``save_pretrained``, a Hub repo id, or a loaded pipeline.
        output_dir: where ``report.json``, ``report.md`` and the sample grids go (``None``: write nothing).
        dataset_name, train_data_dir, image_column, class_column, cache_dir, skip_bad_images: the data, as in
            ``train.py`` (neither name: the built-in digits).
        resolution: image size; default (and the only value allowed) the UNet's ``sample_size``.
        validation_size, validation_split_seed: the held-out split
            (:func:`diffusers_ddpm_ext.data.load_train_validation_split`); use the values the model was trained with.
        num_inference_steps: sampling step counts to measure sample quality at (empty: skip sample quality).
        num_images: generated images per step count (the same N at every point).
        num_reference_images: validation images in the reference set (default: all of the split).
        guidance_scale: classifier-free guidance of class-conditional pipelines (1 = conditional, no guidance).
        feature_extractor: ``"auto"`` (the digits classifier for the digits, else ``facebook/dinov2-base``),
            ``"digits-classifier"``, any ``transformers`` image encoder id or folder, or a callable.
        feature_batch_size: images per encoder forward pass.
        sample_batch_size: images per pipeline call.
        fd_bootstrap: bootstrap resamples for FD's standard error (0: none).
        kid_num_subsets: KID subsets.
        bpd_num_images: validation images for bits/dim (0: skip bits/dim).
        bpd_timesteps: network calls per image of the bits/dim estimate.
        bpd_exact: evaluate all T terms instead (T calls per image).
        bpd_batch_size: (image, t) pairs per network call in bits/dim.
        grid_num_images: images in each sample grid.
        seed: seed of sampling, bits/dim, KID subsets and bootstrap.
        device: where the UNet and the encoder run (default: CUDA when available, else CPU).
        overwrite: allow an existing, non-empty ``output_dir``.
        progress: show progress bars.

    Returns:
        The report dict (also ``output_dir/report.json``).
    """
    from . import data as D
    from .metrics import default_device, extract_features

    wall_start = time.time()
    steps_list = [_check_positive_int("num_inference_steps", s) for s in num_inference_steps]
    if len(set(steps_list)) != len(steps_list):
        raise ValueError(f"num_inference_steps has repeated values: {steps_list}")
    num_images = _check_positive_int("num_images", num_images, 4)  # precision/recall need more than k = 3
    bpd_num_images = _check_positive_int("bpd_num_images", bpd_num_images, 0)
    for name, value in (("feature_batch_size", feature_batch_size), ("sample_batch_size", sample_batch_size),
                        ("bpd_timesteps", bpd_timesteps), ("bpd_batch_size", bpd_batch_size),
                        ("grid_num_images", grid_num_images), ("kid_num_subsets", kid_num_subsets)):
        _check_positive_int(name, value)
    _check_positive_int("fd_bootstrap", fd_bootstrap, 0)
    if fd_bootstrap == 1:
        raise ValueError("fd_bootstrap must be 0 (no standard error) or >= 2 resamples, got 1")
    if num_reference_images is not None:
        _check_positive_int("num_reference_images", num_reference_images, 4)
    if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a float >= 0, got {guidance_scale!r}")
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)  # before any expensive work

    device = torch.device(device) if device is not None else default_device()
    pipe_name = str(pipeline) if isinstance(pipeline, (str, os.PathLike)) else type(pipeline).__name__
    pipe = load_pipeline(pipeline, device)
    unet = pipe.unet
    in_channels = int(unet.config.in_channels)
    size = unet.config.sample_size
    size = int(size) if isinstance(size, int) else (int(size[0]) if len(set(size)) == 1 else None)
    if size is None:
        raise ValueError(f"the UNet's sample_size {unet.config.sample_size} is not square; the data pipeline makes "
                         f"square images")
    if resolution is not None and resolution != size:
        raise ValueError(f"resolution {resolution} differs from the pipeline's sample_size {size}: bits/dim and "
                         f"sample quality are measured at the model's resolution (omit --resolution or pass {size})")
    num_train_timesteps = getattr(pipe.scheduler.config, "num_train_timesteps", None)
    too_many = [s for s in steps_list if num_train_timesteps is not None and s > num_train_timesteps]
    if too_many:
        raise ValueError(f"num_inference_steps {too_many} exceed the scheduler's num_train_timesteps="
                         f"{num_train_timesteps}; allowed are 1 to {num_train_timesteps}")
    conditional = _is_conditional(pipe)
    builtin = dataset_name is None and train_data_dir is None
    D.check_data_channels(in_channels, D.data_channels(dataset_name, train_data_dir, image_column, cache_dir),
                          f"the pipeline's UNet ({pipe_name})", "Evaluate it on data like its training data.")

    split = D.load_train_validation_split(
        dataset_name=dataset_name, train_data_dir=train_data_dir, image_column=image_column,
        class_column=class_column if dataset_name is not None else None, resolution=size, in_channels=in_channels,
        center_crop=True, skip_bad_images=skip_bad_images, cache_dir=cache_dir, validation_size=validation_size,
        validation_split_seed=validation_split_seed,
        # Opening every training image only matters when bad ones are skipped (it changes the set the split is
        # carved from); otherwise the split is the same without the scan, and a bad held-out image still fails
        # by name when it is loaded.
        validate=skip_bad_images)
    info = dict(split.info)
    split_name = info["split"]
    num_classes = split.validation.num_classes
    if conditional and num_classes is None:
        raise ValueError("the pipeline is class-conditional but the data has no class labels (pass --class_column, "
                         "or use an image folder with one sub-folder per class)")
    if conditional and num_classes > unet.config.num_class_embeds:
        raise ValueError(f"the data has {num_classes} classes but the UNet has num_class_embeds="
                         f"{unet.config.num_class_embeds}")

    # Everything sample quality needs, read or decided before anything is computed: the held-out reference, the
    # training images of the SWD floor, the encoder (or the weight-free fallback of "auto").
    reference = floor_images = extractor = bpd_images = bpd_labels = None
    if bpd_num_images:
        bpd_images, bpd_labels = D.dataset_to_tensors(split.validation, bpd_num_images)
    if steps_list:
        extractor = load_feature_extractor(feature_extractor, builtin, device, feature_batch_size, cache_dir)
        reference, _ = D.dataset_to_tensors(split.validation, num_reference_images)
        if len(reference) < 4:
            raise ValueError(f"the {split_name} split has {len(reference)} images; sample quality needs at least 4 "
                             f"(pass a larger --validation_size)")
        floor_images = training_subset(split.train, num_images)

    report = {
        "pipeline": pipe_name, "pipeline_class": type(pipe).__name__, "unet_class": type(unet).__name__,
        "scheduler_class": type(pipe.scheduler).__name__, "class_conditional": conditional,
        "guidance_scale": float(guidance_scale) if conditional else None, "resolution": size,
        "in_channels": in_channels, "data": info, "seed": int(seed), "device": str(device),
        "bits_per_dim": None, "sample_quality": [], "feature_extractor": None,
    }

    if bpd_num_images:
        logger.info("bits/dim on %d %s images", len(bpd_images), split_name)
        report["bits_per_dim"] = evaluate_bits_per_dim(
            pipe.unet, pipe.scheduler, bpd_images, bpd_labels if conditional else None, int(info["num_levels"]),
            split_name, exact=bpd_exact, num_timesteps_sampled=bpd_timesteps, batch_size=bpd_batch_size, seed=seed,
            progress=progress)

    grids = {}
    if steps_list:
        reference_features = extract_features(extractor, reference, feature_batch_size, progress,
                                              "features (reference)") if has_features(extractor) else None
        report["feature_extractor"] = extractor_info(extractor)

        def save_grid(steps, generated):
            if output_dir is not None:
                os.makedirs(output_dir, exist_ok=True)
                _save_grid(generated, os.path.join(output_dir, _grid_file(steps)), grid_num_images)
                grids[steps] = _grid_file(steps)

        report["sample_quality"] = sample_quality_at_steps(
            pipe, reference, steps_list, num_images, extractor, split=split_name,
            reference_features=reference_features, sample_batch_size=sample_batch_size, seed=seed,
            num_classes=num_classes if conditional else None, guidance_scale=guidance_scale,
            fd_bootstrap=fd_bootstrap, kid_num_subsets=kid_num_subsets, feature_batch_size=feature_batch_size,
            progress=progress, on_samples=save_grid, train_images=floor_images, train_split="train")
    report["sample_grids"] = {str(k): v for k, v in grids.items()}
    report["fd_small_n_warning"] = FD_SMALL_N_WARNING
    report["swd_floor_note"] = SWD_FLOOR_NOTE
    report["wall_time_s"] = time.time() - wall_start
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        _write_text(os.path.join(output_dir, REPORT_JSON), json.dumps(report, indent=2, default=_json_default) + "\n")
        _write_text(os.path.join(output_dir, REPORT_MD), report_markdown(report))
    return report


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return "n/a"
    return f"{x:.{digits}g}"


def report_markdown(report: dict) -> str:
    """The human-readable report: every figure with its split, N, method and standard error."""
    data = report["data"]
    lines = [f"# Evaluation of `{report['pipeline']}`", ""]
    conditioning = (f", class-conditional, guidance scale {report['guidance_scale']:g}"
                    if report["class_conditional"] else "")
    lines.append(f"- Pipeline: `{report['pipeline_class']}` (UNet `{report['unet_class']}`, scheduler "
                 f"`{report['scheduler_class']}`), {report['resolution']}×{report['resolution']}, "
                 f"{report['in_channels']} channel(s){conditioning}")
    lines.append(f"- Data: {data['source']}; held-out split **{data['split']}**, {data['num_images']} images "
                 f"({data['method']}); {data['num_train_images']} training images.")
    lines.append(f"- Seed {report['seed']}, device `{report['device']}`, wall time {report['wall_time_s']:.1f} s.")
    lines.append("")
    bpd = report["bits_per_dim"]
    if bpd is not None:
        lines += ["## Bits/dim (negative log-likelihood bound, lower is better)", "",
                  "| split | N images | method | bits/dim | standard error | Monte-Carlo s.e. | x̂0 clipped |",
                  "|---|---|---|---|---|---|---|",
                  f"| {bpd['split']} | {bpd['num_images']} | {bpd['method']} | {bpd['bits_per_dim']:.4f} | "
                  f"{_fmt(bpd['standard_error'], 3)} | {_fmt(bpd['monte_carlo_standard_error'], 3)} | "
                  f"{'yes' if bpd['clip_denoised'] else 'no'} |", "",
                  f"The bound of the reverse process the pipeline samples with ({bpd['num_levels']} grey levels per "
                  f"channel, T = {bpd['num_train_timesteps']}). Standard error: spread of the per-image values / √N "
                  f"(includes the Monte-Carlo noise of an estimate); Monte-Carlo s.e.: from sampling the timesteps "
                  f"for these images only.", ""]
    if report["sample_quality"]:
        entries = report["sample_quality"]
        q0 = entries[0]
        lines += ["## Sample quality", "",
                  f"Reference: split **{q0['split']}**, N = {q0['num_reference']} images. Generated: N = "
                  f"{q0['num_generated']} images at every step count (same initial noise).", ""]
        lines += swd_markdown(entries)
        fx = report["feature_extractor"]
        if fx and fx.get("name"):
            lines += [f"### In `{fx['name']}` features" + (f" ({fx.get('model_type')}, {fx.get('pooling')} pooling)"
                                                          if fx.get("model_type") else ""), "",
                      "| sampling steps | N generated | N reference | FD ± s.e. | KID ± std | precision ± s.e. | "
                      "recall ± s.e. | mode coverage | sampling time (s) |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for q in entries:
                lines.append(
                    f"| {q['num_inference_steps']} | {q['num_generated']} | {q['num_reference']} | "
                    f"{_fmt(q['fd'])} ± {_fmt(q['fd_standard_error'], 2)} | {_fmt(q['kid_mean'], 3)} ± "
                    f"{_fmt(q['kid_std'], 2)} | {q['precision']:.3f} ± {q['precision_standard_error']:.3f} | "
                    f"{q['recall']:.3f} ± {q['recall_standard_error']:.3f} | {_fmt(q['mode_coverage'], 3)} | "
                    f"{q['sampling_wall_time_s']:.1f} |")
            lines += ["", f"Methods: FD: {q0['fd_method']}. KID: {q0['kid_method']}. Precision/recall: "
                          f"{q0['pr_method']}.", "",
                      f"> **Warning.** {FD_SMALL_N_WARNING}", ""]
        else:
            lines += ["### FD, KID, precision/recall", "",
                      f"Not computed: no feature extractor ({(fx or {}).get('tried', 'none given')}: "
                      f"{(fx or {}).get('skipped', 'none given')}).", ""]
        for steps, name in report.get("sample_grids", {}).items():
            lines += [f"Samples, {steps} steps:", "", f"![{steps} steps]({name})", ""]
    return "\n".join(lines)


def swd_markdown(entries: Sequence[dict], heading: str = "### Sliced Wasserstein distance (weight-free)") -> list:
    """Markdown lines of the SWD of sample-quality entries: per step count the average and each level ± s.e., the
    real-data floor beside them, N, the split and the method."""
    q0 = entries[0]
    keys = [f"swd_{r}" for r in q0["swd_resolutions"]]
    floor = q0.get("swd_real_data_floor")
    lines = [heading, "",
             "| sampling steps | N generated | N reference | SWD×10³ ± s.e. | "
             + " | ".join(f"{k[4:]} px level ± s.e." for k in keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]

    def row(label, n, q):
        lines.append(f"| {label} | {n} | {q['n_reference'] if 'n_real' in q else q['num_reference']} | "
                     f"{_fmt(q['swd'])} ± {_fmt(q['swd_standard_error'], 2)} | "
                     + " | ".join(f"{_fmt(q[k])} ± {_fmt(q.get(f'{k}_standard_error'), 2)}" for k in keys) + " |")

    for q in entries:
        row(str(q["num_inference_steps"]), q["num_generated"], q)
    if floor:
        row(f"real-data floor: {floor['n_real']} {floor['split'].split(' vs ')[0]} images", floor["n_real"], floor)
    lines += ["", f"Method: {q0['swd_method']}."]
    if floor:
        lines += ["", f"Floor: {floor['method']}."]
    lines += ["", f"> **Note.** {SWD_FLOOR_NOTE}", ""]
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diffusers_ddpm_ext.evaluate",
        description="Evaluate a trained pipeline on held-out data: bits/dim, and SWD (weight-free, beside its "
                    "real-data floor) and FD/KID/precision/recall at chosen sampling step counts; writes report.json, "
                    "report.md and sample grids.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--pipeline", required=True, help="Folder written by save_pretrained (e.g. train.py's --output_dir) or a Hub "
      "repo id.")
    a("--output_dir", required=True, help="Folder for the report; refused if it exists and is not empty.")
    a("--overwrite", action="store_true", help="Allow an existing, non-empty --output_dir.")
    # ---- data (train.py names)
    a("--dataset_name", default=None, help="Hub dataset id or local path read by `datasets`. Default: neither this "
      "nor --train_data_dir = the built-in digits.")
    a("--train_data_dir", default=None, help="Folder of images; one sub-folder per class gives labels.")
    a("--image_column", default=None, help="Image column of --dataset_name (auto-detected when unset).")
    a("--class_column", default=None, help="Label column of --dataset_name (class-conditional pipelines).")
    a("--cache_dir", default=None, help="`datasets` / `transformers` cache folder.")
    a("--resolution", type=int, default=None, help="Image size; must equal the UNet's sample_size (the default).")
    a("--skip_bad_images", action="store_true", help="Skip unreadable images (use it iff training did: it changes "
      "which images the split is carved from).")
    a("--validation_size", type=validation_size_type, default=None, help="Held-out images: a number (500) or a "
      "fraction (0.1); default 10%% of the images, at most 1000 (the digits: their fixed 300). Use training's value.")
    a("--validation_split_seed", type=int, default=0, help="Seed of the held-out split (use training's value).")
    # ---- bits/dim
    a("--bpd_num_images", type=int, default=256, help="Validation images for bits/dim (0 skips bits/dim).")
    a("--bpd_timesteps", type=int, default=50, help="Network calls per image of the unbiased bits/dim estimate.")
    a("--bpd_exact", action="store_true", help="Evaluate all T terms of the bound (T network calls per image).")
    a("--bpd_batch_size", type=int, default=256, help="(image, timestep) pairs per network call.")
    # ---- sample quality
    a("--num_inference_steps", type=int, nargs="*", default=[50, 100], help="Sampling step counts to measure SWD "
      "and FD/KID/precision/recall at (none: skip sample quality).")
    a("--num_images", type=int, default=500, help="Generated images per step count (the same N at every point).")
    a("--num_reference_images", type=int, default=None, help="Validation images in the reference set (default all).")
    a("--guidance_scale", type=float, default=1.0, help="Classifier-free guidance of class-conditional pipelines.")
    a("--feature_extractor", default="auto", help="Features of FD/KID/precision/recall: 'auto' (digits classifier "
      "for the digits, else facebook/dinov2-base: FD_DINOv2; where it cannot be loaded, offline and not cached, one "
      "warning and SWD only), 'digits-classifier', or any transformers image encoder id or folder (an error, exit "
      "code 2, before anything is computed when it cannot be loaded). SWD needs no weights and is always reported.")
    a("--feature_batch_size", type=int, default=64, help="Images per encoder forward pass.")
    a("--sample_batch_size", type=int, default=64, help="Images per pipeline call.")
    a("--fd_bootstrap", type=int, default=20, help="Bootstrap resamples for FD's standard error (0: none).")
    a("--kid_num_subsets", type=int, default=100, help="KID subsets.")
    a("--grid_num_images", type=int, default=64, help="Images per sample grid.")
    a("--seed", type=int, default=0, help="Seed of sampling, bits/dim, KID subsets and bootstrap.")
    a("--device", default=None, help="Device (default: cuda when available, else cpu).")
    a("--no_progress", action="store_true", help="No progress bars.")
    return p


def validation_size_type(text: str):
    """argparse ``type`` of ``--validation_size`` (here and in ``training/train.py``): a count ("500") or a
    fraction ("0.1"), :func:`diffusers_ddpm_ext.data.parse_validation_size`."""
    from .data import parse_validation_size

    try:
        return parse_validation_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        report = _evaluate_from_args(args)
    except EncoderUnavailableError as error:  # decided before anything is computed
        print(f"error: --feature_extractor {args.feature_extractor}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except (NonFiniteWeightsError, DataChannelsError) as error:  # refused before any sampling or file
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {os.path.join(args.output_dir, REPORT_MD)} and {REPORT_JSON}")
    return report


def _evaluate_from_args(args: argparse.Namespace) -> dict:
    return evaluate_pipeline(
        args.pipeline, args.output_dir, dataset_name=args.dataset_name, train_data_dir=args.train_data_dir,
        image_column=args.image_column, class_column=args.class_column, cache_dir=args.cache_dir,
        resolution=args.resolution, skip_bad_images=args.skip_bad_images, validation_size=args.validation_size,
        validation_split_seed=args.validation_split_seed, num_inference_steps=args.num_inference_steps,
        num_images=args.num_images, num_reference_images=args.num_reference_images,
        guidance_scale=args.guidance_scale, feature_extractor=args.feature_extractor,
        feature_batch_size=args.feature_batch_size, sample_batch_size=args.sample_batch_size,
        fd_bootstrap=args.fd_bootstrap, kid_num_subsets=args.kid_num_subsets, bpd_num_images=args.bpd_num_images,
        bpd_timesteps=args.bpd_timesteps, bpd_exact=args.bpd_exact, bpd_batch_size=args.bpd_batch_size,
        grid_num_images=args.grid_num_images, seed=args.seed, device=args.device, overwrite=args.overwrite,
        progress=not args.no_progress)


if __name__ == "__main__":
    main()
