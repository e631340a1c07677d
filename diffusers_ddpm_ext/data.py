"""Training data: the built-in digits, image folders, `datasets` datasets, transforms and a resumable loader.

Everything here is written with PIL, numpy and torch (no torchvision, which has no CPU build on the
target machine).

Sources (one factory, :func:`load_training_dataset`):

* **built-in digits** (both names ``None``): scikit-learn's ``load_digits`` (1,797 images, 8x8, 17 grey
  levels 0..16, labels 0..9), split once with a fixed seed into 1,497 training and 300 held-out images
  (:data:`DIGITS_HELDOUT_SIZE`). Upsampling to the model's ``sample_size`` uses nearest neighbour with
  an integer factor, so the 17 levels survive exactly (bits/dim uses ``num_levels=17``); a non-integer
  factor falls back to bilinear with a warning (the levels are then no longer exact).
* ``dataset_name``: a Hub id or a local path, loaded with ``datasets.load_dataset`` (a folder written by
  ``Dataset.save_to_disk`` goes through ``datasets.load_from_disk``).
* ``train_data_dir``: a folder of images scanned by this module. If every image lies inside a first-level
  subfolder, the subfolder names (sorted) are the class labels.

Bad data is found **before** training: every image is opened once (``PIL.Image.verify`` + decode +
size/mode checks). Problems are reported together in one :class:`BadImageError` naming each file, or,
with ``skip_bad_images=True``, skipped with one counted warning such as
``skipped 3 of 120 images: 1 corrupt, 1 empty, 1 too small (first: /data/x.png)``.

Image-mode policy (:func:`convert_image_mode`):

* converted: ``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX`` and the alpha
  modes ``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa`` (and palette images with a transparency entry):
  transparent pixels are composited over **black** before conversion to ``L`` / ``RGB``.
* rejected: the high-bit-depth and float modes ``I;16*``, ``I`` and ``F``. PIL's conversion to 8 bits
  clips them at 255 instead of rescaling, which would silently destroy the data; convert them to 8 bits
  yourself with the scaling you intend.

Minimum image size (:func:`min_image_size`): an image whose shorter side is below
``max(min(8, resolution), resolution // 4)`` pixels is "too small" (upsampling it more than 4x, or from
fewer than 8 pixels, invents the detail the model would learn).

Held-out split (:func:`load_train_validation_split`, :func:`split_train_validation`): every source has a
validation split that is never trained on. The digits keep their fixed 300; a ``datasets`` dataset with a
``validation``/``valid``/``val``/``test`` split uses it; image folders and single-split datasets are carved by
ranking each image's SHA-256 of ``(seed, file path or row number)`` (default: 10 % of the images, at most
1,000). The split depends only on the data and the split seed, never on the process, the world size or the
training seed. Validation images load without augmentation (center crop, no flip); the split's ``info`` says
which split and how many images, for ``metrics.json``.

Data order (:class:`ResumableBatchSampler`, :func:`make_dataloader`) lives in :mod:`.data_order`, image checks
and transforms in :mod:`.images`; both are importable from here as before.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Image checks/transforms and the data order live in their own modules; their public names stay importable here.
from .data_order import ResumableBatchSampler, _resolve_key, make_dataloader, resume_position  # noqa: F401
from .images import (  # noqa: F401
    CONVERTIBLE_MODES,
    IMAGE_EXTENSIONS,
    REJECTED_MODES,
    BadImageError,
    ImageTransform,
    ScanReport,
    _check_channels,
    _check_resolution,
    _finish_scan,
    GREY_MODES,
    DataChannels,
    DataChannelsError,
    center_crop,
    check_data_channels,
    check_image,
    convert_image_mode,
    image_channels,
    min_image_size,
    random_crop,
    resize_shorter_side,
    to_tensor,
)

logger = logging.getLogger(__name__)

DIGITS_NUM_LEVELS = 17
"""Grey levels of scikit-learn's digits (values 0..16); pass as ``num_levels`` to bits/dim."""
DIGITS_NUM_CLASSES = 10
DIGITS_SIZE = 8
DIGITS_HELDOUT_SIZE = 300
"""Held-out digits (the remaining 1,497 are the training split)."""
DIGITS_SPLIT_SEED = 0
"""Seed of the fixed train/held-out permutation; independent of the training seed on purpose, so the
held-out set never changes between runs."""



# ----------------------------------------------------------------------------------------------------
# Built-in digits
# ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.int64), digits.target.astype(np.int64)  # (1797, 8, 8) in 0..16, (1797,)


def load_digits_split(split: str = "train", split_seed: int = DIGITS_SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Integer digits of one split.

    Args:
        split: ``"train"`` (1,497 images), ``"heldout"`` (300 images) or ``"all"`` (1,797).
        split_seed: seed of the fixed permutation that defines the split.

    Returns:
        ``(levels, labels)``: int64 arrays of shape ``(N, 8, 8)`` with values 0..16 and ``(N,)`` with 0..9.
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be one of 'train', 'heldout', 'all', got {split!r}")
    levels, labels = (a.copy() for a in _sklearn_digits())
    if split == "all":
        return levels, labels
    order = np.random.default_rng(split_seed).permutation(len(labels))
    idx = order[:DIGITS_HELDOUT_SIZE] if split == "heldout" else order[DIGITS_HELDOUT_SIZE:]
    idx = np.sort(idx)  # keep sklearn's order inside a split; the loader shuffles anyway
    return levels[idx], labels[idx]


def digits_to_tensor(levels: Union[np.ndarray, torch.Tensor], resolution: int = 8, in_channels: int = 1) -> torch.Tensor:
    """Map digit levels 0..16 to ``[-1, 1]`` and resize to ``resolution``.

    An integer upsampling factor uses nearest neighbour (each pixel becomes a ``f x f`` block), which keeps
    exactly the 17 values ``-1 + 2k/16``. Any other size falls back to bilinear (antialiased when
    shrinking) with a warning, because the grey levels are then no longer exact.

    Args:
        levels: ``(N, 8, 8)`` integers 0..16.
        resolution: output side length.
        in_channels: 1 (grey) or 3 (grey repeated to RGB).

    Returns:
        ``(N, in_channels, resolution, resolution)`` float32 in ``[-1, 1]``.
    """
    _check_channels(in_channels)
    _check_resolution(resolution)
    x = torch.as_tensor(np.asarray(levels), dtype=torch.float32)
    if x.ndim != 3:
        raise ValueError(f"levels must have shape (N, H, W), got {tuple(x.shape)}")
    x = (x / (DIGITS_NUM_LEVELS - 1) * 2 - 1).unsqueeze(1)  # (N, 1, 8, 8)
    size = x.shape[-1]
    if resolution % size == 0:
        factor = resolution // size
        x = x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)  # (N, 1, R, R)
    else:
        warnings.warn(
            f"digits resized from {size} to {resolution} px with bilinear interpolation (not an integer factor): "
            f"the {DIGITS_NUM_LEVELS} grey levels are no longer exact, so bits/dim with num_levels="
            f"{DIGITS_NUM_LEVELS} is approximate; use a multiple of {size} for sample_size.",
            stacklevel=2,
        )
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=resolution < size)
        x = x.clamp(-1, 1)
    return x.repeat(1, in_channels, 1, 1).contiguous()  # (N, C, R, R)


def load_digits_tensors(
    split: str = "heldout", resolution: int = 8, in_channels: int = 1, split_seed: int = DIGITS_SPLIT_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits of one split as model inputs; the held-out split is what bits/dim and sample quality use.

    Returns:
        ``(images, labels)``: ``(N, C, R, R)`` float32 in ``[-1, 1]`` and ``(N,)`` int64.
    """
    levels, labels = load_digits_split(split, split_seed)
    return digits_to_tensor(levels, resolution, in_channels), torch.from_numpy(labels)


def load_heldout_digits(resolution: int = 8, in_channels: int = 1, split_seed: int = DIGITS_SPLIT_SEED):
    """The 300 held-out digits, ``(images (300, C, R, R) in [-1, 1], labels (300,))``."""
    return load_digits_tensors("heldout", resolution, in_channels, split_seed)


class DigitsDataset(torch.utils.data.Dataset):
    """Digits as a map-style dataset of ``{"pixel_values": (C, R, R), "class_labels": ()}`` dicts.

    Args:
        split: ``"train"``, ``"heldout"`` or ``"all"``.
        resolution: side length (a multiple of 8 keeps the grey levels exact).
        in_channels: 1 or 3.
        random_flip: horizontal flip with probability 1/2 (off by default: a mirrored digit is another
            glyph).
        split_seed: see :data:`DIGITS_SPLIT_SEED`.
    """

    def __init__(self, split="train", resolution=8, in_channels=1, random_flip=False, split_seed=DIGITS_SPLIT_SEED):
        self.images, self.labels = load_digits_tensors(split, resolution, in_channels, split_seed)
        self.split, self.resolution, self.in_channels, self.split_seed = split, resolution, in_channels, split_seed
        self.random_flip = random_flip
        self.num_classes = DIGITS_NUM_CLASSES
        self.class_names = [str(i) for i in range(DIGITS_NUM_CLASSES)]
        self.num_levels = DIGITS_NUM_LEVELS
        self.scan_report = ScanReport(total=len(self.labels))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        index, generator = _resolve_key(key)
        x = self.images[index]  # (C, R, R)
        if self.random_flip and bool(torch.rand((), generator=generator) < 0.5):
            x = x.flip(-1)
        return {"pixel_values": x, "class_labels": self.labels[index]}


# ----------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------


def scan_image_folder(root: str) -> tuple[list[str], Optional[list[int]], Optional[list[str]]]:
    """List the images under ``root`` (recursive, sorted, hidden files and other extensions ignored).

    Returns:
        ``(paths, labels, class_names)``; labels are the first-level subfolder indices when every image is
        inside one, otherwise ``labels`` and ``class_names`` are ``None``.
    """
    if not os.path.isdir(root):
        raise ValueError(f"train_data_dir {root!r} is not a directory")
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(dirpath, name))
    if not paths:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root!r}")
    rel = [os.path.relpath(p, root).split(os.sep) for p in paths]
    if all(len(r) > 1 for r in rel):
        class_names = sorted({r[0] for r in rel})
        lookup = {c: i for i, c in enumerate(class_names)}
        return paths, [lookup[r[0]] for r in rel], class_names
    return paths, None, None


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of a folder (optionally class subfolders) as ``{"pixel_values", "class_labels"?}`` dicts.

    Args:
        root: the folder.
        transform: an :class:`ImageTransform`.
        skip_bad_images: skip unusable files with a counted warning instead of raising.
        validate: open every file up front (recommended; costs one decode per image).
        min_size: override of :func:`min_image_size`.
    """

    def __init__(self, root, transform: ImageTransform, skip_bad_images=False, validate=True, min_size=None):
        paths, labels, self.class_names = scan_image_folder(root)
        self.root = root
        self.transform = transform
        self.scan_report = ScanReport(total=len(paths))
        keep = list(range(len(paths)))
        if validate:
            for i, p in enumerate(paths):
                problem = check_image(p, transform.resolution, transform.in_channels, min_size)
                if problem is not None:
                    self.scan_report.bad.append((p, *problem))
            _finish_scan(self.scan_report, root, skip_bad_images)
            bad = {b[0] for b in self.scan_report.bad}
            keep = [i for i in keep if paths[i] not in bad]
            if not keep:
                raise BadImageError(f"no usable images left in {root!r} ({self.scan_report.summary()})")
        self.paths = [paths[i] for i in keep]
        self.labels = None if labels is None else [labels[i] for i in keep]
        self.num_classes = None if self.class_names is None else len(self.class_names)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        index, generator = _resolve_key(key)
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                im.load()
                x = self.transform(im, generator)
        except Exception as e:
            raise BadImageError(f"cannot read training image {path}: {type(e).__name__}: {e}") from e
        item = {"pixel_values": x}
        if self.labels is not None:
            item["class_labels"] = torch.tensor(self.labels[index], dtype=torch.long)
        return item


def _is_saved_to_disk(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))
    )


def load_hf_dataset(dataset_name: str, split: str = "train", cache_dir: Optional[str] = None):
    """Load one split of a Hub dataset or a local dataset folder with ``datasets``.

    A local folder written by ``save_to_disk`` is read with ``datasets.load_from_disk`` (``load_dataset``
    refuses it); anything else goes through ``datasets.load_dataset(dataset_name, split=split)``, the code
    path of ``train_unconditional.py`` (honours ``HF_DATASETS_OFFLINE``).
    """
    import datasets

    if _is_saved_to_disk(dataset_name):
        ds = datasets.load_from_disk(dataset_name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"split {split!r} not in the saved dataset {dataset_name!r}; available: {list(ds)}")
            ds = ds[split]
        return ds
    try:
        return datasets.load_dataset(dataset_name, split=split, cache_dir=cache_dir)
    except Exception as e:
        raise ValueError(f"could not load dataset {dataset_name!r} (split {split!r}): {type(e).__name__}: {e}") from e


def resolve_image_column(features, image_column: Optional[str] = None) -> str:
    """Pick the image column: the given name, else ``"image"``, ``"img"`` or the first ``datasets.Image``
    feature. Raises a ValueError listing the available columns."""
    import datasets

    columns = list(features)
    if image_column is not None:
        if image_column not in features:
            raise ValueError(f"image_column {image_column!r} not found in the dataset; available columns: {columns}")
        if not isinstance(features[image_column], datasets.Image):
            raise ValueError(
                f"image_column {image_column!r} has feature {features[image_column]!r}, expected datasets.Image; "
                f"available columns: {columns}"
            )
        return image_column
    for name in ("image", "img"):
        if name in features and isinstance(features[name], datasets.Image):
            return name
    for name, feat in features.items():
        if isinstance(feat, datasets.Image):
            return name
    raise ValueError(f"no image column found (looked for 'image', 'img' or any datasets.Image feature); "
                     f"available columns: {columns}; pass image_column=...")


class HFImageDataset(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` with an image column (and optional class column) as training dicts.

    Args:
        ds: the ``datasets.Dataset``.
        transform: an :class:`ImageTransform`.
        image_column: see :func:`resolve_image_column`.
        class_column: optional integer / ``ClassLabel`` / string column of labels (strings are mapped to
            sorted indices).
        skip_bad_images: skip unusable rows with a counted warning instead of raising.
        validate: check every image up front.
        min_size: override of :func:`min_image_size`.
        name: how messages name the dataset.
        class_names: the class names of a string ``class_column`` to index by (e.g. the training split's, so
            that a validation split lacking a class maps labels the same way); default: this split's sorted
            values.
    """

    def __init__(self, ds, transform: ImageTransform, image_column=None, class_column=None,
                 skip_bad_images=False, validate=True, min_size=None, name="dataset", class_names=None):
        import datasets

        self.image_column = resolve_image_column(ds.features, image_column)
        self.class_column = class_column
        self.class_names = None
        self.num_classes = None
        labels = None
        if class_column is not None:
            if class_column not in ds.features:
                raise ValueError(f"class_column {class_column!r} not found in the dataset; "
                                 f"available columns: {list(ds.features)}")
            feat = ds.features[class_column]
            raw = ds[class_column]
            if isinstance(feat, datasets.ClassLabel):
                self.class_names, labels = list(feat.names), [int(v) for v in raw]
            elif isinstance(feat, datasets.Value) and feat.dtype.startswith(("int", "uint")):
                labels = [int(v) for v in raw]
                if min(labels) < 0:
                    raise ValueError(f"class_column {class_column!r} has negative labels (min {min(labels)})")
                self.class_names = [str(i) for i in range(max(labels) + 1)]
            elif isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string"):
                self.class_names = sorted(set(raw)) if class_names is None else list(class_names)
                lookup = {c: i for i, c in enumerate(self.class_names)}
                unknown = sorted(set(raw) - set(lookup))
                if unknown:
                    raise ValueError(f"class_column {class_column!r} has labels {unknown[:10]} that the training split "
                                     f"does not have; known labels: {self.class_names}")
                labels = [lookup[v] for v in raw]
            else:
                raise ValueError(f"class_column {class_column!r} has feature {feat!r}; expected ClassLabel, an integer "
                                 f"or a string Value")
            self.num_classes = len(self.class_names)
        self.transform = transform
        self.ds = ds
        self.scan_report = ScanReport(total=len(ds))
        keep = list(range(len(ds)))
        if validate:
            raw_images = ds.select_columns([self.image_column]).cast_column(self.image_column, datasets.Image(decode=False))
            bad_rows = set()
            for i, row in enumerate(raw_images):
                cell = row[self.image_column]
                where = f"row {i}" + (f" ({cell['path']})" if cell and cell.get("path") else "")
                if cell is None or (cell.get("bytes") is None and not cell.get("path")):
                    self.scan_report.bad.append((where, "empty", "no image"))
                    bad_rows.add(i)
                    continue
                src = cell["bytes"] if cell.get("bytes") is not None else cell["path"]
                problem = check_image(src, transform.resolution, transform.in_channels, min_size)
                if problem is not None:
                    self.scan_report.bad.append((where, *problem))
                    bad_rows.add(i)
            _finish_scan(self.scan_report, name, skip_bad_images)
            keep = [i for i in keep if i not in bad_rows]
            if not keep:
                raise BadImageError(f"no usable images left in {name} ({self.scan_report.summary()})")
        self.indices = keep
        self.labels = None if labels is None else [labels[i] for i in keep]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, key):
        index, generator = _resolve_key(key)
        row = self.indices[index]
        try:
            x = self.transform(self.ds[row][self.image_column], generator)
        except Exception as e:
            raise BadImageError(f"cannot read training image in row {row}: {type(e).__name__}: {e}") from e
        item = {"pixel_values": x}
        if self.labels is not None:
            item["class_labels"] = torch.tensor(self.labels[index], dtype=torch.long)
        return item


def load_training_dataset(
    dataset_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    image_column: Optional[str] = None,
    class_column: Optional[str] = None,
    resolution: int = 16,
    in_channels: int = 1,
    center_crop: bool = False,
    random_flip: bool = False,
    skip_bad_images: bool = False,
    cache_dir: Optional[str] = None,
    split: str = "train",
    validate: bool = True,
    min_size: Optional[int] = None,
) -> torch.utils.data.Dataset:
    """The one factory the training script calls.

    Args:
        dataset_name: Hub id or local path for ``datasets`` (``--dataset_name``).
        train_data_dir: a folder of images, class subfolders give labels (``--train_data_dir``).
        image_column: image column of a ``datasets`` dataset (auto-detected when ``None``).
        class_column: label column of a ``datasets`` dataset (optional).
        resolution: side length of the training images (the model's ``sample_size``).
        in_channels: 1 (grey) or 3 (RGB), the model's ``in_channels``.
        center_crop: center crop instead of random crop.
        random_flip: random horizontal flip.
        skip_bad_images: skip unusable images with a counted warning instead of failing up front.
        cache_dir: ``datasets`` cache folder.
        split: dataset split; for the built-in digits ``"train"`` or ``"heldout"``.
        validate: open every image before training (see the module doc).
        min_size: override of :func:`min_image_size`.

    Returns:
        A map-style dataset of ``{"pixel_values": (C, R, R) float32 in [-1, 1], "class_labels": int64}``
        (``class_labels`` only when labels exist), with attributes ``num_classes``, ``class_names`` and
        ``scan_report``. With both names ``None``: the built-in digits (:class:`DigitsDataset`).
    """
    if dataset_name is not None and train_data_dir is not None:
        raise ValueError("give either dataset_name or train_data_dir, not both")
    _check_resolution(resolution)
    _check_channels(in_channels)
    if dataset_name is None and train_data_dir is None:
        if image_column is not None or class_column is not None:
            raise ValueError("image_column/class_column apply to dataset_name only; the built-in digits have "
                             "fixed images and labels")
        return DigitsDataset(split, resolution, in_channels, random_flip=random_flip)
    transform = ImageTransform(resolution, in_channels, center_crop=center_crop, random_flip=random_flip)
    if train_data_dir is not None:
        if image_column is not None or class_column is not None:
            raise ValueError("image_column/class_column apply to dataset_name only; with train_data_dir the "
                             "labels come from class subfolders")
        return ImageFolderDataset(train_data_dir, transform, skip_bad_images, validate, min_size)
    ds = load_hf_dataset(dataset_name, split, cache_dir)
    return HFImageDataset(ds, transform, image_column, class_column, skip_bad_images, validate, min_size,
                          name=f"dataset {dataset_name!r} (split {split!r})")


# ----------------------------------------------------------------------------------------------------
# Grey or RGB: the channels of a data source
# ----------------------------------------------------------------------------------------------------


def data_channels(dataset_name: Optional[str] = None, train_data_dir: Optional[str] = None,
                  image_column: Optional[str] = None, cache_dir: Optional[str] = None,
                  split: str = "train") -> DataChannels:
    """Whether a data source is grey (1 channel) or RGB (3), cheaply: from each image's mode
    (:func:`~diffusers_ddpm_ext.images.image_channels`, the file header only), or from the image feature's ``mode``
    when a ``datasets`` dataset declares one. RGB wins when any image is colour (the grey ones are then repeated to 3
    channels). Unreadable images are left out here: the full check of :func:`load_training_dataset` names them.

    Args:
        dataset_name, train_data_dir, image_column, cache_dir, split: as in :func:`load_training_dataset` (neither
            name: the built-in digits, grey).

    Returns:
        :class:`DataChannels`.
    """
    if dataset_name is None and train_data_dir is None:
        return DataChannels(1, 0, len(_sklearn_digits()[1]), "the built-in digits")
    if train_data_dir is not None:
        source = f"--train_data_dir {train_data_dir!r}"
        sources = ((p, os.path.relpath(p, train_data_dir)) for p in scan_image_folder(train_data_dir)[0])
    else:
        import datasets

        source = f"--dataset_name {dataset_name!r}"
        ds = load_hf_dataset(dataset_name, split, cache_dir)
        column = resolve_image_column(ds.features, image_column)
        mode = ds.features[column].mode
        if mode is not None:  # every image is converted to this mode when it is decoded
            grey = mode in GREY_MODES
            return DataChannels(1 if grey else 3, 0 if grey else len(ds), len(ds) if grey else 0, source,
                                None if grey else "row 0")
        raw = ds.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        sources = ((io.BytesIO(c["bytes"]) if c.get("bytes") else c.get("path"), f"row {i}")
                   for i, c in enumerate(row[column] or {} for row in raw))
    colour = grey = 0
    first_colour = None
    for src, where in sources:
        try:
            with Image.open(src) as im:
                channels = image_channels(im)
        except Exception:  # noqa: BLE001 - a broken image is reported by the full check that follows
            continue
        grey += channels == 1
        colour += channels == 3
        if channels == 3 and first_colour is None:
            first_colour = where
    channels = 3 if colour else (1 if grey else None)
    return DataChannels(channels, colour, grey, source, first_colour)


# ----------------------------------------------------------------------------------------------------
# Held-out validation split
# ----------------------------------------------------------------------------------------------------

DEFAULT_VALIDATION_FRACTION = 0.1
"""Default validation size: this fraction of the images (at least 1) ..."""
DEFAULT_VALIDATION_MAX_IMAGES = 1000
"""... but at most this many (enough for bits/dim and for FD at N = 1000; the rest is trained on)."""
VALIDATION_SPLIT_SEED = 0
"""Default seed of the carved split. Independent of the training seed on purpose: runs with different training
seeds are then evaluated on the same images."""
DATASET_VALIDATION_SPLITS = ("validation", "valid", "val", "test")
"""Splits of a ``datasets`` dataset used as its own held-out split, in this order of preference."""


def parse_validation_size(text: str) -> Union[int, float]:
    """Parse ``--validation_size``: ``"500"`` is a number of images, ``"0.1"`` a fraction of the dataset."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"validation size must be a number of images (e.g. 500) or a fraction in (0, 1) (e.g. "
                         f"0.1), got {text!r}") from None
    if value.is_integer() and "." not in str(text) and "e" not in str(text).lower():
        return int(value)
    return value


def resolve_validation_size(validation_size: Optional[Union[int, float]], num_items: int) -> int:
    """Number of validation items out of ``num_items``.

    Args:
        validation_size: ``None`` (default: :data:`DEFAULT_VALIDATION_FRACTION` of the items, at least 1, at most
            :data:`DEFAULT_VALIDATION_MAX_IMAGES`), an int ``>= 1`` (a count) or a float in ``(0, 1)`` (a
            fraction, rounded, at least 1).
        num_items: items to split; at least one must be left for training.
    """
    if num_items < 2:
        raise ValueError(f"a validation split needs at least 2 images (one to train on), got {num_items}")
    if validation_size is None:
        size = min(DEFAULT_VALIDATION_MAX_IMAGES, max(1, round(DEFAULT_VALIDATION_FRACTION * num_items)))
    elif isinstance(validation_size, (bool, np.bool_)):
        raise ValueError(f"validation_size must be an int >= 1 or a float in (0, 1), got {validation_size!r}")
    elif isinstance(validation_size, (int, np.integer)):
        if validation_size < 1:
            raise ValueError(f"validation_size must be an int >= 1 (a number of images) or a float in (0, 1) (a "
                             f"fraction), got {validation_size!r}")
        size = int(validation_size)
    elif isinstance(validation_size, (float, np.floating)):
        if not 0.0 < validation_size < 1.0:
            raise ValueError(f"a fractional validation_size must lie in (0, 1), got {validation_size!r}; give a "
                             f"number of images as an int")
        size = max(1, round(float(validation_size) * num_items))
    else:
        raise ValueError(f"validation_size must be None, an int >= 1 or a float in (0, 1), got {validation_size!r}")
    if size >= num_items:
        raise ValueError(f"validation_size {validation_size!r} leaves no training images: it asks for {size} of "
                         f"{num_items} images; allowed are 1 to {num_items - 1} images or a fraction in (0, 1)")
    return size


def validation_split_indices(
    keys: list, validation_size: Optional[Union[int, float]] = None, seed: int = VALIDATION_SPLIT_SEED
) -> tuple[list[int], list[int]]:
    """Seeded split of items named by ``keys`` into training and validation positions.

    Every item is ranked by ``SHA-256(seed, key)`` and the first ``n`` (:func:`resolve_validation_size`) are the
    validation split. The split therefore depends only on the seed and the items' names (file paths, row
    numbers), never on their listing order, the process (rank, world size, ``PYTHONHASHSEED``) or the run (a
    resumed run gets the same split); adding items moves at most the items at the boundary.

    Args:
        keys: one distinct string per item.
        validation_size: see :func:`resolve_validation_size`.
        seed: split seed.

    Returns:
        ``(train_positions, validation_positions)``: disjoint, sorted, covering ``range(len(keys))``.
    """
    keys = [str(k) for k in keys]
    if len(set(keys)) != len(keys):
        raise ValueError("validation_split_indices needs distinct keys (one per item)")
    size = resolve_validation_size(validation_size, len(keys))
    rank = sorted(range(len(keys)), key=lambda i: hashlib.sha256(f"{int(seed)}\0{keys[i]}".encode()).digest())
    return sorted(rank[size:]), sorted(rank[:size])


class SubsetDataset(torch.utils.data.Dataset):
    """The items ``indices`` of a dataset of this module, keeping its ``(index, seed)`` key protocol and its
    ``num_classes``, ``class_names``, ``scan_report`` (and ``num_levels`` where it has one).

    Args:
        dataset: the full dataset.
        indices: positions in ``dataset``.
    """

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.num_classes = getattr(dataset, "num_classes", None)
        self.class_names = getattr(dataset, "class_names", None)
        self.scan_report = getattr(dataset, "scan_report", None)
        if hasattr(dataset, "num_levels"):
            self.num_levels = dataset.num_levels

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, key):
        if isinstance(key, (tuple, list)):
            return self.dataset[(self.indices[int(key[0])], int(key[1]))]
        return self.dataset[self.indices[int(key)]]


@dataclass
class TrainValidationSplit:
    """A training dataset and its held-out validation split.

    Args:
        train: the images to train on (the training transform: random crop/flip as requested).
        validation: the held-out images, never in ``train``, with a deterministic transform (center crop, no
            flip), as used for bits/dim and as the reference set of sample quality.
        info: JSON-ready description for ``metrics.json`` / reports: ``split`` (its name), ``num_images``,
            ``num_train_images``, ``method``, ``seed``, ``validation_size`` (as requested), ``source`` and
            ``num_levels`` (grey levels of the data: 17 for the digits, 256 for 8-bit images).
    """

    train: torch.utils.data.Dataset
    validation: torch.utils.data.Dataset
    info: dict


def _item_keys(dataset) -> list[str]:
    """Names of the items that the split hashes: file paths relative to the folder, original row numbers."""
    if isinstance(dataset, ImageFolderDataset):
        return [os.path.relpath(p, dataset.root).replace(os.sep, "/") for p in dataset.paths]
    if isinstance(dataset, HFImageDataset):
        return [f"row {row}" for row in dataset.indices]
    return [f"item {i}" for i in range(len(dataset))]


def _deterministic(dataset):
    """A shallow copy of ``dataset`` that loads its images without random augmentation (center crop, no flip)."""
    import copy

    out = copy.copy(dataset)
    if isinstance(dataset, DigitsDataset):
        out.random_flip = False
    elif isinstance(getattr(dataset, "transform", None), ImageTransform):
        t = dataset.transform
        out.transform = ImageTransform(t.resolution, t.in_channels, center_crop=True, random_flip=False)
    return out


def _digits_split(dataset: DigitsDataset, validation_size, seed) -> TrainValidationSplit:
    if dataset.split != "train":
        raise ValueError(f"the validation split of the digits is their fixed held-out split; give the 'train' split "
                         f"to split, got {dataset.split!r}")
    heldout = DigitsDataset("heldout", dataset.resolution, dataset.in_channels, random_flip=False,
                            split_seed=dataset.split_seed)
    method = f"the fixed {DIGITS_HELDOUT_SIZE} held-out digits (permutation seed {dataset.split_seed})"
    if validation_size is not None:
        _, chosen = validation_split_indices(_item_keys(heldout), validation_size, seed)
        heldout = SubsetDataset(heldout, chosen)
        method += f", seeded subset (seed {seed})"
    info = {"split": "heldout", "num_images": len(heldout), "num_train_images": len(dataset), "method": method,
            "seed": seed if validation_size is not None else None, "validation_size": validation_size,
            "source": "built-in digits (scikit-learn load_digits)", "num_levels": DIGITS_NUM_LEVELS}
    return TrainValidationSplit(dataset, heldout, info)


def split_train_validation(
    dataset: torch.utils.data.Dataset,
    validation_size: Optional[Union[int, float]] = None,
    seed: int = VALIDATION_SPLIT_SEED,
    source: Optional[str] = None,
) -> TrainValidationSplit:
    """Carve a seeded held-out validation split out of a training dataset of this module.

    Image folders are split by file path and ``datasets`` datasets by original row number
    (:func:`validation_split_indices`); the built-in digits keep their fixed held-out 300 (a ``validation_size``
    then takes a seeded subset of those 300, never training digits).

    Args:
        dataset: an :class:`ImageFolderDataset`, :class:`HFImageDataset` or ``DigitsDataset("train")`` (any other
            map-style dataset is split by position).
        validation_size: see :func:`resolve_validation_size`.
        seed: split seed (default :data:`VALIDATION_SPLIT_SEED`, independent of the training seed).
        source: how ``info`` names the data (default: the folder or the dataset's name).

    Returns:
        :class:`TrainValidationSplit`.
    """
    if isinstance(dataset, DigitsDataset):
        return _digits_split(dataset, validation_size, seed)
    keys = _item_keys(dataset)
    train_idx, val_idx = validation_split_indices(keys, validation_size, seed)
    what = "file path" if isinstance(dataset, ImageFolderDataset) else "row number"
    if source is None:
        source = f"train_data_dir {dataset.root}" if isinstance(dataset, ImageFolderDataset) else type(dataset).__name__
    info = {"split": "validation", "num_images": len(val_idx), "num_train_images": len(train_idx),
            "method": f"carved from the training data: the {len(val_idx)} of {len(keys)} images ranking first by "
                      f"SHA-256 of (seed, {what})",
            "seed": int(seed), "validation_size": validation_size, "source": source, "num_levels": 256}
    return TrainValidationSplit(SubsetDataset(dataset, train_idx), SubsetDataset(_deterministic(dataset), val_idx),
                                info)


def dataset_split_names(dataset_name: str, cache_dir: Optional[str] = None) -> list[str]:
    """The splits of a ``datasets`` dataset (Hub id, local folder, or ``save_to_disk`` folder); ``[]`` when unknown."""
    import datasets

    if _is_saved_to_disk(dataset_name):
        dict_file = os.path.join(dataset_name, "dataset_dict.json")
        if os.path.isfile(dict_file):
            import json

            with open(dict_file) as f:
                return list(json.load(f).get("splits", []))
        return []
    try:
        return list(datasets.get_dataset_split_names(dataset_name, cache_dir=cache_dir))
    except Exception as e:  # offline without cached metadata, private repo, ...: carve a split instead
        warnings.warn(f"could not list the splits of dataset {dataset_name!r} ({type(e).__name__}: {e}); a validation "
                      f"split is carved out of the training split", stacklevel=2)
        return []


def load_train_validation_split(
    dataset_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    image_column: Optional[str] = None,
    class_column: Optional[str] = None,
    resolution: int = 16,
    in_channels: int = 1,
    center_crop: bool = False,
    random_flip: bool = False,
    skip_bad_images: bool = False,
    cache_dir: Optional[str] = None,
    validation_size: Optional[Union[int, float]] = None,
    validation_split_seed: int = VALIDATION_SPLIT_SEED,
    split: str = "train",
    validate: bool = True,
    min_size: Optional[int] = None,
) -> TrainValidationSplit:
    """:func:`load_training_dataset` plus its held-out validation split; what the training and evaluation scripts call.

    * built-in digits: the fixed 300 held-out digits;
    * ``dataset_name`` with a split named in :data:`DATASET_VALIDATION_SPLITS` (besides ``split``): that split,
      whole, or a seeded subset of ``validation_size`` of it;
    * otherwise (image folders, single-split datasets): :func:`split_train_validation` carves it.

    The split never depends on the process (rank, world size) nor on the training seed, so resumed and
    multi-process runs train and evaluate on the same images.

    Args:
        dataset_name, train_data_dir, image_column, class_column, resolution, in_channels, center_crop,
        random_flip, skip_bad_images, cache_dir, split, validate, min_size: as in :func:`load_training_dataset`.
        validation_size: see :func:`resolve_validation_size` (for a dataset's own split: ``None`` = all of it).
        validation_split_seed: seed of the split (:data:`VALIDATION_SPLIT_SEED` by default).

    Returns:
        :class:`TrainValidationSplit`; ``info`` is ready for ``metrics.json``.
    """
    dataset = load_training_dataset(
        dataset_name=dataset_name, train_data_dir=train_data_dir, image_column=image_column, class_column=class_column,
        resolution=resolution, in_channels=in_channels, center_crop=center_crop, random_flip=random_flip,
        skip_bad_images=skip_bad_images, cache_dir=cache_dir, split=split, validate=validate, min_size=min_size)
    if dataset_name is None:
        return split_train_validation(dataset, validation_size, validation_split_seed)
    own = [s for s in DATASET_VALIDATION_SPLITS if s != split and s in dataset_split_names(dataset_name, cache_dir)]
    if not own:
        return split_train_validation(dataset, validation_size, validation_split_seed,
                                      source=f"dataset_name {dataset_name} (split {split!r})")
    name = own[0]
    transform = ImageTransform(resolution, in_channels, center_crop=True, random_flip=False)
    validation = HFImageDataset(
        load_hf_dataset(dataset_name, name, cache_dir), transform, dataset.image_column, class_column,
        skip_bad_images, validate, min_size, name=f"dataset {dataset_name!r} (split {name!r})",
        class_names=dataset.class_names if class_column is not None else None)
    method = f"the dataset's own {name!r} split"
    if validation_size is not None:
        _, chosen = validation_split_indices(_item_keys(validation), validation_size, validation_split_seed)
        validation = SubsetDataset(validation, chosen)
        method += f", seeded subset (seed {validation_split_seed})"
    info = {"split": name, "num_images": len(validation), "num_train_images": len(dataset), "method": method,
            "seed": int(validation_split_seed) if validation_size is not None else None,
            "validation_size": validation_size, "source": f"dataset_name {dataset_name} (split {split!r})",
            "num_levels": 256}
    return TrainValidationSplit(dataset, validation, info)


def dataset_to_tensors(
    dataset: torch.utils.data.Dataset, max_images: Optional[int] = None
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Load the first ``max_images`` items of a dataset of this module into memory.

    Returns:
        ``(images, labels)``: ``(N, C, R, R)`` float32 in ``[-1, 1]`` and ``(N,)`` int64, or ``None`` when the
        dataset has no class labels.
    """
    count = len(dataset) if max_images is None else min(int(max_images), len(dataset))
    if count < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images!r}")
    items = [dataset[i] for i in range(count)]
    images = torch.stack([it["pixel_values"] for it in items])  # (N, C, R, R)
    labels = torch.stack([it["class_labels"] for it in items]) if "class_labels" in items[0] else None  # (N,)
    return images, labels
