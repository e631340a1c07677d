"""`DDPMUNet2DModel` <-> diffusers `UNet2DModel`: equal outputs, exact weight round trips, clear refusals."""

import pytest
import torch
from diffusers import UNet2DModel

from diffusers_ddpm_ext.convert import state_dict_to_unet2d
from diffusers_ddpm_ext.unet import DDPMUNet2DModel

DDPM_DOWN = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
DDPM_UP = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")

# The google/ddpm-cifar10-32 UNet2DModel config (the DDPM paper's CIFAR-10 network).
DDPM_CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                    layers_per_block=2, down_block_types=DDPM_DOWN, up_block_types=DDPM_UP, attention_head_dim=None,
                    flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, downsample_padding=0, dropout=0.1)

LAYOUTS = {
    # DDPM-CIFAR10 layout at reduced width (same blocks, padding, embedding, eps)
    "ddpm-cifar10-reduced": dict(DDPM_CIFAR10, block_out_channels=(32, 64, 64, 64)),
    # IDM-like: FiLM scale-shift, learned variance, multi-head attention on two levels
    "scale-shift": dict(sample_size=16, in_channels=3, out_channels=6, block_out_channels=(32, 64, 64),
                        layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                        resnet_time_scale_shift="scale_shift", attention_head_dim=16),
    "class-conditional": dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                              layers_per_block=1, down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "AttnUpBlock2D"), num_class_embeds=7,
                              attention_head_dim=8),
    # seed 004's tutorial model
    "seed-004": dict(sample_size=28, in_channels=1, out_channels=1, layers_per_block=2, block_out_channels=(32, 64, 64),
                     down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                     up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    # less common knobs together
    "knobs": dict(sample_size=(8, 16), in_channels=2, out_channels=2, block_out_channels=(16, 32), layers_per_block=1,
                  down_block_types=("UNetResDownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  norm_num_groups=8, attn_norm_num_groups=4, mid_block_scale_factor=1.4142, center_input_sample=True,
                  time_embedding_dim=48, freq_shift=3, add_attention=True, attention_head_dim=16),
    "no-mid-attention": dict(sample_size=8, block_out_channels=(32, 32), layers_per_block=1,
                             down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                             add_attention=False, resnet_time_scale_shift="scale_shift"),
}



def random_unet2d(**cfg) -> UNet2DModel:
    """A UNet2DModel with random weights everywhere (norm affines too, so every tensor matters)."""
    torch.manual_seed(0)
    model = UNet2DModel(**cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
    return model


def inputs(model, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = model.config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(batch, model.config.in_channels, h, w, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    kwargs = {}
    if model.config.num_class_embeds:
        kwargs["class_labels"] = torch.randint(0, model.config.num_class_embeds, (batch,), generator=g)
    return x, t, kwargs


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_from_unet2d_parity_and_exact_round_trip(layout):
    theirs = random_unet2d(**LAYOUTS[layout])
    ours = DDPMUNet2DModel.from_unet2d(theirs)
    assert isinstance(ours, DDPMUNet2DModel) and not ours.training
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) + (
        ours.time_embedding.linear_2.out_features if theirs.config.num_class_embeds else 0)
    for seed in (1, 2):
        x, t, kw = inputs(theirs, seed=seed)
        with torch.no_grad():
            ref = theirs(x, t, **kw).sample
            out = ours(x, t, **kw).sample
        assert (out - ref).abs().max() <= 1e-5, (out - ref).abs().max()
    with torch.no_grad():  # a 0-dim timestep as DDPMPipeline passes it
        x, _, kw = inputs(theirs)
        assert (ours(x, torch.tensor(321), **kw).sample - theirs(x, torch.tensor(321), **kw).sample).abs().max() <= 1e-5

    back = ours.to_unet2d()
    assert_same_state(back.state_dict(), theirs.state_dict())
    for key, value in theirs.config.items():
        if key.endswith("block_types"):  # "UNetResDownBlock2D" is diffusers' alias of "DownBlock2D"
            value = tuple(v.removeprefix("UNetRes") for v in value)
        if not key.startswith("_"):
            mine = back.config[key]
            assert (tuple(mine) if isinstance(mine, list) else mine) == value, key


def test_class_table_gets_null_row_and_loses_it_back():
    theirs = random_unet2d(**LAYOUTS["class-conditional"])
    ours = DDPMUNet2DModel.from_unet2d(theirs)
    table = ours.class_embedding.weight
    assert table.shape == (8, theirs.class_embedding.weight.shape[1])
    assert torch.equal(table[:7], theirs.class_embedding.weight) and torch.count_nonzero(table[7]) == 0
    assert ours.null_class_label == 7
    x, t, _ = inputs(theirs)
    with torch.no_grad():  # null class = no class term: equals the same network without a class table
        plain = UNet2DModel(**{**LAYOUTS["class-conditional"], "num_class_embeds": None}).eval()
        state = {k: v for k, v in theirs.state_dict().items() if not k.startswith("class_embedding")}
        plain.load_state_dict(state)
        assert (ours(x, t).sample - plain(x, t).sample).abs().max() <= 1e-5
    assert ours.to_unet2d().class_embedding.weight.shape[0] == 7


def test_full_size_ddpm_cifar10_parity():
    theirs = random_unet2d(**DDPM_CIFAR10)
    ours = DDPMUNet2DModel.from_unet2d(theirs)
    assert abs(sum(p.numel() for p in ours.parameters()) - 35.7e6) <= 0.1e6
    x, t, _ = inputs(theirs, batch=1)
    with torch.no_grad():
        assert (ours(x, t).sample - theirs(x, t).sample).abs().max() <= 1e-5
    assert_same_state(ours.to_unet2d().state_dict(), theirs.state_dict())


def test_presets_map_to_their_unet2d_configs():
    with torch.device("meta"):
        ddpm = DDPMUNet2DModel.from_preset("ddpm-cifar10").to_unet2d()
        tutorial = DDPMUNet2DModel.from_preset("diffusers-tutorial").to_unet2d()
        idm = DDPMUNet2DModel.from_preset("idm-cifar10").to_unet2d()
    for key, value in DDPM_CIFAR10.items():
        assert ddpm.config[key] == value, key
    assert tutorial.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    assert tutorial.config.attention_head_dim == 8
    assert sum(p.numel() for p in tutorial.parameters()) == 1_707_009  # seed 004's printed count
    # IDM's 4 heads on 256-channel levels = head dim 64; its middle attention keeps its GroupNorm
    assert idm.config.attention_head_dim == 64 and idm.config.resnet_time_scale_shift == "scale_shift"
    assert idm.config.attn_norm_num_groups == 32 and idm.config.out_channels == 6


def test_to_unet2d_parity_for_idm_style_model():
    torch.manual_seed(0)
    ours = DDPMUNet2DModel(sample_size=16, in_channels=3, out_channels=6, block_out_channels=(32, 64, 64),
                           layers_per_block=2, attention_resolutions=(8, 4), num_attention_heads=4,
                           resnet_time_scale_shift="scale_shift", num_class_embeds=3).eval()
    theirs = ours.to_unet2d().eval()
    assert theirs.config.attention_head_dim == 16 and theirs.config.attn_norm_num_groups == 32
    x = torch.randn(2, 3, 16, 16)
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        assert (ours(x, torch.tensor([5, 700]), class_labels=labels).sample
                - theirs(x, torch.tensor([5, 700]), class_labels=labels).sample).abs().max() <= 1e-5
    again = DDPMUNet2DModel.from_unet2d(theirs)
    state = ours.state_dict()
    for key, value in again.state_dict().items():
        if key != "class_embedding.weight":  # the null row is zero after the trip through UNet2DModel
            assert torch.equal(value, state[key]), key
    assert torch.equal(again.class_embedding.weight[:3], state["class_embedding.weight"][:3])


def test_conversion_keeps_dtype():
    theirs = random_unet2d(**LAYOUTS["class-conditional"]).to(torch.bfloat16)
    ours = DDPMUNet2DModel.from_unet2d(theirs)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert not any(p.is_meta for p in ours.parameters())


def test_training_steps_stay_equal():
    # DDPM-CIFAR10 layout at reduced width and 16x16. Gradients must agree to float precision; after AdamW steps
    # compare outputs: Adam's first steps are ~lr * sign(grad), so a parameter whose true gradient is ~0 (e.g. a
    # conv bias right before a GroupNorm) can move by up to lr in either model - bounded below by 2 * 2 * lr.
    lr = 1e-4
    theirs = random_unet2d(**LAYOUTS["ddpm-cifar10-reduced"] | {"dropout": 0.0, "sample_size": 16}).train()
    ours = DDPMUNet2DModel.from_unet2d(theirs).train()
    opts = [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01) for m in (theirs, ours)]
    g = torch.Generator().manual_seed(5)
    for step in range(2):
        x = torch.randn(4, 3, 16, 16, generator=g)
        noise = torch.randn(4, 3, 16, 16, generator=g)
        t = torch.randint(0, 1000, (4,), generator=g)
        for model, opt in zip((theirs, ours), opts):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x, t).sample, noise).backward()
        if step == 0:
            ours_grads = state_dict_to_unet2d({k: p.grad for k, p in ours.named_parameters()})
            for key, p in theirs.named_parameters():
                assert (ours_grads[key] - p.grad).abs().max() <= 1e-6, key
        for opt in opts:
            opt.step()
    back = ours.to_unet2d().state_dict()
    for key, value in theirs.state_dict().items():
        assert (back[key] - value).abs().max() <= 4 * lr, key
    x, t, _ = inputs(theirs)
    with torch.no_grad():
        assert (ours.eval()(x, t).sample - theirs.eval()(x, t).sample).abs().max() <= 1e-5


UNCONVERTIBLE = [
    (dict(time_embedding_type="fourier"), "time_embedding_type.*fourier"),
    (dict(down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
          up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D")),
     "down_block_types.*SkipDownBlock2D"),
    (dict(down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "AttnUpBlock2D")),
     "attention differs"),
    (dict(act_fn="mish"), "act_fn.*mish"),
    (dict(class_embed_type="timestep"), "class_embed_type.*timestep"),
    (dict(mid_block_type=None), "mid_block_type.*None"),
    (dict(attention_head_dim=24), "attention_head_dim.*24.*64"),
    (dict(sample_size=None), "sample_size"),
]


@pytest.mark.parametrize("overrides,message", UNCONVERTIBLE)
def test_unconvertible_unet2d_layouts_are_refused(overrides, message):
    cfg = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
               down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    cfg.update(overrides)
    with pytest.raises(ValueError, match=message):
        DDPMUNet2DModel.from_unet2d(UNet2DModel(**cfg))


@pytest.mark.parametrize("overrides,message", [
    (dict(upsample_type="conv_transpose"), "upsample_type.*conv_transpose"),
    (dict(downsample_type="avg_pool"), "downsample_type.*avg_pool"),
    (dict(time_embedding_act_fn="relu"), "time_embedding_act_fn.*relu"),
    (dict(act_fn="gelu"), "act_fn.*gelu"),
    (dict(resnet_skip_time_act=True), "resnet_skip_time_act"),
    (dict(attention_head_dim=None, num_attention_heads=2), "head dims \\[8, 16\\]"),
    (dict(mid_attention_norm=False), "mid_attention_norm"),
])
def test_inexpressible_models_refuse_to_unet2d(overrides, message):
    cfg = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, attention_resolutions=(8,),
               norm_num_groups=8)
    cfg.update(overrides)
    with torch.device("meta"):
        model = DDPMUNet2DModel(**cfg)
    with pytest.raises(ValueError, match=message):
        model.to_unet2d()
