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
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
BETA_SCHEDULE_ALIASES = {"cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
SAMPLERS = ("ddpm", "ddim")


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
    betas = []
    for i in range(num_train_timesteps):
        t1, t2 = i / num_train_timesteps, (i + 1) / num_train_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return betas


def rescale_betas_to_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ so that ᾱ_{T−1} = 0 while ᾱ_0 is unchanged (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas=None,
    rescale_betas_zero_snr: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
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


def _validate_config(cfg: dict) -> None:
    """Check the constructor arguments before anything is computed: types first (TypeError), then ranges
    (ValueError), each message naming the field. The β values themselves are checked after they are built
    (see `_check_betas`), since their range depends on the schedule."""
    T = cfg["num_train_timesteps"]
    if isinstance(T, bool) or not isinstance(T, int):
        raise TypeError(f"num_train_timesteps must be a positive int, got {T!r} ({type(T).__name__})")
    if T < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {T!r}")
    choices = (
        ("beta_schedule", BETA_SCHEDULES + tuple(BETA_SCHEDULE_ALIASES)),
        ("variance_type", VARIANCE_TYPES),
        ("prediction_type", PREDICTION_TYPES),
        ("timestep_spacing", TIMESTEP_SPACINGS),
        ("sampler", SAMPLERS),
    )
    for name, allowed in choices:
        value = cfg[name]
        if not isinstance(value, str):  # checked first: an unhashable value would fail the lookup obscurely
            raise TypeError(f"{name}={value!r} must be a string, one of {allowed}")
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not supported; choose one of {allowed}")
    for name in ("clip_sample", "thresholding", "rescale_betas_zero_snr"):
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
        raise ValueError(f"dynamic_thresholding_ratio must be a quantile in [0, 1], got {cfg['dynamic_thresholding_ratio']!r}")
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
    betas = cfg["trained_betas"]
    if betas is not None:
        if isinstance(betas, (str, bytes)):
            raise TypeError(f"trained_betas must be a sequence of numbers, got {betas!r}")
        try:
            np.asarray(betas, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"trained_betas must be a sequence of numbers ({exc})") from None


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
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise ValueError(f"timesteps must be integers, got {t}")
    return t.long()


def _broadcast(coef: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) or () -> (B, 1, ..., 1) so it broadcasts over a (B, C, ...) sample."""
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (ndim - coef.ndim))


class GaussianDiffusionScheduler(SchedulerMixin, ConfigMixin):
    """Discrete Gaussian diffusion of DDPM / improved-diffusion, usable wherever `DDPMScheduler` is.

    Sampling follows the DDPM posterior (`sampler="ddpm"`) or the DDIM update with `eta` (`sampler="ddim"`), on
    the full chain or a respaced one (`set_timesteps(50)`, `set_timesteps("ddim50")`, `set_timesteps("10,15,20")`,
    custom timesteps). Respaced chains use β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}} for means and variances (IDM Sec. 4),
    learned variances included. In float32, `step` reproduces `DDPMScheduler.step` / `DDIMScheduler.step`
    arithmetic; the public diffusion quantities (`q_mean_variance`, `q_posterior_mean_variance`,
    `p_mean_variance`, `snr`) compute in float64 by default.

    Deliberate differences from `DDPMScheduler` (all follow IDM):
        * no noise is added at the chain's last step even when its timestep is > 0 (trailing spacing,
          `steps_offset`); DDPMScheduler adds noise whenever t > 0.
        * `variance_type="learned"` reads the model's extra channels as a **log** variance (IDM); DDPMScheduler
          reads them as the variance itself.
        * `variance_type="fixed_large_log"` samples with σ² = β' (DDPMScheduler takes the square root of log β).
        * at the chain's first step (prev = −1, β̃ = 0) the log posterior variance is clipped to that of the next
          step of the chain, and fixed_large uses that variance too (better decoder likelihood); sampling is
          unaffected because no noise is added there.

    DDIM mode matches `DDIMScheduler.step` (with `set_alpha_to_one=True` and `use_clipped_model_output=False`) but
    always steps to the chain's previous timestep (DDIMScheduler uses t − T//n, which differs for "linspace").
    `eta` is a config value, not a `step` argument, so pipelines that pass their own `eta=0.0` cannot override it.

    Args:
        num_train_timesteps (`int`, defaults to 1000): T, the length of the training chain.
        beta_start (`float`, defaults to 0.0001): first β of linear-type schedules.
        beta_end (`float`, defaults to 0.02): last β of linear-type schedules.
        beta_schedule (`str`, defaults to `"linear"`): `"linear"`, `"scaled_linear"`, `"squaredcos_cap_v2"`
            (alias `"cosine"`, IDM eq. 17 with s = 0.008 and β ≤ 0.999), `"sigmoid"` or `"laplace"`.
        trained_betas (array-like, *optional*): explicit β (length T); overrides `beta_schedule`.
        variance_type (`str`, defaults to `"fixed_small"`): `"fixed_small"` (β̃), `"fixed_small_log"`,
            `"fixed_large"` (β), `"fixed_large_log"`, `"learned"` (model's extra C channels are log σ²) or
            `"learned_range"` (extra channels v ∈ [−1, 1] interpolate log β and log β̃, IDM eq. 15).
        clip_sample (`bool`, defaults to `True`): clip the predicted x_0 to ±`clip_sample_range` when sampling.
        prediction_type (`str`, defaults to `"epsilon"`): `"epsilon"`, `"sample"` (x_0) or `"v_prediction"`.
        thresholding (`bool`, defaults to `False`): dynamic thresholding of x_0 (Imagen) instead of clipping.
        dynamic_thresholding_ratio (`float`, defaults to 0.995): quantile of |x_0| used by thresholding.
        clip_sample_range (`float`, defaults to 1.0): clipping bound.
        sample_max_value (`float`, defaults to 1.0): upper bound of the thresholding scale.
        timestep_spacing (`str`, defaults to `"leading"`): `"leading"`, `"linspace"` or `"trailing"`, how
            `set_timesteps(int)` picks timesteps (Lin et al. 2023, Table 2).
        steps_offset (`int`, defaults to 0): added to "leading" timesteps.
        rescale_betas_zero_snr (`bool`, defaults to `False`): rescale β to zero terminal SNR (Lin et al. 2023).
        sampler (`str`, defaults to `"ddpm"`): `"ddpm"` (ancestral posterior sampling) or `"ddim"`.
        eta (`float`, defaults to 0.0): DDIM η (0 = deterministic, 1 = DDPM-like variance); used when
            `sampler="ddim"`.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        sampler: str = "ddpm",
        eta: float = 0.0,
    ):
        config_args = dict(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, variance_type=variance_type,
            clip_sample=clip_sample, prediction_type=prediction_type, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio, clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr, sampler=sampler, eta=eta,
        )
        _validate_config(config_args)
        if beta_schedule in BETA_SCHEDULE_ALIASES:
            # Store the diffusers name so DDPMScheduler.from_config(our config) works.
            beta_schedule = BETA_SCHEDULE_ALIASES[beta_schedule]
            self.register_to_config(beta_schedule=beta_schedule)

        args = (num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr)
        # float32 tables match DDPMScheduler bit for bit; float64 ones serve likelihood-grade computations.
        self.betas = make_betas(*args, dtype=torch.float32)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        _check_betas(self.betas, self.alphas_cumprod, config_args)
        betas64 = make_betas(*args, dtype=torch.float64)
        self._alphas_cumprod64 = torch.cumprod(1.0 - betas64, dim=0)
        self._table_cache = {}

        self.init_noise_sigma = 1.0
        self.variance_type = variance_type
        self.num_inference_steps = None
        self.custom_timesteps = False
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._chain_set = False  # False: the chain is the full training chain (prev = t − 1)

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
            self.custom_timesteps = True
        elif respacing is not None:
            chain = parse_respacing(respacing, T)[::-1]
            self.custom_timesteps = True
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
            self.custom_timesteps = False
        if chain[0] >= T or chain[-1] < 0:
            raise ValueError(f"timesteps must lie in [0, {T}), got {chain[0]} .. {chain[-1]}")
        self.num_inference_steps = len(chain)
        self.timesteps = torch.tensor(chain, dtype=torch.int64, device=device)
        self._chain_set = True

    def previous_timestep(self, timestep: Union[int, torch.Tensor]) -> Union[int, torch.Tensor]:
        """The timestep after `timestep` in the current chain (−1 after the last). Before `set_timesteps` the chain
        is the training chain (t − 1). Accepts an int (returns an int) or a tensor of any shape.

        Raises:
            ValueError: `timestep` outside [0, T) or not in the chain set by `set_timesteps`.
        """
        is_int = not isinstance(timestep, torch.Tensor)
        t = _as_long(timestep, self.timesteps.device)
        self._check_range(t, "timestep")
        if not self._chain_set:
            prev = t - 1
        else:
            ascending = self.timesteps.flip(0).to(t.device).contiguous()
            idx = torch.searchsorted(ascending, t.contiguous()).clamp(max=ascending.numel() - 1)
            if not bool((ascending[idx] == t).all()):
                raise ValueError(f"timestep {timestep} is not in the current schedule {self.timesteps.tolist()}")
            prev = torch.where(idx > 0, ascending[(idx - 1).clamp(min=0)], torch.full_like(t, -1))
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

    def _alphas_cumprod_table(self, dtype: torch.dtype, device) -> torch.Tensor:
        key = (dtype, str(device))
        if key not in self._table_cache:
            source = self._alphas_cumprod64 if dtype == torch.float64 else self.alphas_cumprod
            self._table_cache[key] = source.to(device=device, dtype=dtype)
        return self._table_cache[key]

    def _next_in_chain(self, t: torch.Tensor, use_schedule: bool) -> torch.Tensor:
        """For the chain's first step (t → −1): the timestep before t in the chain (IDM clips log β̃ with it)."""
        T = self.config.num_train_timesteps
        successor = t + 1
        if use_schedule and self._chain_set:
            ascending = self.timesteps.flip(0).to(t.device).contiguous()
            idx = torch.searchsorted(ascending, t.contiguous()).clamp(max=ascending.numel() - 1)
            in_chain = (ascending[idx] == t) & (idx + 1 < ascending.numel())
            successor = torch.where(in_chain, ascending[(idx + 1).clamp(max=ascending.numel() - 1)], successor)
        return successor.clamp(max=T - 1)

    def _chain_terms(self, timesteps, prev_timesteps, dtype: torch.dtype, device) -> dict:
        """Per-example (B,) coefficients of one chain step t → prev in `dtype`.

        With ᾱ' = ᾱ_prev (1 when prev = −1): β' = 1 − ᾱ_t/ᾱ' (IDM Sec. 4 respacing; β_t when prev = t − 1),
        β̃' = (1 − ᾱ')/(1 − ᾱ_t)·β' and μ̃ = √ᾱ'β'/(1 − ᾱ_t)·x_0 + √(1 − β')(1 − ᾱ')/(1 − ᾱ_t)·x_t
        (Ho et al. 2020 eq. 6-7). The operation order reproduces DDPMScheduler's float32 arithmetic.
        """
        t = _as_long(timesteps, device)
        self._check_range(t, "timesteps")
        if prev_timesteps is None:
            prev = t - 1
        else:
            prev = _as_long(prev_timesteps, device).expand_as(t) if t.ndim else _as_long(prev_timesteps, device)
            self._check_range(prev, "prev_timesteps", low=-1)
            if bool((prev >= t).any()):
                raise ValueError("prev_timesteps must be earlier than timesteps (prev < t)")
        table = self._alphas_cumprod_table(dtype, device)
        one = torch.ones((), dtype=dtype, device=device)

        def step_terms(t_, prev_):
            a_t = table[t_]
            a_prev = torch.where(prev_ >= 0, table[prev_.clamp(min=0)], one)
            beta_prod_t, beta_prod_prev = 1 - a_t, 1 - a_prev
            alpha_step = a_t / a_prev
            beta_step = 1 - alpha_step
            posterior_variance = beta_prod_prev / beta_prod_t * beta_step
            return a_t, a_prev, beta_prod_t, alpha_step, beta_step, beta_prod_prev, posterior_variance

        a_t, a_prev, beta_prod_t, alpha_step, beta_step, beta_prod_prev, posterior_variance = step_terms(t, prev)
        # log β̃ is −∞ at the chain's first step; IDM uses the next step's β̃ there (the "clipped" log variance).
        first = prev < 0
        clipped_variance = posterior_variance
        if bool(first.any()):
            succ = self._next_in_chain(t, use_schedule=prev_timesteps is not None)
            next_variance = step_terms(succ, t)[-1]
            # A one-step chain has no next step: fall back to β' (the fixed_large variance).
            next_variance = torch.where(succ > t, next_variance, beta_step)
            clipped_variance = torch.where(first, next_variance, posterior_variance)
        return {
            "alpha_prod_t": a_t,
            "alpha_prod_prev": a_prev,
            "beta_prod_t": beta_prod_t,
            "beta": beta_step,
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": torch.log(torch.clamp(clipped_variance, min=1e-20)),
            "clipped_variance": clipped_variance,
            "coef_x0": a_prev**0.5 * beta_step / beta_prod_t,
            "coef_xt": alpha_step**0.5 * beta_prod_prev / beta_prod_t,
            "first": first,
        }

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
        alpha_bar = self._alphas_cumprod_table(torch.float64, device)[t]
        return (alpha_bar / (1 - alpha_bar)).to(dtype)

    def q_mean_variance(
        self, original_samples: torch.Tensor, timesteps: torch.Tensor, compute_dtype: Optional[torch.dtype] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) (Ho et al. 2020 eq. 4).

        Args:
            original_samples (`torch.Tensor`): x_0, (B, C, ...).
            timesteps (`torch.Tensor`): (B,) training timesteps.
            compute_dtype (`torch.dtype`, *optional*): internal precision (default float64).

        Returns:
            `(mean, variance, log_variance)` in the input dtype; mean is (B, C, ...), the others (B, 1, ...).
        """
        dtype = self._compute_dtype(compute_dtype)
        t = _as_long(timesteps, original_samples.device)
        self._check_range(t, "timesteps")
        alpha_bar = _broadcast(self._alphas_cumprod_table(dtype, original_samples.device)[t], original_samples.ndim)
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
                default t − 1 (the training chain).
            compute_dtype (`torch.dtype`, *optional*): internal precision (default float64).

        Returns:
            `(mean, variance, log_variance_clipped)` in the promoted input dtype. At the chain's first step (prev = −1,
            β̃' = 0) the log variance is that of the next step of the same chain (IDM): t + 1 for the training chain;
            for explicit `prev_timesteps`, the chain set by `set_timesteps` when it contains t.
        """
        dtype = self._compute_dtype(compute_dtype)
        out = torch.promote_types(original_samples.dtype, noisy_samples.dtype)
        terms = self._chain_terms(timesteps, prev_timesteps, dtype, noisy_samples.device)
        nd = noisy_samples.ndim
        mean = _broadcast(terms["coef_x0"], nd) * original_samples.to(dtype) + _broadcast(
            terms["coef_xt"], nd
        ) * noisy_samples.to(dtype)
        variance = _broadcast(terms["posterior_variance"], nd)
        log_variance = _broadcast(terms["posterior_log_variance_clipped"], nd)
        return mean.to(out), variance.to(out), log_variance.to(out)

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
        exp(frac·log β' + (1 − frac)·log β̃'_clipped) with frac = (v + 1)/2 (IDM eq. 15). At the chain's first step
        log β̃' is IDM-clipped and fixed_large uses the clipped β̃' (IDM), which only matters for likelihoods.

        Args:
            model_output (`torch.Tensor`): raw model output, (B, C, ...) or (B, 2C, ...) for learned variances.
            noisy_samples (`torch.Tensor`): x_t, (B, C, ...).
            timesteps (`torch.Tensor`): (B,) training timesteps t.
            prev_timesteps (`torch.Tensor`, *optional*): (B,) previous timesteps of a respaced chain; default t − 1.
            clip_denoised (`bool`, defaults to `False`): clip (or threshold, if configured) the predicted x_0
                before forming the mean.
            compute_dtype (`torch.dtype`, *optional*): internal precision (default float64; `step` uses the
                sample's dtype to match diffusers).

        Returns:
            [`GaussianDiffusionModelOutput`] in the promoted input dtype.
        """
        dtype = self._compute_dtype(compute_dtype)
        out_dtype = torch.promote_types(model_output.dtype, noisy_samples.dtype)
        prediction, variance_values = self.split_model_output(model_output, noisy_samples)
        terms = self._chain_terms(timesteps, prev_timesteps, dtype, noisy_samples.device)
        nd = noisy_samples.ndim
        x_t = noisy_samples.to(dtype)

        def b(key):  # (B,) -> (B, 1, ...)
            return _broadcast(terms[key], nd)

        x0, eps = self._predict_x0_eps(prediction.to(dtype), x_t, b("alpha_prod_t"), b("beta_prod_t"))
        if clip_denoised:
            x0 = self._clip(x0)
        mean = b("coef_x0") * x0 + b("coef_xt") * x_t

        kind = self.config.variance_type
        if kind in ("fixed_small", "fixed_small_log"):
            variance, log_variance = b("posterior_variance"), b("posterior_log_variance_clipped")
        elif kind in ("fixed_large", "fixed_large_log"):
            # IDM: β' except at the first step, where the clipped β̃' gives a better decoder likelihood.
            variance = torch.where(b("first"), b("clipped_variance"), b("beta"))
            log_variance = torch.log(variance)
        elif kind == "learned":
            log_variance = variance_values.to(dtype)
            variance = torch.exp(log_variance)
        else:  # learned_range
            min_log, max_log = b("posterior_log_variance_clipped"), torch.log(b("beta"))
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
    ) -> Union[GaussianDiffusionSchedulerOutput, Tuple]:
        """One reverse step x_t → x_prev of the current chain (DDPM ancestral or DDIM with `config.eta`).

        DDPM (Ho et al. 2020 Alg. 2, respaced per IDM Sec. 4): x_prev = μ̃(x_t, x̂_0) + σ z, no noise at the chain's
        last step. DDIM (Song et al. 2021 eq. 12): x_prev = √ᾱ' x̂_0 + √(1 − ᾱ' − σ²) ε̂ + σ z with
        σ² = η² β̃'. x̂_0 is clipped/thresholded per config.

        Args:
            model_output (`torch.Tensor`): the model's output at `timestep`, (B, C, ...) or (B, 2C, ...).
            timestep (`int` or `torch.Tensor`): the current training timestep (an element of `self.timesteps`).
            sample (`torch.Tensor`): x_t, (B, C, ...).
            generator (`torch.Generator` or list, *optional*): RNG for the noise (reproducible sampling).
            return_dict (`bool`, defaults to `True`): return a [`GaussianDiffusionSchedulerOutput`] or a tuple.

        Returns:
            [`GaussianDiffusionSchedulerOutput`] or `(prev_sample, pred_original_sample)`.
        """
        t = _as_long(timestep, sample.device)
        if t.ndim == 0:
            t = t.expand(sample.shape[0])  # (B,)
        prev = self.previous_timestep(t.to(self.timesteps.device)).to(sample.device)
        # Working in the sample's precision reproduces diffusers' float32 arithmetic; half precision computes in
        # float32 and casts back.
        compute_dtype = sample.dtype if sample.dtype in (torch.float32, torch.float64) else torch.float32
        clip = bool(self.config.thresholding or self.config.clip_sample)
        out = self.p_mean_variance(
            model_output, sample, t, prev_timesteps=prev, clip_denoised=clip, compute_dtype=compute_dtype
        )
        # The chain's last step (prev = −1) returns the mean: no noise (Ho et al. 2020 Alg. 2, z = 0 at t = 1).
        keep_noise = _broadcast((prev >= 0).to(compute_dtype), sample.ndim)  # (B, 1, ...)
        last_step = not bool(keep_noise.any())
        noise_shape = out.mean.shape
        if self.config.sampler == "ddim":
            terms = self._chain_terms(t, prev, compute_dtype, sample.device)
            a_prev = _broadcast(terms["alpha_prod_prev"], sample.ndim)
            std = self.config.eta * _broadcast(terms["posterior_variance"], sample.ndim) ** 0.5
            direction = torch.clamp(1 - a_prev - std**2, min=0) ** 0.5 * out.pred_epsilon
            prev_sample = a_prev**0.5 * out.pred_original_sample + direction
            if self.config.eta > 0 and not last_step:
                noise = randn_tensor(noise_shape, generator=generator, device=sample.device, dtype=out.mean.dtype)
                prev_sample = prev_sample + std * noise * keep_noise
        else:
            prev_sample = out.mean
            if not last_step:
                noise = randn_tensor(noise_shape, generator=generator, device=sample.device, dtype=out.mean.dtype)
                if self.config.variance_type in ("fixed_small", "fixed_large"):
                    std = out.variance**0.5
                else:  # log-space types (incl. learned) form σ from log σ², as DDPMScheduler does
                    std = torch.exp(0.5 * out.log_variance)
                prev_sample = prev_sample + std * noise * keep_noise
        prev_sample = prev_sample.to(sample.dtype)
        pred_original_sample = out.pred_original_sample.to(sample.dtype)
        if not return_dict:
            return prev_sample, pred_original_sample
        return GaussianDiffusionSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
