"""Building blocks of the training script (`training/train.py`), kept here so they can be tested alone.

What lives here and why:

- **Argument validation** (:func:`validate_args`, :func:`resolve_out_channels`): every bad combination
  of flags fails before a model is built, with a message naming the flags and the allowed values.
- **Crash-safe checkpoints** (:func:`save_checkpoint`, :func:`load_checkpoint`,
  :func:`find_latest_checkpoint`, :func:`rotate_checkpoints`): a checkpoint is written into a hidden
  temporary folder, every file is fsynced, a manifest with sizes and SHA-256 digests is written last,
  and only then is the folder renamed to ``checkpoint-<step>``. A rename is atomic on POSIX file
  systems, so a process killed at any moment leaves either no checkpoint or a complete one; ``latest``
  also ignores any folder whose manifest does not verify. Weights are safetensors; optimizer, LR
  scheduler and grad-scaler states load with ``torch.load(weights_only=True)``; everything else
  (positions, RNG states, EMA bookkeeping) is JSON. Nothing is unpickled.
- **Exact resume state** (:func:`capture_rng_state`, :func:`restore_rng_state`): the RNG states of
  python, numpy, torch and the script's noise generator are stored per process as JSON; the data
  order is :class:`diffusers_ddpm_ext.data.ResumableBatchSampler`'s pure function of (seed, epoch),
  and the position inside an epoch is a counter stored with the step.
- **Output-folder protection** (:func:`prepare_output_dir`, :func:`publish_dir`,
  :func:`recover_output_dir`): a folder holding another run is refused unless the user asks to
  overwrite or resume; a finished pipeline is replaced file by file with atomic renames under a
  journal, so a crash never leaves a half-written file and the next start completes the swap.
- **Reporting** (:func:`save_loss_curve`, :func:`make_image_grid`, :func:`write_json_atomic`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_FORMAT_VERSION = 1
MANIFEST_NAME = "checkpoint.json"
RUN_MARKER_NAME = "training_args.json"
PUBLISH_JOURNAL_NAME = ".publish-journal.json"
# Files and folders the training script writes into its output folder; --overwrite_output_dir only ever
# touches these names, never anything else the user keeps there.
MANAGED_OUTPUT_NAMES = (
    "model_index.json",
    "unet",
    "scheduler",
    "README.md",
    "metrics.json",
    "sample_grid.png",
    "ddpm_ext_pipeline.py",
    "loss_curve.png",
    "samples",
    "logs",
    RUN_MARKER_NAME,
    PUBLISH_JOURNAL_NAME,
)
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
# hub.export_pipeline builds "<parent>/.<name>.tmp-*" next to its target; ours is ".tmp-export-*".
_STALE_PREFIXES = (_TMP_PREFIX, _TRASH_PREFIX, "." + _TMP_PREFIX)

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
LOSS_TYPES = ("simple", "hybrid", "kl")
NAN_POLICIES = ("stop", "skip")
MIXED_PRECISIONS = ("no", "fp16", "bf16")


class NonFiniteLossError(RuntimeError):
    """Raised when the loss (or the gradient norm) of a training step is NaN or infinite."""


class SimulatedInterrupt(RuntimeError):
    """Raised by the script's hidden ``--debug_interrupt_after_step`` (tests of resume)."""


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, tampered with, or from another architecture."""


# --------------------------------------------------------------------------------------------------
# Fault injection (crash tests)
# --------------------------------------------------------------------------------------------------

FAULT_ENV = "DDPM_EXT_FAULT"
_fault_hits: Dict[str, int] = {}


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL at the n-th time it reaches point ``name``, if asked to.

    ``DDPM_EXT_FAULT="checkpoint_write:3"`` kills the process the third time it passes
    ``fault_point("checkpoint_write")``; several points can be given comma-separated. SIGKILL cannot be caught,
    so no ``finally`` block or atexit handler runs: exactly what a power cut or the OOM killer does. Points in
    the script: ``step`` (mid optimizer step, after backward), ``checkpoint_write`` (some checkpoint files
    written, no manifest yet), ``checkpoint_rename`` (complete temporary checkpoint, not yet renamed),
    ``sample`` (generating a sample grid), ``publish`` (after each file moved into the output folder).
    Unset (the normal case), this is one dictionary lookup.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        point, _, count = item.strip().partition(":")
        if point != name:
            continue
        _fault_hits[name] = _fault_hits.get(name, 0) + 1
        if _fault_hits[name] == int(count or 1):
            logger.warning("%s=%s: killing process %d at %s", FAULT_ENV, spec, os.getpid(), name)
            os.kill(os.getpid(), signal.SIGKILL)
        return


# --------------------------------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------------------------------


def _fail(message: str) -> None:
    raise ValueError(message)


def validate_args(args) -> None:
    """Reject bad flag combinations before anything is built.

    Args:
        args: the ``argparse.Namespace`` of ``training/train.py``.

    Raises:
        ValueError: naming the flag(s), the bad value and what is allowed.
    """
    positive_ints = ("train_batch_size", "eval_batch_size", "gradient_accumulation_steps", "ddpm_num_steps",
                     "ddpm_num_inference_steps", "num_epochs")
    for name in positive_ints:
        value = getattr(args, name, None)
        if value is not None and (not isinstance(value, int) or value < 1):
            _fail(f"--{name} must be a positive integer, got {value!r}")
    for name in ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "eval_every",
                 "save_images_epochs", "save_model_epochs", "resolution", "num_class_embeds"):
        value = getattr(args, name, None)
        if value is not None and (not isinstance(value, int) or value < 1):
            _fail(f"--{name} must be a positive integer (or left unset), got {value!r}")
    if args.eval_bpd_steps is not None and args.eval_bpd_steps < 1:
        _fail(f"--eval_bpd_steps must be a positive integer, got {args.eval_bpd_steps!r}")
    if not args.learning_rate > 0:
        _fail(f"--learning_rate must be positive, got {args.learning_rate!r}")
    if args.lr_warmup_steps < 0:
        _fail(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps!r}")
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(args, name)
        if not 0.0 <= value < 1.0:
            _fail(f"--{name} must be in [0, 1), got {value!r}")
    if args.adam_weight_decay < 0 or not args.adam_epsilon > 0:
        _fail(f"--adam_weight_decay must be >= 0 and --adam_epsilon > 0, got {args.adam_weight_decay!r}, "
              f"{args.adam_epsilon!r}")
    if not 0.0 <= args.ema_max_decay <= 1.0:
        _fail(f"--ema_max_decay must be in [0, 1], got {args.ema_max_decay!r}")
    if args.max_grad_norm is not None and not args.max_grad_norm > 0:
        _fail(f"--max_grad_norm must be positive (or unset for no clipping), got {args.max_grad_norm!r}")
    if args.mixed_precision is not None and args.mixed_precision not in MIXED_PRECISIONS:
        _fail(f"--mixed_precision must be one of {MIXED_PRECISIONS}, got {args.mixed_precision!r}")
    if args.nan_policy not in NAN_POLICIES:
        _fail(f"--nan_policy must be one of {NAN_POLICIES}, got {args.nan_policy!r}")

    # Data source.
    if args.dataset_name is not None and args.train_data_dir is not None:
        _fail("pass either --dataset_name or --train_data_dir, not both")
    if args.image_column is not None and args.dataset_name is None:
        _fail("--image_column only applies to --dataset_name (image folders and the built-in digits have no "
              "columns)")

    # Model.
    if args.unet_preset is not None and args.unet_config is not None:
        _fail("pass either --unet_preset or --unet_config, not both")
    if args.unet_config is not None and not os.path.isfile(args.unet_config):
        _fail(f"--unet_config {args.unet_config!r} is not a file (expected a JSON UNet config)")
    if args.model_type not in ("ours", "unet2d"):
        _fail(f"--model_type must be 'ours' or 'unet2d', got {args.model_type!r}")

    # Scheduler and objective.
    if args.variance_type not in VARIANCE_TYPES:
        _fail(f"--variance_type must be one of {VARIANCE_TYPES}, got {args.variance_type!r}")
    if args.prediction_type not in PREDICTION_TYPES:
        _fail(f"--prediction_type must be one of {PREDICTION_TYPES}, got {args.prediction_type!r}")
    if args.loss_type not in LOSS_TYPES:
        _fail(f"--loss_type must be one of {LOSS_TYPES}, got {args.loss_type!r}")
    learned = args.variance_type in LEARNED_VARIANCE_TYPES
    if args.loss_type == "hybrid" and not learned:
        _fail(f"--loss_type hybrid trains a learned variance and needs --variance_type in "
              f"{LEARNED_VARIANCE_TYPES}, got {args.variance_type!r}; use --loss_type simple with a fixed variance")
    if args.loss_type == "simple" and learned:
        _fail(f"--variance_type {args.variance_type} adds a variance head that --loss_type simple never trains "
              f"(its samples would use an untrained variance); use --loss_type hybrid or kl, or a fixed "
              f"--variance_type")
    if args.snr_gamma is not None:
        if not args.snr_gamma > 0:
            _fail(f"--snr_gamma must be positive, got {args.snr_gamma!r}")
        if args.loss_type == "kl":
            _fail("--snr_gamma weights the MSE term; --loss_type kl has none")
    if args.ddpm_num_inference_steps is not None and args.ddpm_num_inference_steps > args.ddpm_num_steps:
        _fail(f"--ddpm_num_inference_steps ({args.ddpm_num_inference_steps}) cannot exceed --ddpm_num_steps "
              f"({args.ddpm_num_steps})")

    # Class conditioning.
    if args.class_column is not None and args.num_class_embeds is None:
        _fail(f"--class_column {args.class_column!r} needs --num_class_embeds (the number of classes) so the "
              f"UNet gets a class embedding")
    if args.num_class_embeds is not None and args.class_column is None and args.dataset_name is not None:
        _fail("--num_class_embeds with --dataset_name needs --class_column naming the label column")
    if args.train_data_dir is not None and (args.class_column is not None or args.image_column is not None):
        _fail("--class_column/--image_column apply to --dataset_name; with --train_data_dir the labels come from "
              "one sub-folder per class")
    if not 0.0 <= args.class_dropout_prob < 1.0:
        _fail(f"--class_dropout_prob must be in [0, 1), got {args.class_dropout_prob!r}")
    if args.class_dropout_prob > 0 and args.num_class_embeds is None:
        _fail("--class_dropout_prob drops class labels for classifier-free guidance and needs --num_class_embeds")

    # Output folder and resume.
    if args.resume_from_checkpoint is not None and args.overwrite_output_dir:
        _fail("--resume_from_checkpoint continues the run in --output_dir; --overwrite_output_dir would delete "
              "its checkpoints. Pass one of them.")
    if args.push_to_hub and args.hub_model_id is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(args.hub_model_id)
        except HFValidationError as exc:
            _fail(f"--hub_model_id {args.hub_model_id!r} is not a valid repo id ('user/name'): {exc}")
    if getattr(args, "hub_strategy", None) is not None and not args.push_to_hub:
        _fail(f"--hub_strategy {args.hub_strategy} has no effect without --push_to_hub")
    if args.hub_private_repo and not args.push_to_hub:
        logger.warning("--hub_private_repo has no effect without --push_to_hub")


def resolve_out_channels(in_channels: int, variance_type: str, out_channels: Optional[int] = None) -> int:
    """Output channels the UNet needs for ``variance_type``: C, or 2C with a learned variance (IDM).

    Args:
        in_channels: image channels C.
        variance_type: the scheduler's variance type.
        out_channels: what a user config asked for (``None`` = derive it).

    Raises:
        ValueError: when ``out_channels`` is given and does not match.
    """
    needed = 2 * in_channels if variance_type in LEARNED_VARIANCE_TYPES else in_channels
    if out_channels is not None and out_channels != needed:
        kind = "a learned variance needs 2×C" if needed != in_channels else "a fixed variance needs C"
        raise ValueError(
            f"the UNet has out_channels={out_channels} but --variance_type {variance_type} with in_channels="
            f"{in_channels} needs out_channels={needed} ({kind}); drop out_channels from the config to have "
            f"it set automatically"
        )
    return needed


# --------------------------------------------------------------------------------------------------
# Small file-system helpers
# --------------------------------------------------------------------------------------------------


def fsync_dir(path: str) -> None:
    """fsync a directory so a rename or a new entry inside it survives a power cut (no-op on Windows)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file and directory under ``path`` (files first, then their folders)."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and an atomic rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (see :func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_tree_safely(path: str) -> None:
    """Rename ``path`` to a hidden trash name first, then delete it.

    A process killed half-way through deleting leaves a ``.trash-*`` folder that no lookup ever
    mistakes for a checkpoint or a pipeline component; :func:`clean_stale_temporaries` removes it.
    """
    if not os.path.exists(path):
        return
    parent, name = os.path.split(os.path.abspath(path))
    trash = os.path.join(parent, f"{_TRASH_PREFIX}{name}-{os.getpid()}-{time.time_ns()}")
    os.rename(path, trash)
    fsync_dir(parent)
    if os.path.isdir(trash):
        shutil.rmtree(trash, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(trash)


def clean_stale_temporaries(folder: str) -> List[str]:
    """Delete ``.tmp-*`` and ``.trash-*`` leftovers of a killed run in ``folder``; returns their names."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        if name.startswith(_STALE_PREFIXES):
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            removed.append(name)
    return removed


# --------------------------------------------------------------------------------------------------
# Output folder protection and atomic publishing
# --------------------------------------------------------------------------------------------------


def prepare_output_dir(output_dir: str, overwrite: bool = False, resuming: bool = False) -> None:
    """Make sure ``output_dir`` may be written by this run; call it on the main process before training.

    - missing or empty: created;
    - non-empty and neither ``overwrite`` nor ``resuming``: refused (the user's files are never touched);
    - ``overwrite``: the previous run's checkpoints, logs and sample folders are removed now (they would
      mix with the new run's); its exported pipeline stays until the new one replaces it atomically at
      the end, so a crash of the new run never leaves the folder without a complete pipeline. Files
      the script did not write are left alone.
    - ``resuming``: left as is apart from stale temporaries and an interrupted publish, which is completed.

    Raises:
        FileExistsError: when the folder holds files and neither flag was given.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"--output_dir {output_dir!r} exists and is not a folder")
    os.makedirs(output_dir, exist_ok=True)
    recover_output_dir(output_dir)
    clean_stale_temporaries(output_dir)
    entries = [name for name in os.listdir(output_dir) if not name.startswith(".")]
    if not entries or resuming:
        return
    if not overwrite:
        shown = ", ".join(sorted(entries)[:6]) + (", ..." if len(entries) > 6 else "")
        raise FileExistsError(
            f"--output_dir {output_dir!r} is not empty ({shown}); it may hold another run. Pass "
            f"--overwrite_output_dir to replace that run's outputs, --resume_from_checkpoint latest to continue "
            f"it, or choose another --output_dir."
        )
    for name in entries:
        if _CHECKPOINT_RE.match(name) or name in ("logs", "samples"):
            remove_tree_safely(os.path.join(output_dir, name))
    unknown = [name for name in entries if name not in MANAGED_OUTPUT_NAMES and not _CHECKPOINT_RE.match(name)]
    if unknown:
        logger.warning("--overwrite_output_dir: keeping files this script did not write: %s", ", ".join(unknown))


def publish_dir(src: str, dst: str, remove: Sequence[str] = ()) -> List[str]:
    """Move every file of the complete folder ``src`` into ``dst``, each with an atomic rename.

    A journal naming ``src`` is written first and deleted last; if the process dies in between,
    :func:`recover_output_dir` (run at the next start) finishes the move. At every moment each file
    in ``dst`` is a complete file, old or new. ``src`` must be on the same file system as ``dst``
    (make it inside ``dst``).

    Args:
        src: a finished, fsynced folder (e.g. an exported pipeline).
        dst: the folder to update.
        remove: relative paths in ``dst`` to delete after the move (files of the old export that the
            new one does not have).

    Returns:
        The relative paths of the published files.
    """
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    files = sorted(
        os.path.relpath(os.path.join(root, name), src) for root, _, names in os.walk(src) for name in names
    )
    journal = os.path.join(dst, PUBLISH_JOURNAL_NAME)
    write_json_atomic(journal, {"src": os.path.basename(src), "files": files, "remove": list(remove)})
    _finish_publish(src, dst, files, remove)
    return files


def _finish_publish(src: str, dst: str, files: Sequence[str], remove: Sequence[str]) -> None:
    touched = set()
    for rel in files:
        source = os.path.join(src, rel)
        if not os.path.exists(source):  # already moved before a crash
            continue
        target = os.path.join(dst, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(source, target)
        touched.add(os.path.dirname(target))
        fault_point("publish")
    for rel in remove:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(dst, rel))
    for folder in sorted(touched | {dst}):
        fsync_dir(folder)
    shutil.rmtree(src, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(dst, PUBLISH_JOURNAL_NAME))
    fsync_dir(dst)


def recover_output_dir(output_dir: str) -> bool:
    """Finish a :func:`publish_dir` that a crash interrupted; returns True if there was one."""
    journal = os.path.join(output_dir, PUBLISH_JOURNAL_NAME)
    if not os.path.isfile(journal):
        return False
    try:
        with open(journal) as f:
            entry = json.load(f)
        src = os.path.join(output_dir, entry["src"])
        files, remove = list(entry["files"]), list(entry.get("remove", []))
    except (OSError, ValueError, KeyError, TypeError):
        # The journal itself is written atomically, so this only happens if someone edited it.
        logger.warning("ignoring unreadable publish journal %s", journal)
        os.unlink(journal)
        return False
    logger.warning("completing an interrupted export into %s", output_dir)
    _finish_publish(os.path.abspath(src), os.path.abspath(output_dir), files, remove)
    return True


def files_under(folder: str) -> List[str]:
    """Sorted relative paths of every file under ``folder``."""
    return sorted(
        os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names
    )


# --------------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------------


def capture_rng_state(generators: Optional[Dict[str, torch.Generator]] = None) -> Dict[str, Any]:
    """JSON-serialisable RNG states of python, numpy, torch (CPU and CUDA) and named generators."""
    version, internal, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss_next],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_cached)],
        "torch": torch.get_rng_state().tolist(),
        "generators": {name: g.get_state().tolist() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Dict[str, Any], generators: Optional[Dict[str, torch.Generator]] = None) -> None:
    """Inverse of :func:`capture_rng_state`; generators named in ``state`` but not passed are an error."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np_name, np_keys, np_pos, np_has_gauss, np_cached = state["numpy"]
    np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    generators = generators or {}
    for name, values in state.get("generators", {}).items():
        if name not in generators:
            raise CheckpointError(f"the checkpoint has RNG state for generator {name!r} but none was given")
        # Generator states live on the CPU even for CUDA generators.
        generators[name].set_state(torch.tensor(values, dtype=torch.uint8))


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


@dataclass
class CheckpointData:
    """Everything :func:`load_checkpoint` read back (tensors on the CPU).

    Attributes:
        path: the checkpoint folder.
        step: optimizer steps done.
        model_state: training weights (not EMA).
        ema_state: EMA shadow weights by parameter name, or ``None``.
        optimizer_state / lr_scheduler_state / scaler_state: ``state_dict()``s, or ``None``.
        sampler_state: the timestep sampler's tensors.
        training_state: JSON data: positions, loss history, EMA bookkeeping, model config, ...
        rng_states: one RNG state per process rank.
    """

    path: str
    step: int
    model_state: Dict[str, torch.Tensor]
    ema_state: Optional[Dict[str, torch.Tensor]]
    optimizer_state: Optional[dict]
    lr_scheduler_state: Optional[dict]
    scaler_state: Optional[dict]
    sampler_state: Dict[str, torch.Tensor]
    training_state: Dict[str, Any]
    rng_states: List[Dict[str, Any]] = field(default_factory=list)


def checkpoint_step(path: str) -> Optional[int]:
    """The step of a ``checkpoint-<step>`` folder name, or None for any other name."""
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def verify_checkpoint(path: str, check_hashes: bool = True) -> Dict[str, Any]:
    """Check a checkpoint folder against its manifest and return the manifest.

    Raises:
        CheckpointError: naming the missing, truncated or altered file.
    """
    manifest_path = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{path} is not a complete checkpoint: {MANIFEST_NAME} is missing")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path} is unreadable: {exc}") from exc
    if manifest.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {manifest.get('format_version')!r}, this version reads "
            f"{CHECKPOINT_FORMAT_VERSION}"
        )
    for name, info in files.items():
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            raise CheckpointError(f"{path} is incomplete: {name} is missing")
        size = os.path.getsize(file_path)
        if size != info["size"]:
            raise CheckpointError(f"{file_path} is truncated or altered: {size} bytes, expected {info['size']}")
        if check_hashes and _sha256(file_path) != info["sha256"]:
            raise CheckpointError(f"{file_path} does not match its SHA-256 in {MANIFEST_NAME}: altered or corrupt")
    return manifest


def list_checkpoints(folder: str, verify: bool = True) -> List[str]:
    """Complete checkpoint folders in ``folder``, oldest step first.

    Folders that fail :func:`verify_checkpoint` (size check only, for speed) are skipped with a warning.
    """
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        step = checkpoint_step(name)
        path = os.path.join(folder, name)
        if step is None or not os.path.isdir(path):
            continue
        if verify:
            try:
                verify_checkpoint(path, check_hashes=False)
            except CheckpointError as exc:
                logger.warning("skipping %s: %s", path, exc)
                continue
        found.append((step, path))
    return [path for _, path in sorted(found)]


def find_latest_checkpoint(folder: str, quarantine: bool = False) -> Optional[str]:
    """The newest checkpoint in ``folder`` whose every file matches its manifest's SHA-256, or None if there is none.

    Newer folders that fail the hash check (altered after they were written, e.g. a same-size corruption the cheap
    size check of :func:`list_checkpoints` lets through) are skipped with a warning naming them, so ``latest``
    resumes from the newest intact state. Only the candidates down to the first intact one are hashed.

    Args:
        folder: The run's output folder.
        quarantine: Rename each skipped folder to ``checkpoint-<step>.corrupt-<unix time>`` (kept, never deleted),
            so that a resumed run reaching that step again writes a fresh checkpoint there and rotation does not
            count it. Only one process of a run may pass True.

    Raises:
        CheckpointError: Checkpoints exist but none is intact (nothing is renamed then): resuming from nothing
            would silently restart the run.
    """
    checkpoints = list_checkpoints(folder)
    failures = []
    for path in reversed(checkpoints):
        try:
            verify_checkpoint(path, check_hashes=True)
        except CheckpointError as exc:
            logger.warning("latest: skipping %s: %s", path, exc)
            failures.append((path, exc))
            continue
        for bad, _ in failures if quarantine else ():
            aside = f"{bad}.corrupt-{int(time.time())}"
            os.replace(bad, aside)
            logger.warning("latest: moved the altered %s aside to %s", bad, aside)
        return path
    if failures:
        raise CheckpointError(f"none of the {len(failures)} checkpoints in {folder} is intact: "
                              + "; ".join(str(exc) for _, exc in failures)
                              + ". Resume from one of them explicitly after repairing it, or start over with "
                                "--overwrite_output_dir.")
    return None


def resolve_resume_path(resume_from_checkpoint: Optional[str], output_dir: str,
                        quarantine: bool = False) -> Optional[str]:
    """Turn ``--resume_from_checkpoint`` into a folder: ``latest`` -> newest intact one in ``output_dir``
    (:func:`find_latest_checkpoint`, with ``quarantine``; None when there is none yet, so a first run with
    ``latest`` starts fresh); a name or path -> that folder, which must exist."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        return find_latest_checkpoint(output_dir, quarantine=quarantine)
    for candidate in (resume_from_checkpoint, os.path.join(output_dir, resume_from_checkpoint)):
        if os.path.isdir(candidate):
            return candidate
    raise CheckpointError(
        f"--resume_from_checkpoint {resume_from_checkpoint!r} is neither 'latest' nor an existing checkpoint "
        f"folder (looked in the current folder and in {output_dir!r}); available: "
        f"{[os.path.basename(p) for p in list_checkpoints(output_dir)]}"
    )


def _plain_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """A model config as JSON data, without diffusers' private bookkeeping keys."""
    plain = {}
    for key, value in dict(config).items():
        if key.startswith("_"):
            continue
        plain[key] = json.loads(json.dumps(value, default=list))  # tuples -> lists, as after a reload
    return plain


def save_checkpoint(
    folder: str,
    step: int,
    *,
    model: torch.nn.Module,
    ema=None,
    optimizer=None,
    lr_scheduler=None,
    scaler=None,
    sampler_state: Optional[Dict[str, torch.Tensor]] = None,
    training_state: Optional[Dict[str, Any]] = None,
    rng_states: Optional[List[Dict[str, Any]]] = None,
) -> str:
    """Write ``folder/checkpoint-<step>`` atomically and return its path (call on the main process only).

    Args:
        folder: where checkpoints live (the run's output folder).
        step: optimizer steps done.
        model: the *unwrapped* model holding the training weights (never EMA weights).
        ema: a ``diffusers.training_utils.EMAModel`` tracking ``model.parameters()``, or None.
        optimizer / lr_scheduler / scaler: objects with ``state_dict()``, or None.
        sampler_state: the timestep sampler's ``state_dict()`` (tensors).
        training_state: JSON data (positions, loss history, ...).
        rng_states: one :func:`capture_rng_state` per process rank, in rank order.

    Raises:
        ValueError: if any weight is NaN or infinite (a checkpoint is never written with such weights).
    """
    from safetensors.torch import save_file

    model_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    assert_finite(model_state, "model weights")
    final = os.path.join(folder, f"{CHECKPOINT_PREFIX}{step}")
    tmp = os.path.join(folder, f"{_TMP_PREFIX}{CHECKPOINT_PREFIX}{step}-{os.getpid()}-{time.time_ns()}")
    os.makedirs(tmp)
    try:
        save_file(model_state, os.path.join(tmp, "model.safetensors"))
        fault_point("checkpoint_write")
        state = dict(training_state or {})
        state["step"] = int(step)
        state["model_class"] = type(model).__name__
        state["model_config"] = _plain_config(getattr(model, "config", {}) or {})
        if ema is not None:
            names = [name for name, _ in model.named_parameters()]
            if len(names) != len(ema.shadow_params):
                raise ValueError(f"EMA tracks {len(ema.shadow_params)} tensors, the model has {len(names)} parameters")
            ema_state = {n: p.detach().cpu().contiguous() for n, p in zip(names, ema.shadow_params)}
            assert_finite(ema_state, "EMA weights")
            save_file(ema_state, os.path.join(tmp, "ema.safetensors"))
            ema_meta = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
            state["ema"] = ema_meta
        if sampler_state:
            save_file({k: v.detach().cpu().contiguous() for k, v in sampler_state.items()},
                      os.path.join(tmp, "timestep_sampler.safetensors"))
        for name, obj in (("optimizer.pt", optimizer), ("lr_scheduler.pt", lr_scheduler), ("scaler.pt", scaler)):
            if obj is not None:
                torch.save(obj.state_dict(), os.path.join(tmp, name))
        with open(os.path.join(tmp, "training_state.json"), "w") as f:
            json.dump(state, f, allow_nan=False)
        with open(os.path.join(tmp, "rng_states.json"), "w") as f:
            json.dump(list(rng_states or []), f)
        fsync_tree(tmp)
        manifest = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "step": int(step),
            "files": {
                name: {"size": os.path.getsize(os.path.join(tmp, name)), "sha256": _sha256(os.path.join(tmp, name))}
                for name in sorted(os.listdir(tmp))
            },
        }
        # The manifest is written last: a folder without it is never taken for a checkpoint.
        write_json_atomic(os.path.join(tmp, MANIFEST_NAME), manifest)
        fault_point("checkpoint_rename")
        if os.path.exists(final):  # e.g. the NaN guard saving the step a periodic save already wrote
            remove_tree_safely(final)
        os.rename(tmp, final)
        fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _torch_load_safe(path: str):
    """``torch.load`` that never unpickles arbitrary objects (tensors, containers and numbers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path: str, check_hashes: bool = True) -> CheckpointData:
    """Read a checkpoint written by :func:`save_checkpoint`, verifying it first.

    Raises:
        CheckpointError: when it is incomplete, truncated or altered.
    """
    from safetensors.torch import load_file

    manifest = verify_checkpoint(path, check_hashes=check_hashes)
    files = manifest["files"]

    def optional(name, loader):
        return loader(os.path.join(path, name)) if name in files else None

    try:
        with open(os.path.join(path, "training_state.json")) as f:
            training_state = json.load(f)
        with open(os.path.join(path, "rng_states.json")) as f:
            rng_states = json.load(f)
        return CheckpointData(
            path=path,
            step=int(manifest["step"]),
            model_state=load_file(os.path.join(path, "model.safetensors")),
            ema_state=optional("ema.safetensors", load_file),
            optimizer_state=optional("optimizer.pt", _torch_load_safe),
            lr_scheduler_state=optional("lr_scheduler.pt", _torch_load_safe),
            scaler_state=optional("scaler.pt", _torch_load_safe),
            sampler_state=optional("timestep_sampler.safetensors", load_file) or {},
            training_state=training_state,
            rng_states=rng_states,
        )
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors / unpickler errors become one clear message
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc


def check_checkpoint_matches(data: CheckpointData, model: torch.nn.Module) -> None:
    """Refuse to resume into a model of another architecture (class, config, parameter names or shapes).

    Raises:
        CheckpointError: listing what differs.
    """
    saved_class = data.training_state.get("model_class")
    if saved_class != type(model).__name__:
        raise CheckpointError(
            f"checkpoint {data.path} holds a {saved_class}, this run builds a {type(model).__name__} "
            f"(check --model_type)"
        )
    saved = data.training_state.get("model_config", {})
    current = _plain_config(getattr(model, "config", {}) or {})
    differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differing:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in differing[:8])
        raise CheckpointError(
            f"checkpoint {data.path} is from another architecture ({details}); resume with the same "
            f"--unet_preset/--unet_config and scheduler flags, or start a new --output_dir"
        )
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in data.model_state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:5]
        extra = sorted(set(got) - set(expected))[:5]
        shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])[:5]
        raise CheckpointError(
            f"checkpoint {data.path} does not fit the model: missing {missing}, unexpected {extra}, "
            f"shape mismatch {shapes}"
        )


def load_ema_state(ema, model: torch.nn.Module, data: CheckpointData) -> None:
    """Put a checkpoint's EMA shadow weights and bookkeeping into ``ema`` (matched by parameter name)."""
    if data.ema_state is None:
        raise CheckpointError(f"checkpoint {data.path} has no EMA weights but this run uses --use_ema")
    names = [name for name, _ in model.named_parameters()]
    if set(names) != set(data.ema_state):
        raise CheckpointError(f"checkpoint {data.path}: EMA parameter names do not match the model")
    meta = dict(data.training_state.get("ema", {}))
    meta["shadow_params"] = [
        data.ema_state[n].to(device=p.device, dtype=p.dtype) for n, (_, p) in zip(names, model.named_parameters())
    ]
    ema.load_state_dict(meta)


def rotate_checkpoints(folder: str, total_limit: Optional[int]) -> List[str]:
    """Delete the oldest complete checkpoints beyond ``total_limit``; returns the deleted paths.

    Call it after a new checkpoint is complete, so there are never fewer than ``total_limit`` good ones.
    """
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(folder, verify=False)
    doomed = checkpoints[: max(0, len(checkpoints) - total_limit)]
    for path in doomed:
        remove_tree_safely(path)
    return doomed


# --------------------------------------------------------------------------------------------------
# Training-time guards
# --------------------------------------------------------------------------------------------------


def assert_finite(tensors: Dict[str, torch.Tensor], what: str) -> None:
    """Raise ValueError naming the first tensor with a NaN or infinite value."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"refusing to save {what}: {name} contains NaN or infinite values")


@contextlib.contextmanager
def ema_weights(ema, model: torch.nn.Module):
    """Temporarily load EMA weights into ``model`` (store → copy_to → restore, even on error).

    The training weights are restored bit for bit afterwards; EMA weights never overwrite them
    (the fault of diffusers issue #2321). With ``ema=None`` the model is used as is.
    """
    if ema is None:
        yield model
        return
    params = list(model.parameters())
    ema.store(params)
    try:
        ema.copy_to(params)
        yield model
    finally:
        ema.restore(params)


# --------------------------------------------------------------------------------------------------
# Reporting: images, curves, metrics
# --------------------------------------------------------------------------------------------------


def make_image_grid(images: np.ndarray, nrow: Optional[int] = None, scale: int = 1, padding: int = 1):
    """Tile images into one PIL image.

    Args:
        images: (N, H, W, C) floats in [0, 1] (C = 1 or 3), as ``DDPMPipeline(output_type="np")`` returns.
        nrow: images per row (default ⌈√N⌉).
        scale: integer nearest-neighbour upscaling, so 16×16 digits are visible.
        padding: pixels of white between tiles (before scaling).
    """
    from PIL import Image

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W, 1|3), got shape {images.shape}")
    count, height, width, channels = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(count)))
    ncol = math.ceil(count / nrow)
    grid = np.ones(
        (ncol * (height + padding) + padding, nrow * (width + padding) + padding, channels), dtype=np.float32
    )
    for index, image in enumerate(images):
        row, col = divmod(index, nrow)
        top, left = padding + row * (height + padding), padding + col * (width + padding)
        grid[top:top + height, left:left + width] = image
    pixels = (np.clip(grid, 0.0, 1.0) * 255).round().astype(np.uint8)
    if scale > 1:
        pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode="L" if channels == 1 else "RGB")


def save_loss_curve(steps: Sequence[int], losses: Sequence[float], path: str, title: str = "training loss") -> None:
    """Plot loss against optimizer step (raw and a moving average) to a PNG with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.add_subplot(1, 1, 1)
    steps, losses = np.asarray(steps, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    axes.plot(steps, losses, lw=0.6, alpha=0.5, label="per step")
    if len(losses) >= 10:
        window = max(2, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axes.plot(steps[window - 1:], smooth, lw=1.5, label=f"mean of {window}")
    if len(losses) and np.all(losses[np.isfinite(losses)] > 0):
        axes.set_yscale("log")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    figure.savefig(path, format="png")


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes in name order: equal on two ranks iff their weights are equal."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Model and scheduler construction from the script's flags
# --------------------------------------------------------------------------------------------------


def load_unet_config(path: str) -> Dict[str, Any]:
    """Read a UNet config: a JSON file, or a folder holding ``config.json`` (e.g. a saved ``unet/`` folder).

    A diffusers ``UNet2DModel`` config (recognised by ``down_block_types``) is translated to ours with
    :func:`diffusers_ddpm_ext.unet.unet2d_config_to_ours`; diffusers' private ``_``-keys are dropped.
    """
    from .unet import unet2d_config_to_ours

    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read UNet config {file!r}: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"UNet config {file!r} must be a JSON object, got {type(config).__name__}")
    if "down_block_types" in config:
        config = unet2d_config_to_ours(config)
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_unet(
    *,
    preset: Optional[str] = "digits-small",
    config_path: Optional[str] = None,
    resolution: Optional[int] = None,
    variance_type: str = "fixed_small",
    num_class_embeds: Optional[int] = None,
    model_type: str = "ours",
    seed: Optional[int] = None,
):
    """Build the UNet the script trains.

    Args:
        preset: a :meth:`DDPMUNet2DModel.list_presets` name (used when ``config_path`` is None).
        config_path: a JSON config (ours or ``UNet2DModel``'s) or a folder with ``config.json``.
        resolution: overrides ``sample_size`` (None keeps the preset's).
        variance_type: the scheduler's variance type; a preset's ``out_channels`` is set to C or 2C to match,
            an explicit ``out_channels`` in ``config_path`` must already match (see :func:`resolve_out_channels`).
        num_class_embeds: classes for class conditioning (None = unconditional; overrides the config).
        model_type: ``"ours"`` (``DDPMUNet2DModel``) or ``"unet2d"`` (diffusers' ``UNet2DModel`` with the same
            architecture, converted with ``to_unet2d``).
        seed: seeds the weight initialisation (identical on every process).

    Returns:
        The model, in training mode.
    """
    from .unet import DDPMUNet2DModel, UNET_PRESETS

    if config_path is not None:
        config = load_unet_config(config_path)
        explicit_out = config.get("out_channels")
    else:
        if preset not in UNET_PRESETS:
            raise ValueError(f"--unet_preset {preset!r} is unknown; choose one of {sorted(UNET_PRESETS)}")
        config = dict(UNET_PRESETS[preset]["config"])
        explicit_out = None  # presets are adapted to the variance type
    if resolution is not None:
        config["sample_size"] = resolution
    in_channels = config.get("in_channels", 3)
    config["out_channels"] = resolve_out_channels(in_channels, variance_type, explicit_out)
    if config.get("num_class_embeds") != num_class_embeds:
        if config.get("num_class_embeds") is not None and num_class_embeds is None:
            logger.warning("the UNet config has num_class_embeds=%s but no --num_class_embeds was given: training "
                           "an unconditional model", config.get("num_class_embeds"))
        config["num_class_embeds"] = num_class_embeds
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model = DDPMUNet2DModel(**config)
    except (TypeError, ValueError) as exc:  # name the flag the bad config came from
        source = f"--unet_config {config_path!r}" if config_path is not None else f"--unet_preset {preset!r}"
        extra = f" with --resolution {resolution}" if resolution is not None else ""
        raise ValueError(f"{source}{extra} gives an invalid UNet config: {exc}") from exc
    if model_type == "unet2d":
        model = model.to_unet2d()
    elif model_type != "ours":
        raise ValueError(f"model_type must be 'ours' or 'unet2d', got {model_type!r}")
    return model.train()


def build_noise_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2",
                          prediction_type: str = "epsilon", variance_type: str = "learned_range", **kwargs):
    """The training/sampling scheduler (:class:`GaussianDiffusionScheduler`) from the script's flags."""
    from .scheduler import GaussianDiffusionScheduler

    return GaussianDiffusionScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction_type=prediction_type,
        variance_type=variance_type, **kwargs
    )


def check_model_scheduler(model, noise_scheduler, num_class_embeds: Optional[int] = None) -> None:
    """Cross-check a built model against the scheduler and the class flags (after building, before training)."""
    cfg = model.config
    out_channels = cfg.get("out_channels") or cfg.in_channels
    resolve_out_channels(cfg.in_channels, noise_scheduler.config.variance_type, out_channels)
    if num_class_embeds is not None and cfg.get("num_class_embeds") is None:
        raise ValueError("--num_class_embeds was given but the UNet has no class embedding")


def training_config_for_card(args) -> Dict[str, Any]:
    """The flags worth recording (model card, tensorboard, ``training_args.json``): secrets and paths removed."""
    hidden = {"hub_token", "local_rank", "logging_dir", "cache_dir"}
    config = {}
    for key, value in sorted(vars(args).items()):
        if key in hidden or key.startswith("debug_"):
            continue
        config[key] = value
    return config


# --------------------------------------------------------------------------------------------------
# Small loop helpers
# --------------------------------------------------------------------------------------------------


def seed_everything(seed: int, *generators: torch.Generator) -> None:
    """Seed python, numpy, torch (all devices) and the given generators with ``seed``."""
    seed = int(seed) % (2**32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    for generator in generators:
        generator.manual_seed(seed)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Put ``model`` in eval mode inside the block and restore its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def all_finite_and_mean(accelerator, loss: torch.Tensor):
    """(every process's loss is finite, mean loss over processes) with one collective call.

    All processes must take the same branch after a non-finite loss (skip or stop), or DDP would hang
    waiting for a gradient all-reduce that one process never starts.
    """
    value = loss.detach().float().reshape(1)
    packed = torch.cat([torch.isfinite(value).float(), torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0)])
    if accelerator.num_processes > 1:
        packed = accelerator.gather(packed.to(accelerator.device)).reshape(-1, 2)
    else:
        packed = packed.reshape(1, 2)
    finite = bool(packed[:, 0].min() > 0)
    return finite, float(packed[:, 1].mean()) if finite else float("nan")


def ema_checksum(ema) -> Optional[str]:
    """SHA-256 of an EMAModel's shadow weights (None without EMA)."""
    if ema is None:
        return None
    digest = hashlib.sha256()
    for tensor in ema.shadow_params:
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tracker_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """Flatten a config for tensorboard's hparams (only int/float/str/bool values; others as strings)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


def progress_bar(total: int, initial: int = 0, disable: bool = False):
    """tqdm over optimizer steps."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=disable, desc="steps", dynamic_ncols=True)


def default_repo_name(output_dir: str) -> str:
    """A valid Hub repo name from the output folder's name (used when --hub_model_id is not given)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(os.path.abspath(output_dir))).strip(".-")
    return (name or "ddpm-model")[:96]
