"""diffusers-ddpm-ext: a from-scratch DDPM UNet, a Gaussian-diffusion scheduler and pipelines for diffusers.

Importing the package imports eagerly only the modules a saved ``model_index.json`` can name
(``diffusers_ddpm_ext.unet``, ``.scheduler``, ``.pipelines``), so that ``DiffusionPipeline.from_pretrained(folder)``
finds our classes. Everything else (losses, likelihood, timestep samplers, data, metrics, Hub export, conversion,
presets, training and comparison helpers) is imported on first use through a module ``__getattr__`` (PEP 562):
``from diffusers_ddpm_ext import diffusion_loss`` and ``diffusers_ddpm_ext.hub`` work as before, but a plain import
costs little more than importing the diffusers classes it builds on (``benchmarks/bench_import.py``).
"""

import importlib

from .pipelines import ClassConditionalDDPMPipeline, GaussianDiffusionPipeline
from .scheduler import (
    GaussianDiffusionModelOutput,
    GaussianDiffusionScheduler,
    GaussianDiffusionSchedulerOutput,
    parse_respacing,
)
from .unet import DDPMUNet2DModel, DDPMUNet2DOutput

__version__ = "0.1.0"

# Public names defined in lazily imported modules: name -> modules to look in, first hit wins.
_LAZY_NAMES = {
    "bits_per_dim": ("likelihood",),
    "estimate_bits_per_dim": ("likelihood",),
    "diffusion_loss": ("losses",),
    "create_timestep_sampler": ("timestep_sampler",),
    "UNET_PRESETS": ("presets",),
    "Trainer": ("trainer",),
    "TrainConfig": ("trainer",),
    "evaluate_pipeline": ("evaluate",),
    "estimate_analytic_gamma": ("analytic",),
    "fit_analytic_variance": ("analytic",),
    "optimal_trajectory": ("analytic",),
}
# Submodules reachable as attributes of the package (`diffusers_ddpm_ext.hub`) without importing them up front.
_LAZY_SUBMODULES = (
    "analytic", "build", "checkpoints", "convert", "data", "data_order", "distill", "encoders", "evaluate", "hub",
    "images", "likelihood", "losses", "metrics", "model_card", "presets", "processes", "progress", "publish",
    "rundir", "runflags", "shapes", "swd", "timestep_sampler", "train_config", "trainer", "viz",
)

__all__ = [
    "ClassConditionalDDPMPipeline",
    "DDPMUNet2DModel",
    "DDPMUNet2DOutput",
    "GaussianDiffusionModelOutput",
    "GaussianDiffusionPipeline",
    "GaussianDiffusionScheduler",
    "GaussianDiffusionSchedulerOutput",
    "TrainConfig",
    "Trainer",
    "UNET_PRESETS",
    "bits_per_dim",
    "create_timestep_sampler",
    "diffusion_loss",
    "estimate_analytic_gamma",
    "estimate_bits_per_dim",
    "evaluate_pipeline",
    "fit_analytic_variance",
    "optimal_trajectory",
    "parse_respacing",
]


def _import_submodule(name: str):
    """Import ``diffusers_ddpm_ext.<name>``; None when that module does not exist (errors inside it propagate)."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as error:
        if error.name == f"{__name__}.{name}":
            return None
        raise


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        for module_name in _LAZY_NAMES[name]:
            module = _import_submodule(module_name)
            if module is not None and hasattr(module, name):
                value = getattr(module, name)
                globals()[name] = value  # later lookups skip __getattr__
                return value
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} (looked in {_LAZY_NAMES[name]})")
    if name in _LAZY_SUBMODULES:
        module = _import_submodule(name)
        if module is not None:
            return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_NAMES) | set(_LAZY_SUBMODULES))
