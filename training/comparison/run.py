"""The whole comparison: build -> measure cost -> train in lockstep -> bits/dim -> samples -> report."""

from __future__ import annotations

import logging
import os
import platform
import time
from typing import Dict, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .datasets import load_data
from .evaluation import (held_out_bits_per_dim, quality, reference_features_of, sample_interleaved, sample_memory,
                         sampling_speed)
from .lockstep import batch_stream, train_memory, train_recipes
from .measure import count_flops
from .recipes import CompareConfig, build_recipe_models, recipe_learning_rate, recipe_settings

logger = logging.getLogger(__name__)


def _class_name(obj) -> str:
    return f"{type(obj).__module__.split('.')[0]}.{type(obj).__name__}"


def _load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def load_extractor(config: CompareConfig, extractor=None):
    """The feature extractor of sample quality: ``extractor`` if given, else ``config.feature_extractor``
    through `evaluate.load_feature_extractor` (the digits classifier on the digits, DINOv2 otherwise; for "auto"
    without an encoder to load, an `evaluate.FeaturesUnavailable`: SWD only)."""
    from diffusers_ddpm_ext.evaluate import load_feature_extractor

    if extractor is not None:
        return extractor
    return load_feature_extractor(config.feature_extractor, digits=config.digits, device="cpu")


def run_comparison(config: CompareConfig, output_dir: Optional[str] = None, extractor=None, progress: bool = True,
                   command: Optional[str] = None) -> dict:
    """Run the comparison; returns the report dict (written with `report.write_report` if ``output_dir``).

    Args:
        config: the recipes, data, budget and measurements.
        output_dir: where ``report.md``, ``report.json`` and the PNGs go (None: write nothing).
        extractor: feature extractor for the sample metrics (default: ``config.feature_extractor``).
        progress: tqdm bars.
        command: the command line to record in the report.
    """
    from .report import write_report

    config.validate()
    wall_start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    try:
        report, models, images = _run(config, load_extractor(config, extractor), progress)
    finally:
        torch.set_num_threads(previous_threads)
    report["wall_seconds"] = time.perf_counter() - wall_start
    report["command"] = command
    if output_dir is not None:
        write_report(report, output_dir, images=images)
        if config.save_models:
            save_models(models, os.path.join(output_dir, "models"))
    report["_models"] = models
    return report


def save_models(models: Dict[str, tuple], folder: str) -> None:
    """Save each recipe's (EMA) UNet and scheduler as ``<folder>/<recipe>/{unet,scheduler}``."""
    import json

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "order.json"), "w") as f:
        json.dump(list(models), f)
    for name, (model, scheduler) in models.items():
        model.save_pretrained(os.path.join(folder, name, "unet"))
        scheduler.save_pretrained(os.path.join(folder, name, "scheduler"))


def load_models(folder: str) -> Dict[str, tuple]:
    """What :func:`save_models` wrote, in the saved order of recipe names (sorted by folder name otherwise)."""
    import json

    from diffusers import DDPMScheduler, UNet2DModel

    from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler
    from diffusers_ddpm_ext.unet import DDPMUNet2DModel

    order_file = os.path.join(folder, "order.json")
    names = json.load(open(order_file)) if os.path.isfile(order_file) else sorted(os.listdir(folder))
    out = {}
    for name in names:
        with open(os.path.join(folder, name, "unet", "config.json")) as f:
            unet_cls = UNet2DModel if json.load(f)["_class_name"] == "UNet2DModel" else DDPMUNet2DModel
        with open(os.path.join(folder, name, "scheduler", "scheduler_config.json")) as f:
            sched_cls = DDPMScheduler if json.load(f)["_class_name"] == "DDPMScheduler" else GaussianDiffusionScheduler
        out[name] = (unet_cls.from_pretrained(os.path.join(folder, name, "unet")).eval(),
                     sched_cls.from_pretrained(os.path.join(folder, name, "scheduler")))
    return out


def _run(config: CompareConfig, extractor, progress: bool):
    import diffusers

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_average_start": _load_average()}
    logger.info("building models")
    models = build_recipe_models(config)
    first = next(iter(models.values()))[0].config
    size = first.sample_size if isinstance(first.sample_size, int) else int(first.sample_size[0])
    data = load_data(config, int(first.in_channels), size)
    shape = tuple(data.train.shape[1:])
    recipes_out: Dict[str, dict] = {}
    first_batch = next(batch_stream(data.train, config.batch_size, config.seed))
    for recipe in tqdm(config.recipes, desc="params / FLOPs / memory", disable=not progress):
        model, scheduler = models[recipe.name]
        s = recipe_settings(recipe)
        tc = s.flags
        recipes_out[recipe.name] = {
            "label": recipe.label or recipe.flags, "flags": recipe.flags, "diffusers_recipe": recipe.diffusers,
            "model_class": _class_name(model), "scheduler_class": _class_name(scheduler),
            "beta_schedule": s.beta_schedule + (f" (β clipped at {s.max_beta})" if s.max_beta else ""),
            "variance_type": s.variance_type, "prediction_type": s.prediction_type,
            "loss": "F.mse_loss(eps_pred, eps)" if recipe.diffusers else f"diffusion_loss({tc.loss_type})"
            + (f", min-SNR γ={tc.snr_gamma}" if tc.snr_gamma else ""),
            "timestep_sampler": tc.timestep_sampler, "learning_rate": recipe_learning_rate(tc, config),
            "ema_max_decay": tc.ema_max_decay if tc.use_ema else None,
            "out_channels": int(model.config.out_channels),
            "parameters": int(sum(p.numel() for p in model.parameters())),
        }
        if config.measure_cost:
            recipes_out[recipe.name].update(
                flops_per_image=count_flops(model, (1, *shape)),
                train_memory=train_memory(recipe, model, scheduler, first_batch, config, data.num_levels),
                sample_memory=sample_memory(model, scheduler, config.sample_batch_size, shape))
            model.train()

    logger.info("training %s", ", ".join(models))
    training = train_recipes(models, data, config, progress)
    for name, rec in training.items():
        tail = max(1, len(rec["mses"]) // 10)
        recipes_out[name]["training"] = {
            "steps": rec["steps"], "images_seen": rec["images_seen"], "train_seconds": rec["train_seconds"],
            "step_time_median_s": rec["step_time_median_s"], "train_img_per_s": rec["train_img_per_s"],
            "final_loss": float(np.mean(rec["losses"][-tail:])), "final_mse": float(np.nanmean(rec["mses"][-tail:])),
            "final_window": tail}
        recipes_out[name]["loss_curve"] = {"loss": rec["losses"], "mse": rec["mses"]}
        recipes_out[name]["step_times"] = rec["step_times"]

    logger.info("held-out bits/dim")
    bpd_images = data.heldout[: config.bpd_num_images]
    for name, (model, scheduler) in models.items():
        recipes_out[name]["bits_per_dim"] = held_out_bits_per_dim(
            model, scheduler, bpd_images, data.num_levels, config.bpd_timesteps_sampled, config.seed,
            config.bpd_batch_size, config.bpd_exact_images, progress)

    reference_features = reference_features_of(extractor, data.heldout)  # None without an encoder: SWD only
    if config.measure_cost:
        for name, sp in sampling_speed(models, config, progress).items():
            recipes_out[name]["sampling_speed"] = sp
    images_out: Dict[str, Dict[int, torch.Tensor]] = {name: {} for name in models}
    reference_rows = {}
    for steps, n in zip(config.sample_steps, config.num_samples):
        sampled = sample_interleaved(models, steps, n, config, progress)
        for name, (images, seconds) in sampled.items():
            images_out[name][steps] = images[: config.grid_images]
            entry = {"num_images": int(images.shape[0]), "wall_seconds": seconds,
                     "img_per_s_wall": images.shape[0] / seconds,
                     "quality": quality(images, data.heldout, extractor, config.seed, config.fd_bootstrap,
                                        reference_features)}
            if config.measure_cost:  # batch / (steps × median seconds per denoising step)
                entry["img_per_s"] = recipes_out[name]["sampling_speed"]["image_steps_per_s"] / steps
            recipes_out[name].setdefault("samples", {})[str(steps)] = entry
        if n not in reference_rows:
            # Real training images scored like samples: the floor that finite sample counts allow.
            g = torch.Generator().manual_seed(config.seed + n)
            idx = torch.randperm(len(data.train), generator=g)[:n]
            reference_rows[n] = quality(data.train[idx], data.heldout, extractor, config.seed, config.fd_bootstrap,
                                        reference_features)
    env["load_average_end"] = _load_average()
    report = {
        "config": config.to_dict(),
        "environment": env,
        "data": {"train_images": int(data.train.shape[0]), "heldout_images": int(data.heldout.shape[0]),
                 "resolution": int(shape[-1]), "channels": int(shape[0]), "num_levels": data.num_levels,
                 "split": data.info, "digits": config.digits},
        "baseline": config.recipes[0].name,
        "recipes": recipes_out,
        "real_data_reference": {str(n): row for n, row in reference_rows.items()},
    }
    from .report import comparisons, verdict

    report["comparisons"] = comparisons(report)
    report["verdict"] = verdict(report)
    return report, models, images_out
