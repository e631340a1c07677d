"""Progressive distillation (Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models",
ICLR 2022): a student learns to take one deterministic DDIM step where its teacher takes two, and the halving
repeats (e.g. 512 → 256 → … → 4 steps), each round's student becoming the next round's teacher.

With z_t = α_t x + σ_t ε (α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t)) the DDIM step from t to s with the prediction x̂(z_t) is
(paper eq. 3 / Alg. 2)

    z_s = α_s x̂ + (σ_s / σ_t)(z_t − α_t x̂),

two teacher steps t → t' → t'' give z_t'', and the student's target is the x̃ whose single step lands there
(Alg. 2):

    x̃ = (z_t'' − (σ_t''/σ_t) z_t) / (α_t'' − (σ_t''/σ_t) α_t),

learned with the x-space loss weighted by the truncated SNR, max(α_t²/σ_t², 1) (Sec. 4, "truncated SNR").
t'' = −1 is the data itself (ᾱ = 1, σ = 0), where x̃ is the teacher's last x̂.

Time is the teacher's: its T discrete timesteps and its float32 ᾱ table. A chain of N steps uses the "trailing"
timesteps round(T − iT/N) − 1, i = 0 … N − 1, then −1 (:func:`student_timesteps`); the chain of N/2 steps is every
second point of the chain of N, so each round's grid is a subset of its teacher's and of the teacher's integer
timesteps. Each student is saved with a scheduler whose ``set_timesteps(N)`` gives exactly that chain
(:func:`student_scheduler`): diffusers' ``DDIMScheduler`` (trailing spacing, ``set_alpha_to_one=True``,
``steps_offset=0``) whenever N divides T, where its step t → t − T/N is the chain's; otherwise our
``GaussianDiffusionScheduler(sampler="ddim")``, which steps to the chain's previous timestep.

The student is a copy of its teacher's UNet (same class and weights). A teacher with a learned variance (2C
outputs) gives a student with C outputs: the deterministic sampler never reads the variance channels, so they
are dropped (the output layer keeps its first C filters, the prediction's) instead of drifting untrained, and
the student then works with every diffusers scheduler and pipeline, ``DDIMPipeline`` included. The student
predicts v by default (or x0): an ε-student cannot take the last steps, where x̂ = (z − σ ε̂)/α multiplies ε̂'s
error by σ/α (paper Sec. 4), so ε is refused.

:func:`run_distillation` runs the rounds with :class:`~diffusers_ddpm_ext.trainer.Trainer` (the distillation loss
as its ``loss_fn``, t drawn from the round's grid by :class:`GridTimestepSampler`): the checkpoints, resume,
output-folder lock, stop signals and progress of ``training/train.py``; ``training/distill.py`` is its command line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .scheduler import PREDICTION_TYPES as TEACHER_PREDICTION_TYPES
from .timestep_sampler import TimestepSampler

logger = logging.getLogger(__name__)

STUDENT_PREDICTION_TYPES = ("v_prediction", "sample")
# The scheduler keys that define ᾱ: copied from the teacher's config into every student scheduler.
_BETA_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
              "rescale_betas_zero_snr")
STUDENT_DIR = "student-{steps}-steps"
ROUND_DIR = "round-{index:02d}"
PAPER = "Salimans & Ho, ICLR 2022"


# ------------------------------------------------------------------------------------------------ timesteps


def student_timesteps(num_train_timesteps: int, num_steps: int) -> List[int]:
    """The N descending timesteps of an N-step chain over T training timesteps ("trailing" spacing,
    round(T − iT/N) − 1; the chain then ends at −1, the data). The same numbers as ``DDIMScheduler`` /
    ``GaussianDiffusionScheduler`` ``set_timesteps(N)`` with ``timestep_spacing="trailing"``.

    Raises:
        ValueError: N not an integer in [1, T].
    """
    T = num_train_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= T:
        raise ValueError(f"the number of steps must be an integer in [1, {T}] (the teacher's training timesteps), "
                         f"got {num_steps!r}")
    chain = (np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1).tolist()
    if len(chain) != num_steps or any(b >= a for a, b in zip(chain, chain[1:])):
        raise ValueError(f"{num_steps} trailing steps over T={T} do not give {num_steps} distinct timesteps: {chain}")
    return chain


def default_teacher_steps(num_train_timesteps: int, student_steps: int) -> int:
    """The largest student_steps · 2^R (R ≥ 1) that is at most T: the longest chain that halves to the student."""
    steps = 2 * student_steps
    if steps > num_train_timesteps:
        raise ValueError(f"--student_steps {student_steps} leaves no room to halve: the teacher's chain would need "
                         f"{steps} of its {num_train_timesteps} timesteps")
    while 2 * steps <= num_train_timesteps:
        steps *= 2
    return steps


def plan_rounds(num_train_timesteps: int, teacher_steps: int, student_steps: int) -> List[int]:
    """The student's step count of every round, e.g. (1000, 64, 4) → [32, 16, 8, 4].

    Raises:
        ValueError: naming the bad value: ``teacher_steps`` must be ``student_steps`` · 2^R (R ≥ 1) and at most T,
            and every round's chain must be every second timestep of the one before.
    """
    for name, value in (("student_steps", student_steps), ("teacher_steps", teacher_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value!r}")
    ratio = teacher_steps // student_steps
    if teacher_steps % student_steps or ratio < 2 or ratio & (ratio - 1):
        allowed = [student_steps * 2**r for r in range(1, 11) if student_steps * 2**r <= num_train_timesteps]
        raise ValueError(f"--teacher_steps {teacher_steps} must be --student_steps {student_steps} times a power of "
                         f"two (each round halves the steps): one of {allowed}")
    if teacher_steps > num_train_timesteps:
        raise ValueError(f"--teacher_steps {teacher_steps} exceeds the teacher's {num_train_timesteps} training "
                         f"timesteps")
    rounds, steps = [], teacher_steps
    while steps > student_steps:
        parent, steps = student_timesteps(num_train_timesteps, steps), steps // 2
        if student_timesteps(num_train_timesteps, steps) != parent[::2]:  # rounding ties could break nesting
            raise ValueError(f"the {steps}-step chain over T={num_train_timesteps} is not every second timestep of "
                             f"the {2 * steps}-step chain; choose another --teacher_steps")
        rounds.append(steps)
    return rounds


class GridTimestepSampler(TimestepSampler):
    """Draws t uniformly from a student's timesteps (Alg. 2: t = i/N, i ~ U{1..N}); weights 1, no state."""

    def __init__(self, num_timesteps: int, timesteps: Sequence[int]):
        super().__init__(num_timesteps)
        self.grid = torch.tensor(list(timesteps), dtype=torch.long)
        if self.grid.numel() == 0 or int(self.grid.min()) < 0 or int(self.grid.max()) >= num_timesteps:
            raise ValueError(f"grid timesteps must lie in [0, {num_timesteps}), got {list(timesteps)}")

    def probabilities(self) -> torch.Tensor:
        probs = torch.zeros(self.num_timesteps, dtype=torch.float64)
        probs[self.grid] = 1.0 / self.grid.numel()
        return probs

    def sample(self, batch_size, device="cpu", generator=None):
        draw_device = generator.device if generator is not None else torch.device("cpu")
        index = torch.randint(0, self.grid.numel(), (batch_size,), generator=generator, device=draw_device)
        return self.grid.to(draw_device)[index].to(device), torch.ones(batch_size, device=device)


# ------------------------------------------------------------------------------------------------ the math


def alpha_sigma(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, ndim: int = 4):
    """(α_t, σ_t) = (√ᾱ_t, √(1 − ᾱ_t)) as (B, 1, …) float64 tensors; t = −1 is the data (α = 1, σ = 0)."""
    table = alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)
    t = timesteps.long().reshape(-1)
    alpha_bar = torch.where(t >= 0, table[t.clamp(min=0)], torch.ones_like(t, dtype=torch.float64))
    shape = (-1,) + (1,) * (ndim - 1)
    return alpha_bar.sqrt().reshape(shape), (1 - alpha_bar).clamp(min=0).sqrt().reshape(shape)


def predict_x0(model_output, z, alpha, sigma, prediction_type: str):
    """x̂ from a model's prediction: ε → (z − σ ε)/α, x0 → itself, v → α z − σ v (paper Sec. 4 / App. D)."""
    if prediction_type == "epsilon":
        return (z - sigma * model_output) / alpha
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * z - sigma * model_output
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; choose one of {TEACHER_PREDICTION_TYPES}")


def prediction_from_x0(x0, z, alpha, sigma, prediction_type: str):
    """The model output that :func:`predict_x0` turns into ``x0`` (ε = (z − α x)/σ, v = (α z − x)/σ)."""
    if prediction_type == "epsilon":
        return (z - alpha * x0) / sigma
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return (alpha * z - x0) / sigma
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; choose one of {TEACHER_PREDICTION_TYPES}")


def ddim_step(x0, z_t, alpha_t, sigma_t, alpha_s, sigma_s):
    """Deterministic DDIM step t → s: z_s = α_s x̂ + (σ_s/σ_t)(z_t − α_t x̂) (paper eq. 3, η = 0)."""
    return alpha_s * x0 + (sigma_s / sigma_t) * (z_t - alpha_t * x0)


def distillation_target(z_t, z_t2, alpha_t, sigma_t, alpha_t2, sigma_t2):
    """The student's x-target for one step t → t'' that lands on the teacher's two-step z_t'' (Alg. 2):
    x̃ = (z_t'' − (σ_t''/σ_t) z_t) / (α_t'' − (σ_t''/σ_t) α_t)."""
    ratio = sigma_t2 / sigma_t
    return (z_t2 - ratio * z_t) / (alpha_t2 - ratio * alpha_t)


def truncated_snr_weight(alpha, sigma):
    """max(SNR, 1) = max(α²/σ², 1), the paper's "truncated SNR" weighting of the x-space loss (Sec. 4)."""
    return torch.clamp(alpha**2 / sigma**2, min=1.0)


def model_x0(model, z, timesteps, alphas_cumprod, prediction_type: str, clip_sample: bool = False):
    """x̂(z_t) of a UNet (float64; only its first C output channels: a learned variance's are ignored)."""
    alpha, sigma = alpha_sigma(alphas_cumprod, timesteps, z.ndim)
    z = z.float()  # what the model sees: x̂ must be consistent with it
    out = model(z, timesteps).sample[:, : z.shape[1]]
    x0 = predict_x0(out.double(), z.double(), alpha, sigma, prediction_type)
    return x0.clamp(-1, 1) if clip_sample else x0


@torch.no_grad()
def ddim_sample(model, alphas_cumprod, timesteps: Sequence[int], prediction_type: str, noise: torch.Tensor,
                clip_sample: bool = False) -> torch.Tensor:
    """The reference sampler: deterministic DDIM through ``timesteps`` (descending) and then to the data (−1),
    from ``noise`` (B, C, H, W); float64 between steps, float32 into the model. Returns x (float32)."""
    z = noise.double()
    chain = [int(t) for t in timesteps] + [-1]
    for t, s in zip(chain, chain[1:]):
        tt = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
        x0 = model_x0(model, z, tt, alphas_cumprod, prediction_type, clip_sample)
        a_t, s_t = alpha_sigma(alphas_cumprod, tt, z.ndim)
        a_s, s_s = alpha_sigma(alphas_cumprod, torch.full_like(tt, s), z.ndim)
        z = ddim_step(x0, z, a_t, s_t, a_s, s_s)
    return z.float()


@dataclasses.dataclass
class DistillationLossOutput:
    """What :class:`ProgressiveDistillationLoss` returns to the Trainer: ``loss`` (B,) = max(SNR, 1)·‖x̂ − x̃‖²/d,
    ``unweighted_loss`` = ``mse`` (B,) = ‖x̂ − x̃‖²/d."""

    loss: torch.Tensor
    unweighted_loss: torch.Tensor
    mse: torch.Tensor


class ProgressiveDistillationLoss:
    """The Trainer's ``loss_fn`` for one round: the teacher's two DDIM steps from the Trainer's z_t, the target x̃,
    and the student's truncated-SNR-weighted x-space error (Alg. 2).

    Args:
        teacher: the teacher UNet (called as ``teacher(z, t).sample``; extra output channels are ignored).
        alphas_cumprod: the teacher's (T,) ᾱ table (float32, as its scheduler samples).
        student_steps: N, the student's step count; the teacher takes 2N steps over the same span.
        teacher_prediction_type, student_prediction_type: what each model predicts.
        clip_sample: clip the teacher's x̂ to [−1, 1] in its two steps (as a ``clip_sample`` sampler does).
    """

    def __init__(self, teacher, alphas_cumprod: torch.Tensor, student_steps: int, teacher_prediction_type: str,
                 student_prediction_type: str = "v_prediction", clip_sample: bool = False):
        check_student_prediction_type(student_prediction_type)
        if teacher_prediction_type not in TEACHER_PREDICTION_TYPES:
            raise ValueError(f"the teacher's prediction_type {teacher_prediction_type!r} is not supported; choose "
                             f"one of {TEACHER_PREDICTION_TYPES}")
        T = int(alphas_cumprod.numel())
        self.teacher, self.alphas_cumprod = teacher.eval().requires_grad_(False), alphas_cumprod.detach().clone()
        self.teacher_prediction_type, self.student_prediction_type = teacher_prediction_type, student_prediction_type
        self.clip_sample = clip_sample
        self.timesteps = student_timesteps(T, student_steps)
        fine = student_timesteps(T, 2 * student_steps) + [-1]
        if fine[::2][:-1] != self.timesteps:
            raise ValueError(f"the {student_steps}-step chain is not every second step of the {2 * student_steps}-step "
                             f"chain over T={T}")
        # t → (t', t'') of the teacher's two steps; −2 marks timesteps off the student's grid.
        self.mid = torch.full((T,), -2, dtype=torch.long)
        self.end = torch.full((T,), -2, dtype=torch.long)
        for i, t in enumerate(self.timesteps):
            self.mid[t], self.end[t] = fine[2 * i + 1], fine[2 * i + 2]

    @torch.no_grad()
    def target(self, z_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x̃ (float64) for z_t at the student's timesteps: two teacher DDIM steps, then Alg. 2's inversion."""
        t = timesteps.long()
        t1, t2 = self.mid.to(t.device)[t], self.end.to(t.device)[t]
        if bool((t2 < -1).any()):
            raise ValueError(f"timesteps {sorted(set(t.tolist()))} are not all on the student's grid {self.timesteps}")
        ac, pt, nd = self.alphas_cumprod, self.teacher_prediction_type, z_t.ndim
        (a_t, s_t), (a_1, s_1), (a_2, s_2) = (alpha_sigma(ac, u, nd) for u in (t, t1, t2))
        z = z_t.double()
        z1 = ddim_step(model_x0(self.teacher, z, t, ac, pt, self.clip_sample), z, a_t, s_t, a_1, s_1)
        z2 = ddim_step(model_x0(self.teacher, z1, t1, ac, pt, self.clip_sample), z1, a_1, s_1, a_2, s_2)
        return distillation_target(z, z2, a_t, s_t, a_2, s_2)

    def __call__(self, model_output, x0, noise, timesteps, noisy) -> DistillationLossOutput:
        target = self.target(noisy, timesteps).float()
        alpha, sigma = (v.float() for v in alpha_sigma(self.alphas_cumprod, timesteps, noisy.ndim))
        x_hat = predict_x0(model_output[:, : noisy.shape[1]].float(), noisy.float(), alpha, sigma,
                           self.student_prediction_type)
        mse = ((x_hat - target) ** 2).flatten(1).mean(dim=1)  # (B,)
        weight = truncated_snr_weight(alpha, sigma).reshape(-1)
        return DistillationLossOutput(loss=weight * mse, unweighted_loss=mse.detach(), mse=mse.detach())


def check_student_prediction_type(prediction_type: str) -> None:
    if prediction_type == "epsilon":
        raise ValueError(f"--student_prediction_type epsilon cannot be distilled to few steps: at the last steps "
                         f"x̂ = (z − σ ε̂)/α multiplies ε̂'s error by σ/α ({PAPER}, Sec. 4); choose one of "
                         f"{STUDENT_PREDICTION_TYPES}")
    if prediction_type not in STUDENT_PREDICTION_TYPES:
        raise ValueError(f"--student_prediction_type must be one of {STUDENT_PREDICTION_TYPES}, got {prediction_type!r}")


# ------------------------------------------------------------------------------------------------ models


def make_student(teacher):
    """A copy of ``teacher`` (same class, config and weights) with C output channels: a learned variance's extra C
    filters of the output layer are dropped (the prediction is the first C channels, as every scheduler splits).

    Raises:
        ValueError: out_channels neither C nor 2C, or weights that differ in more than the output layer.
    """
    config = teacher.config
    channels = config.in_channels
    out = config.get("out_channels") or channels
    if out not in (channels, 2 * channels):
        raise ValueError(f"the teacher UNet has out_channels={out}; expected {channels} (C) or {2 * channels} "
                         f"(2C, a learned variance) for in_channels={channels}")
    student = type(teacher).from_config(dict(config), out_channels=channels)
    own = student.state_dict()
    weights = {}
    for name, tensor in teacher.state_dict().items():
        if name not in own:
            raise ValueError(f"the student has no weight {name!r} of the teacher")
        if tensor.shape != own[name].shape:
            if tensor.shape[0] != 2 * own[name].shape[0] or tensor.shape[1:] != own[name].shape[1:]:
                raise ValueError(f"teacher weight {name!r} {tuple(tensor.shape)} does not reduce to the student's "
                                 f"{tuple(own[name].shape)}")
            tensor = tensor[: own[name].shape[0]]
        weights[name] = tensor.detach().clone()
    student.load_state_dict(weights, strict=True)
    return _float32(student, next(teacher.parameters()).device).train()


def _beta_config(teacher_scheduler) -> Dict[str, Any]:
    cfg = teacher_scheduler.config
    return {k: cfg[k] for k in _BETA_KEYS if k in cfg}


def _same_alphas(scheduler, alphas_cumprod: torch.Tensor, beta_config: dict, make):
    """``make(beta_config)`` if it reproduces ``alphas_cumprod`` exactly, else with the teacher's β as
    ``trained_betas`` (e.g. a schedule name the target scheduler lacks)."""
    try:
        built = make(beta_config)
        if torch.equal(built.alphas_cumprod.float(), alphas_cumprod.float()):
            return built
    except (ValueError, NotImplementedError):
        pass
    betas = (1 - alphas_cumprod.double() / torch.cat([torch.ones(1, dtype=torch.float64),
                                                       alphas_cumprod.double()[:-1]])).tolist()
    explicit = {**beta_config, "trained_betas": getattr(scheduler, "betas", torch.tensor(betas)).tolist()}
    built = make(explicit)
    if not torch.equal(built.alphas_cumprod.float(), alphas_cumprod.float()):
        raise ValueError("the student's scheduler cannot reproduce the teacher's ᾱ table")
    return built


def student_scheduler(teacher_scheduler, num_steps: int, prediction_type: str = "v_prediction",
                      clip_sample: bool = False, diffusers_when_possible: bool = True):
    """The scheduler saved with an N-step student: ``set_timesteps(N)`` gives exactly :func:`student_timesteps`
    and each step goes to the next of them (the last to ᾱ = 1), with the teacher's ᾱ (bit-equal).

    ``DDIMScheduler(timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True)`` when N divides T (its
    step is t → t − T//N); otherwise (or with ``diffusers_when_possible=False``)
    ``GaussianDiffusionScheduler(sampler="ddim", eta=0, timestep_spacing="trailing")``.
    """
    from diffusers import DDIMScheduler

    from .scheduler import GaussianDiffusionScheduler

    check_student_prediction_type(prediction_type)
    T = int(teacher_scheduler.config.num_train_timesteps)
    student_timesteps(T, num_steps)
    common = dict(prediction_type=prediction_type, clip_sample=clip_sample, timestep_spacing="trailing",
                  steps_offset=0, set_alpha_to_one=True)
    if diffusers_when_possible and T % num_steps == 0:
        def make(betas):
            return DDIMScheduler(**betas, **common)
    else:
        def make(betas):
            return GaussianDiffusionScheduler(**betas, **common, sampler="ddim", eta=0.0, variance_type="fixed_small")
    return _same_alphas(teacher_scheduler, teacher_scheduler.alphas_cumprod, _beta_config(teacher_scheduler), make)


def student_pipeline(unet, scheduler):
    """``DDIMPipeline`` for a diffusers ``UNet2DModel`` with a ``DDIMScheduler`` (nothing of ours is needed to
    load or sample it), else ``GaussianDiffusionPipeline``."""
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    from .pipelines import GaussianDiffusionPipeline

    if isinstance(unet, UNet2DModel) and isinstance(scheduler, DDIMScheduler):
        pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    else:
        pipe = GaussianDiffusionPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def teacher_ddim_pipeline(unet, teacher_scheduler, clip_sample: bool = False):
    """The teacher sampled with deterministic DDIM on the same trailing chains as its students (for comparisons
    at equal network calls); a learned variance's channels are dropped by the pipeline."""
    from .pipelines import GaussianDiffusionPipeline
    from .scheduler import GaussianDiffusionScheduler

    pt = teacher_scheduler.config.prediction_type
    scheduler = _same_alphas(teacher_scheduler, teacher_scheduler.alphas_cumprod, _beta_config(teacher_scheduler),
                             lambda b: GaussianDiffusionScheduler(**b, prediction_type=pt, clip_sample=clip_sample,
                                                                  timestep_spacing="trailing", sampler="ddim",
                                                                  eta=0.0, variance_type="fixed_small"))
    pipe = GaussianDiffusionPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_teacher(teacher: str, device=None):
    """The teacher's UNet (float32, eval mode) and scheduler from a saved pipeline folder or Hub id (ours, or a
    ``UNet2DModel`` pipeline such as ``DDPMPipeline``).

    Raises:
        ValueError: a class-conditional teacher (not supported yet), a prediction type we cannot read, or a folder
            that is not a pipeline.
    """
    from .hub import load_pipeline

    try:
        pipe = load_pipeline(teacher)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--teacher {teacher!r} could not be loaded as a diffusers pipeline (a folder written by "
                         f"save_pretrained or a Hub id): {exc}") from exc
    unet, scheduler = pipe.unet, pipe.scheduler
    if unet.config.get("num_class_embeds") is not None or unet.config.get("class_embed_type") is not None:
        raise ValueError(f"--teacher {teacher!r} is class-conditional; progressive distillation here supports "
                         f"unconditional teachers only")
    pt = scheduler.config.get("prediction_type", "epsilon")
    if pt not in TEACHER_PREDICTION_TYPES:
        raise ValueError(f"--teacher {teacher!r} has prediction_type {pt!r}; supported: {TEACHER_PREDICTION_TYPES}")
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"--teacher {teacher!r} has a {type(scheduler).__name__} without a discrete ᾱ table")
    return _float32(unet, device).eval().requires_grad_(False), scheduler


def _float32(model, device=None):
    """``model`` on ``device`` in float32 (no cast when it already is: diffusers warns about every ``to(dtype)``)."""
    if device is not None:
        model = model.to(device)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.to(torch.float32)
    return model


# ------------------------------------------------------------------------------------------------ the rounds


def _round_done(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def _quality_row(entry: dict, who: str) -> dict:
    return {"value": entry["fd"], "standard_error": entry.get("fd_standard_error"), "split": entry["split"],
            "num_images": f"{entry['num_generated']} generated vs {entry['num_reference']} real",
            "method": entry["fd_method"] + f"; {who}, deterministic DDIM, {entry['num_inference_steps']} network calls"}


def card_metrics(history: Sequence[dict]) -> Dict[str, Any]:
    """The model card's structured metrics from the rounds so far: FD of each student and of the teacher's DDIM at
    the same number of steps (network calls)."""
    rows: Dict[str, Any] = {}
    for done in history:
        n = done["student_steps"]
        if done.get("student_quality"):
            rows[f"FD, student @ {n} steps (round {done['round']})"] = _quality_row(done["student_quality"], "student")
        if done.get("teacher_quality"):
            rows[f"FD, teacher DDIM @ {n} steps"] = _quality_row(done["teacher_quality"], "teacher")
    return rows


def card_description(teacher: str, rounds: Sequence[int], index: int, teacher_steps: int) -> str:
    chain = " → ".join(str(n) for n in [teacher_steps, *rounds[:index]])
    if os.path.exists(teacher):  # a local folder: its name only (as the card's training table shows paths)
        teacher = f"{os.path.basename(os.path.normpath(teacher))} (local folder)"
    steps = rounds[index - 1]
    return (f"A {steps}-step student distilled from the teacher `{teacher}` by progressive distillation ({PAPER}): "
            f"round {index} of {len(rounds)} ({chain} deterministic DDIM steps; each round's student learns one "
            f"step where its teacher takes two). Sample it with `num_inference_steps={steps}`: its scheduler's "
            f"timesteps are exactly the ones it was trained on.")


def _save_student(pipe, folder: str, *, description: str, training_config: dict, metrics: dict) -> None:
    """Write the student pipeline, its model card and run files into a temporary sibling folder, then rename it
    into place (a folder with ``model_index.json`` is a complete round)."""
    from .model_card import render_model_card
    from .rundir import TMP_PREFIX, apply_umask, fsync_tree, remove_tree_safely, write_json_atomic, writing

    stage = os.path.join(os.path.dirname(folder), f"{TMP_PREFIX}{os.path.basename(folder)}-{os.getpid()}")
    remove_tree_safely(stage)
    try:
        with writing(f"the student export in {stage}"):
            pipe.save_pretrained(stage, safe_serialization=True)
            write_json_atomic(os.path.join(stage, "training_args.json"), training_config)
            write_json_atomic(os.path.join(stage, "metrics.json"), metrics)
            name = os.path.basename(folder)
            render_model_card(pipe, repo_id=f"your-username/{name}", metrics=card_metrics(metrics["rounds"]),
                              training_config=training_config, description=description, sample_grid=None,
                              num_inference_steps=training_config["ddpm_num_inference_steps"],
                              local_dir_name=name).save(os.path.join(stage, "README.md"))
            apply_umask(stage)
            fsync_tree(stage)
        os.replace(stage, folder)
    finally:
        remove_tree_safely(stage)


def export_student(student_dir: str, export_dir: str, repo_id: Optional[str] = None, **kwargs):
    """:func:`diffusers_ddpm_ext.hub.export_pipeline` of a saved student with its distillation card (teacher,
    rounds, FD per step count from its ``metrics.json``), sampled at its own step count."""
    from .hub import export_pipeline

    with open(os.path.join(student_dir, "training_args.json")) as f:
        config = json.load(f)
    with open(os.path.join(student_dir, "metrics.json")) as f:
        metrics = json.load(f)
    description = card_description(config["teacher"], config["rounds"], config["round"], config["teacher_steps"])
    return export_pipeline(student_dir, export_dir, repo_id=repo_id, description=description,
                           metrics=card_metrics(metrics["rounds"]), training_config=config,
                           grid_inference_steps=config["ddpm_num_inference_steps"], keep_pipeline_class=True, **kwargs)


def push_final_student(flags, summary: Dict[str, Any]) -> Optional[str]:
    """With ``flags.push_to_hub``: export the final student (:func:`export_student`) beside the output folder
    (``<output_dir>-hub``) and push it as one commit to ``flags.hub_model_id`` (default: the output folder's name).
    Returns the repo id, or None without ``push_to_hub``.

    Raises:
        HubPushError: the push failed; the export is kept and the message gives the command that retries it.
    """
    from . import hub
    from .publish import default_repo_name

    if not flags.push_to_hub:
        return None
    repo_id = flags.hub_model_id or default_repo_name(flags.output_dir)
    export = export_student(summary["final_student"], os.path.normpath(flags.output_dir) + "-hub", repo_id=repo_id,
                            overwrite=True)
    last = summary["rounds"][-1]["student_steps"] if summary["rounds"] else flags.student_steps
    private = " --private" if flags.hub_private_repo else ""
    try:
        hub.push_to_hub(export, repo_id, token=flags.hub_token, private=flags.hub_private_repo,
                        commit_message=f"{last}-step student by progressive distillation of {os.path.basename(os.path.normpath(flags.teacher))}")
    except hub.HubPushError as exc:
        raise hub.HubPushError(f"{exc} The distillation itself completed; retry the upload with `python -m "
                               f"diffusers_ddpm_ext.hub push {export} {repo_id}{private}`.") from exc
    return repo_id


def _measure(pipe, steps: int, extractor, reference, split: str, flags, progress: bool) -> Optional[dict]:
    from .evaluate import sample_quality_at_steps

    if extractor is None or not flags.eval_quality_num_images:
        return None
    entry = sample_quality_at_steps(pipe, reference, [steps], flags.eval_quality_num_images, extractor, split=split,
                                    sample_batch_size=flags.eval_batch_size, seed=flags.seed, progress=progress)[0]
    return {k: v for k, v in entry.items() if k != "class_histogram"}


# Settings every round of one output folder must share (a resumed run is compared with the folder's).
RESUME_FIXED = ("teacher", "teacher_steps", "student_steps", "steps_per_round", "student_prediction_type",
                "clip_sample", "seed", "train_batch_size", "gradient_accumulation_steps", "use_ema")


def _prepare_output_dir(out: str, overwrite: bool, resuming: bool, run_config: dict) -> None:
    """``rundir.prepare_output_dir``, plus: ``--overwrite_output_dir`` removes an earlier run's rounds and students;
    a resumed run must have the settings of the one it continues (:data:`RESUME_FIXED`)."""
    from .rundir import RUN_MARKER_NAME, prepare_output_dir, remove_tree_safely

    prepare_output_dir(out, overwrite, resuming)
    names = os.listdir(out)
    if overwrite:
        for name in names:
            if name.startswith(("round-", "student-")):
                remove_tree_safely(os.path.join(out, name))
    marker = os.path.join(out, RUN_MARKER_NAME)
    if resuming and os.path.isfile(marker):
        with open(marker) as f:
            recorded = json.load(f)
        changed = [f"--{k} {recorded[k]!r} -> {run_config.get(k)!r}" for k in RESUME_FIXED
                   if k in recorded and recorded[k] != run_config.get(k)]
        if changed:
            raise ValueError(f"cannot resume the distillation in {out} with changed settings: {', '.join(changed)}; "
                             f"pass the recorded values, or start a new --output_dir")


def run_distillation(flags, accelerator, feature_extractor=None) -> Dict[str, Any]:
    """Every round of progressive distillation from ``flags`` (``training/distill.py``'s command line), with
    Accelerate. Each round trains a :class:`~diffusers_ddpm_ext.trainer.Trainer` in ``<output_dir>/round-RR``
    (checkpoints, exact resume, signals), measures FD of the student and of the teacher's DDIM at the student's step
    count, and saves the student (EMA weights) as ``<output_dir>/student-N-steps``. A resumed run skips the saved
    rounds and continues the first unsaved one from its newest checkpoint.

    Returns:
        ``{"rounds": [per-round dict], "teacher": ..., "distill_time_s": ...}`` (main process; also written to
        ``<output_dir>/metrics.json``).
    """
    from .build import build_data
    from .data import dataset_to_tensors
    from .processes import lock_on_main_process, on_main_process
    from .publish import public_training_config
    from .rundir import RUN_MARKER_NAME, remove_tree_safely, write_json_atomic
    from .runflags import parse_allowed_flags, script_flags
    from .trainer import TrainConfig, Trainer, eval_mode, process_seed, seed_everything

    check_student_prediction_type(flags.student_prediction_type)
    teacher, teacher_scheduler = load_teacher(flags.teacher, accelerator.device)
    T = int(teacher_scheduler.config.num_train_timesteps)
    teacher_steps = flags.teacher_steps or default_teacher_steps(T, flags.student_steps)
    rounds = plan_rounds(T, teacher_steps, flags.student_steps)
    # x̂ clipped in the teacher's steps and the students' schedulers exactly when the teacher's sampler clips it
    clip = bool(teacher_scheduler.config.get("clip_sample", False)) if flags.clip_sample is None else flags.clip_sample
    alphas = teacher_scheduler.alphas_cumprod.detach().float().cpu()
    loader, eval_set, num_levels = build_data(flags, teacher, accelerator)
    reference = dataset_to_tensors(eval_set.reference)[0] if eval_set.reference is not None else None
    out, main = flags.output_dir, accelerator.is_main_process
    run_config = public_training_config(vars(flags))
    run_config.update(teacher_steps=teacher_steps, rounds=rounds, num_train_timesteps=T, clip_sample=clip)
    summary: Dict[str, Any] = {"teacher": flags.teacher, "teacher_steps": teacher_steps, "rounds": []}
    start = time.time()
    with lock_on_main_process(accelerator, out):
        resuming = flags.resume_from_checkpoint is not None
        on_main_process(accelerator, lambda: _prepare_output_dir(out, flags.overwrite_output_dir, resuming,
                                                                 run_config))
        accelerator.wait_for_everyone()
        if main:
            write_json_atomic(os.path.join(out, RUN_MARKER_NAME), run_config)
        previous, previous_pt = teacher, teacher_scheduler.config.get("prediction_type", "epsilon")
        elapsed_before = 0
        for index, steps in enumerate(rounds, start=1):
            folder = os.path.join(out, STUDENT_DIR.format(steps=steps))
            if _round_done(folder):  # saved by an earlier segment of this run: the next teacher
                from .hub import load_pipeline

                saved = load_pipeline(folder)
                previous = _float32(saved.unet, accelerator.device).eval().requires_grad_(False)
                previous_pt = flags.student_prediction_type
                with open(os.path.join(folder, "metrics.json")) as f:
                    summary["rounds"] = json.load(f)["rounds"]
                elapsed_before += flags.steps_per_round
                continue
            generator = torch.Generator(device=accelerator.device)
            seed_everything(process_seed(flags.seed + index, accelerator.process_index), generator)
            student = make_student(previous)
            scheduler = student_scheduler(teacher_scheduler, steps, flags.student_prediction_type, clip,
                                          diffusers_when_possible=False)  # the Trainer's: add_noise and sample grids
            loss_fn = ProgressiveDistillationLoss(previous, alphas, steps, previous_pt, flags.student_prediction_type,
                                                  clip)
            interrupt = flags.debug_interrupt_after_step
            interrupt = interrupt - elapsed_before if interrupt and 0 < interrupt - elapsed_before <= \
                flags.steps_per_round else None
            config = TrainConfig.from_flags(flags, num_levels=num_levels, loss_type="simple", seed=flags.seed + index,
                                            ddpm_num_inference_steps=steps, debug_interrupt_after_step=interrupt,
                                            timestep_sampler="uniform")
            run_flags = {**script_flags(flags, accelerator), "teacher": flags.teacher, "round": index,
                         "student_steps": steps, "teacher_steps": teacher_steps, "clip_sample": clip,
                         "student_prediction_type": flags.student_prediction_type}
            trainer = Trainer(student, scheduler, config, max_train_steps=flags.steps_per_round,
                              accelerator=accelerator, generator=generator,
                              output_dir=os.path.join(out, ROUND_DIR.format(index=index)), eval_set=eval_set,
                              loss_fn=loss_fn, run_flags=run_flags)
            trainer.timestep_sampler = GridTimestepSampler(T, loss_fn.timesteps)
            if resuming:
                trainer.resume("latest", parse_allowed_flags(flags.allow_changed_flags))
            logger.info("round %d of %d: %d → %d steps (%d optimizer steps)", index, len(rounds), 2 * steps, steps,
                        flags.steps_per_round)
            trainer.run(loader)
            elapsed_before += flags.steps_per_round
            accelerator.wait_for_everyone()
            result = {"round": index, "student_steps": steps, "teacher_steps": 2 * steps,
                      "train_steps": trainer.state.global_step, "train_time_s": trainer.state.train_time_s,
                      "final_loss": trainer.state.losses[-1] if trainer.state.losses else None}
            if main:
                with trainer.ema_weights(), eval_mode(trainer.unwrapped):
                    pipe = student_pipeline(trainer.unwrapped, student_scheduler(
                        teacher_scheduler, steps, flags.student_prediction_type, clip))
                    progress = accelerator.is_local_main_process
                    measure = (steps, feature_extractor, reference, eval_set.split, flags, progress)
                    result["student_quality"] = _measure(pipe, *measure)
                    if flags.eval_teacher:
                        result["teacher_quality"] = _measure(
                            teacher_ddim_pipeline(teacher, teacher_scheduler, clip), *measure)
                    summary["rounds"].append(result)
                    training_config = {**run_config, "ddpm_num_inference_steps": steps, "round": index}
                    _save_student(pipe, folder, description=card_description(flags.teacher, rounds, index,
                                                                              teacher_steps),
                                  training_config=training_config, metrics={"rounds": summary["rounds"]})
                remove_tree_safely(os.path.join(out, ROUND_DIR.format(index=index)))  # the student folder is the state
            accelerator.wait_for_everyone()
            with trainer.ema_weights():  # the next round's teacher: the student as saved
                previous = make_student(trainer.unwrapped).eval().requires_grad_(False)
            previous_pt = flags.student_prediction_type
        summary["distill_time_s"] = time.time() - start
        summary["final_student"] = os.path.join(out, STUDENT_DIR.format(steps=rounds[-1]))
        if main:
            write_json_atomic(os.path.join(out, "metrics.json"), summary)
    return summary
