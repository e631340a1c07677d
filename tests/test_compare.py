"""The side-by-side comparison harness (training/comparison/): pure helpers against closed forms, recipes as
train.py flags, miniature end-to-end runs on the digits and on an RGB folder, bits/dim equal to the Trainer's,
and quality per NFE."""

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusers_ddpm_ext.unet import DDPMUNet2DModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))

import comparison as C  # noqa: E402
from comparison import datasets as D  # noqa: E402
from comparison import evaluation as E  # noqa: E402
from comparison import lockstep as L  # noqa: E402
from comparison import nfe as NFE  # noqa: E402
from comparison import recipes as R  # noqa: E402

TINY = {"block_out_channels": [8, 16], "norm_num_groups": 4}


@pytest.fixture(scope="module", autouse=True)
def cheap_swd():
    """Fewer SWD directions and neighbourhoods in this module (every report computes SWD; the paper's settings cost
    seconds per figure against the 300 held-out digits); the reports' swd_method states what was used."""
    from diffusers_ddpm_ext import metrics

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "SWD_SETTINGS", {"num_descriptors": 32, "num_directions": 64, "num_repeats": 1,
                                             "num_bootstrap": 4})
        yield


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


# ------------------------------------------------------------------------------------------- recipes and config


@pytest.mark.parametrize("bad, match", [
    ({"recipes": ("diffusers", "nope")}, "unknown"),
    ({"recipes": ()}, "non-empty"),
    ({"recipes": ("diffusers", "x=--train_batch_size 4")}, "not a recipe flag"),
    ({"recipes": ("x=--loss_type nope",)}, "cannot parse"),
    ({"recipes": ("x=--ddpm_max_beta 1.5",)}, "ddpm_max_beta"),
    ({"sample_steps": (1000, 50), "num_samples": (10,)}, "equal length"),
    ({"sample_steps": (2000,), "num_samples": (10,)}, "sample_steps"),
    ({"bpd_timesteps_sampled": 3}, "even"),
    ({"max_train_steps": 0}, "max_train_steps"),
    ({"budget_seconds": -1.0}, "budget_seconds"),
    ({"preset": "huge"}, "huge"),
    ({"dataset_name": "a", "train_data_dir": "b"}, "either"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        C.CompareConfig(**bad).validate()


def test_recipe_flags_are_train_py_flags():
    recipe = R.parse_recipe('kl2="--ddpm_beta_schedule linear --loss_type kl --timestep_sampler loss-second-moment '
                            '--learning_rate 5e-4 --ema_max_decay 0.999"'.replace('"', ""))
    assert recipe.name == "kl2"
    config = C.CompareConfig(recipes=(recipe,))
    tc = R.train_config(recipe, config, steps=10, num_levels=17)
    assert (tc.loss_type, tc.timestep_sampler, tc.learning_rate, tc.ema_max_decay) == ("kl", "loss-second-moment",
                                                                                     5e-4, 0.999)
    assert tc.lr_warmup_steps == 10 and tc.checkpointing_steps is None and tc.num_levels == 17
    sched = R.make_scheduler(recipe, 1000)
    assert sched.config.beta_schedule == "linear" and sched.config.variance_type == "learned_range"
    # The diffusers recipe keeps train_unconditional.py's learning rate; ours defaults to train.py's.
    assert R.train_config(R.RECIPES["diffusers"], config, 10, 17).learning_rate == 1e-4
    assert R.train_config(R.RECIPES["ours-improved"], config, 10, 17).learning_rate == 2e-3


def test_max_beta_clips_the_cosine_schedule():
    capped = R.make_scheduler(R.parse_recipe("cap=--ddpm_max_beta 0.98"), 1000)
    plain = R.make_scheduler(R.parse_recipe("plain=--ddpm_max_beta 0.999"), 1000)  # cosine's own cap
    default = R.make_scheduler(R.RECIPES["ours-improved"], 1000)  # train.py's default, 0.5
    assert float(plain.betas.max()) == pytest.approx(0.999) and plain.config.trained_betas is None
    assert float(capped.betas.max()) == pytest.approx(0.98) and float(default.betas.max()) == pytest.approx(0.5)
    for clipped, cap in ((capped, 0.98), (default, 0.5)):
        below = plain.betas < cap
        torch.testing.assert_close(clipped.betas[below], plain.betas[below])


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
        assert improved(x, t).sample.shape == (3, 2, 8, 8)
    torch.testing.assert_close(improved.conv_in.weight, ours.conv_in.weight)


def test_cli_maps_flags_to_a_config():
    import compare as cli

    args = cli.build_parser().parse_args(["--output_dir", "x", "--quick", "--train_data_dir", "imgs", "--recipe",
                                          "lin=--ddpm_beta_schedule linear", "--resolution", "32"])
    config = cli.config_from_args(args)
    assert [r.name for r in config.recipes] == ["diffusers", "lin"]
    assert config.train_data_dir == "imgs" and config.resolution == 32 and config.max_train_steps == 300
    default = cli.config_from_args(cli.build_parser().parse_args(["--output_dir", "x"]))
    assert [r.name for r in default.recipes] == ["diffusers", "ours-same", "ours-improved"]


# ------------------------------------------------------------------------------------------- bits/dim


def test_comparison_bits_per_dim_equals_the_trainers(tmp_path):
    """The comparison and train.py's Trainer (what metrics.json reports) compute the same bits/dim for the same
    model, images and seed: the bound as the model samples (x̂0 clipped as its scheduler clips)."""
    from diffusers_ddpm_ext.data import load_heldout_digits
    from diffusers_ddpm_ext.trainer import EvalSet

    config = C.CompareConfig(recipes=("ours-same", "ours-improved"), unet_overrides=TINY, resolution=8,
                             num_train_timesteps=40, seed=5, lr_warmup_steps=1, batch_size=8)
    models = C.build_recipe_models(config)
    images = load_heldout_digits(8)[0][:6]
    for recipe in config.recipes:
        model, scheduler = models[recipe.name]
        trainer = L.make_trainer(recipe, model, scheduler, config, 3, num_levels=17)
        trainer.config.eval_bpd_steps = 4
        trainer.eval_set = EvalSet(images, split="heldout")
        for step in range(3):
            trainer.train_step(torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(step)) * 2 - 1)
        expected = trainer.evaluate_bpd()
        trainer.ema.copy_to(trainer.unwrapped.parameters())
        trainer.unwrapped.eval()
        got = E.held_out_bits_per_dim(trainer.unwrapped, scheduler, images, 17, 4, seed=config.seed)
        assert got["clip_denoised"] is True and expected.clip_denoised is True
        assert got["bits_per_dim"] == expected.mean and got["standard_error"] == expected.mean_standard_error
        assert got["unclipped"]["bits_per_dim"] != got["bits_per_dim"]  # same draws, another bound
        assert "clipped" in got["bound"] and "unclipped" in got["unclipped"]["bound"]


# ------------------------------------------------------------------------------------------- end to end


class _PixelExtractor:
    """Cheap deterministic extractor with `predict`, so the test needs no trained classifier."""

    name = "pixel_extractor"
    heldout_accuracy = None

    def __call__(self, images):
        x = F.adaptive_avg_pool2d(torch.as_tensor(images).float(), 4)  # (B, C, 4, 4)
        return x.flatten(1)

    def predict(self, images):
        f = self(images)
        return torch.softmax(f[:, :10] * 3, dim=1)  # (B, 10)


MINI = dict(unet_overrides=TINY, resolution=8, num_train_timesteps=50, max_train_steps=12, batch_size=16,
            lr_warmup_steps=2, sample_steps=(50, 10), num_samples=(8, 12), sample_batch_size=8, grid_images=8,
            bpd_num_images=6, bpd_timesteps_sampled=4, bpd_exact_images=2, fd_bootstrap=5, speed_rounds=1,
            speed_steps_per_call=2, num_threads=1, seed=3)


@pytest.fixture(scope="module")
def mini_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    config = C.CompareConfig(**MINI, save_models=True)
    report = C.run_comparison(config, str(out), extractor=_PixelExtractor(), progress=False, command="pytest mini")
    return report, out


def test_swd_cells_script_scores_every_recipe_and_the_baselines_long_chain_beside_the_floor(mini_report, capsys):
    """benchmarks/swd_cells.py (README's natural-image SWD table) on the mini comparison's saved models."""
    import importlib.util

    _, out = mini_report
    spec = importlib.util.spec_from_file_location("swd_cells", os.path.join(ROOT, "benchmarks", "swd_cells.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = script.main(["--comparison", str(out), "--resolution", "8", "--num_images", "6", "--steps", "3",
                          "--baseline_steps", "5"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    assert set(result["cells"]) == {"diffusers@3", "diffusers@5", "ours-same@3", "ours-improved@3"}
    for figures in [result["floor_train_vs_heldout"], *result["cells"].values()]:
        assert figures["swd"] > 0 and figures["swd_standard_error"] > 0 and figures["n_generated"] == 6


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
    assert "held-out bits/dim, unclipped" in md and "as sampled" in md and "built-in digits" in md
    on_disk = json.loads((out / "report.json").read_text())
    assert set(on_disk["recipes"]) == set(names) and "_models" not in on_disk
    assert on_disk["config"]["max_train_steps"] == 12 and on_disk["verdict"]
    assert on_disk["data"]["split"]["split"] == "heldout" and on_disk["data"]["heldout_images"] == 300
    loaded = C.load_models(str(out / "models"))
    assert list(loaded) == names and type(loaded["diffusers"][1]).__name__ == "DDPMScheduler"


def test_mini_comparison_fields_are_present_and_sane(mini_report):
    report, _ = mini_report
    r = report["recipes"]
    for name, rec in r.items():
        assert rec["parameters"] > 0 and rec["flops_per_image"] > 0
        assert rec["train_memory"]["peak_bytes"] > rec["train_memory"]["live_bytes"] > 0
        assert rec["sample_memory"]["peak_bytes"] > rec["sample_memory"]["live_bytes"] > 0
        assert rec["training"]["steps"] == 12 and rec["training"]["images_seen"] == 12 * 16
        assert len(rec["loss_curve"]["loss"]) == 12 and all(math.isfinite(v) for v in rec["loss_curve"]["loss"])
        bpd = rec["bits_per_dim"]
        assert bpd["num_images"] == 6 and bpd["network_calls_per_image"] == 4 and bpd["clip_denoised"]
        assert bpd["bits_per_dim"] > 0 and bpd["unclipped"]["bits_per_dim"] > 0 and bpd["exact"]["num_images"] == 2
        for steps, n in (("50", 8), ("10", 12)):
            s = rec["samples"][steps]
            q = s["quality"]
            assert s["num_images"] == n and q["n_generated"] == n and q["n_reference"] == 300
            assert q["fd"] >= 0 and q["fd_standard_error"] > 0 and q["extractor"] == "pixel_extractor"
            assert q["swd_resolutions"] == [8] and q["swd"] == q["swd_8"] > 0 and q["swd_standard_error"] > 0
    d, o = r["diffusers"], r["ours-same"]
    assert d["parameters"] == o["parameters"] and d["flops_per_image"] == o["flops_per_image"]
    assert r["ours-improved"]["flops_per_image"] > d["flops_per_image"]  # one more output channel
    np.testing.assert_allclose(o["loss_curve"]["loss"], d["loss_curve"]["loss"], rtol=1e-4)
    assert report["comparisons"]["ours_same_vs_diffusers_loss"]["max_rel_diff"] < 1e-4
    assert d["bits_per_dim"]["bits_per_dim"] == pytest.approx(o["bits_per_dim"]["bits_per_dim"], rel=1e-3)
    assert report["comparisons"]["ratios_vs_baseline"]["ours-same"]["parameters"] == 1.0
    assert any("unclipped" in line for line in report["verdict"])
    # SWD's real-data floor: the real training images scored like samples, at each N.
    for n in ("8", "12"):
        real = report["real_data_reference"][n]
        assert real["n_generated"] == int(n) and real["swd"] > 0 and real["swd_standard_error"] > 0
    assert any(line.startswith("ours-improved SWD×10³ (lower is better)") and "real images" in line
               for line in report["verdict"])


def test_mini_comparison_report_shows_swd_beside_its_floor(mini_report):
    report, out = mini_report
    md = (out / "report.md").read_text()
    floor = report["real_data_reference"]["12"]
    assert f"| SWD×10³ @10 steps ± bootstrap s.e. (n=12; real images {floor['swd']:.1f} ± " in md
    assert "| SWD×10³ 8 px level @10 steps (n=12; real images" in md
    assert "| SWD×10³ ± s.e. | SWD×10³ per level |" in md and "- **SWD** (weight-free, against the 300" in md
    assert "Laplacian pyramid levels 8 px" in md
    assert "SWD×10³ @10 ± s.e. (n; real images)" in C.readme_table(report)


def test_comparison_without_features_reports_swd_alone(tmp_path):
    """`--feature_extractor auto` offline without a cached encoder: the comparison runs and reports SWD only."""
    from diffusers_ddpm_ext.evaluate import FeaturesUnavailable

    config = C.CompareConfig(**{**MINI, "max_train_steps": 2, "sample_steps": (10,), "num_samples": (8,),
                                "bpd_exact_images": 0, "measure_cost": False}, recipes=("diffusers", "ours-improved"))
    report = C.run_comparison(config, str(tmp_path), extractor=FeaturesUnavailable("facebook/dinov2-base", "offline"),
                              progress=False)
    q = report["recipes"]["ours-improved"]["samples"]["10"]["quality"]
    assert q["fd"] is None and q["extractor"] is None and q["swd"] > 0
    assert report["real_data_reference"]["8"]["fd"] is None and report["real_data_reference"]["8"]["swd"] > 0
    md = (tmp_path / "report.md").read_text()
    assert "FD, KID and precision/recall not computed" in md and "| SWD×10³ @10 steps" in md
    assert "FD @10 steps" not in md and (tmp_path / "ratios.png").read_bytes()[:4] == b"\x89PNG"


def test_same_seed_gives_same_numbers(mini_report):
    report, _ = mini_report
    config = C.CompareConfig(**{**MINI, "sample_steps": (10,), "num_samples": (12,), "bpd_exact_images": 0,
                                "measure_cost": False})
    again = C.run_comparison(config, None, extractor=_PixelExtractor(), progress=False)
    for name in report["recipes"]:
        a, b = report["recipes"][name], again["recipes"][name]
        assert a["loss_curve"]["loss"] == b["loss_curve"]["loss"]
        assert a["bits_per_dim"]["bits_per_dim"] == b["bits_per_dim"]["bits_per_dim"]
        assert a["samples"]["10"]["quality"]["fd"] == b["samples"]["10"]["quality"]["fd"]
    assert "flops_per_image" not in again["recipes"]["diffusers"]


def test_photo_patches_are_seeded_rgb(tmp_path):
    from PIL import Image

    a = D.make_photo_patches(str(tmp_path / "a"), num_images=5, size=16, seed=1)
    b = D.make_photo_patches(str(tmp_path / "b"), num_images=5, size=16, seed=1)
    files = sorted(os.listdir(a))
    assert len(files) == 5 and files == sorted(os.listdir(b))
    first = Image.open(os.path.join(a, files[0]))
    assert first.mode == "RGB" and first.size == (16, 16)
    for f in files:
        assert np.array_equal(np.asarray(Image.open(os.path.join(a, f))), np.asarray(Image.open(os.path.join(b, f))))
    with pytest.raises(ValueError, match="num_images"):
        D.make_photo_patches(str(tmp_path / "c"), num_images=1)


def test_comparison_on_an_rgb_folder_with_a_dinov2_encoder(tmp_path):
    from test_metrics import save_tiny_dinov2

    folder = D.make_photo_patches(str(tmp_path / "patches"), num_images=60, size=8, seed=0)
    encoder = str(save_tiny_dinov2(tmp_path / "tiny-dinov2"))
    config = C.CompareConfig(**{**MINI, "max_train_steps": 4, "sample_steps": (10,), "num_samples": (8,),
                                "bpd_exact_images": 0, "measure_cost": False,
                                "unet_overrides": {**TINY, "in_channels": 3}},
                             recipes=("diffusers", "ours-improved"), train_data_dir=folder, validation_size=12,
                             feature_extractor=encoder)
    report = C.run_comparison(config, str(tmp_path / "out"), progress=False)
    assert report["data"]["split"]["split"] == "validation" and report["data"]["heldout_images"] == 12
    assert report["data"]["train_images"] == 48 and report["data"]["channels"] == 3
    assert report["data"]["num_levels"] == 256
    q = report["recipes"]["ours-improved"]["samples"]["10"]["quality"]
    assert q["n_reference"] == 12 and q["fd"] >= 0 and "dinov2" in q["extractor"].lower()
    assert "train_data_dir" in (tmp_path / "out" / "report.md").read_text()


# ------------------------------------------------------------------------------------------- quality per NFE


def test_quality_per_nfe_reports_points_baseline_and_reach(mini_report, tmp_path):
    _, out = mini_report
    models = C.load_models(str(out / "models"))
    from diffusers_ddpm_ext.data import load_heldout_digits

    reference = load_heldout_digits(8)[0][:40]
    result = NFE.quality_per_nfe(models, reference, _PixelExtractor(), nfe=(2, 5, 50), num_images=8,
                                 batch_size=8, fd_bootstrap=4, max_nfe_others=5)
    points = result["points"]
    # Every sampler for every recipe at NFE 2 and 5; NFE 50 only with the ancestral ddpm sampler.
    assert len(points) == 3 * 5 * 2 + 3
    assert {(p["recipe"], p["sampler"]) for p in points if p["nfe"] == 50} == {(r, "ddpm") for r in models}
    assert all(p["n_generated"] == 8 and p["fd_standard_error"] > 0 for p in points)
    assert all(p["swd"] == p["swd_8"] > 0 and p["swd_standard_error"] > 0 for p in points)
    assert result["swd_resolutions"] == [8] and result["swd_real_data_floor"] is None  # no training images given
    base = result["baseline"]
    assert (base["recipe"], base["sampler"], base["nfe"]) == ("diffusers", "ddpm", 50)
    assert result["threshold_fd"] == pytest.approx(base["fd"] + base["fd_standard_error"])
    for recipe, reach in result["reach"].items():
        if reach is not None:
            assert reach["fd"] <= result["threshold_fd"]
            assert not any(p["recipe"] == recipe and p["nfe"] < reach["nfe"] and p["fd"] <= result["threshold_fd"]
                           for p in points)
    assert result["reach"]["diffusers"] is not None  # the baseline point itself qualifies
    NFE.plot_fd_vs_nfe(result, str(tmp_path / "fd.png"))
    assert (tmp_path / "fd.png").read_bytes()[:4] == b"\x89PNG"
    table = NFE.markdown_table(result)
    assert "| `ours-improved` | dpmsolver++ |" in table and "fewest NFE" in table
    with pytest.raises(ValueError, match="unknown"):
        NFE.quality_per_nfe(models, reference, _PixelExtractor(), samplers=("ddpm", "euler"), num_images=8)


def test_quality_per_nfe_runs_split_by_recipe_merge_to_the_joint_run(mini_report, tmp_path):
    _, out = mini_report
    models = C.load_models(str(out / "models"))
    from diffusers_ddpm_ext.data import load_heldout_digits

    reference = load_heldout_digits(8)[0][:40]
    kwargs = dict(nfe=(2, 5), samplers=("ddpm", "ddim"), num_images=8, batch_size=8, fd_bootstrap=4)
    joint = NFE.quality_per_nfe(models, reference, _PixelExtractor(), **kwargs)
    names = list(models)
    parts = [NFE.quality_per_nfe({n: models[n]}, reference, _PixelExtractor(), **kwargs) for n in names]
    merged = NFE.merge_results(parts)
    strip = lambda ps: [{k: v for k, v in p.items() if k != "wall_seconds"} for p in ps]  # noqa: E731
    assert strip(merged["points"]) == strip(joint["points"])
    assert merged["threshold_fd"] == joint["threshold_fd"] and list(merged["reach"]) == names
    assert {r: (v and v["nfe"]) for r, v in merged["reach"].items()} == \
        {r: (v and v["nfe"]) for r, v in joint["reach"].items()}
    with pytest.raises(ValueError, match="same .recipe, sampler, NFE. point twice"):
        NFE.merge_results([parts[0], parts[0]])
    no_baseline = NFE.quality_per_nfe(models, reference, _PixelExtractor(), **dict(kwargs, samplers=("ddim",),
                                                                                   nfe=(3,)))
    assert "reach" not in no_baseline and len(no_baseline["points"]) == len(names)
    grown = NFE.merge_results(parts + [no_baseline])
    assert grown["nfe"] == [2, 3, 5] and grown["samplers"] == ["ddpm", "ddim"] and grown["baseline"] == merged["baseline"]
    other = dict(parts[1], num_images=16)
    with pytest.raises(ValueError, match="different num_images"):
        NFE.merge_results([parts[0], other])
    with pytest.raises(ValueError, match="no baseline point"):
        NFE.reach_of_baseline([p for p in joint["points"] if p["sampler"] != "ddpm"])


def test_quality_per_nfe_script_writes_swd_and_its_floor(mini_report, tmp_path):
    """benchmarks/quality_per_nfe.py on the mini comparison's models: SWD per point beside its real-data floor in
    the JSON, the table and the plot; without features (auto offline) the reach is read in SWD."""
    import importlib.util

    from diffusers_ddpm_ext.evaluate import FeaturesUnavailable

    _, out = mini_report
    spec = importlib.util.spec_from_file_location("quality_per_nfe", ROOT / "benchmarks" / "quality_per_nfe.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = script.main(["--models", str(out / "models"), "--output_dir", str(tmp_path), "--nfe", "2", "5",
                          "--samplers", "ddpm", "--num_images", "8", "--sample_batch_size", "8", "--fd_bootstrap",
                          "2", "--feature_extractor", "digits-classifier", "--num_threads", "1", "--no_progress"])
    floor = result["swd_real_data_floor"]
    assert (floor["n_real"], floor["n_reference"], floor["split"]) == (8, 300, "train")
    assert all(p["swd"] > 0 and p["swd_standard_error"] > 0 for p in result["points"])
    on_disk = json.loads((tmp_path / "quality_per_nfe.json").read_text())
    assert on_disk["swd_real_data_floor"]["swd"] == pytest.approx(floor["swd"])
    md = (tmp_path / "quality_per_nfe.md").read_text()
    assert "SWD×10³ (no weights), ± bootstrap standard error:" in md and "Real-data floor" in md
    assert f"{floor['swd']:.1f} ± {floor['swd_standard_error']:.1f} (8 px" in md and "reaching the baseline FD" in md
    assert (tmp_path / "fd_vs_nfe.png").read_bytes()[:4] == b"\x89PNG"

    models = C.load_models(str(out / "models"))
    from diffusers_ddpm_ext.data import load_heldout_digits

    reference = load_heldout_digits(8)[0][:40]
    swd_only = NFE.quality_per_nfe(models, reference, FeaturesUnavailable("facebook/dinov2-base", "offline"),
                                   nfe=(2, 5), samplers=("ddpm",), num_images=8, batch_size=8)
    assert swd_only["extractor"] is None and all(p["fd"] is None for p in swd_only["points"])
    base = swd_only["baseline"]
    assert swd_only["reach_metric"] == "swd" and swd_only["threshold_swd"] == base["swd"] + base["swd_standard_error"]
    assert "reaching the baseline SWD×10³" in NFE.markdown_table(swd_only)
    NFE.plot_fd_vs_nfe(swd_only, str(tmp_path / "swd.png"))


def test_ablation_script_writes_its_table(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ablation", ROOT / "benchmarks" / "ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    argv = ["--output_dir", str(tmp_path), "--cells", "default", "cap0.9", "fixed-simple", "--unet_overrides",
            json.dumps(TINY), "--resolution", "8", "--num_train_timesteps", "40", "--max_train_steps", "3",
            "--batch_size", "8", "--lr_warmup_steps", "1", "--bpd_num_images", "4", "--bpd_timesteps_sampled", "4",
            "--sample_steps", "5", "--num_samples", "8", "--feature_extractor", "digits-classifier", "--num_threads",
            "1", "--no_progress"]
    result = ablation.main(argv)
    assert [r["cell"] for r in result["rows"]] == ["diffusers", "default", "cap0.9", "fixed-simple"]
    for row in result["rows"]:
        assert row["bits_per_dim"] > 0 and row["bits_per_dim_unclipped"] > 0 and row["fd"]["5"][2] == 8
        assert row["swd"]["5"][0] > 0 and row["swd"]["5"][1] > 0 and row["swd"]["5"][2] == 8
    floor = result["swd_floor"]["5"]
    assert floor[0] > 0 and floor[2] == 8
    md = (tmp_path / "ablation.md").read_text()
    assert "`--ddpm_max_beta 0.9`" in md and "unclipped" in md
    assert "SWD×10³ @5 ± s.e. (n)" in md and f"@5 steps {floor[0]:.1f} ± {floor[1]:.1f} (n = 8)" in md
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"


def test_solvers_clip_x0_as_the_model_sampler_does():
    from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler

    clipping = GaussianDiffusionScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True, clip_sample_range=1.0)
    free = GaussianDiffusionScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)
    for name in ("dpmsolver++", "unipc"):
        solver = NFE.make_sampler(name, clipping)
        assert solver.config.thresholding and solver.config.sample_max_value == 1.0
        assert solver.config.timestep_spacing == "trailing"
        assert not NFE.make_sampler(name, free).config.thresholding
    assert NFE.make_sampler("ddim", clipping).config.clip_sample  # DDIM reads clip_sample itself
