#!/usr/bin/env python
"""How many training steps a small folder of your own images needs: README "Train on your own images".

    python benchmarks/own_images.py --work_dir own-images-bench                      # 300 shapes; 150, 600, 1500 steps

Writes a folder of procedurally generated coloured shapes (``python -m diffusers_ddpm_ext.shapes``), trains the
README's command on it (no model flag: the RGB data gets the ``rgb-small`` preset) once per step budget, each run
from scratch with its own cosine learning-rate schedule, and puts the training images and each run's final sample
grid (EMA weights, the run's own sampler: 100 respaced steps of the learned-variance chain) side by side in one PNG.
Prints one JSON line per run (wall time, held-out bits/dim) and the figure's path.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_command(launcher: str, folder: str, steps: int, output_dir: str, extra=()) -> list:
    """README's training command for ``folder`` and ``steps`` (sample quality skipped: offline it needs no encoder)."""
    return [*shlex.split(launcher), os.path.join(ROOT, "training", "train.py"), "--train_data_dir", folder,
            "--max_train_steps", str(steps), "--save_images_epochs", "50", "--eval_quality_num_images", "0",
            "--output_dir", output_dir, *extra]


def figure(panels, path: str, height: int = 400) -> None:
    """``panels``: (title, PIL image) pairs, laid out in one row with the titles above, each scaled to ``height``."""
    from PIL import Image, ImageDraw, ImageFont

    images = [image.convert("RGB").resize((round(image.width * height / image.height), height), Image.NEAREST)
              for _, image in panels]
    try:
        font = ImageFont.load_default(size=18)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    title_h, gap = 26, 12
    width = sum(im.width for im in images) + gap * (len(images) + 1)
    height = max(im.height for im in images) + title_h + 2 * gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = gap
    for (title, _), image in zip(panels, images):
        draw.text((x, gap // 2), title, fill=(0, 0, 0), font=font)
        canvas.paste(image, (x, gap + title_h))
        x += image.width + gap
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work_dir", default="own-images-bench", help="Where the folder and the runs go.")
    p.add_argument("--num_images", type=int, default=300, help="Shapes to generate.")
    p.add_argument("--budgets", type=int, nargs="+", default=[150, 600, 1500], help="Optimizer steps per run.")
    p.add_argument("--launcher", default="accelerate launch", help="How train.py is started ('python' works too).")
    p.add_argument("--figure", default=os.path.join(ROOT, "benchmarks", "results", "own_images_shapes.png"))
    args = p.parse_args(argv)

    from PIL import Image

    from diffusers_ddpm_ext.shapes import make_shapes_folder
    from diffusers_ddpm_ext.viz import make_image_grid

    folder = os.path.join(args.work_dir, "shapes")
    if not os.path.isdir(folder):
        make_shapes_folder(folder, args.num_images)
    files = sorted(os.listdir(folder), key=lambda name: name.split("_")[-1])[:64]  # by index: every shape
    panels = [(f"{args.num_images} training images", make_image_grid([Image.open(os.path.join(folder, f))
                                                                         for f in files], nrow=8))]
    rows = []
    for steps in args.budgets:
        out = os.path.join(args.work_dir, f"ddpm-shapes-{steps}")
        start = time.time()
        if not os.path.isfile(os.path.join(out, "metrics.json")):
            subprocess.run(train_command(args.launcher, folder, steps, out), check=True)
        seconds = time.time() - start
        with open(os.path.join(out, "metrics.json")) as f:
            metrics = json.load(f)
        row = {"steps": steps, "wall_s": round(seconds, 1), "train_wall_s": round(metrics["wall_time_s"], 1),
               "bits_per_dim": round(metrics["bits_per_dim"], 3),
               "bits_per_dim_standard_error": round(metrics["bits_per_dim_standard_error"], 3),
               "load_average": os.getloadavg()[0]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        panels.append((f"{steps} steps ({metrics['wall_time_s'] / 60:.0f} min)",
                       Image.open(os.path.join(out, "sample_grid.png"))))
    figure(panels, args.figure)
    print(args.figure)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
