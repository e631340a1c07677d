"""diffusers-ddpm-ext: a from-scratch DDPM UNet and Gaussian-diffusion scheduler for diffusers.

Importing the package imports every module that a saved ``model_index.json`` can name, so that
``DiffusionPipeline.from_pretrained(folder)`` finds our classes.
"""

__version__ = "0.1.0"
