"""GaussianDiffusionPipeline: every scheduler x our UNet / UNet2DModel x eps / learned variance x 1 / 3 channels.

Where diffusers' own pipelines are correct (DDPMPipeline with DDPM-type schedulers, DDIMPipeline with DDIM on an
eps-only model) the images must be identical; everywhere else they must equal the reference loop written here
(`reference_loop`), which spells out what a correct sampler does with each scheduler.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput

from diffusers_ddpm_ext.pipelines import (
    ClassConditionalDDPMPipeline,
    GaussianDiffusionPipeline,
    scheduler_reads_predicted_variance,
)
from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler
from diffusers_ddpm_ext.unet import DDPMUNet2DModel

SIZE, STEPS = 8, 4
SCHEDULERS = {
    "ours": GaussianDiffusionScheduler,
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "unipc": UniPCMultistepScheduler,
    "heun": HeunDiscreteScheduler,
    "pndm": PNDMScheduler,
}
# Written out by hand (not by inspecting signatures, as the pipeline does): whose `step` draws noise from a
# generator, and who reads the learned-variance channels (with variance_type learned_range).
TAKES_GENERATOR = {"ours", "ddpm", "ddim", "dpmsolver++", "euler", "euler_a"}
READS_VARIANCE = {"ours", "ddpm"}
FAMILIES = ("ours", "unet2d")


def make_unet(family, channels=1, learned=False, num_class_embeds=None, seed=0):
    torch.manual_seed(seed)
    out = 2 * channels if learned else channels
    if family == "ours":
        return DDPMUNet2DModel(sample_size=SIZE, in_channels=channels, out_channels=out, block_out_channels=(8, 16),
                               layers_per_block=1, norm_num_groups=4, attention_resolutions=(),
                               num_class_embeds=num_class_embeds).eval()
    return UNet2DModel(sample_size=SIZE, in_channels=channels, out_channels=out, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=num_class_embeds).eval()


def make_scheduler(name, learned=False):
    # One config for all, ours with DDPM's linear betas; learned_range for 2C models. (Not cosine: its
    # alpha_bar_T ~ 2e-9 gives sigma_max ~ 2e4, where diffusers' Euler-ancestral step takes the root of a
    # float32 cancellation and returns NaN.)
    base = GaussianDiffusionScheduler(variance_type="learned_range" if learned else "fixed_small")
    return SCHEDULERS[name].from_config(base.config)


def pipe_of(unet, scheduler, cls=GaussianDiffusionPipeline):
    pipe = cls(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def reference_loop(unet, scheduler, name, n, steps=STEPS, seed=0, labels=None, guidance=1.0, null=None):
    """A correct sampling loop, ordered as diffusers' own pipelines order it: set_timesteps, then the noise scaled by
    init_noise_sigma (the σ of that chain), scale_model_input, variance channels only where read."""
    c = unet.config.in_channels
    learned = unet.config.out_channels == 2 * c
    g = gen(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn((n, c, SIZE, SIZE), generator=g) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        if labels is None:
            out = unet(inp, t).sample
        elif guidance == 1.0:
            out = unet(inp, t, class_labels=labels).sample
        else:  # two separate forwards, combined as in Ho & Salimans 2022 eq. 6; variance half from cond
            cond = unet(inp, t, class_labels=labels).sample
            uncond = unet(inp, t, class_labels=torch.full_like(labels, null)).sample
            out = torch.cat([uncond[:, :c] + guidance * (cond[:, :c] - uncond[:, :c]), cond[:, c:]], dim=1)
        if not (learned and name in READS_VARIANCE):
            out = out[:, :c]
        kwargs = {"generator": g} if name in TAKES_GENERATOR else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


# ------------------------------------------------------------------------------------- every scheduler


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("learned", [False, True], ids=["eps", "learned"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_matches_reference_loop(name, family, learned, channels):
    unet = make_unet(family, channels, learned)
    pipe = pipe_of(unet, make_scheduler(name, learned))
    ours = pipe(batch_size=2, generator=gen(), num_inference_steps=STEPS, output_type="latent").images
    ref = reference_loop(unet, make_scheduler(name, learned), name, 2)
    assert ours.shape == (2, channels, SIZE, SIZE) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert scheduler_reads_predicted_variance(pipe.scheduler) == (learned and name in READS_VARIANCE)


def test_the_reference_is_not_trivially_satisfied():
    """What the reference loop does differently from DDPMPipeline matters: the Euler family needs
    init_noise_sigma and scale_model_input, and without them the images are different (wrong)."""
    unet = make_unet("ours")
    pipe = pipe_of(unet, make_scheduler("euler"))
    ours = pipe(batch_size=2, generator=gen(), num_inference_steps=STEPS, output_type="np").images
    plain = DDPMPipeline(unet=unet, scheduler=make_scheduler("euler"))
    plain.set_progress_bar_config(disable=True)
    theirs = plain(batch_size=2, generator=gen(), num_inference_steps=STEPS, output_type="np").images
    assert np.abs(ours - theirs).max() > 0.05
    # learned variance + DPM-Solver++: the 2C output must be cut to C (DDIMPipeline passes 2C and fails)
    learned = make_unet("ours", learned=True)
    ddim = DDIMPipeline(unet=learned, scheduler=make_scheduler("ddim", True))
    ddim.set_progress_bar_config(disable=True)
    with pytest.raises(Exception):
        ddim(batch_size=1, generator=gen(), num_inference_steps=STEPS, output_type="np")
    out = pipe_of(learned, make_scheduler("ddim", True))(batch_size=1, generator=gen(), num_inference_steps=STEPS,
                                                          output_type="np").images
    assert out.shape == (1, SIZE, SIZE, 1)


# The noise scale of these schedulers depends on the chain set_timesteps builds (with "leading" spacing its largest
# σ is not the training chain's): a pipeline that reads init_noise_sigma before set_timesteps starts from noise of
# another scale on the first call after a swap and after a change of step count.
CHAIN_DEPENDENT_NOISE_SCALE = {"euler", "euler_a", "heun"}


def saved_config(folder):
    """The scheduler config as a saved pipeline carries it: written by save_pretrained and read back, so every key
    (timestep_spacing "leading" included) is explicit and passes to the swapped-in scheduler."""
    GaussianDiffusionScheduler(beta_schedule="linear").save_pretrained(folder)
    return GaussianDiffusionScheduler.from_pretrained(folder).config


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_saved_config_first_call_after_swap_and_step_change_match_diffusers_order(name, tmp_path):
    config = saved_config(tmp_path / "scheduler")
    unet = make_unet("ours")
    pipe = pipe_of(unet, GaussianDiffusionScheduler.from_config(config))
    pipe(batch_size=2, generator=gen(), num_inference_steps=3, output_type="latent")  # a call before the swap
    pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.timestep_spacing == "leading"
    kw = dict(batch_size=2, output_type="latent")
    first = pipe(generator=gen(), num_inference_steps=STEPS, **kw).images  # first call after the swap
    changed = pipe(generator=gen(), num_inference_steps=7, **kw).images  # a new step count
    again = pipe(generator=gen(), num_inference_steps=STEPS, **kw).images  # back: the same call as the first
    for images, steps in ((first, STEPS), (changed, 7), (again, STEPS)):
        ref = reference_loop(unet, SCHEDULERS[name].from_config(config), name, 2, steps=steps)
        assert torch.isfinite(images).all()
        torch.testing.assert_close(images, ref, rtol=0, atol=0)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    # The comparison above can fail: for these schedulers the noise scale before set_timesteps (a fresh scheduler:
    # the full chain's) and after a call of another step count differ from the scale of the chain sampled.
    if name in CHAIN_DEPENDENT_NOISE_SCALE:
        fresh = SCHEDULERS[name].from_config(config)
        before = float(fresh.init_noise_sigma)
        fresh.set_timesteps(STEPS)
        at_steps = float(fresh.init_noise_sigma)
        fresh.set_timesteps(7)
        assert before > 2 * at_steps and abs(float(fresh.init_noise_sigma) - at_steps) > 0.1 * at_steps


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("family", FAMILIES)
def test_class_conditional_guidance_matches_reference(name, family):
    if family == "ours":  # null class = num_class_embeds (the extra row)
        unet, null, kwargs = make_unet("ours", learned=True, num_class_embeds=3), 3, {}
    else:  # a UNet2DModel trained with its last class as the null class
        unet, null, kwargs = make_unet("unet2d", learned=True, num_class_embeds=4), 3, {"null_class_label": 3}
    labels = [2, 0, 1]
    pipe = pipe_of(unet, make_scheduler(name, True))
    ours = pipe(generator=gen(1), num_inference_steps=STEPS, output_type="latent", class_labels=labels,
                guidance_scale=3.0, **kwargs).images
    ref = reference_loop(unet, make_scheduler(name, True), name, 3, seed=1, labels=torch.tensor(labels),
                         guidance=3.0, null=null)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)  # one 2B batch vs two B batches, w = 3
    cond = pipe(generator=gen(1), num_inference_steps=STEPS, output_type="latent", class_labels=labels, **kwargs)
    torch.testing.assert_close(cond.images, reference_loop(unet, make_scheduler(name, True), name, 3, seed=1,
                                                           labels=torch.tensor(labels)), rtol=0, atol=0)
    assert (ours - cond.images).abs().max() > 1e-3


# ------------------------------------------------------------------------------------- equal to diffusers


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("learned", [False, True], ids=["eps", "learned"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["ours", "ddpm"])
def test_same_images_as_ddpm_pipeline(name, family, learned, channels):
    unet = make_unet(family, channels, learned)
    ours = pipe_of(unet, make_scheduler(name, learned))
    theirs = DDPMPipeline(unet=unet, scheduler=make_scheduler(name, learned))
    theirs.set_progress_bar_config(disable=True)
    for output_type in ("np", "pil"):
        a = ours(batch_size=3, generator=gen(), num_inference_steps=STEPS, output_type=output_type).images
        b = theirs(batch_size=3, generator=gen(), num_inference_steps=STEPS, output_type=output_type).images
        if output_type == "np":
            np.testing.assert_array_equal(a, b)
        else:
            assert [np.asarray(i).tolist() for i in a] == [np.asarray(i).tolist() for i in b]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_same_images_as_ddim_pipeline(eta, family, channels):
    unet = make_unet(family, channels)
    theirs = DDIMPipeline(unet=unet, scheduler=make_scheduler("ours"))  # converts to DDIMScheduler itself
    theirs.set_progress_bar_config(disable=True)
    ours = pipe_of(unet, make_scheduler("ddim"))
    a = ours(batch_size=2, generator=gen(), num_inference_steps=STEPS, output_type="np", eta=eta).images
    b = theirs(batch_size=2, generator=gen(), num_inference_steps=STEPS, output_type="np", eta=eta).images
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------- call options


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", ["ddpm", "euler", "dpmsolver++"])
def test_output_types_in_any_dtype(dtype, name):
    unet = make_unet("ours", learned=True)
    ref = pipe_of(unet, make_scheduler(name, True))(batch_size=2, generator=gen(), num_inference_steps=STEPS,
                                                    output_type="np").images
    pipe = pipe_of(make_unet("ours", learned=True).to(dtype), make_scheduler(name, True))
    kw = dict(batch_size=2, num_inference_steps=STEPS)
    latent = pipe(generator=gen(), output_type="latent", **kw).images
    pt = pipe(generator=gen(), output_type="pt", **kw).images
    np_ = pipe(generator=gen(), output_type="np", **kw).images
    pil = pipe(generator=gen(), output_type="pil", **kw).images
    # the chain runs in float32 for half types (the UNet in its own dtype), in float64 for a float64 UNet
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert latent.dtype == pt.dtype == expected and np_.dtype == np.float32
    torch.testing.assert_close(pt, (latent / 2 + 0.5).clamp(0, 1), rtol=0, atol=0)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).float().numpy(), np_, rtol=0, atol=0)
    assert len(pil) == 2 and pil[0].mode == "L" and pil[0].size == (SIZE, SIZE)
    np.testing.assert_array_equal(np.asarray(pil[1]), (np_[1, :, :, 0] * 255).round().astype("uint8"))
    assert np.isfinite(np_).all()
    if dtype != torch.float64:  # same weights at lower precision, same float32 noise (float64 draws other noise)
        assert np.abs(np_ - ref).mean() < 0.05


def test_latents_argument():
    unet = make_unet("ours")
    pipe = pipe_of(unet, make_scheduler("euler"))
    drawn = pipe(batch_size=2, generator=gen(), num_inference_steps=STEPS, output_type="latent").images
    noise = torch.randn((2, 1, SIZE, SIZE), generator=gen())
    # the same noise given as latents (scaled by init_noise_sigma like drawn noise; batch size taken from it)
    given = pipe(latents=noise, num_inference_steps=STEPS, output_type="latent").images
    torch.testing.assert_close(given, drawn, rtol=0, atol=0)
    for bad in (torch.randn(2, 1, SIZE + 1, SIZE), torch.randn(1, SIZE, SIZE), noise.numpy()):
        with pytest.raises(ValueError, match="latents"):
            pipe(latents=bad, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="2 samples but 3"):
        pipe(latents=noise, batch_size=3, num_inference_steps=STEPS)


def test_callback_on_step_end_sees_every_step_and_can_replace_latents():
    unet = make_unet("ours", learned=True)
    pipe = pipe_of(unet, make_scheduler("dpmsolver++", True))
    seen = []

    def callback(p, i, t, kwargs):
        assert p is pipe
        seen.append((i, int(t), tuple(kwargs["latents"].shape), tuple(kwargs["model_output"].shape)))
        if i == p.num_timesteps - 1:
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return {}

    out = pipe(batch_size=2, generator=gen(), num_inference_steps=STEPS, output_type="pt",
               callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "model_output"]).images
    timesteps = pipe.scheduler.timesteps.tolist()
    assert [s[:2] for s in seen] == list(enumerate(timesteps))
    # model_output is what the scheduler got: C channels (DPM-Solver++ does not read the variance)
    assert all(s[2] == (2, 1, SIZE, SIZE) and s[3] == (2, 1, SIZE, SIZE) for s in seen)
    assert torch.equal(out, torch.full_like(out, 0.5))  # the replaced latents became the output
    with pytest.raises(ValueError, match="not allowed"):
        pipe(batch_size=1, num_inference_steps=STEPS, callback_on_step_end=callback,
             callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_interrupt_from_callback_skips_remaining_steps():
    unet = make_unet("ours")
    pipe = pipe_of(unet, make_scheduler("ddpm"))
    calls = []
    handle = unet.register_forward_hook(lambda *a: calls.append(1))

    def stop_after_first(p, i, t, kwargs):
        p._interrupt = True
        return {}

    pipe(batch_size=1, generator=gen(), num_inference_steps=STEPS, callback_on_step_end=stop_after_first)
    handle.remove()
    assert len(calls) == 1


def test_generator_list_one_per_image():
    unet = make_unet("ours")
    pipe = pipe_of(unet, make_scheduler("ddpm"))
    both = pipe(batch_size=2, generator=[gen(1), gen(2)], num_inference_steps=STEPS, output_type="latent").images
    first = pipe(batch_size=1, generator=[gen(1)], num_inference_steps=STEPS, output_type="latent").images
    torch.testing.assert_close(both[:1], first, rtol=0, atol=1e-5)  # batch of 2 vs 1: reassociation
    with pytest.raises(ValueError, match="one per image"):
        pipe(batch_size=3, generator=[gen(1), gen(2)], num_inference_steps=STEPS)


@pytest.mark.parametrize(
    "unet_kwargs, call_kwargs, match",
    [
        (dict(), dict(guidance_scale=2.0), "needs a class-conditional UNet"),
        (dict(), dict(class_labels=[0]), "num_class_embeds"),
        (dict(family="unet2d", num_class_embeds=3), dict(batch_size=2), r"pass `class_labels` \(0..2\)"),
        (dict(family="unet2d", num_class_embeds=3), dict(class_labels=[0], guidance_scale=2.0), "null_class_label"),
        (dict(family="unet2d", num_class_embeds=3), dict(class_labels=[3]), r"allowed are 0..2\."),
        (dict(num_class_embeds=3), dict(class_labels=[4]), r"allowed are 0..3 \(3 is the null class"),
        (dict(), dict(eta=0.5), "takes no `eta`"),
        (dict(), dict(output_type="jpg"), "output_type"),
        (dict(), dict(num_inference_steps=0), "num_inference_steps"),
        (dict(), dict(batch_size=0), "batch_size"),
        (dict(), dict(null_class_label=-1), "null_class_label"),
    ],
)
def test_bad_inputs_fail_early(unet_kwargs, call_kwargs, match):
    family = unet_kwargs.pop("family", "ours")
    unet = make_unet(family, **unet_kwargs)
    calls = []
    unet.register_forward_hook(lambda *a: calls.append(1))
    pipe = pipe_of(unet, make_scheduler("ddpm"))
    with pytest.raises(ValueError, match=match):
        pipe(**{"num_inference_steps": STEPS, **call_kwargs})
    assert calls == []  # before any UNet call


def test_unet_with_other_out_channels_is_refused():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=SIZE, in_channels=1, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    with pytest.raises(ValueError, match="out_channels=3"):
        pipe_of(unet, make_scheduler("ddpm"))(num_inference_steps=STEPS)


def test_our_respacing_strings_pass_through():
    unet = make_unet("ours")
    sched = make_scheduler("ours")
    out = pipe_of(unet, sched)(batch_size=1, generator=gen(), num_inference_steps="ddim3", output_type="np").images
    assert out.shape == (1, SIZE, SIZE, 1) and len(sched.timesteps) == 3


# ------------------------------------------------------------------------------------- from_pipe, loading


def test_from_pipe_both_ways_shares_the_unet():
    unet = make_unet("ours", learned=True)
    ddpm = DDPMPipeline(unet=unet, scheduler=make_scheduler("ours", True))
    ours = GaussianDiffusionPipeline.from_pipe(ddpm)
    assert type(ours) is GaussianDiffusionPipeline and ours.unet is unet and ours.scheduler is ddpm.scheduler
    fast = GaussianDiffusionPipeline.from_pipe(ddpm, scheduler=make_scheduler("dpmsolver++", True))
    assert fast.unet is unet and isinstance(fast.scheduler, DPMSolverMultistepScheduler)
    fast.set_progress_bar_config(disable=True)
    a = fast(batch_size=1, generator=gen(), num_inference_steps=STEPS, output_type="latent").images
    b = reference_loop(unet, make_scheduler("dpmsolver++", True), "dpmsolver++", 1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    cc = ClassConditionalDDPMPipeline.from_pipe(ours)
    assert type(cc) is ClassConditionalDDPMPipeline and cc.unet is unet
    # diffusers' from_pipe casts to float32 unless told otherwise, in place on the shared UNet; ours keeps its dtype
    half = DDPMPipeline(unet=make_unet("ours").to(torch.bfloat16), scheduler=make_scheduler("ours"))
    kept = GaussianDiffusionPipeline.from_pipe(half)
    assert kept.unet is half.unet and half.unet.dtype == torch.bfloat16
    assert GaussianDiffusionPipeline.from_pipe(half, dtype=torch.float32).unet.dtype == torch.float32


def test_ddim_pipeline_from_pipe_needs_the_unet_passed():
    """diffusers' from_pipe only takes over a model whose exact class is in DDIMPipeline's type hints
    (UNet2DModel), so our UNet must be passed explicitly; the result equals our pipeline with DDIMScheduler."""
    unet = make_unet("ours")
    ours = pipe_of(unet, make_scheduler("ours"))
    with pytest.raises(ValueError, match="expected"):
        DDIMPipeline.from_pipe(ours)
    ddim = DDIMPipeline.from_pipe(ours, unet=ours.unet)
    ddim.set_progress_bar_config(disable=True)
    assert ddim.unet is unet and isinstance(ddim.scheduler, DDIMScheduler)
    a = ddim(batch_size=2, generator=gen(), num_inference_steps=STEPS, output_type="np").images
    ours_ddim = GaussianDiffusionPipeline.from_pipe(ours, scheduler=DDIMScheduler.from_config(ours.scheduler.config))
    ours_ddim.set_progress_bar_config(disable=True)
    b = ours_ddim(batch_size=2, generator=gen(), num_inference_steps=STEPS, output_type="np").images
    np.testing.assert_array_equal(a, b)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load_messages(folder):
    handler = _Records()
    logger = logging.getLogger("diffusers")  # diffusers' loggers do not propagate to the root logger
    logger.addHandler(handler)
    try:
        pipe = DiffusionPipeline.from_pretrained(folder)
    finally:
        logger.removeHandler(handler)
    return pipe, handler.messages


def test_save_and_load_with_plain_diffusion_pipeline_without_type_warnings(tmp_path):
    for cls, unet in ((GaussianDiffusionPipeline, make_unet("ours", learned=True)),
                      (ClassConditionalDDPMPipeline, make_unet("ours", num_class_embeds=3))):
        pipe = pipe_of(unet, make_scheduler("ours", unet.config.out_channels == 2), cls)
        pipe.save_pretrained(tmp_path / cls.__name__)
        index = json.loads((tmp_path / cls.__name__ / "model_index.json").read_text())
        assert index["_class_name"] == cls.__name__
        loaded, messages = _load_messages(tmp_path / cls.__name__)
        assert type(loaded) is cls and type(loaded.unet) is DDPMUNet2DModel
        assert not [m for m in messages if "Expected types" in m], messages
        loaded.set_progress_bar_config(disable=True)
        kw = dict(batch_size=2, num_inference_steps=STEPS, output_type="np")
        np.testing.assert_array_equal(loaded(generator=gen(), **kw).images, pipe(generator=gen(), **kw).images)
    # the check above can fail: diffusers' DDPMPipeline does warn about our UNet
    DDPMPipeline(unet=make_unet("ours"), scheduler=make_scheduler("ours")).save_pretrained(tmp_path / "ddpm")
    _, messages = _load_messages(tmp_path / "ddpm")
    assert any("Expected types for unet" in m for m in messages)


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "saved_c44c80e")
FRESH = textwrap.dedent(
    """
    import json, sys, numpy as np, torch
    torch.set_num_threads(1)
    import diffusers_ddpm_ext  # the only import of ours: registers components and pipelines
    from diffusers import DiffusionPipeline
    out = {}
    for key, folder in (("fixture", sys.argv[1]), ("new", sys.argv[2])):
        pipe = DiffusionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(class_labels=[0, 2], guidance_scale=2.0, num_inference_steps=10,
                      generator=torch.manual_seed(0), output_type="np").images
        np.save(sys.argv[3] + "/" + key + ".npy", images)
        out[key] = [type(pipe).__module__ + "." + type(pipe).__name__, type(pipe.unet).__name__]
    print(json.dumps(out))
    """
)


def test_fresh_process_plain_from_pretrained_of_class_conditional_folders(tmp_path):
    """Old-format fixture (saved by c44c80e) and a folder saved now both load with DiffusionPipeline.from_pretrained
    after a plain `import diffusers_ddpm_ext` (before: AttributeError: module diffusers has no attribute ...)."""
    new = pipe_of(make_unet("ours", num_class_embeds=3), make_scheduler("ours"), ClassConditionalDDPMPipeline)
    new.save_pretrained(tmp_path / "new")
    expected_new = new(class_labels=[0, 2], guidance_scale=2.0, num_inference_steps=10,
                       generator=torch.manual_seed(0), output_type="np").images
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", FRESH, os.path.join(FIXTURES, "class_conditional"),
                          str(tmp_path / "new"), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info == {k: ["diffusers_ddpm_ext.pipelines.ClassConditionalDDPMPipeline", "DDPMUNet2DModel"]
                    for k in ("fixture", "new")}
    np.testing.assert_allclose(np.load(tmp_path / "fixture.npy"),
                               np.load(os.path.join(FIXTURES, "class_conditional_samples.npy")), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "new.npy"), expected_new, rtol=0, atol=1e-6)


def test_registration_never_replaces_a_diffusers_class():
    import diffusers

    from diffusers_ddpm_ext import pipelines

    assert diffusers.GaussianDiffusionPipeline is GaussianDiffusionPipeline
    assert diffusers.ClassConditionalDDPMPipeline is ClassConditionalDDPMPipeline

    class DDPMPipeline(GaussianDiffusionPipeline):  # same name as a diffusers class
        pass

    pipelines._register_in_diffusers_namespace(DDPMPipeline)
    assert diffusers.DDPMPipeline is not DDPMPipeline


# ------------------------------------------------------------------------------------- closed form


class GaussianDataOracle(ModelMixin, ConfigMixin):
    """The exact noise prediction for data x0 ~ N(mean, std²) i.i.d. per pixel.

    With x_t = √ᾱ x0 + √(1-ᾱ) ε (Ho et al. 2020 eq. 4), x_t and ε are jointly Gaussian and
    E[ε | x_t] = √(1-ᾱ) (x_t - √ᾱ mean) / (ᾱ std² + 1 - ᾱ). For fractional timesteps (Euler-family spacings)
    σ(t) = √((1-ᾱ)/ᾱ) is interpolated linearly in t, as those schedulers do, and ᾱ = 1 / (1 + σ²).
    """

    @register_to_config
    def __init__(self, mean: float = 0.3, std: float = 0.2, sample_size: int = SIZE, in_channels: int = 1,
                 out_channels: int = 1, num_train_timesteps: int = 1000):
        super().__init__()
        alphas_cumprod = DDPMScheduler(num_train_timesteps=num_train_timesteps).alphas_cumprod.double()
        self.register_buffer("sigmas", ((1 - alphas_cumprod) / alphas_cumprod).sqrt(), persistent=False)

    def forward(self, sample, timestep, class_labels=None):
        t = torch.as_tensor(timestep, dtype=torch.float64).clamp(0, len(self.sigmas) - 1)
        low = t.floor().long()
        high = (low + 1).clamp(max=len(self.sigmas) - 1)
        sigma = self.sigmas[low] + (t - low) * (self.sigmas[high] - self.sigmas[low])
        abar = 1 / (1 + sigma**2)
        mean, var = self.config.mean, self.config.std**2
        eps = (1 - abar).sqrt() * (sample.double() - abar.sqrt() * mean) / (abar * var + 1 - abar)
        return UNet2DOutput(sample=eps.to(sample.dtype))


def oracle_scheduler(name):
    # beta_start / beta_end passed explicitly: keys left at their defaults are listed in `_use_default_values`, and
    # `from_config` then gives a scheduler with different defaults (Heun: 0.00085 / 0.012) its own betas.
    base = GaussianDiffusionScheduler(beta_start=0.0001, beta_end=0.02, clip_sample=False)
    return SCHEDULERS[name].from_config(base.config)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_recovers_gaussian_data_from_the_exact_noise_prediction(name):
    """Closed-form check of the whole sampler (noise scale, input scaling, steps): with the exact ε of Gaussian
    data, every scheduler must return samples with the data's mean (0.3) and standard deviation (0.2). 250 steps:
    ancestral samplers still run slightly narrow there (0.188; 0.16 at 50 steps, 0.193 at 1000), the ODE solvers
    are within 0.006."""
    pipe = pipe_of(GaussianDataOracle(), oracle_scheduler(name))
    x = pipe(batch_size=16, generator=gen(), num_inference_steps=250, output_type="latent").images  # 1024 values
    assert abs(x.mean().item() - 0.3) < 0.01 and abs(x.std().item() - 0.2) < 0.02, (x.mean(), x.std())


def test_ddpm_pipeline_gets_the_euler_family_wrong_where_ours_does_not():
    plain = DDPMPipeline(unet=GaussianDataOracle(), scheduler=oracle_scheduler("euler"))  # no init_noise_sigma,
    plain.set_progress_bar_config(disable=True)  # no scale_model_input
    theirs = plain(batch_size=16, generator=gen(), num_inference_steps=250, output_type="np").images * 2 - 1
    assert abs(float(theirs.std()) - 0.2) > 0.1 or abs(float(theirs.mean()) - 0.3) > 0.1
