"""Mixed precision (issue 28): losses and the likelihood in float32/float64 whatever the network's precision, the
GradScaler path of the training loop, `train.py --mixed_precision bf16` on the CPU (falling loss, exact resume),
the fp16 refusal without CUDA, and device-parametrised parity tests whose CUDA cases run on a GPU
(benchmarks/gpu_check.sh) and skip here.

Tolerances (u = unit roundoff: fp16 2^-11 ≈ 4.9e-4, bf16 2^-8 ≈ 3.9e-3):

* LOSS_REL_TOL: a loss of a rounded model output against the loss of the unrounded float32 output, per example.
  Rounding moves each output by at most u relative; the losses are squares (MSE, the KL's mean term) and
  exponentials of log-variances that stay exactly representable here (a log-variance L rounded changes σ² by the
  factor e^{L·u}: a property of the output's precision, not of the loss), so to first order a loss moves by at
  most 2u. 4u leaves a factor 2 (measured: ≤ 1e-4 fp16, ≤ 1e-3 bf16, the rounding errors average over pixels).
* BPD_REL_TOL: a half-precision model's bits/dim against its float32 twin's (fed the same rounded x_t, or not):
  4u of each image's bound, for the total and for every term. Not 4u of each term: a term near zero (the last
  cosine step's KL, 1e-3 bits) sees ε̂'s rounding amplified by 1/√ᾱ_t and moves ~7u of itself, 1e-5 of the bound.
  Measured ≤ 0.11u (fp16) and 0.04u (bf16) of the bound.
* UNET_REL_TOL: relative L2 error of a UNet's output under autocast against float32: 3e-2 for bf16 (as
  tests/test_unet_speed.py: ~1e-2 through a few dozen layers), 5e-3 for fp16 (8x smaller u; measured 1.7e-3).
* FP32_TOL: ours against UNet2DModel in float32 (TF32 off on CUDA): 1e-5 of max(1, max |output|) on the CPU (as
  test_unet_speed.py), 1e-4 on CUDA (cuDNN may pick different algorithms, e.g. Winograd, for the two graphs).
* SAMPLE_TOL: mean |Δ| of [0, 1] images after a 10-step chain, half-precision weights against float32: 2e-3 fp16,
  1e-2 bf16 (5x the CPU measurement, 2.8e-4 / 1.9e-3); float32 ours against DDPMPipeline: max |Δ| 1e-3.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import warnings

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from train_helpers import FAST, assert_same_checkpoint, run_train

from diffusers_ddpm_ext import likelihood
from diffusers_ddpm_ext import trainer as tr
from diffusers_ddpm_ext.convert import state_dict_from_unet2d
from diffusers_ddpm_ext.losses import (diffusion_loss, discretized_gaussian_log_likelihood, normal_kl, prior_bpd,
                                       vlb_terms)
from diffusers_ddpm_ext.pipelines import GaussianDiffusionPipeline
from diffusers_ddpm_ext.processes import LocalAccelerator
from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler
from diffusers_ddpm_ext.unet import DDPMUNet2DModel

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="needs a CUDA GPU (run by benchmarks/gpu_check.sh on a GPU machine)")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
U = {"fp16": 2.0**-11, "bf16": 2.0**-8}
LOSS_REL_TOL = {name: 4 * u for name, u in U.items()}
BPD_REL_TOL = {name: 4 * u for name, u in U.items()}
UNET_REL_TOL = {"bf16": 3e-2, "fp16": 5e-3}
FP32_TOL = {"cpu": 1e-5, "cuda": 1e-4}
SAMPLE_TOL = {"fp16": 2e-3, "bf16": 1e-2}
# Log-variance outputs, extremes included: "learned" reads log σ² (±60: e^60 overflows float16 at 65504),
# "learned_range" interpolates between log β̃ and log β with v ∈ [-1, 1] (±1.5 extrapolates beyond both).
EXTREMES = {"learned": (-60.0, -8.0, 0.0, 60.0), "learned_range": (-1.5, -1.0, 0.0, 1.0, 1.5)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / |b| elementwise."""
    return ((a.double() - b.double()).abs() / b.double().abs()).max().item()


# ---------------------------------------------------------------------------------------------------------------
# Losses: half-precision model outputs, extreme log-variances, t = 0 and t = T − 1
# ---------------------------------------------------------------------------------------------------------------


def _loss_case(variance_type, seed=0, batch=3):
    scheduler = GaussianDiffusionScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                           variance_type=variance_type)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 256, (batch, 3, 4, 4), generator=g) / 127.5 - 1.0  # on the 8-bit grid
    noise = torch.randn(x0.shape, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    return scheduler, x0, noise, eps


@pytest.mark.parametrize("half", list(HALF))
@pytest.mark.parametrize("variance_type", list(EXTREMES))
def test_half_model_outputs_give_float32_losses_equal_to_the_float32_computation(half, variance_type):
    dtype = HALF[half]
    scheduler, x0, noise, eps = _loss_case(variance_type)
    for t_value in (0, 1, 500, 999):
        t = torch.full((x0.shape[0],), t_value)
        noisy = scheduler.add_noise(x0, noise, t)
        for v in EXTREMES[variance_type]:
            out32 = torch.cat([eps, torch.full_like(eps, v)], dim=1)
            out_half = out32.to(dtype)
            where = f"{half} {variance_type} t={t_value} v={v}"
            for loss_type in ("hybrid", "kl"):
                low = diffusion_loss(out_half, x0, noise, t, scheduler, loss_type=loss_type, noisy_samples=noisy)
                same = diffusion_loss(out_half.float(), x0, noise, t, scheduler, loss_type=loss_type,
                                      noisy_samples=noisy)
                ref = diffusion_loss(out32, x0, noise, t, scheduler, loss_type=loss_type, noisy_samples=noisy)
                assert low.loss.dtype == low.vlb.dtype == low.mse.dtype == torch.float32, where
                assert torch.isfinite(low.loss).all() and torch.isfinite(low.vlb).all(), where
                # upcast at the boundary: exactly the float32 computation of the same (rounded) values ...
                assert torch.equal(low.loss, same.loss) and torch.equal(low.vlb, same.vlb), where
                # ... within the rounding of the output of the unrounded one
                assert rel_err(low.loss, ref.loss) <= LOSS_REL_TOL[half], (where, loss_type)
                assert rel_err(low.vlb, ref.vlb) <= LOSS_REL_TOL[half], (where, loss_type)
            # vlb_terms called directly with every input in half precision (x_0 and x_t too): float32, finite, and
            # the float32 computation of the same values (before the upcast: NaN at v = -60, inf at t = 999)
            terms = vlb_terms(out_half, x0.to(dtype), noisy.to(dtype), t, scheduler)
            assert terms.dtype == torch.float32 and torch.isfinite(terms).all(), where
            assert torch.equal(terms, vlb_terms(out_half.float(), x0.to(dtype).float(), noisy.to(dtype).float(), t,
                                                scheduler)), where


def test_losses_are_the_same_inside_an_autocast_region():
    """The training step computes the loss outside autocast, but a caller may not: nothing in the loss is lowered."""
    scheduler, x0, noise, eps = _loss_case("learned_range")
    t = torch.tensor([0, 7, 999])
    out = torch.cat([eps, torch.full_like(eps, 0.3)], dim=1).bfloat16()
    outside = diffusion_loss(out, x0, noise, t, scheduler, loss_type="hybrid")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = diffusion_loss(out, x0, noise, t, scheduler, loss_type="hybrid")
    assert inside.vlb.dtype == inside.loss.dtype == torch.float32
    assert torch.equal(inside.loss, outside.loss) and torch.equal(inside.vlb, outside.vlb)


@pytest.mark.parametrize("half", list(HALF))
def test_normal_kl_and_prior_upcast_half_inputs(half):
    dtype = HALF[half]
    g = torch.Generator().manual_seed(3)
    m1, m2 = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    lv1 = torch.full((2, 8), -3.0)
    for lv2 in (-60.0, -11.0, 0.0, 60.0):  # exp(-logvar2) = e^60 is inf in float16
        args = (m1.to(dtype), lv1.to(dtype), m2.to(dtype), torch.full((2, 8), lv2, dtype=dtype))
        kl = normal_kl(*args)
        assert kl.dtype == torch.float32 and torch.isfinite(kl).all()
        assert torch.equal(kl, normal_kl(*(a.float() for a in args)))
    scheduler = GaussianDiffusionScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    x0 = torch.rand(2, 1, 4, 4, generator=g) * 2 - 1
    prior = prior_bpd(x0.to(dtype), scheduler)
    assert prior.dtype == torch.float32 and torch.equal(prior, prior_bpd(x0.to(dtype).float(), scheduler))


def test_decoder_likelihood_of_a_bin_much_narrower_than_sigma():
    """A huge predicted variance (learned log σ² up to +60) makes each bin a sliver of the Gaussian: Φ(b) − Φ(a)
    cancels to 0 in float32, which gave a clamped value (−69 nats instead of −35.8 at log σ = 30) and no gradient.
    The narrow-bin branch integrates the density instead: exact to float32/float64 against mpmath, gradient −1."""
    import mpmath  # installed with torch (torch -> sympy -> mpmath)
    mpmath.mp.dps = 50
    n = 256
    h = 1.0 / (n - 1)
    levels = torch.linspace(-1, 1, n, dtype=torch.float64)
    for log_scale in (1.0, 4.0, 10.0, 30.0):
        for mean in (0.0, 0.37, -0.9):
            index = torch.tensor([1, 77, 128, 254])  # interior bins
            for dtype in (torch.float32, torch.float64):
                x = levels[index].to(dtype)
                got = discretized_gaussian_log_likelihood(x, torch.tensor(mean, dtype=dtype),
                                                          torch.tensor(log_scale, dtype=dtype), n)
                s = mpmath.exp(log_scale)
                for xi, gi in zip(x.double().tolist(), got.double().tolist()):
                    exact = float(mpmath.log(mpmath.ncdf((xi - mean + h) / s) - mpmath.ncdf((xi - mean - h) / s)))
                    assert gi == pytest.approx(exact, rel=1e-6, abs=1e-6), (log_scale, mean, xi, dtype)
    log_scale = torch.tensor(30.0, requires_grad=True)
    discretized_gaussian_log_likelihood(torch.tensor([0.2]), torch.tensor(0.0), log_scale, n).sum().backward()
    assert log_scale.grad.item() == pytest.approx(-1.0, abs=1e-4)  # p ∝ 1/σ: d log p / d log σ = −1
    # still a distribution over the levels (edge bins to ±∞), here in float64
    probs = discretized_gaussian_log_likelihood(levels, torch.tensor(0.1, dtype=torch.float64),
                                                torch.tensor(10.0, dtype=torch.float64), n).exp()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Likelihood: a half-precision model gives the float32 model's bits/dim
# ---------------------------------------------------------------------------------------------------------------


class StubModel(torch.nn.Module):
    """ε̂ = a·x_t + b·t/T computed in the parameters' dtype, and a constant variance channel: a model whose
    half-precision twin differs only by rounding. ``input_dtype`` rounds x_t as a half-precision model's input is
    rounded (bits_per_dim passes x_t in the model's dtype), so that a float32 twin sees the very same input."""

    def __init__(self, dtype, variance_value, num_train_timesteps, input_dtype=None):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.7, dtype=dtype))
        self.b = torch.nn.Parameter(torch.tensor(0.3, dtype=dtype))
        self.v, self.T, self.input_dtype = variance_value, num_train_timesteps, input_dtype

    def forward(self, x, t):
        if self.input_dtype is not None:
            x = x.to(self.input_dtype).to(x.dtype)
        eps = self.a * x + self.b * (t.to(x.dtype) / self.T).view(-1, 1, 1, 1)
        return torch.cat([eps, torch.full_like(eps, self.v)], dim=1)


@pytest.mark.parametrize("half", list(HALF))
@pytest.mark.parametrize("variance_type", list(EXTREMES))
def test_bits_per_dim_of_a_half_precision_model_equal_the_float32_models(half, variance_type, monkeypatch):
    T = 50
    scheduler = GaussianDiffusionScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2",
                                           variance_type=variance_type)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 1, 4, 4), generator=g) / 127.5 - 1.0
    seen = []
    real_vlb_terms = likelihood.vlb_terms

    def spy(model_output, original, noisy, *args, **kwargs):
        out = real_vlb_terms(model_output, original, noisy, *args, **kwargs)
        seen.append((model_output.dtype, original.dtype, noisy.dtype, out.dtype))
        return out

    monkeypatch.setattr(likelihood, "vlb_terms", spy)
    for v in EXTREMES[variance_type]:
        results = {}
        for name, model in (("fp32", StubModel(torch.float32, v, T, input_dtype=HALF[half])),
                            ("fp32 unrounded input", StubModel(torch.float32, v, T)),
                            (half, StubModel(HALF[half], v, T))):
            results[name] = likelihood.bits_per_dim(model, scheduler, images, progress=False,
                                                    generator=torch.Generator().manual_seed(1))
        low, ref = results[half], results["fp32"]
        assert torch.isfinite(low.terms_bpd).all() and torch.isfinite(low.bits_per_dim).all(), v
        assert low.terms_bpd.shape == (2, T)  # t = 0 (decoder) … T − 1, every term
        assert rel_err(low.bits_per_dim, ref.bits_per_dim) <= BPD_REL_TOL[half], v
        term_error = (low.terms_bpd.double() - ref.terms_bpd.double()).abs().max(dim=1).values
        assert (term_error / ref.bits_per_dim.double().abs()).max().item() <= BPD_REL_TOL[half], v
        assert rel_err(low.bits_per_dim, results["fp32 unrounded input"].bits_per_dim) <= BPD_REL_TOL[half], v
    assert seen and all(s == (torch.float64,) * 4 for s in seen)  # every term in float64, whatever the model


def test_bits_per_dim_under_autocast_is_computed_in_float64(monkeypatch):
    T = 20
    scheduler = GaussianDiffusionScheduler(num_train_timesteps=T, variance_type="learned_range")
    unet = _tiny_ours(in_channels=1, out_channels=2, seed=2).eval()
    images = torch.randint(0, 17, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0)) / 8.0 - 1.0
    seen = []
    real_vlb_terms = likelihood.vlb_terms

    def spy(model_output, original, noisy, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), model_output.dtype))
        return real_vlb_terms(model_output, original, noisy, *args, **kwargs)

    monkeypatch.setattr(likelihood, "vlb_terms", spy)
    kwargs = dict(num_levels=17, progress=False)
    ref = likelihood.bits_per_dim(unet, scheduler, images, generator=torch.Generator().manual_seed(1), **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = likelihood.bits_per_dim(unet, scheduler, images, generator=torch.Generator().manual_seed(1), **kwargs)
    assert (True, torch.float64) in seen  # the terms ran inside autocast, in float64
    assert torch.isfinite(low.bits_per_dim).all() and low.bits_per_dim.dtype == torch.float32
    assert not torch.equal(low.terms_bpd, ref.terms_bpd)  # the network really ran in bf16 ...
    # ... and only its output's precision shows: relative to the float32 model's error (the KL's mean term)
    assert rel_err(low.bits_per_dim, ref.bits_per_dim) <= 2 * UNET_REL_TOL["bf16"]


# ---------------------------------------------------------------------------------------------------------------
# The GradScaler path of Trainer.train_step (accelerate's fp16 recipe, emulated on the CPU)
# ---------------------------------------------------------------------------------------------------------------


def _tiny_ours(in_channels=1, out_channels=2, seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(sample_size=8, in_channels=in_channels, out_channels=out_channels, block_out_channels=(8, 8),
                  layers_per_block=1, attention_resolutions=(), add_attention=False, norm_num_groups=4, dropout=0.0)
    return DDPMUNet2DModel(**{**config, **overrides})


def _batches(count, seed=7):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(4, 1, 8, 8, generator=generator) * 2 - 1 for _ in range(count)]


@contextlib.contextmanager
def fp16_accelerator(**scaler_kwargs):
    """An `accelerate.Accelerator` doing what `mixed_precision="fp16"` does on a GPU, on the CPU: float16 autocast
    of the prepared model and a `torch.amp.GradScaler` (accelerate leaves both out on the CPU, where the training
    script refuses fp16). The scaler is installed before `prepare`, so the optimizer steps through it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    try:
        scaler = torch.amp.GradScaler("cpu", **scaler_kwargs)
    except (RuntimeError, ValueError, TypeError) as exc:
        pytest.skip(f"this torch has no GradScaler for the CPU: {exc}")
    try:
        accelerator = Accelerator(cpu=True, mixed_precision="fp16")
        accelerator.scaler, accelerator.native_amp = scaler, True
        yield accelerator
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _trainer(accelerator=None, **config):
    config = {"loss_type": "hybrid", "lr_warmup_steps": 0, "timestep_sampler": "loss-second-moment", **config}
    scheduler = GaussianDiffusionScheduler(num_train_timesteps=10, variance_type="learned_range")
    return tr.Trainer(_tiny_ours(), scheduler, tr.TrainConfig(**config), max_train_steps=30, accelerator=accelerator,
                      generator=torch.Generator().manual_seed(1))


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}


def _inf_gradient_hook(trainer, times):
    """Make the gradient of the last layer's bias infinite in the next ``times`` backward passes."""
    left = [times]

    def hook(grad):
        if left[0] > 0:
            left[0] -= 1
            return grad * float("inf")
        return grad

    trainer.unwrapped.conv_out.bias.register_hook(hook)


@pytest.mark.parametrize("nan_policy", ["stop", "skip"])
def test_grad_scaler_skips_an_overflowing_step_whatever_the_nan_policy(nan_policy):
    """A real float16 overflow in backward (loss scale 2^40): the scaler skips the update and lowers its scale; the
    trainer counts a skipped step (no LR, EMA or sampler step; the PyTorch 'lr_scheduler.step() before
    optimizer.step()' warning was the symptom) and the next step trains, under either NaN policy."""
    with fp16_accelerator(init_scale=2.0**40, backoff_factor=2.0**-24) as acc:
        trainer = _trainer(acc, nan_policy=nan_policy)
        dtypes = []
        trainer.unwrapped.conv_out.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
        before = _weights(trainer)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = trainer.train_step(_batches(1)[0])
        assert dtypes == [torch.float16]  # the network ran under float16 autocast
        assert first.skipped and first.step == 0 and trainer.optimizer.step_was_skipped
        assert trainer.state.global_step == 0 and trainer.state.skipped_steps == 1
        assert all(torch.equal(before[k], v) for k, v in _weights(trainer).items())
        assert not trainer.optimizer.state  # AdamW never stepped
        assert trainer.lr_scheduler.last_epoch == 0 and trainer.ema.optimization_step == 0
        assert int(trainer.timestep_sampler.loss_counts.sum()) == 0
        assert acc.scaler.get_scale() == 2.0**16
        assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]

        second = trainer.train_step(_batches(1, seed=8)[0])
        assert not second.skipped and second.step == 1 and math.isfinite(second.logs["grad_norm"])
        assert any(not torch.equal(before[k], v) for k, v in _weights(trainer).items())
        assert trainer.lr_scheduler.last_epoch == 1 and trainer.ema.optimization_step == 1
        assert acc.scaler.get_scale() == 2.0**16 and trainer.state.skipped_steps == 1


@pytest.mark.parametrize("nan_policy", ["stop", "skip"])
@pytest.mark.parametrize("with_scaler", [True, False])
def test_an_inf_gradient_is_the_scalers_with_one_and_the_nan_policys_without(with_scaler, nan_policy, tmp_path):
    """`train_step` consults `acc.scaler` for the gradient-norm check: with a scaler an inf gradient is an overflow
    it handles (skipped step, no error, even with --nan_policy stop); without one the NaN policy decides."""
    context = fp16_accelerator() if with_scaler else contextlib.nullcontext(None)
    with context as acc:
        trainer = _trainer(acc, nan_policy=nan_policy)
        trainer.output_dir = str(tmp_path)
        assert (trainer.accelerator.scaler is not None) == with_scaler
        if not with_scaler:
            assert isinstance(trainer.accelerator, LocalAccelerator)
        trainer.train_step(_batches(1)[0])  # a good step: checkpoint-1 is the last good state
        before = _weights(trainer)
        _inf_gradient_hook(trainer, times=1)
        if nan_policy == "stop" and not with_scaler:
            with pytest.raises(tr.NonFiniteLossError,
                               match="non-finite gradient norm at optimizer step 2.*checkpoint-1"):
                trainer.train_step(_batches(1, seed=8)[0])
            return
        out = trainer.train_step(_batches(1, seed=8)[0])
        assert out.skipped and trainer.state.global_step == 1 and trainer.state.skipped_steps == 1
        assert all(torch.equal(before[k], v) for k, v in _weights(trainer).items())
        assert trainer.lr_scheduler.last_epoch == 1
        if with_scaler:
            assert acc.scaler.get_scale() == 2.0**15  # backed off once
        assert not trainer.train_step(_batches(1, seed=9)[0]).skipped and trainer.state.global_step == 2


@pytest.mark.parametrize("nan_policy", ["stop", "skip"])
def test_a_non_finite_loss_is_the_nan_policys_even_with_a_scaler(nan_policy):
    """The scaler only sees gradients: a NaN loss is caught before backward and handled by the NaN policy."""
    with fp16_accelerator() as acc:
        trainer = _trainer(acc, nan_policy=nan_policy, debug_nan_at_step=1)
        if nan_policy == "stop":
            with pytest.raises(tr.NonFiniteLossError, match=r"non-finite loss \(nan\) at optimizer step 1"):
                trainer.train_step(_batches(1)[0])
        else:
            assert trainer.train_step(_batches(1)[0]).skipped and trainer.state.skipped_steps == 1
        assert acc.scaler.get_scale() == 2.0**16  # never reached the scaler


def test_consecutive_scaler_skips_give_up():
    """Overflow on every step (a diverged model, not a scale to calibrate): after MAX_CONSECUTIVE_SKIPS in a row
    the run stops with NonFiniteLossError, as --nan_policy skip does, instead of halving the scale forever."""
    with fp16_accelerator() as acc:
        trainer = _trainer(acc, nan_policy="stop")
        _inf_gradient_hook(trainer, times=10**6)
        data = _batches(1)[0]
        for _ in range(tr.MAX_CONSECUTIVE_SKIPS - 1):
            assert trainer.train_step(data).skipped
        with pytest.raises(tr.NonFiniteLossError, match=f"{tr.MAX_CONSECUTIVE_SKIPS} consecutive non-finite"):
            trainer.train_step(data)
        assert acc.scaler.get_scale() == 2.0 ** (16 - tr.MAX_CONSECUTIVE_SKIPS)


# ---------------------------------------------------------------------------------------------------------------
# train.py --mixed_precision
# ---------------------------------------------------------------------------------------------------------------

# The default recipe (hybrid loss, learned_range variance, cosine schedule, EMA) on 8x8 digits with T = 50.
BF16_RUN = [*FAST, "--resolution", 8, "--ddpm_num_steps", 50, "--mixed_precision", "bf16", "--max_train_steps", 24,
            "--checkpointing_steps", 12, "--checkpoints_total_limit", 3]


def test_train_bf16_on_the_cpu_falls_and_resumes_bit_identically(tmp_path, monkeypatch):
    records = {"forward": [], "loss": [], "likelihood": []}
    real_forward, real_loss, real_vlb_terms = DDPMUNet2DModel.forward, tr.diffusion_loss, likelihood.vlb_terms

    @functools.wraps(real_forward)  # keeps the signature the pipelines inspect
    def forward(self, sample, timestep, *args, **kwargs):
        out = real_forward(self, sample, timestep, *args, **kwargs)
        records["forward"].append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                                   out.sample.dtype))
        return out

    def loss(model_output, *args, **kwargs):
        out = real_loss(model_output, *args, **kwargs)
        records["loss"].append((model_output.dtype, out.loss.dtype, out.vlb.dtype))
        return out

    def vlb(model_output, original, noisy, *args, **kwargs):
        out = real_vlb_terms(model_output, original, noisy, *args, **kwargs)
        records["likelihood"].append((model_output.dtype, out.dtype))
        return out

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # accelerate's CPU autocast, on a GPU machine too
    monkeypatch.setattr(DDPMUNet2DModel, "forward", forward)
    monkeypatch.setattr(tr, "diffusion_loss", loss)
    monkeypatch.setattr(likelihood, "vlb_terms", vlb)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    metrics = run_train("--output_dir", straight, *BF16_RUN)

    # the network trained in bf16 (accelerate's CPU autocast); the loss and VLB in float32; the likelihood in float64
    assert records["forward"][0] == (True, torch.bfloat16, torch.bfloat16)
    assert records["loss"] and set(records["loss"]) == {(torch.float32,) * 3}
    assert records["likelihood"] and set(records["likelihood"]) == {(torch.float64,) * 2}
    state = json.loads((straight / "checkpoint-24" / "training_state.json").read_text())
    losses = state["losses"]
    assert len(losses) == 24 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-8:]) / 8 < 0.75 * sum(losses[:4]) / 4, losses  # falling
    assert state["flags"]["mixed_precision"] == "bf16" and state["skipped_steps"] == 0
    assert math.isfinite(metrics["bits_per_dim"]) and math.isfinite(metrics["bits_per_dim_unclipped"])

    with pytest.raises(tr.SimulatedInterrupt):
        run_train("--output_dir", resumed, *BF16_RUN, "--debug_interrupt_after_step", 12)
    assert (resumed / "checkpoint-12").is_dir() and not (resumed / "checkpoint-24").exists()
    again = run_train("--output_dir", resumed, *BF16_RUN, "--resume_from_checkpoint", "latest")
    assert_same_checkpoint(straight / "checkpoint-24", resumed / "checkpoint-24")
    assert again["bits_per_dim"] == metrics["bits_per_dim"]


def test_fp16_without_cuda_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from diffusers_ddpm_ext.processes import run_cli

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # the machine without CUDA, on a GPU machine too
    out = tmp_path / "fp16"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: run_train("--output_dir", out, *FAST, "--max_train_steps", 2, "--mixed_precision", "fp16"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "error: --mixed_precision fp16 needs a GPU; on CPU use bf16 or no", err
    assert "Traceback" not in err and err.count("fp16") == 1 and not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# Device-parametrised parity (CUDA cases: benchmarks/gpu_check.sh)
# ---------------------------------------------------------------------------------------------------------------

UNET2D_CONFIG = dict(sample_size=8, in_channels=3, out_channels=6, block_out_channels=(16, 32), layers_per_block=1,
                     down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                     norm_num_groups=4, attention_head_dim=8, resnet_time_scale_shift="scale_shift")


@pytest.fixture
def strict_fp32():
    """float32 means float32: TF32 off on CUDA (PyTorch lets cuDNN convolutions use TF32 by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _pair(device, out_channels=6, seed=0):
    """UNet2DModel with every weight perturbed (zero-initialised layers too) and ours converted from it."""
    torch.manual_seed(seed)
    theirs = UNet2DModel(**{**UNET2D_CONFIG, "out_channels": out_channels})
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = DDPMUNet2DModel.from_unet2d(theirs)
    return theirs.to(device).eval(), ours.to(device).eval()


@pytest.mark.parametrize("device", DEVICES)
def test_unet_parity_with_unet2d_on_device(device, strict_fp32):
    theirs, ours = _pair(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g).to(device)
    t = torch.tensor([0, 999], device=device)
    with torch.no_grad():
        ref, got = theirs(x, t).sample, ours(x, t).sample
    scale = max(1.0, ref.abs().max().item())
    assert (got - ref).abs().max().item() <= FP32_TOL[device] * scale
    # gradients in float32 (training mode, dropout 0)
    theirs.train(), ours.train()
    theirs(x, t).sample.square().mean().backward()
    ours(x, t).sample.square().mean().backward()
    grads = state_dict_from_unet2d({name: p.grad for name, p in theirs.named_parameters()})
    for name, q in ours.named_parameters():
        g = grads[name]
        assert (q.grad - g).abs().max().item() <= 10 * FP32_TOL[device] * max(1.0, g.abs().max().item()), name
    theirs.eval(), ours.eval()
    for half, dtype in HALF.items():
        with torch.no_grad(), torch.autocast(device, dtype=dtype):
            low, low_theirs = ours(x, t).sample, theirs(x, t).sample
        assert low.dtype == dtype and torch.isfinite(low).all()
        error = ((low.float() - ref).norm() / ref.norm()).item()
        assert 0 < error <= UNET_REL_TOL[half], (half, error)  # > 0: the half-precision kernels really ran
        assert ((low.float() - low_theirs.float()).norm() / ref.norm()).item() <= UNET_REL_TOL[half], half


@pytest.mark.parametrize("device", DEVICES)
def test_scheduler_steps_on_device(device):
    """Our step against DDPMScheduler's on the device in float32 (a 20-step chain), and a float16/bf16 sample through
    the same chain: computed in float32 inside, returned in the sample's dtype, within the half tolerance."""
    config = dict(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small", clip_sample=True)
    ours, ref = GaussianDiffusionScheduler(**config), DDPMScheduler(**config)
    for s in (ours, ref):
        s.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g).to(device)
    weight = (torch.randn(3, 3, generator=g) * 0.5).to(device)

    def model(sample, t):  # a fixed smooth function of (x_t, t)
        return torch.tanh(torch.einsum("oc,bchw->bohw", weight, sample.float()) + t / 1000.0)

    chains = {"ours": x.clone(), "ref": x.clone(), **{half: x.to(dtype) for half, dtype in HALF.items()}}
    generators = {name: torch.Generator().manual_seed(1) for name in chains}
    for t in ours.timesteps:
        for name, sample in chains.items():
            scheduler = ref if name == "ref" else ours
            out = model(sample, t).to(sample.dtype)
            chains[name] = scheduler.step(out, t, sample, generator=generators[name]).prev_sample
            assert chains[name].dtype == sample.dtype and chains[name].device.type == device
    assert (chains["ours"] - chains["ref"]).abs().max().item() <= 1e-5
    for half in HALF:
        assert torch.isfinite(chains[half]).all()
        assert (chains[half].float() - chains["ours"]).abs().mean().item() <= SAMPLE_TOL[half] * 2, half


@pytest.mark.parametrize("device", DEVICES)
def test_pipelines_on_device(device, strict_fp32):
    """GaussianDiffusionPipeline (ours) against DDPMPipeline with the UNet2DModel it was converted from, same noise;
    then ours with half-precision weights against its float32 images."""
    config = dict(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small", clip_sample=True)
    theirs, ours = _pair(device, out_channels=3, seed=1)
    pipes = {"ours": GaussianDiffusionPipeline(unet=ours, scheduler=GaussianDiffusionScheduler(**config)),
             "ref": DDPMPipeline(unet=theirs, scheduler=DDPMScheduler(**config))}
    images = {}
    for name, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)
        images[name] = pipe(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                            output_type="np").images
    assert abs(images["ours"] - images["ref"]).max() <= 1e-3
    for half, dtype in HALF.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = GaussianDiffusionPipeline(unet=copy.deepcopy(ours).to(dtype),
                                             scheduler=GaussianDiffusionScheduler(**config))
        pipe.set_progress_bar_config(disable=True)
        low = pipe(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                   output_type="np").images
        assert low.shape == images["ours"].shape and (low == low).all()
        assert abs(low - images["ours"]).mean() <= SAMPLE_TOL[half], half


@pytest.mark.parametrize("device", DEVICES)
def test_likelihood_on_device(device, strict_fp32):
    """bits/dim on the device equal the CPU's (same noise: a CPU generator), and a half-precision copy of the model
    gives them within BPD_REL_TOL · the model's own output error (its input and every layer are rounded)."""
    T = 20
    scheduler = GaussianDiffusionScheduler(num_train_timesteps=T, variance_type="learned_range")
    cpu_unet = _tiny_ours(in_channels=1, out_channels=2, seed=3).eval()
    images = torch.randint(0, 17, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0)) / 8.0 - 1.0
    kwargs = dict(num_levels=17, progress=False)

    def bpd(unet, imgs):
        return likelihood.bits_per_dim(unet, scheduler, imgs, generator=torch.Generator().manual_seed(1), **kwargs)

    ref = bpd(cpu_unet, images)
    unet = copy.deepcopy(cpu_unet).to(device)
    on_device = bpd(unet, images.to(device))
    assert rel_err(on_device.bits_per_dim, ref.bits_per_dim) <= 1e-4
    for half, dtype in HALF.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            low = bpd(copy.deepcopy(unet).to(dtype), images.to(device))
        assert torch.isfinite(low.terms_bpd).all(), half
        assert rel_err(low.bits_per_dim, ref.bits_per_dim) <= 2 * UNET_REL_TOL[half], half
