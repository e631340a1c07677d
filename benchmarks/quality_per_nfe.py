#!/usr/bin/env python
"""Sample quality per network call: SWD and FD/KID (± s.e., N stated) at each NFE for every sampler and recipe.

    python benchmarks/quality_per_nfe.py --quick --output_dir nfe-digits                      # trains, then measures
    python benchmarks/quality_per_nfe.py --models compare-quick/models --output_dir nfe-digits  # reuse a comparison
    python benchmarks/quality_per_nfe.py --merge nfe-a/quality_per_nfe.json nfe-b/quality_per_nfe.json --output_dir nfe

Trains the recipes as `training/compare.py` does (same data, architecture, recipe and budget flags) unless
``--models`` points at the models a comparison saved (``--save_models``); then measures every (recipe, sampler,
NFE) point (see `training/comparison/nfe.py`): SWD ×10³ (no weights; per level and averaged, ± bootstrap s.e.)
beside its real-data floor (N training images against the same held-out images), and FD/KID in the extractor's
features (none with ``--feature_extractor auto`` offline without a cached encoder: one warning, SWD only); reports
per recipe the fewest NFE and the wall time that reach the baseline's (diffusers' recipe, DDPM ancestral, 1000
steps) FD (else SWD) within its standard error, and writes ``fd_vs_nfe.png``, ``quality_per_nfe.md`` and
``quality_per_nfe.json``; prints one JSON line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "training"))

import torch  # noqa: E402
from compare import add_shared_flags, command_line, config_from_args  # noqa: E402
from comparison.datasets import load_data  # noqa: E402
from comparison.nfe import (NFE_DEFAULT, SAMPLERS, fmt_json_line, markdown_table, merge_results,  # noqa: E402
                            plot_fd_vs_nfe, quality_per_nfe)
from comparison.run import load_extractor, load_models, run_comparison  # noqa: E402


def build_parser():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shared_flags(p)
    a = p.add_argument
    a("--models", default=None, help="A comparison's saved models folder (<output_dir>/models): skip training.")
    a("--nfe", type=int, nargs="+", default=list(NFE_DEFAULT), help="Network calls per image to measure.")
    a("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS, help="Samplers to measure.")
    a("--num_images", type=int, default=500, help="N generated images at every point.")
    a("--sample_batch_size", type=int, default=250)
    a("--fd_bootstrap", type=int, default=20, help="Bootstrap resamples of the FD standard error.")
    a("--max_nfe_others", type=int, default=None, help="Points above this NFE only with the ancestral `ddpm` sampler, "
      "for every recipe (time saver).")
    a("--merge", nargs="+", default=None, metavar="JSON", help="Only merge the quality_per_nfe.json of runs split by "
      "recipe (e.g. one process per --models folder; the baseline's run first) and write the outputs.")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.merge:
        runs = []
        for path in args.merge:
            with open(path) as f:
                runs.append(json.load(f))
        result = merge_results(runs)
        result["split"] = runs[0].get("split")
        result["wall_seconds"] = sum(r.get("wall_seconds") or 0.0 for r in runs)
        result["command"] = " && ".join(r.get("command", "?") for r in runs)
        return write_outputs(result, args.output_dir)
    start = time.perf_counter()
    config = config_from_args(args, sample_steps=(10,), num_samples=(8,), measure_cost=False, bpd_exact_images=0)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    extractor = load_extractor(config)
    if args.models:
        models = load_models(args.models)
        unet = next(iter(models.values()))[0]
        size = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
        data = load_data(config, int(unet.config.in_channels), int(size))
    else:
        report = run_comparison(config, os.path.join(args.output_dir, "comparison"), extractor=extractor,
                                progress=not args.no_progress)
        models = report["_models"]
        unet = next(iter(models.values()))[0]
        data = load_data(config, int(unet.config.in_channels), int(data_size(unet)))
    result = quality_per_nfe(models, data.heldout, extractor, nfe=args.nfe, samplers=args.samplers,
                             num_images=args.num_images, batch_size=args.sample_batch_size, seed=config.seed,
                             fd_bootstrap=args.fd_bootstrap, max_nfe_others=args.max_nfe_others,
                             progress=not args.no_progress, train_images=data.train)
    result["split"] = data.info
    result["wall_seconds"] = time.perf_counter() - start
    result["command"] = command_line("benchmarks/quality_per_nfe.py", argv)
    return write_outputs(result, args.output_dir)


def write_outputs(result: dict, output_dir: str) -> dict:
    """``fd_vs_nfe.png``, ``quality_per_nfe.md`` and ``quality_per_nfe.json``; prints the JSON line and the table."""
    os.makedirs(output_dir, exist_ok=True)
    plot_fd_vs_nfe(result, os.path.join(output_dir, "fd_vs_nfe.png"))
    table = markdown_table(result)
    split = result.get("split") or {}
    with open(os.path.join(output_dir, "quality_per_nfe.md"), "w") as f:
        features = result.get("extractor") or "none (FD/KID not computed: no encoder could be loaded)"
        f.write(f"```bash\n{result['command']}\n```\n\nN = {result['num_images']} generated images per point, "
                f"reference: {split.get('num_images')} held-out images ({split.get('split')}), features: "
                f"{features}; wall time {result['wall_seconds']:.0f} s.\n\n{table}\n\n"
                "![FD and SWD vs NFE](fd_vs_nfe.png)\n")
    line = fmt_json_line(result)
    with open(os.path.join(output_dir, "quality_per_nfe.json"), "w") as f:
        f.write(line + "\n")
    print(line)
    print(table)
    return result


def data_size(unet) -> int:
    size = unet.config.sample_size
    return size if isinstance(size, int) else size[0]


if __name__ == "__main__":
    main()
