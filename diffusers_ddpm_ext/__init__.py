"""diffusers-ddpm-ext: a from-scratch DDPM UNet and Gaussian-diffusion scheduler for diffusers.

Importing the package imports every module that a saved ``model_index.json`` can name
(``diffusers_ddpm_ext.unet``, ``diffusers_ddpm_ext.scheduler``, ``diffusers_ddpm_ext.pipelines``), so that
``DiffusionPipeline.from_pretrained(folder)`` finds our classes. ``hub``, ``training_utils`` and ``compare``
are imported on use: they pull in heavier dependencies that sampling does not need.
"""

from . import data, likelihood, losses, metrics, timestep_sampler
from .likelihood import bits_per_dim, estimate_bits_per_dim
from .losses import diffusion_loss
from .pipelines import ClassConditionalDDPMPipeline
from .scheduler import (
    GaussianDiffusionModelOutput,
    GaussianDiffusionScheduler,
    GaussianDiffusionSchedulerOutput,
    parse_respacing,
)
from .timestep_sampler import create_timestep_sampler
from .presets import UNET_PRESETS
from .unet import DDPMUNet2DModel, DDPMUNet2DOutput

__version__ = "0.1.0"

__all__ = [
    "ClassConditionalDDPMPipeline",
    "DDPMUNet2DModel",
    "DDPMUNet2DOutput",
    "GaussianDiffusionModelOutput",
    "GaussianDiffusionScheduler",
    "GaussianDiffusionSchedulerOutput",
    "UNET_PRESETS",
    "bits_per_dim",
    "create_timestep_sampler",
    "diffusion_loss",
    "estimate_bits_per_dim",
    "parse_respacing",
]
