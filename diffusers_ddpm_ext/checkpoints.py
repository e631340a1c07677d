"""Crash-safe, verified, resumable checkpoints.

A checkpoint is written into a hidden temporary folder, every file is fsynced, a manifest with sizes and SHA-256
digests is written last, and only then is the folder renamed to ``checkpoint-<step>`` (:func:`save_checkpoint`).
A rename is atomic on POSIX file systems, so a process killed at any moment leaves either no checkpoint or a
complete one; ``latest`` (:func:`find_latest_checkpoint`) also skips any folder whose manifest does not verify.
Weights are safetensors; optimizer, LR scheduler and grad-scaler states load with ``torch.load(weights_only=True)``;
everything else (positions, RNG states, EMA bookkeeping) is JSON. Nothing is unpickled.

Exact resume also needs every random stream: :func:`capture_rng_state` / :func:`restore_rng_state` store the
RNG states of python, numpy, torch and named generators per process as JSON. (The data order is
:class:`diffusers_ddpm_ext.data.ResumableBatchSampler`'s pure function of (seed, epoch); the position inside an
epoch is a counter stored with the step.)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .rundir import (
    CHECKPOINT_PREFIX,
    TMP_PREFIX,
    checkpoint_step,
    fault_point,
    fsync_dir,
    remove_tree_safely,
    sha256_file,
    write_json_atomic,
    write_new_file,
    writing,
)

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 1
MANIFEST_NAME = "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, tampered with, or from another architecture."""


def first_non_finite(tensors: Dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating-point tensor holding a NaN or an infinity; None when all are finite."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def assert_finite(tensors: Dict[str, torch.Tensor], what: str) -> None:
    """Raise ValueError naming the first tensor with a NaN or infinite value."""
    name = first_non_finite(tensors)
    if name is not None:
        raise ValueError(f"refusing to save {what}: {name} contains NaN or infinite values")


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
        if check_hashes and sha256_file(file_path) != info["sha256"]:
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

    Every ``checkpoint-<step>`` folder is a candidate, damaged or not: a newer one that is truncated, incomplete
    (no manifest) or altered is skipped with a warning naming it and what is wrong, so ``latest`` resumes from the
    newest intact state, and never silently from nothing. Only the candidates down to the first intact one are
    hashed.

    Args:
        folder: The run's output folder.
        quarantine: Rename each skipped folder to ``checkpoint-<step>.corrupt-<unix time>`` (kept, never deleted),
            so that a resumed run reaching that step again writes a fresh checkpoint there and rotation does not
            count it. Only one process of a run may pass True.

    Raises:
        CheckpointError: Checkpoints exist but none is intact (nothing is renamed then): resuming from nothing
            would silently restart the run.
    """
    checkpoints = list_checkpoints(folder, verify=False)  # the damaged ones too: each is reported, none dropped
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
            logger.warning("latest: moved the damaged %s aside to %s (kept, never deleted)", bad, aside)
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
    from safetensors.torch import save as safetensors_bytes

    model_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    assert_finite(model_state, "model weights")
    final = os.path.join(folder, f"{CHECKPOINT_PREFIX}{step}")
    tmp = os.path.join(folder, f"{TMP_PREFIX}{CHECKPOINT_PREFIX}{step}-{os.getpid()}-{time.time_ns()}")
    # Every file is serialised in memory first and written with plain writes, so a full disk or a read-only
    # folder is reported as an OutputWriteError naming the file (torch.save writing to a path reports it as
    # "unexpected pos ..."), and nothing is in place until the complete folder is renamed.
    state = dict(training_state or {})
    state["step"] = int(step)
    state["model_class"] = type(model).__name__
    state["model_config"] = _plain_config(getattr(model, "config", {}) or {})
    files = {"model.safetensors": safetensors_bytes(model_state)}
    if ema is not None:
        names = [name for name, _ in model.named_parameters()]
        if len(names) != len(ema.shadow_params):
            raise ValueError(f"EMA tracks {len(ema.shadow_params)} tensors, the model has {len(names)} parameters")
        ema_state = {n: p.detach().cpu().contiguous() for n, p in zip(names, ema.shadow_params)}
        assert_finite(ema_state, "EMA weights")
        files["ema.safetensors"] = safetensors_bytes(ema_state)
        state["ema"] = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    if sampler_state:
        files["timestep_sampler.safetensors"] = safetensors_bytes(
            {k: v.detach().cpu().contiguous() for k, v in sampler_state.items()})
    for name, obj in (("optimizer.pt", optimizer), ("lr_scheduler.pt", lr_scheduler), ("scaler.pt", scaler)):
        if obj is not None:
            buffer = io.BytesIO()
            torch.save(obj.state_dict(), buffer)
            files[name] = buffer.getvalue()
    files["training_state.json"] = json.dumps(state, allow_nan=False).encode()
    files["rng_states.json"] = json.dumps(list(rng_states or [])).encode()
    with writing(final):
        os.makedirs(tmp)
    try:
        for name, data in files.items():
            write_new_file(os.path.join(tmp, name), data, shown_path=os.path.join(final, name))
            if name == "model.safetensors":
                fault_point("checkpoint_write")
        manifest = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "step": int(step),
            "files": {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                      for name, data in sorted(files.items())},
        }
        # The manifest is written last: a folder without it is never taken for a checkpoint.
        write_json_atomic(os.path.join(tmp, MANIFEST_NAME), manifest)
        fault_point("checkpoint_rename")
        with writing(final):
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
        CheckpointError: when it is incomplete, truncated or altered, or its weights or EMA weights hold a NaN or an
            infinity (:func:`save_checkpoint` never writes such a state, so it was altered; training from it would
            diverge or carry NaN into every sample a few steps later).
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
        data = CheckpointData(
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
    for what, tensors in (("weights", data.model_state), ("EMA weights", data.ema_state or {})):
        name = first_non_finite(tensors)
        if name is not None:
            raise CheckpointError(f"{path} is not a good state: its {what} hold NaN or infinite values ({name}); "
                                  f"resume from an earlier checkpoint by name (--resume_from_checkpoint "
                                  f"checkpoint-<step>) or start over")
    return data


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

