"""End-to-end runs of training/train.py (short real CPU runs; in-process through main(argv) where possible)."""

import dataclasses
import json
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_helpers import FAST, TRAIN, TRAIN_PY, FakeHubApi, assert_same_checkpoint, run_train

import diffusers_ddpm_ext  # noqa: F401
from diffusers_ddpm_ext import checkpoints as ck
from diffusers_ddpm_ext import rundir
from diffusers_ddpm_ext import trainer as tr


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The no-argument default (digits-small, cosine, learned_range, hybrid), shortened by flags."""
    out = tmp_path_factory.mktemp("default") / "ddpm-digits"
    argv = ["--output_dir", out, "--max_train_steps", 4, "--checkpointing_steps", 2, *FAST]
    argv[argv.index("--logger") + 1] = "tensorboard"
    argv[argv.index("--eval_quality_num_images") + 1] = 8  # the default digits classifier, few images
    metrics = run_train(*argv)
    return out, metrics


def test_default_run_writes_a_loadable_pipeline(default_run):
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    from diffusers_ddpm_ext.pipelines import GaussianDiffusionPipeline
    from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler
    from diffusers_ddpm_ext.unet import DDPMUNet2DModel

    out, metrics = default_run
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "unet/config.json",
                 "scheduler/scheduler_config.json", "sample_grid.png", "loss_curve.png", "metrics.json", "README.md",
                 rundir.RUN_MARKER_NAME, "checkpoint-4/checkpoint.json"):
        assert (out / name).is_file(), name
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no tensorboard events"
    assert not list(out.rglob("*.bin")) and not [p for p in os.listdir(out) if p.startswith(".")]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["train_steps"] == metrics["train_steps"] == 4
    assert saved["bits_per_dim_split"] == "heldout" and 0 < saved["bits_per_dim"] < 20
    assert saved["bits_per_dim_num_images"] == 4 and saved["validation_split"]["num_images"] == 300
    # Both bounds, labelled: the process the model samples with (x̂₀ clipped) and the unclipped one beside it.
    assert saved["bits_per_dim_clip_denoised"] is True and "as sampled" in saved["bits_per_dim_bound"]
    assert "x0 clipped" in saved["bits_per_dim_bound"] and "x0 unclipped" in saved["bits_per_dim_unclipped_bound"]
    assert np.isfinite(saved["bits_per_dim_unclipped"]) and saved["bits_per_dim_unclipped"] != saved["bits_per_dim"]
    (quality,) = saved["sample_quality"]  # the digits classifier on the held-out digits, at the run's step count
    assert (quality["split"], quality["num_generated"], quality["num_reference"]) == ("heldout", 8, 300)
    assert quality["num_inference_steps"] == 3 and np.isfinite([quality["fd"], quality["kid_mean"]]).all()
    assert 0 <= quality["precision"] <= 1 and 0 <= quality["recall"] <= 1
    assert saved["feature_extractor"]["name"] == "digits-classifier"
    assert saved["final_loss"] > 0 and saved["wall_time_s"] > 0 and saved["num_processes"] == 1
    assert saved["loss_type"] == "hybrid" and saved["variance_type"] == "learned_range"
    assert sorted(os.listdir(out)).count("checkpoint-2") == 1 and (out / "checkpoint-2").is_dir()
    assert "hub_token" not in (out / rundir.RUN_MARKER_NAME).read_text()
    card = (out / "README.md").read_text()
    assert "| bits/dim |" in card and "| Fréchet distance @ 3 steps |" in card and "8 generated vs 300 real" in card
    assert str(round(saved["bits_per_dim_unclipped"], 3)) not in card  # the card shows the sampled-process bound
    assert 'DiffusionPipeline.from_pretrained("ddpm-digits")' in card  # the local card names its own folder
    assert "EMA samples, 3 steps, seed 0." in card and "num_inference_steps=3, generator=generator" in card
    (snippet,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)  # the card's own snippet runs as written
    cwd = os.getcwd()
    try:
        os.chdir(out.parent)
        namespace = {}
        exec(compile(snippet, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert len(namespace["images"]) == 4 and type(namespace["fast"].scheduler).__name__ == "DPMSolverMultistepScheduler"

    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe) is GaussianDiffusionPipeline  # samples with every diffusers scheduler
    assert isinstance(pipe.unet, DDPMUNet2DModel) and isinstance(pipe.scheduler, GaussianDiffusionScheduler)
    assert pipe.unet.config.out_channels == 2 and pipe.scheduler.config.variance_type == "learned_range"
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    image = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 16, 16, 1) and np.isfinite(image).all()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # learned variance: dropped
    image = pipe(batch_size=1, num_inference_steps=3, output_type="np").images
    assert image.shape == (1, 16, 16, 1) and np.isfinite(image).all()

    # The exported UNet holds the EMA weights; the checkpoint keeps the (different) training weights.
    exported = load_file(str(out / "unet/diffusion_pytorch_model.safetensors"))
    ema = load_file(str(out / "checkpoint-4/ema.safetensors"))
    train = load_file(str(out / "checkpoint-4/model.safetensors"))
    names = [n for n, _ in pipe.unet.named_parameters()]
    assert all(torch.equal(exported[n], ema[n]) for n in names)
    assert any(not torch.equal(train[n], ema[n]) for n in names)


def test_output_dir_of_another_run_is_refused_and_bad_combos_fail_before_training(default_run, tmp_path):
    out, _ = default_run
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(FileExistsError, match="not empty.*--overwrite_output_dir"):
        run_train("--output_dir", out, "--max_train_steps", 2, *FAST)
    assert sorted(p.name for p in out.iterdir()) == before

    fresh = tmp_path / "fresh"
    # Resume from a checkpoint of another architecture (fixed variance: C output channels, not 2C).
    with pytest.raises(ck.CheckpointError, match="another architecture.*out_channels"):
        run_train("--output_dir", fresh, "--resume_from_checkpoint", out / "checkpoint-4", "--variance_type",
                  "fixed_small", "--loss_type", "simple", *FAST)
    assert not list(fresh.glob("checkpoint-*"))
    config = json.loads((out / "unet" / "config.json").read_text())
    config["out_channels"] = 1
    (tmp_path / "unet.json").write_text(json.dumps(config))
    bad = [
        (["--loss_type", "hybrid", "--variance_type", "fixed_small"], "learned"),
        (["--class_column", "label"], "--num_class_embeds"),
        (["--unet_config", tmp_path / "unet.json"], "needs out_channels=2"),
        (["--num_class_embeds", 10, "--class_dropout_prob", 0.1, "--model_type", "unet2d"], "null class"),
    ]
    for extra, message in bad:
        with pytest.raises(ValueError, match=message):
            run_train("--output_dir", tmp_path / "bad", *extra, *FAST)
        assert not list((tmp_path / "bad").glob("checkpoint-*"))


def test_train_script_stays_flags_build_train_publish():
    """The script is flags -> build -> Trainer.run -> publish; everything else lives in the package."""
    import ast

    source = TRAIN_PY.read_text()
    functions = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}
    assert len(source.splitlines()) < 300
    assert functions["main"].end_lineno - functions["main"].lineno + 1 < 80


def test_help_lists_flags_with_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        TRAIN.parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--dataset_name", "--train_data_dir", "--resolution", "--center_crop", "--random_flip",
                 "--train_batch_size", "--eval_batch_size", "--dataloader_num_workers", "--num_epochs",
                 "--save_images_epochs", "--save_model_epochs", "--gradient_accumulation_steps", "--learning_rate",
                 "--lr_scheduler", "--lr_warmup_steps", "--adam_beta1", "--adam_beta2", "--adam_weight_decay",
                 "--adam_epsilon", "--use_ema", "--ema_inv_gamma", "--ema_power", "--ema_max_decay", "--push_to_hub",
                 "--hub_token", "--hub_model_id", "--hub_private_repo", "--logger", "--logging_dir", "--local_rank",
                 "--mixed_precision", "--prediction_type", "--ddpm_num_steps", "--ddpm_num_inference_steps",
                 "--ddpm_beta_schedule", "--checkpointing_steps", "--checkpoints_total_limit",
                 "--resume_from_checkpoint", "--enable_xformers_memory_efficient_attention", "--output_dir",
                 "--overwrite_output_dir", "--cache_dir", "--dataset_config_name", "--model_config_name_or_path",
                 "--seed", "--max_train_steps", "--image_column", "--class_column", "--num_class_embeds",
                 "--class_dropout_prob", "--gradient_checkpointing", "--max_grad_norm", "--unet_preset",
                 "--unet_config", "--model_type", "--variance_type", "--loss_type", "--snr_gamma",
                 "--timestep_sampler", "--eval_bpd_steps", "--eval_every", "--nan_policy", "--skip_bad_images",
                 "--validation_size", "--validation_split_seed", "--eval_quality_num_images", "--feature_extractor"):
        assert flag in text, flag
    assert "default: hybrid" in text and "default: learned_range" in text and "debug_" not in text
    # Every numeric flag's help states its range (build.add_range_help, from the one table).
    flat = " ".join(text.split())
    for shown in ("Peak learning rate (AdamW).", "Must be in (0, 1] (AdamW moves", "be in [0, 50000] (0 skips",
                  "Must be in [0, 1).", "Must be >= 2 (bits/dim draws", "Must be in [2, 100000] (the training"):
        assert shown in flat, shown


# ---- flag validation (before anything is built)


def parse(*argv):
    return TRAIN.parse_args(list(argv))


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--loss_type", "hybrid", "--variance_type", "fixed_small"], ["--loss_type hybrid", "learned"]),
        (["--loss_type", "simple", "--variance_type", "learned_range"], ["--loss_type simple", "never trains"]),
        (["--class_column", "label"], ["--class_column", "--num_class_embeds"]),
        (["--class_dropout_prob", "0.1"], ["--class_dropout_prob", "--num_class_embeds"]),
        (["--num_class_embeds", "3", "--dataset_name", "x"], ["--class_column"]),
        (["--num_class_embeds", "3", "--class_column", "y", "--train_data_dir", "x"], ["--class_column",
                                                                                      "sub-folder"]),
        (["--dataset_name", "a", "--train_data_dir", "b"], ["--dataset_name", "--train_data_dir"]),
        (["--snr_gamma", "5", "--loss_type", "kl"], ["--snr_gamma", "kl"]),
        (["--snr_gamma", "-1"], ["--snr_gamma", "positive"]),
        (["--resume_from_checkpoint", "latest", "--overwrite_output_dir"], ["--resume_from_checkpoint",
                                                                            "--overwrite_output_dir"]),
        (["--train_batch_size", "0"], ["--train_batch_size", "0"]),
        (["--learning_rate", "0"], ["--learning_rate"]),
        (["--ddpm_num_inference_steps", "2000"], ["--ddpm_num_inference_steps", "2000", "1000"]),
        (["--unet_preset", "digits-small", "--unet_config", "c.json"], ["--unet_preset", "--unet_config"]),
        (["--unet_config", "/nonexistent/c.json"], ["--unet_config", "/nonexistent/c.json", "folder holding a config.json"]),
        (["--ema_max_decay", "1.5"], ["--ema_max_decay"]),
        (["--push_to_hub", "--hub_model_id", "a/b/c"], ["--hub_model_id"]),
        (["--hub_strategy", "end"], ["--hub_strategy end", "--push_to_hub"]),
        (["--image_column", "img"], ["--image_column"]),
    ],
)
def test_validate_args_rejects_bad_combinations(argv, words):
    args = parse(*argv)
    with pytest.raises(ValueError) as info:
        TRAIN.validate_args(args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_validate_args_accepts_defaults_and_common_variants():
    TRAIN.validate_args(parse())
    TRAIN.validate_args(parse("--loss_type", "simple", "--variance_type", "fixed_small", "--prediction_type",
                           "v_prediction", "--snr_gamma", "5"))
    TRAIN.validate_args(parse("--num_class_embeds", "10", "--class_dropout_prob", "0.1"))
    TRAIN.validate_args(parse("--loss_type", "kl", "--variance_type", "fixed_large"))


def test_trainer_config_defaults_are_the_flag_defaults():
    """TrainConfig() in a notebook trains as `accelerate launch training/train.py` does (but num_levels, which the
    script takes from the data: 17 for the built-in digits)."""
    flags = tr.TrainConfig.from_flags(parse())
    defaults = tr.TrainConfig()
    assert {k: v for k, v in vars(flags).items() if k != "num_levels"} == \
        {k: v for k, v in vars(defaults).items() if k != "num_levels"}


# ---- ranges of the numeric flags (issue 24 item 9): refused before anything is built, naming flag, value and range

OUT_OF_RANGE = [
    (["--learning_rate", "1e30"], ["--learning_rate", "1e+30", "in (0, 1]"]),  # trained, then failed on a NaN
    (["--learning_rate", "nan"], ["--learning_rate", "nan", "in (0, 1]"]),
    (["--learning_rate", "inf"], ["--learning_rate", "inf", "in (0, 1]"]),
    (["--eval_quality_num_images", "100000000"], ["--eval_quality_num_images", "100000000", "in [0, 50000]"]),
    (["--eval_bpd_steps", "5000"], ["--eval_bpd_steps (5000)", "--ddpm_num_steps (1000)", "in [2, 1000]"]),
    (["--eval_bpd_steps", "51", "--ddpm_num_steps", "50", "--ddpm_num_inference_steps", "3"],
     ["--eval_bpd_steps (51)", "--ddpm_num_steps (50)", "in [2, 50]"]),
    (["--adam_beta1", "1.0"], ["--adam_beta1", "1.0", "in [0, 1)"]),
    (["--adam_weight_decay", "inf"], ["--adam_weight_decay", "inf", "in [0, 1]"]),
    (["--adam_weight_decay", "2"], ["--adam_weight_decay", "2.0", "in [0, 1]"]),
    (["--adam_epsilon", "2"], ["--adam_epsilon", "2.0", "in (0, 1]"]),
    (["--max_grad_norm", "inf"], ["--max_grad_norm", "inf", "positive and finite or 0 (no clipping)"]),
    (["--snr_gamma", "inf"], ["--snr_gamma", "inf", "positive and finite"]),
    (["--ema_power", "100"], ["--ema_power", "100.0", "in (0, 10]"]),
    (["--ema_inv_gamma", "1e7"], ["--ema_inv_gamma", "10000000.0", "in (0, 1000000]"]),
    (["--ema_max_decay", "nan"], ["--ema_max_decay", "nan", "in [0, 1]"]),
    (["--class_dropout_prob", "1.0", "--num_class_embeds", "10"], ["--class_dropout_prob", "1.0", "in [0, 1)"]),
    (["--guidance_scale", "1e9"], ["--guidance_scale", "1000000000.0", "in [0, 100]"]),
    (["--ddpm_max_beta", "inf"], ["--ddpm_max_beta", "inf", "in (0, 1)"]),
    (["--ddpm_num_steps", "1000000"], ["--ddpm_num_steps", "1000000", "in [2, 100000]"]),
    (["--resolution", "8192"], ["--resolution", "8192", "in [1, 4096]"]),
    (["--train_batch_size", "100000"], ["--train_batch_size", "100000", "in [1, 65536]"]),
    (["--eval_batch_size", "100000"], ["--eval_batch_size", "100000", "in [1, 4096]"]),
    (["--gradient_accumulation_steps", "5000"], ["--gradient_accumulation_steps", "5000", "in [1, 1024]"]),
    (["--num_class_embeds", "1000000"], ["--num_class_embeds", "1000000", "in [1, 100000]"]),
    (["--dataloader_num_workers", "1000"], ["--dataloader_num_workers", "1000", "in [0, 256]"]),
    (["--max_train_steps", "10000000000"], ["--max_train_steps", "10000000000", "in [1, 1000000000]"]),
    (["--seed", str(2**32)], ["--seed", "4294967296", "in [0, 4294967296)"]),
]


@pytest.mark.parametrize("argv, words", OUT_OF_RANGE, ids=[" ".join(argv) for argv, _ in OUT_OF_RANGE])
def test_out_of_range_flag_is_refused_before_training_naming_flag_value_and_range(argv, words, tmp_path,
                                                                                    monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError(f"{argv} got past the flag checks")

    for name in ("build_model", "build_data", "load_quality_extractor"):
        monkeypatch.setattr(TRAIN, name, never)
    monkeypatch.setattr(tr.Trainer, "train_step", never)
    with pytest.raises(ValueError) as info:
        run_train("--output_dir", tmp_path / "out", "--max_train_steps", 2, *FAST, *argv)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert not (tmp_path / "out").exists()


def test_range_bounds_themselves_are_accepted():
    TRAIN.validate_args(parse("--learning_rate", "1", "--adam_beta1", "0", "--adam_weight_decay", "1",
                              "--adam_epsilon", "1", "--ema_power", "10", "--ema_inv_gamma", "1e6", "--ema_max_decay",
                              "1", "--eval_quality_num_images", "50000", "--eval_bpd_steps", "1000",
                              "--lr_warmup_steps", "7", "--max_train_steps", "7", "--train_batch_size", "65536",
                              "--dataloader_num_workers", "256", "--guidance_scale", "100",
                              "--seed", str(2**32 - 1), "--max_grad_norm", "0", "--eval_quality_num_images", "0"))
    TRAIN.validate_args(parse("--ddpm_num_steps", "100000", "--eval_bpd_steps", "100000", "--lr_warmup_steps", "0",
                              "--max_train_steps", "1", "--gradient_accumulation_steps", "1024"))
    from diffusers_ddpm_ext import build

    build.FLAG_RANGES["resolution"].check("resolution", 4096)  # the range's end (digits-small itself has no 4096 form)


def test_every_numeric_flag_has_one_range():
    """A numeric flag added to train.py without a range (build.allowed_range) fails here; no name is in two tables."""
    from diffusers_ddpm_ext import build
    from diffusers_ddpm_ext.train_config import TRAIN_RANGES

    numeric = {a.dest for a in TRAIN.build_parser()._actions if a.type in (int, float)} - {"local_rank"}
    assert {name for name in numeric if build.allowed_range(name) is None} == set()
    tables = (TRAIN_RANGES, build.FLAG_RANGES, build.RUN_FLAG_RANGES)
    assert sum(len(t) for t in tables) == len(set().union(*tables))
    numeric_fields = {f.name for f in dataclasses.fields(tr.TrainConfig)
                      if f.type.replace("Optional[", "").rstrip("]") in ("int", "float")}
    assert numeric_fields == set(TRAIN_RANGES)


def test_non_finite_metrics_are_written_as_null_in_strict_json(tmp_path, caplog):
    def strict(text):
        return json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} in strict JSON"))

    metrics = {"bits_per_dim": float("nan"), "curve": [1.5, float("inf")], "quality": {"fd": -float("inf")}, "n": 3}
    with caplog.at_level("WARNING"):
        rundir.write_json_atomic(str(tmp_path / "metrics.json"), metrics)
    assert strict((tmp_path / "metrics.json").read_text()) == {"bits_per_dim": None, "curve": [1.5, None],
                                                               "quality": {"fd": None}, "n": 3}
    assert np.isnan(metrics["bits_per_dim"]) and metrics["curve"][1] == float("inf")  # the caller's dict unchanged
    for place in ("bits_per_dim = nan", "curve[1] = inf", "quality.fd = -inf"):  # the warning says where
        assert place in caplog.text, caplog.text


def test_run_whose_metrics_are_nan_still_writes_metrics_json(tmp_path, monkeypatch):
    """A figure that ends non-finite after training (bits/dim of a model gone bad) no longer fails the finished run
    on the JSON write (which exited 2, "refused before training", with no metrics.json)."""
    real_report = tr.Trainer.report

    def report_with_nan(self, *args, **kwargs):
        metrics = real_report(self, *args, **kwargs)
        metrics.update(bits_per_dim=float("nan"), bits_per_dim_standard_error=float("inf"))
        return metrics

    monkeypatch.setattr(tr.Trainer, "report", report_with_nan)
    out = tmp_path / "nan-metrics"
    metrics = run_train("--output_dir", out, "--max_train_steps", 2, "--checkpointing_steps", 100, *FAST,
                        "--resolution", 8, "--ddpm_num_steps", 50)
    assert np.isnan(metrics["bits_per_dim"])
    written = json.loads((out / "metrics.json").read_text(),
                         parse_constant=lambda token: pytest.fail(f"{token} in metrics.json"))
    assert written["bits_per_dim"] is None and written["bits_per_dim_standard_error"] is None
    assert written["train_steps"] == 2 and (out / "unet" / "diffusion_pytorch_model.safetensors").exists()


@pytest.fixture
def image_folder(tmp_path):
    """20 small grey images in two class sub-folders (resized to 16 by the loader)."""
    rng = np.random.default_rng(0)
    for index in range(20):
        folder = tmp_path / "images" / ("bars" if index % 2 else "blobs")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((20, 20)) * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{index:02d}.png")
    return tmp_path / "images"


def test_resume_is_exact_class_conditional_image_folder(image_folder, tmp_path):
    """Interrupted after step 4, resumed from checkpoint-3 (mid-epoch), ends bit-identical to a straight run.

    Exercises everything resume must restore: dropout (global RNG), noise/timestep/label-dropout generator,
    random flips, gradient accumulation, the IDM timestep sampler's history, EMA, AdamW moments, the LR
    schedule and the data position across three epoch boundaries.
    """
    from diffusers_ddpm_ext.hub import load_pipeline
    from diffusers_ddpm_ext.pipelines import ClassConditionalDDPMPipeline
    from diffusers_ddpm_ext.unet import UNET_PRESETS

    config = dict(UNET_PRESETS["digits-small"]["config"], dropout=0.1)
    config.pop("out_channels")
    (tmp_path / "unet.json").write_text(json.dumps(config))
    common = ["--train_data_dir", image_folder, "--num_class_embeds", 2, "--class_dropout_prob", 0.3,
              "--unet_config", tmp_path / "unet.json", "--random_flip", "--timestep_sampler", "loss-second-moment",
              "--train_batch_size", 4, "--gradient_accumulation_steps", 2, "--max_train_steps", 7,
              "--checkpointing_steps", 3, "--checkpoints_total_limit", 5, *FAST[2:]]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train("--output_dir", straight, *common)
    with pytest.raises(tr.SimulatedInterrupt):
        run_train("--output_dir", resumed, *common, "--debug_interrupt_after_step", 4)
    assert sorted(os.listdir(resumed)) == ["checkpoint-3", rundir.RUN_MARKER_NAME]  # no pipeline from a dead run
    run_train("--output_dir", resumed, *common, "--resume_from_checkpoint", "latest")

    state_a, _ = assert_same_checkpoint(straight / "checkpoint-7", resumed / "checkpoint-7")
    assert len(state_a["losses"]) == 7
    assert (state_a["epoch"], state_a["batch_in_epoch"]) == (3, 2)  # 4 micro-batches (2 steps) per epoch
    exported_a = load_file(str(straight / "unet/diffusion_pytorch_model.safetensors"))
    exported_b = load_file(str(resumed / "unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(exported_a[k], exported_b[k]) for k in exported_a)

    pipe = load_pipeline(str(resumed))
    assert isinstance(pipe, ClassConditionalDDPMPipeline) and pipe.unet.config.num_class_embeds == 2
    images = pipe(class_labels=[0, 1], guidance_scale=2.0, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 1)
    held_out = json.loads((resumed / "metrics.json").read_text())
    assert held_out["bits_per_dim_split"] == "validation" and held_out["bits_per_dim_num_images"] == 2  # 10 % of 20
    assert held_out["validation_split"]["num_train_images"] == 18


def test_v_prediction_with_nan_skip(tmp_path):
    metrics = run_train("--output_dir", tmp_path / "v", "--prediction_type", "v_prediction", "--loss_type",
                        "simple", "--variance_type", "fixed_small", "--snr_gamma", 5, "--max_train_steps", 3,
                        "--nan_policy", "skip", "--debug_nan_at_step", 2, "--checkpointing_steps", 100, *FAST)
    assert metrics["train_steps"] == 3 and metrics["skipped_steps"] == 1
    assert metrics["prediction_type"] == "v_prediction" and np.isfinite(metrics["bits_per_dim"])
    weights = load_file(str(tmp_path / "v" / "unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(tr.NonFiniteLossError, match=r"step 3 .*checkpoint-2"):
        run_train("--output_dir", out, "--max_train_steps", 6, "--debug_nan_at_step", 3, "--checkpointing_steps",
                  100, *FAST)
    assert not (out / "model_index.json").exists()  # nothing exported from a diverged run
    data = ck.load_checkpoint(str(out / "checkpoint-2"))
    assert data.step == 2 and all(torch.isfinite(v).all() for v in data.model_state.values())
    # It resumes (the injected NaN is gone on the second try): the guard kept a usable state.
    metrics = run_train("--output_dir", out, "--max_train_steps", 6, "--checkpointing_steps", 100,
                        "--resume_from_checkpoint", "latest", *FAST)
    assert metrics["train_steps"] == 6


def test_unet2d_run_overwrite_and_push_uploads_exactly_the_export(tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline, UNet2DModel

    uploads = FakeHubApi().install(monkeypatch).calls
    out = tmp_path / "u2d"
    out.mkdir()
    (out / "my_notes.txt").write_text("keep me")
    (out / "checkpoint-99").mkdir()  # a previous run's checkpoint: removed by --overwrite_output_dir
    run_train("--output_dir", out, "--overwrite_output_dir", "--model_type", "unet2d", "--max_train_steps", 2,
              "--checkpointing_steps", 1, "--push_to_hub", "--hub_model_id", "me/digits-u2d", "--hub_private_repo",
              "--hub_token", "hf_dummy", *FAST)
    assert (out / "my_notes.txt").read_text() == "keep me" and not (out / "checkpoint-99").exists()
    assert uploads[0] == ("create_repo", "me/digits-u2d", True, "hf_dummy")
    _, repo, files, listed, contents = uploads[1]
    assert repo == "me/digits-u2d" and files == listed  # every file of the export folder, nothing else
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "README.md",
            "scheduler/scheduler_config.json", "sample_grid.png"} <= set(files)
    assert not [f for f in files if "checkpoint" in f or f.startswith("logs") or f.endswith((".pt", ".bin"))]
    # The upload is the Hub export of the pipeline published locally (plus its remote-code module files).
    for name in ("unet/diffusion_pytorch_model.safetensors", "sample_grid.png", "scheduler/scheduler_config.json"):
        assert (out / name).read_bytes() == contents[name], name
    assert json.loads(contents["model_index.json"])["scheduler"] == ["ddpm_ext_scheduler", "GaussianDiffusionScheduler"]
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # the temporary export is gone
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert isinstance(pipe.unet, UNet2DModel) and pipe.unet.config.out_channels == 2
    assert json.loads((out / "metrics.json").read_text())["model_type"] == "unet2d"


def test_two_process_run_synchronises_and_writes_one_output(tmp_path):
    out = tmp_path / "mp"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN_PY),
           "--output_dir", str(out), "--max_train_steps", "2", "--checkpointing_steps", "2",
           "--timestep_sampler", "loss-second-moment", *[str(a) for a in FAST]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = re.findall(r"\[rank (\d)\] weight checksum (\w+) ema (\w+)", proc.stdout)
    assert sorted(rank for rank, _, _ in lines) == ["0", "1"]
    assert len({(w, e) for _, w, e in lines}) == 1  # both ranks hold identical weights and EMA
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["global_batch_size"] == 16
    assert [c["rank"] for c in metrics["rank_checksums"]] == [0, 1]
    assert sorted(os.listdir(out)) == sorted(["README.md", "checkpoint-2", "loss_curve.png", "metrics.json",
                                              "model_index.json", "sample_grid.png", "scheduler",
                                              rundir.RUN_MARKER_NAME, "unet"])
    data = ck.load_checkpoint(str(out / "checkpoint-2"))
    assert len(data.rng_states) == 2 and data.rng_states[0] != data.rng_states[1]
    # Resume both processes with `latest` for 2 more steps: the main process picks the checkpoint and broadcasts
    # it; the longer run is an intended change of a result-changing flag, so it is named.
    resume = [a if a != "2" or cmd[i - 1] != "--max_train_steps" else "4" for i, a in enumerate(cmd)]
    proc = subprocess.run([*resume, "--resume_from_checkpoint", "latest", "--allow_changed_flags", "max_train_steps"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr and "checkpoint-2" in proc.stdout + proc.stderr
    lines = re.findall(r"\[rank (\d)\] weight checksum (\w+) ema (\w+)", proc.stdout)
    assert sorted(rank for rank, _, _ in lines) == ["0", "1"] and len({(w, e) for _, w, e in lines}) == 1
    assert ck.load_checkpoint(str(out / "checkpoint-4")).step == 4
    assert json.loads((out / rundir.RUN_MARKER_NAME).read_text())["changed_on_resume"] == \
        ["max_train_steps 2 -> 4 from step 2"]


# ---- Hub pushes at save points (HfApi replaced by train_helpers.FakeHubApi: nothing leaves the machine)


@pytest.fixture(scope="module")
def push_images(tmp_path_factory):
    """20 grey 12x12 images: 2 optimizer steps per epoch at batch 8, so a 6-step run has 3 epochs."""
    rng = np.random.default_rng(1)
    folder = tmp_path_factory.mktemp("push") / "images"
    folder.mkdir()
    for index in range(20):
        Image.fromarray((rng.random((12, 12)) * 255).astype(np.uint8), mode="L").save(folder / f"{index:02d}.png")
    return folder


def push_argv(out, images, *extra):
    return ["--output_dir", out, "--train_data_dir", images, "--max_train_steps", 6, "--checkpointing_steps", 100,
            "--push_to_hub", "--hub_model_id", "me/pushes", "--hub_token", "hf_dummy",
            *FAST, "--resolution", 8, "--ddpm_num_steps", 50, *extra]


@pytest.fixture(scope="module")
def pushed_run(push_images, tmp_path_factory):
    """--save_model_epochs 1 over 3 epochs: two intermediate pushes and the final one, all succeeding."""
    out = tmp_path_factory.mktemp("pushed") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        fake = FakeHubApi().install(monkeypatch)
        metrics = run_train(*push_argv(out, push_images, "--save_model_epochs", 1))
    return out, fake, metrics


def test_push_to_hub_at_every_model_save_and_at_the_end(pushed_run):
    out, fake, metrics = pushed_run
    final = f"End of training: epoch 3, step 6, bits/dim {round(metrics['bits_per_dim'], 4)}"
    assert fake.messages == ["Epoch 1, step 2", "Epoch 2, step 4", final]  # one commit per save point
    assert [c[0] for c in fake.calls] == ["create_repo", "upload"] * 3
    uploads = [c for c in fake.calls if c[0] == "upload"]
    for _, repo, files, listed, contents in uploads:
        assert repo == "me/pushes" and files == listed and "unet/diffusion_pytorch_model.safetensors" in files
        assert not [f for f in files if "checkpoint" in f or f.startswith(("logs", "samples"))]
    weights = [u[4]["unet/diffusion_pytorch_model.safetensors"] for u in uploads]
    assert len(set(weights)) == 3  # each push carries the weights of its own epoch ...
    assert weights[-1] == (out / "unet/diffusion_pytorch_model.safetensors").read_bytes()  # ... the last the final
    assert [(p["commit_message"], p["step"], p["ok"], p["error"]) for p in metrics["hub_pushes"]] == \
        [(m, s, True, None) for m, s in zip(fake.messages, (2, 4, 6))]
    assert json.loads((out / "metrics.json").read_text())["hub_pushes"] == metrics["hub_pushes"]
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # every temporary export removed


def test_failed_intermediate_push_warns_and_trains_on_failed_final_push_raises(pushed_run, push_images, tmp_path,
                                                                                monkeypatch, caplog):
    from diffusers_ddpm_ext.hub import HubPushError, load_pipeline

    fake = FakeHubApi(fail_commits={1, 3}).install(monkeypatch)  # the epoch-1 push and the final one fail
    out = tmp_path / "run"
    with pytest.raises(HubPushError, match=r"create_commit: Name or service not known.*run itself completed.*"
                                           r"Retry the upload with `python -m diffusers_ddpm_ext.hub push \S+run-hub "
                                           r"\S+ --private`") as failure:
        run_train(*push_argv(out, push_images, "--save_model_epochs", 1, "--hub_private_repo"))
    assert " export " not in str(failure.value)  # the built export was kept: the retry is one push
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "push" in r.getMessage()]
    assert len(warnings) == 1 and "'Epoch 1, step 2'" in warnings[0] and "training goes on" in warnings[0]
    assert "Name or service not known" in warnings[0]
    # Training went on: the epoch-2 push was attempted and went through, then the final push was attempted.
    assert fake.messages[:2] == ["Epoch 1, step 2", "Epoch 2, step 4"] and len(fake.messages) == 3
    assert fake.messages[2].startswith("End of training: epoch 3, step 6")
    assert [c[0] for c in fake.calls] == ["create_repo", "create_repo", "upload", "create_repo"]
    # Everything local was written, and the failures changed nothing about the training itself.
    ok_out, _, ok_metrics = pushed_run
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["train_steps"] == 6 and saved["bits_per_dim"] == ok_metrics["bits_per_dim"]
    assert [(p["ok"], p["step"]) for p in saved["hub_pushes"]] == [(False, 2), (True, 4), (False, 6)]
    assert "HubPushError" in saved["hub_pushes"][0]["error"] and "intact" not in saved["hub_pushes"][0]["error"]
    name = "unet/diffusion_pytorch_model.safetensors"
    assert (out / name).read_bytes() == (ok_out / name).read_bytes() and (out / "checkpoint-6").is_dir()
    assert load_pipeline(str(out)).unet.config.sample_size == 8
    assert not [p for p in os.listdir(out) if p.startswith(".")]
    # The kept export is the one the final commit tried to send (model card included); its retry goes through.
    kept = tmp_path / "run-hub"
    assert "bits/dim" in (kept / "README.md").read_text() and (kept / "model_index.json").is_file()
    mode = rundir.file_mode()  # the export was built private (0700 folder, 0600 weights); kept, it is not
    assert all(stat.S_IMODE(os.stat(kept / f).st_mode) == mode for f in rundir.files_under(str(kept)))
    from diffusers_ddpm_ext.hub import push_to_hub

    push_to_hub(str(kept), "me/pushes", token="hf_dummy", private=True, commit_message="retry")
    assert fake.messages[-1] == "retry" and fake.calls[-1][0] == "upload"
    assert sorted(fake.calls[-1][2]) == sorted(rundir.files_under(str(kept)))


def test_hub_strategy_end_pushes_once_and_a_missing_token_fails_before_training(push_images, tmp_path,
                                                                               monkeypatch):
    fake = FakeHubApi().install(monkeypatch)
    assert TRAIN.parse_args([]).hub_strategy is None  # unset means every_save, diffusers' behaviour
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)  # no `hf auth login` token either
    argv = push_argv(tmp_path / "no-token", push_images, "--save_model_epochs", 1)
    del argv[argv.index("--hub_token"):argv.index("--hub_token") + 2]
    with pytest.raises(ValueError, match="--push_to_hub needs a Hub write token: pass --hub_token, set HF_TOKEN"):
        run_train(*argv)
    assert not (tmp_path / "no-token").exists() and fake.messages == []

    out = tmp_path / "end"
    metrics = run_train(*push_argv(out, push_images, "--save_model_epochs", 1, "--hub_strategy", "end"))
    assert fake.messages == [f"End of training: epoch 3, step 6, bits/dim {round(metrics['bits_per_dim'], 4)}"]
    assert [p["step"] for p in metrics["hub_pushes"]] == [6]
    assert (out / "model_index.json").is_file()
