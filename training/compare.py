#!/usr/bin/env python
"""Compare diffusers' `UNet2DModel` + `DDPMScheduler` recipe with ours, side by side, on the built-in digits.

    python training/compare.py --quick --output_dir compare-quick     # < ~10 min on 2 CPU cores
    python training/compare.py --output_dir compare-full              # bigger budgets

Writes report.md (tables + plots), report.json and PNGs into --output_dir. The logic lives in
`diffusers_ddpm_ext.compare`; this file only maps flags to a `CompareConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys

from diffusers_ddpm_ext.compare import RECIPES, CompareConfig, quick_config, readme_table, run_comparison


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--output_dir", required=True, help="Where report.md, report.json and the PNGs go.")
    a("--quick", action="store_true", help="Small budget (what the README quotes); flags below override it.")
    a("--recipes", nargs="+", default=None, choices=list(RECIPES), help="Recipes; the first is the baseline.")
    a("--max_train_steps", type=int, default=None, help="Optimizer steps per recipe (the budget).")
    a("--budget_seconds", type=float, default=None, help="Wall-clock budget per recipe instead of steps.")
    a("--batch_size", type=int, default=None)
    a("--resolution", type=int, default=None, help="Image side (digits are upsampled 8 -> resolution).")
    a("--num_train_timesteps", type=int, default=None, help="T of every scheduler.")
    a("--learning_rate", type=float, default=None)
    a("--lr_warmup_steps", type=int, default=None)
    a("--sample_steps", type=int, nargs="+", default=None, help="Sampling step counts, e.g. 1000 50 25.")
    a("--num_samples", type=int, nargs="+", default=None, help="Images per entry of --sample_steps.")
    a("--sample_batch_size", type=int, default=None)
    a("--bpd_num_images", type=int, default=None, help="Held-out images for bits/dim (<= 300).")
    a("--bpd_timesteps_sampled", type=int, default=None, help="Network calls per image of the bits/dim estimate.")
    a("--bpd_exact_images", type=int, default=None, help="Also the exact bound on this many held-out images.")
    a("--unet_overrides", type=json.loads, default=None, help='JSON config overrides, e.g. \'{"dropout": 0.1}\'.')
    a("--seed", type=int, default=None)
    a("--num_threads", type=int, default=None, help="torch threads (default: torch's choice).")
    a("--no_progress", action="store_true", help="Hide progress bars.")
    return p


def config_from_args(args) -> CompareConfig:
    fields = {f.name for f in dataclasses.fields(CompareConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    for key in ("recipes", "sample_steps", "num_samples"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return quick_config(**overrides) if args.quick else CompareConfig(**overrides)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = config_from_args(args)
    command = "python training/compare.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    report = run_comparison(config, args.output_dir, progress=not args.no_progress, command=command)
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
