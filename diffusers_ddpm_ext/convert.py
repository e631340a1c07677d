"""diffusers' `UNet2DModel` <-> `DDPMUNet2DModel`: config translation both ways and one table-driven weight map.

`DDPMUNet2DModel.from_unet2d`, `.to_unet2d` and `.from_pretrained(<a UNet2DModel folder or repo id>)` call into this
module; it lives outside `unet.py` because that file is copied to the Hub as remote code, where nothing converts.

The two networks compute the same function on the DDPM layout (Down/AttnDown, Res-Attn-Res middle, Up/AttnUp blocks):
outputs agree to float rounding (<= 1e-5) and weights round-trip bit for bit. The attention layers of both carry the
same sub-module names (`group_norm`, `to_q`, `to_k`, `to_v`, `to_out.0`), so the weight map only renames a few
module paths (`MODULE_PATHS`) and changes one tensor's values (`VALUE_CHANGES`).
"""

from __future__ import annotations

import re

import torch
from diffusers import UNet2DModel

from .unet import _TIME_SCALE_SHIFT, DDPMUNet2DModel, _as_spatial

__all__ = [
    "MODULE_PATHS",
    "from_unet2d",
    "ours_config_to_unet2d",
    "state_dict_from_unet2d",
    "state_dict_to_unet2d",
    "to_unet2d",
    "unet2d_config_to_ours",
    "unet2d_from_pretrained",
]

# ---------------------------------------------------------------------- config translation

_UNET2D_DOWN = ("DownBlock2D", "AttnDownBlock2D")
_UNET2D_UP = ("UpBlock2D", "AttnUpBlock2D")


def _require_2d(cfg: dict, what: str) -> None:
    """UNet2DModel has no 1D/3D counterpart: refuse a `dims` != 2 config before any weight is touched."""
    dims = cfg.get("dims", 2)
    if dims != 2:
        raise ValueError(f"`{what}` converts 2D models only (diffusers' UNet2DModel); this config has "
                         f"`dims`={dims!r} (allowed: [2]).")


def _strip_unetres(name: str) -> str:
    return name[7:] if name.startswith("UNetRes") else name


def unet2d_config_to_ours(cfg: dict) -> dict:
    """Translate a `UNet2DModel` config into a `DDPMUNet2DModel` config, or raise naming what has no match."""
    _require_2d(cfg, "from_unet2d")
    downs = [_strip_unetres(b) for b in cfg["down_block_types"]]
    ups = [_strip_unetres(b) for b in cfg["up_block_types"]]
    chans = list(cfg["block_out_channels"])
    levels = len(chans)
    for name, blocks, allowed in (("down_block_types", downs, _UNET2D_DOWN), ("up_block_types", ups, _UNET2D_UP)):
        bad = [b for b in blocks if b not in allowed]
        if bad:
            raise ValueError(f"UNet2DModel `{name}` contains {bad}; convertible blocks are {list(allowed)}.")
    if len(downs) != levels or len(ups) != levels:
        raise ValueError("UNet2DModel block type lists and `block_out_channels` disagree in length.")
    down_attn = [b == "AttnDownBlock2D" for b in downs]
    up_attn = [b == "AttnUpBlock2D" for b in reversed(ups)]
    if down_attn != up_attn:
        raise ValueError(f"UNet2DModel attention differs between encoder {downs} and decoder {ups} at some level; "
                         "DDPMUNet2DModel puts attention on both sides of a level.")
    checks = {
        "time_embedding_type": (cfg.get("time_embedding_type", "positional"), ("positional",)),
        "mid_block_type": (cfg.get("mid_block_type", "UNetMidBlock2D"), ("UNetMidBlock2D",)),
        "class_embed_type": (cfg.get("class_embed_type"), (None,)),
        "act_fn": (cfg.get("act_fn", "silu"), ("silu", "swish")),
        "resnet_time_scale_shift": (cfg.get("resnet_time_scale_shift", "default"), _TIME_SCALE_SHIFT),
        "downsample_padding": (cfg.get("downsample_padding", 1), (0, 1)),
    }
    if any(down_attn[:-1]):  # only AttnDownBlock2D with a downsampler reads downsample_type
        checks["downsample_type"] = (cfg.get("downsample_type", "conv"), ("conv",))
    if any(up_attn[1:]):
        checks["upsample_type"] = (cfg.get("upsample_type", "conv"), ("conv",))
    for key, (value, allowed) in checks.items():
        if value not in allowed:
            raise ValueError(f"UNet2DModel `{key}`={value!r} cannot be converted; supported: {list(allowed)}.")
    if cfg.get("norm_num_groups") is None:
        raise ValueError("UNet2DModel `norm_num_groups`=None cannot be converted; give an int.")
    hw = _as_spatial(cfg.get("sample_size"), 2)
    if any(down_attn) and hw is None:
        raise ValueError("UNet2DModel `sample_size` is None but attention levels are located by resolution; set it.")
    attn_res = tuple(hw[0] // 2**i for i in range(levels) if down_attn[i]) if any(down_attn) else ()
    add_attention = cfg.get("add_attention", True)
    head_dim = cfg.get("attention_head_dim", 8)
    attn_chans = [c for c, a in zip(chans, down_attn) if a] + ([chans[-1]] if add_attention else [])
    if head_dim is not None:
        bad = [c for c in attn_chans if c % head_dim]
        if bad:
            raise ValueError(f"UNet2DModel `attention_head_dim`={head_dim} does not divide attention channels {bad}.")
    attn_groups = cfg.get("attn_norm_num_groups")
    scale_shift = cfg.get("resnet_time_scale_shift", "default")
    if attn_groups is None:  # UNet2DModel's rule for the middle attention's GroupNorm
        attn_groups = cfg["norm_num_groups"] if scale_shift == "default" else None
    sample_size = cfg.get("sample_size")
    return dict(
        sample_size=list(sample_size) if isinstance(sample_size, (list, tuple)) else sample_size,
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        center_input_sample=cfg.get("center_input_sample", False),
        block_out_channels=chans,
        layers_per_block=cfg["layers_per_block"],
        flip_sin_to_cos=cfg.get("flip_sin_to_cos", True),
        freq_shift=cfg.get("freq_shift", 0),
        time_embedding_dim=cfg.get("time_embedding_dim"),
        time_embedding_act_fn="silu",
        act_fn="silu",
        resnet_skip_time_act=False,
        resnet_time_scale_shift=scale_shift,
        norm_num_groups=cfg["norm_num_groups"],
        norm_eps=cfg.get("norm_eps", 1e-5),
        dropout=cfg.get("dropout", 0.0),
        attention_resolutions=list(attn_res),
        add_attention=add_attention,
        attention_head_dim=head_dim,
        num_attention_heads=None,
        mid_attention_norm=attn_groups is not None,
        attn_norm_num_groups=attn_groups if attn_groups not in (None, cfg["norm_num_groups"]) else None,
        mid_block_scale_factor=float(cfg.get("mid_block_scale_factor", 1.0)),
        downsample_type="conv",
        downsample_padding=cfg.get("downsample_padding", 1),
        upsample_type="conv",
        zero_init_residual=False,
        num_class_embeds=cfg.get("num_class_embeds"),
    )


def _level_attention(cfg: dict) -> list[bool]:
    hw = _as_spatial(cfg["sample_size"], 2)
    res = set(cfg["attention_resolutions"] or ())
    return [hw is not None and hw[0] // 2**i in res for i in range(len(cfg["block_out_channels"]))]


def ours_config_to_unet2d(cfg: dict) -> dict:
    """Translate a `DDPMUNet2DModel` config into a `UNet2DModel` config, or raise naming what has no match."""
    _require_2d(cfg, "to_unet2d")
    fixed = {
        "time_embedding_act_fn": ("silu", "swish"),
        "act_fn": ("silu", "swish"),
        "resnet_skip_time_act": (False,),
        "downsample_type": ("conv",),
        "upsample_type": ("conv",),
    }
    for key, allowed in fixed.items():
        if cfg[key] not in allowed:
            raise ValueError(f"`{key}`={cfg[key]!r} has no UNet2DModel equivalent; convertible: {list(allowed)}.")
    chans = list(cfg["block_out_channels"])
    attn = _level_attention(cfg)
    head_dim = cfg["attention_head_dim"]
    if cfg["num_attention_heads"] is not None:
        attn_chans = [c for c, a in zip(chans, attn) if a] + ([chans[-1]] if cfg["add_attention"] else [])
        dims = sorted({c // cfg["num_attention_heads"] for c in attn_chans})
        if len(dims) > 1:
            raise ValueError(f"`num_attention_heads`={cfg['num_attention_heads']} gives head dims {dims} across "
                             "levels; UNet2DModel needs one `attention_head_dim`.")
        head_dim = dims[0] if dims else None
    groups = cfg["norm_num_groups"]
    # UNet2DModel's `attn_norm_num_groups=None` means norm_num_groups groups for "default" and no GroupNorm for
    # "scale_shift"; write None where that rule gives the right thing so configs round-trip unchanged.
    scale_shift = cfg["resnet_time_scale_shift"] == "scale_shift"
    if cfg["mid_attention_norm"]:
        attn_groups = cfg["attn_norm_num_groups"] or groups
        if attn_groups == groups and not scale_shift:
            attn_groups = None
    else:
        attn_groups = None
        if cfg["add_attention"] and not scale_shift:
            raise ValueError("`mid_attention_norm`=False is only expressible in UNet2DModel with "
                             "`resnet_time_scale_shift`='scale_shift'.")
    return dict(
        sample_size=cfg["sample_size"],
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        center_input_sample=cfg["center_input_sample"],
        time_embedding_type="positional",
        time_embedding_dim=cfg["time_embedding_dim"],
        freq_shift=cfg["freq_shift"],
        flip_sin_to_cos=cfg["flip_sin_to_cos"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        mid_block_type="UNetMidBlock2D",
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(chans),
        layers_per_block=cfg["layers_per_block"],
        mid_block_scale_factor=cfg["mid_block_scale_factor"],
        downsample_padding=cfg["downsample_padding"],
        downsample_type="conv",
        upsample_type="conv",
        dropout=cfg["dropout"],
        act_fn="silu",
        attention_head_dim=head_dim,
        norm_num_groups=groups,
        attn_norm_num_groups=attn_groups,
        norm_eps=cfg["norm_eps"],
        resnet_time_scale_shift=cfg["resnet_time_scale_shift"],
        add_attention=cfg["add_attention"],
        class_embed_type=None,
        num_class_embeds=cfg["num_class_embeds"],
    )


# ---------------------------------------------------------------------- weights

# One table for both directions: (our module path, UNet2DModel's module path); `{i}` is a block index. Every tensor
# under a listed module keeps its own name (`.weight`, `.bias`). Paths not listed are the same in both models:
# `conv_in`, `time_embedding.linear_1/2`, `class_embedding`, every res block and every level attention.
MODULE_PATHS = (
    ("norm_out", "conv_norm_out"),
    ("mid_block.attention", "mid_block.attentions.0"),
    ("down_blocks.{i}.downsample.conv", "down_blocks.{i}.downsamplers.0.conv"),
    ("up_blocks.{i}.upsample.conv", "up_blocks.{i}.upsamplers.0.conv"),
)


def _add_null_row(table: torch.Tensor) -> torch.Tensor:
    return torch.cat([table, table.new_zeros(1, table.shape[1])], dim=0)  # (N, T) -> (N + 1, T), null class zero


def _drop_null_row(table: torch.Tensor) -> torch.Tensor:
    return table[:-1]  # (N + 1, T) -> (N, T)


# Tensors whose values change, not only their names: (to ours, to UNet2DModel). Our class table has one more row,
# the null class for classifier-free guidance; zero means "no class term", which is what UNet2DModel computes
# without labels.
VALUE_CHANGES = {"class_embedding.weight": (_add_null_row, _drop_null_row)}

# Copies `fuse_qkv_projections()` adds beside to_q/to_k/to_v (same values); UNet2DModel has no such tensors.
_FUSED_COPIES = re.compile(r"\.to_(qkv|kv)\.(weight|bias)$")


def _path_pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + r"(?=\.)")


_PATTERNS = [(_path_pattern(ours), _path_pattern(theirs), ours, theirs) for ours, theirs in MODULE_PATHS]


def _translate(state: dict, to_ours: bool) -> dict:
    """Rename every key through `MODULE_PATHS` and apply `VALUE_CHANGES`, in the direction asked."""
    out = {}
    for key, tensor in state.items():
        if not to_ours and _FUSED_COPIES.search(key):
            continue
        for ours_re, theirs_re, ours, theirs in _PATTERNS:
            match = (theirs_re if to_ours else ours_re).match(key)
            if match:
                key = (ours if to_ours else theirs).format(**match.groupdict()) + key[match.end():]
                break
        if key in VALUE_CHANGES:
            tensor = VALUE_CHANGES[key][0 if to_ours else 1](tensor)
        out[key] = tensor
    return out


def state_dict_from_unet2d(state: dict) -> dict:
    """A `UNet2DModel` state dict (or any dict keyed like one, e.g. gradients) under `DDPMUNet2DModel` names."""
    return _translate(state, to_ours=True)


def state_dict_to_unet2d(state: dict) -> dict:
    """A `DDPMUNet2DModel` state dict (or any dict keyed like one) under `UNet2DModel` names."""
    return _translate(state, to_ours=False)


def _load_translated(model: torch.nn.Module, state: dict, source: str, copy: bool) -> None:
    expected = model.state_dict().keys()
    extra, missing = sorted(state.keys() - expected), sorted(expected - state.keys())
    if extra or missing:
        raise ValueError(f"{source} tensors do not match {type(model).__name__}'s (unsupported layout): "
                         f"no counterpart for {extra[:8]}, nothing for {missing[:8]}.")
    if copy:  # the converted model must not share storage with the source
        state = {key: tensor.detach().clone() for key, tensor in state.items()}
    model.load_state_dict(state, strict=True, assign=True)


# ---------------------------------------------------------------------- models


def from_unet2d(unet2d: UNet2DModel, model_class: type = DDPMUNet2DModel, copy: bool = True) -> DDPMUNet2DModel:
    """`model_class.from_unet2d(unet2d)`: an equivalent `DDPMUNet2DModel` (dtype, device and train/eval mode kept).

    Args:
        unet2d (`UNet2DModel`): The model to convert (DDPM layout; see `unet2d_config_to_ours`).
        model_class (`type`, defaults to `DDPMUNet2DModel`): The class to build (a subclass, or the Hub copy).
        copy (`bool`, defaults to `True`): Copy the tensors; `False` shares them with `unet2d`.
    """
    config = unet2d_config_to_ours(dict(unet2d.config))
    with torch.device("meta"):
        model = model_class(**config)
    _load_translated(model, state_dict_from_unet2d(unet2d.state_dict()), "UNet2DModel", copy)
    return model.train(unet2d.training)


def to_unet2d(model: DDPMUNet2DModel) -> UNet2DModel:
    """`model.to_unet2d()`: an equivalent `UNet2DModel` (config and weights; the null class row is dropped)."""
    config = ours_config_to_unet2d(dict(model.config))
    with torch.device("meta"):
        unet = UNet2DModel(**config)
    _load_translated(unet, state_dict_to_unet2d(model.state_dict()), type(model).__name__, copy=True)
    return unet.train(model.training)


def unet2d_from_pretrained(model_class: type, pretrained_model_name_or_path, config: dict, **kwargs):
    """`model_class.from_pretrained` of a folder or repo whose config.json names `UNet2DModel`: check that the layout
    converts (before any weight is read), load it with `UNet2DModel.from_pretrained(**kwargs)`, convert.

    Raises:
        ValueError: the layout has no `DDPMUNet2DModel` equivalent; the message names the part and the fix.
    """
    with torch.device("meta"):  # the config with UNet2DModel's defaults filled in (older config.json files omit keys)
        full = dict(UNet2DModel.from_config(config).config)
    try:
        unet2d_config_to_ours(full)
    except ValueError as error:
        raise ValueError(f"{pretrained_model_name_or_path!r} holds a UNet2DModel that {model_class.__name__} cannot "
                         f"express: {error} Load it with `diffusers.UNet2DModel.from_pretrained` instead.") from None
    with_info = kwargs.pop("output_loading_info", False)
    unet2d, info = UNet2DModel.from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
    model = from_unet2d(unet2d, model_class, copy=False).eval()
    model.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
    return (model, info) if with_info else model
