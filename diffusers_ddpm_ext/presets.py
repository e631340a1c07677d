"""Named `DDPMUNet2DModel` configurations of published DDPM UNets: `DDPMUNet2DModel.from_preset(name)`.

Kept out of `unet.py` because that file is copied into Hub repositories as remote code, where no preset is used.
"""

from __future__ import annotations

__all__ = ["DEFAULT_PRESETS", "UNET_PRESETS", "list_presets", "preset_config"]

# Ho et al.'s CIFAR-10 network; smalldiffusion's CIFAR-10 Unet is the same network (the same config).
_DDPM_CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                     layers_per_block=2, attention_resolutions=(16,), dropout=0.1, flip_sin_to_cos=False,
                     freq_shift=1, norm_eps=1e-6, downsample_padding=0)

UNET_PRESETS: dict[str, dict] = {
    "ddpm-cifar10": {
        "source": "Ho et al. 2020 CIFAR-10 UNet (= google/ddpm-cifar10-32 layout): ch 128, mult (1,2,2,2), "
                  "2 res blocks, attention at 16x16, dropout 0.1, TF-SAME downsampling, eps 1e-6.",
        "config": _DDPM_CIFAR10,
    },
    "idm-cifar10": {
        "source": "Nichol & Dhariwal 2021 (improved-diffusion) CIFAR-10: 128 ch, mult (1,2,2,2), 3 res blocks, "
                  "FiLM scale-shift norm, zero-init, 4-head attention at 16 and 8, dropout 0.3, learned sigma.",
        "config": dict(sample_size=32, in_channels=3, out_channels=6, block_out_channels=(128, 256, 256, 256),
                       layers_per_block=3, attention_resolutions=(16, 8), num_attention_heads=4, dropout=0.3,
                       resnet_time_scale_shift="scale_shift", zero_init_residual=True),
    },
    "simple-unet": {
        "source": "Seed 000 SimpleUNet: base 64, mults (1,2,4), 2 res blocks, ReLU time MLP, raw time embedding "
                  "into the blocks, stride-2 conv down, ConvTranspose2d(4,2,1) up, Res-Res middle, dropout 0.1.",
        "config": dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(64, 128, 256),
                       layers_per_block=2, attention_resolutions=(), add_attention=False, dropout=0.1,
                       time_embedding_act_fn="relu", resnet_skip_time_act=True, upsample_type="conv_transpose"),
    },
    "labml-ddpm": {
        "source": "Seed 002 (labml annotated DDPM) UNet: 64 ch, mults (1,2,2,4), attention at levels 2-3 "
                  "(8x8, 4x4 for 32x32), single head, Res-Attn-Res middle, ConvTranspose2d up, [sin, cos] embedding.",
        "config": dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(64, 128, 128, 256),
                       layers_per_block=2, attention_resolutions=(8, 4), dropout=0.1, flip_sin_to_cos=False,
                       freq_shift=1, upsample_type="conv_transpose"),
    },
    "smalldiffusion-cifar10": {
        "source": "Seed 003 smalldiffusion Unet(32, 3, 3, ch=128, ch_mult=(1,2,2,2), attn_resolutions=(16,)): "
                  "GroupNorm eps 1e-6, pad (0,1,0,1) + stride-2 conv down, nearest + conv up, dropout 0.1.",
        "config": _DDPM_CIFAR10,
    },
    "smalldiffusion-fashionmnist": {
        "source": "Seed 003 smalldiffusion Unet(28, 1, 1, ch=64, ch_mult=(1,1,2), attn_resolutions=(14,)) with a "
                  "10-class conditioning embedding (cond_embed) + null class for classifier-free guidance.",
        "config": dict(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(64, 64, 128),
                       layers_per_block=2, attention_resolutions=(14,), dropout=0.1, flip_sin_to_cos=False,
                       freq_shift=1, norm_eps=1e-6, downsample_padding=0, num_class_embeds=10),
    },
    "diffusers-tutorial": {
        "source": "Seed 004 diffusers tutorial UNet2DModel(sample_size=28, 1->1 channels, (32, 64, 64), "
                  "2 layers, Down/AttnDown/AttnDown): attention at 14 and 7, head dim 8 (1,707,009 params).",
        "config": dict(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                       layers_per_block=2, attention_resolutions=(14, 7), attention_head_dim=8),
    },
    "digits-small": {
        "source": "Small default for scikit-learn's 8x8 digits upsampled to 16x16 grey: (32, 48, 64), 1 res block, "
                  "single-head attention at 8x8 and in the middle, 8 groups; trains in minutes on 2 CPU cores.",
        "config": dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 48, 64),
                       layers_per_block=1, attention_resolutions=(8,), norm_num_groups=8, dropout=0.0),
    },
    "rgb-small": {
        "source": "Small RGB default for your own 32x32 colour images on a CPU, digits-small's recipe in colour: "
                  "(32, 64, 64), 1 res block, single-head attention at 8x8 and in the middle, 8 groups, learned "
                  "sigma (6 outputs); trains in minutes on 2 CPU cores.",
        "config": dict(sample_size=32, in_channels=3, out_channels=6, block_out_channels=(32, 64, 64),
                       layers_per_block=1, attention_resolutions=(8,), norm_num_groups=8, dropout=0.0),
    },
}

DEFAULT_PRESETS = {1: "digits-small", 3: "rgb-small"}
"""The model training/train.py builds when no --unet_preset/--unet_config is given: by the data's channels (grey
or RGB, :func:`diffusers_ddpm_ext.data.data_channels`)."""


# ---- the default --learning_rate of training/train.py for each preset

RECOMMENDED_LEARNING_RATES = {
    # preset: (peak AdamW learning rate, why). Used when --learning_rate is not given.
    "digits-small": (2e-3, "tuned on the built-in digits (0.93M parameters, 828 steps at batch 32)"),
    "diffusers-tutorial": (1e-3, "the 28x28 MNIST tutorials of diffusers' course train this size at 1e-3"),
    "smalldiffusion-fashionmnist": (7.5e-4, "size rule (4.4M parameters)"),
    "simple-unet": (3.5e-4, "size rule (14.7M parameters)"),
    "labml-ddpm": (3e-4, "size rule (19.2M parameters)"),
    "ddpm-cifar10": (2e-4, "Ho et al. 2020, CIFAR-10 (35.7M parameters)"),
    "smalldiffusion-cifar10": (2e-4, "the ddpm-cifar10 network: Ho et al. 2020's CIFAR-10 rate"),
    "idm-cifar10": (1e-4, "Nichol & Dhariwal 2021, CIFAR-10 (52.5M parameters)"),
    "rgb-small": (1.8e-3, "size rule (1.1M parameters)"),
}
"""Default ``--learning_rate`` of each UNet preset.
diffusers' ``train_unconditional.py`` uses 1e-4 for every model; the small presets train far too slowly at
that rate within a CPU budget, and 2e-3 (right for digits-small) diverges or stalls the 35M+ CIFAR networks."""


def list_presets() -> list[str]:
    """Names accepted by `preset_config` and `DDPMUNet2DModel.from_preset`."""
    return list(UNET_PRESETS)


def preset_config(name: str, **overrides) -> dict:
    """The constructor arguments of preset `name`, with `overrides` replacing the preset's values.

    Args:
        name (`str`): One of `list_presets()`.
        **overrides: Config keys replacing the preset's values (e.g. `num_class_embeds=10`, or `dims=1` / `dims=3`
            for the 1D / 3D variant; an int `sample_size` then applies to every axis).

    Raises:
        ValueError: `name` is not a preset; the message lists the allowed names.
    """
    if not isinstance(name, str) or name not in UNET_PRESETS:
        raise ValueError(f"Unknown preset {name!r}; allowed: {list_presets()}.")
    return {**UNET_PRESETS[name]["config"], **overrides}
