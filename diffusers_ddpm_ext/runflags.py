"""Which training flags change what a run computes, and which of them a resumed run may change.

Every checkpoint records the values of the flags that change the trained weights (``flags`` in its
``training_state.json``, covered by the manifest's SHA-256). Resuming compares them with the new command line
(:func:`compare_flags`): a difference is refused with an error naming each flag and both values, unless the flag
is listed in ``--allow_changed_flags`` (:func:`parse_allowed_flags`). An allowed change takes effect from the
resumed step on and is recorded (``changed_on_resume`` in ``training_args.json``, the model card and every later
checkpoint). The flags the checkpoint's own state depends on (:data:`FIXED_ON_RESUME`: the data position, the
random streams, the timestep-sampler history, the EMA) cannot change, even so. Flags that never change the
weights (:data:`NOT_COMPARED`: logging, paths, evaluation and sampling sizes, checkpoint and export cadence, Hub
settings, loader workers, gradient checkpointing) are not compared; the architecture flags are compared through
the model config the checkpoint holds (``checkpoints.check_checkpoint_matches``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

# Compared on resume; a change is accepted when named in --allow_changed_flags.
CHANGEABLE_ON_RESUME = (
    "learning_rate", "lr_scheduler", "lr_warmup_steps", "max_train_steps", "adam_beta1", "adam_beta2",
    "adam_weight_decay", "adam_epsilon", "max_grad_norm", "ema_inv_gamma", "ema_power", "ema_max_decay",
    "loss_type", "snr_gamma", "timestep_sampler", "class_dropout_prob", "nan_policy", "prediction_type",
    "ddpm_beta_schedule", "ddpm_max_beta", "variance_type", "mixed_precision", "center_crop", "random_flip",
    "enable_xformers_memory_efficient_attention",
)
# Compared on resume and never changeable: the checkpoint's data position (batch size, accumulation, the data
# itself), its random streams and data order (seed), its timestep-sampler history (T) and its EMA depend on them.
FIXED_ON_RESUME = (
    "seed", "train_batch_size", "gradient_accumulation_steps", "dataset_name", "dataset_config_name",
    "train_data_dir", "image_column", "class_column", "skip_bad_images", "ddpm_num_steps", "use_ema",
    "validation_size", "validation_split_seed",  # which images are held out, hence which are trained on
)
# Flags of training/train.py that never change the trained weights (or change them only through the model config,
# which the checkpoint's architecture check compares), so resume does not compare them.
NOT_COMPARED = (
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "allow_changed_flags", "logger", "logging_dir",
    "cache_dir", "dataloader_num_workers", "gradient_checkpointing", "eval_batch_size", "eval_bpd_steps",
    "eval_num_images", "eval_quality_num_images", "feature_extractor", "eval_every", "guidance_scale",
    "ddpm_num_inference_steps", "save_images_epochs", "save_model_epochs", "checkpointing_steps",
    "checkpoints_total_limit", "push_to_hub", "hub_strategy", "hub_token", "hub_model_id", "hub_private_repo",
    "local_rank", "num_epochs",  # num_epochs: via max_train_steps
    "unet_preset", "unet_config", "unet_overrides", "model_config_name_or_path", "model_type", "resolution",
    "num_class_embeds",
    "debug_nan_at_step", "debug_interrupt_after_step",
)
COMPARED_FLAGS = CHANGEABLE_ON_RESUME + FIXED_ON_RESUME
# The compared flags outside TrainConfig and the scheduler's config, which the training script hands the trainer.
SCRIPT_RESULT_FLAGS = (
    "train_batch_size", "dataset_name", "dataset_config_name", "train_data_dir", "image_column", "class_column",
    "skip_bad_images", "center_crop", "random_flip", "mixed_precision", "enable_xformers_memory_efficient_attention",
    "validation_size", "validation_split_seed",
)
# What each kind of fixed flag protects, for the error message.
_FIXED_BECAUSE = {
    "seed": "the checkpoint's random streams and data order come from it",
    "ddpm_num_steps": "the checkpoint's timestep-sampler history and the model's timesteps have T entries",
    "use_ema": "the checkpoint's EMA weights depend on it",
}


def parse_allowed_flags(value: Optional[str]) -> Tuple[str, ...]:
    """Names in an ``--allow_changed_flags`` value (``"learning_rate,max_train_steps"``; leading dashes optional).

    Raises:
        ValueError: a name that is not a compared flag, or one that can never change on resume.
    """
    if value is None:
        return ()
    names = tuple(n.strip().lstrip("-") for n in str(value).split(",") if n.strip())
    for name in names:
        if name in FIXED_ON_RESUME:
            raise ValueError(f"--allow_changed_flags {name}: --{name} can never change on resume ({_why_fixed(name)}); "
                             f"start a new --output_dir instead")
        if name not in CHANGEABLE_ON_RESUME:
            raise ValueError(f"--allow_changed_flags {name!r} is not a flag that resume compares; allowed: "
                             f"{', '.join(CHANGEABLE_ON_RESUME)}")
    return names


def _why_fixed(name: str) -> str:
    return _FIXED_BECAUSE.get(name, "the checkpoint's data position depends on it")


def script_flags(flags: Any, accelerator: Any = None) -> Dict[str, Any]:
    """The :data:`SCRIPT_RESULT_FLAGS` of a parsed command line (an ``argparse.Namespace``); ``mixed_precision``
    as the ``accelerator`` resolved it (the flag's default defers to the accelerate config)."""
    values = {name: getattr(flags, name) for name in SCRIPT_RESULT_FLAGS if hasattr(flags, name)}
    if getattr(accelerator, "mixed_precision", None) is not None:
        values["mixed_precision"] = str(accelerator.mixed_precision)
    return values


def flags_from_training_args(path: str) -> Optional[Dict[str, Any]]:
    """The compared flags of a ``training_args.json`` (for checkpoints written before checkpoints recorded their
    flags), normalised as the trainer records them; None when the file is missing or unreadable."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict):
        return None
    flags = {k: v for k, v in saved.items() if k in COMPARED_FLAGS}
    # The script wrote the flags as given: an unset total (--num_epochs) and an unset precision cannot be compared.
    for name in ("max_train_steps", "mixed_precision"):
        if flags.get(name) is None:
            flags.pop(name, None)
    if flags.get("ddpm_beta_schedule") == "cosine":
        flags["ddpm_beta_schedule"] = "squaredcos_cap_v2"
    flags.pop("ddpm_max_beta", None)  # the flag as given, not the largest β it left: with_legacy_flags derives that
    return flags


def largest_beta(betas) -> float:
    """The largest of a (T,) β schedule (what ``--ddpm_max_beta`` leaves of it), as checkpoints and metrics.json
    record it: 0.999 for cosine as IDM clips it, 0.5 under the default clip, 0.02 for linear (which no clip in
    (0.02, 1) changes), so resume compares the schedule, not the flag's text."""
    return round(float(betas.max()), 6)


def with_legacy_flags(recorded: Dict[str, Any]) -> Dict[str, Any]:
    """``recorded`` plus what checkpoints written before a flag existed implied: ``ddpm_max_beta`` is then the
    largest β of their unclipped schedule (so resuming such a cosine run under the default clip is refused, not
    silently moved onto another chain)."""
    if "ddpm_max_beta" in recorded or "ddpm_beta_schedule" not in recorded or "ddpm_num_steps" not in recorded:
        return dict(recorded)
    from .build import schedule_betas

    try:
        betas = schedule_betas(int(recorded["ddpm_num_steps"]), recorded["ddpm_beta_schedule"])
    except (TypeError, ValueError):
        return dict(recorded)
    return {**recorded, "ddpm_max_beta": largest_beta(betas)}


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def compare_flags(recorded: Mapping[str, Any], current: Mapping[str, Any], allowed: Iterable[str] = (),
                  source: str = "the checkpoint") -> List[Tuple[str, Any, Any]]:
    """Compare the flags a checkpoint recorded with this run's; return the allowed changes ``(name, old, new)``.

    Only flags present in both and in :data:`COMPARED_FLAGS` are compared.

    Raises:
        ValueError: naming every changed flag that is not allowed (both values) and what to do.
    """
    allowed = set(allowed)
    changed = [(name, recorded[name], current[name]) for name in COMPARED_FLAGS
               if name in recorded and name in current and _differs(recorded[name], current[name])]
    # ddpm_max_beta is recorded as the largest β the chain runs: another schedule (or T) moves it by itself, and
    # that change is the schedule's, named (and allowed or refused) as such.
    if any(name in ("ddpm_beta_schedule", "ddpm_num_steps") for name, _, _ in changed):
        changed = [c for c in changed if c[0] != "ddpm_max_beta"]
    refused = [c for c in changed if c[0] not in allowed]
    if not refused:
        return changed
    listed = ", ".join(f"--{name} {_show(old)} -> {_show(new)}" for name, old, new in refused)
    fixed = [name for name, _, _ in refused if name in FIXED_ON_RESUME]
    changeable = [name for name, _, _ in refused if name not in FIXED_ON_RESUME]
    advice = ["pass the checkpoint's values to continue the run exactly"]
    if changeable:
        advice.append(f"or --allow_changed_flags {','.join(changeable)} to continue with the new values (recorded in "
                      f"training_args.json and the model card)")
    message = f"cannot resume from {source} with changed flags: {listed}. To resume, " + " ".join(advice) + "."
    for name in fixed:
        message += f" --{name} cannot change on resume ({_why_fixed(name)}); start a new --output_dir to change it."
    raise ValueError(message)


def _differs(old: Any, new: Any) -> bool:
    if isinstance(old, (list, tuple)) or isinstance(new, (list, tuple)):
        return list(old or []) != list(new or [])
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool) \
            and not isinstance(new, bool):
        return float(old) != float(new)
    return old != new


def describe_changes(changes: Sequence[Tuple[str, Any, Any]], step: int) -> List[str]:
    """``["learning_rate 0.002 -> 0.0001 from step 6", ...]``: how ``training_args.json`` and the card record them."""
    return [f"{name} {_show(old)} -> {_show(new)} from step {step}" for name, old, new in changes]


def recorded_flags_path(checkpoint: str) -> str:
    """Where an older checkpoint's flags are: the ``training_args.json`` of the folder holding it."""
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "training_args.json")
