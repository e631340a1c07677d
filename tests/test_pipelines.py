"""Pipelines: our UNet + scheduler in DDPMPipeline / DDIMPipeline, the class-conditional CFG pipeline, save/load."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DiffusionPipeline
from PIL import Image

from diffusers_ddpm_ext.pipelines import ClassConditionalDDPMPipeline, guided_model_output
from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler
from diffusers_ddpm_ext.unet import DDPMUNet2DModel

STEPS = 10
NUM_CLASSES = 3



def tiny_unet(num_class_embeds=NUM_CLASSES, learned_variance=False, seed=0, dims=2):
    torch.manual_seed(seed)
    return DDPMUNet2DModel(
        sample_size=8, in_channels=1, out_channels=2 if learned_variance else 1, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, attention_resolutions=(), num_class_embeds=num_class_embeds, dims=dims,
    ).eval()


def tiny_scheduler(learned_variance=False):
    return GaussianDiffusionScheduler(
        num_train_timesteps=STEPS, variance_type="learned_range" if learned_variance else "fixed_small"
    )


def cc_pipe(learned_variance=False):
    pipe = ClassConditionalDDPMPipeline(unet=tiny_unet(learned_variance=learned_variance),
                                        scheduler=tiny_scheduler(learned_variance))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def manual_loop(pipe, labels, guidance_scale, seed=0):
    """Reference sampler: two separate forwards (cond, null) per step combined by the CFG formula."""
    unet, scheduler = pipe.unet, pipe.scheduler
    g = gen(seed)
    b = len(labels)
    x = torch.randn((b, 1, 8, 8), generator=g)
    lab = torch.tensor(labels)
    scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        for t in scheduler.timesteps:
            uncond = unet(x, t, class_labels=None).sample  # null class
            cond = unet(x, t, class_labels=lab).sample
            mean_part = uncond[:, :1] + guidance_scale * (cond[:, :1] - uncond[:, :1])
            out = torch.cat([mean_part, cond[:, 1:]], dim=1)  # variance half (if any) from cond
            x = scheduler.step(out, t, x, generator=g).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


def test_guidance_zero_is_unconditional_null_class():
    pipe = cc_pipe()
    labels = [0, 1, 2]
    ours = pipe(class_labels=labels, guidance_scale=0.0, num_inference_steps=STEPS, generator=gen(),
                output_type="pt").images
    # Same model queried with class_labels=None (the null class) in a plain sampling loop.
    unet, scheduler = pipe.unet, pipe.scheduler
    g = gen()
    x = torch.randn((3, 1, 8, 8), generator=g)
    scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, generator=g).prev_sample
    torch.testing.assert_close(ours, (x / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-6)
    # ... and the explicit null label without guidance, and plain DDPMPipeline (which never passes labels).
    explicit = pipe(class_labels=[NUM_CLASSES] * 3, guidance_scale=1.0, num_inference_steps=STEPS,
                    generator=gen(), output_type="pt").images
    torch.testing.assert_close(ours, explicit, rtol=0, atol=1e-6)
    ddpm = DDPMPipeline(unet=unet, scheduler=scheduler)
    ddpm.set_progress_bar_config(disable=True)
    plain = ddpm(batch_size=3, num_inference_steps=STEPS, generator=gen(), output_type="np").images
    np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy(), plain, atol=1e-6)


@pytest.mark.parametrize("learned_variance", [False, True])
@pytest.mark.parametrize("w", [0.5, 3.0])
def test_cfg_follows_formula(learned_variance, w):
    pipe = cc_pipe(learned_variance)
    labels = [2, 0, 1]
    ours = pipe(class_labels=labels, guidance_scale=w, num_inference_steps=STEPS, generator=gen(1),
                output_type="pt").images
    ref = manual_loop(pipe, labels, w, seed=1)
    # one batched (2B) forward vs two B forwards: equal up to float reassociation
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    # guidance actually changes the result (the formula is not a no-op)
    cond = pipe(class_labels=labels, guidance_scale=1.0, num_inference_steps=STEPS, generator=gen(1),
                output_type="pt").images
    assert (ours - cond).abs().max() > 1e-3


def test_guided_model_output_closed_form():
    torch.manual_seed(0)
    cond, uncond = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(guided_model_output(cond, uncond, 0.0, 4), uncond)
    torch.testing.assert_close(guided_model_output(cond, uncond, 1.0, 4), cond)
    # learned variance: C = 2 of 4 channels guided, the variance half is cond's
    out = guided_model_output(cond, uncond, 2.0, 2)
    torch.testing.assert_close(out[:, :2], 2 * cond[:, :2] - uncond[:, :2])
    torch.testing.assert_close(out[:, 2:], cond[:, 2:])


def test_output_types_and_batch_size():
    pipe = cc_pipe()
    kw = dict(class_labels=[0, 2], guidance_scale=2.0, num_inference_steps=STEPS)
    pt = pipe(**kw, generator=gen(), output_type="pt").images
    np_ = pipe(**kw, generator=gen(), output_type="np").images
    pil = pipe(**kw, generator=gen(), output_type="pil").images
    assert pt.shape == (2, 1, 8, 8) and np_.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), np_, atol=1e-7)
    assert len(pil) == 2 and isinstance(pil[0], Image.Image) and pil[0].size == (8, 8)
    np.testing.assert_array_equal(np.asarray(pil[0]), (np_[0, :, :, 0] * 255).round().astype("uint8"))
    tup = pipe(**kw, generator=gen(), output_type="np", return_dict=False)
    np.testing.assert_array_equal(tup[0], np_)
    unc = pipe(batch_size=4, guidance_scale=0.0, num_inference_steps=2, generator=gen(), output_type="pt").images
    assert unc.shape == (4, 1, 8, 8)


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(class_labels=[0, 4]), ValueError),  # 4 > null index 3
        (dict(class_labels=[-1]), ValueError),
        (dict(class_labels=torch.tensor([0.5])), TypeError),
        (dict(class_labels="cat"), TypeError),
        (dict(class_labels=[0], output_type="jpg"), ValueError),
        (dict(class_labels=[0], guidance_scale=-1.0), ValueError),
        (dict(class_labels=[0, 1], batch_size=3), ValueError),
        (dict(class_labels=[0], num_inference_steps=0), ValueError),
    ],
)
def test_bad_inputs(kwargs, err):
    pipe = cc_pipe()
    with pytest.raises(err):
        pipe(num_inference_steps=kwargs.pop("num_inference_steps", 2), **kwargs)


def test_unconditional_unet_is_rejected():
    pipe = ClassConditionalDDPMPipeline(unet=tiny_unet(num_class_embeds=None), scheduler=tiny_scheduler())
    with pytest.raises(ValueError, match="num_class_embeds"):
        pipe(class_labels=[0], num_inference_steps=2)


def test_1d_and_3d_unets_are_rejected_before_sampling():
    for dims in (1, 3):
        pipe = ClassConditionalDDPMPipeline(unet=tiny_unet(dims=dims), scheduler=tiny_scheduler())
        with pytest.raises(ValueError, match=rf"`dims`={dims} \(allowed: \[2\]\)"):
            pipe(class_labels=[0], num_inference_steps=2)


def test_ddim_pipeline_with_our_unet():
    unet = tiny_unet(num_class_embeds=None)
    # DDIMPipeline converts any scheduler to DDIMScheduler via from_config: our config keys must carry over.
    pipe = DDIMPipeline(unet=unet, scheduler=tiny_scheduler())
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.num_train_timesteps == STEPS
    a = pipe(batch_size=2, num_inference_steps=5, eta=0.0, generator=gen(), output_type="np").images
    b = pipe(batch_size=2, num_inference_steps=5, eta=0.0, generator=gen(), output_type="np").images
    assert a.shape == (2, 8, 8, 1) and np.isfinite(a).all() and (a >= 0).all() and (a <= 1).all()
    np.testing.assert_array_equal(a, b)
    # eta=1 injects fresh noise at every step (DDPM-like): it must differ from the deterministic eta=0 path
    c = pipe(batch_size=2, num_inference_steps=5, eta=1.0, generator=gen(), output_type="np").images
    assert np.abs(a - c).max() > 1e-4


def _files(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


def test_save_pretrained_safetensors_only_and_variant(tmp_path):
    pipe = DDPMPipeline(unet=tiny_unet(num_class_embeds=None), scheduler=tiny_scheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "p")
    assert _files(tmp_path / "p") == [
        "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers_ddpm_ext.unet", "DDPMUNet2DModel"]
    assert index["scheduler"] == ["diffusers_ddpm_ext.scheduler", "GaussianDiffusionScheduler"]
    pipe.save_pretrained(tmp_path / "v", variant="fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in _files(tmp_path / "v")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "v", variant="fp16")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.unet) is DDPMUNet2DModel and not loaded.unet.training
    a = pipe(batch_size=2, num_inference_steps=STEPS, generator=gen(), output_type="np").images
    b = loaded(batch_size=2, num_inference_steps=STEPS, generator=gen(), output_type="np").images
    np.testing.assert_array_equal(a, b)


@pytest.mark.filterwarnings("ignore:`torch_dtype` is deprecated:FutureWarning")
def test_torch_dtype_bfloat16_load(tmp_path):
    pipe = cc_pipe()
    pipe.save_pretrained(tmp_path)
    loaded = ClassConditionalDDPMPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.unet.dtype == torch.bfloat16
    out = loaded(class_labels=[0, 1], guidance_scale=2.0, num_inference_steps=STEPS, generator=gen(),
                 output_type="np").images
    ref = pipe(class_labels=[0, 1], guidance_scale=2.0, num_inference_steps=STEPS, generator=gen(),
               output_type="np").images
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert np.abs(out - ref).mean() < 0.1  # same model at lower precision


FRESH_LOAD = textwrap.dedent(
    """
    import json, sys, numpy as np, torch
    torch.set_num_threads(1)
    # explicit imports register our classes (until the package __init__ imports them itself)
    import diffusers_ddpm_ext.unet, diffusers_ddpm_ext.scheduler, diffusers_ddpm_ext.pipelines
    from diffusers import DiffusionPipeline
    from diffusers_ddpm_ext.pipelines import ClassConditionalDDPMPipeline
    d = sys.argv[1]
    p = DiffusionPipeline.from_pretrained(d + "/ddpm")
    c = ClassConditionalDDPMPipeline.from_pretrained(d + "/cc")
    for q in (p, c):
        q.set_progress_bar_config(disable=True)
    a = p(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(0), output_type="np").images
    b = c(class_labels=[0, 2], guidance_scale=2.0, num_inference_steps=10,
          generator=torch.Generator().manual_seed(0), output_type="np").images
    np.savez(d + "/fresh.npz", a=a, b=b)
    print(json.dumps({"pipe": type(p).__name__, "unet": type(p.unet).__module__ + "." + type(p.unet).__name__,
                      "scheduler": type(p.scheduler).__module__ + "." + type(p.scheduler).__name__,
                      "cc": type(c).__module__, "cc_unet": type(c.unet).__module__}))
    """
)


def test_fresh_process_from_pretrained_gives_our_classes(tmp_path):
    ddpm = DDPMPipeline(unet=tiny_unet(num_class_embeds=None), scheduler=tiny_scheduler())
    cc = cc_pipe()
    ddpm.set_progress_bar_config(disable=True)
    ddpm.save_pretrained(tmp_path / "ddpm")
    cc.save_pretrained(tmp_path / "cc")
    a = ddpm(batch_size=2, num_inference_steps=STEPS, generator=gen(), output_type="np").images
    b = cc(class_labels=[0, 2], guidance_scale=2.0, num_inference_steps=STEPS, generator=gen(),
           output_type="np").images
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    res = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info == {
        "pipe": "DDPMPipeline",
        "unet": "diffusers_ddpm_ext.unet.DDPMUNet2DModel",
        "scheduler": "diffusers_ddpm_ext.scheduler.GaussianDiffusionScheduler",
        "cc": "diffusers_ddpm_ext.pipelines",
        "cc_unet": "diffusers_ddpm_ext.unet",
    }
    fresh = np.load(tmp_path / "fresh.npz")
    np.testing.assert_allclose(fresh["a"], a, atol=1e-6)
    np.testing.assert_allclose(fresh["b"], b, atol=1e-6)


def test_class_conditional_pipeline_with_ddim_scheduler_matches_ddim_pipeline():
    unet = tiny_unet()
    ddim = DDIMScheduler.from_config(tiny_scheduler().config)
    cc = ClassConditionalDDPMPipeline(unet=unet, scheduler=ddim)
    plain = DDIMPipeline(unet=unet, scheduler=ddim)
    for p in (cc, plain):
        p.set_progress_bar_config(disable=True)
    # guidance 0 = null class = what DDIMPipeline gets from a class-conditional UNet called without labels
    a = cc(class_labels=[0, 1], guidance_scale=0.0, num_inference_steps=5, generator=gen(), output_type="np").images
    b = plain(batch_size=2, num_inference_steps=5, eta=0.0, generator=gen(), output_type="np").images
    np.testing.assert_allclose(a, b, atol=1e-6)
    guided = cc(class_labels=[0, 1], guidance_scale=4.0, num_inference_steps=5, generator=gen(),
                output_type="np").images
    assert np.isfinite(guided).all() and np.abs(guided - a).max() > 1e-3
