"""A procedurally generated image folder to try training on your own images offline: coloured shapes.

    python -m diffusers_ddpm_ext.shapes shapes --num_images 300       # 300 PNGs, 32x32, in ./shapes

Each image is one filled circle, square or triangle in a saturated colour on a plain background, drawn at 4x the size
and downscaled with a box filter (smooth edges). The same arguments write the same files, so README's timings and
sample grids can be reproduced; tests use small folders of it.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle")
SHAPE_COLOURS = ((220, 40, 40), (40, 170, 60), (40, 80, 220), (240, 200, 30), (200, 50, 200), (30, 190, 200),
                 (245, 130, 30), (120, 60, 180))
BACKGROUNDS = ((250, 250, 250), (20, 20, 20), (170, 170, 170), (25, 35, 80), (235, 225, 200))
_SUPERSAMPLE = 4


def draw_shape(shape: str, colour, background, size: int = 32, scale: float = 0.6, centre=(0.5, 0.5),
               mode: str = "RGB"):
    """One image: ``shape`` (one of :data:`SHAPES`) of side ``scale * size`` centred at ``centre`` (fractions of
    the image), filled with ``colour`` on ``background`` (RGB triples), as a PIL image of ``mode`` ``"RGB"`` or
    ``"L"``."""
    from PIL import Image, ImageDraw

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), tuple(background))
    draw = ImageDraw.Draw(image)
    half = scale * big / 2
    cx, cy = centre[0] * big, centre[1] * big
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=tuple(colour))
    elif shape == "square":
        draw.rectangle(box, fill=tuple(colour))
    else:  # an upright triangle filling the box's width
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=tuple(colour))
    return image.resize((size, size), Image.BOX).convert(mode)


def make_shapes_folder(folder: str, num_images: int = 300, size: int = 32, seed: int = 0, mode: str = "RGB",
                       start: int = 0) -> str:
    """Write ``num_images`` PNGs of coloured shapes (``<shape>_<index>.png``) into ``folder``.

    Args:
        folder: created if missing.
        num_images: images to write (at least 1).
        size: image side in pixels.
        seed: seeds the shape, colours, size (40 % to 75 % of the side) and position (inside the image) of each
            image; the same arguments write the same files.
        mode: ``"RGB"`` (colour files) or ``"L"`` (the same images in grey).
        start: index of the first image (to add images to a folder without overwriting).

    Returns:
        ``folder``.
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8 (pixels), got {size!r}")
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for index in range(start, start + num_images):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = SHAPE_COLOURS[int(rng.integers(len(SHAPE_COLOURS)))]
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        scale = float(rng.uniform(0.4, 0.75))
        centre = tuple(float(c) for c in rng.uniform(scale / 2, 1 - scale / 2, 2))
        draw_shape(shape, colour, background, size, scale, centre, mode).save(
            os.path.join(folder, f"{shape}_{index:05d}.png"))
    return folder


def main(argv: Optional[Sequence[str]] = None) -> str:
    p = argparse.ArgumentParser(prog="python -m diffusers_ddpm_ext.shapes",
                                description="Write a folder of coloured-shape PNGs (circles, squares, triangles).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folder", help="Where the PNGs go (created if missing).")
    p.add_argument("--num_images", type=int, default=300, help="Number of images.")
    p.add_argument("--size", type=int, default=32, help="Image side in pixels.")
    p.add_argument("--seed", type=int, default=0, help="Seed of shapes, colours, sizes and positions.")
    p.add_argument("--grey", action="store_true", help="Write grey ('L') images instead of colour ones.")
    args = p.parse_args(argv)
    folder = make_shapes_folder(args.folder, args.num_images, args.size, args.seed, "L" if args.grey else "RGB")
    print(f"wrote {args.num_images} images to {folder}")
    return folder


if __name__ == "__main__":
    main()
