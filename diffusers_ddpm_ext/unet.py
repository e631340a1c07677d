"""A from-scratch DDPM-style UNet for diffusers: `DDPMUNet2DModel`.

One configurable network covers the DDPM CIFAR-10 UNet (Ho et al. 2020), the improved-diffusion UNet
(Nichol & Dhariwal 2021, "IDM": FiLM scale-shift norm, zero-initialised residual outputs, multi-head
attention, learned variance), labml's annotated DDPM, smalldiffusion's `Unet` and diffusers' own
DDPM-layout `UNet2DModel`, to which it converts both ways with equal outputs
(`DDPMUNet2DModel.from_unet2d` / `DDPMUNet2DModel.to_unet2d`).

This module is self-contained (torch, numpy, diffusers and the standard library only) because it is
copied into Hub repositories as remote code. It holds the model and its config checks; the presets and the
UNet2DModel conversion live in the package (`diffusers_ddpm_ext.presets`, `.convert`) and are imported by
name when a method needs them (`_package_module`), so a Hub copy loads and samples without the package.
"""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.model_loading_utils import load_state_dict as _read_checkpoint_file
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

__all__ = ["DDPMAttention", "DDPMAttnProcessor", "DDPMUNet2DModel", "DDPMUNet2DOutput", "NonFiniteWeightsError",
           "check_finite_weights"]

# Allowed values, as the constructor's signature declares them; the runtime checks read the same definitions.
ActivationName = Literal["silu", "swish", "relu", "gelu", "mish"]
TimeScaleShift = Literal["default", "scale_shift"]
DownsampleType = Literal["conv", "avg_pool"]
UpsampleType = Literal["conv", "nearest", "conv_transpose"]
SpatialDims = Literal[1, 2, 3]

_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu, "mish": F.mish}
# In-place twins, used only under `torch.no_grad()` on freshly made tensors (inference saves one allocation and one
# memory pass per activation; autograd would need the overwritten input). gelu has none: it stays out of place.
_INPLACE_ACTIVATIONS = {k: f if k == "gelu" else functools.partial(f, inplace=True) for k, f in _ACTIVATIONS.items()}
_TIME_SCALE_SHIFT = get_args(TimeScaleShift)
_DOWNSAMPLE_TYPES = get_args(DownsampleType)
_UPSAMPLE_TYPES = get_args(UpsampleType)
_DIMS = get_args(SpatialDims)
# Per `dims`: conv classes, the average-pooling function and the input layout (for error messages). Chosen once at
# construction, so the forward pass has no per-call branching on `dims`.
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_LAYOUT = {1: "(B, C, L)", 2: "(B, C, H, W)", 3: "(B, C, F, H, W)"}
_SIZE_FORM = {1: "an (L,) 1-tuple of ints", 2: "an (H, W) pair of ints", 3: "an (F, H, W) triple of ints"}


# ---------------------------------------------------------------------- package companions

_PACKAGE = "diffusers_ddpm_ext"
# Names this module defined before the presets and the conversion moved into the package; still importable from here.
_MOVED = {"UNET_PRESETS": "presets", "unet2d_config_to_ours": "convert", "ours_config_to_unet2d": "convert"}
# `from_pretrained` arguments that locate config.json (read first, to recognise a UNet2DModel checkpoint).
_CONFIG_LOOKUP_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


def _package_module(name: str, what: str):
    """`diffusers_ddpm_ext.<name>`, imported when first used. By name, through importlib, not an import statement:
    diffusers refuses remote code whose import lines name a package that is not installed, so a Hub copy of this file
    must not mention ours in one. Without the package, raise an ImportError saying what needs it and how to get it."""
    try:
        return importlib.import_module(f"{_PACKAGE}.{name}")
    except ModuleNotFoundError as error:
        if error.name not in (_PACKAGE, f"{_PACKAGE}.{name}"):
            raise  # the package is there but something it imports is not: report that, unchanged
        raise ImportError(
            f"{what} needs the diffusers-ddpm-ext package, which this copy of `DDPMUNet2DModel` (remote code) ships "
            "without: `pip install diffusers-ddpm-ext` (or `pip install -e .` in its source tree). Loading and "
            "sampling need only this file."
        ) from error


def __getattr__(name: str):
    if name in _MOVED:
        return getattr(_package_module(_MOVED[name], f"`{__name__}.{name}`"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------- config helpers


def _check_choice(name: str, value, allowed) -> None:
    # Type first: an unhashable value (a list, a dict) would otherwise fail the lookup with a TypeError that
    # does not say which field it came from.
    kinds = {type(a) for a in allowed}
    if not isinstance(value, tuple(kinds)) or (isinstance(value, bool) and bool not in kinds):
        raise TypeError(f"`{name}`={value!r} has type {type(value).__name__}; allowed: {list(allowed)}.")
    if value not in allowed:
        raise ValueError(f"`{name}`={value!r} is not supported; allowed: {list(allowed)}.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_spatial(sample_size, dims: int = 2) -> tuple[int, ...] | None:
    """`sample_size` (int, a `dims`-tuple or None) as a `dims`-tuple: (L,), (H, W) or (F, H, W); an int is repeated
    on every axis (a square image, a cube volume), the same rule for every `dims`."""
    if sample_size is None:
        return None
    if _is_int(sample_size):
        return (sample_size,) * dims
    fits = isinstance(sample_size, (list, tuple)) and len(sample_size) == dims
    if fits and all(_is_int(s) for s in sample_size):
        return tuple(int(s) for s in sample_size)
    raise ValueError(f"`sample_size`={sample_size!r} must be an int, {_SIZE_FORM[dims]}, or None "
                     f"(dims={dims}: one entry per spatial axis of {_LAYOUT[dims]}).")


def _halved_from(dims: int) -> int:
    """Index (into the spatial axes) of the first axis the UNet halves: dims=3 keeps the frame axis (IDM)."""
    return 1 if dims == 3 else 0


def _level_resolutions(size: tuple[int, ...], dims: int, levels: int) -> list[int]:
    """Each level's "resolution": its size along the first halved axis (L for 1D, H for 2D and 3D)."""
    return [size[_halved_from(dims)] // 2**i for i in range(levels)]


def sinusoidal_timestep_embedding(
    timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> torch.Tensor:
    """Transformer sinusoids of the timestep (Ho et al. 2020 sec. 4; Vaswani et al. 2017 sec. 3.5).

    Frequencies are `max_period ** (-i / (half - freq_shift))`, i < half = dim // 2, computed in float32 in
    the same operation order as diffusers' `get_timestep_embedding`, so embeddings match it bit for bit.
    `freq_shift=1, flip_sin_to_cos=False` is the DDPM/TF layout [sin, cos]; `freq_shift=0,
    flip_sin_to_cos=True` is IDM's [cos, sin].

    Args:
        timesteps: (B,) tensor, integer or fractional.
        dim: embedding width; an odd width gets one zero column at the end.
        flip_sin_to_cos: put the cosines first.
        freq_shift: the shift in the frequency denominator.
        max_period: the longest period.

    Returns:
        (B, dim) float32 tensor.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None, :]  # (B, half)
    parts = [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    emb = torch.cat(parts, dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class DDPMTimestepMLP(nn.Module):
    """Linear -> activation -> Linear on the sinusoidal embedding (DDPM's two dense layers)."""

    def __init__(self, in_dim: int, out_dim: int, act_fn: str):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)
        self.act = _ACTIVATIONS[act_fn]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class DDPMResBlock(nn.Module):
    """Pre-activation residual block with time injection.

    norm1 -> act -> conv1 -> (+ time | FiLM) -> norm2 -> act -> dropout -> conv2, plus a 1x1 shortcut when
    the channel count changes. `scale_shift` is IDM's FiLM: norm2(h) * (1 + scale) + shift. `dims` (1, 2, 3)
    picks Conv1d / Conv2d / Conv3d; the 3-tap kernels become 3, 3x3 or 3x3x3 (IDM `conv_nd`).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float, act_fn: str,
                 dropout: float, time_scale_shift: str, output_scale_factor: float = 1.0, dims: int = 2):
        super().__init__()
        conv = _CONV[dims]
        self.scale_shift = time_scale_shift == "scale_shift"
        self.output_scale_factor = output_scale_factor
        self.act = _ACTIVATIONS[act_fn]
        self.act_ = _INPLACE_ACTIVATIONS[act_fn]
        # Indexes the projected embedding (B, C') to (B, C', 1, ..., 1): one singleton per spatial axis.
        self._emb_index = (slice(None), slice(None)) + (None,) * dims
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels * (2 if self.scale_shift else 1))
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = conv(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, *spatial); temb: (B, T), already passed through the block activation (done once per
        model call). Returns (B, C_out, *spatial)."""
        # Without autograd every intermediate below is a fresh tensor only this block holds, so activations and
        # adds run in place (same values bit for bit: x + y == y + x in IEEE arithmetic).
        inplace = not torch.is_grad_enabled()
        act = self.act_ if inplace else self.act
        h = self.conv1(act(self.norm1(x)))
        t = self.time_emb_proj(temb)[self._emb_index]  # (B, C_out or 2*C_out, 1, ..., 1)
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h)
            h = h.mul_(1 + scale).add_(shift) if inplace else h * (1 + scale) + shift
        else:
            h = self.norm2(h.add_(t) if inplace else h + t)
        h = self.conv2(self.dropout(act(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = h.add_(skip) if inplace else skip + h
        if self.output_scale_factor != 1.0:
            out = out.div_(self.output_scale_factor) if inplace else out / self.output_scale_factor
        return out


class DDPMAttnProcessor:
    """Computes a [`DDPMAttention`] layer through diffusers' `dispatch_attention_fn`, so the backend chosen with
    `model.set_attention_backend(...)` (or diffusers' `attention_backend` context) runs the attention product.

    Replace it with `model.set_attn_processor(...)` (see [`DDPMAttention`] for the processors that work).
    """

    _attention_backend = None  # set by `set_attention_backend`; None: diffusers' active backend (native SDPA)
    _parallel_config = None

    def __call__(self, attn: "DDPMAttention", hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states  # (B, C, H, W): `DDPMAttention.forward` passes 1D / 3D inputs as (B, C, 1, N)
        b, c, hgt, wid = x.shape
        # 1. Normalise; every position becomes a token.
        h = x if attn.group_norm is None else attn.group_norm(x)
        # (B, HW, C), made contiguous once: each projection would otherwise copy the transposed view itself
        h = h.flatten(2).transpose(1, 2).contiguous()
        # 2. Project to queries, keys and values, split into heads.
        if attn.fused_projections:  # after `fuse_qkv_projections()`: one GEMM instead of three
            q, k, v = attn.to_qkv(h).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
        q, k, v = (t.unflatten(-1, (attn.heads, -1)) for t in (q, k, v))  # each (B, HW, heads, d)
        # 3. softmax(Q K^T / sqrt(d)) V per head (Vaswani et al. 2017 eq. 1), by the selected backend.
        a = dispatch_attention_fn(q, k, v, backend=self._attention_backend, parallel_config=self._parallel_config)
        # 4. Output projection back to the feature map, residual, optional rescale (diffusers' mid block).
        a = attn.to_out[0](a.flatten(2))  # (B, HW, C)
        out = a.transpose(1, 2).reshape(b, c, hgt, wid)  # a view for one head; channels_last when x is
        if torch.is_grad_enabled():
            out = out + x
            return out / attn.rescale_output_factor if attn.rescale_output_factor != 1.0 else out
        out = out.add_(x)  # no autograd: `out` is this layer's own fresh tensor
        return out.div_(attn.rescale_output_factor) if attn.rescale_output_factor != 1.0 else out


# diffusers' processors (by class name, defined in diffusers) that run a `DDPMAttention` with equal outputs.
_DIFFUSERS_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "SlicedAttnProcessor")


def _check_attn_processor(processor) -> None:
    """Raise a ValueError naming the processors that work if ``processor`` is a diffusers attention processor that
    cannot run a `DDPMAttention` (any other callable is the caller's own and is accepted)."""
    klass = type(processor)
    if klass.__module__.split(".")[0] == "diffusers" and klass.__name__ not in _DIFFUSERS_PROCESSORS:
        working = ", ".join(("DDPMAttnProcessor (the default)", *_DIFFUSERS_PROCESSORS))
        raise ValueError(
            f"{klass.__name__} cannot run DDPMAttention (self-attention over a feature map: no encoder states, "
            f"added K/V, IP-Adapter or fused-only projections); processors that work: {working}, or a callable "
            "processor(attn, hidden_states) of your own. For xformers, flash or NPU kernels use "
            "set_attention_backend(...) with the default processor."
        )


class DDPMAttention(nn.Module, AttentionModuleMixin):
    """Multi-head self-attention over all positions (L, H*W or F*H*W) with a residual connection.

    GroupNorm -> Q/K/V projections -> attention -> output projection, added to the input (then divided by
    `rescale_output_factor`, as diffusers' mid block does). For 3D inputs every frame position attends to every
    other one (IDM's `AttentionBlock` flattens all spatial axes the same way).

    The sub-module names are those of diffusers' `Attention` in `UNet2DModel` (`group_norm`, `to_q`, `to_k`, `to_v`,
    `to_out.0`, and a parameter-free `to_out.1` dropout of rate 0), so LoRA recipes targeting them apply unchanged,
    and as an `AttentionModuleMixin` the layer is reached by `set_attention_backend`, `set_attn_processor` and
    `fuse_qkv_projections`. Checkpoints written before this layout (one fused `qkv` Linear, `proj_out`, `norm`) are
    converted when loaded (`_split_legacy_attention`).

    Processors: `DDPMAttnProcessor` (the default), diffusers' `AttnProcessor`, `AttnProcessor2_0` and
    `SlicedAttnProcessor` (equal outputs: the layer carries the `Attention` attributes they read, at the values of
    `UNet2DModel`'s self-attention, and `forward` hands them 1D / 3D inputs as (B, C, 1, N)), or any callable
    `processor(attn, hidden_states)` of your own. Other diffusers processors (cross-attention, added-KV, IP-Adapter,
    fused-only, hardware-specific) are refused when set, with a ValueError naming the ones that work.
    """

    _default_processor_cls = DDPMAttnProcessor
    _available_processors = [DDPMAttnProcessor]
    # The diffusers `Attention` attributes those processors read, at the values of a plain self-attention layer.
    spatial_norm = norm_cross = norm_q = norm_k = None
    residual_connection = True
    upcast_attention = upcast_softmax = False

    def __init__(self, channels: int, heads: int, norm_groups: int | None, eps: float,
                 rescale_output_factor: float = 1.0, processor=None):
        super().__init__()
        self.heads = heads
        self.rescale_output_factor = rescale_output_factor
        self.use_bias = True  # read by `AttentionModuleMixin.fuse_projections`
        self.group_norm = nn.GroupNorm(norm_groups, channels, eps=eps) if norm_groups else None
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.scale = (channels // heads) ** -0.5  # softmax scale of diffusers' processors (the SDPA default)
        # Dropout of rate 0, as diffusers' `Attention.to_out[1]`; no parameters, so checkpoints are unchanged.
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])
        self.set_processor(processor if processor is not None else self._default_processor_cls())
        self.register_load_state_dict_pre_hook(_split_legacy_attention_hook)

    def set_processor(self, processor) -> None:
        """``AttentionModuleMixin.set_processor``, refusing the diffusers processors that cannot run this layer.

        Args:
            processor: one of the processors listed in [`DDPMAttention`], or a callable of your own.

        Raises:
            ValueError: another diffusers attention processor; the message names the ones that work.
        """
        _check_attn_processor(processor)
        super().set_processor(processor)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (B, C, *spatial). Returns the same shape."""
        if hidden_states.ndim != 4:  # 1D / 3D: the (B, C, 1, N) view (same positions, same order) for processors
            shape = hidden_states.shape
            return self.processor(self, hidden_states.reshape(shape[0], shape[1], 1, -1)).reshape(shape)
        return self.processor(self, hidden_states)


# Parameter names of the attention layer before it took diffusers' names: `norm` -> `group_norm`, one fused `qkv`
# Linear (rows [q; k; v]) -> `to_q`, `to_k`, `to_v`, `proj_out` -> `to_out.0`.
_LEGACY_ATTENTION_RENAMES = {"norm": "group_norm", "proj_out": "to_out.0"}


def _split_legacy_attention(state_dict: dict, prefix: str) -> None:
    """Rewrite, in place, the legacy keys of the attention layer at `prefix` (e.g. `"mid_block.attention."`)."""
    for suffix in ("weight", "bias"):
        qkv = state_dict.pop(f"{prefix}qkv.{suffix}", None)
        if qkv is not None:
            for name, part in zip(("to_q", "to_k", "to_v"), qkv.chunk(3, dim=0)):
                state_dict[f"{prefix}{name}.{suffix}"] = part
        for old, new in _LEGACY_ATTENTION_RENAMES.items():
            if f"{prefix}{old}.{suffix}" in state_dict:
                state_dict[f"{prefix}{new}.{suffix}"] = state_dict.pop(f"{prefix}{old}.{suffix}")


def _split_legacy_attention_hook(module, state_dict, prefix, *args) -> None:
    # `nn.Module.load_state_dict` path (accelerate checkpoints, user code): runs before this layer reads its keys.
    _split_legacy_attention(state_dict, prefix)


class DDPMDownsample(nn.Module):
    """Halve the spatial axes: 3x3 stride-2 conv (padding 1, or DDPM/TF-"SAME" asymmetric pad (0,1,0,1) when
    `padding=0`), or 2x2 average pooling (no parameters).

    `dims=1` halves L (kernel 3 / pool 2); `dims=3` halves H and W but keeps the frame axis F, as IDM: a 3x3x3
    conv with stride (1, 2, 2) whose frame axis is always padded by 1 (so F is kept; the asymmetric pad applies to
    H and W only), or (1, 2, 2) average pooling.
    """

    def __init__(self, channels: int, kind: str, padding: int, dims: int = 2):
        super().__init__()
        self.kind = kind
        self.padding = padding
        keep_frames = dims == 3
        stride = (1, 2, 2) if keep_frames else 2
        conv_padding = (1, padding, padding) if keep_frames else padding
        self.conv = _CONV[dims](channels, channels, 3, stride=stride, padding=conv_padding) if kind == "conv" else None
        self._pad = (0, 1) * min(dims, 2) + ((0, 0) if keep_frames else ())  # F.pad order: last axis first
        self._pool = _AVG_POOL[dims]
        self._pool_size = (1, 2, 2) if keep_frames else 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return self._pool(x, kernel_size=self._pool_size, stride=self._pool_size)
        if self.padding == 0:
            x = F.pad(x, self._pad)
        return self.conv(x)


class DDPMUpsample(nn.Module):
    """Double the spatial axes: nearest + 3x3 conv ("conv"), nearest only, or ConvTranspose2d(4, 2, 1).

    `dims=1`: nearest x2 + conv 3 / ConvTranspose1d(4, 2, 1). `dims=3` doubles H and W and keeps F (IDM):
    nearest with scale (1, 2, 2) + 3x3x3 conv, or ConvTranspose3d with kernel (3, 4, 4), stride (1, 2, 2),
    padding 1 (F kept; its 3-tap frame axis mixes neighbouring frames like every other 3x3x3 conv).
    """

    def __init__(self, channels: int, kind: str, dims: int = 2):
        super().__init__()
        self.kind = kind
        keep_frames = dims == 3
        self._scale = (1.0, 2.0, 2.0) if keep_frames else 2.0
        self.conv = _CONV[dims](channels, channels, 3, padding=1) if kind == "conv" else None
        if kind == "conv_transpose":
            kernel, stride = ((3, 4, 4), (1, 2, 2)) if keep_frames else (4, 2)
            self.conv = _CONV_TRANSPOSE[dims](channels, channels, kernel, stride=stride, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv_transpose":
            return self.conv(x)
        x = F.interpolate(x, scale_factor=self._scale, mode="nearest")
        return x if self.conv is None else self.conv(x)


class _CheckpointedBlock(nn.Module):
    """Runs sub-modules through diffusers' `_gradient_checkpointing_func` when checkpointing is enabled."""

    def __init__(self):
        super().__init__()
        self.gradient_checkpointing = False

    def _run(self, module: nn.Module, *args):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)


class DDPMDownLevel(_CheckpointedBlock):
    """One encoder resolution: `layers_per_block` res blocks (each optionally followed by attention), then an
    optional downsample. Every res/attn output and the downsample output become skip connections."""

    def __init__(self, resnets: list, attentions: list, downsample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.downsample = downsample

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = self._run(resnet, h, temb)
            if len(self.attentions):
                h = self._run(self.attentions[i], h)
            skips.append(h)
        if self.downsample is not None:
            h = self.downsample(h)
            skips.append(h)
        return h, skips


class DDPMMidBlock(_CheckpointedBlock):
    """Res -> (Attn) -> Res at the lowest resolution."""

    def __init__(self, resnets: list, attention: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attention = attention

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self._run(self.resnets[0], h, temb)
        if self.attention is not None:
            h = self._run(self.attention, h)
        return self._run(self.resnets[1], h, temb)


class DDPMUpLevel(_CheckpointedBlock):
    """One decoder resolution: `layers_per_block + 1` res blocks, each fed the concatenation of the running
    features and one popped skip, optionally followed by attention; then an optional upsample."""

    def __init__(self, resnets: list, attentions: list, upsample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.upsample = upsample

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C_h + C_skip, H, W)
            h = self._run(resnet, h, temb)
            if len(self.attentions):
                h = self._run(self.attentions[i], h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


@dataclass
class DDPMUNet2DOutput(BaseOutput):
    """Output of [`DDPMUNet2DModel`].

    Args:
        sample (`torch.Tensor` of shape `(batch_size, out_channels, height, width)`):
            The network output (`(batch_size, out_channels, length)` for `dims=1`,
            `(batch_size, out_channels, frames, height, width)` for `dims=3`). With learned variance
            (`out_channels == 2 * in_channels`) the first `in_channels` channels are the epsilon / x0 / v
            prediction and the rest the variance values (IDM).
    """

    sample: torch.Tensor


class DDPMUNet2DModel(ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin):
    r"""A DDPM / improved-diffusion style UNet that plugs into diffusers pipelines.

    Layout (as DDPM and diffusers' `UNet2DModel`): `conv_in`; per level `layers_per_block` res blocks
    (+ attention where the level's resolution is in `attention_resolutions`) and a downsample except on the
    last level; a Res-(Attn)-Res middle; per level `layers_per_block + 1` res blocks fed concatenated skips
    (+ attention) and an upsample except on the first level; GroupNorm -> activation -> `conv_out`.

    1D and 3D variants (`dims`, IDM's name): sequences / audio (`dims=1`, `(B, C, L)`) or short videos / volumes
    (`dims=3`, `(B, C, F, H, W)`). Every option keeps its meaning; only the convolutions change rank (IDM's
    `conv_nd`). `dims=3` never resamples the frame axis F (IDM; see `DDPMDownsample` / `DDPMUpsample`), so any F
    works, and attention attends jointly over all F*H*W positions. The class keeps its 2D name because saved
    pipelines record it; `DDPMPipeline`, `from_unet2d` and `to_unet2d` are 2D only (sample 1D / 3D models with the
    scheduler directly: `scheduler.step(model(x, t).sample, t, x).prev_sample`).

    Args:
        sample_size (`int` or `tuple[int]`, *optional*, defaults to 32):
            Spatial size the model is built for, one entry per spatial axis: `(L,)` for `dims=1`, `(H, W)` for
            `dims=2` (read by `DDPMPipeline`), `(F, H, W)` for `dims=3`. An int is used for every axis, so a 2D
            preset's int keeps working with `dims=1` or `dims=3`. It is the base for `attention_resolutions`. The
            halved axes (L; H, W; H, W) must be divisible by `2 ** (len(block_out_channels) - 1)`; F may be anything.
        in_channels (`int`, defaults to 3): Channels of the input sample.
        out_channels (`int`, *optional*): Output channels; `2 * in_channels` for learned variance
            (first half: eps / x0 / v, second half: variance values, as IDM). Defaults to `in_channels`.
        center_input_sample (`bool`, defaults to `False`): Map the input from [0, 1] to [-1, 1] first.
        block_out_channels (`tuple[int]`, defaults to `(128, 256, 256, 256)`): Channels of each level.
        layers_per_block (`int`, defaults to 2): Res blocks per encoder level (decoder levels get one more).
        flip_sin_to_cos (`bool`, defaults to `True`): Timestep sinusoids as [cos, sin] (IDM, diffusers) rather
            than [sin, cos] (DDPM).
        freq_shift (`float`, defaults to 0): Shift in the sinusoid frequency denominator `half - freq_shift`
            (DDPM uses 1).
        time_embedding_dim (`int`, *optional*): Width of the time embedding MLP; defaults to
            `4 * block_out_channels[0]`. The sinusoid width is `block_out_channels[0]`.
        time_embedding_act_fn (`str`, defaults to `"silu"`): Activation inside the time MLP; one of
            `silu`, `swish`, `relu`, `gelu`, `mish` (seed 000's SimpleUNet uses `relu`).
        act_fn (`str`, defaults to `"silu"`): Activation in the res blocks, on the time embedding before each
            block's projection, and before `conv_out`. Same choices.
        resnet_skip_time_act (`bool`, defaults to `False`): Feed the raw time embedding (no activation) to the
            res blocks' projections (seed 000).
        resnet_time_scale_shift (`str`, defaults to `"default"`): `"default"` adds the projected time embedding
            before `norm2`; `"scale_shift"` is IDM's FiLM `norm2(h) * (1 + scale) + shift`.
        norm_num_groups (`int`, defaults to 32): GroupNorm groups; must divide every level's channels.
        norm_eps (`float`, defaults to 1e-5): GroupNorm epsilon (DDPM and smalldiffusion use 1e-6).
        dropout (`float`, defaults to 0.0): Dropout before each res block's second conv.
        attention_resolutions (`tuple[int]`, defaults to `(16,)`): Resolutions at which a level gets
            self-attention after each res block, in encoder and decoder. A level's resolution is its size along the
            first halved axis: `H // 2**i` for `dims=2` and `dims=3` (F is never halved), `L // 2**i` for `dims=1`,
            so a value names the same level (IDM's `ds = size / resolution`) whatever `dims` is. A value no level
            has is an error. Empty for no level attention.
        add_attention (`bool`, defaults to `True`): Attention between the two middle res blocks.
        attention_head_dim (`int`, *optional*): Channels per attention head (diffusers semantics). If neither
            this nor `num_attention_heads` is given, every attention layer has a single head.
        num_attention_heads (`int`, *optional*): Heads per attention layer instead (IDM `num_heads`; IDM's
            CIFAR-10 model uses 4). Mutually exclusive with `attention_head_dim`.
        mid_attention_norm (`bool`, defaults to `True`): GroupNorm before the middle attention. diffusers'
            `UNet2DModel` drops it in `scale_shift` layouts; conversion sets this accordingly.
        attn_norm_num_groups (`int`, *optional*): Groups of the middle attention's GroupNorm; defaults to
            `norm_num_groups`.
        mid_block_scale_factor (`float`, defaults to 1.0): Middle res/attn outputs are divided by this.
        downsample_type (`str`, defaults to `"conv"`): `"conv"` (3x3 stride-2 conv) or `"avg_pool"`.
        downsample_padding (`int`, defaults to 1): For `"conv"`: 1 pads symmetrically; 0 pads (0, 1, 0, 1)
            first (DDPM / TF "SAME", smalldiffusion), as `UNet2DModel`'s `downsample_padding=0`.
        upsample_type (`str`, defaults to `"conv"`): `"conv"` (nearest x2 + 3x3 conv, as `UNet2DModel`),
            `"nearest"` (no conv) or `"conv_transpose"` (ConvTranspose2d(4, 2, 1); seeds 000/002).
        zero_init_residual (`bool`, defaults to `False`): Zero-initialise each res block's `conv2`, each
            attention output projection and `conv_out` (IDM `zero_module`), so every block starts as identity.
        num_class_embeds (`int`, *optional*): Number of classes for class conditioning. The embedding table has
            one more row: index `num_class_embeds` is the null class (see `null_class_label`) used for
            classifier-free guidance and when `class_labels` is None.
        dims (`int`, defaults to 2): Number of spatial axes: 1 (`(B, C, L)`), 2 (`(B, C, H, W)`) or 3
            (`(B, C, F, H, W)`; F is kept at every level). `dims=2` is the layout above, unchanged.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DDPMResBlock", "DDPMAttention", "DDPMDownLevel", "DDPMMidBlock", "DDPMUpLevel"]
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        center_input_sample: bool = False,
        block_out_channels: tuple[int, ...] = (128, 256, 256, 256),
        layers_per_block: int = 2,
        flip_sin_to_cos: bool = True,
        freq_shift: float = 0,
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: ActivationName = "silu",
        act_fn: ActivationName = "silu",
        resnet_skip_time_act: bool = False,
        resnet_time_scale_shift: TimeScaleShift = "default",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
        attention_resolutions: tuple[int, ...] = (16,),
        add_attention: bool = True,
        attention_head_dim: int | None = None,
        num_attention_heads: int | None = None,
        mid_attention_norm: bool = True,
        attn_norm_num_groups: int | None = None,
        mid_block_scale_factor: float = 1.0,
        downsample_type: DownsampleType = "conv",
        downsample_padding: Literal[0, 1] = 1,
        upsample_type: UpsampleType = "conv",
        zero_init_residual: bool = False,
        num_class_embeds: int | None = None,
        dims: SpatialDims = 2,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        # `register_to_config` has recorded every argument; check them all before building anything.
        chans, attn_res = _validate_config({**self.config, "out_channels": out_channels})
        if self.config.out_channels is None:  # record the resolved value, so the config is complete
            self.register_to_config(out_channels=out_channels)
        size = _as_spatial(sample_size, dims)
        levels = len(chans)
        temb_dim = time_embedding_dim or 4 * chans[0]
        self._act = _ACTIVATIONS[act_fn]
        self._act_ = _INPLACE_ACTIVATIONS[act_fn]
        self._skip_time_act = resnet_skip_time_act
        self._sample_ndim = dims + 2
        self._halved_axes = 2 + _halved_from(dims)  # sample.shape[self._halved_axes:] are the halved axes
        resolutions = _level_resolutions(size, dims, levels) if size is not None else [None] * levels
        level_attn = [r in attn_res for r in resolutions]
        conv = _CONV[dims]

        def heads(c: int) -> int:
            if num_attention_heads is not None:
                return num_attention_heads
            return 1 if attention_head_dim is None else c // attention_head_dim

        def res(cin: int, cout: int, scale: float = 1.0) -> DDPMResBlock:
            return DDPMResBlock(cin, cout, temb_dim, norm_num_groups, norm_eps, act_fn, dropout,
                                resnet_time_scale_shift, scale, dims)

        def attn(c: int, groups: int | None = norm_num_groups, scale: float = 1.0) -> DDPMAttention:
            return DDPMAttention(c, heads(c), groups, norm_eps, scale)

        self.conv_in = conv(in_channels, chans[0], 3, padding=1)
        self.time_embedding = DDPMTimestepMLP(chans[0], temb_dim, time_embedding_act_fn)
        # One extra row: the null class for classifier-free guidance.
        self.class_embedding = nn.Embedding(num_class_embeds + 1, temb_dim) if num_class_embeds else None

        # Encoder; `skip_ch` tracks the channels of each pushed skip to size the decoder's concatenations.
        skip_ch = [chans[0]]
        self.down_blocks = nn.ModuleList()
        cin = chans[0]
        for i, c in enumerate(chans):
            resnets = [res(cin if j == 0 else c, c) for j in range(layers_per_block)]
            attns = [attn(c) for _ in range(layers_per_block)] if level_attn[i] else []
            down = DDPMDownsample(c, downsample_type, downsample_padding, dims) if i < levels - 1 else None
            skip_ch += [c] * (layers_per_block + (down is not None))
            self.down_blocks.append(DDPMDownLevel(resnets, attns, down))
            cin = c

        mid_groups = (attn_norm_num_groups or norm_num_groups) if mid_attention_norm else None
        self.mid_block = DDPMMidBlock(
            [res(chans[-1], chans[-1], mid_block_scale_factor), res(chans[-1], chans[-1], mid_block_scale_factor)],
            attn(chans[-1], mid_groups, mid_block_scale_factor) if add_attention else None,
        )

        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            c = chans[i]
            resnets = [res((cin if j == 0 else c) + skip_ch.pop(), c) for j in range(layers_per_block + 1)]
            cin = c
            attns = [attn(c) for _ in range(layers_per_block + 1)] if level_attn[i] else []
            up = DDPMUpsample(c, upsample_type, dims) if i > 0 else None
            self.up_blocks.append(DDPMUpLevel(resnets, attns, up))

        self.norm_out = nn.GroupNorm(norm_num_groups, chans[0], eps=norm_eps)
        self.conv_out = conv(chans[0], out_channels, 3, padding=1)

        if zero_init_residual:
            self._zero_init_residual()

    def _zero_init_residual(self) -> None:
        """IDM `zero_module`: every residual branch and the output start at zero."""
        layers = [m.conv2 for m in self.modules() if isinstance(m, DDPMResBlock)] + [self.conv_out]
        layers += [m.to_out[0] for m in self.modules() if isinstance(m, DDPMAttention)]
        for layer in layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def null_class_label(self) -> int | None:
        """Index of the reserved null (unconditional) class, or None for an unconditional model."""
        return self.config.num_class_embeds if self.config.num_class_embeds else None

    def set_attn_processor(self, processor) -> None:
        """``AttentionMixin.set_attn_processor``, checking every entry before any layer changes.

        Args:
            processor: one of the processors listed in [`DDPMAttention`] or a callable of your own, for every layer;
                or a dict with one per layer (``attn_processors``' keys).

        Raises:
            ValueError: a diffusers processor that cannot run our attention layers (naming the ones that work).
        """
        for value in (processor.values() if isinstance(processor, dict) else [processor]):
            _check_attn_processor(value)
        super().set_attn_processor(processor)

    # ------------------------------------------------------------------ loading

    @classmethod
    def _load_pretrained_model(
        cls, model, state_dict, resolved_model_file, pretrained_model_name_or_path, loaded_keys, *args, **kwargs
    ):
        """`ModelMixin.from_pretrained`'s weight loading, plus two guards: a checkpoint saved before the attention
        layers took diffusers' names (fused `qkv`, `proj_out`) is converted, and a checkpoint that lacks any of the
        model's tensors is refused (diffusers would leave them random, or on the meta device)."""
        if any(key.endswith(".qkv.weight") for key in loaded_keys):
            if state_dict is None:  # sharded: diffusers reads shard by shard; a layer's keys may span two shards
                state_dict = {}
                for shard in resolved_model_file:
                    state_dict.update(_read_checkpoint_file(shard))
            for name, module in model.named_modules():
                if isinstance(module, DDPMAttention):
                    _split_legacy_attention(state_dict, f"{name}.")
            loaded_keys = list(state_dict)
        missing = sorted(set(model.state_dict()) - set(loaded_keys))
        if missing and kwargs.get("hf_quantizer") is None:
            raise ValueError(
                f"The checkpoint at {pretrained_model_name_or_path!r} has no tensors for {len(missing)} of "
                f"{cls.__name__}'s parameters (e.g. {missing[:4]}): its weights do not match its config.json. "
                "Refusing to leave them randomly initialised; load it with the class that saved it."
            )
        return super()._load_pretrained_model(
            model, state_dict, resolved_model_file, pretrained_model_name_or_path, loaded_keys, *args, **kwargs
        )

    # ------------------------------------------------------------------ forward

    def _batch_timesteps(self, timestep, batch: int, device: torch.device) -> torch.Tensor:
        """Python number, 0-dim, (1,) or (B,) tensor -> (B,) tensor on `device`."""
        if not torch.is_tensor(timestep):
            if isinstance(timestep, bool) or not isinstance(timestep, (int, float)):
                raise TypeError(f"`timestep` must be an int, a float or a tensor, got {type(timestep).__name__}.")
            dtype = torch.long if isinstance(timestep, int) else torch.float32
            return torch.full((batch,), timestep, dtype=dtype, device=device)
        t = timestep.to(device)
        if t.ndim == 0 or t.numel() == 1:
            return t.reshape(1).expand(batch)
        if t.ndim != 1 or t.shape[0] != batch:
            raise ValueError(f"`timestep` must be a scalar or have shape ({batch},), got {tuple(t.shape)}.")
        return t

    def _class_embedding(self, class_labels, batch: int, device: torch.device) -> torch.Tensor | None:
        n = self.config.num_class_embeds
        if self.class_embedding is None:
            if class_labels is not None:
                raise ValueError("`class_labels` were given but this model is unconditional (`num_class_embeds` is "
                                 "None).")
            return None
        if class_labels is None:
            labels = torch.full((batch,), n, dtype=torch.long, device=device)
        else:
            labels = torch.as_tensor(class_labels, device=device)
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise TypeError(f"`class_labels` must be integers, got dtype {labels.dtype}.")
            if labels.ndim == 0 or labels.numel() == 1:
                labels = labels.reshape(1).expand(batch)
            if labels.shape != (batch,):
                raise ValueError(f"`class_labels` must have shape ({batch},), got {tuple(labels.shape)}.")
            if not torch.compiler.is_compiling():
                lo, hi = int(labels.min()), int(labels.max())
                if lo < 0 or hi > n:
                    raise ValueError(f"`class_labels` must lie in [0, {n}] ({n} = null class); got values in "
                                     f"[{lo}, {hi}].")
        return self.class_embedding(labels)

    def _compute_dtype(self) -> torch.dtype:
        """The weights' dtype, or under diffusers' layerwise casting (e.g. float8 storage) the hook's compute dtype, as
        `ModelMixin.dtype` reports it; read from `conv_in` alone, so each call does not walk every module."""
        registry = getattr(self.conv_in, "_diffusers_hook", None)
        hook = registry.get_hook("layerwise_casting") if registry is not None else None
        return hook.compute_dtype if hook is not None else self.conv_in.weight.dtype

    def _check_sample(self, sample: torch.Tensor) -> None:
        if sample.ndim != self._sample_ndim:
            dims = self._sample_ndim - 2
            raise ValueError(f"`sample` must be {_LAYOUT[dims]} for a dims={dims} model, got shape "
                             f"{tuple(sample.shape)}.")
        c_in = self.config.in_channels
        if sample.shape[1] != c_in:
            raise ValueError(f"`sample` has {sample.shape[1]} channels but the model expects in_channels={c_in}.")
        factor = 2 ** (len(self.config.block_out_channels) - 1)
        halved = sample.shape[self._halved_axes:]  # (L,), (H, W), or (H, W) of (F, H, W)
        if any(s % factor for s in halved):
            raise ValueError(f"`sample` spatial size {'x'.join(map(str, halved))} is not divisible by 2**(levels-1) = "
                             f"{factor} ({len(self.config.block_out_channels)} levels).")

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | int | None = None,
        return_dict: bool = True,
    ) -> DDPMUNet2DOutput | tuple:
        r"""Predict the diffusion target for a noisy batch.

        Args:
            sample (`torch.Tensor`): Noisy input of shape `(batch, in_channels, height, width)`
                (`(batch, in_channels, length)` for `dims=1`, `(batch, in_channels, frames, height, width)` for
                `dims=3`).
            timestep (`torch.Tensor`, `int` or `float`): Python number, 0-dim tensor or `(batch,)` tensor;
                broadcast over the batch. Fractional values are kept (no rounding).
            class_labels (`torch.Tensor` or `int`, *optional*): `(batch,)` integer labels in
                `[0, num_class_embeds]` (the last is the null class). None on a class-conditional model means
                the null class for every sample (so a plain `DDPMPipeline` samples unconditionally).
            return_dict (`bool`, defaults to `True`): Return a [`DDPMUNet2DOutput`] instead of a tuple.

        Returns:
            [`DDPMUNet2DOutput`] or `tuple`: the `(batch, out_channels, *spatial)` prediction.
        """
        self._check_sample(sample)
        cfg = self.config
        batch, device = sample.shape[0], sample.device
        dtype = self._compute_dtype()
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        # Time (+ class) embedding.
        t = self._batch_timesteps(timestep, batch, device)
        t_emb = sinusoidal_timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embedding(t_emb.to(dtype))  # (B, T)
        class_emb = self._class_embedding(class_labels, batch, device)
        if class_emb is not None:
            emb = emb + class_emb.to(dtype)
        # Every res block applies the same activation to the embedding; do it once.
        temb = emb if self._skip_time_act else self._act(emb)
        # conv_in, encoder (pushing skips), middle, decoder (popping them), GroupNorm -> activation -> conv_out.
        h = self.conv_in(sample)  # (B, C0, *spatial)
        skips = [h]
        for block in self.down_blocks:
            h, level_skips = block(h, temb)
            skips.extend(level_skips)
        h = self.mid_block(h, temb)
        for block in self.up_blocks:
            h = block(h, skips, temb)
        act = self._act if torch.is_grad_enabled() else self._act_
        h = self.conv_out(act(self.norm_out(h)))  # (B, out_channels, *spatial)
        return DDPMUNet2DOutput(sample=h) if return_dict else (h,)

    # ------------------------------------------------------------------ presets and UNet2DModel conversion
    # In the package (`presets.py`, `convert.py`), not in this remote-code file: see `_package_module`.

    @classmethod
    def list_presets(cls) -> list[str]:
        """Names accepted by [`~DDPMUNet2DModel.from_preset`]."""
        return _package_module("presets", "`list_presets`").list_presets()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DDPMUNet2DModel":
        """Build a randomly initialised model from a named configuration (see `diffusers_ddpm_ext.UNET_PRESETS`).

        Args:
            name (`str`): One of [`~DDPMUNet2DModel.list_presets`].
            **overrides: Config keys replacing the preset's values (e.g. `num_class_embeds=10`, or `dims=1` /
                `dims=3` for the 1D / 3D variant of the preset; an int `sample_size` then applies to every axis).
        """
        return cls(**_package_module("presets", "`from_preset`").preset_config(name, **overrides))

    @classmethod
    def from_unet2d(cls, unet2d) -> "DDPMUNet2DModel":
        """Convert a diffusers `UNet2DModel` (DDPM layout) into an equivalent `DDPMUNet2DModel`.

        Supported: `DownBlock2D`/`AttnDownBlock2D`, `UpBlock2D`/`AttnUpBlock2D`, `UNetMidBlock2D`, positional
        time embedding, `resnet_time_scale_shift` default or scale_shift, any dividing `attention_head_dim`
        (or None), `downsample_padding` 0 or 1, `num_class_embeds`. A class table of N rows becomes N + 1 rows
        (null row zero). Anything else raises a ValueError naming the part.
        """
        return _package_module("convert", "`from_unet2d`").from_unet2d(unet2d, cls)

    def to_unet2d(self):
        """Convert to an equivalent diffusers `UNet2DModel` (config and weights; the null class row is dropped).

        Raises a ValueError naming the option when this model uses something `UNet2DModel` cannot express
        (e.g. `upsample_type="conv_transpose"`, a non-SiLU activation, per-level head dims from
        `num_attention_heads`, or `dims` other than 2: `UNet2DModel` is 2D only).
        """
        return _package_module("convert", "`to_unet2d`").to_unet2d(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        r"""[`~ModelMixin.from_pretrained`], which also accepts a diffusers `UNet2DModel` folder or repo id.

        A checkpoint whose config.json names `UNet2DModel` (`_class_name`) is loaded with
        `UNet2DModel.from_pretrained(**kwargs)` and converted (see [`~DDPMUNet2DModel.from_unet2d`]); a layout with
        no equivalent, or a config of another class, raises a ValueError naming the fix, never random weights.
        NaN or infinite weights raise a `NonFiniteWeightsError` (see `check_finite_weights`), also under
        `DiffusionPipeline.from_pretrained`, which loads a saved pipeline's UNet through this method.
        """
        where = f"{pretrained_model_name_or_path}: {kwargs.get('subfolder') or cls.__name__}"
        config = cls._peek_config(pretrained_model_name_or_path, kwargs)
        saved_as = config.get("_class_name")
        if saved_as == "UNet2DModel":
            convert = _package_module("convert", "Loading a UNet2DModel checkpoint")
            loaded = convert.unet2d_from_pretrained(cls, pretrained_model_name_or_path, config, **kwargs)
        elif saved_as not in (None, cls.__name__, DDPMUNet2DModel.__name__) and "attention_resolutions" not in config:
            raise ValueError(
                f"{pretrained_model_name_or_path!r} holds a {saved_as} (config.json `_class_name`), which "
                f"{cls.__name__} cannot load; only its own checkpoints and UNet2DModel ones convert. Load it with "
                f"`diffusers.{saved_as}.from_pretrained` instead."
            )
        else:
            loaded = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        check_finite_weights(loaded[0] if isinstance(loaded, tuple) else loaded, where)  # (model, loading_info)
        return loaded

    @classmethod
    def _peek_config(cls, pretrained_model_name_or_path, kwargs: dict) -> dict:
        """The raw config.json `from_pretrained` will read (same folder, subfolder, cache and revision), or {} when it
        cannot be read here: `from_pretrained` then reports the problem itself."""
        lookup = {k: kwargs[k] for k in _CONFIG_LOOKUP_KWARGS if k in kwargs}
        try:
            return dict(cls.load_config(pretrained_model_name_or_path, **lookup))
        except (OSError, ValueError):
            return {}


# ---------------------------------------------------------------------- weights


class NonFiniteWeightsError(ValueError):
    """A model's weights hold NaN or infinite values (raised by `check_finite_weights`).

    Args:
        message (`str`): the error message, naming the tensors.
        tensor_names (`list[str]`): the state-dict keys of every bad tensor, in state-dict order.
    """

    def __init__(self, message: str, tensor_names: list[str]):
        super().__init__(message)
        self.tensor_names = tensor_names


def check_finite_weights(model: nn.Module, source: str) -> None:
    """Refuse a model whose floating-point weights (parameters and buffers) hold NaN or infinite values: it would
    sample NaN images (or finite garbage, where a normalisation absorbs an infinity). The one check behind
    `DDPMUNet2DModel.from_pretrained`, `diffusers_ddpm_ext.hub.load_pipeline` and the evaluate CLI; tensors on the
    meta device and integer tensors are skipped.

    Args:
        model (`torch.nn.Module`): the model to check, e.g. a loaded UNet of any class.
        source (`str`): what the model is, for the message, e.g. ``"ddpm-digits: unet"``.

    Raises:
        NonFiniteWeightsError: naming the bad tensors by their state-dict keys, with their NaN, +inf, -inf counts.
    """
    bad = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not tensor.is_meta and not bool(torch.isfinite(tensor).all()):
            counts = zip(("NaN", "+inf", "-inf"), (torch.isnan(tensor), torch.isposinf(tensor), torch.isneginf(tensor)))
            bad[name] = ", ".join(f"{int(m.sum())} {kind}" for kind, m in counts if bool(m.any()))
            bad[name] += f" of {tensor.numel()}"
    if bad:
        (first, first_counts), *others = bad.items()
        more = ", ".join(f"{name!r} ({counts})" for name, counts in others[:4])
        more = (f"; so do {more}" if others else "") + (f" and {len(others) - 4} more" if len(others) > 4 else "")
        raise NonFiniteWeightsError(
            f"{source} weight {first!r} holds NaN or infinite values ({first_counts}{more}): the checkpoint is "
            "corrupt and would sample NaN images. Load or export one saved before the weights went bad.", list(bad))


# ---------------------------------------------------------------------- validation


def _require_int(name: str, value, low: int = 1, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not _is_int(value):
        what = "an int" + (" or None" if optional else "")
        raise TypeError(f"`{name}`={value!r} must be {what}, got {type(value).__name__}.")
    if value < low:
        raise ValueError(f"`{name}`={value!r} must be >= {low}.")


def _require_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}`={value!r} must be True or False, got {type(value).__name__}.")


def _require_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}`={value!r} must be a number, got {type(value).__name__}.")
    if not math.isfinite(value):
        raise ValueError(f"`{name}`={value!r} must be finite.")
    return float(value)


def _int_list(name: str, value, allow_empty: bool, optional: bool = False) -> list[int]:
    if value is None and optional:
        return []
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"`{name}`={value!r} must be a list or tuple of ints, got {type(value).__name__}.")
    if not value and not allow_empty:
        raise ValueError(f"`{name}`={value!r} must not be empty.")
    if any(not _is_int(v) for v in value):
        raise TypeError(f"`{name}`={value!r} must hold ints only.")
    if any(v < 1 for v in value):
        raise ValueError(f"`{name}`={value!r} must hold positive ints.")
    return list(value)


def _validate_config(cfg: dict) -> tuple[list[int], list[int]]:
    """Check every constructor argument (types first, then ranges, then consistency); raise a ValueError or
    TypeError naming the field. Returns `(block_out_channels, attention_resolutions sorted descending)`."""
    _check_choice("dims", cfg["dims"], _DIMS)  # first: `sample_size` is read against it
    dims = cfg["dims"]
    for name in ("center_input_sample", "flip_sin_to_cos", "resnet_skip_time_act", "add_attention",
                 "mid_attention_norm", "zero_init_residual"):
        _require_bool(name, cfg[name])
    for name, allowed in (("time_embedding_act_fn", get_args(ActivationName)), ("act_fn", get_args(ActivationName)),
                          ("resnet_time_scale_shift", _TIME_SCALE_SHIFT), ("downsample_type", _DOWNSAMPLE_TYPES),
                          ("upsample_type", _UPSAMPLE_TYPES), ("downsample_padding", (0, 1))):
        _check_choice(name, cfg[name], allowed)
    for name in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
        _require_int(name, cfg[name])
    for name in ("time_embedding_dim", "attention_head_dim", "num_attention_heads", "attn_norm_num_groups",
                 "num_class_embeds"):
        _require_int(name, cfg[name], optional=True)
    chans = _int_list("block_out_channels", cfg["block_out_channels"], allow_empty=False)
    attn_res = sorted(set(_int_list("attention_resolutions", cfg["attention_resolutions"], allow_empty=True,
                                    optional=True)), reverse=True)
    freq_shift = _require_real("freq_shift", cfg["freq_shift"])
    half = chans[0] // 2
    if half > 0 and not freq_shift < half:
        # The sinusoid frequencies are max_period ** (-i / (half - freq_shift)): the denominator must stay positive.
        raise ValueError(f"`freq_shift`={cfg['freq_shift']!r} must be < block_out_channels[0] // 2 = {half} "
                         "(the sinusoid frequency denominator is `block_out_channels[0] // 2 - freq_shift`).")
    for name, ok, bounds in (("norm_eps", lambda v: v > 0, "> 0"), ("dropout", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
                             ("mid_block_scale_factor", lambda v: v > 0, "> 0 (outputs are divided by it)")):
        if not ok(_require_real(name, cfg[name])):
            raise ValueError(f"`{name}`={cfg[name]!r} must be {bounds}.")

    groups = cfg["norm_num_groups"]
    bad = [c for c in chans if c % groups]
    if bad:
        raise ValueError(f"`block_out_channels` {bad} not divisible by `norm_num_groups`={groups}.")
    attn_groups = cfg["attn_norm_num_groups"]
    if attn_groups is not None and chans[-1] % attn_groups:
        raise ValueError(f"Middle channels {chans[-1]} (`block_out_channels`[-1]) not divisible by "
                         f"`attn_norm_num_groups`={attn_groups}.")
    sample_size = cfg["sample_size"]
    size = _as_spatial(sample_size, dims)
    if size is not None and min(size) < 1:
        raise ValueError(f"`sample_size`={sample_size!r} must be positive.")
    factor = 2 ** (len(chans) - 1)
    halved = size[_halved_from(dims):] if size is not None else ()  # dims=3: F is never halved
    if any(s % factor for s in halved):
        raise ValueError(f"`sample_size`={sample_size!r} is not divisible by 2**(levels-1) = {factor} "
                         f"for {len(chans)} levels (`block_out_channels`={chans})"
                         + (" on its H and W axes (dims=3 keeps F)." if dims == 3 else "."))
    have = _level_resolutions(size, dims, len(chans)) if size is not None else []
    if attn_res:
        if size is None:
            raise ValueError(f"`attention_resolutions`={attn_res} needs `sample_size` to locate the levels.")
        missing = [r for r in attn_res if r not in have]
        if missing:
            raise ValueError(f"`attention_resolutions` {missing} match no level; the levels' resolutions are {have} "
                             f"(`sample_size`={sample_size!r}, {len(chans)} `block_out_channels` levels).")
    head_dim, num_heads = cfg["attention_head_dim"], cfg["num_attention_heads"]
    if head_dim is not None and num_heads is not None:
        raise ValueError("Give either `attention_head_dim` or `num_attention_heads`, not both "
                         f"(got {head_dim} and {num_heads}).")
    attn_chans = [c for c, r in zip(chans, have) if r in attn_res]
    if cfg["add_attention"]:
        attn_chans.append(chans[-1])
    for c in attn_chans:
        for name, n in (("attention_head_dim", head_dim), ("num_attention_heads", num_heads)):
            if n is not None and c % n:
                raise ValueError(f"`{name}`={n} does not divide attention channels {c} (`block_out_channels`).")
    return chans, attn_res
