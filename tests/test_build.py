"""Building a run from the script's flags (diffusers_ddpm_ext.build): the UNet fits the variance type."""

import json

import pytest

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
    for bad in (0, 1.0, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="--ddpm_max_beta must be a number in \\(0, 1\\)"):
            build.clipped_betas(1000, "squaredcos_cap_v2", bad)
