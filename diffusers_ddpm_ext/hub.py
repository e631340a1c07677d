"""Hub export, model cards and push for pipelines built on ``DDPMUNet2DModel`` / ``GaussianDiffusionScheduler``.

An export is a folder that a user *without* this package loads with plain diffusers::

    DiffusionPipeline.from_pretrained("user/repo", trust_remote_code=True)

diffusers 0.42 loads a third-party component ``["lib", "Cls"]`` of ``model_index.json`` from the repo file
``<component>/<lib>.py`` when that file exists (``pipeline_loading_utils.get_class_obj_and_candidates``), and a
third-party pipeline class ``_class_name: ["file", "Cls"]`` from ``<file>.py`` at the repo root. The export
therefore copies the self-contained module of every non-diffusers class next to its weights and rewrites
``model_index.json`` to name those files::

    model_index.json           {"_class_name": ["ddpm_ext_pipeline", "GaussianDiffusionPipeline"],
                                "unet": ["ddpm_ext_unet", "DDPMUNet2DModel"],
                                "scheduler": ["ddpm_ext_scheduler", "GaussianDiffusionScheduler"]}
    unet/config.json, unet/diffusion_pytorch_model.safetensors, unet/ddpm_ext_unet.py
    scheduler/scheduler_config.json, scheduler/ddpm_ext_scheduler.py
    ddpm_ext_pipeline.py       (GaussianDiffusionPipeline: every diffusers scheduler, learned variance included)
    README.md, sample_grid.png

A ``DDPMPipeline`` / ``DDIMPipeline`` is exported as ``GaussianDiffusionPipeline`` unless ``keep_pipeline_class``.
Exported configs carry no ``_name_or_path`` (a local path once a pipeline was loaded from disk).

Module files are named per component (``ddpm_ext_<component>``) because diffusers copies every local remote-code
file into one shared ``diffusers_modules/local/`` folder, where two files of the same name would collide.

A user *with* this package loads the same repo into the installed classes with :func:`load_pipeline` (or
``DDPMUNet2DModel.from_pretrained(repo, subfolder="unet")`` etc.); ``DiffusionPipeline.from_pretrained`` always
prefers the repo's module files when they exist.

CLI::

    python -m diffusers_ddpm_ext.hub export PIPELINE_DIR OUT_DIR [--overwrite] [--repo-id USER/NAME] ...
    python -m diffusers_ddpm_ext.hub push EXPORT_DIR USER/NAME [--private] [--token TOKEN]
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from PIL import Image

import diffusers
from diffusers import DiffusionPipeline
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .model_card import (  # noqa: F401  (card names re-exported: hub.render_model_card etc. are public)
    GRID_NAME, REMOTE_PREFIX, _as_dict, _is_class_conditional, _read_run_files, card_metric_rows, render_model_card, validate_card_metadata,
)
from .pipelines import ClassConditionalDDPMPipeline, GaussianDiffusionPipeline
from .scheduler import GaussianDiffusionScheduler
from .unet import DDPMUNet2DModel, check_finite_weights

__all__ = [
    "HubPushError",
    "card_metric_rows",
    "export_pipeline",
    "load_pipeline",
    "make_sample_grid",
    "generate_sample_grid",
    "render_model_card",
    "validate_card_metadata",
    "push_to_hub",
    "main",
]

MODEL_INDEX = "model_index.json"
CARD_NAME = "README.md"
# Classes of this package that an exported model_index.json may name; loaded into the installed classes by
# `load_pipeline`.
OUR_CLASSES = {
    "DDPMUNet2DModel": DDPMUNet2DModel,
    "GaussianDiffusionScheduler": GaussianDiffusionScheduler,
    "ClassConditionalDDPMPipeline": ClassConditionalDDPMPipeline,
    "GaussianDiffusionPipeline": GaussianDiffusionPipeline,
}
# Libraries whose classes diffusers resolves itself (no module file needed in the repo).
_KNOWN_LIBRARIES = ("diffusers", "transformers", "onnxruntime")
# What a remote-code module may import: it must run where only torch/numpy/diffusers are installed.
_REMOTE_IMPORT_ALLOWED = {"torch", "numpy", "diffusers", "PIL", "__future__"} | set(sys.stdlib_module_names)
# Files an export never contains: pickled weights, training state, logs.
_FORBIDDEN_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".msgpack", ".h5", ".onnx", ".log")

class HubPushError(RuntimeError):
    """Pushing an export failed (no token, network or Hub error). The local export is never modified."""


# --------------------------------------------------------------------------------------------- loading


def _read_model_index(path_or_repo: Union[str, os.PathLike], **hub_kwargs) -> tuple[str, dict]:
    """Return ``(folder_or_repo, model_index dict)`` for a local folder or a Hub repo id (cache-aware)."""
    path = Path(path_or_repo)
    if path.is_dir():
        index_file = path / MODEL_INDEX
        if not index_file.is_file():
            raise FileNotFoundError(f"{path} has no {MODEL_INDEX}; is it a folder written by `save_pretrained`?")
        return str(path), json.loads(index_file.read_text())
    repo_id = str(path_or_repo)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"{repo_id!r} is neither an existing folder nor a valid Hub repo id: {e}") from e
    index_file = hf_hub_download(repo_id, MODEL_INDEX, **hub_kwargs)
    return repo_id, json.loads(Path(index_file).read_text())


def _resolve_class(class_name: str, what: str):
    if class_name in OUR_CLASSES:
        return OUR_CLASSES[class_name]
    klass = getattr(diffusers, class_name, None)
    if klass is None:
        raise ValueError(
            f"{what} class {class_name!r} is neither one of ours ({sorted(OUR_CLASSES)}) nor a diffusers class."
        )
    return klass


def load_pipeline(
    pretrained_model_name_or_path: Union[str, os.PathLike],
    *,
    dtype: Optional[torch.dtype] = None,
    torch_dtype: Optional[torch.dtype] = None,
    revision: Optional[str] = None,
    token: Optional[Union[str, bool]] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    local_files_only: bool = False,
) -> DiffusionPipeline:
    """Load a saved or exported pipeline (folder or Hub repo id) into the *installed* classes, without remote code.

    Works for ``save_pretrained`` folders (``model_index.json`` naming ``diffusers_ddpm_ext.unet``) and for
    exports (naming ``ddpm_ext_unet`` files): components are resolved by class name, our classes first, then
    diffusers'.

    Args:
        pretrained_model_name_or_path: Local folder or ``"user/repo"``.
        dtype: dtype for the model weights (e.g. ``torch.bfloat16``); ``torch_dtype`` is accepted as an alias
            (diffusers 0.42 deprecates that name).
        revision, token, cache_dir, local_files_only: As for ``hf_hub_download`` (Hub ids only).

    Returns:
        The pipeline class the index names (``GaussianDiffusionPipeline``, ``ClassConditionalDDPMPipeline``,
        ``DDPMPipeline``, ...) holding our classes.

    Raises:
        ValueError: ``model_index.json`` is not valid JSON or not a pipeline index (naming the file), or a model's
            weights hold NaN or infinite values (``NonFiniteWeightsError``, from
            :func:`diffusers_ddpm_ext.unet.check_finite_weights`, naming the component and the tensor: the export is
            corrupt and would sample NaN images).
    """
    dtype = dtype if dtype is not None else torch_dtype
    from .rundir import PUBLISH_JOURNAL_NAME

    journal = Path(pretrained_model_name_or_path) / PUBLISH_JOURNAL_NAME
    if journal.is_file():  # a training run died while replacing this pipeline: its files may be old and new mixed
        raise OSError(f"{pretrained_model_name_or_path} holds an interrupted export ({journal.name}): its files may "
                      "mix two pipelines. Restart the training command with --resume_from_checkpoint latest, or "
                      "call diffusers_ddpm_ext.rundir.recover_output_dir on the folder, to complete it.")
    hub_kwargs = {"revision": revision, "token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
    index_name = f"{pretrained_model_name_or_path}/{MODEL_INDEX}"
    try:
        source, index = _read_model_index(pretrained_model_name_or_path, **hub_kwargs)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{index_name} is not valid JSON ({exc}); it should be the pipeline index written by "
                         f"`save_pretrained`") from exc
    if not isinstance(index, dict) or "_class_name" not in index:
        raise ValueError(f"{index_name} is not a pipeline index (a JSON object with '_class_name' and one "
                         f"[library, class] entry per component)")
    is_local = Path(source).is_dir()
    components = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        klass = _resolve_class(value[1], f"component {name!r}")
        kwargs = {} if is_local else dict(hub_kwargs)
        if issubclass(klass, torch.nn.Module):
            # Weights only through safetensors: never fall back to unpickling a .bin file.
            kwargs["use_safetensors"] = True
            if dtype is not None:
                kwargs["dtype"] = dtype
        components[name] = klass.from_pretrained(source, subfolder=name, **kwargs)  # ours checks its weights itself
        if isinstance(components[name], torch.nn.Module):  # the same check for diffusers' models
            check_finite_weights(components[name], f"{pretrained_model_name_or_path}: {name}")
    class_name = index["_class_name"]
    class_name = class_name[-1] if isinstance(class_name, (list, tuple)) else class_name
    pipeline_cls = _resolve_class(class_name, "pipeline")
    return pipeline_cls(**components)


# --------------------------------------------------------------------------------------------- sample grid


def make_sample_grid(images: Sequence[Image.Image], rows: Optional[int] = None, min_tile: int = 64) -> Image.Image:
    """Tile PIL images into one RGB grid (no padding, black empty cells), for model cards.

    Args:
        images: PIL images of one size.
        rows: Grid rows; defaults to ``floor(sqrt(n))``. Missing cells (n not a multiple of rows) stay black.
        min_tile: Tiles smaller than this are enlarged with nearest-neighbour (16 px digits stay crisp).
    """
    from .viz import make_image_grid

    images = list(images)
    if not images:
        raise ValueError("`images` is empty; need at least one image for a grid.")
    rows = rows or max(1, int(math.isqrt(len(images))))
    if rows < 1:
        raise ValueError(f"`rows` must be >= 1, got {rows}.")
    cols = math.ceil(len(images) / rows)
    return make_image_grid(images, nrow=cols, min_tile=min_tile, padding=0, fill=0.0).convert("RGB")


def generate_sample_grid(
    pipeline: DiffusionPipeline,
    num_images: int = 16,
    num_inference_steps: Optional[int] = None,
    seed: int = 0,
    guidance_scale: float = 1.0,
) -> tuple[Image.Image, str]:
    """Sample ``num_images`` images with a fixed seed and tile them; returns ``(grid, caption)``.

    Class-conditional pipelines (``GaussianDiffusionPipeline`` with a class-conditional UNet) cycle through the
    classes (row-major), unconditional ones sample a batch. ``num_inference_steps`` defaults to the scheduler's
    ``num_train_timesteps`` (the full chain).
    """
    steps = num_inference_steps or int(pipeline.scheduler.config.num_train_timesteps)
    generator = torch.Generator("cpu").manual_seed(seed)
    if _is_class_conditional(pipeline):
        n_classes = int(pipeline.unet.config.num_class_embeds)
        labels = [i % n_classes for i in range(num_images)]
        images = pipeline(class_labels=labels, guidance_scale=guidance_scale, num_inference_steps=steps,
                          generator=generator, output_type="pil").images
        caption = (f"{num_images} samples, classes 0..{n_classes - 1} in row-major order, guidance_scale="
                   f"{guidance_scale}, {steps} steps, seed {seed}.")
    else:
        images = pipeline(batch_size=num_images, num_inference_steps=steps, generator=generator,
                          output_type="pil").images
        caption = f"{num_images} unconditional samples, {steps} steps, seed {seed}."
    return make_sample_grid(images), caption




# --------------------------------------------------------------------------------------------- export


def _check_self_contained(source_file: str, what: str) -> str:
    text = Path(source_file).read_text(encoding="utf-8")
    imports = []
    for node in ast.walk(ast.parse(text, filename=source_file)):
        if isinstance(node, ast.Import):
            imports += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imports.append("." * node.level + (node.module or ""))
    bad = sorted({m for m in imports if m.startswith(".") or m.split(".")[0] not in _REMOTE_IMPORT_ALLOWED})
    if bad:
        raise ValueError(
            f"{what} module {source_file} imports {bad}; remote-code modules may import only torch, numpy, "
            "diffusers, PIL and the standard library, so that plain diffusers can run them."
        )
    return text


def _is_third_party(klass) -> bool:
    return klass.__module__.split(".")[0] not in _KNOWN_LIBRARIES


def _load_any(pipeline_or_dir) -> DiffusionPipeline:
    if isinstance(pipeline_or_dir, DiffusionPipeline):
        return pipeline_or_dir
    if isinstance(pipeline_or_dir, (str, os.PathLike)):
        if not Path(pipeline_or_dir).is_dir():
            raise FileNotFoundError(f"Pipeline folder {pipeline_or_dir} does not exist.")
        return load_pipeline(pipeline_or_dir)
    raise TypeError(f"Expected a DiffusionPipeline or a folder path, got {type(pipeline_or_dir)}.")


def _strip_local_paths(folder: Path) -> None:
    """Drop ``_name_or_path`` (the folder a component was loaded from: a local path) from every exported config."""
    for config_file in folder.rglob("*.json"):
        config = json.loads(config_file.read_text())
        if isinstance(config, dict) and "_name_or_path" in config:
            del config["_name_or_path"]
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _add_auto_map(folder: Path, stems: Mapping[str, str], unet_class: str) -> None:
    """``auto_map`` for diffusers' ``AutoModel`` with remote code, in unet/config.json (loading the unet folder) and
    model_index.json (``AutoModel.from_pretrained(repo, subfolder="unet")`` reads only that file's auto_map)."""
    entry = {"AutoModel": f"{stems['unet']}.{unet_class}"}
    for config_file in (folder / "unet" / "config.json", folder / MODEL_INDEX):
        config = json.loads(config_file.read_text())
        config["auto_map"] = entry
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_export(pipeline: DiffusionPipeline, folder: Path, auto_map: bool = False) -> dict:
    """Save weights/configs into ``folder``, add remote-code modules, rewrite model_index.json; return stems."""
    pipeline.save_pretrained(folder, safe_serialization=True)
    _strip_local_paths(folder)
    index_path = folder / MODEL_INDEX
    index = json.loads(index_path.read_text())
    stems = {}
    for name, component in pipeline.components.items():
        if component is None or not isinstance(index.get(name), list):
            continue
        klass = type(component)
        if not _is_third_party(klass):
            continue
        stem = REMOTE_PREFIX + name
        text = _check_self_contained(inspect.getsourcefile(klass), f"component {name!r}")
        (folder / name).mkdir(exist_ok=True)
        (folder / name / f"{stem}.py").write_text(text, encoding="utf-8")
        index[name] = [stem, klass.__name__]
        stems[name] = stem
    if _is_third_party(type(pipeline)):
        stem = REMOTE_PREFIX + "pipeline"
        text = _check_self_contained(inspect.getsourcefile(type(pipeline)), "pipeline")
        (folder / f"{stem}.py").write_text(text, encoding="utf-8")
        index["_class_name"] = [stem, type(pipeline).__name__]
        stems["_pipeline"] = stem
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if auto_map:
        if "unet" not in stems:
            raise ValueError(f"auto_map needs a third-party UNet with a module file; {type(pipeline.unet).__name__} "
                             "is a diffusers class, which AutoModel loads without remote code.")
        _add_auto_map(folder, stems, type(pipeline.unet).__name__)
    return stems


def _check_export_files(folder: Path) -> list[str]:
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    bad = [f for f in files if f.endswith(_FORBIDDEN_SUFFIXES)]
    if bad:
        raise RuntimeError(f"Export would contain non-safetensors/training files {bad}; refusing to write it.")
    return files


def _as_our_pipeline(pipeline: DiffusionPipeline) -> DiffusionPipeline:
    """A ``DDPMPipeline`` / ``DDIMPipeline`` as a ``GaussianDiffusionPipeline`` on the same UNet and scheduler.

    diffusers' two pipelines cannot sample a learned-variance UNet with a fast scheduler (they pass all 2C output
    channels on), skip ``init_noise_sigma`` / ``scale_model_input``, and cannot swap in UniPC/Heun/PNDM; ours can.
    """
    from diffusers import DDIMPipeline, DDPMPipeline

    if type(pipeline) not in (DDPMPipeline, DDIMPipeline):
        return pipeline
    return GaussianDiffusionPipeline(unet=pipeline.unet, scheduler=pipeline.scheduler)


def export_pipeline(
    pipeline_dir_or_pipeline: Union[str, os.PathLike, DiffusionPipeline],
    output_dir: Union[str, os.PathLike],
    *,
    sample_grid: Union[None, bool, Image.Image, str, os.PathLike] = None,
    metrics: Optional[Mapping[str, Any]] = None,
    training_config: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
    repo_id: Optional[str] = None,
    license: str = "apache-2.0",
    datasets: Optional[Sequence[str]] = None,
    tags: Optional[Sequence[str]] = None,
    description: Optional[str] = None,
    metrics_note: Optional[str] = None,
    num_grid_images: int = 16,
    grid_inference_steps: Optional[int] = None,
    grid_guidance_scale: float = 1.0,
    seed: int = 0,
    keep_pipeline_class: bool = False,
    auto_map: bool = False,
    source_url: Optional[str] = None,
) -> Path:
    """Turn a pipeline (object or ``save_pretrained`` folder) into a Hub-ready folder.

    The folder holds safetensors weights, configs (without local paths), the remote-code modules plain diffusers
    needs, ``README.md`` (model card) and ``sample_grid.png``; never pickled weights, checkpoints or logs (the
    pipeline is re-saved, the source folder is not copied). It is built in a temporary sibling folder and renamed
    into place, so a failure leaves ``output_dir`` as it was.

    A ``DDPMPipeline`` / ``DDIMPipeline`` is exported as :class:`GaussianDiffusionPipeline` (same UNet and scheduler)
    unless ``keep_pipeline_class``, so the repo samples with any diffusers scheduler, learned variance included.
    For a folder written by training/train.py, its ``training_args.json`` and ``metrics.json`` fill the card's
    training configuration and evaluation when ``training_config`` / ``metrics`` are not given, and the grid is
    sampled with the run's own ``ddpm_num_inference_steps``.

    Args:
        pipeline_dir_or_pipeline: A pipeline (any whose third-party modules are self-contained) or a folder written
            by ``save_pretrained``.
        output_dir: Target folder. Must be absent or empty unless ``overwrite=True``.
        sample_grid: None (default) samples a grid with the pipeline; False writes none; a PIL image or an image
            file path is used as is.
        metrics: Evaluation figures for the card (forms: :func:`card_metric_rows`); only quality metrics are shown.
        training_config: Training settings for the card (dict, argparse Namespace or JSON file path).
        overwrite: Replace a non-empty ``output_dir``.
        repo_id: Repo id shown in the card's snippets (default ``"<your-username>/<output_dir name>"``).
        license, datasets, tags, description, metrics_note: Card metadata and text (see `render_model_card`).
        num_grid_images, grid_inference_steps, grid_guidance_scale, seed: Sampling of the generated grid
            (steps default to the training run's ``ddpm_num_inference_steps``, else the full training chain).
        keep_pipeline_class: Export a ``DDPMPipeline`` as such (plain diffusers then loads it offline by repo id,
            but only with schedulers that read what the UNet predicts).
        auto_map: Add ``auto_map`` to ``unet/config.json`` and ``model_index.json`` so that diffusers'
            ``AutoModel.from_pretrained(repo, subfolder="unet", trust_remote_code=True)`` works. Off by default:
            diffusers 0.42 then logs "config attributes {'auto_map': ...} ... are not expected and will be ignored"
            on every plain ``DiffusionPipeline.from_pretrained`` of the repo.
        source_url: Git URL of the package's source, for the card's install line.

    Returns:
        The export folder.
    """
    out = Path(output_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True (CLI: --overwrite) to replace it.")
    source_dir = None
    if isinstance(pipeline_dir_or_pipeline, (str, os.PathLike)):
        source_dir = src = Path(pipeline_dir_or_pipeline).expanduser().resolve()
        if src == out or src in out.parents or out in src.parents:
            raise ValueError(f"output_dir {out} must not be, contain or lie inside the source folder {src}.")
    if repo_id is not None:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            raise ValueError(f"Malformed repo id {repo_id!r}: {str(e).rstrip('.')}.") from e
    pipeline = _load_any(pipeline_dir_or_pipeline)
    if source_dir is None:
        name_or_path = getattr(pipeline.config, "_name_or_path", None)
        source_dir = Path(name_or_path) if name_or_path and Path(name_or_path).is_dir() else None
    if not keep_pipeline_class:
        pipeline = _as_our_pipeline(pipeline)
    run_config, run_metrics = _read_run_files(source_dir)
    training_config = _as_dict(training_config, "training_config") or run_config
    metrics = _as_dict(metrics, "metrics") if metrics is not None else run_metrics
    steps = grid_inference_steps or training_config.get("ddpm_num_inference_steps")
    repo_id = repo_id or f"your-username/{out.name}"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        stems = _write_export(pipeline, tmp, auto_map=auto_map)
        grid_name, caption = None, None
        if sample_grid is None:
            grid, caption = generate_sample_grid(pipeline, num_grid_images, steps, seed, grid_guidance_scale)
        elif sample_grid is False:
            grid = None
        elif isinstance(sample_grid, Image.Image):
            grid = sample_grid
        else:
            grid = Image.open(sample_grid)
        if grid is not None:
            grid.save(tmp / GRID_NAME)
            grid_name = GRID_NAME
        card = render_model_card(
            pipeline, repo_id=repo_id, metrics=metrics, training_config=training_config, license=license,
            datasets=datasets, tags=tags, description=description, sample_grid=grid_name,
            sample_grid_caption=caption, module_names=stems, metrics_note=metrics_note, num_inference_steps=steps,
            hub_export=True, source_url=source_url, auto_map=auto_map,
        )
        card.save(tmp / CARD_NAME)
        _check_export_files(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Swap into place: the old folder is only removed once the new one is there.
    if out.exists():
        backup = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(backup)
        try:
            tmp.rename(out)
        except BaseException:
            backup.rename(out)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        tmp.rename(out)
    return out


# --------------------------------------------------------------------------------------------- push


def _resolve_token(token: Optional[str]) -> str:
    if token:
        return token
    from huggingface_hub import get_token  # env HF_TOKEN first, then the stored `hf auth login` token

    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise HubPushError(
            "No Hugging Face token found. Pass token=... (CLI: --token), set the HF_TOKEN environment variable, "
            "or run `hf auth login`. The token needs write access."
        )
    return token


def push_to_hub(
    export_dir: Union[str, os.PathLike],
    repo_id: str,
    *,
    token: Optional[str] = None,
    private: bool = False,
    commit_message: str = "Upload DDPM pipeline exported with diffusers-ddpm-ext",
    revision: Optional[str] = None,
):
    """Create (if needed) ``repo_id`` and upload exactly the files of ``export_dir`` in one commit.

    ``HfApi.create_repo(repo_id, private=private, exist_ok=True)``, then a single ``HfApi.create_commit`` with one
    ``CommitOperationAdd`` per exported file (nothing else: no checkpoints, logs or hidden files).

    Args:
        export_dir: A folder written by :func:`export_pipeline`.
        repo_id: ``"user/name"`` or ``"name"``; validated before any network call.
        token: Write token; defaults to ``$HF_TOKEN``, then the ``hf auth login`` token.
        private: Create the repo private (ignored by the Hub if the repo already exists).
        commit_message: Message of the single commit.
        revision: Branch to commit to (default: main).

    Returns:
        The ``CommitInfo`` of the upload (``.commit_url``, ``.oid``).

    Raises:
        ValueError: Malformed repo id, or ``export_dir`` is not an export.
        HubPushError: No token, or the Hub could not be reached / refused. ``export_dir`` is left untouched.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"Malformed repo id {repo_id!r}: {str(e).rstrip('.')}. Use 'username/model-name'.") from e
    folder = Path(export_dir).expanduser().resolve()
    if not (folder / MODEL_INDEX).is_file() or not (folder / CARD_NAME).is_file():
        raise ValueError(
            f"{folder} is not an export (needs {MODEL_INDEX} and {CARD_NAME}); create one with "
            "`python -m diffusers_ddpm_ext.hub export PIPELINE_DIR OUT_DIR`."
        )
    files = _check_export_files(folder)
    token = _resolve_token(token)
    api = HfApi(token=token)
    retry = f"Nothing local was changed ({folder} is intact); fix the cause and re-run the push."
    try:
        import httpx2

        network_errors: tuple = (OSError, httpx2.HTTPError)
    except ImportError:  # older huggingface_hub on httpx / requests: their errors subclass OSError
        network_errors = (OSError,)
    step = "create_repo"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        step = "create_commit"
        # One explicit commit rather than `upload_folder`: with hf_xet installed, `upload_folder` may split a
        # folder into several commits, and listing the files ourselves pins the commit to exactly the export.
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
        return api.create_commit(
            repo_id=repo_id, operations=operations, commit_message=commit_message, repo_type="model",
            revision=revision,
        )
    except network_errors as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            hint = "The token was rejected or lacks write access to this namespace; use a write token."
        elif status is not None:
            hint = f"The Hub answered HTTP {status}."
        else:
            hint = "The Hub could not be reached; check the network connection (and HF_HUB_OFFLINE)."
        raise HubPushError(f"Pushing to {repo_id} failed during {step}: {e}. {hint} {retry}") from e


# --------------------------------------------------------------------------------------------- CLI


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m diffusers_ddpm_ext.hub", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="turn a save_pretrained folder into a Hub-ready folder")
    ex.add_argument("pipeline_dir")
    ex.add_argument("out_dir")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    ex.add_argument("--repo-id", default=None, help="repo id shown in the card's snippets")
    ex.add_argument("--metrics", default=None, help="JSON file of evaluation figures (default: metrics.json beside "
                    "the pipeline, if any)")
    ex.add_argument("--training-config", default=None, help="JSON file of training settings (default: "
                    "training_args.json beside the pipeline, if any)")
    ex.add_argument("--sample-grid", default=None, help="image file to use instead of sampling a grid")
    ex.add_argument("--no-sample-grid", action="store_true", help="write no sample grid")
    ex.add_argument("--grid-steps", type=int, default=None, help="sampling steps for the grid (default: the "
                    "training run's ddpm_num_inference_steps from training_args.json, else the full chain)")
    ex.add_argument("--grid-size", type=int, default=16, help="number of images in the grid")
    ex.add_argument("--guidance-scale", type=float, default=1.0, help="grid guidance (class-conditional)")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--license", default="apache-2.0")
    ex.add_argument("--dataset", action="append", default=None, help="dataset id for the card (repeatable)")
    ex.add_argument("--keep-pipeline-class", action="store_true", help="export a DDPMPipeline as DDPMPipeline "
                    "(default: as GaussianDiffusionPipeline, which samples with every diffusers scheduler)")
    ex.add_argument("--auto-map", action="store_true", help="add auto_map for diffusers AutoModel with remote code "
                    "(diffusers then logs an 'unexpected config attribute' warning on every pipeline load)")
    ex.add_argument("--source-url", default=None, help="git URL of diffusers-ddpm-ext for the card's install line")
    pu = sub.add_parser("push", help="upload an export folder in one commit")
    pu.add_argument("export_dir")
    pu.add_argument("repo_id")
    pu.add_argument("--private", action="store_true")
    pu.add_argument("--token", default=None, help="write token (default: $HF_TOKEN or `hf auth login`)")
    pu.add_argument("--commit-message", default="Upload DDPM pipeline exported with diffusers-ddpm-ext")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "export":
            grid = False if args.no_sample_grid else args.sample_grid
            out = export_pipeline(
                args.pipeline_dir, args.out_dir, sample_grid=grid, metrics=args.metrics,
                training_config=args.training_config, overwrite=args.overwrite, repo_id=args.repo_id,
                license=args.license, datasets=args.dataset, num_grid_images=args.grid_size,
                grid_inference_steps=args.grid_steps, grid_guidance_scale=args.guidance_scale, seed=args.seed,
                keep_pipeline_class=args.keep_pipeline_class, auto_map=args.auto_map, source_url=args.source_url,
            )
            print(f"Exported to {out}")
        else:
            info = push_to_hub(args.export_dir, args.repo_id, token=args.token, private=args.private,
                               commit_message=args.commit_message)
            print(f"Pushed: {getattr(info, 'commit_url', info)}")
    except (ValueError, TypeError, FileExistsError, FileNotFoundError, HubPushError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
