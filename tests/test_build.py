"""Building a run from the script's flags (diffusers_ddpm_ext.build): the UNet fits the variance type."""

import json
import logging
import re

import pytest
from train_helpers import TRAIN

from diffusers_ddpm_ext import build
from diffusers_ddpm_ext.trainer import parameter_checksum
from diffusers_ddpm_ext.unet import DDPMUNet2DModel


def tiny_unet(**overrides):
    config = dict(sample_size=8, in_channels=1, out_channels=2, block_out_channels=(8, 8), layers_per_block=1,
                  attention_resolutions=(), add_attention=False, norm_num_groups=4, dropout=0.1)
    config.update(overrides)
    return DDPMUNet2DModel(**config)


def test_resolve_out_channels():
    assert build.resolve_out_channels(3, "learned_range") == 6
    assert build.resolve_out_channels(1, "fixed_small") == 1
    assert build.resolve_out_channels(3, "learned", 6) == 6
    with pytest.raises(ValueError, match="out_channels=3.*needs out_channels=6"):
        build.resolve_out_channels(3, "learned_range", 3)
    with pytest.raises(ValueError, match="needs out_channels=1"):
        build.resolve_out_channels(1, "fixed_small", 2)


def test_build_unet_sets_out_channels_and_checks_explicit_config(tmp_path):
    assert build.build_unet(variance_type="learned_range", seed=0).config.out_channels == 2
    assert build.build_unet(variance_type="fixed_small", seed=0).config.out_channels == 1
    conditional = build.build_unet(variance_type="fixed_small", num_class_embeds=10, seed=0)
    assert conditional.config.num_class_embeds == 10 and conditional.null_class_label == 10
    # Same seed -> same initial weights (every process builds the same model).
    a, b = build.build_unet(seed=3), build.build_unet(seed=3)
    assert parameter_checksum(a) == parameter_checksum(b)
    config = dict(tiny_unet().config)
    config["out_channels"] = 1
    path = tmp_path / "unet.json"
    path.write_text(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))
    with pytest.raises(ValueError, match="learned variance needs 2×C"):
        build.build_unet(config_path=str(path), variance_type="learned_range")
    assert build.build_unet(config_path=str(path), variance_type="fixed_small").config.out_channels == 1
    unet2d = build.build_unet(variance_type="learned_range", model_type="unet2d", seed=0)
    assert type(unet2d).__name__ == "UNet2DModel" and unet2d.config.out_channels == 2
    # A UNet2DModel config.json is accepted as --unet_config too.
    unet2d.save_config(str(tmp_path / "u2d"))
    assert build.build_unet(config_path=str(tmp_path / "u2d"), variance_type="learned_range").config.out_channels == 2




def test_build_model_seeds_and_checks_the_class_embedding():
    from argparse import Namespace

    flags = Namespace(unet_preset="digits-small", unet_config=None, resolution=8, variance_type="fixed_small",
                      num_class_embeds=3, model_type="ours", seed=5, ddpm_num_steps=50, ddpm_beta_schedule="linear",
                      prediction_type="epsilon", gradient_checkpointing=False,
                      enable_xformers_memory_efficient_attention=False)
    (a, scheduler), (b, _) = build.build_model(flags), build.build_model(flags)
    assert parameter_checksum(a) == parameter_checksum(b)  # every process builds the same weights
    assert a.config.sample_size == 8 and a.config.num_class_embeds == 3 and a.config.out_channels == 1
    assert scheduler.config.num_train_timesteps == 50 and scheduler.config.variance_type == "fixed_small"
    with pytest.raises(ValueError, match="--num_class_embeds was given but the UNet has no class embedding"):
        build.check_model_scheduler(tiny_unet(out_channels=1), scheduler, num_class_embeds=3)


def test_max_beta_clips_the_schedule_and_every_diffusers_scheduler_runs_the_clipped_chain(tmp_path):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler

    plain = build.build_noise_scheduler(1000, "squaredcos_cap_v2")
    clipped = build.build_noise_scheduler(1000, "squaredcos_cap_v2", max_beta=0.5)
    assert plain.config.trained_betas is None and float(plain.betas.max()) == pytest.approx(0.999)
    below = plain.betas <= 0.5
    assert int((~below).sum()) == 3  # cosine's last three β (0.56, 0.75, 0.999) exceed 0.5
    assert (clipped.betas[below] == plain.betas[below]).all() and (clipped.betas[~below] == 0.5).all()
    # The clip survives save/load and every diffusers scheduler built from the config runs the same chain.
    clipped.save_pretrained(tmp_path)
    loaded = GaussianDiffusionScheduler.from_pretrained(tmp_path)
    for cls in (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler):
        other = cls.from_config(loaded.config)
        assert float((other.alphas_cumprod.double() - clipped.alphas_cumprod.double()).abs().max()) < 1e-7, cls
    # A cap above every β changes nothing and writes no trained_betas (linear's largest β is 0.02).
    assert build.build_noise_scheduler(1000, "linear", max_beta=0.5).config.trained_betas is None
    for bad in (0, 1.0, -0.1, float("nan"), float("inf"), True, "0.5"):
        with pytest.raises(ValueError, match=f"--ddpm_max_beta must be (a number )?in \\(0, 1\\) .*, got {bad!r}"):
            build.clipped_betas(1000, "squaredcos_cap_v2", bad)


def test_range_checks_both_ends_types_and_non_finite_values():
    from diffusers_ddpm_ext.train_config import Range

    unit = Range(0, 1, low_open=True, why="a reason")
    for good in (1, 1.0, 1e-12, 0.5):
        unit.check("x", good)
    for bad in (0, 0.0, 1.0000001, -1, float("nan"), float("inf"), -float("inf"), 10**400):
        with pytest.raises(ValueError, match=f"^--x must be in \\(0, 1\\] \\(a reason\\), got {re.escape(repr(bad))}$"):
            unit.check("x", bad)
    for bad in (True, "0.5", None):  # not numbers: the message says so
        expected = f"^--x must be a number in \\(0, 1\\] \\(a reason\\), got {re.escape(repr(bad))}$"
        with pytest.raises(ValueError, match=expected):
            unit.check("x", bad)
    count = Range(1, integer=True, unset="left unset")
    for good in (None, 1, 10**400):
        count.check("n", good)
    for bad, kind in ((0, ""), (-5, ""), (2.5, "an integer "), (2.0, "an integer "), (False, "an integer ")):
        with pytest.raises(ValueError, match=f"^--n must be {kind}>= 1 or left unset, got {re.escape(repr(bad))}$"):
            count.check("n", bad)
    assert str(Range(0, 2**32, high_open=True, integer=True)) == "in [0, 4294967296)"
    assert str(Range(0, low_open=True)) == "positive and finite" and str(Range(0)) == ">= 0 and finite"
    with pytest.raises(ValueError, match=r"^--r must be >= 0 and finite, got inf$"):
        Range(0).check("r", float("inf"))


def test_check_flags_refuses_step_counts_beyond_t_and_warns_of_a_warm_up_beyond_the_run(caplog):
    from diffusers_ddpm_ext.train_config import TRAIN_RANGES

    args = TRAIN.parse_args(["--ddpm_num_steps", "40", "--ddpm_num_inference_steps", "40"])
    args.eval_bpd_steps = 40
    build.check_flags(args)  # at T: allowed
    args.eval_bpd_steps = 41
    with pytest.raises(ValueError, match=r"--eval_bpd_steps \(41\) cannot exceed --ddpm_num_steps \(40\).*"
                                         r"in \[2, 40\]"):
        build.check_flags(args)
    args = TRAIN.parse_args(["--max_train_steps", "10", "--lr_warmup_steps", "10"])
    build.check_run_flags(args)
    args.lr_warmup_steps = 11  # longer than the run: a warning, not a refusal (a smoke run keeps the default 50)
    with caplog.at_level(logging.WARNING, logger=build.logger.name):
        build.check_run_flags(args)
    assert any("--lr_warmup_steps 11 is longer than the run (--max_train_steps 10)" in r.getMessage()
               for r in caplog.records)
    args.max_train_steps = None  # with --num_epochs the run's length is known only once the data is loaded
    build.check_run_flags(args)
    assert build.allowed_range("learning_rate") is TRAIN_RANGES["learning_rate"]
    assert build.allowed_range("ddpm_num_steps") is build.FLAG_RANGES["ddpm_num_steps"]
    assert build.allowed_range("num_epochs") is build.RUN_FLAG_RANGES["num_epochs"] and build.allowed_range("x") is None
