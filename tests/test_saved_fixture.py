"""Pipelines saved by an earlier release (main at c44c80e) keep loading and sampling identically.

`model_index.json` records our module paths (`diffusers_ddpm_ext.unet`, `.scheduler`); they are public API.
The fixture folders were written by `save_pretrained` on that commit together with the samples they drew.
"""

import os

import numpy as np
import torch
from diffusers import DiffusionPipeline

import diffusers_ddpm_ext  # noqa: F401  (registers our classes)
from diffusers_ddpm_ext import ClassConditionalDDPMPipeline, DDPMUNet2DModel, GaussianDiffusionScheduler

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "saved_c44c80e")


def test_unconditional_pipeline_saved_by_c44c80e_samples_identically():
    pipe = DiffusionPipeline.from_pretrained(os.path.join(FIXTURES, "unconditional"))
    assert isinstance(pipe.unet, DDPMUNet2DModel) and isinstance(pipe.scheduler, GaussianDiffusionScheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=10, generator=torch.manual_seed(0), output_type="np").images
    expected = np.load(os.path.join(FIXTURES, "unconditional_samples.npy"))
    np.testing.assert_allclose(images, expected, atol=1e-5, rtol=0)


def test_class_conditional_pipeline_saved_by_c44c80e_samples_identically():
    pipe = ClassConditionalDDPMPipeline.from_pretrained(os.path.join(FIXTURES, "class_conditional"))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[0, 2], guidance_scale=2.0, num_inference_steps=10, generator=torch.manual_seed(0),
                  output_type="np").images
    expected = np.load(os.path.join(FIXTURES, "class_conditional_samples.npy"))
    np.testing.assert_allclose(images, expected, atol=1e-5, rtol=0)
