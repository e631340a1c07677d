"""Model cards for exported and locally trained pipelines: quality metrics with split, N and method, the training
configuration, the data set and its licence, and loading snippets that run as written.

Two kinds of card: for a Hub export (:func:`diffusers_ddpm_ext.hub.export_pipeline`: remote-code module files ship
with it, so plain diffusers loads it) and for a local training output folder (loads after
``import diffusers_ddpm_ext``; no claims about files only the export has).
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from diffusers import DiffusionPipeline
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .pipelines import GaussianDiffusionPipeline

__all__ = ["card_metric_rows", "render_model_card", "validate_card_metadata"]

TEMPLATE_NAME = "model_card_template.md"
GRID_NAME = "sample_grid.png"
# Exported module files are named <REMOTE_PREFIX><component>.py (see diffusers_ddpm_ext.hub).
REMOTE_PREFIX = "ddpm_ext_"
PIPELINE_TAG = "unconditional-image-generation"
# pipeline_tag / license values the Hub accepts that are relevant here (subset of the Hub's lists).
KNOWN_PIPELINE_TAGS = ("unconditional-image-generation", "text-to-image", "image-to-image")
KNOWN_LICENSES = (
    "apache-2.0", "mit", "openrail", "creativeml-openrail-m", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0",
    "cc-by-nc-sa-4.0", "cc0-1.0", "bsd-3-clause", "gpl-3.0", "other", "unknown",
)


DEFAULT_METRICS_NOTE = (
    "Lower bits/dim, Fréchet distance, KID and SWD are better. Fréchet distance depends on N and on the feature "
    "extractor, SWD on N: compare only figures with the same split, N and method; SWD is read against its real-data "
    "floor (real training images scored the same way at the same N), not 0."
)
# Files a training run (training/train.py) writes beside the pipeline; an export from that folder reads them.
TRAINING_ARGS_NAME = "training_args.json"
METRICS_NAME = "metrics.json"
# The built-in data of training/train.py: scikit-learn's copy of the UCI digits test set. Licence as stated on the
# UCI Machine Learning Repository page of the data set (scikit-learn's description names the source, no licence).
BUILTIN_DIGITS = {
    "name": "UCI ML Optical Recognition of Handwritten Digits (scikit-learn `load_digits` copy)",
    "description": (
        "the built-in digits: scikit-learn's copy (`sklearn.datasets.load_digits`, 1,797 8×8 images, 17 grey levels) "
        "of the test set of the UCI ML *Optical Recognition of Handwritten Digits* data set (E. Alpaydin, C. Kaynak, "
        "1998, https://archive.ics.uci.edu/dataset/80)"
    ),
    "short": "the built-in 8×8 handwritten digits (UCI / scikit-learn)",
    "license": "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/), as stated by the UCI Machine Learning "
               "Repository",
}
# Quality metrics the card reports (anything else in a metrics dict — step counts, timings, checksums, config
# echoes — is dropped). Flat keys: name shown, companion-key prefix.
_FLAT_QUALITY_KEYS = {
    "bits_per_dim": "bits/dim", "bits/dim": "bits/dim", "bpd": "bits/dim",
    "fd": "Fréchet distance", "frechet_distance": "Fréchet distance", "fid": "FID",
    "kid": "KID", "kid_mean": "KID", "precision": "precision", "recall": "recall",
}


def _template_text() -> str:
    """The card template: package data (a link to ``model_cards/model_card_template.md`` in the source tree)."""
    packaged = importlib.resources.files("diffusers_ddpm_ext") / TEMPLATE_NAME
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    source_tree = Path(__file__).resolve().parents[1] / "model_cards" / TEMPLATE_NAME
    return source_tree.read_text(encoding="utf-8")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value)


def _as_dict(obj: Any, what: str) -> dict:
    if obj is None:
        return {}
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, (str, os.PathLike)):
        obj = json.loads(Path(obj).read_text())
    if not isinstance(obj, Mapping):
        raise TypeError(f"`{what}` must be a dict, argparse.Namespace or JSON file path, got {type(obj)}.")
    return dict(obj)


def _is_class_conditional(pipeline: DiffusionPipeline) -> bool:
    """Our pipeline with a class-conditional UNet (the only kind whose ``__call__`` takes ``class_labels``)."""
    return isinstance(pipeline, GaussianDiffusionPipeline) and bool(
        getattr(pipeline.unet.config, "num_class_embeds", None))


def _public_value(value: Any) -> Any:
    """A training-config value fit for a public card: local paths are reduced to their last component."""
    if isinstance(value, str) and value:
        expanded = os.path.expanduser(value)
        if os.path.isabs(expanded) or (("/" in value or os.sep in value) and os.path.exists(expanded)):
            return f"{Path(expanded).name} (local path)"
    return value


def _is_hub_dataset(name: Any) -> bool:
    """A `datasets` Hub id, not a local folder (train.py's --dataset_name takes both)."""
    if not isinstance(name, str) or not name or os.path.exists(os.path.expanduser(name)):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not name.startswith((".", "~", "/"))


def _dataset_info(training_config: Mapping[str, Any], datasets: Sequence[str]) -> dict:
    """What the card says about the training data: ``{"description", "short", "license", "hub_ids"}``."""
    hub_ids = list(datasets)
    dataset_name = training_config.get("dataset_name")
    train_data_dir = training_config.get("train_data_dir")
    if dataset_name:
        if _is_hub_dataset(dataset_name):
            hub_ids = list(dict.fromkeys(hub_ids + [dataset_name]))
            return {"description": f"the Hub data set [`{dataset_name}`](https://huggingface.co/datasets/"
                                   f"{dataset_name})", "short": f"`{dataset_name}`",
                    "license": "see the data set's card", "hub_ids": hub_ids}
        where = f"a local `datasets` folder ({_public_value(dataset_name)})"
        return {"description": where, "short": where, "license": "not recorded", "hub_ids": hub_ids}
    if train_data_dir:
        where = f"a local image folder ({_public_value(train_data_dir)})"
        return {"description": where, "short": where, "license": "not recorded", "hub_ids": hub_ids}
    if "dataset_name" in training_config and "train_data_dir" in training_config:  # a train.py run on its default
        resolution = training_config.get("resolution")
        size = f", upsampled to {resolution}×{resolution} with nearest neighbour" if resolution else ""
        return {"description": BUILTIN_DIGITS["description"] + size, "short": BUILTIN_DIGITS["short"],
                "license": BUILTIN_DIGITS["license"], "hub_ids": hub_ids}
    if hub_ids:
        names = ", ".join(f"`{d}`" for d in hub_ids)
        return {"description": names, "short": names, "license": "see the data set's card", "hub_ids": hub_ids}
    return {"description": None, "short": None, "license": None, "hub_ids": hub_ids}


def _bpd_method(steps: Any, num_train_timesteps: Any, clip_denoised: Any = None) -> str:
    if isinstance(steps, int) and isinstance(num_train_timesteps, int) and steps < num_train_timesteps:
        method = (f"variational bound (Ho et al. 2020 eq. 5), stratified unbiased estimate from {steps} of the "
                  f"{num_train_timesteps} terms per image")
    elif isinstance(steps, int) and isinstance(num_train_timesteps, int):
        method = "variational bound (Ho et al. 2020 eq. 5), exact: every term per image"
    elif isinstance(steps, int):  # T unknown: exact or not cannot be said
        method = f"variational bound (Ho et al. 2020 eq. 5), {steps} terms per image"
    else:
        method = "variational bound (Ho et al. 2020 eq. 5)"
    if clip_denoised:
        method += ", x̂₀ clipped to [-1, 1] as in sampling"
    return method


def card_metric_rows(
    metrics: Optional[Mapping[str, Any]],
    training_config: Optional[Mapping[str, Any]] = None,
    num_train_timesteps: Optional[int] = None,
) -> list[dict]:
    """The quality metrics of ``metrics`` as card rows, each with its split, N and method; everything else dropped.

    Understood forms (they can be mixed):

    * structured: ``{"bits/dim": {"value": 1.02, "standard_error": 0.01, "split": "held-out", "num_images": 300,
      "method": "..."}}`` (any metric name);
    * ``metrics.json`` of ``training/train.py``: ``bits_per_dim`` with ``bits_per_dim_standard_error``,
      ``bits_per_dim_split``, ``bits_per_dim_num_images``, ``eval_bpd_steps``, ``bits_per_dim_clip_denoised``;
      keys such as ``rank_checksums``, ``wall_time_s`` or ``model_type`` are not quality metrics and are dropped;
    * ``report.json`` of an evaluation: ``bits_per_dim`` as a dict (``bits_per_dim``, ``standard_error``, ``split``,
      ``num_images``, ``method``) and ``sample_quality`` entries (``fd``, ``kid_mean``/``kid_std``, ``precision``,
      ``recall`` with ``num_generated``, ``num_reference``, ``split``, ``*_method``; ``swd`` and ``swd_<px>`` with
      their standard errors, and ``swd_real_data_floor``, the same figure for real training images), as train.py's
      ``metrics.json`` also holds them;
    * flat ``{"bits/dim": 1.02}`` (train.py's card figures): split, N and method come from the training
      configuration (``eval_num_images``, ``eval_bpd_steps``, the data source) as train.py evaluates; what cannot be
      known reads "not recorded".

    Returns:
        ``[{"name", "value", "error", "split", "num_images", "method"}]`` (``error`` may be None).
    """
    metrics, config = dict(metrics or {}), dict(training_config or {})
    unknown = "not recorded"
    rows = []

    def add(name, value, error=None, split=None, n=None, method=None):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            rows.append({"name": name, "value": float(value),
                         "error": float(error) if isinstance(error, (int, float)) and error == error else None,
                         "split": split or unknown, "num_images": n if n is not None else unknown,
                         "method": method or unknown})

    # Where train.py evaluates bits/dim: the built-in digits' 300 held-out images, else the first training images.
    builtin = "dataset_name" in config and not config.get("dataset_name") and not config.get("train_data_dir")
    config_n = config.get("eval_num_images")
    if isinstance(config_n, int):
        config_split = "held-out digits (never trained on)" if builtin else "train (first images)"
        config_n = min(config_n, 300) if builtin else f"≤ {config_n}"
    else:
        config_split, config_n = None, None
    config_steps = config.get("eval_bpd_steps")
    T = num_train_timesteps or config.get("ddpm_num_steps")

    for key, value in metrics.items():
        if isinstance(value, Mapping) and "value" in value:  # structured
            add(key, value["value"], value.get("standard_error"), value.get("split"),
                value.get("num_images", value.get("n")), value.get("method"))
        elif key == "bits_per_dim" and isinstance(value, Mapping):  # evaluation report
            add("bits/dim", value.get("bits_per_dim"), value.get("standard_error"), value.get("split"),
                value.get("num_images"), value.get("method"))
        elif key == "sample_quality" and isinstance(value, list):  # evaluation report, one entry per step count
            for entry in value:
                if not isinstance(entry, Mapping):
                    continue
                steps = entry.get("num_inference_steps")
                n = f"{entry.get('num_generated', '?')} generated vs {entry.get('num_reference', '?')} real"
                at = f" @ {steps} steps" if steps else ""
                add(f"Fréchet distance{at}", entry.get("fd"), entry.get("fd_standard_error"), entry.get("split"), n,
                    entry.get("fd_method"))
                add(f"KID{at}", entry.get("kid_mean"), entry.get("kid_std"), entry.get("split"), n,
                    entry.get("kid_method"))
                add(f"precision{at}", entry.get("precision"), None, entry.get("split"), n, entry.get("pr_method"))
                add(f"recall{at}", entry.get("recall"), None, entry.get("split"), n, entry.get("pr_method"))
                _add_swd_rows(add, entry, at, n)
        elif key in _FLAT_QUALITY_KEYS:
            name = _FLAT_QUALITY_KEYS[key]
            if name == "bits/dim":
                recorded = "bits_per_dim_split" in metrics or "bits_per_dim_num_images" in metrics
                steps = metrics.get("eval_bpd_steps", config_steps)
                add(name, value, metrics.get("bits_per_dim_standard_error"),
                    metrics.get("bits_per_dim_split") if recorded else config_split,
                    metrics.get("bits_per_dim_num_images") if recorded else config_n,
                    _bpd_method(steps, T, metrics.get("bits_per_dim_clip_denoised")))
            else:
                add(name, value, metrics.get(f"{key}_standard_error", metrics.get("kid_std") if key.startswith(
                    "kid") else None), metrics.get(f"{key}_split"), metrics.get(f"{key}_num_images"),
                    metrics.get(f"{key}_method"))
    return rows


def _swd_method(figures: Mapping[str, Any]) -> str:
    """The card's short words for a SWD figure (the report keeps the full ``swd_method``)."""
    levels = ", ".join(str(r) for r in figures.get("swd_resolutions") or []) or "?"
    boot = figures.get("swd_num_bootstrap")
    return (f"sliced Wasserstein distance ×10³ (Karras et al. 2018), no weights: Laplacian pyramid levels {levels} px, "
            f"7×7 neighbourhoods, mean over levels; ± bootstrap s.e. over images ({boot} resamples)")


def _add_swd_rows(add, entry: Mapping[str, Any], at: str, n: str) -> None:
    """SWD rows of a sample-quality entry: the average and each level, then the real-data floor beside them."""
    if not isinstance(entry.get("swd"), (int, float)):
        return
    method = _swd_method(entry)
    add(f"SWD{at}", entry["swd"], entry.get("swd_standard_error"), entry.get("split"), n, method)
    for r in entry.get("swd_resolutions") or []:
        add(f"SWD, {r} px level{at}", entry.get(f"swd_{r}"), entry.get(f"swd_{r}_standard_error"), entry.get("split"),
            n, method)
    floor = entry.get("swd_real_data_floor")
    if isinstance(floor, Mapping):
        add("SWD of real training images (real-data floor)", floor.get("swd"), floor.get("swd_standard_error"),
            floor.get("split"), f"{floor.get('n_real', '?')} training vs {floor.get('n_reference', '?')} real",
            f"{_swd_method(floor)}; {floor.get('n_real', '?')} training images in place of samples: what samples as "
            f"good as real images score at this N")


def _format_row(row: dict) -> dict:
    value = _fmt(row["value"]) + (f" ± {_fmt(row['error'])}" if row["error"] is not None else "")
    return {**row, "shown": value}


def _read_run_files(folder: Optional[Union[str, os.PathLike]]) -> tuple[dict, dict]:
    """``(training_args.json, metrics.json)`` beside a pipeline folder written by training/train.py ({} if absent)."""
    if folder is None or not Path(folder).is_dir():
        return {}, {}
    found = []
    for name in (TRAINING_ARGS_NAME, METRICS_NAME):
        path = Path(folder) / name
        found.append(json.loads(path.read_text()) if path.is_file() else {})
    return found[0], found[1]


def beta_schedule_text(scheduler_config) -> str:
    """The β schedule as the scheduler runs it: explicit ``trained_betas`` (e.g. ``--ddpm_max_beta``'s clipped
    cosine) override ``beta_schedule`` in every diffusers scheduler, so say so."""
    name = scheduler_config.get("beta_schedule", "n/a")
    betas = scheduler_config.get("trained_betas")
    if betas is None:
        return name
    return f"{name} as explicit trained_betas, largest β {max(betas):.3g}"


def render_model_card(
    pipeline: DiffusionPipeline,
    *,
    repo_id: str,
    metrics: Optional[Mapping[str, Any]] = None,
    training_config: Optional[Mapping[str, Any]] = None,
    license: str = "apache-2.0",
    datasets: Optional[Sequence[str]] = None,
    tags: Optional[Sequence[str]] = None,
    description: Optional[str] = None,
    dataset_description: Optional[str] = None,
    sample_grid: Optional[str] = GRID_NAME,
    sample_grid_caption: Optional[str] = None,
    num_inference_steps: Optional[int] = None,
    module_names: Optional[Mapping[str, str]] = None,
    metrics_note: Optional[str] = None,
    hub_export: Optional[bool] = None,
    local_dir_name: Optional[str] = None,
    source_url: Optional[str] = None,
    auto_map: bool = False,
) -> ModelCard:
    """Render the model card (``model_cards/model_card_template.md``) for a pipeline.

    Two kinds of card: for a Hub export (:func:`export_pipeline`: remote-code module files ship with it, so the card
    shows plain-diffusers loading with ``trust_remote_code``) and for a local ``save_pretrained`` folder such as
    training/train.py's output (loaded after ``import diffusers_ddpm_ext``; the card claims no module files).

    Args:
        pipeline: The pipeline the card describes (reads the UNet and scheduler configs).
        repo_id: Repo id used in the Hub card's snippets (and the default folder name of a local card).
        metrics: Evaluation figures; only quality metrics are shown, each with split, N and method (forms:
            :func:`card_metric_rows`). Numbers also go to the card's ``model-index`` when a Hub data set is named.
        training_config: Training settings shown as a table (dict, argparse Namespace or JSON file path); local
            paths are reduced to their last component. When None, ``training_args.json`` beside the folder the
            pipeline was loaded from (``pipeline.config._name_or_path``) is read.
        license, tags: YAML metadata.
        datasets: Hub data set ids for the YAML ``datasets`` entry; a Hub ``dataset_name`` in the training
            configuration is added.
        description: Opening paragraph; a default one is written from the configs.
        dataset_description: Words for the training-data section (default: from the training configuration).
        sample_grid: Relative path of the sample grid image, or None.
        sample_grid_caption: Caption under the grid.
        num_inference_steps: Steps in the usage snippets (default: the training config's
            ``ddpm_num_inference_steps``, else the scheduler's training steps).
        module_names: ``{"unet": "ddpm_ext_unet", ...}`` file stems of the remote-code modules (exports).
        metrics_note: Sentence under the metrics table.
        hub_export: Which card; default: a Hub card when ``module_names`` is given, else a local one.
        local_dir_name: Folder name in a local card's snippets (default: the last part of ``repo_id``).
        source_url: Where the package's source lives (a git URL): the install line becomes
            ``pip install "git+<source_url>"``; without it the card says to install from a source checkout.
        auto_map: The export's unet config carries ``auto_map`` (diffusers ``AutoModel`` with remote code).
    """
    metrics, training_config = _as_dict(metrics, "metrics"), _as_dict(training_config, "training_config")
    if not training_config:
        training_config, _ = _read_run_files(getattr(pipeline.config, "_name_or_path", None))
    unet, scheduler = pipeline.unet, pipeline.scheduler
    class_conditional = _is_class_conditional(pipeline)
    module_names = dict(module_names or {})
    hub_export = bool(module_names) if hub_export is None else bool(hub_export)
    data = _dataset_info(training_config, list(datasets or []))
    datasets = data["hub_ids"]
    default_tags = ["diffusers", "diffusers-ddpm-ext", "ddpm", PIPELINE_TAG]
    if class_conditional:
        default_tags.append("class-conditional")
    tags = list(dict.fromkeys(default_tags + list(tags or [])))
    model_name = repo_id.split("/")[-1]
    cfg, scfg = unet.config, scheduler.config
    num_train_timesteps = scfg.get("num_train_timesteps", "n/a")
    rows = [_format_row(r) for r in card_metric_rows(
        metrics, training_config, num_train_timesteps if isinstance(num_train_timesteps, int) else None)]
    eval_results = None
    if rows and datasets:
        eval_results = [
            EvalResult(task_type=PIPELINE_TAG, dataset_type=datasets[0], dataset_name=datasets[0],
                       dataset_split=str(r["split"]), metric_type=re.sub(r"[^a-z0-9_]+", "_", r["name"].lower()).strip("_"),
                       metric_name=r["name"], metric_value=r["value"])
            for r in rows
        ]
    card_data = ModelCardData(
        library_name="diffusers", pipeline_tag=PIPELINE_TAG, license=license, tags=tags,
        datasets=datasets or None, model_name=model_name if eval_results else None, eval_results=eval_results,
    )
    size = cfg.sample_size
    image_size = f"{size} × {size}" if isinstance(size, int) else f"{size[0]} × {size[1]}"
    out_channels = cfg.get("out_channels") or cfg.in_channels
    steps = num_inference_steps or training_config.get("ddpm_num_inference_steps") or num_train_timesteps
    if description is None:
        kind = f"class-conditional ({cfg.num_class_embeds} classes)" if class_conditional else "unconditional"
        article = "A" if class_conditional else "An"
        description = f"{article} {kind} DDPM generating {image_size} images with {cfg.in_channels} channel(s)."
    pipeline_class = type(pipeline).__name__
    null = getattr(unet, "null_class_label", None)
    if class_conditional:
        labels = list(range(min(int(cfg.num_class_embeds), 4)))
        call_args = f"class_labels={labels}" + (", guidance_scale=3.0" if null is not None else "")
    else:
        call_args = "batch_size=4"
    ours, theirs = [], []
    for component in (unet, scheduler):
        is_diffusers = type(component).__module__.split(".")[0] == "diffusers"
        (theirs if is_diffusers else ours).append(type(component).__name__)
    ours.append("GaussianDiffusionPipeline")
    installed_imports = "\n".join(([f"from diffusers import {', '.join(theirs)}"] if theirs else [])
                                  + [f"from diffusers_ddpm_ext import {', '.join(ours)}"])
    card = ModelCard.from_template(
        card_data,
        template_str=_template_text(),
        model_name=model_name,
        repo_id=repo_id,
        hub_export=hub_export,
        local_dir_name=local_dir_name or model_name,
        description=description,
        class_conditional=class_conditional,
        num_classes=cfg.get("num_class_embeds"),
        has_null_class=null is not None,
        null_class=null,
        call_args=call_args,
        installed_imports=installed_imports,
        pipeline_class=pipeline_class,
        ours_pipeline=isinstance(pipeline, GaussianDiffusionPipeline),
        unet_class=type(unet).__name__,
        scheduler_class=type(scheduler).__name__,
        unet_module=module_names.get("unet", REMOTE_PREFIX + "unet"),
        scheduler_module=module_names.get("scheduler", REMOTE_PREFIX + "scheduler"),
        pipeline_module=module_names.get("_pipeline"),
        auto_map=auto_map,
        source_url=source_url,
        num_parameters=f"{sum(p.numel() for p in unet.parameters()):,}",
        image_size=image_size,
        in_channels=cfg.in_channels,
        block_out_channels=_fmt(tuple(cfg.get("block_out_channels", ()))),
        learned_variance=out_channels == 2 * cfg.in_channels,
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule_text(scfg),
        prediction_type=scfg.get("prediction_type", "epsilon"),
        variance_type=scfg.get("variance_type", "n/a"),
        num_inference_steps=steps,
        training_config={k: _fmt(_public_value(v)) for k, v in training_config.items()},
        metric_rows=rows,
        metrics_note=metrics_note or DEFAULT_METRICS_NOTE,
        sample_grid=sample_grid,
        sample_grid_caption=sample_grid_caption,
        dataset_description=dataset_description or data["description"],
        dataset_short=dataset_description or data["short"],
        dataset_license=data["license"],
        extra_limitations=None,
    )
    validate_card_metadata(card)
    return card


def validate_card_metadata(card: Union[ModelCard, str]) -> dict:
    """Check a card's YAML metadata offline; returns it as a dict.

    ``ModelCard.validate`` asks the Hub (network); this checks what the Hub would reject for this project's cards:
    the card parses, ``library_name`` is diffusers, ``pipeline_tag`` and ``license`` are Hub identifiers, ``tags`` and
    ``datasets`` are lists of strings, and ``model-index`` (if any) parses back into ``EvalResult`` objects.
    """
    card = ModelCard(str(card)) if isinstance(card, ModelCard) else ModelCard(card)
    meta = card.data.to_dict()
    problems = []
    if meta.get("library_name") != "diffusers":
        problems.append(f"library_name must be 'diffusers', got {meta.get('library_name')!r}")
    if meta.get("pipeline_tag") not in KNOWN_PIPELINE_TAGS:
        problems.append(f"pipeline_tag {meta.get('pipeline_tag')!r} not in {KNOWN_PIPELINE_TAGS}")
    if meta.get("license") not in KNOWN_LICENSES:
        problems.append(f"license {meta.get('license')!r} not in {KNOWN_LICENSES}")
    for key in ("tags", "datasets"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
            problems.append(f"{key} must be a list of non-empty strings, got {value!r}")
    if "model-index" in meta and not card.data.eval_results:
        problems.append("model-index present but does not parse into eval results")
    if problems:
        raise ValueError("Invalid model card metadata: " + "; ".join(problems) + ".")
    return meta
