"""The one image grid and the one loss curve (diffusers_ddpm_ext.viz)."""

import numpy as np
import pytest
from PIL import Image

from diffusers_ddpm_ext.viz import make_image_grid, save_loss_curve


def test_image_grid_of_a_numpy_batch():
    images = np.random.default_rng(0).random((6, 4, 5, 1))
    grid = make_image_grid(images, nrow=3, scale=2, padding=1)
    assert grid.mode == "L" and grid.size == ((3 * 6 + 1) * 2, (2 * 5 + 1) * 2)
    pixels = np.asarray(grid)[::2, ::2]  # undo the 2x nearest-neighbour upscaling
    # Tile 4 (row 1, column 1) sits after one padding line and one tile; values rounded as numpy_to_pil does.
    top, left = 1 + 4 + 1, 1 + 5 + 1
    assert np.array_equal(pixels[top:top + 4, left:left + 5],
                          (images[4, ..., 0].astype(np.float32) * 255).round().astype(np.uint8))
    assert pixels[0].min() == 255  # white padding
    rgb = make_image_grid(np.zeros((4, 3, 3, 3)))
    assert rgb.mode == "RGB" and rgb.size == (2 * 4 + 1, 2 * 4 + 1)  # default: ⌈√4⌉ = 2 per row
    assert make_image_grid(np.zeros((2, 16, 12, 1)), min_tile=64, padding=0).size == (2 * 12 * 6, 16 * 6)
    for bad, match in ((np.zeros((3, 3)), "shape"), (np.zeros((0, 2, 2, 1)), "shape"), ([], "empty")):
        with pytest.raises(ValueError, match=match):
            make_image_grid(bad)
    with pytest.raises(ValueError, match="nrow"):
        make_image_grid(np.zeros((2, 2, 2, 1)), nrow=0)


@pytest.mark.parametrize("count, mode", [(3, "L"), (5, "RGB"), (9, "L")])
def test_image_grid_of_pil_images_reproduces_hub_sample_grid(count, mode):
    """hub.make_sample_grid (PIL images, `rows`, black empty cells, no padding, always RGB as diffusers'
    make_image_grid makes it) is one call of make_image_grid."""
    from diffusers_ddpm_ext.hub import make_sample_grid

    rng = np.random.default_rng(count)
    channels = 1 if mode == "L" else 3
    images = [Image.fromarray((rng.random((12, 10, channels)) * 255).astype(np.uint8).squeeze(), mode=mode)
              for _ in range(count)]
    rows = max(1, int(np.sqrt(count)))
    ours = make_image_grid(images, nrow=-(-count // rows), min_tile=64, padding=0, fill=0.0)
    assert ours.mode == mode
    ours, theirs = ours.convert("RGB"), make_sample_grid(images, min_tile=64)
    assert ours.size == theirs.size
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    with pytest.raises(ValueError, match="one size and one mode"):
        make_image_grid([images[0], images[0].resize((4, 4))])


def test_loss_curve_is_a_png(tmp_path):
    path = tmp_path / "plots" / "curve.png"
    save_loss_curve(range(1, 31), np.linspace(1, 0.1, 30), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
