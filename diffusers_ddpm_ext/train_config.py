"""What the training loop is told and what it reports: :class:`TrainConfig` (the training script's optimisation,
objective, EMA, NaN-policy, checkpoint and evaluation flags, checked on construction), :class:`TrainState`,
:class:`StepOutput` and :class:`EvalSet`. The loop itself is :class:`diffusers_ddpm_ext.trainer.Trainer`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from .losses import LOSS_TYPES
from .scheduler import LEARNED_VARIANCE_TYPES
from .timestep_sampler import SAMPLER_NAMES

NAN_POLICIES = ("stop", "skip")


def check_objective(loss_type: str, variance_type: str) -> None:
    """Refuse a loss that cannot train the scheduler's variance: hybrid needs a learned one, and simple leaves a
    learned one untrained (its samples would use whatever the untrained head outputs)."""
    learned = variance_type in LEARNED_VARIANCE_TYPES
    if loss_type == "hybrid" and not learned:
        raise ValueError(f"--loss_type hybrid trains a learned variance and needs --variance_type in "
                         f"{LEARNED_VARIANCE_TYPES}, got {variance_type!r}; use --loss_type simple with a fixed "
                         f"variance")
    if loss_type == "simple" and learned:
        raise ValueError(f"--variance_type {variance_type} adds a variance head that --loss_type simple never "
                         f"trains (its samples would use an untrained variance); use --loss_type hybrid or kl, or "
                         f"a fixed --variance_type")


@dataclass
class TrainConfig:
    """How to train: objective, optimisation, NaN policy and the loop's periodic work.

    The field names are the training script's flag names (``training/train.py --help`` documents each), so
    error messages name them as ``--<field>``.

    Args:
        loss_type: a :data:`~diffusers_ddpm_ext.losses.LOSS_TYPES` objective of :func:`diffusion_loss`.
        snr_gamma: min-SNR-γ weighting of the MSE term (None = off).
        num_levels: grey levels of the data (256 for 8-bit images; 17 for the digits): the decoder NLL and
            bits/dim.
        class_dropout_prob: probability of replacing a class label by the null class (classifier-free guidance).
        timestep_sampler: a :data:`~diffusers_ddpm_ext.timestep_sampler.SAMPLER_NAMES` sampler of t.
        learning_rate, lr_scheduler, lr_warmup_steps, adam_beta1, adam_beta2, adam_weight_decay, adam_epsilon:
            AdamW and ``diffusers.optimization.get_scheduler`` (stepped once per optimizer step).
        max_grad_norm: gradient clipping (None = none).
        gradient_accumulation_steps: micro-batches per optimizer step.
        use_ema, ema_inv_gamma, ema_power, ema_max_decay: ``diffusers.training_utils.EMAModel`` with warm-up.
        nan_policy: on a non-finite loss or gradient, ``"stop"`` (saving the last good state) or ``"skip"``.
        seed: seed of the default generator (:func:`process_seed`), of sample grids and of bits/dim.
        checkpointing_steps, checkpoints_total_limit: a checkpoint every N steps, keeping the newest K (needs
            ``output_dir``).
        eval_every, eval_bpd_steps: bits/dim of the trainer's ``eval_set`` every N steps, with this many
            timesteps per image.
        save_images_epochs: a sample grid into ``<output_dir>/samples`` every N epochs.
        eval_batch_size, ddpm_num_inference_steps, guidance_scale: images, sampling steps and guidance scale of
            sample grids (guidance None = 2 with ``class_dropout_prob > 0``, else 1).
        debug_nan_at_step, debug_interrupt_after_step: fault injection for tests: make the loss of that
            optimizer step NaN (once), raise :class:`SimulatedInterrupt` after that step.
    """

    loss_type: str = "hybrid"
    snr_gamma: Optional[float] = None
    num_levels: int = 256
    class_dropout_prob: float = 0.0
    timestep_sampler: str = "uniform"
    learning_rate: float = 2e-3
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 50
    adam_beta1: float = 0.95
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-6
    adam_epsilon: float = 1e-8
    max_grad_norm: Optional[float] = 1.0
    gradient_accumulation_steps: int = 1
    use_ema: bool = True
    ema_inv_gamma: float = 1.0
    ema_power: float = 3 / 4
    ema_max_decay: float = 0.9999
    nan_policy: str = "stop"
    seed: int = 0
    checkpointing_steps: Optional[int] = 500
    checkpoints_total_limit: Optional[int] = 2
    eval_every: Optional[int] = None
    eval_bpd_steps: int = 20
    save_images_epochs: Optional[int] = 10
    eval_batch_size: int = 64
    ddpm_num_inference_steps: int = 100
    guidance_scale: Optional[float] = None
    debug_nan_at_step: Optional[int] = None
    debug_interrupt_after_step: Optional[int] = None

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_flags(cls, flags, **overrides) -> "TrainConfig":
        """The config of a parsed command line (an ``argparse.Namespace``): every field of that name."""
        values = {f.name: getattr(flags, f.name) for f in dataclasses.fields(cls) if hasattr(flags, f.name)}
        return cls(**{**values, **overrides})

    def validate(self) -> None:
        """Raise a ValueError naming the first bad field, its value and what is allowed."""
        for name, allowed in (("loss_type", LOSS_TYPES), ("timestep_sampler", SAMPLER_NAMES),
                              ("nan_policy", NAN_POLICIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("gradient_accumulation_steps", "num_levels", "eval_batch_size", "ddpm_num_inference_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be a positive integer, got {value!r}")
        for name in ("checkpointing_steps", "checkpoints_total_limit", "eval_every", "eval_bpd_steps",
                     "save_images_epochs", "debug_nan_at_step", "debug_interrupt_after_step"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name} must be a positive integer (or left unset), got {value!r}")
        for f in dataclasses.fields(self):  # NaN passes every comparison below, inf most of them
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{f.name} must be a finite number, got {value!r}")
        if self.eval_bpd_steps is not None and self.eval_bpd_steps < 2:
            raise ValueError(f"--eval_bpd_steps must be >= 2 (bits/dim draws two timesteps per stratum), got "
                             f"{self.eval_bpd_steps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning_rate must be positive, got {self.learning_rate!r}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"--lr_warmup_steps must be >= 0, got {self.lr_warmup_steps!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.adam_weight_decay < 0 or not self.adam_epsilon > 0:
            raise ValueError(f"--adam_weight_decay must be >= 0 and --adam_epsilon > 0, got "
                             f"{self.adam_weight_decay!r}, {self.adam_epsilon!r}")
        if not 0.0 <= self.ema_max_decay <= 1.0:
            raise ValueError(f"--ema_max_decay must be in [0, 1], got {self.ema_max_decay!r}")
        for name in ("ema_inv_gamma", "ema_power"):  # EMA warm-up decay 1 - (1 + step / inv_gamma) ** -power
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)!r}")
        if self.guidance_scale is not None and not self.guidance_scale >= 0:
            raise ValueError(f"--guidance_scale must be >= 0 (or left unset), got {self.guidance_scale!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"--max_grad_norm must be positive (or unset for no clipping), got "
                             f"{self.max_grad_norm!r}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"--class_dropout_prob must be in [0, 1), got {self.class_dropout_prob!r}")
        if self.snr_gamma is not None:
            if not self.snr_gamma > 0:
                raise ValueError(f"--snr_gamma must be positive, got {self.snr_gamma!r}")
            if self.loss_type == "kl":
                raise ValueError("--snr_gamma weights the MSE term; --loss_type kl has none")


@dataclass
class TrainState:
    """Where a run stands (saved in every checkpoint as JSON; everything else a checkpoint holds is tensors).

    Args:
        global_step: optimizer steps done.
        epoch, batch_in_epoch: the data position: micro-batches of ``epoch`` consumed.
        loss_steps, losses: the loss of every optimizer step (mean over the accumulation window and processes).
        skipped_steps: optimizer steps dropped by ``nan_policy="skip"``.
        train_time_s: seconds spent training (summed over resumed segments).
    """

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    loss_steps: List[int] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)
    skipped_steps: int = 0
    train_time_s: float = 0.0


@dataclass
class StepOutput:
    """What one completed (or skipped) optimizer step reports.

    Args:
        step: optimizer steps done after it.
        loss: mean training loss of the step (over its micro-batches and the processes).
        mse: mean ε/x₀/v MSE of the step's micro-batches on this process (None if the loss function has none).
        logs: ``{"loss", "lr", "grad_norm"[, "ema_decay"]}`` as logged to the trackers (empty when skipped).
        skipped: the step was dropped by ``nan_policy="skip"`` (the weights did not change).
    """

    step: int
    loss: float
    mse: Optional[float] = None
    logs: Dict[str, float] = field(default_factory=dict)
    skipped: bool = False


@dataclass
class EvalSet:
    """Images the trainer's bits/dim and sample quality are measured on.

    Args:
        images: (N, C, H, W) in [-1, 1], for bits/dim.
        class_labels: (N,) labels for a class-conditional model, else None.
        split: where they come from (``"heldout"``, ``"validation"``, a dataset's own split name, or ``"train"``),
            reported in the metrics.
        info: how the split was made (``data.TrainValidationSplit.info``: method, seed, sizes, source), reported
            in the metrics as ``validation_split``.
        reference: the whole held-out split (a dataset of ``{"pixel_values", ...}`` items): the real images of
            :meth:`Trainer.evaluate_sample_quality`.
    """

    images: torch.Tensor
    class_labels: Optional[torch.Tensor] = None
    split: str = "train"
    info: Optional[Dict[str, Any]] = None
    reference: Optional[Any] = None
