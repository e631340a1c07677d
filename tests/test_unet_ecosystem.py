"""`DDPMUNet2DModel` in diffusers' tooling, side by side with `UNet2DModel` carrying the same weights: layerwise
casting, loading UNet2DModel checkpoints (folder and offline Hub id), checkpoints saved before the attention layers
took diffusers' names, attention backends / processors, LoRA through `add_adapter` with peft, and the Hub copy of
`unet.py` without our package."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from diffusers.models.attention_processor import Attention, MochiAttention
from huggingface_hub import constants
from safetensors.torch import load_file, save_file

import diffusers_ddpm_ext
from diffusers_ddpm_ext import convert, presets, unet
from diffusers_ddpm_ext.unet import DDPMAttention, DDPMAttnProcessor, DDPMUNet2DModel

# The DDPM layout at small width, class-conditional, attention on one level and in the middle (4 attention layers).
LAYOUT = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
              down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
              norm_num_groups=8, attention_head_dim=16, num_class_embeds=4)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' standard attention LoRA targets
# float8 e4m3 keeps 3 mantissa bits: each stored weight is off by up to 2^-4 = 6 % relative. Through this network
# the output's relative L2 error is about 8 % (the same for UNet2DModel); bound it at 15 %.
FP8_REL_TOL = 0.15
SHA = "89abcdef0123456789abcdef0123456789abcdef"
PKG = Path(diffusers_ddpm_ext.__file__).parent


def random_unet2d(**overrides) -> UNet2DModel:
    torch.manual_seed(0)
    model = UNet2DModel(**{**LAYOUT, **overrides}).eval()
    with torch.no_grad():  # perturb norm affines and biases too, so every tensor carries signal
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if "norm" in name or name.endswith("bias") else None
    return model


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10, 700]),
            {"class_labels": torch.tensor([1, 3])})


def run(model, seed: int = 1) -> torch.Tensor:
    x, t, kw = inputs(seed)
    with torch.no_grad():
        return model(x, t, **kw).sample


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------- layerwise casting (issue 14, item 2)


def test_layerwise_casting_float8_storage_fp32_compute_matches_unet2d():
    theirs = random_unet2d()
    ours = DDPMUNet2DModel.from_unet2d(theirs)
    ref_theirs, ref_ours = run(theirs), run(ours)
    assert max_diff(ref_ours, ref_theirs) <= 1e-5
    for model in (theirs, ours):
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    # stored in float8 except the norms (diffusers' `_skip_layerwise_casting_patterns`, as UNet2DModel's)
    assert ours.conv_in.weight.dtype == torch.float8_e4m3fn
    assert ours.down_blocks[1].attentions[0].to_q.weight.dtype == torch.float8_e4m3fn
    assert ours.norm_out.weight.dtype == torch.float32 and ours.dtype == torch.float32
    low_theirs, low_ours = run(theirs), run(ours)
    assert low_ours.dtype == torch.float32
    # Same float8 weights, same fp32 compute: the two networks agree as closely as in fp32 ...
    assert max_diff(low_ours, low_theirs) <= 1e-5
    # ... and the storage error is what diffusers' own model shows.
    assert 0 < rel_err(low_ours, ref_ours) <= FP8_REL_TOL
    assert rel_err(low_ours, ref_ours) <= rel_err(low_theirs, ref_theirs) * 1.01 + 1e-6
    # training-mode forward with autograd runs too (the hooks cast per call)
    x, t, kw = inputs()
    assert torch.isfinite(ours.train()(x, t, **kw).sample).all()


# ---------------------------------------------------------------------- from_pretrained of UNet2DModel (item 3)


def make_hf_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay `folder` out as huggingface_hub's cache does after downloading `repo_id` at revision SHA."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, root / "snapshots" / SHA)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(SHA)


@pytest.fixture(scope="module")
def unet2d_checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("unet2d")
    theirs = random_unet2d()
    theirs.save_pretrained(base / "root")  # google/ddpm-cifar10-32 style: the UNet at the repo root
    theirs.save_pretrained(base / "pipe" / "unet")  # a pipeline repo: the UNet in unet/
    cache = base / "cache"
    make_hf_cache(cache, "org/unet2d-root", base / "root")
    make_hf_cache(cache, "org/unet2d-pipe", base / "pipe")
    return dict(base=base, cache=cache, ref=run(theirs), theirs=theirs)


def assert_converted(model, ckpt):
    assert type(model) is DDPMUNet2DModel and not model.training
    assert not any(p.is_meta for p in model.parameters())
    assert max_diff(run(model), ckpt["ref"]) <= 1e-5
    assert model.config.num_class_embeds == 4 and model.config.attention_resolutions == [8]


def test_from_pretrained_converts_a_local_unet2d_folder(unet2d_checkpoints):
    ckpt = unet2d_checkpoints
    assert json.loads((ckpt["base"] / "root" / "config.json").read_text())["_class_name"] == "UNet2DModel"
    assert_converted(DDPMUNet2DModel.from_pretrained(ckpt["base"] / "root"), ckpt)
    assert_converted(DDPMUNet2DModel.from_pretrained(ckpt["base"] / "pipe", subfolder="unet"), ckpt)
    model, info = DDPMUNet2DModel.from_pretrained(ckpt["base"] / "root", output_loading_info=True)
    assert_converted(model, ckpt)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    bf16 = DDPMUNet2DModel.from_pretrained(ckpt["base"] / "root", torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    # saved again, it is one of ours: loads through the plain path to the same outputs
    model.save_pretrained(ckpt["base"] / "ours")
    assert json.loads((ckpt["base"] / "ours" / "config.json").read_text())["_class_name"] == "DDPMUNet2DModel"
    assert max_diff(run(DDPMUNet2DModel.from_pretrained(ckpt["base"] / "ours")), ckpt["ref"]) <= 1e-5


def test_from_pretrained_converts_a_unet2d_repo_id_offline(unet2d_checkpoints, monkeypatch):
    ckpt = unet2d_checkpoints
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # any request would raise OfflineModeIsEnabled
    assert_converted(DDPMUNet2DModel.from_pretrained("org/unet2d-root", cache_dir=ckpt["cache"]), ckpt)
    assert_converted(DDPMUNet2DModel.from_pretrained("org/unet2d-pipe", subfolder="unet", cache_dir=ckpt["cache"]),
                     ckpt)


def test_from_pretrained_refuses_what_it_cannot_convert(tmp_path):
    skip = UNet2DModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
                       up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"))
    skip.save_pretrained(tmp_path / "skip")
    with pytest.raises(ValueError, match=r"SkipDownBlock2D.*UNet2DModel\.from_pretrained"):
        DDPMUNet2DModel.from_pretrained(tmp_path / "skip")
    cond = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8)
    cond.save_pretrained(tmp_path / "cond")
    with pytest.raises(ValueError, match=r"UNet2DConditionModel.*UNet2DConditionModel\.from_pretrained"):
        DDPMUNet2DModel.from_pretrained(tmp_path / "cond")


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_weights_that_do_not_fit_the_config_are_refused_not_random(tmp_path, low_cpu_mem_usage):
    torch.manual_seed(0)
    DDPMUNet2DModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                    attention_resolutions=(4,)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "layers_per_block": 2}))
    with pytest.raises(ValueError, match=r"no tensors for .* parameters.*down_blocks\.0\.resnets\.1"):
        DDPMUNet2DModel.from_pretrained(tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)


# ---------------------------------------------------------------------- checkpoints from before the rename (item 6)


def to_legacy(state: dict) -> dict:
    """Our state dict under the names the attention layers had before (fused qkv, proj_out, norm)."""
    legacy = {}
    for key, value in state.items():
        for part in ("to_k", "to_v"):
            if f".{part}." in key:
                break
        else:
            if ".to_q." in key:
                stem, suffix = key.split(".to_q.")
                legacy[f"{stem}.qkv.{suffix}"] = torch.cat([state[f"{stem}.to_{p}.{suffix}"] for p in "qkv"])
            elif ".to_out.0." in key:
                legacy[key.replace(".to_out.0.", ".proj_out.")] = value
            elif ".group_norm." in key:
                legacy[key.replace(".group_norm.", ".norm.")] = value
            else:
                legacy[key] = value
    return legacy


def test_checkpoint_keys_from_before_the_rename_load_to_identical_outputs(tmp_path):
    ours = DDPMUNet2DModel.from_unet2d(random_unet2d())
    ref = run(ours)
    legacy = to_legacy(ours.state_dict())
    assert "mid_block.attention.qkv.weight" in legacy and "mid_block.attention.norm.weight" in legacy
    assert not any(".to_q." in k or "group_norm" in k for k in legacy)
    # 1. plain torch `load_state_dict` (accelerate's checkpoints, user code)
    fresh = DDPMUNet2DModel(**ours.config).eval()
    fresh.load_state_dict(legacy)
    assert torch.equal(run(fresh), ref)
    with torch.device("meta"):
        assigned = DDPMUNet2DModel(**ours.config).eval()
    assigned.load_state_dict(dict(legacy), assign=True)
    assert torch.equal(run(assigned), ref)
    assigned.save_pretrained(tmp_path / "assigned")  # the three row blocks of one qkv tensor save as three tensors
    # 2. `from_pretrained` of a single-file folder and of a sharded one whose fused qkv and its bias sit in other
    #    shards than the rest of the layer
    ours.save_pretrained(tmp_path / "single")
    save_file(legacy, tmp_path / "single" / "diffusion_pytorch_model.safetensors")
    sharded = tmp_path / "sharded"
    ours.save_pretrained(sharded)
    (sharded / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(legacy)
    shards = {f"diffusion_pytorch_model-0000{i + 1}-of-00003.safetensors": keys[i::3] for i in range(3)}
    for name, part in shards.items():
        save_file({k: legacy[k].contiguous() for k in part}, sharded / name)
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    for folder in ("single", "sharded"):
        for low_cpu_mem_usage in (True, False):
            loaded = DDPMUNet2DModel.from_pretrained(tmp_path / folder, low_cpu_mem_usage=low_cpu_mem_usage)
            assert max_diff(run(loaded), ref) <= 1e-6, (folder, low_cpu_mem_usage)
            # 3. saved again, the folder has diffusers' attention names
            resaved = tmp_path / f"resaved-{folder}-{low_cpu_mem_usage}"
            loaded.save_pretrained(resaved)
            keys = load_file(resaved / "diffusion_pytorch_model.safetensors").keys()
            assert "mid_block.attention.to_q.weight" in keys and not any(k.endswith("qkv.weight") for k in keys)


# ---------------------------------------------------------------------- attention tooling (item 6)


def attention_modules(model) -> list:
    """What `ModelMixin.set_attention_backend` iterates over (its own isinstance test)."""
    return [m for m in model.modules() if isinstance(m, (Attention, MochiAttention, AttentionModuleMixin))]


def test_set_attention_backend_reaches_every_attention_layer(monkeypatch):
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    theirs = random_unet2d()
    ours = DDPMUNet2DModel.from_unet2d(theirs)
    ref = run(theirs)
    assert len(attention_modules(ours)) == len(attention_modules(theirs)) == 4
    calls = []
    math_backend = _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_MATH]

    def counted(**kwargs):
        calls.append(kwargs["query"].shape)
        return math_backend(**kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName._NATIVE_MATH, counted)
    for backend in ("native", "_native_math"):
        ours.set_attention_backend(backend)
        assert all(m.processor._attention_backend == AttentionBackendName(backend) for m in attention_modules(ours))
        assert max_diff(run(ours), ref) <= 1e-5, backend
    assert len(calls) == 4  # the math backend really computed each of the 4 layers: (B, HW, heads, head_dim)
    assert calls[0] == (2, 64, 4, 16)


def test_attn_processors_and_fused_projections():
    theirs = random_unet2d()
    ours = DDPMUNet2DModel.from_unet2d(theirs)
    ref = run(theirs)
    procs = ours.attn_processors
    assert len(procs) == 4 and "mid_block.attention.processor" in procs
    assert all(isinstance(p, DDPMAttnProcessor) for p in procs.values())

    class Counting(DDPMAttnProcessor):
        calls = 0

        def __call__(self, attn, hidden_states):
            Counting.calls += 1
            return super().__call__(attn, hidden_states)

    ours.set_attn_processor(Counting())
    assert max_diff(run(ours), ref) <= 1e-5 and Counting.calls == 4
    ours.set_attn_processor({name: DDPMAttnProcessor() for name in procs})
    ours.fuse_qkv_projections()
    assert all(m.fused_projections for m in ours.modules() if isinstance(m, DDPMAttention))
    assert max_diff(run(ours), ref) <= 1e-5
    assert convert.state_dict_to_unet2d(ours.state_dict()).keys() == theirs.state_dict().keys()
    ours.unfuse_qkv_projections()
    assert max_diff(run(ours), ref) <= 1e-5


def test_diffusers_stock_attention_processors_give_the_default_processors_outputs():
    """diffusers' AttnProcessor, AttnProcessor2_0 and SlicedAttnProcessor run every DDPMAttention (they read
    spatial_norm, group_norm, norm_cross, heads, scale, to_out[1], residual_connection, rescale_output_factor, ...),
    with the outputs of DDPMAttnProcessor, on 2D models and on 1D / 3D ones (passed to processors as (B, C, 1, N))."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

    theirs = random_unet2d()
    ours = DDPMUNet2DModel.from_unet2d(theirs)
    ref = run(ours)
    for processor in (AttnProcessor(), AttnProcessor2_0(), SlicedAttnProcessor(slice_size=3)):
        ours.set_attn_processor(processor)
        assert all(p is processor for p in ours.attn_processors.values())
        assert max_diff(run(ours), ref) <= 1e-5, type(processor).__name__
        for module in theirs.modules():  # and UNet2DModel's output under the same processor
            if isinstance(module, Attention):
                module.set_processor(processor)
        assert max_diff(run(ours), run(theirs)) <= 1e-5, type(processor).__name__
    ours.fuse_qkv_projections()  # AttnProcessor reads to_q / to_k / to_v, which fusing keeps
    ours.set_attn_processor(AttnProcessor())
    assert max_diff(run(ours), ref) <= 1e-5
    for dims, size, resolutions in ((1, 16, (8,)), (3, (2, 8, 8), (4,))):
        torch.manual_seed(0)
        model = DDPMUNet2DModel(dims=dims, sample_size=size, in_channels=1, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, attention_resolutions=resolutions,
                                num_attention_heads=2).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        x = torch.randn(2, 1, *((size,) if isinstance(size, int) else size))
        with torch.no_grad():
            default = model(x, torch.tensor([3, 9])).sample
            for processor in (AttnProcessor(), AttnProcessor2_0(), SlicedAttnProcessor(slice_size=1)):
                model.set_attn_processor(processor)
                assert max_diff(model(x, torch.tensor([3, 9])).sample, default) <= 1e-5, (dims, processor)


def test_diffusers_processors_that_cannot_run_our_attention_are_refused_when_set():
    from diffusers.models.attention_processor import (
        AttnAddedKVProcessor,
        AttnProcessor,
        FusedAttnProcessor2_0,
        IPAdapterAttnProcessor2_0,
        XFormersAttnProcessor,
    )

    ours = DDPMUNet2DModel.from_unet2d(random_unet2d())
    ref = run(ours)
    names = list(ours.attn_processors)
    working = r"processors that work: DDPMAttnProcessor \(the default\), AttnProcessor, AttnProcessor2_0, " \
              r"SlicedAttnProcessor"
    for bad in (FusedAttnProcessor2_0(), AttnAddedKVProcessor(), XFormersAttnProcessor(),
                IPAdapterAttnProcessor2_0(hidden_size=32, cross_attention_dim=32)):
        with pytest.raises(ValueError, match=type(bad).__name__ + " cannot run DDPMAttention.*" + working):
            ours.set_attn_processor(bad)
        # a dict is checked as a whole before any layer changes
        mixed = {name: (bad if i == len(names) - 1 else AttnProcessor()) for i, name in enumerate(names)}
        with pytest.raises(ValueError, match=type(bad).__name__):
            ours.set_attn_processor(mixed)
        with pytest.raises(ValueError, match=type(bad).__name__):
            attention_modules(ours)[0].set_processor(bad)
        assert all(isinstance(p, DDPMAttnProcessor) for p in ours.attn_processors.values())
        assert max_diff(run(ours), ref) == 0  # the model still runs, unchanged

    class Mine:  # a processor of one's own stays accepted
        def __call__(self, attn, hidden_states):
            return DDPMAttnProcessor()(attn, hidden_states)

    ours.set_attn_processor(Mine())
    assert max_diff(run(ours), ref) == 0


# ---------------------------------------------------------------------- LoRA with peft (item 6)


def test_lora_targets_match_unet2d_and_train_one_step():
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    theirs = random_unet2d()
    ours = DDPMUNet2DModel.from_unet2d(theirs)
    ref = run(ours)
    config = dict(r=4, lora_alpha=4, target_modules=LORA_TARGETS)
    ours.add_adapter(LoraConfig(**config))
    inject_adapter_in_model(LoraConfig(**config), theirs)  # UNet2DModel has no add_adapter; peft directly
    wrapped = {n for n, m in ours.named_modules() if isinstance(m, BaseTunerLayer)}
    wrapped_theirs = {n for n, m in theirs.named_modules() if isinstance(m, BaseTunerLayer)}
    assert len(wrapped) == 4 * 4  # 4 projections in each of the 4 attention layers
    assert {k.removesuffix(".weight") for k in convert.state_dict_to_unet2d({f"{n}.weight": 0 for n in wrapped})} \
        == wrapped_theirs
    assert max_diff(run(ours), ref) == 0  # LoRA B starts at zero: the adapted model is the base model

    lora = [p for n, p in ours.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * 16 and all(p.requires_grad for p in lora)
    ours.train()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    x, t, kw = inputs()
    loss = torch.nn.functional.mse_loss(ours(x, t, **kw).sample, torch.randn_like(x))
    loss.backward()
    with_grad = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert {n for n in with_grad if "lora_B" in n} == {n for n, _ in ours.named_parameters() if "lora_B" in n}
    opt.step()
    assert max_diff(run(ours.eval()), ref) > 1e-4  # the step moved the output
    ours.disable_adapters()
    assert max_diff(run(ours), ref) <= 1e-6  # base weights untouched


# ---------------------------------------------------------------------- module layout (issue 13)


def test_signature_literals_are_the_checked_values():
    hints = get_type_hints(DDPMUNet2DModel.__init__, vars(unet))
    assert get_args(hints["act_fn"]) == get_args(unet.ActivationName) == tuple(unet._ACTIVATIONS)
    assert set(unet._ACTIVATIONS) == set(unet._INPLACE_ACTIVATIONS)
    assert get_args(hints["resnet_time_scale_shift"]) == unet._TIME_SCALE_SHIFT == ("default", "scale_shift")
    assert get_args(hints["upsample_type"]) == unet._UPSAMPLE_TYPES
    assert get_args(hints["downsample_type"]) == unet._DOWNSAMPLE_TYPES
    assert get_args(hints["dims"]) == unet._DIMS == (1, 2, 3)
    with pytest.raises(ValueError, match=r"`upsample_type`='bilinear'.*\['conv', 'nearest', 'conv_transpose'\]"):
        DDPMUNet2DModel(upsample_type="bilinear")


def test_names_that_moved_out_of_unet_still_import_from_it():
    from diffusers_ddpm_ext.unet import UNET_PRESETS, ours_config_to_unet2d, unet2d_config_to_ours

    assert UNET_PRESETS is presets.UNET_PRESETS is diffusers_ddpm_ext.UNET_PRESETS
    assert unet2d_config_to_ours is convert.unet2d_config_to_ours
    assert ours_config_to_unet2d is convert.ours_config_to_unet2d
    assert DDPMUNet2DModel.list_presets() == presets.list_presets()
    with pytest.raises(AttributeError, match="no_such_name"):
        unet.no_such_name  # noqa: B018
    with pytest.raises(ValueError, match=r"'nope'.*ddpm-cifar10"):
        presets.preset_config("nope")


HUB_COPY = textwrap.dedent(
    """
    import importlib.abc, importlib.util, json, sys
    class Block(importlib.abc.MetaPathFinder):  # our package is not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "diffusers_ddpm_ext":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Block())
    import torch
    from diffusers.utils.dynamic_modules_utils import check_imports
    path, saved, unet2d_folder = sys.argv[1:4]
    check_imports(path)  # what diffusers runs on remote code before importing it
    spec = importlib.util.spec_from_file_location("ddpm_ext_unet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = module.DDPMUNet2DModel
    model = cls.from_pretrained(saved)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, 5).sample
    errors = {}
    calls = {
        "list_presets": lambda: cls.list_presets(),
        "from_preset": lambda: cls.from_preset("digits-small"),
        "from_unet2d": lambda: cls.from_unet2d(None),
        "to_unet2d": lambda: model.to_unet2d(),
        "from_pretrained_unet2d": lambda: cls.from_pretrained(unet2d_folder),
        "UNET_PRESETS": lambda: module.UNET_PRESETS,
    }
    for name, call in calls.items():
        try:
            call()
            errors[name] = None
        except ImportError as error:
            errors[name] = str(error)
    print(json.dumps({"out": out.flatten().tolist(), "errors": errors}))
    """
)


def test_hub_copy_of_unet_py_loads_and_samples_without_the_package(tmp_path):
    torch.manual_seed(0)
    model = DDPMUNet2DModel(sample_size=8, in_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                            norm_num_groups=4, attention_resolutions=(4,)).eval()
    model.save_pretrained(tmp_path / "ours")
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D")).save_pretrained(tmp_path / "unet2d")
    copy = tmp_path / "ddpm_ext_unet.py"
    shutil.copy(PKG / "unet.py", copy)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    res = subprocess.run([sys.executable, "-c", HUB_COPY, str(copy), str(tmp_path / "ours"), str(tmp_path / "unet2d")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert max_diff(torch.tensor(result["out"]), model(x, 5).sample.flatten()) <= 1e-6
    for name, message in result["errors"].items():
        assert message is not None and "pip install diffusers-ddpm-ext" in message, name


def test_readme_attention_tooling_snippet_runs(monkeypatch):
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    text = (PKG.parent / "README.md").read_text()
    start = text.index("## Attention tooling, LoRA and layerwise casting")
    (block,) = re.findall(r"```python\n(.*?)```", text[start:text.index("\n## ", start + 3)], flags=re.S)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert len(namespace["lora_params"]) == 2 * 4 * 4  # A and B for 4 projections in each of the 4 attention layers
    assert namespace["small"].conv_in.weight.dtype == torch.float8_e4m3fn
    assert namespace["out"].dtype == torch.float32 and torch.isfinite(namespace["out"]).all()
