"""The 1D and 3D variants of `DDPMUNet2DModel` (`dims`, IDM's name).

Exact cross-checks against the 2D network: a dims=3 model on one frame is the dims=2 model whose 3x3 kernels sit at
the temporal centre of the 3x3x3 ones; a dims=1 model is the dims=2 model whose 3x3 kernels hold the 1D kernel in
their middle row, run on an input that is constant along H. Plus the options (checkpointing, zero-init, learned
variance, class labels), save/load, config errors, a training run on a toy 1D signal and scheduler sampling.
"""

import pytest
import torch
from diffusers_ddpm_ext.losses import diffusion_loss
from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler
from diffusers_ddpm_ext.unet import DDPMUNet2DModel

# Every option at once: scale-shift, learned variance (2x channels), classes, attention at one level and in the middle,
# three levels so both resampling layers are used twice. Attention is placed by resolution, which depends on dims.
BASE = dict(in_channels=2, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
            num_attention_heads=2, resnet_time_scale_shift="scale_shift", num_class_embeds=3, dropout=0.0)
RESAMPLING = [
    dict(downsample_type="conv", downsample_padding=1, upsample_type="conv"),
    dict(downsample_type="conv", downsample_padding=0, upsample_type="conv_transpose"),
    dict(downsample_type="avg_pool", upsample_type="nearest"),
    dict(downsample_type="avg_pool", upsample_type="conv_transpose", resnet_time_scale_shift="default"),
]
IDS = ["conv-conv", "pad-conv_transpose", "pool-nearest", "pool-conv_transpose-additive"]


def build(seed: int = 0, **cfg) -> DDPMUNet2DModel:
    torch.manual_seed(seed)
    model = DDPMUNet2DModel(**{**BASE, **cfg})
    with torch.no_grad():  # perturb every tensor (norm affines, biases) so every path carries signal
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.tensor([5, 613]), torch.tensor([0, 3])  # label 3 = null class


# ------------------------------------------------------------------------------------------ exact cross-checks


@pytest.mark.parametrize("resampling", RESAMPLING, ids=IDS)
def test_dims3_on_one_frame_equals_dims2(resampling):
    """On F = 1 the 3D network is the 2D one: 2D kernels at the temporal centre of the 3D kernels. The frame axis is
    zero-padded and never resampled, so the other temporal taps only ever see padding: random values there must not
    change the output either (they would if F were padded with data, halved, or not padded)."""
    two = build(**resampling, sample_size=8, attention_resolutions=(4,))
    three = build(**resampling, sample_size=(1, 8, 8), attention_resolutions=(4,), dims=3)
    assert [k for k in three.state_dict()] == [k for k in two.state_dict()]
    x, t, y = inputs((2, 2, 8, 8))
    two_frames = torch.stack([x, torch.randn_like(x)], dim=2)  # (B, 2, 2, 8, 8)
    with torch.no_grad():
        ref = two(x, t, class_labels=y).sample  # (B, 4, 8, 8)
    on_two_frames = []
    for off_centre in ("zeros", "random"):
        state = {}
        for key, w3 in three.state_dict().items():
            w2 = two.state_dict()[key]
            if w3.shape == w2.shape:  # linears, norms, biases, embeddings
                state[key] = w2.clone()
                continue
            # conv (O, I, k, k) -> (O, I, kt, k, k); conv transpose (I, O, 4, 4) -> (I, O, 3, 4, 4); 1x1 -> kt = 1
            assert w3.shape[:2] + w3.shape[3:] == w2.shape, key
            kt = w3.shape[2]
            w = torch.zeros_like(w3) if off_centre == "zeros" else torch.randn_like(w3)
            w[:, :, kt // 2] = w2
            state[key] = w
        three.load_state_dict(state)
        with torch.no_grad():
            out = three(x[:, :, None], t, class_labels=y).sample  # (B, 4, 1, 8, 8)
        assert out.shape == (2, 4, 1, 8, 8)
        assert (out[:, :, 0] - ref).abs().max() <= 1e-5, off_centre
        with torch.no_grad():
            on_two_frames.append(three(two_frames, t, class_labels=y).sample)
    # the off-centre taps are live once there is a neighbouring frame: the F = 1 agreement is not vacuous
    assert (on_two_frames[0] - on_two_frames[1]).abs().max() > 1e-3


@pytest.mark.parametrize("resampling", RESAMPLING, ids=IDS)
def test_dims1_equals_dims2_on_height_constant_input(resampling):
    """A 1D network is the 2D one with each 1D kernel in the middle row of the 2D kernel (zeros elsewhere), on an
    input repeated along H: each row then runs the 1D network (strided conv and pooling keep rows equal, nearest
    doubles them; ConvTranspose2d(4, 2, 1) needs the 1D kernel in rows 1 and 2: output row 2i takes kernel row 1,
    row 2i+1 kernel row 2). GroupNorm statistics and attention weights are unchanged by the H identical copies.
    (An input of height 1 cannot work: nearest upsampling doubles H and pooling needs H >= 2.)"""
    # attention at level 1 in both: the level's resolution is L // 2 = 8 in 1D and H // 2 = 2 in 2D
    one = build(**resampling, sample_size=16, attention_resolutions=(8,), dims=1)
    two = build(**resampling, sample_size=(4, 16), attention_resolutions=(2,))
    state = {}
    for key, w2 in two.state_dict().items():
        w1 = one.state_dict()[key]
        if w1.shape == w2.shape:
            state[key] = w1.clone()
            continue
        assert w2.shape[:2] + w2.shape[3:] == w1.shape, key
        w = torch.zeros_like(w2)
        if w2.shape[2] == 4:  # ConvTranspose2d(4, 2, 1)
            w[:, :, 1] = w1
            w[:, :, 2] = w1
        else:
            w[:, :, w2.shape[2] // 2] = w1
        state[key] = w
    two.load_state_dict(state)
    x, t, y = inputs((2, 2, 16))
    with torch.no_grad():
        ref = one(x, t, class_labels=y).sample  # (B, 4, 16)
        out = two(x[:, :, None].expand(2, 2, 4, 16).contiguous(), t, class_labels=y).sample  # (B, 4, 4, 16)
    assert ref.shape == (2, 4, 16) and out.shape == (2, 4, 4, 16)
    for row in range(4):
        assert (out[:, :, row] - ref).abs().max() <= 1e-5, row


def test_dims3_keeps_frames_and_halves_height_width():
    model = build(sample_size=(3, 8, 8), attention_resolutions=(4,), dims=3,
                  downsample_type="conv", upsample_type="conv_transpose")
    shapes = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: shapes.append((type(mod).__name__, tuple(out.shape))))
             for m in model.modules() if type(m).__name__ in ("DDPMDownsample", "DDPMUpsample")]
    x, t, y = inputs((2, 2, 3, 8, 8))
    with torch.no_grad():
        assert model(x, t, class_labels=y).sample.shape == (2, 4, 3, 8, 8)
        assert model(torch.randn(1, 2, 5, 8, 8), 3).sample.shape == (1, 4, 5, 8, 8)  # any frame count
    for h in hooks:
        h.remove()
    assert [s for _, s in shapes[:4]] == [(2, 8, 3, 4, 4), (2, 16, 3, 2, 2), (2, 16, 3, 4, 4), (2, 16, 3, 8, 8)]
    down = model.down_blocks[0].downsample.conv
    assert down.stride == (1, 2, 2) and down.kernel_size == (3, 3, 3)
    up = model.up_blocks[0].upsample.conv
    assert up.stride == (1, 2, 2) and up.kernel_size == (3, 4, 4)
    # attention sits at level 1 only (H = 8 // 2 = 4), whatever F is
    assert [len(b.attentions) for b in model.down_blocks] == [0, 1, 0]


@pytest.mark.parametrize("name", ["digits-small", "idm-cifar10"])
def test_preset_dims_override_same_tree(name):
    """`from_preset(name, dims=...)`: same modules and keys, kernels of the other rank."""
    with torch.device("meta"):
        two = DDPMUNet2DModel.from_preset(name).state_dict()
        one = DDPMUNet2DModel.from_preset(name, dims=1).state_dict()
        three = DDPMUNet2DModel.from_preset(name, dims=3).state_dict()
    assert list(one) == list(two) == list(three)
    n_kernels = 0
    for key, w in two.items():
        if w.ndim == 4:  # (O, I, k, k): 1D drops a kernel axis, 3D prepends a temporal one of 3 (1 for 1x1)
            n_kernels += 1
            assert one[key].shape == w.shape[:3], key
            assert three[key].shape == w.shape[:2] + (1 if w.shape[-1] == 1 else 3,) + w.shape[2:], key
        else:
            assert one[key].shape == three[key].shape == w.shape, key
    assert n_kernels > 10


def test_int_sample_size_is_used_for_every_axis():
    one = DDPMUNet2DModel(**BASE, sample_size=16, attention_resolutions=(8,), dims=1)
    three = DDPMUNet2DModel(**BASE, sample_size=8, attention_resolutions=(4,), dims=3)  # F = H = W = 8
    assert [len(b.attentions) for b in one.down_blocks] == [0, 1, 0]
    assert [len(b.attentions) for b in three.down_blocks] == [0, 1, 0]
    assert DDPMUNet2DModel(**BASE, sample_size=[16], attention_resolutions=(8,), dims=1).config.sample_size == [16]
    # frame counts need not divide anything: (3, 8, 8) builds; H, W must
    DDPMUNet2DModel(**BASE, sample_size=(3, 8, 8), attention_resolutions=(), dims=3)


# ------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize("dims,shape", [(1, (2, 2, 16)), (3, (2, 2, 2, 8, 8))], ids=["1d", "3d"])
def test_gradient_checkpointing_same_gradients(dims, shape):
    model = build(sample_size=list(shape[2:]), attention_resolutions=(shape[-1] // 2,), dims=dims, layers_per_block=2,
                  upsample_type="conv_transpose").train()
    x, t, y = inputs(shape)

    def grads():
        model.zero_grad()
        model(x, t, class_labels=y).sample.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.enable_gradient_checkpointing()
    assert all(b.gradient_checkpointing for b in model.modules() if hasattr(b, "gradient_checkpointing"))
    ckpt = grads()
    model.disable_gradient_checkpointing()
    for name, g in plain.items():
        assert g.abs().max() > 0 or "class_embedding" in name, name
        assert (g - ckpt[name]).abs().max() <= 1e-6, name


@pytest.mark.parametrize("dims,shape", [(1, (1, 2, 16)), (3, (1, 2, 2, 8, 8))], ids=["1d", "3d"])
def test_zero_init_and_inplace_inference(dims, shape):
    torch.manual_seed(0)
    zero = DDPMUNet2DModel(**BASE, sample_size=shape[-1], attention_resolutions=(), dims=dims, zero_init_residual=True)
    with torch.no_grad():
        assert torch.count_nonzero(zero(torch.randn(shape), 3).sample) == 0
    model = build(sample_size=shape[-1], attention_resolutions=(shape[-1] // 2,), dims=dims)
    x, t, y = inputs((2,) + shape[1:])
    with torch.no_grad():
        fast = model(x, t, class_labels=y).sample  # in-place inference path
    slow = model(x, t, class_labels=y).sample.detach()  # autograd path
    assert (fast - slow).abs().max() <= 1e-5  # conv3d picks other CPU kernels with autograd on: rounding only
    with torch.no_grad():  # the null class is the default label
        assert torch.equal(model(x, t).sample, model(x, t, class_labels=torch.tensor([3, 3])).sample)
        assert not torch.allclose(model(x, t, class_labels=torch.tensor([0, 0])).sample, model(x, t).sample)


@pytest.mark.parametrize("dims,size", [(1, [16]), (3, [2, 8, 8])], ids=["1d", "3d"])
def test_save_load_round_trip(dims, size, tmp_path):
    model = build(sample_size=size, attention_resolutions=(size[-1] // 2,), dims=dims, upsample_type="conv_transpose")
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = DDPMUNet2DModel.from_pretrained(tmp_path)
    assert loaded.config.dims == dims and loaded.config.sample_size == size and not loaded.training
    saved = model.state_dict()
    assert list(loaded.state_dict()) == list(saved)
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    x, t, y = inputs([2, 2] + size)
    with torch.no_grad():
        assert (loaded(x, t, class_labels=y).sample - model(x, t, class_labels=y).sample).abs().max() <= 1e-5
    clone = DDPMUNet2DModel.from_config(model.config)
    assert [p.shape for p in clone.parameters()] == [p.shape for p in model.parameters()]


@pytest.mark.parametrize("dims,shape", [(1, (2, 2, 16)), (3, (2, 2, 2, 8, 8))], ids=["1d", "3d"])
def test_compile_no_graph_breaks(dims, shape):
    model = build(sample_size=list(shape[2:]), attention_resolutions=(shape[-1] // 2,), dims=dims,
                  downsample_type="avg_pool", upsample_type="conv_transpose", layers_per_block=1)
    x, t, y = inputs(shape)
    for grad in (False, True):
        torch._dynamo.reset()
        with torch.set_grad_enabled(grad):
            explained = torch._dynamo.explain(model)(x, t, class_labels=y)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ training and sampling


def test_training_decreases_hybrid_loss_on_toy_1d_signal():
    """Sines of random frequency and phase; learned variance + IDM hybrid loss. The loss on a fixed evaluation set
    (fixed x0, t and noise) must fall after 40 Adam steps."""
    torch.manual_seed(0)
    length = 32
    pos = torch.linspace(0, 1, length)

    def signals(n, g):
        freq = torch.randint(1, 4, (n, 1), generator=g).float()
        phase = torch.rand(n, 1, generator=g) * 6.283
        return (0.8 * torch.sin(6.283 * freq * pos + phase))[:, None]  # (n, 1, L)

    scheduler = GaussianDiffusionScheduler(num_train_timesteps=100, variance_type="learned_range")
    model = DDPMUNet2DModel(sample_size=length, in_channels=1, out_channels=2, block_out_channels=(16, 32),
                            layers_per_block=1, norm_num_groups=4, attention_resolutions=(16,), dims=1,
                            resnet_time_scale_shift="scale_shift", zero_init_residual=True).train()
    g = torch.Generator().manual_seed(1)
    x_eval = signals(64, g)
    t_eval = torch.randint(0, 100, (64,), generator=g)
    n_eval = torch.randn(x_eval.shape, generator=g)

    def eval_loss():
        with torch.no_grad():
            out = model(scheduler.add_noise(x_eval, n_eval, t_eval), t_eval).sample
            return diffusion_loss(out, x_eval, n_eval, t_eval, scheduler, loss_type="hybrid").loss.mean().item()

    before = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(40):
        x0 = signals(32, g)
        t = torch.randint(0, 100, (32,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        out = model(scheduler.add_noise(x0, noise, t), t).sample  # (B, 2, L)
        loss = diffusion_loss(out, x0, noise, t, scheduler, loss_type="hybrid").loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    print(f"hybrid loss {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("dims,shape", [(1, (3, 2, 16)), (3, (3, 2, 2, 8, 8))], ids=["1d", "3d"])
def test_scheduler_samples_1d_and_3d(dims, shape):
    model = build(sample_size=list(shape[2:]), attention_resolutions=(shape[-1] // 2,), dims=dims)
    scheduler = GaussianDiffusionScheduler(num_train_timesteps=200, beta_schedule="squaredcos_cap_v2",
                                           variance_type="learned_range")
    scheduler.set_timesteps("8")  # IDM respacing: 8 of 200 steps

    def sample(seed):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=gen) * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:
                out = model(scheduler.scale_model_input(x, t), t, class_labels=torch.tensor([0, 1, 3])).sample
                assert out.shape == (shape[0], 4) + shape[2:]
                x = scheduler.step(out, t, x, generator=gen).prev_sample
        return x

    x = sample(0)
    assert len(scheduler.timesteps) == 8
    assert x.shape == shape and torch.isfinite(x).all()
    assert torch.equal(x, sample(0)) and not torch.equal(x, sample(1))


# ------------------------------------------------------------------------------------------ errors

BAD_CONFIGS = [
    (dict(dims=4), ValueError, r"`dims`=4 .*allowed: \[1, 2, 3\]"),
    (dict(dims=0), ValueError, r"`dims`=0 .*\[1, 2, 3\]"),
    (dict(dims="3"), TypeError, r"`dims`='3'.*\[1, 2, 3\]"),
    (dict(dims=2.0), TypeError, r"`dims`=2.0"),
    (dict(dims=True), TypeError, r"`dims`=True"),
    (dict(dims=None), TypeError, r"`dims`=None"),
    (dict(dims=3, sample_size=(8, 8)), ValueError, r"`sample_size`=\(8, 8\).*\(F, H, W\).*dims=3"),
    (dict(dims=1, sample_size=(8, 8)), ValueError, r"`sample_size`=\(8, 8\).*\(L,\).*dims=1"),
    (dict(dims=2, sample_size=(8,)), ValueError, r"`sample_size`=\(8,\).*\(H, W\).*dims=2"),
    (dict(dims=3, sample_size=(8, 6, 8)), ValueError, r"`sample_size`=\(8, 6, 8\).*divisible.*4.*H and W"),
    (dict(dims=1, sample_size=18), ValueError, r"`sample_size`=18.*divisible.*4"),
    (dict(dims=3, sample_size=(4, 8, 8), attention_resolutions=(8, 4, 1)), ValueError,
     r"\[1\] match no level.*\[8, 4, 2\]"),
    (dict(dims=1, sample_size=16, attention_resolutions=(4, 3)), ValueError, r"\[3\] match no level.*\[16, 8, 4\]"),
]


@pytest.mark.parametrize("overrides,exc,message", BAD_CONFIGS)
def test_bad_configs_fail_clearly(overrides, exc, message):
    cfg = {**BASE, "sample_size": 8, "attention_resolutions": (), **overrides}
    with pytest.raises(exc, match=message):
        DDPMUNet2DModel(**cfg)


def test_bad_inputs_and_conversion_fail_clearly():
    one = DDPMUNet2DModel(**BASE, sample_size=16, attention_resolutions=(), dims=1)
    three = DDPMUNet2DModel(**BASE, sample_size=(2, 8, 8), attention_resolutions=(), dims=3)
    with pytest.raises(ValueError, match=r"\(B, C, L\) for a dims=1 model.*\(1, 2, 8, 8\)"):
        one(torch.randn(1, 2, 8, 8), 1)
    with pytest.raises(ValueError, match=r"\(B, C, F, H, W\) for a dims=3 model"):
        three(torch.randn(1, 2, 8, 8), 1)
    with pytest.raises(ValueError, match=r"spatial size 6x8 .*4"):
        three(torch.randn(1, 2, 3, 6, 8), 1)
    with pytest.raises(ValueError, match=r"spatial size 18 .*4"):
        one(torch.randn(1, 2, 18), 1)
    for model, dims in ((one, 1), (three, 3)):
        with pytest.raises(ValueError, match=rf"to_unet2d.*`dims`={dims}"):
            model.to_unet2d()
        with pytest.raises(ValueError, match=rf"from_unet2d.*`dims`={dims}"):
            DDPMUNet2DModel.from_unet2d(model)


def test_configs_saved_before_dims_load_as_2d(tmp_path):
    model = DDPMUNet2DModel(**BASE, sample_size=8, attention_resolutions=(4,))
    old = {k: v for k, v in model.config.items() if k != "dims" and not k.startswith("_")}
    rebuilt = DDPMUNet2DModel.from_config(old)
    assert rebuilt.config.dims == 2 and type(rebuilt.conv_in) is torch.nn.Conv2d
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in model.parameters()]
