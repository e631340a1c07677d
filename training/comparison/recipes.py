"""Recipes and the run's configuration: what each contestant is, and the budget they all share.

A recipe is a set of ``training/train.py`` flags (the objective, optimiser and EMA settings that differ between
contestants); everything that must be equal for a fair comparison (data, order, noise, architecture, steps,
batch, warm-up, seed) is the :class:`CompareConfig`'s and shared by all. The built-in ``diffusers`` recipe is
diffusers' ``train_unconditional.py``: its `UNet2DModel` (converted from the same architecture), `DDPMScheduler`
(linear β, ε, fixed_small), plain ``F.mse_loss`` on the noise, its default learning rate 1e-4 and EMA.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shlex
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from diffusers_ddpm_ext.trainer import TrainConfig

# train.py flags a recipe may set; the rest (data, architecture, budget, seed) is shared by every recipe.
RECIPE_FLAGS = (
    "model_type", "ddpm_beta_schedule", "ddpm_max_beta", "variance_type", "prediction_type", "loss_type", "snr_gamma",
    "timestep_sampler", "learning_rate", "lr_scheduler", "adam_beta1", "adam_beta2", "adam_weight_decay",
    "adam_epsilon", "max_grad_norm", "use_ema", "ema_inv_gamma", "ema_power", "ema_max_decay", "nan_policy",
)
DIFFUSERS_LEARNING_RATE = 1e-4  # train_unconditional.py's default


@dataclass(frozen=True)
class Recipe:
    """One contestant.

    Args:
        name: short key used in reports.
        flags: ``training/train.py`` flags of :data:`RECIPE_FLAGS`, e.g. ``"--ddpm_beta_schedule linear
            --loss_type kl"``.
        label: human-readable description (default: the flags).
        diffusers: diffusers' own training recipe: `DDPMScheduler` and ``F.mse_loss(ε̂, ε)`` instead of ours
            (needs ``--model_type unet2d --variance_type fixed_small --loss_type simple``).
    """

    name: str
    flags: str = ""
    label: str = ""
    diffusers: bool = False


RECIPES: Dict[str, Recipe] = {r.name: r for r in (
    Recipe("diffusers", f"--model_type unet2d --ddpm_beta_schedule linear --variance_type fixed_small "
           f"--loss_type simple --learning_rate {DIFFUSERS_LEARNING_RATE:g}",
           "diffusers UNet2DModel + DDPMScheduler, train_unconditional.py recipe (linear β, fixed_small, ε-MSE, "
           "lr 1e-4)", diffusers=True),
    Recipe("ours-same", f"--ddpm_beta_schedule linear --variance_type fixed_small --loss_type simple "
           f"--learning_rate {DIFFUSERS_LEARNING_RATE:g}", "ours, identical architecture, weights and objective"),
    Recipe("ours-improved", "", "ours, train.py defaults: cosine β clipped at 0.5, learned_range variance, hybrid loss, "
           "lr 2e-3"),
    Recipe("ours-hybrid-linear", "--ddpm_beta_schedule linear",
           "ours with learned_range + hybrid loss on the linear schedule"),
)}


def _train_script():
    """``training/train.py`` as a module (its flag parser is the vocabulary of recipes)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
    spec = importlib.util.spec_from_file_location("_ddpm_ext_train_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_PARSER: Optional[argparse.ArgumentParser] = None


def _parser() -> argparse.ArgumentParser:
    global _PARSER
    if _PARSER is None:
        _PARSER = _train_script().build_parser()
    return _PARSER


def parse_recipe(spec: str) -> Recipe:
    """``name=--flags ...`` (the ``--recipe`` flag) or a built-in name, checked now."""
    if "=" not in spec:
        if spec not in RECIPES:
            raise ValueError(f"recipe {spec!r} is unknown: give one of {list(RECIPES)} or name=\"--train.py flags\"")
        return RECIPES[spec]
    name, flags = spec.split("=", 1)
    name = name.strip()
    if not name or any(c.isspace() or c in "/\\" for c in name):
        raise ValueError(f"recipe name {name!r} must be non-empty, without spaces or slashes")
    recipe = Recipe(name, flags.strip(), flags.strip() or "train.py defaults")
    recipe_settings(recipe)
    return recipe


def recipe_settings(recipe: Recipe) -> SimpleNamespace:
    """The recipe's flags parsed by train.py's parser: ``model_type``, ``beta_schedule``, ``variance_type``,
    ``prediction_type``, ``max_beta`` and the train.py flag namespace ``flags``.

    Raises:
        ValueError: a flag that is not a recipe's (naming it and the allowed ones) or a bad value.
    """
    tokens = shlex.split(recipe.flags)
    parser = _parser()
    actions = parser._option_string_actions
    for token in tokens:
        if token.startswith("--"):
            action = actions.get(token.split("=", 1)[0])
            if action is None or action.dest not in RECIPE_FLAGS:
                allowed = ", ".join(f"--{f}" for f in RECIPE_FLAGS)
                raise ValueError(f"recipe {recipe.name!r}: {token} is not a recipe flag (data, architecture, budget "
                                 f"and seed are shared by all recipes: set them on compare.py); allowed: {allowed}")
    try:
        flags = parser.parse_args(tokens)
    except SystemExit:
        raise ValueError(f"recipe {recipe.name!r}: cannot parse {recipe.flags!r} as train.py flags") from None
    if flags.ddpm_max_beta is not None:
        from diffusers_ddpm_ext.build import check_max_beta

        try:
            check_max_beta(flags.ddpm_max_beta)
        except ValueError as exc:
            raise ValueError(f"recipe {recipe.name!r}: {exc}") from None
    if flags.max_grad_norm == 0:
        flags.max_grad_norm = None
    if recipe.diffusers and (flags.model_type, flags.variance_type, flags.loss_type) != ("unet2d", "fixed_small",
                                                                                          "simple"):
        raise ValueError(f"recipe {recipe.name!r} trains as diffusers does and needs --model_type unet2d "
                         f"--variance_type fixed_small --loss_type simple")
    return SimpleNamespace(model_type=flags.model_type, beta_schedule=flags.ddpm_beta_schedule,
                           variance_type=flags.variance_type, prediction_type=flags.prediction_type,
                           max_beta=flags.ddpm_max_beta, flags=flags)


def recipe_learning_rate(flags, config: "CompareConfig") -> float:
    """The recipe's ``--learning_rate``, or (as train.py) the shared architecture's recommended rate."""
    if flags.learning_rate is not None:
        return flags.learning_rate
    from diffusers_ddpm_ext.build import default_learning_rate

    shared = SimpleNamespace(**vars(flags))
    shared.unet_preset, shared.unet_config = (None, config.unet_config) if config.unet_config else (config.preset, None)
    return default_learning_rate(shared)


def train_config(recipe: Recipe, config: "CompareConfig", steps: int, num_levels: int) -> TrainConfig:
    """The recipe's :class:`TrainConfig` with the shared budget (warm-up, seed) and no periodic work."""
    settings = recipe_settings(recipe)
    settings.flags.learning_rate = recipe_learning_rate(settings.flags, config)
    return TrainConfig.from_flags(settings.flags, seed=config.seed, lr_warmup_steps=min(config.lr_warmup_steps, steps),
                                  num_levels=num_levels, checkpointing_steps=None, save_images_epochs=None,
                                  eval_every=None, debug_nan_at_step=None, debug_interrupt_after_step=None)


def diffusers_mse(model_output, x0, noise, timesteps, noisy):
    """train_unconditional.py's loss, ``F.mse_loss(ε̂, ε)`` (one mean over everything), as a Trainer ``loss_fn``."""
    per_example = (model_output - noise).pow(2).mean(dim=(1, 2, 3)).detach()  # (B,) for the timestep sampler
    return SimpleNamespace(loss=F.mse_loss(model_output, noise), unweighted_loss=per_example, mse=per_example)


# ----------------------------------------------------------------------------------------------------
# The shared configuration
# ----------------------------------------------------------------------------------------------------


@dataclass
class CompareConfig:
    """Everything recipes share, and what is measured (the defaults are the full mode; see :func:`quick_config`).

    Args:
        recipes: :class:`Recipe` objects or built-in names; the first is the baseline of the ratios.
        preset / unet_config: the shared architecture (a preset name, or a JSON UNet config as train.py's
            ``--unet_config``); ``unet_overrides`` replaces config keys (e.g. a tiny model in tests).
        dataset_name, train_data_dir, image_column, validation_size, validation_split_seed, center_crop,
            random_flip: the data, as train.py's flags; neither source = the built-in digits.
        max_train_images: load at most this many training images (None: all).
        resolution: image side (None: the UNet's sample_size).
        num_train_timesteps: T.
        max_train_steps: optimizer steps per recipe (the budget), or the cap with ``budget_seconds``.
        budget_seconds: wall-clock budget per recipe instead (calibrated from ``calibration_steps``).
        batch_size, lr_warmup_steps: shared by every recipe.
        sample_steps, num_samples: sampling step counts and images generated at each.
        sample_batch_size, grid_images: images per pipeline call; images in each sample grid.
        bpd_num_images, bpd_timesteps_sampled, bpd_exact_images, bpd_batch_size: held-out bits/dim (estimate on
            that many images with that many calls each; optionally the exact bound on a subset).
        fd_bootstrap: resamples of the FD standard error.
        feature_extractor: ``"auto"`` (digits classifier for the digits, DINOv2 otherwise), an encoder id or
            folder, or ``"digits-classifier"``.
        measure_cost: FLOPs, memory and the sampling-speed benchmark (off in the ablation).
        calibration_steps, speed_rounds, speed_steps_per_call: budget calibration and sampling-speed benchmark.
        seed: weights, data order, noise, sampling and evaluation.
        num_threads: ``torch.set_num_threads`` for the run (None keeps torch's default).
        save_models: save each recipe's trained (EMA) UNet and scheduler under ``<output_dir>/models/<recipe>``.
    """

    recipes: tuple = ("diffusers", "ours-same", "ours-improved")
    preset: str = "digits-small"
    unet_config: Optional[str] = None
    unet_overrides: dict = field(default_factory=dict)
    dataset_name: Optional[str] = None
    train_data_dir: Optional[str] = None
    image_column: Optional[str] = None
    validation_size: Optional[float] = None
    validation_split_seed: int = 0
    center_crop: bool = True
    random_flip: bool = False
    max_train_images: Optional[int] = None
    resolution: Optional[int] = None
    num_train_timesteps: int = 1000
    max_train_steps: int = 3000
    budget_seconds: Optional[float] = None
    batch_size: int = 64
    lr_warmup_steps: int = 100
    sample_steps: tuple = (1000, 50, 25)
    num_samples: tuple = (300, 1000, 1000)
    sample_batch_size: int = 250
    grid_images: int = 64
    bpd_num_images: int = 300
    bpd_timesteps_sampled: int = 50
    bpd_exact_images: int = 10
    bpd_batch_size: int = 256
    fd_bootstrap: int = 20
    feature_extractor: str = "auto"
    measure_cost: bool = True
    calibration_steps: int = 5
    speed_rounds: int = 3
    speed_steps_per_call: int = 5
    seed: int = 0
    num_threads: Optional[int] = None
    save_models: bool = False

    def __post_init__(self):
        self.recipes = tuple(r if isinstance(r, Recipe) else parse_recipe(r) for r in self.recipes)

    @property
    def digits(self) -> bool:
        return self.dataset_name is None and self.train_data_dir is None

    def validate(self) -> None:
        """Raise a ValueError naming the first bad field."""
        from diffusers_ddpm_ext.unet import UNET_PRESETS

        names = [r.name for r in self.recipes]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"recipes must be non-empty with distinct names, got {names}")
        for recipe in self.recipes:
            recipe_settings(recipe)
        if self.unet_config is None and self.preset not in UNET_PRESETS:
            raise ValueError(f"preset {self.preset!r} is unknown; choose one of {sorted(UNET_PRESETS)}")
        if self.dataset_name is not None and self.train_data_dir is not None:
            raise ValueError("pass either dataset_name or train_data_dir, not both")
        for name in ("max_train_steps", "batch_size", "num_train_timesteps", "sample_batch_size", "bpd_num_images",
                     "calibration_steps", "speed_rounds", "speed_steps_per_call", "bpd_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("lr_warmup_steps", "bpd_exact_images", "grid_images", "fd_bootstrap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.budget_seconds is not None and not self.budget_seconds > 0:
            raise ValueError(f"budget_seconds must be > 0 or None, got {self.budget_seconds!r}")
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
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "recipes":
                value = [dataclasses.asdict(r) for r in value]
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def quick_config(**overrides) -> CompareConfig:
    """The ``--quick`` budget: under 10 minutes on 2 idle CPU cores for ``digits-small`` on the digits.

    300 steps at batch 64 per recipe (~13 epochs of the 1,497 training digits), 16 images at 1000 sampling
    steps, 200 at 50 and at 25 steps, bits/dim (both bounds) estimated from 30 network calls on each of 100
    held-out images.
    """
    base = dict(max_train_steps=300, lr_warmup_steps=30, sample_steps=(1000, 50, 25), num_samples=(16, 200, 200),
                sample_batch_size=200, grid_images=64, bpd_num_images=100, bpd_timesteps_sampled=30,
                bpd_exact_images=0, speed_rounds=5, speed_steps_per_call=2)
    base.update(overrides)
    return CompareConfig(**base)


# ----------------------------------------------------------------------------------------------------
# Models and schedulers
# ----------------------------------------------------------------------------------------------------


def base_unet_config(config: CompareConfig) -> dict:
    """The shared architecture (ours), before the recipes' output channels."""
    from diffusers_ddpm_ext.build import load_unet_config
    from diffusers_ddpm_ext.unet import UNET_PRESETS

    if config.unet_config is not None:
        base = load_unet_config(config.unet_config)
    else:
        base = dict(UNET_PRESETS[config.preset]["config"])
    base.update(config.unet_overrides)
    if config.resolution is not None:
        base["sample_size"] = config.resolution
    base.pop("out_channels", None)
    return base


def make_scheduler(recipe: Recipe, num_train_timesteps: int):
    """The recipe's scheduler: diffusers' `DDPMScheduler` for the diffusers recipe, else ours built from the same
    config (the path of a diffusers user switching schedulers)."""
    from diffusers import DDPMScheduler

    from diffusers_ddpm_ext.build import clipped_betas
    from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler

    s = recipe_settings(recipe)
    ddpm = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=s.beta_schedule,
                         variance_type=s.variance_type, prediction_type=s.prediction_type,
                         trained_betas=clipped_betas(num_train_timesteps, s.beta_schedule, s.max_beta))
    if recipe.diffusers:
        return ddpm
    return GaussianDiffusionScheduler.from_config(ddpm.config)


def build_recipe_models(config: CompareConfig) -> Dict[str, tuple]:
    """Initial ``(model, scheduler)`` per recipe, in training mode.

    Every recipe starts from the same seed: the shared architecture is built with ``torch.manual_seed(seed)``
    (C output channels, or 2C for a learned variance, so every layer but ``conv_out`` starts equal), and a
    ``--model_type unet2d`` recipe gets the ``to_unet2d()`` conversion of those very weights.
    """
    from diffusers_ddpm_ext.build import resolve_out_channels
    from diffusers_ddpm_ext.unet import DDPMUNet2DModel

    base = base_unet_config(config)
    in_channels = base.get("in_channels", 3)
    models = {}
    for recipe in config.recipes:
        s = recipe_settings(recipe)
        torch.manual_seed(config.seed)
        model = DDPMUNet2DModel(**base, out_channels=resolve_out_channels(in_channels, s.variance_type))
        if s.model_type == "unet2d":
            model = model.to_unet2d()
        models[recipe.name] = (model.train(), make_scheduler(recipe, config.num_train_timesteps))
    return models
