#!/usr/bin/env python
"""SWD of a comparison's saved models beside the real-data floor: one JSON line (README, "Sample quality on natural
images, weight-free").

    python training/compare.py --train_data_dir patches16 --resolution 16 ... --save_models --output_dir cmp-rgb16
    python benchmarks/swd_cells.py --comparison cmp-rgb16 --train_data_dir patches16 --resolution 16 --num_images 500

Every recipe is sampled at ``--steps`` (its own scheduler: ancestral, learned variance where it has one) and the
baseline recipe also at ``--baseline_steps`` (DDPMPipeline's 1000 by default), N images each from the same seeds
(`evaluate.generate_images`), scored against the held-out split of `data.load_train_validation_split` by
`swd.sliced_wasserstein_distance` (×10³, ± bootstrap s.e.); the floor is N real training images scored the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training"))

import torch  # noqa: E402
from comparison.run import load_models  # noqa: E402

from diffusers_ddpm_ext.data import dataset_to_tensors, load_train_validation_split  # noqa: E402
from diffusers_ddpm_ext.evaluate import generate_images  # noqa: E402
from diffusers_ddpm_ext.pipelines import GaussianDiffusionPipeline  # noqa: E402
from diffusers_ddpm_ext.swd import sliced_wasserstein_distance  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comparison", required=True, help="A training/compare.py --save_models output folder.")
    p.add_argument("--train_data_dir", default=None, help="The comparison's image folder (default: the digits).")
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--num_images", type=int, default=500)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--baseline", default="diffusers", help="Recipe also sampled at --baseline_steps.")
    p.add_argument("--baseline_steps", type=int, default=1000, help="0: skip.")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    models = load_models(os.path.join(args.comparison, "models"))
    in_channels = next(iter(models.values()))[0].config.in_channels
    split = load_train_validation_split(train_data_dir=args.train_data_dir, resolution=args.resolution,
                                        in_channels=in_channels)
    train, _ = dataset_to_tensors(split.train)
    heldout, _ = dataset_to_tensors(split.validation)

    def swd(images):
        return sliced_wasserstein_distance(images, heldout, seed=args.seed).as_dict()

    out = {"benchmark": "swd_cells", "comparison": args.comparison, "split": "heldout", "n_heldout": len(heldout),
           "n_generated": args.num_images, "floor_train_vs_heldout": swd(train[: args.num_images]), "cells": {}}
    for name, (unet, scheduler) in models.items():
        pipe = GaussianDiffusionPipeline(unet=unet, scheduler=scheduler)
        steps = [args.steps] + ([args.baseline_steps] if name == args.baseline and args.baseline_steps else [])
        for n_steps in steps:
            start = time.time()
            images = generate_images(pipe, args.num_images, n_steps, batch_size=250, seed=args.seed, progress=False)
            out["cells"][f"{name}@{n_steps}"] = {**swd(images), "sample_seconds": round(time.time() - start, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
