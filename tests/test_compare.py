"""The side-by-side comparison: pure helpers against closed forms, and a miniature end-to-end run."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusers_ddpm_ext import compare as C
from diffusers_ddpm_ext.unet import DDPMUNet2DModel

TINY = {"block_out_channels": [8, 16], "norm_num_groups": 4}


# ------------------------------------------------------------------------------------------- FLOPs


def test_count_flops_of_a_conv_matches_the_formula():
    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1)

    class Wrap(nn.Module):  # count_flops calls model(sample, timestep)
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x, t):
            return self.conv(x)

    flops = C.count_flops(Wrap(), (4, 3, 7, 9))
    assert flops == 2 * 5 * 7 * 9 * 3 * 3 * 3  # 2 · C_out · H · W · C_in · k² per image (bias not counted)


def test_count_flops_includes_cpu_attention():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x, t):  # x: (B, heads, L, d)
            return F.scaled_dot_product_attention(x, x, x)

    b, h, length, d = 2, 3, 10, 8
    # QKᵀ and AV: 2 matmuls of L·L·d multiply-adds per head.
    assert C.count_flops(Attn(), (b, h, length, d)) == 2 * 2 * h * length * length * d


def test_flops_and_parameters_equal_for_converted_models():
    torch.manual_seed(0)
    ours = DDPMUNet2DModel.from_preset("digits-small")
    theirs = ours.to_unet2d()
    assert C.count_flops(ours, (1, 1, 16, 16)) == C.count_flops(theirs, (1, 1, 16, 16)) > 50e6
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


# ------------------------------------------------------------------------------------------- memory


def test_peak_memory_sees_a_known_allocation():
    n = 1_000_000  # 4 MB of float32, freed before the function returns

    def fn():
        a = torch.ones(n)
        b = a * 2  # another 4 MB live at the same time
        return float(b.sum())

    peak = C.peak_memory_bytes(fn)
    assert peak is not None
    assert 8 * n <= peak < 8 * n + 1_000_000


def test_tensor_bytes_counts_shared_storage_once():
    a = torch.zeros(10, 10)
    assert C.tensor_bytes([a, a[2:], {"x": [a.view(-1)]}]) == 400
    assert C.tensor_bytes([a, torch.zeros(5, dtype=torch.float64)]) == 440


# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("bad", [
    {"recipes": ("diffusers", "nope")},
    {"recipes": ()},
    {"sample_steps": (1000, 50), "num_samples": (10,)},
    {"sample_steps": (2000,), "num_samples": (10,)},
    {"bpd_timesteps_sampled": 3},
    {"max_train_steps": 0},
    {"budget_seconds": -1.0},
    {"preset": "huge"},
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        C.CompareConfig(**bad).validate()


def test_recipe_models_share_initial_weights():
    config = C.CompareConfig(unet_overrides=TINY, resolution=8)
    models = C.build_recipe_models(config)
    unet2d, ddpm = models["diffusers"]
    ours, ours_sched = models["ours-same"]
    improved, improved_sched = models["ours-improved"]
    assert type(unet2d).__name__ == "UNet2DModel" and type(ddpm).__name__ == "DDPMScheduler"
    assert isinstance(ours, DDPMUNet2DModel) and improved.config.out_channels == 2
    assert ours_sched.config.beta_schedule == ddpm.config.beta_schedule == "linear"
    assert improved_sched.config.variance_type == "learned_range"
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t).sample, unet2d(x, t).sample, atol=1e-5, rtol=1e-5)
        # Every layer but conv_out starts equal (same seed), so only the variance channel is new.
        assert improved(x, t).sample.shape == (3, 2, 8, 8)
    torch.testing.assert_close(improved.conv_in.weight, ours.conv_in.weight)


def test_optional_recipe_separates_the_schedule():
    config = C.CompareConfig(unet_overrides=TINY, resolution=8, recipes=("ours-same", "ours-hybrid-linear"))
    models = C.build_recipe_models(config)
    model, sched = models["ours-hybrid-linear"]
    assert list(models) == ["ours-same", "ours-hybrid-linear"] and model.config.out_channels == 2
    assert (sched.config.beta_schedule, sched.config.variance_type) == ("linear", "learned_range")


# ------------------------------------------------------------------------------------------- end to end


class _PixelExtractor:
    """Cheap deterministic extractor with `predict`, so the test needs no trained classifier."""

    __name__ = "pixel_extractor"
    heldout_accuracy = None

    def __call__(self, images):
        x = F.adaptive_avg_pool2d(torch.as_tensor(images).float(), 4)  # (B, 1, 4, 4)
        return x.flatten(1)  # (B, 16)

    def predict(self, images):
        f = self(images)
        return torch.softmax(f[:, :10] * 3, dim=1)  # (B, 10)


@pytest.fixture(scope="module")
def mini_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    config = C.CompareConfig(
        unet_overrides=TINY, resolution=8, num_train_timesteps=50, max_train_steps=12, batch_size=16,
        lr_warmup_steps=2, learning_rate=2e-3, sample_steps=(50, 10), num_samples=(8, 12), sample_batch_size=8,
        grid_images=8, bpd_num_images=6, bpd_timesteps_sampled=4, bpd_exact_images=2, bpd_batch_size=64,
        speed_rounds=1, speed_steps_per_call=2, num_threads=1, seed=3,
    )
    report = C.run_comparison(config, str(out), extractor=_PixelExtractor(), progress=False, command="pytest mini")
    return report, out


def test_mini_comparison_writes_every_file(mini_report):
    report, out = mini_report
    names = ["diffusers", "ours-same", "ours-improved"]
    expected = {"report.md", "report.json", "loss_curves.png", "ratios.png"}
    expected |= {f"samples_{n}_{s}steps.png" for n in names for s in (50, 10)}
    assert expected <= set(os.listdir(out))
    for png in expected - {"report.md", "report.json"}:
        with open(out / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "pytest mini" in md and "| `ours-improved` |" in md and "![loss curves](loss_curves.png)" in md
    for n in names:
        assert f"samples_{n}_10steps.png" in md
    on_disk = json.loads((out / "report.json").read_text())
    assert set(on_disk["recipes"]) == set(names)
    assert on_disk["config"]["max_train_steps"] == 12 and on_disk["verdict"]


def test_mini_comparison_fields_are_present_and_sane(mini_report):
    report, _ = mini_report
    r = report["recipes"]
    for name, rec in r.items():
        assert rec["parameters"] > 0 and rec["flops_per_image"] > 0
        assert rec["train_memory"]["peak_bytes"] > rec["train_memory"]["live_bytes"] > 0
        assert rec["sample_memory"]["peak_bytes"] > rec["sample_memory"]["live_bytes"] > 0
        assert rec["training"]["steps"] == 12 and rec["training"]["images_seen"] == 12 * 16
        assert rec["training"]["train_img_per_s"] > 0 and len(rec["loss_curve"]["loss"]) == 12
        assert all(math.isfinite(v) for v in rec["loss_curve"]["loss"])
        bpd = rec["bits_per_dim"]
        assert bpd["num_images"] == 6 and bpd["network_calls_per_image"] == 4
        assert bpd["bits_per_dim"] > 0 and bpd["standard_error"] >= 0 and bpd["exact"]["num_images"] == 2
        assert rec["sampling_speed"]["image_steps_per_s"] > 0
        for steps, n in (("50", 8), ("10", 12)):
            s = rec["samples"][steps]
            q = s["quality"]
            assert s["num_images"] == n and q["n_generated"] == n and q["n_reference"] == 300
            assert s["img_per_s"] > 0 and q["fd"] >= 0 and 0 <= q["precision"] <= 1 and 0 <= q["recall"] <= 1
            assert 0 <= q["mode_coverage"] <= 1 and q["extractor"] == "pixel_extractor"
    # Recipes 1 and 2 are the same network with the same weights, data and objective.
    d, o = r["diffusers"], r["ours-same"]
    assert d["parameters"] == o["parameters"] and d["flops_per_image"] == o["flops_per_image"]
    assert r["ours-improved"]["flops_per_image"] > d["flops_per_image"]  # one more output channel
    np.testing.assert_allclose(o["loss_curve"]["loss"], d["loss_curve"]["loss"], rtol=1e-4)
    cmp = report["comparisons"]["ours_same_vs_diffusers_loss"]
    assert cmp["near_identical"] and cmp["max_rel_diff"] < 1e-4
    assert d["bits_per_dim"]["bits_per_dim"] == pytest.approx(o["bits_per_dim"]["bits_per_dim"], rel=1e-3)
    assert d["samples"]["10"]["quality"]["fd"] == pytest.approx(o["samples"]["10"]["quality"]["fd"], rel=1e-2, abs=1e-3)
    ratios = report["comparisons"]["ratios_vs_baseline"]
    assert ratios["diffusers"]["train_img_per_s"] == 1.0 and ratios["ours-same"]["parameters"] == 1.0
    assert report["real_data_reference"]["8"]["n_generated"] == 8


def test_same_seed_gives_same_numbers(mini_report, tmp_path):
    report, _ = mini_report
    config = C.CompareConfig(**{k: tuple(v) if isinstance(v, list) and k != "unet_overrides" else v
                                for k, v in report["config"].items()})
    config.max_train_steps, config.sample_steps, config.num_samples = 12, (10,), (12,)
    config.bpd_exact_images = 0
    again = C.run_comparison(config, None, extractor=_PixelExtractor(), progress=False)
    for name in report["recipes"]:
        a, b = report["recipes"][name], again["recipes"][name]
        assert a["loss_curve"]["loss"] == b["loss_curve"]["loss"]
        assert a["bits_per_dim"]["bits_per_dim"] == b["bits_per_dim"]["bits_per_dim"]
        assert a["samples"]["10"]["quality"]["fd"] == b["samples"]["10"]["quality"]["fd"]


def test_image_grid_layout():
    imgs = torch.full((10, 1, 4, 4), -1.0)  # black tiles
    grid = C._image_grid(imgs, ncol=4, scale=2, padding=1)
    assert grid.shape == ((3 * 5 + 1) * 2, (4 * 5 + 1) * 2) and grid.dtype == np.uint8
    assert grid[0, 0] == 255 and grid[2, 2] == 0  # padding white, tile black
