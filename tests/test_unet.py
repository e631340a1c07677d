"""Tests for `DDPMUNet2DModel`: presets, save/load, pipelines, checkpointing, validation."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from diffusers.models.embeddings import get_timestep_embedding

from diffusers_ddpm_ext.presets import UNET_PRESETS
from diffusers_ddpm_ext.unet import DDPMUNet2DModel, DDPMUNet2DOutput, sinusoidal_timestep_embedding

# Parameter counts of every preset (the README table). ddpm-cifar10 must be the paper's 35.7M (+-0.1M);
# diffusers-tutorial must equal seed 004's printed UNet2DModel count.
PRESET_PARAMS = {
    "ddpm-cifar10": 35_746_307,
    "idm-cifar10": 52_546_438,
    "simple-unet": 14_716_291,
    "labml-ddpm": 19_224_451,
    "smalldiffusion-cifar10": 35_746_307,
    "smalldiffusion-fashionmnist": 4_407_553,
    "diffusers-tutorial": 1_707_009,
    "digits-small": 925_985,
    "rgb-small": 1_114_822,
}



def tiny(**overrides) -> DDPMUNet2DModel:
    cfg = dict(sample_size=8, in_channels=3, block_out_channels=(16, 32), layers_per_block=1,
               attention_resolutions=(8, 4), norm_num_groups=8, attention_head_dim=8)
    cfg.update(overrides)
    torch.manual_seed(0)
    return DDPMUNet2DModel(**cfg)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_preset_list_and_counts():
    assert DDPMUNet2DModel.list_presets() == list(PRESET_PARAMS)
    for name, entry in UNET_PRESETS.items():
        assert entry["source"]
        with torch.device("meta"):
            model = DDPMUNet2DModel.from_preset(name)
        assert n_params(model) == PRESET_PARAMS[name], name
    assert abs(PRESET_PARAMS["ddpm-cifar10"] - 35.7e6) <= 0.1e6
    with pytest.raises(ValueError, match="ddpm-cifar10"):
        DDPMUNet2DModel.from_preset("ddpm-cifar11")
    over = DDPMUNet2DModel.from_preset("digits-small", num_class_embeds=10, dropout=0.1)
    assert over.config.num_class_embeds == 10 and over.config.dropout == 0.1


@pytest.mark.parametrize("name", list(PRESET_PARAMS))
def test_preset_forward_save_load(name, tmp_path):
    torch.manual_seed(0)
    model = DDPMUNet2DModel.from_preset(name).eval()
    cfg = model.config
    h, w = (cfg.sample_size, cfg.sample_size) if isinstance(cfg.sample_size, int) else cfg.sample_size
    x = torch.randn(1, cfg.in_channels, h, w)
    with torch.no_grad():
        out = model(x, 10).sample
    assert out.shape == (1, cfg.out_channels, h, w)
    assert torch.isfinite(out).all()
    if cfg.zero_init_residual:  # IDM zero_module: the untrained network outputs exactly zero
        assert torch.count_nonzero(out) == 0
    else:
        assert out.abs().max() > 0

    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = DDPMUNet2DModel.from_pretrained(tmp_path)
    assert not loaded.training
    for key, value in ((k, v) for k, v in model.config.items() if not k.startswith("_")):  # tuples -> lists
        assert loaded.config[key] == (list(value) if isinstance(value, tuple) else value), key
    saved = model.state_dict()
    assert loaded.state_dict().keys() == saved.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, saved[key]), key
    if n_params(model) > 5e6:
        return  # big presets: equal tensors are the round trip; the forwards below run on the small ones
    with torch.no_grad():
        # Same weights; outputs equal up to float summation order (loaded tensors may sit at other alignments).
        torch.testing.assert_close(loaded(x, 10).sample, out, rtol=0, atol=1e-5)
    bf16 = DDPMUNet2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    with torch.no_grad():
        y = bf16(x.bfloat16(), 10).sample
    assert y.dtype == torch.bfloat16
    assert (y.float() - out).abs().max() < 0.05 * out.abs().max() + 1e-3


def test_sinusoids_match_diffusers_exactly():
    t = torch.tensor([0, 1, 17, 999, 500])
    for dim in (32, 33, 64):
        for flip, shift in ((True, 0), (False, 1), (True, 1)):
            ours = sinusoidal_timestep_embedding(t, dim, flip, shift)
            ref = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
            assert torch.equal(ours, ref)


def test_timestep_forms_agree():
    model = tiny().eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = model(x, torch.tensor([7, 7, 7])).sample
        for t in (7, 7.0, torch.tensor(7), torch.tensor([7]), torch.tensor(7.0)):
            assert torch.equal(model(x, t).sample, ref), t
        per_sample = model(x, torch.tensor([1, 7, 900])).sample
        assert torch.equal(per_sample[1], ref[1]) and not torch.allclose(per_sample[0], ref[0])
        # fractional timesteps are not rounded
        assert not torch.equal(model(x, 7.5).sample, ref)
        tup = model(x, 7, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], ref)
    assert isinstance(model(x, 7), DDPMUNet2DOutput)


def test_class_conditioning_and_null_class():
    model = tiny(num_class_embeds=4).eval()
    assert model.null_class_label == 4
    assert model.class_embedding.weight.shape[0] == 5
    assert tiny().null_class_label is None
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        uncond = model(x, 3).sample
        assert torch.equal(uncond, model(x, 3, class_labels=torch.tensor([4, 4])).sample)
        a = model(x, 3, class_labels=torch.tensor([0, 1])).sample
        assert not torch.allclose(a, uncond)
        assert torch.equal(model(x, 3, class_labels=2).sample, model(x, 3, class_labels=torch.tensor([2, 2])).sample)
    with pytest.raises(ValueError, match=r"\[0, 4\].*\[0, 5\]"):
        model(x, 3, class_labels=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="-1"):
        model(x, 3, class_labels=torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="integers"):
        model(x, 3, class_labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        model(x, 3, class_labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="unconditional"):
        tiny()(x, 3, class_labels=torch.tensor([0, 1]))


def test_resampling_options_and_learned_variance():
    assert tiny().config.out_channels == 3 and tiny(in_channels=1).config.out_channels == 1
    x = torch.randn(2, 3, 8, 8)
    for down in ("conv", "avg_pool"):
        for up in ("conv", "nearest", "conv_transpose"):
            for pad in (0, 1):
                m = tiny(downsample_type=down, upsample_type=up, downsample_padding=pad, out_channels=6,
                         resnet_time_scale_shift="scale_shift", attention_head_dim=None, num_attention_heads=2,
                         time_embedding_act_fn="gelu")
                assert m(x, 5).sample.shape == (2, 6, 8, 8)
    assert not any("downsample" in k for k in tiny(downsample_type="avg_pool").state_dict())
    assert not any("upsample" in k for k in tiny(upsample_type="nearest").state_dict())
    heads = tiny(attention_head_dim=None, num_attention_heads=2)
    assert heads.down_blocks[0].attentions[0].heads == 2 and heads.mid_block.attention.heads == 2
    assert tiny().down_blocks[1].attentions[0].heads == 4  # head dim 8 at 32 channels
    single = tiny(attention_head_dim=None)
    assert single.mid_block.attention.heads == 1


def test_zero_init_residual():
    m = tiny(zero_init_residual=True)
    for name, p in m.named_parameters():
        if name.endswith(("conv2.weight", "to_out.0.weight")) or name.startswith("conv_out"):
            assert torch.count_nonzero(p) == 0, name
    assert torch.count_nonzero(m.conv_in.weight) > 0
    assert torch.count_nonzero(m.down_blocks[0].resnets[0].conv1.weight) > 0
    with torch.no_grad():
        assert torch.count_nonzero(m(torch.randn(1, 3, 8, 8), 3).sample) == 0


def test_gradient_checkpointing_same_gradients():
    m = tiny(num_class_embeds=3, layers_per_block=2)
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([3, 600])
    labels = torch.tensor([0, 3])

    def grads():
        m.zero_grad()
        m(x, t, class_labels=labels).sample.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    plain = grads()
    m.enable_gradient_checkpointing()
    blocks = [mod for mod in m.modules() if hasattr(mod, "gradient_checkpointing")]
    assert blocks and all(b.gradient_checkpointing for b in blocks)
    ckpt = grads()
    m.disable_gradient_checkpointing()
    assert not any(b.gradient_checkpointing for b in blocks)
    for name in plain:
        assert (plain[name] - ckpt[name]).abs().max() <= 1e-6, name


def test_no_split_modules_name_real_classes():
    names = {type(mod).__name__ for mod in tiny().modules()}
    assert set(DDPMUNet2DModel._no_split_modules) <= names


def test_ddpm_pipeline_output_types():
    unet = tiny(sample_size=8, attention_resolutions=(4,)).eval()
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50))
    pipe.set_progress_bar_config(disable=True)
    pil = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 2 and pil[0].size == (8, 8)
    arr = pipe(batch_size=2, num_inference_steps=3, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert arr.shape == (2, 8, 8, 3) and 0 <= arr.min() and arr.max() <= 1
    pt = pipe(batch_size=2, num_inference_steps=3, output_type="pt",
              generator=torch.Generator().manual_seed(0)).images
    assert tuple(pt.shape) == (2, 3, 8, 8)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), arr, atol=1e-6)
    # a class-conditional model samples unconditionally (null class) in the plain pipeline
    cond = DDPMPipeline(unet=tiny(num_class_embeds=3).eval(), scheduler=DDPMScheduler(num_train_timesteps=50))
    cond.set_progress_bar_config(disable=True)
    assert cond(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 3)


def test_pipeline_loads_in_fresh_process(tmp_path):
    unet = tiny(sample_size=8, in_channels=1, attention_resolutions=(4,)).eval()
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=40))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(batch_size=2, num_inference_steps=4, output_type="np",
                    generator=torch.Generator().manual_seed(123)).images
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers_ddpm_ext.unet", "DDPMUNet2DModel"]
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    script = textwrap.dedent(f"""
        import sys, numpy as np, torch
        import diffusers_ddpm_ext.unet
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'pipe')!r})
        assert type(pipe.unet).__name__ == "DDPMUNet2DModel", type(pipe.unet)
        assert type(pipe.unet).__module__ == "diffusers_ddpm_ext.unet"
        pipe.set_progress_bar_config(disable=True)
        out = pipe(batch_size=2, num_inference_steps=4, output_type="np",
                   generator=torch.Generator().manual_seed(123)).images
        np.save({str(tmp_path / 'out.npy')!r}, out)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=0, atol=1e-5)


BAD_CONFIGS = [
    (dict(act_fn="tanh"), r"act_fn.*'tanh'.*silu"),
    (dict(time_embedding_act_fn="elu"), r"time_embedding_act_fn.*'elu'.*relu"),
    (dict(resnet_time_scale_shift="film"), r"resnet_time_scale_shift.*'film'.*scale_shift"),
    (dict(downsample_type="pad_conv"), r"downsample_type.*'pad_conv'.*avg_pool"),
    (dict(upsample_type="bilinear"), r"upsample_type.*'bilinear'.*conv_transpose"),
    (dict(downsample_padding=2), r"downsample_padding.*2.*\[0, 1\]"),
    (dict(block_out_channels=(16, 36)), r"\[36\].*norm_num_groups.*8"),
    (dict(attention_resolutions=(16,)), r"\[16\].*resolutions are \[8, 4\]"),
    (dict(attention_head_dim=12), r"attention_head_dim.*12.*16"),
    (dict(attention_head_dim=8, num_attention_heads=2), r"either.*attention_head_dim.*num_attention_heads"),
    (dict(attention_head_dim=None, num_attention_heads=3), r"num_attention_heads.*3"),
    (dict(sample_size=7, attention_resolutions=()), r"sample_size.*7.*2"),
    (dict(sample_size=(8, 8, 8)), r"sample_size"),
    (dict(dropout=1.5), r"dropout.*1.5"),
    (dict(num_class_embeds=0), r"num_class_embeds.*0"),
    (dict(block_out_channels=()), r"block_out_channels"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS)
def test_bad_configs_fail_clearly(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_bad_inputs_fail_clearly():
    m = tiny()
    with pytest.raises(ValueError, match="4 channels.*in_channels=3"):
        m(torch.randn(1, 4, 8, 8), 1)
    with pytest.raises(ValueError, match=r"7x8.*2"):
        m(torch.randn(1, 3, 7, 8), 1)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        m(torch.randn(2, 3, 8, 8), torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="timestep"):
        m(torch.randn(2, 3, 8, 8), "5")
    # other sizes divisible by 2**(levels-1) run (attention is placed by level, not by size)
    assert m(torch.randn(1, 3, 12, 16), 1).sample.shape == (1, 3, 12, 16)
