"""The comparison's data: the user's training set and its held-out split in memory, and a small RGB test set.

:func:`load_data` reads what train.py reads (``--dataset_name`` / ``--train_data_dir`` / the built-in digits) with
the held-out split of :func:`diffusers_ddpm_ext.data.load_train_validation_split`: never trained on, used for
bits/dim and as the reference of sample quality. :func:`make_photo_patches` writes a seeded folder of RGB crops
of the two photographs scikit-learn ships (``load_sample_images``), so tests and users can recreate an RGB data
set offline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from diffusers_ddpm_ext.data import check_data_channels, data_channels, dataset_to_tensors, load_train_validation_split


@dataclass
class ComparisonData:
    """Training and held-out images, ``(N, C, R, R)`` in ``[-1, 1]``, and the split's ``info`` (split name, N,
    method, source, ``num_levels``)."""

    train: torch.Tensor
    heldout: torch.Tensor
    info: dict

    @property
    def num_levels(self) -> int:
        return int(self.info["num_levels"])


def load_data(config, in_channels: int, resolution: int) -> ComparisonData:
    """Load ``config``'s data at the UNet's channels and resolution (the training images once, deterministically
    cropped: every recipe sees the same pixels); data whose channels (grey or RGB) disagree are refused."""
    check_data_channels(in_channels, data_channels(config.dataset_name, config.train_data_dir, config.image_column),
                        "the comparison's UNet (--unet_preset, --unet_config, --unet_overrides)")
    split = load_train_validation_split(
        dataset_name=config.dataset_name, train_data_dir=config.train_data_dir, image_column=config.image_column,
        resolution=resolution, in_channels=in_channels, center_crop=config.center_crop,
        random_flip=config.random_flip, validation_size=config.validation_size,
        validation_split_seed=config.validation_split_seed)
    train, _ = dataset_to_tensors(split.train, config.max_train_images)
    heldout, _ = dataset_to_tensors(split.validation)
    if len(train) < config.batch_size:
        raise ValueError(f"{len(train)} training images are fewer than one batch ({config.batch_size})")
    return ComparisonData(train, heldout, dict(split.info))


def make_photo_patches(folder: str, num_images: int = 600, size: int = 32, seed: int = 0,
                       min_crop: int = 48, max_crop: int = 160) -> str:
    """Write ``num_images`` RGB PNG patches (``size`` × ``size``) cropped from scikit-learn's two sample photos.

    Each patch: a photo, a square crop side in ``[min_crop, max_crop]`` and its position drawn from
    ``numpy.random.default_rng(seed)``, downscaled with a box filter, mirrored with probability 1/2. The same
    arguments write the same files.

    Returns:
        ``folder``.
    """
    from PIL import Image
    from sklearn.datasets import load_sample_images

    if not isinstance(num_images, int) or num_images < 2:
        raise ValueError(f"num_images must be an int >= 2, got {num_images!r}")
    photos = [np.asarray(p) for p in load_sample_images().images]  # two (427, 640, 3) uint8
    max_crop = min(max_crop, *(min(p.shape[:2]) for p in photos))
    if not 1 <= size <= min_crop <= max_crop:
        raise ValueError(f"need 1 <= size ({size}) <= min_crop ({min_crop}) <= max_crop ({max_crop})")
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(num_images):
        photo = photos[int(rng.integers(len(photos)))]
        side = int(rng.integers(min_crop, max_crop + 1))
        top = int(rng.integers(photo.shape[0] - side + 1))
        left = int(rng.integers(photo.shape[1] - side + 1))
        patch = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.BOX)
        if rng.random() < 0.5:
            patch = patch.transpose(Image.FLIP_LEFT_RIGHT)
        patch.save(os.path.join(folder, f"patch_{i:05d}.png"))
    return folder


def _main(argv: Optional[list] = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Write RGB patches of scikit-learn's sample photos to a folder.")
    p.add_argument("folder")
    p.add_argument("--num_images", type=int, default=600)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(make_photo_patches(args.folder, args.num_images, args.size, args.seed))


if __name__ == "__main__":
    _main()
