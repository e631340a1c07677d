#!/usr/bin/env python
"""Compare diffusers' `UNet2DModel` + `DDPMScheduler` recipe with ours, side by side, on your data and architecture.

    python training/compare.py --quick --output_dir compare-quick                     # digits, < ~10 min on 2 cores
    python training/compare.py --train_data_dir my_images --resolution 32 --unet_config unet.json \\
        --recipe lowlr="--learning_rate 5e-4" --output_dir compare-mine
    python training/compare.py --output_dir compare-full                              # bigger budgets

Writes report.md (tables + plots), report.json and PNGs into --output_dir. The harness lives in
`training/comparison/`; this file only maps flags to a `CompareConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from comparison import RECIPES, CompareConfig, quick_config, readme_table, run_comparison  # noqa: E402
from comparison.recipes import parse_recipe  # noqa: E402

from diffusers_ddpm_ext.data import data_channels, parse_validation_size  # noqa: E402
from diffusers_ddpm_ext.presets import DEFAULT_PRESETS  # noqa: E402


def add_shared_flags(p: argparse.ArgumentParser) -> None:
    """Data, architecture, recipes and budget flags (shared with benchmarks/quality_per_nfe.py, ablation.py)."""
    a = p.add_argument
    a("--output_dir", required=True, help="Where report.md, report.json and the PNGs go.")
    a("--quick", action="store_true", help="Small budget (what the README quotes); flags below override it.")
    # data, as train.py
    a("--dataset_name", default=None, help="`datasets` dataset id or folder (default: the built-in digits).")
    a("--train_data_dir", default=None, help="Folder of training images.")
    a("--image_column", default=None, help="Image column of --dataset_name.")
    a("--resolution", type=int, default=None, help="Image side (default: the UNet's sample_size).")
    a("--validation_size", type=parse_validation_size, default=None, help="Held-out images (count or fraction; "
      "default as train.py; the digits use their fixed held-out 300).")
    a("--validation_split_seed", type=int, default=None, help="Seed of the held-out split.")
    a("--random_flip", action="store_true", default=None, help="Random horizontal flips (applied once on load).")
    a("--max_train_images", type=int, default=None, help="Load at most this many training images.")
    # architecture
    a("--unet_preset", dest="preset", default=None, help="UNet preset of every recipe (default: by the data's "
      "channels, as train.py: rgb-small for RGB images, digits-small for grey ones).")
    a("--unet_config", default=None, help="JSON UNet config (ours or UNet2DModel's) instead of a preset.")
    a("--unet_overrides", type=json.loads, default=None, help='JSON config overrides, e.g. \'{"in_channels": 3}\'.')
    # recipes
    a("--recipes", nargs="+", default=None, help=f"Built-in recipes {list(RECIPES)}; the first is the baseline.")
    a("--recipe", action="append", default=[], metavar='NAME="--train.py flags"',
      help="A recipe as train.py flags, e.g. lin=\"--ddpm_beta_schedule linear --loss_type kl\" (repeatable; "
           "added after --recipes, which defaults to just `diffusers` when --recipe is given).")
    # budget
    a("--max_train_steps", type=int, default=None, help="Optimizer steps per recipe (the budget).")
    a("--budget_seconds", type=float, default=None, help="Wall-clock budget per recipe instead of steps.")
    a("--batch_size", type=int, default=None)
    a("--num_train_timesteps", type=int, default=None, help="T of every scheduler.")
    a("--lr_warmup_steps", type=int, default=None)
    a("--bpd_num_images", type=int, default=None, help="Held-out images for bits/dim.")
    a("--bpd_timesteps_sampled", type=int, default=None, help="Network calls per image of the bits/dim estimate.")
    a("--bpd_exact_images", type=int, default=None, help="Also the exact bound on this many held-out images.")
    a("--feature_extractor", default=None, help="Features of FD/KID/precision/recall: 'auto' (digits classifier on "
      "the digits, DINOv2 otherwise; offline without it cached, one warning and SWD alone), 'digits-classifier', or "
      "a transformers image encoder id or folder (an error when it cannot be loaded). SWD (no weights) is always "
      "reported, beside the real training images' figure at each N.")
    a("--seed", type=int, default=None)
    a("--num_threads", type=int, default=None, help="torch threads (default: torch's choice).")
    a("--no_progress", action="store_true", help="Hide progress bars.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_shared_flags(p)
    a = p.add_argument
    a("--sample_steps", type=int, nargs="+", default=None, help="Sampling step counts, e.g. 1000 50 25.")
    a("--num_samples", type=int, nargs="+", default=None, help="Images per entry of --sample_steps (N of FD and SWD, "
      "and of the real-data floor).")
    a("--sample_batch_size", type=int, default=None)
    a("--save_models", action="store_true", default=None, help="Save each recipe's trained EMA UNet and scheduler "
      "under <output_dir>/models (benchmarks/quality_per_nfe.py --models reads them).")
    return p


def config_from_args(args, **extra) -> CompareConfig:
    fields = {f.name for f in dataclasses.fields(CompareConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    recipes = list(args.recipes or ([] if not args.recipe else ["diffusers"]))
    if args.recipes is None and not args.recipe:
        recipes = list(CompareConfig.recipes)
    overrides["recipes"] = tuple(parse_recipe(r) for r in recipes + list(args.recipe))
    overrides.update(extra)
    for key in ("sample_steps", "num_samples"):
        if isinstance(overrides.get(key), list):
            overrides[key] = tuple(overrides[key])
    return quick_config(**overrides) if args.quick else CompareConfig(**overrides)


def command_line(script: str, argv) -> str:
    return f"python {script} " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = config_from_args(args)
    if args.preset is None and args.unet_config is None and "in_channels" not in config.unet_overrides:
        config.preset = DEFAULT_PRESETS[data_channels(config.dataset_name, config.train_data_dir,
                                                      config.image_column).channels or 1]  # the data's grey/RGB
    report = run_comparison(config, args.output_dir, progress=not args.no_progress,
                            command=command_line("training/compare.py", argv))
    print(readme_table(report))
    print("\n".join(report["verdict"]))
    print(f"report: {args.output_dir}/report.md ({report['wall_seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    try:
        main()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
