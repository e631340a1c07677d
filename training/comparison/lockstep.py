"""Training every recipe through `diffusers_ddpm_ext.trainer.Trainer`, in lockstep on one batch stream.

Each recipe gets its own :class:`Trainer` whose generator is seeded with the same
:func:`~diffusers_ddpm_ext.trainer.process_seed`, so every recipe draws the same noise and timesteps (for the
uniform timestep sampler) in the same order; one batch stream (the training script's
`ResumableBatchSampler` order) is fed to each trainer's ``train_step`` in turn, the order rotating every step so
that background load hits all recipes alike, and the global RNG is reseeded before each step so that dropout
draws the same masks in every recipe. The diffusers recipe trains with its plain ε-MSE as the trainer's
``loss_fn``.
"""

from __future__ import annotations

import copy
import time
from typing import Dict, List, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusers_ddpm_ext.data import ResumableBatchSampler
from diffusers_ddpm_ext.trainer import Trainer, process_seed

from .measure import peak_memory_bytes, tensor_bytes
from .recipes import Recipe, diffusers_mse, train_config


def make_trainer(recipe: Recipe, model, scheduler, config, steps: int, num_levels: int) -> Trainer:
    """A trainer of ``model`` for ``steps`` optimizer steps with the recipe's objective and optimiser."""
    return Trainer(model, scheduler, train_config(recipe, config, steps, num_levels), max_train_steps=steps,
                   generator=torch.Generator().manual_seed(process_seed(config.seed)),
                   loss_fn=diffusers_mse if recipe.diffusers else None)


def batch_stream(train_images: torch.Tensor, batch_size: int, seed: int):
    """Batches in the training script's order (`ResumableBatchSampler`, drop_last), epoch after epoch."""
    sampler = ResumableBatchSampler(len(train_images), batch_size, seed=seed, shuffle=True, drop_last=True)
    epoch = 0
    while True:
        for batch in sampler.epoch_batches(epoch):
            yield train_images[torch.tensor([index for index, _ in batch])]  # (B, C, H, W)
        epoch += 1


def dropout_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


def lockstep(trainers: Sequence[Trainer], train_images, config, progress: bool, desc: str) -> List[dict]:
    """Train all trainers on one batch stream, one step each in turn; returns per trainer ``losses``, ``mses``
    and ``step_times``."""
    records = [{"losses": [], "mses": [], "step_times": []} for _ in trainers]
    total = max(t.max_train_steps for t in trainers)
    stream = batch_stream(train_images, config.batch_size, config.seed)
    bar = tqdm(range(total), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        x0 = next(stream)
        for k in range(len(trainers)):
            index = (step + k) % len(trainers)
            trainer, record = trainers[index], records[index]
            if step >= trainer.max_train_steps:
                continue
            torch.manual_seed(dropout_seed(config.seed, step))
            start = time.perf_counter()
            out = trainer.train_step(x0)
            record["step_times"].append(time.perf_counter() - start)
            record["losses"].append(out.loss)
            record["mses"].append(out.mse if out.mse is not None else float("nan"))
        bar.set_postfix({f"r{i}": f"{r['mses'][-1]:.3f}" for i, r in enumerate(records) if r["mses"]})
    return records


def steps_from_budget(models: Dict[str, tuple], data, config, progress: bool) -> Dict[str, int]:
    """Convert ``budget_seconds`` to a step count per recipe from interleaved steps on throwaway copies."""
    steps_each = config.calibration_steps + 1
    trainers = [make_trainer(r, copy.deepcopy(models[r.name][0]), models[r.name][1], config, steps_each,
                             data.num_levels) for r in config.recipes]
    records = lockstep(trainers, data.train, config, progress, "calibrating")
    steps = {}
    for recipe, record in zip(config.recipes, records):
        per_step = float(np.median(record["step_times"][1:]))  # the first step pays one-time allocation costs
        steps[recipe.name] = int(max(1, min(config.max_train_steps, config.budget_seconds // per_step)))
    return steps


def train_recipes(models: Dict[str, tuple], data, config, progress: bool = True) -> Dict[str, dict]:
    """Train every recipe (in place) on the same data stream; returns per-recipe training records.

    After training, models hold their EMA weights (when the recipe uses EMA) and are in eval mode.

    Returns:
        ``{name: {"steps", "images_seen", "losses", "mses", "step_times", "train_seconds", "train_img_per_s",
        "step_time_median_s"}}``.
    """
    if config.budget_seconds is not None:
        steps = steps_from_budget(models, data, config, progress)
    else:
        steps = {r.name: config.max_train_steps for r in config.recipes}
    trainers = [make_trainer(r, models[r.name][0], models[r.name][1], config, steps[r.name], data.num_levels)
                for r in config.recipes]
    records = lockstep(trainers, data.train, config, progress, "training (interleaved)")
    out = {}
    for recipe, trainer, record in zip(config.recipes, trainers, records):
        if trainer.ema is not None:
            trainer.ema.copy_to(trainer.unwrapped.parameters())
        trainer.unwrapped.eval()
        median = float(np.median(record["step_times"]))
        out[recipe.name] = dict(record, steps=trainer.max_train_steps,
                                images_seen=trainer.max_train_steps * config.batch_size,
                                train_seconds=float(sum(record["step_times"])), step_time_median_s=median,
                                train_img_per_s=config.batch_size / median)
    return out


def train_memory(recipe: Recipe, model, scheduler, x0: torch.Tensor, config, num_levels: int) -> dict:
    """Peak memory of one full training step (after a warm-up step that creates the AdamW state) on a copy."""
    trainer = make_trainer(recipe, copy.deepcopy(model).train(), scheduler, config, 2, num_levels)
    trainer.train_step(x0)
    live = tensor_bytes([dict(trainer.unwrapped.state_dict()), trainer.optimizer.state_dict()["state"],
                         list(trainer.ema.shadow_params) if trainer.ema is not None else []])
    extra = peak_memory_bytes(lambda: trainer.train_step(x0))
    return {"live_bytes": live, "step_extra_bytes": extra, "peak_bytes": None if extra is None else live + extra}
