"""Side-by-side comparison of diffusers' `UNet2DModel` + `DDPMScheduler` recipe with ours, on the same budget.

Three recipes on the built-in digits (16x16 grey, ``digits-small`` layout), trained on the same batches in the
same order, with the same noise and timestep draws, optimizer, LR schedule, EMA and number of steps:

* ``diffusers``: `UNet2DModel` (the ``to_unet2d()`` conversion of the preset, so the architecture is the one
  the preset describes) + `DDPMScheduler` (linear β, ε, fixed_small), ``F.mse_loss`` on the noise, as
  diffusers' ``train_unconditional.py`` does.
* ``ours-same``: `DDPMUNet2DModel.from_unet2d` of the **same initial weights** + `GaussianDiffusionScheduler`
  built from the same config, L_simple: isolates the implementation (speed, memory); its loss curve should
  match the diffusers one up to float round-off.
* ``ours-improved``: what the training script defaults to: cosine schedule, learned_range variance (2 output
  channels) and the hybrid loss (IDM).

Measured for each: parameters, forward FLOPs per image, training throughput, peak memory, sampling
throughput, loss curves, held-out bits/dim, FD / KID / precision / recall / mode coverage at several sampling
step counts, sample grids. :func:`run_comparison` returns the report dict; :func:`write_report` writes
``report.md``, ``report.json`` and the PNGs. ``python training/compare.py --quick`` is the CLI.

How things are measured (also written into the report):

* **Timings** interleave the recipes (one training step of each in turn, rotating the order every step;
  sampling chunk by chunk), so background load on a shared machine hits all recipes alike. Training
  throughput is ``batch / median step time`` (a step = forward, loss, backward, clipping, AdamW, LR
  schedule, EMA).
* **FLOPs** are counted with `torch.utils.flop_counter.FlopCounterMode` on one image: 2 per multiply-add of
  convolutions, matmuls and attention (CPU SDPA added, which the stock registry lacks); norms and
  elementwise ops are not counted.
* **Peak memory** is the high-water mark of tensor bytes held by torch's CPU allocator, read from
  ``torch.profiler`` allocation events (``profile_memory=True``): the bytes live before the step
  (parameters, buffers, AdamW state, EMA copy) plus the peak of what the step allocates on top
  (activations, gradients, temporaries). Allocator caching and the Python heap are not included.
* **Bits/dim** is the stratified unbiased estimate of the full-chain bound (`estimate_bits_per_dim`) on the
  held-out digits with its Monte-Carlo standard error, optionally the exact bound on a subset. The diffusers
  recipe is evaluated through ``GaussianDiffusionScheduler.from_config(DDPMScheduler.config)`` (same β, same
  fixed_small variance, which is what `DDPMScheduler` samples with).
* **Samples** come from `diffusers.DDPMPipeline` (EMA weights, the same seeds for every recipe) at
  ``num_inference_steps`` = 1000, 50, 25 (``"leading"`` spacing for both schedulers); metrics use the digits
  classifier of :mod:`diffusers_ddpm_ext.metrics` (or any extractor) against the held-out digits.

Same seed and thread count give the same numbers except timings.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import DIGITS_NUM_LEVELS, ResumableBatchSampler, load_heldout_digits, load_training_dataset
from .likelihood import bits_per_dim, estimate_bits_per_dim
from .losses import diffusion_loss
from .scheduler import GaussianDiffusionScheduler
from .unet import UNET_PRESETS, DDPMUNet2DModel

logger = logging.getLogger(__name__)

__all__ = [
    "Recipe",
    "RECIPES",
    "CompareConfig",
    "quick_config",
    "build_recipe_models",
    "count_flops",
    "peak_memory_bytes",
    "tensor_bytes",
    "train_recipes",
    "sample_images",
    "run_comparison",
    "write_report",
    "readme_table",
]

MIB = 2**20


# ----------------------------------------------------------------------------------------------------
# Recipes and configuration
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """One training recipe of the comparison.

    Args:
        name: short key (``"diffusers"``, ``"ours-same"``, ``"ours-improved"``).
        label: human-readable description for the report.
        model: ``"unet2d"`` (diffusers' `UNet2DModel`) or ``"ours"`` (`DDPMUNet2DModel`).
        scheduler: ``"ddpm"`` (diffusers' `DDPMScheduler`) or ``"ours"`` (`GaussianDiffusionScheduler`).
        beta_schedule: β schedule name (diffusers names).
        variance_type: reverse-process variance.
        loss_type: ``"mse"`` (train_unconditional.py's ``F.mse_loss``) or a `diffusion_loss` type.
        prediction_type: what the network predicts.
    """

    name: str
    label: str
    model: str
    scheduler: str
    beta_schedule: str
    variance_type: str
    loss_type: str
    prediction_type: str = "epsilon"


RECIPES: Dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("diffusers", "diffusers UNet2DModel + DDPMScheduler (train_unconditional.py recipe)",
               "unet2d", "ddpm", "linear", "fixed_small", "mse"),
        Recipe("ours-same", "ours, identical architecture, weights and objective",
               "ours", "ours", "linear", "fixed_small", "simple"),
        Recipe("ours-improved", "ours with cosine schedule + learned_range variance + hybrid loss",
               "ours", "ours", "squaredcos_cap_v2", "learned_range", "hybrid"),
        # Optional (--recipes): separates the learned variance + hybrid loss from the cosine schedule.
        Recipe("ours-hybrid-linear", "ours with learned_range variance + hybrid loss on the linear schedule",
               "ours", "ours", "linear", "learned_range", "hybrid"),
    )
}


@dataclass
class CompareConfig:
    """Everything that defines a comparison run (the defaults are the full mode; see :func:`quick_config`).

    Args:
        recipes: names from :data:`RECIPES`; the first is the baseline of the ratios.
        preset: `DDPMUNet2DModel` preset of the shared architecture.
        unet_overrides: config keys replacing the preset's (e.g. a tiny model in tests).
        resolution: image side (the digits are upsampled 8 -> resolution with nearest neighbour).
        num_train_timesteps: T.
        max_train_steps: optimizer steps per recipe (the budget), or the cap with ``budget_seconds``.
        budget_seconds: wall-clock budget per recipe instead: converted to a step count per recipe from a
            short interleaved calibration, so each recipe runs a complete LR schedule.
        batch_size: training batch size.
        learning_rate, lr_scheduler, lr_warmup_steps, adam_*: AdamW and `diffusers.optimization.get_scheduler`
            settings (train_unconditional.py names).
        max_grad_norm: gradient clipping (as train_unconditional.py's 1.0).
        use_ema, ema_inv_gamma, ema_power, ema_max_decay: `diffusers.training_utils.EMAModel` with warm-up;
            samples and bits/dim use the EMA weights.
        sample_steps: sampling step counts (``num_inference_steps``).
        num_samples: images generated at each entry of ``sample_steps``.
        sample_batch_size: images per pipeline call.
        grid_images: images shown in each sample grid.
        bpd_num_images: held-out images for bits/dim (at most 300).
        bpd_timesteps_sampled: network calls per image of the unbiased estimate (even, >= 2).
        bpd_exact_images: if > 0, also the exact bound (T calls per image) on this many held-out images.
        bpd_batch_size: (image, t) pairs per network call in bits/dim.
        calibration_steps: interleaved steps used to convert ``budget_seconds`` to steps.
        speed_rounds: interleaved rounds of the sampling-speed benchmark (after one warm-up round).
        speed_steps_per_call: denoising steps per timed pipeline call in that benchmark.
        seed: seed of weights, data order, noise, sampling and evaluation.
        num_threads: ``torch.set_num_threads`` for the run (None keeps torch's default).
    """

    recipes: tuple = ("diffusers", "ours-same", "ours-improved")
    preset: str = "digits-small"
    unet_overrides: dict = field(default_factory=dict)
    resolution: int = 16
    num_train_timesteps: int = 1000
    max_train_steps: int = 3000
    budget_seconds: Optional[float] = None
    batch_size: int = 64
    learning_rate: float = 1e-3
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 100
    adam_beta1: float = 0.95
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-6
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_ema: bool = True
    ema_inv_gamma: float = 1.0
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999
    sample_steps: tuple = (1000, 50, 25)
    num_samples: tuple = (300, 1000, 1000)
    sample_batch_size: int = 250
    grid_images: int = 64
    bpd_num_images: int = 300
    bpd_timesteps_sampled: int = 50
    bpd_exact_images: int = 10
    bpd_batch_size: int = 500
    calibration_steps: int = 5
    speed_rounds: int = 3
    speed_steps_per_call: int = 5
    seed: int = 0
    num_threads: Optional[int] = None

    def validate(self) -> None:
        """Raise a ValueError naming the first bad field."""
        unknown = [r for r in self.recipes if r not in RECIPES]
        if not self.recipes or unknown:
            raise ValueError(f"recipes must be a non-empty subset of {list(RECIPES)}, got {list(self.recipes)}")
        if len(set(self.recipes)) != len(self.recipes):
            raise ValueError(f"recipes must not repeat, got {list(self.recipes)}")
        if self.preset not in UNET_PRESETS:
            raise ValueError(f"preset {self.preset!r} is unknown; choose one of {sorted(UNET_PRESETS)}")
        for name in ("max_train_steps", "batch_size", "num_train_timesteps", "sample_batch_size",
                     "bpd_num_images", "calibration_steps", "resolution", "speed_rounds",
                     "speed_steps_per_call"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("lr_warmup_steps", "bpd_exact_images", "grid_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.budget_seconds is not None and not self.budget_seconds > 0:
            raise ValueError(f"budget_seconds must be > 0 or None, got {self.budget_seconds!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if len(self.sample_steps) != len(self.num_samples) or not self.sample_steps:
            raise ValueError(f"sample_steps {list(self.sample_steps)} and num_samples {list(self.num_samples)} "
                             "must be non-empty and of equal length")
        for steps in self.sample_steps:
            if not isinstance(steps, int) or not 1 <= steps <= self.num_train_timesteps:
                raise ValueError(f"every sample_steps entry must be an int in [1, {self.num_train_timesteps}], "
                                 f"got {steps!r}")
        for n in self.num_samples:
            if not isinstance(n, int) or n < 4:
                raise ValueError(f"every num_samples entry must be an int >= 4 (the metrics need a few), got {n!r}")
        if (not isinstance(self.bpd_timesteps_sampled, int) or self.bpd_timesteps_sampled < 2
                or self.bpd_timesteps_sampled % 2):
            raise ValueError(f"bpd_timesteps_sampled must be an even int >= 2, got {self.bpd_timesteps_sampled!r}")
        if self.speed_steps_per_call > self.num_train_timesteps:
            raise ValueError(f"speed_steps_per_call must be <= num_train_timesteps, got {self.speed_steps_per_call}")
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise ValueError(f"num_threads must be a positive int or None, got {self.num_threads!r}")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def quick_config(**overrides) -> CompareConfig:
    """The ``--quick`` budget: well under 10 minutes on 2 idle CPU cores for the ``digits-small`` preset.

    300 steps at batch 64 per recipe (~13 epochs of the 1,497 training digits), 16 images at 1000 sampling
    steps, 200 at 50 and at 25 steps, bits/dim estimated from 30 network calls on each of 100 held-out
    images. About 5 minutes on 2 idle cores; several times longer when other processes share them.
    """
    base = dict(max_train_steps=300, lr_warmup_steps=30, learning_rate=2e-3, sample_steps=(1000, 50, 25),
                num_samples=(16, 200, 200), sample_batch_size=200, grid_images=64, bpd_num_images=100,
                bpd_timesteps_sampled=30, bpd_exact_images=0, speed_rounds=5, speed_steps_per_call=2)
    base.update(overrides)
    return CompareConfig(**base)


# ----------------------------------------------------------------------------------------------------
# Models and schedulers
# ----------------------------------------------------------------------------------------------------


def _make_scheduler(recipe: Recipe, num_train_timesteps: int):
    kwargs = dict(num_train_timesteps=num_train_timesteps, beta_schedule=recipe.beta_schedule,
                  variance_type=recipe.variance_type, prediction_type=recipe.prediction_type)
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler(**kwargs)
    if recipe.scheduler == "ddpm":
        return ddpm
    # The path of a diffusers user switching schedulers: the same config, read by ours.
    return GaussianDiffusionScheduler.from_config(ddpm.config)


def build_recipe_models(config: CompareConfig) -> Dict[str, tuple]:
    """Initial ``(model, scheduler)`` per recipe, in training mode.

    The diffusers and ours-same models hold the **same** initial weights: the preset is built once with
    ``torch.manual_seed(seed)``, converted to `UNet2DModel`, and ours-same is converted back from it.
    Recipes with a learned variance get ``out_channels = 2 * in_channels``, from the same seed (so every
    layer but ``conv_out`` starts equal too).
    """
    base_config = dict(UNET_PRESETS[config.preset]["config"])
    base_config.update(config.unet_overrides)
    base_config["sample_size"] = config.resolution
    in_channels = base_config.get("in_channels", 3)
    out = {}
    shared = None
    for name in config.recipes:
        recipe = RECIPES[name]
        learned = recipe.variance_type in ("learned", "learned_range")
        cfg = dict(base_config, out_channels=2 * in_channels if learned else in_channels)
        if learned:
            torch.manual_seed(config.seed)
            model = DDPMUNet2DModel(**cfg)
        else:
            if shared is None:
                torch.manual_seed(config.seed)
                shared = DDPMUNet2DModel(**cfg).to_unet2d()
            model = copy.deepcopy(shared) if recipe.model == "unet2d" else DDPMUNet2DModel.from_unet2d(shared)
        out[name] = (model.train(), _make_scheduler(recipe, config.num_train_timesteps))
    return out


def _bpd_scheduler(scheduler) -> GaussianDiffusionScheduler:
    """The likelihood needs our posterior math: wrap a `DDPMScheduler` config (same β and fixed variance)."""
    if isinstance(scheduler, GaussianDiffusionScheduler):
        return scheduler
    return GaussianDiffusionScheduler.from_config(scheduler.config)


# ----------------------------------------------------------------------------------------------------
# Static measurements
# ----------------------------------------------------------------------------------------------------


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(model: torch.nn.Module, sample_shape: Sequence[int], timestep: int = 500) -> int:
    """Forward FLOPs per sample (2 per multiply-add of conv / matmul / attention) with `FlopCounterMode`.

    Args:
        model: a diffusers-style UNet ``model(sample, timestep)``.
        sample_shape: ``(B, C, H, W)`` of the probe input (the result is divided by ``B``).
        timestep: timestep of the probe (FLOPs do not depend on it).

    Returns:
        FLOPs per sample (int).
    """
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    custom = {}
    # The stock registry covers the CUDA SDPA kernels only; on CPU SDPA dispatches to this op.
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        custom[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_flops
    param = next(model.parameters())
    batch = int(sample_shape[0])
    x = torch.zeros(tuple(sample_shape), dtype=param.dtype, device=param.device)
    t = torch.full((batch,), int(timestep), dtype=torch.long, device=param.device)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        model(x, t)
    return int(counter.get_total_flops()) // batch


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensor storages among ``tensors`` (an iterable; nested dicts/lists are walked)."""
    seen, total = set(), 0

    def visit(obj):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = (storage.data_ptr(), obj.device)
            if key not in seen and storage.nbytes() > 0:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    for item in tensors:
        visit(item)
    return total


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (kineto prints start/stop lines from C++ that Python cannot intercept)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory_bytes(fn: Callable[[], Any]) -> Optional[int]:
    """Peak CPU tensor bytes that ``fn()`` allocates on top of what is live when it starts.

    Reads the allocation events of ``torch.profiler`` (``profile_memory=True``): each carries the allocator's
    running total, so the high-water mark minus the total before the first event is the peak extra memory
    (activations, gradients, temporaries). Returns None if this torch build does not expose the events.
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        from torch._C._profiler import _EventType

        stack = list(prof.profiler.kineto_results.experimental_event_tree())
    except (AttributeError, ImportError):  # private API: degrade to "not measured" rather than guess
        return None
    events = []
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and str(node.extra_fields.device).startswith("cpu"):
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
    if not events:
        return 0
    events.sort(key=lambda e: e[0])
    baseline = events[0][2] - events[0][1]  # the running total just before the first allocation
    return max(0, max(e[2] for e in events) - baseline)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Mutable training state of one recipe."""

    recipe: Recipe
    model: torch.nn.Module
    scheduler: Any
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    ema: Any
    generator: torch.Generator
    steps: int
    losses: List[float] = field(default_factory=list)
    mses: List[float] = field(default_factory=list)
    step_times: List[float] = field(default_factory=list)


def _make_run(recipe: Recipe, model, scheduler, config: CompareConfig, steps: int) -> _Run:
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=min(config.lr_warmup_steps, steps),
                                 num_training_steps=steps)
    ema = None
    if config.use_ema:
        ema = EMAModel(model.parameters(), decay=config.ema_max_decay, use_ema_warmup=True,
                       inv_gamma=config.ema_inv_gamma, power=config.ema_power)
    # The same noise / timestep stream for every recipe: identical draws in identical order.
    generator = torch.Generator().manual_seed(config.seed * 7919 + 1000)
    return _Run(recipe, model, scheduler, optimizer, lr_scheduler, ema, generator, steps)


def _train_step(run: _Run, x0: torch.Tensor, config: CompareConfig, step: int) -> None:
    """One optimizer step; appends the loss and the ε-MSE. x0: (B, C, H, W) in [-1, 1]."""
    model, scheduler = run.model, run.scheduler
    torch.manual_seed(config.seed * 1_000_003 + step)  # dropout (if any) draws the same masks in every recipe
    noise = torch.randn(x0.shape, generator=run.generator)
    timesteps = torch.randint(0, config.num_train_timesteps, (x0.shape[0],), generator=run.generator)
    noisy = scheduler.add_noise(x0, noise, timesteps)
    model_output = model(noisy, timesteps).sample  # (B, C or 2C, H, W)
    if run.recipe.loss_type == "mse":
        loss = F.mse_loss(model_output.float(), noise.float())  # train_unconditional.py, epsilon
        mse = loss.detach()
    else:
        out = diffusion_loss(model_output.float(), x0, noise, timesteps, scheduler, loss_type=run.recipe.loss_type,
                             num_levels=DIGITS_NUM_LEVELS, noisy_samples=noisy)
        loss, mse = out.loss.mean(), out.mse.mean().detach()
    loss.backward()
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.step(model.parameters())
    run.losses.append(float(loss.detach()))
    run.mses.append(float(mse))


def _batch_stream(train_images: torch.Tensor, batch_size: int, seed: int):
    """Batches in the training script's order (`ResumableBatchSampler`, drop_last), epoch after epoch."""
    sampler = ResumableBatchSampler(len(train_images), batch_size, seed=seed, shuffle=True, drop_last=True)
    epoch = 0
    while True:
        for batch in sampler.epoch_batches(epoch):
            yield train_images[torch.tensor([index for index, _ in batch])]  # (B, C, H, W)
        epoch += 1


def _lockstep(runs: Sequence[_Run], train_images, config: CompareConfig, progress: bool, desc: str) -> None:
    """Train all runs on the same batch stream, one step each in turn; the order rotates every step."""
    total = max(run.steps for run in runs)
    stream = _batch_stream(train_images, config.batch_size, config.seed)
    bar = tqdm(range(total), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        x0 = next(stream)
        for k in range(len(runs)):
            run = runs[(step + k) % len(runs)]
            if step >= run.steps:
                continue
            start = time.perf_counter()
            _train_step(run, x0, config, step)
            run.step_times.append(time.perf_counter() - start)
        bar.set_postfix({r.recipe.name: f"{r.mses[-1]:.3f}" for r in runs if r.mses})


def _steps_from_budget(models: Dict[str, tuple], train_images, config: CompareConfig, progress: bool) -> Dict[str, int]:
    """Convert ``budget_seconds`` to a step count per recipe from interleaved steps on throwaway copies."""
    runs = [_make_run(RECIPES[name], copy.deepcopy(m), s, config, config.calibration_steps + 1)
            for name, (m, s) in models.items()]
    _lockstep(runs, train_images, config, progress, "calibrating")
    steps = {}
    for run in runs:
        per_step = float(np.median(run.step_times[1:]))  # the first step pays one-time allocation costs
        steps[run.recipe.name] = int(max(1, min(config.max_train_steps, config.budget_seconds // per_step)))
    return steps


def train_recipes(models: Dict[str, tuple], train_images: torch.Tensor, config: CompareConfig,
                  progress: bool = True) -> Dict[str, dict]:
    """Train every recipe (in place) on the same data stream; returns per-recipe training records.

    After training, models hold their EMA weights (when ``use_ema``) and are in eval mode.

    Returns:
        ``{name: {"steps", "images_seen", "losses", "mses", "step_times", "train_seconds",
        "train_img_per_s", "step_time_median_s"}}``.
    """
    if config.budget_seconds is not None:
        steps = _steps_from_budget(models, train_images, config, progress)
    else:
        steps = {name: config.max_train_steps for name in models}
    runs = [_make_run(RECIPES[name], m, s, config, steps[name]) for name, (m, s) in models.items()]
    _lockstep(runs, train_images, config, progress, "training (interleaved)")
    records = {}
    for run in runs:
        if run.ema is not None:
            run.ema.copy_to(run.model.parameters())
        run.model.eval()
        median = float(np.median(run.step_times))
        records[run.recipe.name] = {
            "steps": run.steps,
            "images_seen": run.steps * config.batch_size,
            "losses": run.losses,
            "mses": run.mses,
            "step_times": run.step_times,
            "train_seconds": float(sum(run.step_times)),
            "step_time_median_s": median,
            "train_img_per_s": config.batch_size / median,
        }
    return records


def _train_memory(name: str, model, scheduler, x0: torch.Tensor, config: CompareConfig) -> dict:
    """Peak memory of one full training step (after a warm-up step) on a throwaway copy."""
    run = _make_run(RECIPES[name], copy.deepcopy(model).train(), scheduler, config, 2)
    _train_step(run, x0, config, 0)  # creates the AdamW state
    live = tensor_bytes([dict(run.model.state_dict()), run.optimizer.state_dict()["state"],
                         list(run.ema.shadow_params) if run.ema is not None else []])
    extra = peak_memory_bytes(lambda: _train_step(run, x0, config, 1))
    return {"live_bytes": live, "step_extra_bytes": extra, "peak_bytes": None if extra is None else live + extra}


def _sample_memory(model, scheduler, batch: int, shape) -> dict:
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


# ----------------------------------------------------------------------------------------------------
# Sampling and evaluation
# ----------------------------------------------------------------------------------------------------


def sample_images(model, scheduler, num_images: int, num_inference_steps: int, batch_size: int, seed: int,
                  progress: bool = False) -> tuple:
    """Generate with `diffusers.DDPMPipeline` as a user would; returns ``(images in [-1, 1], seconds)``.

    Chunk ``k`` uses ``Generator().manual_seed(seed + k)``, so recipes sampled with the same seed start from
    the same noise.
    """
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline(unet=model, scheduler=copy.deepcopy(scheduler))
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    chunks, seconds = [], 0.0
    for k, start in enumerate(range(0, num_images, batch_size)):
        b = min(batch_size, num_images - start)
        generator = torch.Generator().manual_seed(seed + k)
        t0 = time.perf_counter()
        images = pipe(batch_size=b, generator=generator, num_inference_steps=num_inference_steps,
                      output_type="pt").images  # (b, C, H, W) in [0, 1]
        seconds += time.perf_counter() - t0
        chunks.append(images * 2 - 1)
    return torch.cat(chunks), seconds


def _sample_interleaved(models: Dict[str, tuple], steps: int, num_images: int, config: CompareConfig,
                        progress: bool) -> Dict[str, tuple]:
    """Sample every recipe chunk by chunk in turn (fair timings under background load)."""
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
            images, seconds = sample_images(model, scheduler, b, steps, b, _sample_seed(config.seed, steps, k),
                                            progress=progress and steps >= 200)
            chunks, total = out[name]
            chunks.append(images)
            out[name] = (chunks, total + seconds)
            bar.update(1)
    bar.close()
    return {name: (torch.cat(chunks), seconds) for name, (chunks, seconds) in out.items()}


def _sampling_speed(models: Dict[str, tuple], config: CompareConfig, progress: bool) -> Dict[str, dict]:
    """Seconds per denoising step of `DDPMPipeline` at ``sample_batch_size`` images: median over interleaved
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
            generator = torch.Generator().manual_seed(config.seed)
            start = time.perf_counter()
            pipes[name](batch_size=batch, generator=generator, num_inference_steps=k, output_type="pt")
            if r > 0:
                per_step[name].append((time.perf_counter() - start) / k)
            bar.update(1)
    bar.close()
    return {name: {"batch_size": batch, "steps_per_call": k, "rounds": config.speed_rounds,
                   "seconds_per_step_median": float(np.median(v)), "seconds_per_step": v,
                   "image_steps_per_s": batch / float(np.median(v))} for name, v in per_step.items()}


def _sample_seed(seed: int, steps: int, chunk: int) -> int:
    return (seed * 1_000_003 + steps * 10_007 + chunk) % (2**63)


def _bits_per_dim(model, scheduler, heldout: torch.Tensor, config: CompareConfig, progress: bool) -> dict:
    sched = _bpd_scheduler(scheduler)
    result = estimate_bits_per_dim(
        model, sched, heldout, num_timesteps_sampled=config.bpd_timesteps_sampled, num_levels=DIGITS_NUM_LEVELS,
        batch_size=config.bpd_batch_size, generator=torch.Generator().manual_seed(config.seed + 1), progress=progress)
    out = {
        "method": "stratified unbiased estimate of the full-chain bound",
        "bits_per_dim": result.mean,
        "standard_error": result.mean_standard_error,
        "standard_error_kind": "Monte-Carlo error of the estimate for these images",
        "num_images": int(heldout.shape[0]),
        "network_calls_per_image": int(result.timesteps_per_image),
        "exact": None,
    }
    if config.bpd_exact_images:
        subset = heldout[: config.bpd_exact_images]
        exact = bits_per_dim(model, sched, subset, num_levels=DIGITS_NUM_LEVELS, batch_size=config.bpd_batch_size,
                             generator=torch.Generator().manual_seed(config.seed + 2), progress=progress)
        out["exact"] = {"bits_per_dim": exact.mean, "standard_error": exact.standard_error,
                        "standard_error_kind": "spread over images / sqrt(N)", "num_images": int(subset.shape[0]),
                        "decoder_bpd": float(exact.decoder_bpd.mean()), "prior_bpd": float(exact.prior_bpd.mean())}
    return out


_QUALITY_KEYS = ("fd", "kid_mean", "kid_std", "precision", "recall", "mode_coverage", "class_kl_uniform",
                 "n_generated", "n_reference")


def _quality(images, reference, extractor, seed: int) -> dict:
    from .metrics import sample_quality

    q = sample_quality(images, reference, extractor=extractor, seed=seed)
    return {k: q.get(k) for k in _QUALITY_KEYS} | {"extractor": q.get("extractor"),
                                                  "extractor_heldout_accuracy": q.get("extractor_heldout_accuracy")}


def _model_name(model) -> str:
    return f"{type(model).__module__.split('.')[0]}.{type(model).__name__}"


# ----------------------------------------------------------------------------------------------------
# The whole comparison
# ----------------------------------------------------------------------------------------------------


def run_comparison(config: CompareConfig, output_dir: Optional[str] = None, extractor=None, progress: bool = True,
                   command: Optional[str] = None) -> dict:
    """Run the comparison; returns the report dict (and writes it with :func:`write_report` if ``output_dir``).

    Args:
        config: the budget and settings.
        output_dir: where ``report.md``, ``report.json`` and the PNGs go (None: write nothing).
        extractor: feature extractor for the sample metrics (default: the digits classifier).
        progress: tqdm bars.
        command: the command line to record in the report.
    """
    config.validate()
    wall_start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    try:
        report = _run(config, extractor, progress)
    finally:
        torch.set_num_threads(previous_threads)
    report["wall_seconds"] = time.perf_counter() - wall_start
    report["command"] = command
    if output_dir is not None:
        write_report(report, output_dir, images=report.pop("_images"))
    else:
        report.pop("_images")
    return report


def _load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _run(config: CompareConfig, extractor, progress: bool) -> dict:
    import diffusers

    env = {
        "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_start": _load_average(),
    }
    dataset = load_training_dataset(resolution=config.resolution)
    train_images = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])  # (N, C, R, R)
    heldout, _ = load_heldout_digits(resolution=config.resolution)  # (300, C, R, R)
    in_channels = train_images.shape[1]
    shape = tuple(train_images.shape[1:])

    logger.info("building models")
    models = build_recipe_models(config)
    if in_channels != models[config.recipes[0]][0].config.in_channels:
        raise ValueError("the UNet's in_channels must be 1 for the built-in digits")
    recipes_out: Dict[str, dict] = {}
    first_batch = next(_batch_stream(train_images, config.batch_size, config.seed))
    for name, (model, scheduler) in tqdm(models.items(), desc="params / FLOPs / memory", disable=not progress):
        recipe = RECIPES[name]
        recipes_out[name] = {
            "label": recipe.label,
            "model_class": _model_name(model),
            "scheduler_class": _model_name(scheduler),
            "beta_schedule": recipe.beta_schedule,
            "variance_type": recipe.variance_type,
            "prediction_type": recipe.prediction_type,
            "loss": "F.mse_loss(eps_pred, eps)" if recipe.loss_type == "mse" else f"diffusion_loss({recipe.loss_type})",
            "out_channels": int(model.config.out_channels),
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "flops_per_image": count_flops(model, (1, *shape)),
            "train_memory": _train_memory(name, model, scheduler, first_batch, config),
            "sample_memory": _sample_memory(model, scheduler, config.sample_batch_size, shape),
        }
        model.train()

    logger.info("training %s", ", ".join(models))
    training = train_recipes(models, train_images, config, progress)
    for name, rec in training.items():
        tail = max(1, len(rec["mses"]) // 10)
        recipes_out[name]["training"] = {
            "steps": rec["steps"], "images_seen": rec["images_seen"], "train_seconds": rec["train_seconds"],
            "step_time_median_s": rec["step_time_median_s"], "train_img_per_s": rec["train_img_per_s"],
            "final_loss": float(np.mean(rec["losses"][-tail:])), "final_mse": float(np.mean(rec["mses"][-tail:])),
            "final_window": tail,
        }
        recipes_out[name]["loss_curve"] = {"loss": rec["losses"], "mse": rec["mses"]}
        recipes_out[name]["step_times"] = rec["step_times"]

    logger.info("held-out bits/dim")
    bpd_images = heldout[: config.bpd_num_images]
    for name, (model, scheduler) in models.items():
        recipes_out[name]["bits_per_dim"] = _bits_per_dim(model, scheduler, bpd_images, config, progress)

    if extractor is None:
        from .metrics import load_digits_classifier

        extractor = load_digits_classifier(seed=config.seed)
    speed = _sampling_speed(models, config, progress)
    for name, sp in speed.items():
        recipes_out[name]["sampling_speed"] = sp
    images_out: Dict[str, Dict[int, torch.Tensor]] = {name: {} for name in models}
    reference_rows = {}
    for steps, n in zip(config.sample_steps, config.num_samples):
        sampled = _sample_interleaved(models, steps, n, config, progress)
        for name, (images, seconds) in sampled.items():
            images_out[name][steps] = images[: config.grid_images]
            recipes_out[name].setdefault("samples", {})[str(steps)] = {
                "num_images": int(images.shape[0]), "wall_seconds": seconds,
                "img_per_s_wall": images.shape[0] / seconds,
                # From the interleaved benchmark: batch / (steps x median seconds per denoising step).
                "img_per_s": speed[name]["image_steps_per_s"] / steps,
                "quality": _quality(images, heldout, extractor, config.seed),
            }
        if n not in reference_rows:
            # Real training digits scored like samples: the floor that finite sample counts allow.
            g = torch.Generator().manual_seed(config.seed + n)
            idx = torch.randperm(len(train_images), generator=g)[:n]
            reference_rows[n] = _quality(train_images[idx], heldout, extractor, config.seed)
    env["load_average_end"] = _load_average()

    report = {
        "config": config.to_dict(),
        "environment": env,
        "data": {"train_images": int(train_images.shape[0]), "heldout_images": int(heldout.shape[0]),
                 "resolution": config.resolution, "num_levels": DIGITS_NUM_LEVELS},
        "baseline": config.recipes[0],
        "recipes": recipes_out,
        "real_data_reference": {str(n): row for n, row in reference_rows.items()},
        "_images": images_out,
    }
    report["comparisons"] = _comparisons(report)
    report["verdict"] = _verdict(report)
    return report


# ----------------------------------------------------------------------------------------------------
# Derived figures and the verdict
# ----------------------------------------------------------------------------------------------------


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def _comparisons(report: dict) -> dict:
    base = report["baseline"]
    recipes = report["recipes"]
    b = recipes[base]
    out = {"ratios_vs_baseline": {}}
    for name, r in recipes.items():
        out["ratios_vs_baseline"][name] = {
            "parameters": _ratio(r["parameters"], b["parameters"]),
            "flops_per_image": _ratio(r["flops_per_image"], b["flops_per_image"]),
            "train_img_per_s": _ratio(r["training"]["train_img_per_s"], b["training"]["train_img_per_s"]),
            "peak_train_memory": _ratio(r["train_memory"]["peak_bytes"], b["train_memory"]["peak_bytes"]),
            "peak_sample_memory": _ratio(r["sample_memory"]["peak_bytes"], b["sample_memory"]["peak_bytes"]),
            "sample_img_per_s": _ratio(r["sampling_speed"]["image_steps_per_s"], b["sampling_speed"]["image_steps_per_s"]),
        }
    if "diffusers" in recipes and "ours-same" in recipes:
        l1 = np.asarray(recipes["diffusers"]["loss_curve"]["loss"])
        l2 = np.asarray(recipes["ours-same"]["loss_curve"]["loss"])
        n = min(len(l1), len(l2))
        rel = np.abs(l2[:n] - l1[:n]) / np.maximum(np.abs(l1[:n]), 1e-12)
        out["ours_same_vs_diffusers_loss"] = {
            "steps_compared": int(n),
            "max_rel_diff": float(rel.max()) if n else None,
            "mean_rel_diff": float(rel.mean()) if n else None,
            "max_rel_diff_first_10_steps": float(rel[:10].max()) if n else None,
            "near_identical": bool(n and rel.mean() < 0.02),
        }
    return out


def _speed_word(ratio: Optional[float], tol: float = 0.05) -> str:
    if ratio is None:
        return "not measured"
    if ratio > 1 + tol:
        return f"{ratio:.2f}x (faster)"
    if ratio < 1 - tol:
        return f"{ratio:.2f}x (slower)"
    return f"{ratio:.2f}x (tie within ±{tol:.0%})"


def _verdict(report: dict) -> List[str]:
    """Plain sentences computed from the numbers (ties within ±5% for speed, 2 standard errors for bits/dim)."""
    recipes, base = report["recipes"], report["baseline"]
    ratios = report["comparisons"]["ratios_vs_baseline"]
    lines = []
    b_bpd = recipes[base]["bits_per_dim"]
    for name in recipes:
        if name == base:
            continue
        r = ratios[name]
        lines.append(
            f"{name} vs {base}: training throughput {_speed_word(r['train_img_per_s'])}; sampling throughput "
            f"{_speed_word(r['sample_img_per_s'])}"
            + (f"; peak training memory {r['peak_train_memory']:.2f}x" if r["peak_train_memory"] else "")
            + (f", peak sampling memory {r['peak_sample_memory']:.2f}x" if r["peak_sample_memory"] else "")
            + "."
        )
        bpd = recipes[name]["bits_per_dim"]
        diff = bpd["bits_per_dim"] - b_bpd["bits_per_dim"]
        se = math.hypot(bpd["standard_error"], b_bpd["standard_error"])
        word = "tie" if abs(diff) <= 2 * se else ("better (lower)" if diff < 0 else "worse (higher)")
        lines.append(f"{name} held-out bits/dim {bpd['bits_per_dim']:.3f} vs {b_bpd['bits_per_dim']:.3f}: {word} "
                     f"(difference {diff:+.3f} ± {se:.3f}, Monte-Carlo error).")
        fd_parts = []
        for s, q in recipes[name]["samples"].items():
            qb = recipes[base]["samples"][s]["quality"]
            fd_parts.append(f"{q['quality']['fd']:.2f} vs {qb['fd']:.2f} at {s} steps (n={q['num_images']})")
        lines.append(f"{name} Fréchet distance (lower is better): " + "; ".join(fd_parts) + ".")
    cmp_loss = report["comparisons"].get("ours_same_vs_diffusers_loss")
    if cmp_loss:
        lines.append(
            "ours-same and diffusers loss curves are "
            + ("near-identical" if cmp_loss["near_identical"] else "NOT near-identical")
            + f" (mean relative difference {cmp_loss['mean_rel_diff']:.2e}, max {cmp_loss['max_rel_diff']:.2e} over "
            f"{cmp_loss['steps_compared']} steps; first 10 steps max {cmp_loss['max_rel_diff_first_10_steps']:.1e})."
        )
    return lines


# ----------------------------------------------------------------------------------------------------
# Writing: PNGs, report.md, report.json
# ----------------------------------------------------------------------------------------------------


def _image_grid(images: torch.Tensor, ncol: int = 8, scale: int = 4, padding: int = 1) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (rows, cols[, 3]) grid with white padding, nearest-upscaled."""
    x = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, C) in [0, 1]
    n, h, w, c = x.shape
    ncol = min(ncol, max(n, 1))
    nrow = math.ceil(n / ncol)
    grid = np.ones((nrow * (h + padding) + padding, ncol * (w + padding) + padding, c), dtype=np.float32)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[padding + r * (h + padding):padding + r * (h + padding) + h,
             padding + q * (w + padding):padding + q * (w + padding) + w] = x[i]
    pixels = (grid * 255).round().astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
    return pixels[..., 0] if c == 1 else pixels


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(v) < window:
        return v
    return np.convolve(v, np.ones(window) / window, mode="valid")


def _plot_losses(report: dict, path: str) -> None:
    recipes = report["recipes"]
    fig = _figure(11, 4)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, r in recipes.items():
        mse = r["loss_curve"]["mse"]
        window = max(1, len(mse) // 30)
        steps = np.arange(1, len(mse) + 1)[window - 1:]
        ax1.plot(steps, _smooth(mse, window), label=f"{name}", lw=2.5 if name == "diffusers" else 1.5,
                 ls="--" if name == "ours-same" else "-")
        loss = r["loss_curve"]["loss"]
        if not np.allclose(loss, mse):
            ax1.plot(steps, _smooth(loss, window), label=f"{name} (total hybrid loss)", lw=1.0, alpha=0.6)
    ax1.set_yscale("log")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("ε-MSE (moving average)")
    ax1.set_title("training ε-MSE (moving average)\ncosine and linear β weight the timesteps differently", fontsize=10)
    ax1.legend(fontsize=8)
    if "diffusers" in recipes and "ours-same" in recipes:
        l1 = np.asarray(recipes["diffusers"]["loss_curve"]["loss"])
        l2 = np.asarray(recipes["ours-same"]["loss_curve"]["loss"])
        n = min(len(l1), len(l2))
        rel = np.abs(l2[:n] - l1[:n]) / np.maximum(np.abs(l1[:n]), 1e-12)
        steps = np.arange(1, n + 1)
        nonzero = rel > 0
        ax2.semilogy(steps[nonzero], rel[nonzero], ".", ms=3)
        ax2.set_title(f"ours-same vs diffusers: relative loss difference\n({int((~nonzero).sum())} of {n} steps "
                      "exactly equal, not shown)", fontsize=10)
        ax2.set_xlabel("optimizer step")
        ax2.set_ylabel("relative difference")
    else:
        ax2.axis("off")
    fig.tight_layout()
    fig.savefig(path, format="png")


def _plot_ratios(report: dict, path: str) -> None:
    base = report["baseline"]
    ratios = report["comparisons"]["ratios_vs_baseline"]
    names = [n for n in report["recipes"] if n != base]
    keys = [k for k in ratios[base] if ratios[base][k] is not None]
    fig = _figure(11, 4.2)
    ax = fig.add_subplot(1, 2, 1)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = [ratios[name].get(k) or 0.0 for k in keys]
        ax.bar(np.arange(len(keys)) + i * width, values, width, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(keys)) + width * (len(names) - 1) / 2)
    ax.set_xticklabels([k.replace("_", " ") for k in keys], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(f"ratio to {base}")
    ax.set_title(f"relative to {base} (throughput: higher is better; memory: lower)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax2 = fig.add_subplot(1, 2, 2)
    for name, r in report["recipes"].items():
        steps = [int(s) for s in r["samples"]]
        ax2.plot(steps, [r["samples"][str(s)]["quality"]["fd"] for s in steps], label=name,
                 marker="x" if name == "ours-same" else "o", ls="--" if name == "ours-same" else "-",
                 lw=2.5 if name == "diffusers" else 1.5)
    for n, row in report["real_data_reference"].items():
        ax2.axhline(row["fd"], color="gray", ls=":", lw=1)
        ax2.annotate(f"real digits, n={n}", (0.01, row["fd"]), xycoords=("axes fraction", "data"), fontsize=7,
                     color="gray", va="bottom")
    ax2.set_xscale("log")
    ax2.set_xlabel("sampling steps")
    ax2.set_ylabel("Fréchet distance (classifier features)")
    ax2.set_title("sample quality vs sampling steps (n per point in report.md)", fontsize=10)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _fmt(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, float) and (abs(x) >= 1e4 or (0 < abs(x) < 1e-3)):
        return f"{x:.2e}"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _mib(b):
    return "–" if b is None else f"{b / MIB:.1f}"


def readme_table(report: dict) -> str:
    """The compact markdown table the README quotes (one row per recipe)."""
    rows = ["| recipe | params | fwd GFLOPs/img | train img/s | peak train MiB | sample img/s (50 steps) | "
            "held-out bits/dim | " + " | ".join(f"FD @{s} (n)" for s in report["recipes"][report["baseline"]]["samples"])
            + " |"]
    rows.append("|" + "---|" * (7 + len(report["recipes"][report["baseline"]]["samples"])))
    for name, r in report["recipes"].items():
        bpd = r["bits_per_dim"]
        s50 = r["samples"].get("50")
        cells = [f"`{name}`", f"{r['parameters']:,}", f"{r['flops_per_image'] / 1e9:.3f}",
                 f"{r['training']['train_img_per_s']:.0f}", _mib(r["train_memory"]["peak_bytes"]),
                 f"{s50['img_per_s']:.1f}" if s50 else "–",
                 f"{bpd['bits_per_dim']:.3f} ± {bpd['standard_error']:.3f}"]
        cells += [f"{q['quality']['fd']:.2f} ({q['num_images']})" for q in r["samples"].values()]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _markdown(report: dict, files: Dict[str, Any]) -> str:
    cfg, env, recipes, base = report["config"], report["environment"], report["recipes"], report["baseline"]
    names = list(recipes)
    ratios = report["comparisons"]["ratios_vs_baseline"]
    lines = ["# diffusers UNet2DModel vs diffusers-ddpm-ext: side-by-side comparison", ""]
    if report.get("command"):
        lines += ["Produced by:", "", "```bash", report["command"], "```", ""]
    train_steps = {n: recipes[n]["training"]["steps"] for n in names}
    lines += [
        f"Built-in digits ({report['data']['train_images']} training / {report['data']['heldout_images']} held-out "
        f"images, 8×8 upsampled to {cfg['resolution']}×{cfg['resolution']}, {report['data']['num_levels']} grey "
        f"levels), `{cfg['preset']}` layout{' with overrides ' + json.dumps(cfg['unet_overrides']) if cfg['unet_overrides'] else ''}. "
        f"Every recipe: same initial weights (where shapes allow), same batches in the same order, same noise and "
        f"timestep draws, AdamW (lr {cfg['learning_rate']}, betas ({cfg['adam_beta1']}, {cfg['adam_beta2']}), "
        f"weight decay {cfg['adam_weight_decay']}), `{cfg['lr_scheduler']}` LR schedule with {cfg['lr_warmup_steps']} "
        f"warm-up steps, gradient clipping {cfg['max_grad_norm']}, EMA (max decay {cfg['ema_max_decay']}, power "
        f"{cfg['ema_power']}; samples and bits/dim use the EMA weights), batch {cfg['batch_size']}, "
        + (f"wall-clock budget {cfg['budget_seconds']} s per recipe → steps {train_steps}"
           if cfg["budget_seconds"] else f"{cfg['max_train_steps']} optimizer steps "
           f"({cfg['max_train_steps'] * cfg['batch_size']:,} images) each") + ", T = "
        f"{cfg['num_train_timesteps']}, seed {cfg['seed']}.",
        "",
        f"Machine: {env['cpu_count']} CPU cores, torch {env['torch']} with {env['torch_threads']} threads, diffusers "
        f"{env['diffusers']}, Python {env['python']}; load average at start {env['load_average_start']}, at end "
        f"{env['load_average_end']} (other processes were running if these exceed the core count; timings are "
        f"interleaved so all recipes see the same load). Total wall time {report.get('wall_seconds', 0):.0f} s.",
        "",
        "## Recipes", "",
    ]
    for n in names:
        r = recipes[n]
        lines.append(f"- **{n}**: {r['label']} — `{r['model_class']}` + `{r['scheduler_class']}`, β "
                     f"`{r['beta_schedule']}`, variance `{r['variance_type']}`, loss `{r['loss']}`, out_channels "
                     f"{r['out_channels']}.")
    lines += ["", "## Summary", "", readme_table(report), "", "## All figures", ""]
    header = "| | " + " | ".join(f"`{n}`" for n in names) + " |"
    lines += [header, "|---|" + "---|" * len(names)]

    def row(label, values):
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    row("parameters", [f"{recipes[n]['parameters']:,}" for n in names])
    row("forward FLOPs / image", [f"{recipes[n]['flops_per_image'] / 1e6:.2f} M" for n in names])
    row("training steps (images)", [f"{recipes[n]['training']['steps']} ({recipes[n]['training']['images_seen']:,})"
                                    for n in names])
    row("training throughput, img/s (median step)",
        [f"{recipes[n]['training']['train_img_per_s']:.1f} ({ratios[n]['train_img_per_s']:.2f}×)" for n in names])
    row("training time, s (sum of steps)", [f"{recipes[n]['training']['train_seconds']:.1f}" for n in names])
    row(f"peak training memory, MiB (batch {cfg['batch_size']})",
        [f"{_mib(recipes[n]['train_memory']['peak_bytes'])} (step adds {_mib(recipes[n]['train_memory']['step_extra_bytes'])})"
         for n in names])
    row(f"peak sampling memory, MiB (batch {cfg['sample_batch_size']})",
        [_mib(recipes[n]["sample_memory"]["peak_bytes"]) for n in names])
    for s in recipes[base]["samples"]:
        row(f"sampling throughput @{s} steps, img/s",
            [f"{recipes[n]['samples'][s]['img_per_s']:.2f} ({ratios[n]['sample_img_per_s']:.2f}×)" for n in names])
    row(f"final ε-MSE (mean of last {recipes[base]['training']['final_window']} steps)",
        [f"{recipes[n]['training']['final_mse']:.4f}" for n in names])
    row("final training loss (objective)", [f"{recipes[n]['training']['final_loss']:.4f}" for n in names])
    bpd0 = recipes[base]["bits_per_dim"]
    row(f"held-out bits/dim (estimate, {bpd0['num_images']} images × {bpd0['network_calls_per_image']} calls) ± MC s.e.",
        [f"{recipes[n]['bits_per_dim']['bits_per_dim']:.3f} ± {recipes[n]['bits_per_dim']['standard_error']:.3f}"
         for n in names])
    if bpd0.get("exact"):
        row(f"held-out bits/dim, exact ({bpd0['exact']['num_images']} images) ± s.e.",
            [f"{recipes[n]['bits_per_dim']['exact']['bits_per_dim']:.3f} ± "
             f"{recipes[n]['bits_per_dim']['exact']['standard_error']:.3f}" for n in names])
    for s in recipes[base]["samples"]:
        q = {n: recipes[n]["samples"][s]["quality"] for n in names}
        ns = recipes[base]["samples"][s]["num_images"]
        row(f"FD @{s} steps (n={ns})", [f"{q[n]['fd']:.3f}" for n in names])
        row(f"KID @{s} steps (n={ns})", [f"{q[n]['kid_mean']:.4f} ± {q[n]['kid_std']:.4f}" for n in names])
        row(f"precision / recall @{s} steps (n={ns})", [f"{q[n]['precision']:.3f} / {q[n]['recall']:.3f}" for n in names])
        row(f"mode coverage @{s} steps (n={ns})", [_fmt(q[n]["mode_coverage"], 2) for n in names])
    lines += ["", "ε-MSE values of recipes with different β schedules are not comparable (the schedules weight the "
              "timesteps differently); bits/dim and the sample metrics are.", "",
              "Real training digits scored the same way against the held-out digits (the best a model can do "
              "with this many samples):", "", "| n | FD | KID | precision / recall | mode coverage |",
              "|---|---|---|---|---|"]
    for n, q in report["real_data_reference"].items():
        lines.append(f"| {n} | {q['fd']:.3f} | {q['kid_mean']:.4f} ± {q['kid_std']:.4f} | {q['precision']:.3f} / "
                     f"{q['recall']:.3f} | {_fmt(q['mode_coverage'], 2)} |")
    lines += ["", "## Verdict (computed from the numbers above)", ""] + [f"- {v}" for v in report["verdict"]]
    lines += ["", "## Plots", "", f"![loss curves]({files['loss_curves']})", "", f"![ratios]({files['ratios']})", "",
              "## Samples (EMA weights, same seeds for every recipe)", ""]
    lines.append("| steps | " + " | ".join(f"`{n}`" for n in names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for s in recipes[base]["samples"]:
        lines.append(f"| {s} | " + " | ".join(f"![{n} {s}]({files['grids'].get(n, {}).get(s, '')})" for n in names)
                     + " |")
    q0 = recipes[base]["samples"][next(iter(recipes[base]["samples"]))]["quality"]
    lines += [
        "", "## How it is measured", "",
        "- **FLOPs**: `torch.utils.flop_counter.FlopCounterMode` on one image, 2 per multiply-add of convolutions, "
        "matmuls and attention (CPU SDPA registered); norms and elementwise ops are not counted.",
        "- **Training throughput**: batch / median wall time of an optimizer step (forward, loss, backward, clipping, "
        "AdamW, LR schedule, EMA). The recipes' steps are interleaved (order rotating every step) so background "
        "load affects all alike; absolute numbers depend on the machine and its load, ratios are more stable.",
        "- **Peak memory**: high-water mark of tensor bytes held by torch's CPU allocator, from `torch.profiler` "
        "allocation events (`profile_memory=True`): bytes live before the step (parameters, buffers, AdamW state, "
        "EMA copy; for sampling parameters and buffers) plus the peak the step allocates on top. Allocator caching, "
        "fragmentation and the Python heap are not included (it is not RSS).",
        f"- **Sampling throughput**: `diffusers.DDPMPipeline` at batch {cfg['sample_batch_size']}: batch / (steps × "
        f"median seconds per denoising step), the median over {cfg['speed_rounds']} interleaved rounds of "
        f"{cfg['speed_steps_per_call']}-step calls (network + scheduler step). The wall times of the actual sampling "
        "runs are in report.json (`wall_seconds`).",
        "- **Bits/dim**: `estimate_bits_per_dim`, the stratified unbiased estimate of the full-chain variational bound "
        f"({bpd0['network_calls_per_image']} network calls per image) on {bpd0['num_images']} held-out digits with 17 "
        "grey levels; ± is its Monte-Carlo standard error. The diffusers recipe is evaluated through "
        "`GaussianDiffusionScheduler.from_config(DDPMScheduler.config)` (same β and fixed_small variance)."
        + (f" The exact bound (all T terms) is also given on {bpd0['exact']['num_images']} images." if bpd0.get("exact") else ""),
        f"- **Sample quality**: extractor `{q0['extractor']}` (held-out accuracy "
        f"{_fmt(q0['extractor_heldout_accuracy'], 3)}); FD, KID (subsets), k-NN precision/recall (k=3) and mode "
        f"coverage against the {q0['n_reference']} held-out digits. With few samples FD is biased upwards: compare "
        "recipes at the same n, and with the real-data row.",
        "- Same seed and thread count reproduce every number except timings.",
        "",
    ]
    return "\n".join(lines)


def _to_jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_report(report: dict, output_dir: str, images: Optional[Dict[str, Dict[int, torch.Tensor]]] = None) -> dict:
    """Write ``report.md``, ``report.json``, ``loss_curves.png``, ``ratios.png`` and one sample grid per
    recipe × step count (``samples_<recipe>_<steps>.png``) into ``output_dir``. Returns the file map."""
    from PIL import Image

    os.makedirs(output_dir, exist_ok=True)
    files = {"loss_curves": "loss_curves.png", "ratios": "ratios.png", "grids": {}}
    _plot_losses(report, os.path.join(output_dir, files["loss_curves"]))
    _plot_ratios(report, os.path.join(output_dir, files["ratios"]))
    for name, by_steps in (images or {}).items():
        files["grids"][name] = {}
        for steps, imgs in by_steps.items():
            fname = f"samples_{name}_{steps}steps.png"
            Image.fromarray(_image_grid(imgs)).save(os.path.join(output_dir, fname))
            files["grids"][name][str(steps)] = fname
    report["files"] = files
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write(_markdown(report, files))
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(_to_jsonable(report), f, indent=1)
    return files
