"""Multi-scale sliced Wasserstein distance (Karras et al. 2018): known answers, sensitivity, determinism, errors."""

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from diffusers_ddpm_ext import swd as S

FAST = dict(num_directions=128, num_repeats=1, num_bootstrap=0)  # fewer directions where the test allows it


def _images(n, seed, size=16, channels=3):
    """Smooth random fields with a per-image contrast, (N, C, H, W) in [-1, 1] (about 1% of the pixels clipped)."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((n, channels, size, size)).astype(np.float32))
    for _ in range(2):
        x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    contrast = torch.from_numpy(rng.uniform(1.0, 2.0, (n, 1, 1, 1)).astype(np.float32))
    return (x * contrast).clamp(-1, 1)


def _noise(x, level, seed=123):
    g = torch.Generator().manual_seed(seed)
    return (x + level * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def _blurred(x, passes):
    for _ in range(passes):
        x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return x


# ------------------------------------------------------------------------------------- inner distance


def test_translate_gives_the_projected_shift_in_every_direction():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 6))
    v = rng.standard_normal(6)
    d = rng.standard_normal((6, 40))
    # b = a + v: every projection is shifted by d·v (unit d), so W1 along d is |d·v| exactly.
    expected = np.abs(v @ (d / np.linalg.norm(d, axis=0)))
    w1 = S.sliced_wasserstein(a, a + v, d)
    np.testing.assert_allclose(w1, expected, rtol=1e-10, atol=1e-12)
    assert S.sliced_wasserstein(a, a + v, d).mean() == pytest.approx(expected.mean(), rel=1e-10)
    # Lengths of the directions do not matter; a single known direction reads one coordinate.
    np.testing.assert_allclose(S.sliced_wasserstein(a, a + v, 3 * d), expected, rtol=1e-10)
    e0 = np.eye(6)[:, :1]
    assert S.sliced_wasserstein(a, a + v, e0)[0] == pytest.approx(abs(v[0]), rel=1e-12)


def test_unequal_sizes_compare_quantiles():
    # {0, 1} vs {0, 0.5, 1}: the quantile functions differ by 0.5 on u in (1/3, 2/3], so W1 = 1/6.
    w1 = S.sliced_wasserstein(np.array([[0.0], [1.0]]), np.array([[0.0], [0.5], [1.0]]), np.ones((1, 1)))
    assert w1[0] == pytest.approx(1 / 6, rel=1e-12)
    rng = np.random.default_rng(1)
    a, b, d = rng.standard_normal((7, 3)), rng.standard_normal((5, 3)) + 0.3, rng.standard_normal((3, 4))
    d_unit = d / np.linalg.norm(d, axis=0)
    expected = [scipy.stats.wasserstein_distance(a @ d_unit[:, k], b @ d_unit[:, k]) for k in range(4)]
    np.testing.assert_allclose(S.sliced_wasserstein(a, b, d), expected, rtol=1e-10)
    # Equal sizes: the mean absolute difference of the sorted projections.
    c = rng.standard_normal((7, 3))
    direct = np.abs(np.sort(a @ d_unit, axis=0) - np.sort(c @ d_unit, axis=0)).mean(0)
    np.testing.assert_allclose(S.sliced_wasserstein(a, c, d), direct, rtol=1e-10)


def test_full_direction_variance_extrapolates_a_subset_without_bias():
    # W1 per direction = z_b (shared by all directions) + e_bd (own): Var(mean over D) = c + (v - c) / D.
    rng = np.random.default_rng(2)
    num_resamples, total, subset, c, own = 4000, 2048, 64, 1.0, 30.0
    y = rng.normal(0, np.sqrt(c), (num_resamples, 1)) + rng.normal(0, np.sqrt(own), (num_resamples, subset))
    estimate = S._full_direction_variance(y, total)
    assert estimate == pytest.approx(c + own / total, rel=0.1)
    assert np.var(y.mean(1), ddof=1) > 1.3 * (c + own / total)  # the subset's own variance would be far off
    assert S._full_direction_variance(y, subset) == pytest.approx(np.var(y.mean(1), ddof=1))


# ------------------------------------------------------------------------------------- pyramid and keys


def test_pyramid_resolutions():
    assert S.pyramid_resolutions(64, 64) == [64, 32, 16]
    assert S.pyramid_resolutions(32, 32) == [32, 16]
    assert S.pyramid_resolutions(24, 24) == [24]
    assert S.pyramid_resolutions(16, 16) == [16, 8]
    assert S.pyramid_resolutions(16, 40) == [16, 8]  # the shorter side decides
    assert S.pyramid_resolutions(33, 48) == [33, 17]
    assert S.pyramid_resolutions(8, 8) == [8]
    with pytest.raises(ValueError, match="at least 8"):
        S.pyramid_resolutions(7, 32)


def test_laplacian_levels_of_a_constant_image_are_zero():
    x = torch.full((2, 3, 32, 24), 200.0)
    for level in range(2):
        lap = S._laplacian_level(x, level, coarsest=False)
        assert lap.shape[-2:] == ((32, 24) if level == 0 else (16, 12))
        assert lap.abs().max() == 0
    assert torch.allclose(S._laplacian_level(x, 1, coarsest=True), torch.full((2, 3, 16, 12), 200.0))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size,keys", [(16, ["swd_16", "swd_8"]), (32, ["swd_32", "swd_16"])])
def test_level_keys_for_grey_and_rgb(channels, size, keys):
    out = S.sliced_wasserstein_distance(_images(6, 0, size, channels), _images(5, 1, size, channels),
                                        num_descriptors=16, num_directions=32, num_repeats=2, num_bootstrap=3)
    assert list(out.levels) == keys and out.resolutions == [int(k[4:]) for k in keys]
    assert list(out.level_standard_errors) == keys
    assert out.swd == pytest.approx(np.mean(list(out.levels.values())))
    assert (out.n_generated, out.n_reference, out.num_bootstrap) == (6, 5, 3)
    flat = out.as_dict()
    assert [k for k in flat if k.startswith("swd_") and k[4].isdigit() and not k.endswith("error")] == keys
    assert all(flat[f"{k}_standard_error"] >= 0 for k in keys) and flat["swd_standard_error"] >= 0
    assert "3 resamples" in out.method and "Karras" in out.method


def test_uint8_channels_last_and_float_channels_first_agree():
    x, y = _images(8, 0), _images(8, 1)

    def to_uint8(t):  # (N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, rounded as the metric quantises floats
        return ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    a = S.sliced_wasserstein_distance(x, y, **FAST).as_dict()
    b = S.sliced_wasserstein_distance(to_uint8(x), to_uint8(y), **FAST).as_dict()
    assert a == b
    grey_float = S.sliced_wasserstein_distance(x[:, 0], y[:, :1].numpy(), **FAST)  # (N, H, W) and (N, 1, H, W)
    grey_uint8 = S.sliced_wasserstein_distance(to_uint8(x[:, :1])[..., 0], to_uint8(y[:, :1]), **FAST)
    assert grey_float.as_dict() == grey_uint8.as_dict()


# ------------------------------------------------------------------------------------- what it measures


def test_a_second_draw_is_far_below_a_corrupted_copy():
    ref, other = _images(64, 0, size=32), _images(64, 1, size=32)
    kwargs = dict(num_directions=256, num_repeats=2, num_bootstrap=10)
    same = S.sliced_wasserstein_distance(other, ref, **kwargs)
    noisy = S.sliced_wasserstein_distance(_noise(other, 0.2), ref, **kwargs)
    blurry = S.sliced_wasserstein_distance(_blurred(other, 1), ref, **kwargs)
    for bad in (noisy, blurry):
        assert bad.swd > 3 * same.swd
        assert bad.swd - same.swd > 5 * np.hypot(bad.swd_standard_error, same.swd_standard_error)
        assert bad.levels["swd_32"] > 5 * same.levels["swd_32"]  # noise and blur show most at the finest level


def test_swd_rises_with_noise_and_with_blur():
    ref, other = _images(48, 0, size=32), _images(48, 1, size=32)
    noise = [S.sliced_wasserstein_distance(_noise(other, s), ref, **FAST).swd for s in (0.0, 0.1, 0.2, 0.3, 0.5)]
    assert all(b > a for a, b in zip(noise, noise[1:])), noise
    blur = [S.sliced_wasserstein_distance(_blurred(other, k), ref, **FAST).swd for k in (0, 1, 2, 4)]
    assert all(b > a for a, b in zip(blur, blur[1:])), blur


def test_seed_determinism():
    x, y = _images(10, 0), _images(12, 1)
    kwargs = dict(num_descriptors=32, num_directions=64, num_repeats=2, num_bootstrap=4)
    first = S.sliced_wasserstein_distance(x, y, seed=3, **kwargs).as_dict()
    assert S.sliced_wasserstein_distance(x.clone(), y.numpy(), seed=3, **kwargs).as_dict() == first
    other = S.sliced_wasserstein_distance(x, y, seed=4, **kwargs).as_dict()
    assert other["swd"] != first["swd"] and other["swd_standard_error"] != first["swd_standard_error"]
    assert all(other[k] != first[k] for k in ("swd_16", "swd_8"))


# ------------------------------------------------------------------------------------- errors


def test_errors_name_the_bad_value():
    ok = _images(4, 0)
    cases = [
        ((torch.zeros(4, 3, 7, 7), ok), "7x7 px are too small.*at least 8"),
        ((torch.zeros(4, 1, 16, 6), torch.zeros(4, 1, 16, 6)), "16x6 px are too small"),
        ((_images(4, 0, channels=1), ok), "channels differ: generated has 1, reference 3"),
        ((ok, _images(4, 1, size=32)), "image sizes differ: generated 16x16, reference 32x32"),
        ((ok[:1], ok), "generated needs at least 2 images, got 1"),
        ((ok, ok[:1]), "reference needs at least 2 images, got 1"),
        ((np.zeros((4, 16, 16, 3), np.float32), ok), r"channels-last floats"),
        ((np.zeros((4, 16, 16, 3), np.int64), ok), "uint8.*or float.*int64"),
        ((np.zeros((4, 3, 16, 16), np.uint8), ok), r"uint8 images must have shape \(N, H, W, C\)"),
    ]
    for (a, b), message in cases:
        with pytest.raises(ValueError, match=message):
            S.sliced_wasserstein_distance(a, b, **FAST)
    nan = ok.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        S.sliced_wasserstein_distance(nan, ok, **FAST)
    for name, value in [("num_bootstrap", 1), ("num_directions", 0), ("num_descriptors", 0), ("num_repeats", 0),
                        ("seed", -1)]:
        with pytest.raises(ValueError, match=name):
            S.sliced_wasserstein_distance(ok, ok, **{**FAST, name: value})
    with pytest.raises(ValueError, match="non-zero"):
        S.sliced_wasserstein(np.ones((3, 2)), np.ones((3, 2)), np.zeros((2, 1)))
