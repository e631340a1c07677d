"""Fast paths of `DDPMUNet2DModel` give the reference path's numbers: in-place inference ops, channels_last memory,
attention (separate or fused QKV) against UNet2DModel's, bf16 autocast within a stated tolerance, and
`torch.compile(fullgraph=True)` without graph breaks. No timing here (see benchmarks/bench_unet.py)."""

import pytest
import torch
from diffusers import UNet2DModel

from diffusers_ddpm_ext.unet import DDPMUNet2DModel

# bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per op); through a few dozen layers the output's
# relative L2 error stays around 1e-2. Bound it at 3e-2.
BF16_REL_TOL = 3e-2

TINY = dict(sample_size=8, in_channels=3, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
            attention_resolutions=(4,), attention_head_dim=8)
CONFIGS = {
    "additive": TINY,
    "scale-shift-mid-scale": dict(TINY, resnet_time_scale_shift="scale_shift", mid_block_scale_factor=1.4142,
                                  out_channels=6, num_attention_heads=2, attention_head_dim=None),
    "gelu-relu-class": dict(TINY, act_fn="gelu", time_embedding_act_fn="relu", num_class_embeds=5,
                            upsample_type="conv_transpose", downsample_type="avg_pool"),
}



def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb every tensor (norm affines, biases, zero-initialised layers too), so every path carries signal."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, hw = model.config.in_channels, model.config.sample_size
    x = torch.randn(batch, c, hw, hw, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


@pytest.mark.parametrize("name", list(CONFIGS))
def test_inplace_inference_equals_autograd_path(name):
    torch.manual_seed(0)
    model = randomised(DDPMUNet2DModel(**CONFIGS[name])).eval()
    x, t = inputs(model)
    x_before = x.clone()
    with torch.no_grad():
        fast = model(x, t).sample  # in-place activations / adds
        again = model(x, t).sample
    ref = model(x, t).sample.detach()  # autograd on: out-of-place path
    assert torch.equal(x, x_before), "the inference path wrote into its input"
    assert (fast - ref).abs().max().item() <= 1e-6
    assert torch.equal(fast, again)
    with torch.inference_mode():
        assert (model(x, t).sample - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name", ["additive", "scale-shift-mid-scale"])
def test_channels_last_matches_contiguous(name):
    torch.manual_seed(0)
    model = randomised(DDPMUNet2DModel(**CONFIGS[name])).train()
    fast = DDPMUNet2DModel(**CONFIGS[name]).train()
    fast.load_state_dict(model.state_dict())
    fast.to(memory_format=torch.channels_last)
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x, t = inputs(model)
    out = model(x, t).sample
    out_cl = fast(x.contiguous(memory_format=torch.channels_last), t).sample
    assert (out - out_cl).abs().max().item() <= 1e-5
    out.square().mean().backward()
    out_cl.square().mean().backward()
    for (name_, p), q in zip(model.named_parameters(), fast.parameters()):
        scale = p.grad.abs().max().item() + 1e-12
        assert (p.grad - q.grad).abs().max().item() <= 1e-5 * max(1.0, scale), name_
    with torch.no_grad():
        model.eval(), fast.eval()
        assert (model(x, t).sample - fast(x.contiguous(memory_format=torch.channels_last), t).sample).abs().max() <= 1e-5


def test_attention_matches_unet2d_separate_and_fused_projections():
    """Our attention against UNet2DModel's, forward and gradients: with separate to_q/to_k/to_v (the default, the
    names LoRA targets) and after diffusers' `fuse_qkv_projections()` (one QKV GEMM)."""
    cfg = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
               down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D",) * 2,
               norm_num_groups=4, attention_head_dim=8)
    torch.manual_seed(0)
    theirs = randomised(UNet2DModel(**cfg)).train()
    x, t = inputs(theirs)
    b = theirs(x, t).sample
    b.square().mean().backward()
    layer_theirs = theirs.down_blocks[1].attentions[0]
    q_theirs = torch.cat([getattr(layer_theirs, f"to_{p}").weight.grad for p in "qkv"])
    for fused in (False, True):
        ours = DDPMUNet2DModel.from_unet2d(theirs)
        if fused:
            ours.fuse_qkv_projections()
        layer = ours.down_blocks[1].attentions[0]
        assert layer.fused_projections is fused and layer.heads == 4
        a = ours(x, t).sample
        assert (a - b).abs().max().item() <= 1e-5
        a.square().mean().backward()
        q = layer.to_qkv.weight.grad if fused else torch.cat([getattr(layer, f"to_{p}").weight.grad for p in "qkv"])
        assert (q - q_theirs).abs().max().item() <= 1e-5 * max(1.0, q_theirs.abs().max().item())
        with torch.no_grad():
            assert (ours.eval()(x, t).sample - theirs.eval()(x, t).sample).abs().max().item() <= 1e-5
        theirs.train()


def test_bf16_autocast_within_tolerance():
    torch.manual_seed(0)
    model = DDPMUNet2DModel(**CONFIGS["scale-shift-mid-scale"]).eval()
    x, t = inputs(model, batch=4)
    with torch.no_grad():
        ref = model(x, t).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t).sample
    assert low.dtype == torch.bfloat16
    rel = ((low.float() - ref).norm() / ref.norm()).item()
    assert 0 < rel <= BF16_REL_TOL, rel  # > 0: bf16 really ran
    # training under autocast: finite fp32 gradients on fp32 weights
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t).sample
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    # a bf16-weight copy (pure bf16 inference) stays within the same tolerance
    with torch.no_grad():
        pure = DDPMUNet2DModel(**CONFIGS["scale-shift-mid-scale"]).eval()
        pure.load_state_dict(model.state_dict())
        out16 = pure.to(torch.bfloat16)(x.bfloat16(), t).sample.float()
    assert ((out16 - ref).norm() / ref.norm()).item() <= BF16_REL_TOL


def test_compile_fullgraph_no_graph_breaks():
    torch.manual_seed(0)
    model = DDPMUNet2DModel(**CONFIGS["gelu-relu-class"]).eval()
    x, t = inputs(model, batch=2)
    labels = torch.tensor([1, 5])
    for grad in (False, True):
        torch._dynamo.reset()
        with torch.set_grad_enabled(grad):
            explained = torch._dynamo.explain(model)(x, t, class_labels=labels)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
    # fullgraph=True compiles forward and backward (aot_eager: the AOTAutograd trace inductor also uses, without
    # inductor's minutes-long CPU code generation) and matches eager
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert (compiled(x, t, class_labels=labels).sample - model(x, t, class_labels=labels).sample).abs().max() <= 1e-5
    model.train()
    out = compiled(x, t, class_labels=labels).sample
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x, t, class_labels=labels).sample.square().mean().backward()
    for n, p in model.named_parameters():
        assert (grads[n] - p.grad).abs().max().item() <= 1e-5 * max(1.0, p.grad.abs().max().item()), n
    torch._dynamo.reset()


def test_inductor_compile_with_weight_freezing_matches_eager_in_ddpm_pipeline():
    """The README's compiled sampling recipe: inductor with freezing (weights folded into constants, oneDNN conv
    weights pre-packed), the compiled UNet dropped into `DDPMPipeline`, keeps fp32 parity with eager sampling."""
    import torch._inductor.config as inductor_config
    from diffusers import DDPMPipeline

    from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler

    torch.manual_seed(0)
    unet = randomised(DDPMUNet2DModel(**CONFIGS["scale-shift-mid-scale"])).eval()
    scheduler = GaussianDiffusionScheduler(num_train_timesteps=100, variance_type="learned_range")
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    kwargs = dict(batch_size=2, num_inference_steps=4, output_type="np")
    ref = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    torch._dynamo.reset()
    with inductor_config.patch(freezing=True):
        pipe.unet = torch.compile(unet, fullgraph=True)
        out = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    torch._dynamo.reset()
    assert out.shape == ref.shape == (2, 8, 8, 3)
    assert abs(out - ref).max() <= 1e-5


def test_benchmark_winograd_convolution_equals_direct_conv():
    """benchmarks/bench_winograd.py's F(2x2, 3x3) convolution (the README's Winograd figures) is a real 3x3 conv,
    odd sizes included."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_winograd.py"
    spec = importlib.util.spec_from_file_location("bench_winograd", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    g = torch.Generator().manual_seed(0)
    for n, c, h, w, k in [(2, 8, 8, 8, 16), (3, 5, 7, 9, 4)]:
        x, wt, b = torch.randn(n, c, h, w, generator=g), torch.randn(k, c, 3, 3, generator=g), torch.randn(k)
        timings = {}
        out = bench.winograd_conv3x3(x, bench.winograd_weight(wt), b, timings)
        ref = torch.nn.functional.conv2d(x, wt, b, padding=1)
        assert out.shape == ref.shape and timings["gemm"] > 0
        assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
