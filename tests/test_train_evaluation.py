"""What training/train.py measures and how it is set up: a held-out split for every data source (never trained on,
the same for 1 or 2 processes and on resume), bits/dim under both bounds, SWD beside its real-data floor and
FD/KID/PR on it in metrics.json and the model card, offline runs that report SWD without an encoder (decided at
once, no Hub retries), an encoder named explicitly that cannot be loaded failing before training, and the default
learning rate of every preset (a short run at that rate lowers a fixed loss)."""

import json
import math
import os
import re
import subprocess
import sys
import time
import types
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_metrics import save_tiny_dinov2
from train_helpers import FAST, TRAIN, TRAIN_PY, run_train

from diffusers_ddpm_ext import build, runflags
from diffusers_ddpm_ext.unet import UNET_PRESETS, DDPMUNet2DModel

ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES, HELD_OUT = 40, 8


def _image_id(pixels: torch.Tensor) -> int:
    """The id an RGB test image carries in its red channel ((C, H, W) in [-1, 1], constant per image)."""
    return int(round(float((pixels[0].mean() + 1) * 127.5) / 5))


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    """40 RGB 8x8 images, each a distinct flat colour whose red value encodes its id (5 * id)."""
    folder = tmp_path_factory.mktemp("rgb") / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(NUM_IMAGES):
        pixels = np.empty((8, 8, 3), np.uint8)
        pixels[..., 0] = 5 * index
        pixels[..., 1:] = rng.integers(0, 256, 2, dtype=np.uint8)
        Image.fromarray(pixels, mode="RGB").save(folder / f"img_{index:02d}.png")
    return folder


@pytest.fixture(scope="module")
def rgb_unet_config(tmp_path_factory):
    config = dict(UNET_PRESETS["digits-small"]["config"], in_channels=3, sample_size=8)
    config.pop("out_channels")
    path = tmp_path_factory.mktemp("unet") / "unet_rgb.json"
    path.write_text(json.dumps(config))
    return path


def _flags(*argv):
    return TRAIN.parse_args([str(a) for a in argv])


def _fake_accelerator(num_processes=1, rank=0):
    return types.SimpleNamespace(num_processes=num_processes, process_index=rank, is_main_process=rank == 0,
                                 main_process_first=nullcontext)


def _epoch_ids(loader, epoch=0):
    loader.batch_sampler.set_epoch(epoch)
    return [_image_id(x) for batch in loader for x in batch["pixel_values"]]


def test_held_out_images_are_never_trained_on_with_one_or_two_processes(rgb_folder, rgb_unet_config):
    flags = _flags("--train_data_dir", rgb_folder, "--unet_config", rgb_unet_config, "--validation_size", HELD_OUT,
                   "--train_batch_size", 4, "--random_flip")
    model = build.build_unet(config_path=str(rgb_unet_config), variance_type="learned_range")
    loader, eval_set, num_levels = build.build_data(flags, model, _fake_accelerator())
    held_out = sorted(_image_id(x) for x in eval_set.images)
    assert len(held_out) == HELD_OUT and eval_set.split == "validation" and num_levels == 256
    assert sorted(_image_id(item["pixel_values"]) for item in eval_set.reference) == held_out
    for epoch in range(3):  # every training batch of three epochs: the 32 others, never a held-out image
        seen = _epoch_ids(loader, epoch)
        assert sorted(seen) == sorted(set(range(NUM_IMAGES)) - set(held_out))
    info = eval_set.info
    assert (info["num_images"], info["num_train_images"], info["seed"]) == (HELD_OUT, NUM_IMAGES - HELD_OUT, 0)

    # Two processes: the same held-out images, the ranks' batches together are the same training images.
    ranks = [build.build_data(flags, model, _fake_accelerator(2, rank)) for rank in (0, 1)]
    for _, other, _ in ranks:
        assert torch.equal(other.images, eval_set.images)
    assert sorted(_epoch_ids(ranks[0][0]) + _epoch_ids(ranks[1][0])) == sorted(_epoch_ids(loader))

    # Another split seed holds out other images; a resumed run may not change either split flag.
    reseeded = _flags("--train_data_dir", rgb_folder, "--unet_config", rgb_unet_config, "--validation_size", HELD_OUT,
                      "--validation_split_seed", 1)
    assert sorted(_image_id(x) for x in build.build_data(reseeded, model, _fake_accelerator())[1].images) != held_out
    for name, old, new in (("validation_size", 8, 10), ("validation_split_seed", 0, 1)):
        with pytest.raises(ValueError, match=f"--{name} cannot change on resume"):
            runflags.compare_flags({name: old}, {name: new}, allowed=())
        with pytest.raises(ValueError, match="can never change on resume"):
            runflags.parse_allowed_flags(name)
    assert {"validation_size", "validation_split_seed"} <= set(runflags.SCRIPT_RESULT_FLAGS)


def test_accelerate_launch_on_an_rgb_folder_writes_held_out_bpd_and_sample_quality(rgb_folder, rgb_unet_config,
                                                                                    tmp_path):
    """The command of issue 15: `accelerate launch training/train.py --train_data_dir <RGB folder>`, with a tiny
    random DINOv2 saved locally as the encoder (the default, facebook/dinov2-base, needs the Hub)."""
    encoder = save_tiny_dinov2(tmp_path / "tiny-dinov2")
    out = tmp_path / "rgb-run"
    fast = [str(a) for a in FAST]
    fast[fast.index("--eval_quality_num_images") + 1] = "12"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN_PY), "--output_dir", str(out),
           "--train_data_dir", str(rgb_folder), "--unet_config", str(rgb_unet_config), "--validation_size",
           str(HELD_OUT), "--feature_extractor", str(encoder), "--max_train_steps", "2", "--ddpm_num_steps", "50",
           *fast]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())

    assert metrics["bits_per_dim_split"] == "validation" and metrics["bits_per_dim_num_images"] == 4
    assert math.isfinite(metrics["bits_per_dim"]) and math.isfinite(metrics["bits_per_dim_unclipped"])
    assert "as sampled" in metrics["bits_per_dim_bound"] and "unclipped" in metrics["bits_per_dim_unclipped_bound"]
    split = metrics["validation_split"]
    assert (split["split"], split["num_images"], split["num_train_images"]) == ("validation", HELD_OUT, 32)
    assert "SHA-256" in split["method"] and split["seed"] == 0
    (quality,) = metrics["sample_quality"]
    assert (quality["split"], quality["num_generated"], quality["num_reference"]) == ("validation", 12, HELD_OUT)
    assert quality["num_inference_steps"] == 3
    for key in ("fd", "kid_mean", "precision", "recall"):
        assert math.isfinite(quality[key]), key
    assert str(encoder) in quality["fd_method"] and metrics["feature_extractor"]["name"] == str(encoder)
    assert metrics["feature_extractor"]["model_type"] == "dinov2"
    # SWD beside FD (8 px images: one level), and its floor: 12 training images against the same held-out 8.
    assert quality["swd_resolutions"] == [8] and math.isfinite(quality["swd"]) and quality["swd_standard_error"] > 0
    floor = quality["swd_real_data_floor"]
    assert (floor["n_real"], floor["n_reference"], floor["split"]) == (12, HELD_OUT, "train vs validation")

    card = (out / "README.md").read_text()
    rows = [line for line in card.splitlines() if line.startswith("| ")]
    bpd_row = next(r for r in rows if r.startswith("| bits/dim |"))
    assert "| validation | 4 |" in bpd_row and "clipped" in bpd_row
    fd_row = next(r for r in rows if r.startswith("| Fréchet distance @ 3 steps |"))
    assert "| validation | 12 generated vs 8 real |" in fd_row
    swd_row = next(r for r in rows if r.startswith("| SWD @ 3 steps |"))
    assert "| validation | 12 generated vs 8 real |" in swd_row and "Karras" in swd_row
    assert any(r.startswith("| SWD of real training images (real-data floor) |") and "12 training vs 8 real" in r
               for r in rows)
    assert not any("train (first images)" in r for r in rows)
    args = json.loads((out / "training_args.json").read_text())
    assert args["validation_size"] == HELD_OUT and args["learning_rate"] == 2e-3  # size rule: 0.93M parameters


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """A process with no encoder to be had: huggingface_hub's constants patched (they are read at import), no kept
    answer about the Hub, no warning given yet, and an empty cache for --cache_dir."""
    from huggingface_hub import constants

    from diffusers_ddpm_ext import encoders, evaluate

    monkeypatch.setattr(encoders, "_HUB_STATUS", {})
    monkeypatch.setattr(evaluate, "_WARNED", set())
    timings = []
    real = TRAIN.load_quality_extractor

    def timed(*args):
        start = time.perf_counter()
        try:
            return real(*args)
        finally:
            timings.append(time.perf_counter() - start)

    monkeypatch.setattr(TRAIN, "load_quality_extractor", timed)
    return types.SimpleNamespace(constants=constants, timings=timings, cache=tmp_path / "empty-cache")


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE=1", "unreachable endpoint"])
def test_auto_without_an_encoder_trains_and_reports_swd_beside_its_floor(offline, rgb_folder, rgb_unet_config,
                                                                       no_hub, monkeypatch, tmp_path, caplog):
    """Issue 25 §2 and 26 item 5: `--feature_extractor auto` on RGB data, offline and without facebook/dinov2-base in
    the cache, decides at once (HF_HUB_OFFLINE=1, or one short request to an endpoint that does not answer), warns in
    one line, trains, and reports SWD and its real-data floor (before: exit 1 after 110 s and 80 Hub-retry lines)."""
    if offline == "HF_HUB_OFFLINE=1":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(no_hub.constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(no_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(no_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    out = tmp_path / "run"
    fast = [str(a) for a in FAST]
    fast[fast.index("--eval_quality_num_images") + 1] = "8"
    caplog.set_level("INFO")
    metrics = run_train("--output_dir", out, "--train_data_dir", rgb_folder, "--unet_config", rgb_unet_config,
                        "--validation_size", HELD_OUT, "--cache_dir", no_hub.cache, "--max_train_steps", 2,
                        "--ddpm_num_steps", 50, *fast)
    assert no_hub.timings and no_hub.timings[0] < 10  # decided at once: no retries
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "--feature_extractor" in
                r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "tried facebook/dinov2-base" in warnings[0] and "SWD" in warnings[0]
    assert ("HF_HUB_OFFLINE=1" if offline == "HF_HUB_OFFLINE=1" else "no answer from http://127.0.0.1:9") in warnings[0]
    assert not any("Retry" in r.getMessage() for r in caplog.records)

    on_disk = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == on_disk["train_steps"] == 2
    assert on_disk["feature_extractor"]["name"] is None and on_disk["feature_extractor"]["tried"] == "facebook/dinov2-base"
    (quality,) = on_disk["sample_quality"]
    assert (quality["split"], quality["num_generated"], quality["num_reference"]) == ("validation", 8, HELD_OUT)
    assert quality["fd"] is None and quality["precision"] is None and "not computed" in quality["fd_method"]
    assert quality["swd_resolutions"] == [8] and quality["swd"] == quality["swd_8"] > 0
    assert quality["swd_standard_error"] > 0 and "Karras" in quality["swd_method"]
    floor = quality["swd_real_data_floor"]
    assert (floor["n_real"], floor["n_reference"], floor["split"]) == (8, HELD_OUT, "train vs validation")
    assert floor["swd"] > 0 and floor["swd_standard_error"] > 0
    assert any("sample quality at 3 steps" in r.getMessage() and "real-data floor" in r.getMessage()
               for r in caplog.records)  # the log line
    card = (out / "README.md").read_text()
    assert "| SWD @ 3 steps |" in card and "| SWD of real training images (real-data floor) |" in card
    assert "Fréchet distance" not in card.split("| Metric |")[1].split("\n\n")[0]


def test_an_encoder_named_explicitly_that_cannot_be_loaded_fails_before_training(rgb_folder, tmp_path, monkeypatch):
    """Not cached and the Hub does not answer (no HF_HUB_OFFLINE): one line and exit code 2 at once, before
    training, with no Hub retries; in process the same ValueError, and training never starts."""
    from diffusers_ddpm_ext import trainer as tr

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(OMP_NUM_THREADS="1", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "empty-hf-home"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(TRAIN_PY), "--output_dir", str(out), "--train_data_dir", str(rgb_folder),
           "--logger", "none", "--feature_extractor", "tiny-org/not-cached"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr and "Retry" not in proc.stderr, proc.stderr[-3000:]
    for words in ("--feature_extractor tiny-org/not-cached could not be loaded", "not in the Hugging Face cache",
                  "no answer from http://127.0.0.1:9", "--eval_quality_num_images 0"):
        assert words in errors[0], errors[0]
    assert not out.exists() or not list(out.iterdir())

    def never(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(TRAIN, "build_model", never)
    monkeypatch.setattr(tr.Trainer, "train_step", never)
    fast = [str(a) for a in FAST]
    fast[fast.index("--eval_quality_num_images") + 1] = "16"
    with pytest.raises(ValueError, match=r"--feature_extractor .*missing-encoder.* could not be loaded.*"
                                         r"no folder and no Hub id.*--eval_quality_num_images 0") as error:
        run_train("--output_dir", out, "--train_data_dir", rgb_folder, "--feature_extractor",
                  tmp_path / "missing-encoder", *fast)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"--eval_quality_num_images must be 0 .* or an integer >= 4 .*, got 2"):
        run_train("--output_dir", out, *FAST, "--eval_quality_num_images", 2)
    with pytest.raises(ValueError, match="--validation_size must be a number of images >= 1"):
        TRAIN.validate_args(_flags("--validation_size", "2.5"))


# ---- the default learning rate


def test_default_learning_rate_is_the_presets_and_by_size_for_a_config(tmp_path):
    assert set(build.RECOMMENDED_LEARNING_RATES) == set(UNET_PRESETS)
    for preset, (rate, why) in build.RECOMMENDED_LEARNING_RATES.items():
        assert _flags("--unet_preset", preset).learning_rate == rate, preset
        if why.startswith("size rule"):  # the table's size-rule entries are the rule's value for the preset
            channels = UNET_PRESETS[preset]["config"]["in_channels"]  # as trained by default: learned variance
            model = DDPMUNet2DModel.from_preset(preset, out_channels=2 * channels, num_class_embeds=None)
            num = sum(p.numel() for p in model.parameters())
            assert build.learning_rate_for_size(num) == rate, (preset, num)
    assert _flags().learning_rate == 2e-3  # digits-small, tuned
    assert _flags("--unet_preset", "ddpm-cifar10", "--learning_rate", "5e-5").learning_rate == 5e-5  # explicit wins
    assert build.learning_rate_for_size(0.93e6) == 2e-3 and build.learning_rate_for_size(35.7e6) == 2e-4
    assert build.learning_rate_for_size(10e9) == 1e-4 and build.learning_rate_for_size(1000) == 2e-3  # clamped
    config = dict(UNET_PRESETS["ddpm-cifar10"]["config"])
    config.pop("out_channels")
    (tmp_path / "big.json").write_text(json.dumps(config))
    assert _flags("--unet_config", tmp_path / "big.json").learning_rate == 2e-4  # the same network: the same rate
    assert _flags("--unet_config", tmp_path / "missing.json").learning_rate is None  # check_flags names it
    with pytest.raises(ValueError, match="folder holding a config.json"):
        TRAIN.validate_args(_flags("--unet_config", tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="--unet_preset 'nope' is unknown"):
        TRAIN.validate_args(_flags("--unet_preset", "nope"))


def _smoke_model(preset):
    """The preset's network at 8x8 (attention at the same levels, scaled down): the same parameters, cheap steps."""
    config = UNET_PRESETS[preset]["config"]
    scale = 8 / config["sample_size"]
    attention = tuple(max(1, round(r * scale)) for r in config.get("attention_resolutions", ()))
    torch.manual_seed(0)
    model = DDPMUNet2DModel.from_preset(preset, sample_size=8, attention_resolutions=attention,
                                        out_channels=2 * config["in_channels"], num_class_embeds=None)
    native = DDPMUNet2DModel.from_preset(preset, out_channels=2 * config["in_channels"], num_class_embeds=None)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in native.parameters())
    return model.train()


@pytest.mark.parametrize("preset", sorted(UNET_PRESETS))
def test_every_preset_trains_at_its_default_learning_rate(preset):
    """Four steps of the default recipe (cosine β, learned_range, hybrid loss) at the preset's default learning rate
    with no warm-up, on random images: every loss is finite and the loss on a fixed batch (fixed noise and t, eval
    mode) falls."""
    from diffusers_ddpm_ext.losses import diffusion_loss
    from diffusers_ddpm_ext.trainer import TrainConfig, Trainer

    model, scheduler = _smoke_model(preset), build.build_noise_scheduler(100)
    rate = TRAIN.parse_args(["--unet_preset", preset]).learning_rate
    config = TrainConfig(learning_rate=rate, lr_warmup_steps=0, lr_scheduler="constant", use_ema=False,
                         checkpointing_steps=None, save_images_epochs=None)
    trainer = Trainer(model, scheduler, config, max_train_steps=4)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, model.config.in_channels, 8, 8, generator=g) * 2 - 1  # (4, C, 8, 8)
    noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, 100, (4,), generator=g)

    def fixed_loss():
        model.eval()
        with torch.no_grad():
            out = model(scheduler.add_noise(x0, noise, t), t).sample
            value = diffusion_loss(out, x0, noise, t, scheduler, loss_type="hybrid").loss.mean().item()
        model.train()
        return value

    before = fixed_loss()
    losses = [trainer.train_step(x0).loss for _ in range(4)]
    after = fixed_loss()
    assert all(math.isfinite(v) for v in losses), losses
    assert math.isfinite(after) and after < before, (preset, rate, before, after, losses)


# ---- README: every default that differs from diffusers' train_unconditional.py is listed, with a reason

# The defaults of diffusers' examples/unconditional_image_generation/train_unconditional.py (the flags it shares
# with ours); "(none)" for a default of None / off.
TRAIN_UNCONDITIONAL_DEFAULTS = {
    "resolution": 64, "train_batch_size": 16, "eval_batch_size": 16, "num_epochs": 100, "save_images_epochs": 10,
    "save_model_epochs": 10, "gradient_accumulation_steps": 1, "learning_rate": 1e-4, "lr_scheduler": "cosine",
    "lr_warmup_steps": 500, "adam_beta1": 0.95, "adam_beta2": 0.999, "adam_weight_decay": 1e-6,
    "adam_epsilon": 1e-8, "use_ema": False, "ema_inv_gamma": 1.0, "ema_power": 0.75, "ema_max_decay": 0.9999,
    "mixed_precision": "no", "prediction_type": "epsilon", "ddpm_num_steps": 1000, "ddpm_num_inference_steps": 1000,
    "ddpm_beta_schedule": "linear", "checkpointing_steps": 500, "checkpoints_total_limit": None,
    "logger": "tensorboard", "output_dir": "ddpm-model-64", "dataset_name": None, "train_data_dir": None,
    "center_crop": False, "random_flip": False, "dataloader_num_workers": 0, "logging_dir": "logs",
    "push_to_hub": False, "hub_private_repo": False, "cache_dir": None,
}
# Rows for behaviour that train_unconditional.py hard-codes (no flag there) and for the data default.
EXTRA_ROWS = {"variance_type", "loss_type", "dataset_name", "ddpm_max_beta"}


def _readme_defaults_table():
    text = (ROOT / "README.md").read_text()
    start = text.index("| flag | ours | `train_unconditional.py` | why |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("| `--"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`").lstrip("-")] = cells
    return rows


def _cell_matches(cell, value) -> bool:
    """A README cell ("2e-3 (digits-small) ...", "on", "none ...") shows ``value`` as its first word."""
    first = re.sub(r"[`*]", "", cell).split(" ")[0].rstrip(",;")
    if value is None or value is False:
        return first in ("none", "off")
    if value is True:
        return first == "on"
    if isinstance(value, (int, float)):
        try:
            return float(first) == float(value)
        except ValueError:
            return False
    return first == str(value)


def test_readme_lists_every_default_that_differs_from_train_unconditional():
    parser_defaults = {a.dest: a.default for a in TRAIN.build_parser()._actions}
    rows = _readme_defaults_table()
    differing = {name for name, theirs in TRAIN_UNCONDITIONAL_DEFAULTS.items() if parser_defaults[name] != theirs}
    assert len(differing) == 13 and differing == set(rows) - EXTRA_ROWS, (differing, set(rows))
    for name, (_, ours, theirs, why) in rows.items():
        assert len(why) > 20, name  # a reason, not a placeholder
        if name in TRAIN_UNCONDITIONAL_DEFAULTS:
            assert _cell_matches(theirs, TRAIN_UNCONDITIONAL_DEFAULTS[name]), (name, theirs)
        if parser_defaults.get(name) is not None:  # None: resolved at run time, the cell says from what
            assert _cell_matches(ours, parser_defaults[name]), (name, ours)
