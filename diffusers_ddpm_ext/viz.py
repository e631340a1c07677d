"""Pictures of a run: one image grid, one loss curve (PIL and matplotlib are imported on use)."""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np

from .rundir import write_bytes_atomic

if TYPE_CHECKING:
    from PIL import Image


def make_image_grid(
    images: Union[np.ndarray, Sequence["Image.Image"]],
    nrow: Optional[int] = None,
    *,
    scale: int = 1,
    min_tile: Optional[int] = None,
    padding: int = 1,
    fill: float = 1.0,
) -> "Image.Image":
    """Tile images into one PIL image, row-major.

    Args:
        images: a (N, H, W, C) float array in [0, 1] (C = 1 or 3), as ``pipeline(output_type="np")`` returns,
            or a list of N PIL images of one size and mode (``"L"`` or ``"RGB"``), as ``output_type="pil"`` does.
        nrow: images per row (torchvision's meaning); default ⌈√N⌉.
        scale: integer nearest-neighbour upscaling of the whole grid, so 16×16 digits are visible.
        min_tile: if given, the scale is raised so that every tile is at least this many pixels on its shorter
            side (⌈min_tile / min(H, W)⌉).
        padding: pixels of ``fill`` between and around tiles (before scaling).
        fill: grey level in [0, 1] of the padding and of the empty cells after the last image (1 = white).

    Returns:
        A PIL image, mode ``"L"`` for one channel, ``"RGB"`` for three.
    """
    from PIL import Image

    pixels = _as_uint8_batch(images)  # (N, H, W, C) uint8
    count, height, width, channels = pixels.shape
    if nrow is not None and (not isinstance(nrow, int) or nrow < 1):
        raise ValueError(f"nrow must be a positive int, got {nrow!r}")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    if padding < 0 or not 0.0 <= fill <= 1.0:
        raise ValueError(f"padding must be >= 0 and fill in [0, 1], got {padding!r}, {fill!r}")
    if min_tile is not None:
        scale = max(scale, math.ceil(min_tile / min(height, width)))
    nrow = nrow or max(1, math.ceil(math.sqrt(count)))
    ncol = math.ceil(count / nrow)  # rows of the grid
    grid = np.full((ncol * (height + padding) + padding, nrow * (width + padding) + padding, channels),
                   round(fill * 255), dtype=np.uint8)
    for index, image in enumerate(pixels):
        row, col = divmod(index, nrow)
        top, left = padding + row * (height + padding), padding + col * (width + padding)
        grid[top:top + height, left:left + width] = image
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return Image.fromarray(grid[..., 0] if channels == 1 else grid, mode="L" if channels == 1 else "RGB")


def _as_uint8_batch(images) -> np.ndarray:
    """(N, H, W, C) uint8 from a [0, 1] float batch (rounded as diffusers' ``numpy_to_pil``) or PIL images."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
            raise ValueError(f"images must be (N, H, W, 1|3) with N >= 1, got shape {images.shape}")
        return (np.clip(images.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    images = list(images)
    if not images:
        raise ValueError("images is empty; need at least one image for a grid")
    if {im.mode for im in images} - {"L", "RGB"} or len({(im.mode, im.size) for im in images}) != 1:
        raise ValueError(f"PIL images must share one size and one mode of 'L'/'RGB', got "
                         f"{sorted({(im.mode, im.size) for im in images})}")
    stacked = np.stack([np.asarray(im) for im in images])
    return stacked[..., None] if stacked.ndim == 3 else stacked


def save_loss_curve(steps: Sequence[int], losses: Sequence[float], path: str, title: str = "training loss") -> None:
    """Plot loss against optimizer step (raw and a moving average) to a PNG with matplotlib's Agg backend.

    The file is replaced atomically (:func:`~diffusers_ddpm_ext.rundir.write_bytes_atomic`): a failed write
    raises ``OutputWriteError`` naming ``path`` and leaves the previous curve, if any, in place.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.add_subplot(1, 1, 1)
    steps, losses = np.asarray(steps, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    axes.plot(steps, losses, lw=0.6, alpha=0.5, label="per step")
    if len(losses) >= 10:
        window = max(2, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axes.plot(steps[window - 1:], smooth, lw=1.5, label=f"mean of {window}")
    if len(losses) and np.all(losses[np.isfinite(losses)] > 0):
        axes.set_yscale("log")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()  # rendered first, then written atomically: a full disk never leaves half a PNG
    figure.savefig(buffer, format="png")
    write_bytes_atomic(path, buffer.getvalue())
