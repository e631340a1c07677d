"""Image decoding, checks and torchvision-free transforms for training data (PIL, numpy and torch only).

Every bad image (unreadable, truncated, a decompression bomb, 16-bit or float modes, too small) gets a
:class:`BadImageError` naming the file or row and the reason; :class:`ImageTransform` resizes the shorter side,
crops (center or seeded random), optionally flips, and maps pixels to [-1, 1].
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger("diffusers_ddpm_ext.data")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
CONVERTIBLE_MODES = ("1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "LA", "La", "PA", "RGBA", "RGBa")
REJECTED_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_CHANNEL_MODES = {1: "L", 3: "RGB"}
GREY_MODES = ("1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")
"""Modes of a grey image (:func:`image_channels`); ``P``/``PA`` are grey when their palette is."""


class BadImageError(ValueError):
    """An image cannot be used for training; the message names the file (or row) and the reason."""


# ----------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------


def convert_image_mode(image: Image.Image, in_channels: int) -> Image.Image:
    """Convert ``image`` to ``"L"`` (1 channel) or ``"RGB"`` (3 channels); see the module doc for the policy.

    Raises:
        BadImageError: for a rejected or unknown mode.
    """
    target = _check_channels(in_channels)
    mode = image.mode
    if mode in REJECTED_MODES or mode not in CONVERTIBLE_MODES:
        raise BadImageError(
            f"unsupported image mode {mode!r}: 16/32-bit and float modes {list(REJECTED_MODES)} would be clipped to "
            f"8 bits by PIL; convertible modes are {list(CONVERTIBLE_MODES)}"
        )
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        # Transparent pixels carry arbitrary colours; composite over black so they become background.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return image if image.mode == target else image.convert(target)


def image_channels(image: Image.Image) -> int:
    """The channels ``image`` holds: 1 for a grey mode (:data:`GREY_MODES`, or a palette of greys only), else 3.

    Read from the mode, which ``Image.open`` takes from the file's header without decoding the pixels (only
    palette images are decoded, to read their palette). An RGB file whose pixels happen to be grey counts as colour.
    """
    if image.mode in ("P", "PA"):
        palette = np.asarray(image.getpalette() or [], dtype=np.int64).reshape(-1, 3)  # (colours, 3)
        return 3 if (palette != palette[:, :1]).any() else 1
    return 1 if image.mode in GREY_MODES else 3


def resize_shorter_side(image: Image.Image, size: int, resample=Image.BILINEAR) -> Image.Image:
    """Resize so the shorter side is ``size``, keeping the aspect ratio (torchvision ``Resize(size)`` on PIL)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return image.resize((new_w, new_h), resample)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crop the central ``size x size`` window (same rounding as torchvision ``CenterCrop``)."""
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def random_crop(image: Image.Image, size: int, generator: Optional[torch.Generator] = None) -> Image.Image:
    """Crop a ``size x size`` window at a position drawn from ``generator``."""
    w, h = image.size
    top = int(torch.randint(0, h - size + 1, (), generator=generator))
    left = int(torch.randint(0, w - size + 1, (), generator=generator))
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit ``L``/``RGB`` image to a ``(C, H, W)`` float32 tensor in ``[-1, 1]`` (ToTensor + Normalize(0.5, 0.5))."""
    a = np.asarray(image, dtype=np.float32) / 255.0  # (H, W) or (H, W, C)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a.transpose(2, 0, 1).copy()) * 2 - 1  # (C, H, W)


@dataclass
class ImageTransform:
    """The training transform of ``train_unconditional.py`` without torchvision.

    ``mode conversion -> resize shorter side (bilinear) -> center or random crop -> random horizontal flip
    -> tensor in [-1, 1]``. A plain dataclass, so it pickles into DataLoader workers; randomness comes only
    from the ``generator`` passed per call (crop position first, then the flip).

    Args:
        resolution: output side length.
        in_channels: 1 (``"L"``) or 3 (``"RGB"``).
        center_crop: center crop if True, random crop otherwise.
        random_flip: flip left-right with probability 1/2.
    """

    resolution: int
    in_channels: int = 3
    center_crop: bool = False
    random_flip: bool = False

    def __post_init__(self):
        _check_resolution(self.resolution)
        _check_channels(self.in_channels)

    def __call__(self, image: Image.Image, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        image = convert_image_mode(image, self.in_channels)
        image = resize_shorter_side(image, self.resolution)
        if self.center_crop:
            image = center_crop(image, self.resolution)
        else:
            image = random_crop(image, self.resolution, generator)
        x = to_tensor(image)  # (C, R, R)
        if self.random_flip and bool(torch.rand((), generator=generator) < 0.5):
            x = x.flip(-1)
        return x


# ----------------------------------------------------------------------------------------------------
# Validation of image files
# ----------------------------------------------------------------------------------------------------


def min_image_size(resolution: int) -> int:
    """Smallest accepted shorter side: ``max(min(8, resolution), resolution // 4)``."""
    return max(min(8, resolution), resolution // 4)


@dataclass
class ScanReport:
    """Outcome of the up-front scan: ``total`` images seen and ``bad`` = list of ``(name, kind, detail)``."""

    total: int = 0
    bad: list = field(default_factory=list)

    KINDS = ("corrupt", "empty", "unsupported_mode", "too_small")

    @property
    def counts(self) -> dict:
        """``{kind: count}`` in the fixed order of :attr:`KINDS`."""
        c = Counter(kind for _, kind, _ in self.bad)
        return {kind: c[kind] for kind in self.KINDS if c[kind]}

    def summary(self) -> str:
        parts = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in self.counts.items())
        first = f" (first: {self.bad[0][0]})" if self.bad else ""
        return f"{len(self.bad)} of {self.total} images: {parts}{first}" if self.bad else f"0 of {self.total} images"


def check_image(
    source: Union[str, bytes], resolution: int, in_channels: int, min_size: Optional[int] = None
) -> Optional[tuple[str, str]]:
    """Open one image fully and check it; ``None`` if usable, else ``(kind, detail)``.

    ``kind`` is one of ``"empty"``, ``"corrupt"``, ``"unsupported_mode"``, ``"too_small"``.

    Args:
        source: a file path or the encoded bytes.
        resolution: training resolution (sets the minimum size).
        in_channels: 1 or 3 (the conversion is tried).
        min_size: override of :func:`min_image_size`.
    """
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            return "empty", "0 bytes"
        opener = lambda: Image.open(io.BytesIO(source))  # noqa: E731
    else:
        try:
            if os.path.getsize(source) == 0:
                return "empty", "0 bytes"
        except OSError as e:
            return "corrupt", f"{type(e).__name__}: {e}"
        opener = lambda: Image.open(source)  # noqa: E731
    try:
        with opener() as im:
            im.verify()  # checksums / structure, without decoding
        with opener() as im:
            im.load()  # decoding catches truncated data that verify() does not see
            size = im.size
            convert_image_mode(im, in_channels)
    except BadImageError as e:
        return "unsupported_mode", str(e)
    except Exception as e:  # PIL raises many types for broken files (OSError, SyntaxError, ValueError, ...)
        return "corrupt", f"{type(e).__name__}: {e}"
    min_size = min_image_size(resolution) if min_size is None else min_size
    if min(size) < min_size:
        return "too_small", f"{size[0]}x{size[1]} px, minimum shorter side is {min_size} px"
    return None


def _finish_scan(report: ScanReport, where: str, skip_bad_images: bool) -> None:
    if not report.bad:
        return
    if skip_bad_images:
        msg = f"skipped {report.summary()} in {where}"
        warnings.warn(msg, stacklevel=3)
        logger.warning(msg)
        return
    lines = [f"  {name}: {kind.replace('_', ' ')} ({detail})" for name, kind, detail in report.bad[:20]]
    more = f"\n  ... and {len(report.bad) - 20} more" if len(report.bad) > 20 else ""
    raise BadImageError(
        f"{len(report.bad)} of {report.total} images in {where} cannot be used ({report.summary()}):\n"
        + "\n".join(lines)
        + more
        + "\nFix or remove them, or pass skip_bad_images=True (--skip_bad_images) to skip them."
    )


# ----------------------------------------------------------------------------------------------------
# Grey or RGB (what data_channels in data.py finds for a whole data source)
# ----------------------------------------------------------------------------------------------------


class DataChannelsError(ValueError):
    """A model's ``in_channels`` disagree with the data's (grey or RGB); raised instead of converting the images."""


@dataclass
class DataChannels:
    """What :func:`diffusers_ddpm_ext.data.data_channels` found: ``channels`` (1 grey, 3 RGB; None when no image
    could be read), ``num_colour`` / ``num_grey`` images, ``source`` (how messages name the data) and
    ``first_colour`` (an example colour image, for mixed data)."""

    channels: Optional[int]
    num_colour: int
    num_grey: int
    source: str
    first_colour: Optional[str] = None

    @property
    def name(self) -> str:
        return {1: "grey", 3: "RGB"}.get(self.channels, "unreadable")

    def describe(self) -> str:
        """``"12 of 300 images are colour (first: a.png), 288 grey"``, ``"all 300 images are colour"``."""
        total = self.num_colour + self.num_grey
        if self.num_colour and self.num_grey:
            return (f"{self.num_colour} of {total} images are colour (first: {self.first_colour}), {self.num_grey} "
                    f"grey")
        return f"all {total} images are {'colour' if self.num_colour else 'grey'}"


def check_data_channels(in_channels: int, data: DataChannels, model: str, advice: str = "") -> None:
    """Refuse a model whose ``in_channels`` disagree with the data's, instead of converting the images silently.

    Args:
        in_channels: the model's input channels.
        data: :func:`diffusers_ddpm_ext.data.data_channels` of the data.
        model: how the message names the model (e.g. ``"--unet_preset 'digits-small'"``).
        advice: what to do, appended to the message.

    Raises:
        DataChannelsError: naming the model, both channel counts and what the data holds.
    """
    if data.channels is None or int(in_channels) == data.channels:
        return
    kind = {1: "grey", 3: "RGB"}.get(int(in_channels), f"{in_channels}-channel")
    raise DataChannelsError(f"{model} takes {kind} images (in_channels={in_channels}) but the data, {data.source}, "
                            f"is {data.name} ({data.describe()}: in_channels={data.channels}); images are never "
                            f"converted silently. {advice}".rstrip())


# ----------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------


def _check_channels(in_channels) -> str:
    if in_channels not in _CHANNEL_MODES:
        raise ValueError(f"in_channels must be 1 (grey, 'L') or 3 (RGB), got {in_channels!r}")
    return _CHANNEL_MODES[in_channels]


def _check_resolution(resolution) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise ValueError(f"resolution must be a positive int (square images), got {resolution!r}")
