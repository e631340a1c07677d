"""The side-by-side comparison harness (not part of the installable package).

Recipes (diffusers' ``train_unconditional.py`` recipe, ours at identical architecture, ours improved, or any
``training/train.py`` flags) trained in lockstep through `diffusers_ddpm_ext.trainer.Trainer` on the user's data
and architecture, at equal budget, then measured: cost (FLOPs, memory, throughput), held-out bits/dim under both
bounds, sample quality at several step counts (``run``); sample quality per network call for every sampler
(``nfe``).

Modules: ``recipes`` (what the contestants are, the shared config), ``datasets`` (data and its held-out split,
an RGB patch generator), ``lockstep`` (training), ``measure`` (FLOPs, memory), ``evaluation`` (bits/dim, samples,
quality), ``run`` (the whole comparison), ``report`` (verdict, plots, markdown), ``nfe`` (quality per NFE).
"""

from .measure import count_flops, peak_memory_bytes, tensor_bytes
from .recipes import RECIPES, CompareConfig, Recipe, build_recipe_models, parse_recipe, quick_config
from .report import readme_table, write_report
from .run import load_models, run_comparison, save_models

__all__ = ["RECIPES", "CompareConfig", "Recipe", "build_recipe_models", "count_flops", "load_models",
           "parse_recipe", "peak_memory_bytes", "quick_config", "readme_table", "run_comparison", "save_models",
           "tensor_bytes", "write_report"]
