"""Property-based fuzz of `DDPMUNet2DModel` and `GaussianDiffusionScheduler` configurations.

Property: every configuration either builds and runs (a forward pass for the UNet, a reverse step for the
scheduler, with finite outputs of the right shape), or fails *at construction* with a ValueError / TypeError
whose message names a field that was changed. No other exception type (RuntimeError from inside torch,
IndexError, ZeroDivisionError, KeyError, ...) may escape.

Configurations start from a tiny valid one and replace a few fields with values drawn from a pool of valid
values and a pool of bad ones (wrong types, negatives, zeros, empty or mismatched lists, unknown strings, None,
huge group counts, floats where ints go, NaN). Hypothesis runs derandomized (fixed examples, no database), so
the case counts printed below are the same on every run.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler
from diffusers_ddpm_ext.unet import DDPMUNet2DModel

UNET_EXAMPLES = 600
SCHEDULER_EXAMPLES = 800
NAN, INF = float("nan"), float("inf")
FUZZ_SETTINGS = dict(derandomize=True, deadline=None, database=None, print_blob=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ----------------------------------------------------------------------------------------------------------
# UNet
# ----------------------------------------------------------------------------------------------------------

UNET_BASE = dict(sample_size=8, in_channels=1, block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2,
                 attention_resolutions=(4,), dropout=0.0)

BOOL_BAD = [None, "yes", "no", 1, 0.0, [True]]
# field -> (valid values, bad values). Valid values are valid alone; combinations may still be inconsistent
# (e.g. groups not dividing channels), which must then be reported as a ValueError naming a changed field.
UNET_POOLS = {
    "sample_size": ([8, 16, 4, (8, 16), [8, 8], None],
                    [0, -8, 7, 8.0, "8", (8,), (8, 8, 8), True, [], (8, None), (0, 8), float("nan")]),
    "in_channels": ([1, 2, 3], [0, -1, 1.0, "3", None, True, [1]]),
    "out_channels": ([None, 1, 2, 6], [0, -2, 2.5, "x", False, [2]]),
    "center_input_sample": ([True, False], BOOL_BAD),
    "block_out_channels": ([(4, 8), [8], (4, 8, 8), (2, 4, 4), [6, 6]],
                           [(), [], (0, 8), (-4, 8), (4.0, 8), None, "48", (4, None), 8, (True, 8), ("4", 8),
                            {4: 8}]),
    "layers_per_block": ([1, 2], [0, -1, 1.5, None, "2", True, [1]]),
    "flip_sin_to_cos": ([True, False], BOOL_BAD),
    "freq_shift": ([0, 1, 0.5, -1.0], [2, 4, NAN, INF, None, "1", [0]]),
    "time_embedding_dim": ([None, 8, 12], [0, -4, 2.5, "16", True, [8]]),
    "time_embedding_act_fn": (["silu", "relu", "gelu", "mish", "swish"], ["tanh", "", None, ["silu"], "SiLU", 1]),
    "act_fn": (["silu", "relu", "gelu", "mish", "swish"], ["tanh", "", None, ["silu"], {"silu"}, 0]),
    "resnet_skip_time_act": ([True, False], BOOL_BAD),
    "resnet_time_scale_shift": (["default", "scale_shift"], ["film", None, "", ["default"], 1]),
    "norm_num_groups": ([1, 2, 4], [0, -2, 10**6, 2.0, None, True, "2", [2]]),
    "norm_eps": ([1e-5, 1e-6, 1], [0.0, -1e-5, NAN, INF, "1e-5", None, [1e-5]]),
    "dropout": ([0.0, 0.1, 0.5, 0], [1.0, -0.1, NAN, None, "0.1", [0.1], True]),
    "attention_resolutions": ([(), (4,), [8, 4], (8,), None],
                              [(3,), (4.0,), ("4",), 4, (-4,), (None,), "4", (True,), [[4]], (4.5,)]),
    "add_attention": ([True, False], BOOL_BAD),
    "attention_head_dim": ([None, 2, 4, 1], [0, -2, 3, 2.0, "4", True, [2], 10**9]),
    "num_attention_heads": ([None, 1, 2], [0, -1, 3, 1.5, "2", True, [1], 10**9]),
    "mid_attention_norm": ([True, False], BOOL_BAD),
    "attn_norm_num_groups": ([None, 1, 2], [0, -1, 10**6, 2.5, "2", True, [1]]),
    "mid_block_scale_factor": ([1.0, 2.0, 0.5, 1], [0.0, -1.0, NAN, INF, None, "1", [1.0]]),
    "downsample_type": (["conv", "avg_pool"], ["pool", None, ["conv"], "", 1]),
    "downsample_padding": ([0, 1], [2, -1, 1.0, None, True, "1", [1]]),
    "upsample_type": (["conv", "nearest", "conv_transpose"], ["bilinear", None, ["conv"], "", 0]),
    "zero_init_residual": ([True, False], BOOL_BAD),
    "num_class_embeds": ([None, 3, 1], [0, -1, 2.5, "10", True, [3]]),
    "not_a_config_key": ([], [1, None]),
}



@st.composite
def unet_configs(draw):
    fields = draw(st.lists(st.sampled_from(sorted(UNET_POOLS)), min_size=1, max_size=5, unique=True))
    config, changed, bad = dict(UNET_BASE), [], False
    for name in fields:
        good, wrong = UNET_POOLS[name]
        use_bad = not good or draw(st.integers(0, 2)) == 0  # about one field in three gets a bad value
        value = draw(st.sampled_from(wrong if use_bad else good))
        config[name] = value
        changed.append(name)
        bad |= use_bad
    return config, changed, bad


def _unet_forward(model: DDPMUNet2DModel, config: dict) -> None:
    size = config.get("sample_size", 8)
    hw = (8, 8) if size is None else ((int(size), int(size)) if np.ndim(size) == 0 else tuple(int(s) for s in size))
    in_ch = model.config.in_channels
    x = torch.randn(2, in_ch, *hw)
    labels = None
    if model.config.num_class_embeds:
        labels = torch.tensor([0, model.config.num_class_embeds])  # a real class and the null class
    out = model(x, torch.tensor([0, 999]), class_labels=labels).sample
    assert out.shape == (2, model.config.out_channels, *hw), out.shape
    assert torch.isfinite(out).all(), "non-finite UNet output"
    # The stored config must rebuild the same architecture (what from_pretrained does).
    clone = DDPMUNet2DModel.from_config(model.config)
    assert sum(p.numel() for p in clone.parameters()) == sum(p.numel() for p in model.parameters())


def _check_rejection(exc: Exception, changed: list, bad: bool, stats: Counter) -> None:
    """A rejection must name a changed field; count it (bad value vs. valid values that do not fit together)."""
    message = str(exc)
    assert any(name in message for name in changed), (
        f"{type(exc).__name__} does not name any changed field {changed}: {message}")
    stats["rejected"] += 1
    stats["rejected_with_bad_value" if bad else "rejected_inconsistent_valid_values"] += 1


def test_unet_config_fuzz():
    stats = Counter()

    @settings(max_examples=UNET_EXAMPLES, **FUZZ_SETTINGS)
    @given(unet_configs())
    def run(case):
        config, changed, bad = case
        torch.manual_seed(0)
        try:
            model = DDPMUNet2DModel(**config)
        except (ValueError, TypeError) as exc:
            _check_rejection(exc, changed, bad, stats)
            return
        assert not bad, f"accepted a bad value: {config}"
        model.eval()
        with torch.no_grad():
            _unet_forward(model, config)
        stats["built_and_ran"] += 1

    run()
    stats["total"] = stats["built_and_ran"] + stats["rejected"]
    print(f"\nUNet config fuzz: {dict(stats)}")
    # The strategy must exercise both outcomes substantially.
    assert stats["built_and_ran"] >= UNET_EXAMPLES // 5 and stats["rejected"] >= UNET_EXAMPLES // 5, dict(stats)


# ----------------------------------------------------------------------------------------------------------
# Scheduler
# ----------------------------------------------------------------------------------------------------------

SCHEDULER_BASE = dict(num_train_timesteps=20)
GOOD_BETAS, SHORT_BETAS, ZERO_BETAS = "<good betas>", "<short betas>", "<zero betas>"
SCHEDULER_POOLS = {
    "num_train_timesteps": ([1, 2, 10, 20, 50, 1000], [0, -5, 10.0, None, "1000", True, [20], 2.5]),
    "beta_start": ([1e-4, 1e-3, 0.05, 0.02], [-1e-4, 1.0, 2.0, NAN, INF, None, "x", [1e-4]]),
    "beta_end": ([0.02, 0.2, 0.5, 1e-3], [1.5, -0.1, NAN, INF, None, "0.02", [0.02]]),
    "beta_schedule": (["linear", "scaled_linear", "squaredcos_cap_v2", "cosine", "sigmoid", "laplace"],
                      ["quadratic", None, ["linear"], "", 1, "Linear"]),
    "trained_betas": ([None, GOOD_BETAS], [SHORT_BETAS, ZERO_BETAS, [], ["a"], [[0.1]], "0.1", 0.1, [NAN], [1.5],
                                           [-0.1]]),
    "variance_type": (["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
                       "learned_range"], ["fixed", None, "", ["learned"], 0]),
    "clip_sample": ([True, False], BOOL_BAD),
    "prediction_type": (["epsilon", "sample", "v_prediction"], ["v", "eps", None, ["epsilon"], 1]),
    "thresholding": ([True, False], BOOL_BAD),
    "dynamic_thresholding_ratio": ([0.995, 0.5, 1.0, 0.0], [1.5, -0.1, NAN, None, "0.9", [0.9], True]),
    "clip_sample_range": ([1.0, 0.5, 3, 2.0], [0.0, -1.0, NAN, None, "1", [1.0]]),
    "sample_max_value": ([1.0, 2.0, 1.5, 1], [0.0, -1.0, NAN, INF, None, "1", [1.0]]),
    "timestep_spacing": (["leading", "linspace", "trailing"], ["uniform", None, "", ["leading"], 0]),
    "steps_offset": ([0, 1, 2], [-1, 1.5, None, "1", True, [1]]),
    "rescale_betas_zero_snr": ([True, False], BOOL_BAD),
    "sampler": (["ddpm", "ddim"], ["euler", None, "", ["ddim"], 0]),
    "eta": ([0.0, 0.5, 1.0, 0], [-0.1, NAN, INF, None, "0", [0.0], True]),
    "not_a_config_key": ([], [1]),
}


def _resolve_betas(value, num_train_timesteps):
    t = num_train_timesteps if isinstance(num_train_timesteps, (int, np.integer)) and num_train_timesteps > 0 else 20
    t = min(int(t), 1000)
    if value is GOOD_BETAS:
        return list(np.linspace(1e-4, 0.02, t))
    if value is SHORT_BETAS:
        return [0.01] * (t + 1)
    if value is ZERO_BETAS:
        return [0.0] * t
    return value


@st.composite
def scheduler_configs(draw):
    fields = draw(st.lists(st.sampled_from(sorted(SCHEDULER_POOLS)), min_size=1, max_size=5, unique=True))
    config, changed, bad = dict(SCHEDULER_BASE), [], False
    for name in fields:
        good, wrong = SCHEDULER_POOLS[name]
        use_bad = not good or draw(st.integers(0, 2)) == 0
        config[name] = draw(st.sampled_from(wrong if use_bad else good))
        changed.append(name)
        bad |= use_bad
    if "trained_betas" in config:
        config["trained_betas"] = _resolve_betas(config["trained_betas"], config["num_train_timesteps"])
    n_steps = draw(st.integers(1, 60))
    return config, changed, bad, n_steps


def _scheduler_steps(scheduler: GaussianDiffusionScheduler, n_steps: int) -> None:
    cfg = scheduler.config
    channels = 2
    learned = cfg.variance_type in ("learned", "learned_range")
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, channels, 4, 4, generator=gen)
    out_ch = 2 * channels if learned else channels
    zero_snr_eps = cfg.rescale_betas_zero_snr and cfg.prediction_type == "epsilon"

    def check(chain_timesteps):
        for t in (chain_timesteps[0], chain_timesteps[-1]):
            model_output = torch.randn(2, out_ch, 4, 4, generator=gen).clamp(-1, 1)
            prev = scheduler.step(model_output, t, sample, generator=gen).prev_sample
            assert prev.shape == sample.shape
            # With zero terminal SNR, ε-prediction cannot give x_0 at t = T-1 (division by √ᾱ_T = 0); there
            # only clipping keeps it finite (diffusers behaves the same).
            if not (zero_snr_eps and int(t) == cfg.num_train_timesteps - 1):
                assert torch.isfinite(prev).all(), f"non-finite prev_sample at t={int(t)}"

    check(scheduler.timesteps)  # the full training chain, no set_timesteps needed
    n = min(n_steps, cfg.num_train_timesteps)
    try:
        scheduler.set_timesteps(n)
    except ValueError as exc:
        # A call-time argument check (e.g. "leading" spacing with a steps_offset pushing timesteps past T, or
        # more steps than distinct timesteps): must be a clear ValueError about the timesteps.
        assert "timestep" in str(exc), str(exc)
    else:
        check(scheduler.timesteps)
    scheduler.set_timesteps(timesteps=[cfg.num_train_timesteps - 1] + ([0] if cfg.num_train_timesteps > 1 else []))
    check(scheduler.timesteps)
    x0 = torch.randn(2, channels, 4, 4, generator=gen)
    noisy = scheduler.add_noise(x0, torch.randn_like(x0), torch.tensor([0, cfg.num_train_timesteps - 1]))
    assert torch.isfinite(noisy).all()
    # The stored config rebuilds an equal scheduler.
    clone = GaussianDiffusionScheduler.from_config(scheduler.config)
    assert torch.equal(clone.alphas_cumprod, scheduler.alphas_cumprod)


def test_scheduler_config_fuzz():
    stats = Counter()

    @settings(max_examples=SCHEDULER_EXAMPLES, **FUZZ_SETTINGS)
    @given(scheduler_configs())
    def run(case):
        config, changed, bad, n_steps = case
        try:
            scheduler = GaussianDiffusionScheduler(**config)
        except (ValueError, TypeError) as exc:
            _check_rejection(exc, changed, bad, stats)
            return
        assert not bad, f"accepted a bad value: {config}"
        _scheduler_steps(scheduler, n_steps)
        stats["built_and_stepped"] += 1

    run()
    stats["total"] = stats["built_and_stepped"] + stats["rejected"]
    print(f"\nScheduler config fuzz: {dict(stats)}")
    assert stats["built_and_stepped"] >= SCHEDULER_EXAMPLES // 5 and stats["rejected"] >= SCHEDULER_EXAMPLES // 5, \
        dict(stats)


# ----------------------------------------------------------------------------------------------------------
# A few hand-picked cases the fuzz found, pinned with their messages
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    (dict(act_fn=["silu"]), "act_fn"),
    (dict(norm_num_groups=10**6), "norm_num_groups"),
    (dict(time_embedding_dim=0), "time_embedding_dim"),
    (dict(dropout="0.1"), "dropout"),
    (dict(layers_per_block=1.5), "layers_per_block"),
    (dict(in_channels=True), "in_channels"),
    (dict(block_out_channels=8), "block_out_channels"),
    (dict(attention_resolutions=4), "attention_resolutions"),
    (dict(mid_block_scale_factor=0.0), "mid_block_scale_factor"),
    (dict(freq_shift=2), "freq_shift"),
    (dict(add_attention="no"), "add_attention"),
    (dict(time_embedding_dim=-4), "time_embedding_dim"),  # was a RuntimeError from inside nn.Linear
    (dict(attn_norm_num_groups=0), "attn_norm_num_groups"),  # was a ZeroDivisionError
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(attention_resolutions=("4",)), "attention_resolutions"),  # was silently int()-converted
])
def test_unet_pinned_rejections(overrides, message):
    with pytest.raises((ValueError, TypeError), match=message):
        DDPMUNet2DModel(**{**UNET_BASE, **overrides})


@pytest.mark.parametrize("overrides,message", [
    (dict(beta_schedule=["linear"]), "beta_schedule"),
    (dict(eta=None), "eta"),
    (dict(beta_end=1.5), "beta"),
    (dict(trained_betas=[0.0] * 20), "trained_betas"),
    (dict(dynamic_thresholding_ratio=1.5), "dynamic_thresholding_ratio"),
    (dict(steps_offset=-1), "steps_offset"),
    (dict(clip_sample="no"), "clip_sample"),
    (dict(num_train_timesteps=1000, beta_end=0.5), "beta_end"),  # ᾱ underflows to 0: 0/0 in every later step
    (dict(num_train_timesteps=1, rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    (dict(beta_start=None), "beta_start"),  # was a TypeError from inside torch.linspace
    (dict(trained_betas=["a"] * 20), "trained_betas"),
])
def test_scheduler_pinned_rejections(overrides, message):
    with pytest.raises((ValueError, TypeError), match=message):
        GaussianDiffusionScheduler(**{**SCHEDULER_BASE, **overrides})
