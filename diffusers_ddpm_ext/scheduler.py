"""Discrete Gaussian diffusion (DDPM / improved-diffusion) as a diffusers scheduler.

`GaussianDiffusionScheduler` is a drop-in for `diffusers.DDPMScheduler` (same config keys, same `step` call from
`DDPMPipeline`) that also exposes the diffusion quantities used for training and likelihood evaluation:
q(x_t | x_0), the posterior q(x_prev | x_t, x_0) and the model's p(x_prev | x_t) for every prediction type and
variance type, on full or respaced chains.

This module is self-contained (torch, numpy, diffusers, stdlib) because it is copied into Hub repos as remote code.

References:
    Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM).
    Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models" (IDM).
    Song et al. 2021, "Denoising Diffusion Implicit Models" (DDIM).
    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed" (zero terminal SNR, spacing).
    Bao, Li, Zhu & Zhang 2022, "Analytic-DPM: an Analytic Estimate of the Optimal Reverse Variance in Diffusion
        Probabilistic Models" (ICLR 2022; `variance_type="analytic"`).
"""

import json
import math
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Sequence, Tuple, Union, get_args

import diffusers
import numpy as np
import torch
from torch import Tensor

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

# The vocabulary: every allowed value lives here once, as a Literal for signatures and as a tuple for checks.
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"]
PredictionType = Literal["epsilon", "sample", "v_prediction"]
VarianceType = Literal[
    "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range", "analytic"
]
TimestepSpacing = Literal["leading", "linspace", "trailing"]
Sampler = Literal["ddpm", "ddim"]

BETA_SCHEDULES = get_args(BetaSchedule)
BETA_SCHEDULE_ALIASES = {"cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = get_args(PredictionType)
VARIANCE_TYPES = get_args(VarianceType)
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")  # the model's extra C output channels carry the variance
TIMESTEP_SPACINGS = get_args(TimestepSpacing)
SAMPLERS = get_args(Sampler)
# Our config keys that no diffusers scheduler has, with their defaults. diffusers' `from_config` warns "The config
# attributes {...} were passed to <Scheduler>, but are not expected" for each such key unless it is private or absent,
# or the config's `_class_name` is an attribute of `diffusers` (`ConfigMixin.extract_init_dict`). So the class
# registers itself there (`_register_in_diffusers_namespace`), records its `_class_name` in memory, and saved configs
# leave these keys out at their defaults (`to_json_string`): swapping schedulers is silent.
_OWN_KEY_DEFAULTS = {"sampler": "ddpm", "eta": 0.0, "analytic_gamma": None}


@dataclass
class GaussianDiffusionSchedulerOutput(BaseOutput):
    """Output of `GaussianDiffusionScheduler.step`.

    Args:
        prev_sample (`torch.Tensor` of shape `(B, C, ...)`): x at the previous timestep of the chain; the next model
            input in the sampling loop.
        pred_original_sample (`torch.Tensor` of shape `(B, C, ...)`): predicted (clipped/thresholded) x_0.
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


@dataclass
class GaussianDiffusionModelOutput(BaseOutput):
    """p_θ(x_prev | x_t) from a model output (returned by `GaussianDiffusionScheduler.p_mean_variance`).

    `variance` and `log_variance` broadcast against `mean`: shape `(B, 1, ...)` for fixed variances,
    `(B, C, ...)` for learned ones.

    Args:
        mean (`torch.Tensor`): mean of p_θ(x_prev | x_t).
        variance (`torch.Tensor`): its variance (IDM: β̃ is 0 at the chain's first step for fixed_small).
        log_variance (`torch.Tensor`): its log variance, IDM-clipped at the chain's first step.
        pred_original_sample (`torch.Tensor`): predicted x_0 (clipped if `clip_denoised`).
        pred_epsilon (`torch.Tensor`): predicted noise, from the raw (unclipped) prediction.
    """

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_original_sample: torch.Tensor
    pred_epsilon: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# β schedules
# ----------------------------------------------------------------------------------------------------------------


def _cosine_alpha_bar(t: float) -> float:
    # IDM eq. 17 with s = 0.008: ᾱ(t) = cos²(((t + s)/(1 + s))·π/2) (the f(0) normaliser cancels in the ratio).
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace_alpha_bar(t: float) -> float:
    # Laplace noise schedule (as in DDPMScheduler's "laplace"): λ = log SNR is Laplace-distributed in t.
    lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(lmb)
    return math.sqrt(snr / (1 + snr))


def betas_from_alpha_bar(num_train_timesteps: int, alpha_bar, max_beta: float = 0.999) -> List[float]:
    """β_t = min(1 − ᾱ((t+1)/T) / ᾱ(t/T), max_beta), in float64 (IDM eq. 17's discretisation)."""
    T = num_train_timesteps
    return [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]


def rescale_betas_to_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ so that ᾱ_{T−1} = 0 while ᾱ_0 is unchanged (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str, trained_betas=None,
               rescale_betas_zero_snr: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (T,) β schedule in `dtype`. In float32 it is bit-identical to `DDPMScheduler.betas`; float64 gives the
    same schedule computed at IDM's precision (used for likelihood work).

    Raises:
        ValueError: unknown `beta_schedule` (lists the allowed ones), or `trained_betas` of the wrong length.
    """
    beta_schedule = BETA_SCHEDULE_ALIASES.get(beta_schedule, beta_schedule)
    if trained_betas is not None:
        betas = torch.as_tensor(np.asarray(trained_betas, dtype=np.float64)).to(dtype)
        if betas.ndim != 1 or betas.numel() != num_train_timesteps:
            raise ValueError(
                f"trained_betas must be 1-D with num_train_timesteps={num_train_timesteps} entries, "
                f"got shape {tuple(betas.shape)}"
            )
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=dtype)
    elif beta_schedule == "scaled_linear":
        # Latent-diffusion schedule: linear in √β.
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=dtype) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = torch.tensor(betas_from_alpha_bar(num_train_timesteps, _cosine_alpha_bar), dtype=dtype)
    elif beta_schedule == "laplace":
        betas = torch.tensor(betas_from_alpha_bar(num_train_timesteps, _laplace_alpha_bar), dtype=dtype)
    elif beta_schedule == "sigmoid":
        # GeoDiff sigmoid schedule.
        betas = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps, dtype=dtype)) * (beta_end - beta_start)
        betas = betas + beta_start
    else:
        allowed = BETA_SCHEDULES + tuple(BETA_SCHEDULE_ALIASES)
        raise ValueError(f"beta_schedule={beta_schedule!r} is not supported; choose one of {allowed}")
    if rescale_betas_zero_snr:
        betas = rescale_betas_to_zero_terminal_snr(betas)
    return betas


# ----------------------------------------------------------------------------------------------------------------
# Timestep selection
# ----------------------------------------------------------------------------------------------------------------


def parse_respacing(respacing: Union[str, Sequence[int]], num_train_timesteps: int) -> List[int]:
    """Training timesteps kept by an IDM respacing spec, ascending.

    * ``"ddimN"``: the integer stride s with ``len(range(0, T, s)) == N`` (the DDIM paper's uniform skip).
    * ``"N"`` or ``"N1,N2,..."`` (or a list of ints): split [0, T) into as many equal sections as counts
      (the first ``T % k`` sections one step longer) and take ``Ni`` evenly spaced steps in section i, both
      section ends included, rounded to the nearest integer (IDM ``space_timesteps``).

    Raises:
        ValueError: malformed spec, a section asked for more steps than it has, or no stride giving exactly N.
    """
    T = num_train_timesteps
    if isinstance(respacing, str):
        spec = respacing.strip()
        if spec.startswith("ddim"):
            try:
                n = int(spec[len("ddim"):])
            except ValueError:
                raise ValueError(f"malformed respacing {respacing!r}: expected 'ddimN' with an integer N") from None
            for stride in range(1, T + 1):
                if len(range(0, T, stride)) == n:
                    return list(range(0, T, stride))
            raise ValueError(f"respacing {respacing!r}: no integer stride gives exactly {n} of {T} steps")
        try:
            counts = [int(part) for part in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"malformed respacing {respacing!r}: expected 'ddimN', 'N' or comma-separated integers 'N1,N2,...'"
            ) from None
    else:
        counts = [int(c) for c in respacing]
    if not counts or any(c < 0 for c in counts) or sum(counts) == 0:
        raise ValueError(f"malformed respacing {respacing!r}: section counts must be non-negative with a positive sum")
    if len(counts) > T:
        raise ValueError(f"respacing {respacing!r} has {len(counts)} sections but only {T} training timesteps")
    base, extra = divmod(T, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"respacing {respacing!r}: section {i} has {size} steps, cannot take {count}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


# ----------------------------------------------------------------------------------------------------------------
# Analytic-DPM
# ----------------------------------------------------------------------------------------------------------------


def analytic_variance(alpha_prod_t, alpha_prod_prev, lambda_sq, gamma, data_range: float = 1.0) -> torch.Tensor:
    """Analytic-DPM's KL-optimal isotropic variance σ*² of a reverse step t → s, clipped to the paper's bounds.

    Bao et al. 2022, Theorem 1, for the family q_λ(x_s | x_t, x_0) = N(μ̃_λ, λ² I), with ᾱ_n = ᾱ_t, ᾱ_{n−1} = ᾱ_s,
    α_n = ᾱ_t/ᾱ_s (a respaced step), β̄ = 1 − ᾱ and the score −ε/√β̄_n:

        σ*_n² = λ_n² + (√(β̄_n/α_n) − √(β̄_{n−1} − λ_n²))² (1 − Γ_n),    Γ_n = E_q‖ε_θ(x_n, n)‖²/d.

    Written as λ² + c²·v with c = √ᾱ_{n−1} − √((β̄_{n−1} − λ²)ᾱ_n/β̄_n) (for λ² = β̃: the posterior-mean coefficient
    of x_0) and v = (β̄_n/ᾱ_n)(1 − Γ_n), the variance of x_0 given x_n per dimension. Theorem 2 and its corollary
    for data in [−r, r]^d bound v to [0, r²]; the estimate is clipped there as the paper does (a Monte-Carlo Γ can
    exceed 1). At ᾱ_t = 0 (zero terminal SNR) x_t says nothing about x_0 and v = r².

    Args:
        alpha_prod_t, alpha_prod_prev (`torch.Tensor`): ᾱ_t and ᾱ_s (1 for the step onto the data), broadcastable.
        lambda_sq (`torch.Tensor`): λ², the family's variance: β̃ (DDPM) or η²β̃ (DDIM).
        gamma (`torch.Tensor`): Γ_t.
        data_range (`float`, defaults to 1.0): r.

    Returns:
        `torch.Tensor`: σ*² in the promoted dtype (pass float64: c is a difference of close roots).
    """
    beta_prod_t = 1 - alpha_prod_t
    c = alpha_prod_prev**0.5 - (torch.clamp(1 - alpha_prod_prev - lambda_sq, min=0) * alpha_prod_t / beta_prod_t) ** 0.5
    tiny = torch.finfo(alpha_prod_t.dtype).tiny
    x0_variance = torch.where(alpha_prod_t > 0, beta_prod_t / alpha_prod_t.clamp(min=tiny) * (1 - gamma), data_range**2)
    return lambda_sq + c**2 * torch.clamp(x0_variance, min=0, max=data_range**2)


# ----------------------------------------------------------------------------------------------------------------
# Config checks
# ----------------------------------------------------------------------------------------------------------------


def _validate_config(cfg: dict) -> None:
    """Check the constructor arguments before anything is computed: types first (TypeError), then ranges
    (ValueError), each message naming the field. The β values themselves are checked after they are built
    (see `_check_betas`), since their range depends on the schedule."""
    T = cfg["num_train_timesteps"]
    if isinstance(T, bool) or not isinstance(T, int):
        raise TypeError(f"num_train_timesteps must be a positive int, got {T!r} ({type(T).__name__})")
    if T < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {T!r}")
    for name, allowed in (("beta_schedule", BETA_SCHEDULES + tuple(BETA_SCHEDULE_ALIASES)),
                          ("variance_type", VARIANCE_TYPES), ("prediction_type", PREDICTION_TYPES),
                          ("timestep_spacing", TIMESTEP_SPACINGS), ("sampler", SAMPLERS)):
        value = cfg[name]
        if not isinstance(value, str):  # checked first: an unhashable value would fail the lookup obscurely
            raise TypeError(f"{name}={value!r} must be a string, one of {allowed}")
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not supported; choose one of {allowed}")
    for name in ("clip_sample", "thresholding", "rescale_betas_zero_snr", "set_alpha_to_one"):
        if not isinstance(cfg[name], (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {cfg[name]!r}")
    for name in ("beta_start", "beta_end", "dynamic_thresholding_ratio", "clip_sample_range", "sample_max_value",
                 "eta"):
        value = cfg[name]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    if not 0.0 <= cfg["dynamic_thresholding_ratio"] <= 1.0:
        raise ValueError(
            f"dynamic_thresholding_ratio must be a quantile in [0, 1], got {cfg['dynamic_thresholding_ratio']!r}")
    for name in ("clip_sample_range", "sample_max_value"):
        if not cfg[name] > 0:
            raise ValueError(f"{name} must be > 0, got {cfg[name]!r}")
    if not cfg["eta"] >= 0:
        raise ValueError(f"eta must be >= 0, got {cfg['eta']!r}")
    offset = cfg["steps_offset"]
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)):
        raise TypeError(f"steps_offset must be a non-negative int, got {offset!r} ({type(offset).__name__})")
    if offset < 0:
        raise ValueError(f"steps_offset must be a non-negative int, got {offset!r}")
    if cfg["rescale_betas_zero_snr"] and T < 2:
        raise ValueError(f"rescale_betas_zero_snr=True needs num_train_timesteps >= 2, got {T}")
    if cfg["trained_betas"] is not None:
        _float_array(cfg["trained_betas"], "trained_betas")
    gamma = cfg["analytic_gamma"]
    fix = "estimate it for this schedule with diffusers_ddpm_ext.analytic.fit_analytic_variance(model, scheduler, data)"
    if gamma is None and cfg["variance_type"] == "analytic":
        raise ValueError(f"variance_type='analytic' needs analytic_gamma, the table Γ_t = E‖ε_θ(x_t, t)‖²/d of "
                         f"num_train_timesteps={T} values; {fix}")
    if gamma is not None:
        values = _float_array(gamma, "analytic_gamma")
        if values.ndim != 1 or values.size != T:
            raise ValueError(f"analytic_gamma has shape {values.shape} but num_train_timesteps={T}: it was estimated "
                             f"for another schedule; {fix}")
        bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
        if bad.size:
            raise ValueError(f"analytic_gamma must hold finite mean squares >= 0; "
                             f"analytic_gamma[{bad[0]}] = {float(values[bad[0]])!r}")


def _register_in_diffusers_namespace(klass) -> None:
    """Make ``klass`` an attribute of ``diffusers`` (see `_OWN_KEY_DEFAULTS`). A diffusers class of the same name is
    never replaced; a remote-code copy of this file registers itself where the name is free (same config keys), and
    the installed module takes the name over from such a copy."""
    existing = getattr(diffusers, klass.__name__, None)
    if existing is None or (existing is not klass and klass.__module__ == "diffusers_ddpm_ext.scheduler"
                            and str(getattr(existing, "__module__", "")).split(".")[0] != "diffusers"):
        setattr(diffusers, klass.__name__, klass)


def _float_array(value, name: str) -> np.ndarray:
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of numbers, got {value!r}")
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a sequence of numbers ({exc})") from None


def _check_betas(betas: torch.Tensor, alphas_cumprod: torch.Tensor, cfg: dict) -> None:
    """β must lie in (0, 1] (β = 1 only at the last step: zero terminal SNR), and ᾱ_t must stay positive before
    the last step in float32, else the posterior coefficients divide 0 by 0."""
    if cfg["trained_betas"] is not None:
        source = "trained_betas"
    else:
        source = (f"beta_schedule={cfg['beta_schedule']!r}, beta_start={cfg['beta_start']!r}, "
                  f"beta_end={cfg['beta_end']!r}, num_train_timesteps={cfg['num_train_timesteps']}")
    if cfg["rescale_betas_zero_snr"]:
        source += ", rescale_betas_zero_snr=True"
    bad = ~torch.isfinite(betas) | (betas <= 0) | (betas > 1)
    bad[:-1] |= betas[:-1] >= 1
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"the betas of {source} must lie in (0, 1) (1 allowed at the last step only); "
                         f"beta[{i}] = {float(betas[i])!r}")
    zero = (alphas_cumprod[:-1] <= 0).nonzero()
    if zero.numel():
        i = int(zero[0])
        raise ValueError(f"alphas_cumprod underflows to 0 at t={i} of {cfg['num_train_timesteps']} with {source}; "
                         "the signal is destroyed before the last step (lower beta_end or num_train_timesteps)")


def _as_long(timesteps, device) -> torch.Tensor:
    t = torch.as_tensor(timesteps, device=device)
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError(f"timesteps must be integers, got {t}")
    return t.long()


def _broadcast(coef: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) or () -> (B, 1, ..., 1) so it broadcasts over a (B, C, ...) sample."""
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (ndim - coef.ndim))


def _extract(table: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    """The one read of a coefficient table: table[t] as (B, 1, ..., 1) for a (B, C, ...) sample (IDM's
    `_extract_into_tensor`). `table` must be on the device of `timesteps`."""
    return _broadcast(table[timesteps], ndim)


# ----------------------------------------------------------------------------------------------------------------
# Coefficient tables
# ----------------------------------------------------------------------------------------------------------------


def _step_table(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, prev_timesteps: torch.Tensor, successors: Tensor,
                final_alpha_cumprod: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Coefficients of the chain steps t → prev, one entry per step ((K,) tensors in the dtype of `alphas_cumprod`).

    With ᾱ' = ᾱ_prev (`final_alpha_cumprod`, default 1, when prev = −1): β' = 1 − ᾱ_t/ᾱ' (IDM Sec. 4 respacing;
    β_t when prev = t − 1), β̃' = (1 − ᾱ')/(1 − ᾱ_t)·β' and μ̃ = √ᾱ'β'/(1 − ᾱ_t)·x_0 + √(1 − β')(1 − ᾱ')/(1 − ᾱ_t)·x_t
    (Ho et al. 2020 eq. 6-7). A step onto the data (prev = −1, ᾱ' = 1) has β̃' = 0; IDM then uses the posterior
    variance of the next step of the chain, `successors` → t ("clipped" variance; β' when there is none). The
    operation order reproduces DDPMScheduler's and DDIMScheduler's float32 arithmetic.
    """
    dtype = alphas_cumprod.dtype
    final = torch.ones((), dtype=dtype) if final_alpha_cumprod is None else final_alpha_cumprod.to(dtype)

    def posterior_variance(t, prev):
        a_t = alphas_cumprod[t]
        a_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], final)
        beta_step = 1 - a_t / a_prev
        return a_t, a_prev, beta_step, (1 - a_prev) / (1 - a_t) * beta_step

    a_t, a_prev, beta_step, variance = posterior_variance(timesteps, prev_timesteps)
    beta_prod_t, beta_prod_prev, alpha_step = 1 - a_t, 1 - a_prev, a_t / a_prev
    first = (prev_timesteps < 0) & (a_prev == 1)  # the step onto the data: no noise, discretised decoder
    next_variance = torch.where(successors > timesteps, posterior_variance(successors, timesteps)[-1], beta_step)
    clipped_variance = torch.where(first, next_variance, variance)
    return {
        "alpha_prod_t": a_t, "alpha_prod_prev": a_prev, "beta_prod_t": beta_prod_t, "beta": beta_step,
        "posterior_variance": variance, "clipped_variance": clipped_variance,
        "posterior_log_variance_clipped": torch.log(torch.clamp(clipped_variance, min=1e-20)),
        "coef_x0": a_prev**0.5 * beta_step / beta_prod_t, "coef_xt": alpha_step**0.5 * beta_prod_prev / beta_prod_t,
        "first": first,
    }


class GaussianDiffusionScheduler(SchedulerMixin, ConfigMixin):
    """Discrete Gaussian diffusion of DDPM / improved-diffusion, usable wherever `DDPMScheduler` is.

    Sampling follows the DDPM posterior (`sampler="ddpm"`) or the DDIM update with `eta` (`sampler="ddim"`), on
    the full chain or a respaced one (`set_timesteps(50)`, `set_timesteps("ddim50")`, `set_timesteps("10,15,20")`,
    custom timesteps). Respaced chains use β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}} for means and variances (IDM Sec. 4).
    As in improved-diffusion, every step's coefficients are tabulated once per chain (`__init__`: the training
    chain; `set_timesteps`: the sampling chain) in float32, which reproduces `DDPMScheduler.step` /
    `DDIMScheduler.step` bit for bit, and in float64, the default of `q_mean_variance`, `q_posterior_mean_variance`,
    `p_mean_variance` and `snr`.

    Deliberate differences from `DDPMScheduler` (all follow IDM):
        * no noise is added at the chain's last step even when its timestep is > 0 (trailing spacing,
          `steps_offset`); DDPMScheduler adds noise whenever t > 0.
        * `variance_type="learned"` reads the model's extra channels as a **log** variance (IDM); DDPMScheduler
          reads them as the variance itself.
        * `variance_type="fixed_large_log"` samples with σ² = β' (DDPMScheduler takes the square root of log β).
        * at the chain's first step (prev = −1, β̃ = 0) the log posterior variance is clipped to that of the next
          step of the chain, and fixed_large and analytic use that variance too (better decoder likelihood);
          sampling is unaffected because no noise is added there.

    `variance_type="analytic"` (Bao et al. 2022) is the KL-optimal isotropic variance of any ε-model from the table
    `analytic_gamma` (see `analytic_variance`; built by `diffusers_ddpm_ext.analytic.fit_analytic_variance`), for
    both samplers (DDPM: λ² = β̃'; DDIM: λ² = η²β̃', "Analytic-DDIM", which adds noise even at η = 0).

    DDIM mode matches `DDIMScheduler.step` (`eta=`, `use_clipped_model_output=`, the `set_alpha_to_one` key) but
    steps to the chain's previous timestep (DDIMScheduler: t − T//n, which differs for "linspace");
    `from_config(ddim_scheduler.config)` selects `sampler="ddim"`.

    Args:
        num_train_timesteps (`int`, defaults to 1000): T, the length of the training chain.
        beta_start (`float`, defaults to 0.0001): first β of linear-type schedules.
        beta_end (`float`, defaults to 0.02): last β of linear-type schedules.
        beta_schedule (`str`, defaults to `"linear"`): `"linear"`, `"scaled_linear"`, `"squaredcos_cap_v2"`
            (alias `"cosine"`, IDM eq. 17 with s = 0.008 and β ≤ 0.999), `"sigmoid"` or `"laplace"`.
        trained_betas (array-like, *optional*): explicit β (length T); overrides `beta_schedule`.
        variance_type (`str`, defaults to `"fixed_small"`): `"fixed_small"` (β̃), `"fixed_small_log"`,
            `"fixed_large"` (β), `"fixed_large_log"`, `"learned"` (model's extra C channels are log σ²),
            `"learned_range"` (extra channels v ∈ [−1, 1] interpolate log β and log β̃, IDM eq. 15) or `"analytic"`
            (Analytic-DPM's optimal variance from `analytic_gamma`).
        clip_sample (`bool`, defaults to `True`): clip the predicted x_0 to ±`clip_sample_range` when sampling.
        prediction_type (`str`, defaults to `"epsilon"`): `"epsilon"`, `"sample"` (x_0) or `"v_prediction"`.
        thresholding (`bool`, defaults to `False`): dynamic thresholding of x_0 (Imagen) instead of clipping.
        dynamic_thresholding_ratio (`float`, defaults to 0.995): quantile of |x_0| used by thresholding.
        clip_sample_range (`float`, defaults to 1.0): clipping bound; also the data range r of the analytic
            variance's upper bound.
        sample_max_value (`float`, defaults to 1.0): upper bound of the thresholding scale.
        timestep_spacing (`str`, defaults to `"leading"`): `"leading"`, `"linspace"` or `"trailing"`, how
            `set_timesteps(int)` picks timesteps (Lin et al. 2023, Table 2).
        steps_offset (`int`, defaults to 0): added to "leading" timesteps.
        rescale_betas_zero_snr (`bool`, defaults to `False`): rescale β to zero terminal SNR (Lin et al. 2023).
        sampler (`str`, defaults to `"ddpm"`): `"ddpm"` (ancestral posterior sampling) or `"ddim"`.
        eta (`float`, defaults to 0.0): DDIM η (0 = deterministic, 1 = DDPM-like variance); used when
            `sampler="ddim"`; `step(eta=...)` overrides it per call.
        set_alpha_to_one (`bool`, defaults to `True`): DDIMScheduler's key. In DDIM mode, the chain's last step goes
            to ᾱ = 1 (the data); if False, to ᾱ_0 (and adds η-noise there, as DDIMScheduler). The DDPM sampler
            always ends at ᾱ = 1, as DDPMScheduler.
        analytic_gamma (`list[float]`, *optional*): Γ_t = E_q‖ε_θ(x_t, t)‖²/d for t = 0 … T−1, the table of
            `variance_type="analytic"` (stored in the config, so `save_pretrained` keeps it).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: Union[BetaSchedule, Literal["cosine"]] = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        variance_type: VarianceType = "fixed_small",
        clip_sample: bool = True,
        prediction_type: PredictionType = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: TimestepSpacing = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        sampler: Sampler = "ddpm",
        eta: float = 0.0,
        set_alpha_to_one: bool = True,
        analytic_gamma: Optional[List[float]] = None,
    ):
        config_args = dict(self.config)  # every argument, as `register_to_config` recorded it
        _validate_config(config_args)
        if beta_schedule in BETA_SCHEDULE_ALIASES:
            # Store the diffusers name so DDPMScheduler.from_config(our config) works.
            beta_schedule = BETA_SCHEDULE_ALIASES[beta_schedule]
            self.register_to_config(beta_schedule=beta_schedule)
        # `_class_name` in memory too (see _OWN_KEY_DEFAULTS). Our own keys count as given even when defaulted: a
        # diffusers scheduler built from this config keeps them as hidden keys and hands them back to our
        # `from_config`; otherwise DDIMScheduler's `set_alpha_to_one` alone would select sampler="ddim".
        used_defaults = [k for k in self.config.get("_use_default_values", []) if k not in _OWN_KEY_DEFAULTS]
        self.register_to_config(_class_name=type(self).__name__, _use_default_values=used_defaults)
        self._analytic_gamma = None
        if analytic_gamma is not None:
            # A plain list of floats in the config (JSON, no pickle): save_pretrained and the Hub export keep it.
            gamma = [float(g) for g in np.asarray(analytic_gamma, dtype=np.float64).tolist()]
            self.register_to_config(analytic_gamma=gamma)
            self._analytic_gamma = torch.tensor(gamma, dtype=torch.float64)  # (T,)

        args = (num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr)
        # float32 tables match DDPMScheduler bit for bit; float64 ones serve likelihood-grade computations.
        self.betas = make_betas(*args, dtype=torch.float32)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        _check_betas(self.betas, self.alphas_cumprod, config_args)
        alphas_cumprod64 = torch.cumprod(1.0 - make_betas(*args, dtype=torch.float64), dim=0)
        self._alphas_cumprod_by_dtype = {torch.float32: self.alphas_cumprod, torch.float64: alphas_cumprod64}

        self.init_noise_sigma = 1.0
        self.variance_type = variance_type
        self.num_inference_steps = None
        self.custom_timesteps = False
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        # The training chain t → t − 1 (losses, likelihood) and the sampling chain (step); the latter is rebuilt
        # by set_timesteps. Each: {dtype: {name: (T,) tensor indexed by training timestep}}.
        self._tables = {"train": self._chain_tables(torch.arange(num_train_timesteps), ends_on_data=True)}
        self._set_sampling_chain(torch.arange(num_train_timesteps))

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """`ConfigMixin.from_config`. A DDIM-family config (DDIMScheduler's `set_alpha_to_one` key, no `sampler`
        key) gives `sampler="ddim"`, so `from_config(ddim_scheduler.config)` reproduces DDIMScheduler's numbers."""
        source = getattr(config, "config", config)
        if isinstance(source, dict) and "set_alpha_to_one" in source and "sampler" not in source:
            kwargs.setdefault("sampler", "ddim")
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def to_json_string(self) -> str:
        """`ConfigMixin.to_json_string` (what `save_pretrained` writes) without the keys of `_OWN_KEY_DEFAULTS` that
        hold their defaults: loading gives them their defaults again, and a diffusers scheduler built from the file
        logs no "not expected" warning even where our package is not imported. `sampler` is left out only with
        `set_alpha_to_one` at its default (True), which is then left out too: `set_alpha_to_one` without `sampler` is
        how a DDIMScheduler config is recognised (`from_config`), also by releases that always wrote `sampler`.

        Returns:
            `str`: the JSON text, keys sorted, as diffusers writes it.
        """
        config = json.loads(super().to_json_string())
        left_out = [key for key, default in _OWN_KEY_DEFAULTS.items() if key in config and config[key] == default]
        if "sampler" in left_out:
            if config.get("set_alpha_to_one", True) is True:
                left_out.append("set_alpha_to_one")
            else:  # set_alpha_to_one without sampler would read as a DDIMScheduler config: keep both
                left_out.remove("sampler")
        return json.dumps({k: v for k, v in config.items() if k not in left_out}, indent=2, sort_keys=True) + "\n"

    # ------------------------------------------------------------------------------------------------------------
    # Tables (built once per chain)
    # ------------------------------------------------------------------------------------------------------------

    def _step_tables(self, t: torch.Tensor, prev: torch.Tensor, successors: torch.Tensor, ends_on_data: bool = True):
        """`_step_table` of the steps t → prev in float32 and float64, plus the DDPM-family analytic σ*² (λ² = β̃',
        computed in float64). `ends_on_data=False` is DDIM's `set_alpha_to_one=False`: prev = −1 means ᾱ_0."""
        tables = {dtype: _step_table(ac, t, prev, successors, None if ends_on_data else ac[0])
                  for dtype, ac in self._alphas_cumprod_by_dtype.items()}
        if self._analytic_gamma is not None:
            t64 = tables[torch.float64]
            sigma_sq = analytic_variance(t64["alpha_prod_t"], t64["alpha_prod_prev"], t64["posterior_variance"],
                                         self._analytic_gamma[t], self.config.clip_sample_range)
            for dtype, table in tables.items():
                table["analytic_variance"] = sigma_sq.to(dtype)
        return tables

    def _chain_tables(self, ascending: torch.Tensor, ends_on_data: bool) -> Dict[torch.dtype, Dict[str, torch.Tensor]]:
        """The tables of the chain with these (ascending) timesteps as (T,) tensors indexed by training timestep
        (NaN off the chain)."""
        T = self.config.num_train_timesteps
        prev = torch.cat([torch.tensor([-1]), ascending[:-1]])
        successors = torch.cat([ascending[1:], (ascending[-1:] + 1).clamp(max=T - 1)])
        tables = self._step_tables(ascending, prev, successors, ends_on_data)
        if ascending.numel() == T:
            return tables  # the full chain: positions are the training timesteps already
        return {dtype: {name: torch.full((T,), False if v.dtype == torch.bool else float("nan"), dtype=v.dtype)
                        .index_copy_(0, ascending, v) for name, v in table.items()} for dtype, table in tables.items()}

    def _set_sampling_chain(self, ascending: torch.Tensor) -> None:
        T = self.config.num_train_timesteps
        ends_on_data = self.config.sampler == "ddpm" or self.config.set_alpha_to_one
        if ascending.numel() == T and ends_on_data:
            self._tables["sample"] = self._tables["train"]
        else:
            self._tables["sample"] = self._chain_tables(ascending, ends_on_data)
        # −2 marks timesteps off the chain; the last step's successor is t + 1 (IDM's clipping for a lone step).
        self._chain_prev = torch.full((T,), -2, dtype=torch.int64)
        self._chain_prev[ascending] = torch.cat([torch.tensor([-1]), ascending[:-1]])
        self._chain_next = (torch.arange(T) + 1).clamp(max=T - 1)
        self._chain_next[ascending[:-1]] = ascending[1:]
        self._tables_on_device = {}

    def _coefficients(self, chain: str, dtype: torch.dtype, timesteps: torch.Tensor, ndim: int) -> Dict[str, Tensor]:
        """Every coefficient of `chain` ("train" or "sample") at `timesteps` as (B, 1, ...) tensors in `dtype`."""
        key = (chain, dtype, timesteps.device)
        if key not in self._tables_on_device:
            self._tables_on_device[key] = {k: v.to(timesteps.device) for k, v in self._tables[chain][dtype].items()}
        return {name: _extract(table, timesteps, ndim) for name, table in self._tables_on_device[key].items()}

    def _coefficients_at(self, timesteps, prev_timesteps, dtype, sample: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Coefficients at (B,) `timesteps` of the training chain (`prev_timesteps` None: read from its tables) or
        of explicit steps t → prev of a chain ending on the data (tabulated for these steps)."""
        t = _as_long(timesteps, sample.device)
        self._check_range(t, "timesteps")
        if prev_timesteps is None:
            return self._coefficients("train", dtype, t, sample.ndim)
        prev = _as_long(prev_timesteps, sample.device)
        prev = prev.expand_as(t) if t.ndim else prev
        self._check_range(prev, "prev_timesteps", low=-1)
        if bool((prev >= t).any()):
            raise ValueError("prev_timesteps must be earlier than timesteps (prev < t)")
        t_cpu = t.cpu()
        # The first step's clipped variance uses the next step of the current chain when t is on it.
        successors = torch.where(self._chain_prev[t_cpu] >= -1, self._chain_next[t_cpu],
                                 (t_cpu + 1).clamp(max=self.config.num_train_timesteps - 1))
        table = self._step_tables(t_cpu, prev.cpu(), successors)[dtype]
        return {name: _broadcast(values.to(sample.device), sample.ndim) for name, values in table.items()}

    @property
    def analytic_gamma(self) -> Optional[torch.Tensor]:
        """The (T,) float64 Γ table of `variance_type="analytic"` (None if not set)."""
        return None if self._analytic_gamma is None else self._analytic_gamma.clone()

    # ------------------------------------------------------------------------------------------------------------
    # diffusers interface
    # ------------------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[int] = None) -> torch.Tensor:
        """Identity (DDPM inputs are not rescaled); present for scheduler interchangeability."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: Optional[Union[int, str]] = None,
        device: Optional[Union[str, torch.device]] = None,
        timesteps: Optional[Sequence[int]] = None,
        respacing: Optional[Union[str, Sequence[int]]] = None,
    ):
        """Choose the sampling chain (call before sampling).

        Args:
            num_inference_steps (`int` or `str`, *optional*): number of steps, spaced by `config.timestep_spacing`
                (as DDPMScheduler); a string is taken as `respacing`.
            device (`str` or `torch.device`, *optional*): device for `self.timesteps`.
            timesteps (`list[int]`, *optional*): custom strictly descending training timesteps in [0, T).
            respacing (`str` or `list[int]`, *optional*): IDM respacing, `"250"`, `"ddim50"`, `"10,15,20"`
                (see `parse_respacing`).

        Raises:
            ValueError: not exactly one of the three given; more steps than T; custom timesteps not strictly
                descending or outside [0, T); malformed respacing.
        """
        if isinstance(num_inference_steps, str):
            if respacing is not None:
                raise ValueError("pass the respacing string either as num_inference_steps or as respacing, not both")
            num_inference_steps, respacing = None, num_inference_steps
        given = [name for name, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                      ("respacing", respacing)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"pass exactly one of num_inference_steps, timesteps, respacing; got {given or 'none'}")
        T = self.config.num_train_timesteps

        if timesteps is not None:
            chain = [int(t) for t in (timesteps.tolist() if hasattr(timesteps, "tolist") else timesteps)]
            if not chain:
                raise ValueError("custom timesteps must not be empty")
            for a, b in zip(chain, chain[1:]):
                if b >= a:
                    raise ValueError(f"custom timesteps must be strictly descending, got {b} after {a}")
        elif respacing is not None:
            chain = parse_respacing(respacing, T)[::-1]
        else:
            n = int(num_inference_steps)
            if n != num_inference_steps or n < 1:
                raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
            if n > T:
                raise ValueError(f"num_inference_steps={n} cannot exceed num_train_timesteps={T}")
            spacing = self.config.timestep_spacing
            if spacing == "linspace":
                arr = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
            elif spacing == "leading":
                arr = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + self.config.steps_offset
            elif spacing == "trailing":
                arr = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
            else:
                raise ValueError(f"timestep_spacing={spacing!r} is not supported; choose one of {TIMESTEP_SPACINGS}")
            chain = arr.tolist()
            if any(b >= a for a, b in zip(chain, chain[1:])):
                raise ValueError(f"timestep_spacing={spacing!r} with {n} steps gives repeated timesteps {chain}")
        self.custom_timesteps = num_inference_steps is None
        if chain[0] >= T or chain[-1] < 0:
            raise ValueError(f"timesteps must lie in [0, {T}), got {chain[0]} .. {chain[-1]}")
        self.num_inference_steps = len(chain)
        self.timesteps = torch.tensor(chain, dtype=torch.int64, device=device)
        self._set_sampling_chain(torch.tensor(chain[::-1], dtype=torch.int64))

    def previous_timestep(self, timestep: Union[int, torch.Tensor]) -> Union[int, torch.Tensor]:
        """The timestep after `timestep` in the current chain (−1 after the last). Before `set_timesteps` the chain
        is the training chain (t − 1). Accepts an int (returns an int) or a tensor of any shape.

        Raises:
            ValueError: `timestep` outside [0, T) or not in the chain set by `set_timesteps`.
        """
        is_int = not isinstance(timestep, torch.Tensor)
        t = _as_long(timestep, self.timesteps.device)
        self._check_range(t, "timestep")
        prev = self._chain_prev.to(t.device)[t]
        if bool((prev < -1).any()):
            raise ValueError(f"timestep {timestep} is not in the current schedule {self.timesteps.tolist()}")
        return int(prev) if is_int else prev

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (Ho et al. 2020 eq. 4), same float32 arithmetic as DDPMScheduler.

        Args:
            original_samples (`torch.Tensor`): x_0, (B, C, ...).
            noise (`torch.Tensor`): ε, same shape.
            timesteps (`torch.Tensor`): (B,) training timesteps.
        """
        sqrt_ab, sqrt_one_minus_ab = self._sqrt_alpha_terms(original_samples, timesteps)
        return sqrt_ab * original_samples + sqrt_one_minus_ab * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022), the v-prediction target.

        Args:
            sample (`torch.Tensor`): x_0, (B, C, ...).
            noise (`torch.Tensor`): ε, same shape.
            timesteps (`torch.Tensor`): (B,) training timesteps.
        """
        sqrt_ab, sqrt_one_minus_ab = self._sqrt_alpha_terms(sample, timesteps)
        return sqrt_ab * noise - sqrt_one_minus_ab * sample

    def _sqrt_alpha_terms(self, sample: torch.Tensor, timesteps) -> Tuple[torch.Tensor, torch.Tensor]:
        t = _as_long(timesteps, sample.device)
        self._check_range(t, "timesteps")
        alphas_cumprod = self.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)[t].flatten()
        shape = alphas_cumprod.shape + (1,) * (sample.ndim - 1)
        return (alphas_cumprod**0.5).reshape(shape), ((1 - alphas_cumprod) ** 0.5).reshape(shape)

    # ------------------------------------------------------------------------------------------------------------
    # Diffusion quantities (the single source of the math used by step, the losses and the likelihood)
    # ------------------------------------------------------------------------------------------------------------

    def _check_range(self, t: torch.Tensor, name: str, low: int = 0) -> None:
        T = self.config.num_train_timesteps
        if t.numel() and (int(t.min()) < low or int(t.max()) >= T):
            raise ValueError(f"{name} must lie in [{low}, {T}), got values in [{int(t.min())}, {int(t.max())}]")

    @staticmethod
    def _compute_dtype(compute_dtype: Optional[torch.dtype]) -> torch.dtype:
        if compute_dtype is None:
            return torch.float64
        if compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
        return compute_dtype

    def snr(self, timesteps: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t/(1 − ᾱ_t) per timestep, computed in float64 and returned in `dtype`.

        Args:
            timesteps (`torch.Tensor`): training timesteps, any shape.
            dtype (`torch.dtype`, defaults to float32): output dtype.
        """
        device = timesteps.device if isinstance(timesteps, torch.Tensor) else "cpu"
        t = _as_long(timesteps, device)
        self._check_range(t, "timesteps")
        alpha_bar = self._alphas_cumprod_by_dtype[torch.float64].to(device)[t]
        return (alpha_bar / (1 - alpha_bar)).to(dtype)

    def q_mean_variance(
        self, original_samples: torch.Tensor, timesteps: torch.Tensor, compute_dtype: Optional[torch.dtype] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) (Ho et al. 2020 eq. 4).

        Args:
            original_samples (`torch.Tensor`): x_0, (B, C, ...).
            timesteps (`torch.Tensor`): (B,) training timesteps.
            compute_dtype (`torch.dtype`, *optional*): which table to read, float64 (default) or float32.

        Returns:
            `(mean, variance, log_variance)` in the input dtype; mean is (B, C, ...), the others (B, 1, ...).
        """
        dtype = self._compute_dtype(compute_dtype)
        t = _as_long(timesteps, original_samples.device)
        self._check_range(t, "timesteps")
        alpha_bar = _extract(self._alphas_cumprod_by_dtype[dtype].to(t.device), t, original_samples.ndim)
        mean = alpha_bar**0.5 * original_samples.to(dtype)
        variance = 1 - alpha_bar
        out = original_samples.dtype
        return mean.to(out), variance.to(out), torch.log(variance).to(out)

    def q_posterior_mean_variance(
        self,
        original_samples: torch.Tensor,
        noisy_samples: torch.Tensor,
        timesteps: torch.Tensor,
        prev_timesteps: Optional[torch.Tensor] = None,
        compute_dtype: Optional[torch.dtype] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Posterior q(x_prev | x_t, x_0) = N(μ̃, β̃' I) of one chain step (Ho et al. 2020 eq. 6-7, IDM eq. 10-12).

        Args:
            original_samples (`torch.Tensor`): x_0, (B, C, ...).
            noisy_samples (`torch.Tensor`): x_t, (B, C, ...).
            timesteps (`torch.Tensor`): (B,) training timesteps t.
            prev_timesteps (`torch.Tensor`, *optional*): (B,) earlier timesteps of a respaced chain (−1: ᾱ_prev = 1);
                default t − 1 (the training chain, read from its tables).
            compute_dtype (`torch.dtype`, *optional*): which tables to read, float64 (default) or float32.

        Returns:
            `(mean, variance, log_variance_clipped)` in the promoted input dtype. At the chain's first step (prev = −1,
            β̃' = 0) the log variance is that of the next step of the same chain (IDM): t + 1 for the training chain;
            for explicit `prev_timesteps`, the chain set by `set_timesteps` when it contains t.
        """
        dtype = self._compute_dtype(compute_dtype)
        out = torch.promote_types(original_samples.dtype, noisy_samples.dtype)
        c = self._coefficients_at(timesteps, prev_timesteps, dtype, noisy_samples)
        mean = c["coef_x0"] * original_samples.to(dtype) + c["coef_xt"] * noisy_samples.to(dtype)
        return mean.to(out), c["posterior_variance"].to(out), c["posterior_log_variance_clipped"].to(out)

    def split_model_output(
        self, model_output: torch.Tensor, sample: torch.Tensor
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Split a model output into the prediction (C channels) and, for learned variances, the variance values.

        A 2C-channel output with a fixed `variance_type` is accepted and its variance half dropped (e.g. sampling a
        learned-variance model with DDIM or a fixed variance).

        Returns:
            `(prediction, variance_values)`, `variance_values` is None unless variance_type is learned/learned_range.

        Raises:
            ValueError: learned variance configured but the output lacks the extra C channels, or any other
                channel count.
        """
        channels = sample.shape[1]
        learned = self.config.variance_type in LEARNED_VARIANCE_TYPES
        if model_output.shape[1] == 2 * channels and model_output.shape[2:] == sample.shape[2:]:
            prediction, variance_values = torch.split(model_output, channels, dim=1)
            return prediction, (variance_values if learned else None)
        if learned:
            raise ValueError(
                f"variance_type={self.config.variance_type!r} needs a model output with 2 x {channels} channels "
                f"(prediction + variance), got shape {tuple(model_output.shape)} for a sample of shape "
                f"{tuple(sample.shape)}; use a model with out_channels={2 * channels} or a fixed variance_type"
            )
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model output shape {tuple(model_output.shape)} does not match sample shape {tuple(sample.shape)} "
                f"(nor has 2 x {channels} channels)"
            )
        return model_output, None

    def _threshold(self, x0: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Saharia et al. 2022): per sample s = quantile(|x_0|, ratio) clamped to
        [1, sample_max_value]; x_0 ← clamp(x_0, −s, s)/s."""
        dtype = x0.dtype
        flat = x0.reshape(x0.shape[0], -1)  # (B, C·H·W)
        if dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = torch.clamp(s, min=1, max=self.config.sample_max_value).unsqueeze(1)  # (B, 1)
        return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)

    def _clip(self, x0: torch.Tensor) -> torch.Tensor:
        if self.config.thresholding:
            return self._threshold(x0)
        r = self.config.clip_sample_range
        return x0.clamp(-r, r)

    def _predict_x0_eps(self, prediction, x_t, alpha_prod_t, beta_prod_t):
        """x_0 and ε from the model's prediction (Ho et al. 2020 eq. 15; v: x_0 = √ᾱ x_t − √(1−ᾱ) v)."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (x_t - beta_prod_t**0.5 * prediction) / alpha_prod_t**0.5, prediction
        if kind == "sample":
            return prediction, (x_t - alpha_prod_t**0.5 * prediction) / beta_prod_t**0.5
        if kind == "v_prediction":
            x0 = alpha_prod_t**0.5 * x_t - beta_prod_t**0.5 * prediction
            return x0, alpha_prod_t**0.5 * prediction + beta_prod_t**0.5 * x_t
        raise ValueError(f"prediction_type={kind!r} is not supported; choose one of {PREDICTION_TYPES}")

    def _reverse_moments(
        self, model_output: torch.Tensor, x_t: torch.Tensor, c: Dict[str, torch.Tensor], clip: bool
    ) -> GaussianDiffusionModelOutput:
        """p_θ(x_prev | x_t) from step coefficients `c` (see `_step_table`), in the dtype of the coefficients, then
        cast to the promoted input dtype."""
        dtype = c["alpha_prod_t"].dtype
        out_dtype = torch.promote_types(model_output.dtype, x_t.dtype)
        prediction, variance_values = self.split_model_output(model_output, x_t)
        x_t = x_t.to(dtype)
        # 1. x_0 and ε from the prediction, x_0 clipped or thresholded if asked.
        x0, eps = self._predict_x0_eps(prediction.to(dtype), x_t, c["alpha_prod_t"], c["beta_prod_t"])
        if clip:
            x0 = self._clip(x0)
        # 2. The mean: the posterior mean with x_0 replaced by its prediction (Ho et al. 2020 eq. 11 via eq. 7).
        mean = c["coef_x0"] * x0 + c["coef_xt"] * x_t
        # 3. The variance (IDM Sec. 3.1, eq. 15; Analytic-DPM Theorem 1).
        kind = self.config.variance_type
        if kind in ("fixed_small", "fixed_small_log"):
            variance, log_variance = c["posterior_variance"], c["posterior_log_variance_clipped"]
        elif kind in ("fixed_large", "fixed_large_log", "analytic"):
            # IDM: at the first step the clipped β̃' gives a better decoder likelihood (the Analytic-DPM code does
            # the same for its decoder variance).
            other = c["beta"] if kind != "analytic" else c["analytic_variance"]
            variance = torch.where(c["first"], c["clipped_variance"], other)
            log_variance = torch.log(variance)
        elif kind == "learned":
            log_variance = variance_values.to(dtype)
            variance = torch.exp(log_variance)
        else:  # learned_range
            min_log, max_log = c["posterior_log_variance_clipped"], torch.log(c["beta"])
            frac = (variance_values.to(dtype) + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        return GaussianDiffusionModelOutput(
            mean=mean.to(out_dtype),
            variance=variance.to(out_dtype),
            log_variance=log_variance.to(out_dtype),
            pred_original_sample=x0.to(out_dtype),
            pred_epsilon=eps.to(out_dtype),
        )

    def p_mean_variance(
        self,
        model_output: torch.Tensor,
        noisy_samples: torch.Tensor,
        timesteps: torch.Tensor,
        prev_timesteps: Optional[torch.Tensor] = None,
        clip_denoised: bool = False,
        compute_dtype: Optional[torch.dtype] = None,
    ) -> GaussianDiffusionModelOutput:
        """The model's reverse step p_θ(x_prev | x_t) = N(μ̃(x_t, x̂_0), σ²) for every prediction and variance type.

        Mean: the posterior mean with x_0 replaced by the prediction (Ho et al. 2020 eq. 11 via eq. 7). Variance
        (IDM Sec. 3.1): fixed_small β̃', fixed_large β', learned exp(v), learned_range
        exp(frac·log β' + (1 − frac)·log β̃'_clipped) with frac = (v + 1)/2 (IDM eq. 15), analytic σ*² with λ² = β̃'
        (`analytic_variance`). At the chain's first step log β̃' is IDM-clipped and fixed_large and analytic use the
        clipped β̃' (IDM), which only matters for likelihoods.

        Args:
            model_output (`torch.Tensor`): raw model output, (B, C, ...) or (B, 2C, ...) for learned variances.
            noisy_samples (`torch.Tensor`): x_t, (B, C, ...).
            timesteps (`torch.Tensor`): (B,) training timesteps t.
            prev_timesteps (`torch.Tensor`, *optional*): (B,) previous timesteps of a respaced chain; default t − 1.
            clip_denoised (`bool`, defaults to `False`): clip (or threshold, if configured) the predicted x_0
                before forming the mean.
            compute_dtype (`torch.dtype`, *optional*): which tables to read, float64 (default) or float32 (the
                arithmetic of `step` and diffusers).

        Returns:
            [`GaussianDiffusionModelOutput`] in the promoted input dtype.
        """
        dtype = self._compute_dtype(compute_dtype)
        c = self._coefficients_at(timesteps, prev_timesteps, dtype, noisy_samples)
        return self._reverse_moments(model_output, noisy_samples, c, clip_denoised)

    # ------------------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------------------

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        return_dict: bool = True,
        eta: Optional[float] = None,
        use_clipped_model_output: Optional[bool] = None,
    ) -> Union[GaussianDiffusionSchedulerOutput, Tuple]:
        """One reverse step x_t → x_prev of the current chain (DDPM ancestral or DDIM).

        DDPM (Ho et al. 2020 Alg. 2, respaced per IDM Sec. 4): x_prev = μ̃(x_t, x̂_0) + σ z with σ² from
        `variance_type`, no noise at the chain's last step. DDIM (Song et al. 2021 eq. 12):
        x_prev = √ᾱ' x̂_0 + √(1 − ᾱ' − λ²) ε̂ + σ z with λ² = η² β̃' and σ = λ (σ*(λ) for `variance_type="analytic"`,
        Bao et al. 2022). x̂_0 is clipped/thresholded per config.

        Args:
            model_output (`torch.Tensor`): the model's output at `timestep`, (B, C, ...) or (B, 2C, ...).
            timestep (`int` or `torch.Tensor`): the current training timestep (an element of `self.timesteps`).
            sample (`torch.Tensor`): x_t, (B, C, ...).
            generator (`torch.Generator` or list, *optional*): RNG for the noise (reproducible sampling).
            return_dict (`bool`, defaults to `True`): return a [`GaussianDiffusionSchedulerOutput`] or a tuple.
            eta (`float`, *optional*): DDIM η for this step (as `DDIMScheduler.step`); default `config.eta`.
                DDIM mode only: the DDPM sampler's variance is `variance_type`, so a value there is an error.
            use_clipped_model_output (`bool`, *optional*): DDIM mode only, as `DDIMScheduler.step`: re-derive ε̂
                from the clipped x̂_0 before forming the direction term (default False). In DDPM mode the mean is
                always formed from the clipped x̂_0, so a value there is an error.

        Returns:
            [`GaussianDiffusionSchedulerOutput`] or `(prev_sample, pred_original_sample)`.

        Raises:
            ValueError: `eta` / `use_clipped_model_output` given with `sampler="ddpm"`; a negative or non-finite
                `eta`; `timestep` not on the current chain; a model output of the wrong shape.
        """
        ddim = self.config.sampler == "ddim"
        if not ddim:
            for name, value in (("eta", eta), ("use_clipped_model_output", use_clipped_model_output)):
                if value is not None:
                    raise ValueError(
                        f"{name}={value!r} is a DDIM argument (DDIMScheduler.step) but this scheduler has "
                        "sampler='ddpm', whose variance is set by variance_type and whose mean always uses the "
                        "clipped x0; use GaussianDiffusionScheduler.from_config(scheduler.config, sampler='ddim')"
                    )
        else:
            eta = self.config.eta if eta is None else eta
            if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
                raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        t = _as_long(timestep, sample.device)
        if t.ndim == 0:
            t = t.expand(sample.shape[0])  # (B,)
        self.previous_timestep(t)  # raises if t is not on the chain
        # Working in the sample's precision reproduces diffusers' float32 arithmetic; half precision computes in
        # float32 and casts back.
        dtype = sample.dtype if sample.dtype in (torch.float32, torch.float64) else torch.float32
        c = self._coefficients("sample", dtype, t, sample.ndim)
        clip = bool(self.config.thresholding or self.config.clip_sample)
        out = self._reverse_moments(model_output, sample, c, clip)
        # No noise on the step onto the data (Ho et al. 2020 Alg. 2: z = 0 at t = 1).
        keep_noise = (~c["first"]).to(dtype)  # (B, 1, ...)
        last_step = not bool(keep_noise.any())
        analytic = self.config.variance_type == "analytic"
        if ddim:
            a_prev = c["alpha_prod_prev"]
            std = eta * c["posterior_variance"] ** 0.5  # λ
            eps = out.pred_epsilon
            if use_clipped_model_output:
                eps = (sample - c["alpha_prod_t"] ** 0.5 * out.pred_original_sample) / c["beta_prod_t"] ** 0.5
            direction = torch.clamp(1 - a_prev - std**2, min=0) ** 0.5 * eps
            prev_sample = a_prev**0.5 * out.pred_original_sample + direction
            if analytic:  # σ*(λ) in float64 (Analytic-DDIM; λ = 0 still adds noise)
                c64 = c if dtype == torch.float64 else self._coefficients("sample", torch.float64, t, sample.ndim)
                gamma = _extract(self._analytic_gamma.to(t.device), t, sample.ndim)
                lambda_sq = eta**2 * c64["posterior_variance"]
                std = analytic_variance(c64["alpha_prod_t"], c64["alpha_prod_prev"], lambda_sq, gamma,
                                        self.config.clip_sample_range).to(dtype) ** 0.5
        else:
            prev_sample = out.mean
            if self.config.variance_type in ("fixed_small", "fixed_large", "analytic"):
                std = out.variance**0.5
            else:  # log-space types (incl. learned) form σ from log σ², as DDPMScheduler does
                std = torch.exp(0.5 * out.log_variance)
        if (not ddim or eta > 0 or analytic) and not last_step:
            noise = randn_tensor(out.mean.shape, generator=generator, device=sample.device, dtype=out.mean.dtype)
            prev_sample = prev_sample + std * noise * keep_noise
        prev_sample = prev_sample.to(sample.dtype)
        pred_original_sample = out.pred_original_sample.to(sample.dtype)
        if not return_dict:
            return prev_sample, pred_original_sample
        return GaussianDiffusionSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


_register_in_diffusers_namespace(GaussianDiffusionScheduler)
