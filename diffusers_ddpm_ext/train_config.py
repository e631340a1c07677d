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


@dataclass(frozen=True)
class Range:
    """The allowed values of one numeric flag: ``[low, high]`` (either end open with ``low_open`` / ``high_open``;
    ``high`` infinite = no upper bound), integers only with ``integer``. NaN and inf are never in a range.

    Args:
        why: shown after the range in the error message.
        unset: None allowed too, described as this (``"left unset"``; ``""`` allows None without saying so).
    """

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    why: str = ""
    unset: Optional[str] = None

    def __str__(self) -> str:
        low, high = _bound(self.low), _bound(self.high)
        if self.high != math.inf:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.integer:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low == 0 and self.low_open:
            return "positive and finite"
        return f"{'>' if self.low_open else '>='} {low} and finite"

    def check(self, name: str, value: Any) -> None:
        """Raise a ValueError naming ``--name``, ``value`` and this range unless ``value`` is in it."""
        if value is None and self.unset is not None:
            return
        typed = not isinstance(value, bool) and isinstance(value, int if self.integer else (int, float))
        if typed and self._contains(value):
            return
        kind = "" if typed else ("an integer " if self.integer else "a number ")
        raise ValueError(f"--{name} must be {kind}{self.describe()}, got {value!r}")

    def describe(self) -> str:
        """The range with its reason and what None means: what ``--help`` and the error message say."""
        return f"{self}{f' ({self.why})' if self.why else ''}{f' or {self.unset}' if self.unset else ''}"

    def _contains(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes no comparison, inf most
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


def _bound(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def check_ranges(obj, ranges: Dict[str, Range]) -> None:
    """Check every attribute of ``obj`` named in ``ranges`` (attributes it lacks are skipped)."""
    for name, allowed in ranges.items():
        if hasattr(obj, name):
            allowed.check(name, getattr(obj, name))


_POSITIVE_INT = Range(1, integer=True)
_CADENCE = Range(1, integer=True, unset="left unset")

# The one definition of every numeric TrainConfig field's range (the script's other numeric flags: build.FLAG_RANGES
# and build.RUN_FLAG_RANGES). README "Flag ranges" lists them.
TRAIN_RANGES: Dict[str, Range] = {
    "snr_gamma": Range(0, low_open=True, why="the min-SNR-γ cap; 5 is the paper's value",
                       unset="left unset (no weighting)"),
    "num_levels": Range(2, 65536, integer=True, why="grey levels of the data: 256 for 8-bit images"),
    "class_dropout_prob": Range(0, 1, high_open=True),
    "learning_rate": Range(0, 1, low_open=True, why="AdamW moves each weight by up to about this much per step"),
    "lr_warmup_steps": Range(0, integer=True),
    "adam_beta1": Range(0, 1, high_open=True),
    "adam_beta2": Range(0, 1, high_open=True),
    "adam_weight_decay": Range(0, 1, why="AdamW shrinks each weight by learning_rate × this per step"),
    "adam_epsilon": Range(0, 1, low_open=True),
    "max_grad_norm": Range(0, low_open=True, unset="0 (no clipping)"),
    "gradient_accumulation_steps": Range(1, 1024, integer=True),
    "ema_inv_gamma": Range(0, 1_000_000, low_open=True),  # EMA warm-up decay 1 - (1 + step / inv_gamma) ** -power
    "ema_power": Range(0, 10, low_open=True, why="3/4 or 2/3 are usual"),
    "ema_max_decay": Range(0, 1),
    "seed": Range(0, 2**32, high_open=True, integer=True),
    "checkpointing_steps": _CADENCE,
    "checkpoints_total_limit": _CADENCE,
    "eval_every": _CADENCE,
    "eval_bpd_steps": Range(2, integer=True, why="bits/dim draws two timesteps per stratum"),
    "save_images_epochs": _CADENCE,
    "eval_batch_size": Range(1, 4096, integer=True, why="images per sample grid and per sampling batch"),
    "ddpm_num_inference_steps": _POSITIVE_INT,
    "guidance_scale": Range(0, 100, unset="left unset (2 with --class_dropout_prob > 0, else 1)"),
    "debug_nan_at_step": _CADENCE,
    "debug_interrupt_after_step": _CADENCE,
}


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
        """Raise a ValueError naming the first bad field, its value and what is allowed (:data:`TRAIN_RANGES`)."""
        for name, allowed in (("loss_type", LOSS_TYPES), ("timestep_sampler", SAMPLER_NAMES),
                              ("nan_policy", NAN_POLICIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {allowed}, got {getattr(self, name)!r}")
        check_ranges(self, TRAIN_RANGES)
        if self.snr_gamma is not None and self.loss_type == "kl":
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
