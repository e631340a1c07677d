"""Building a training run from the training script's flags: the UNet, the noise scheduler and the data.

Every bad value fails here, before any output is written, with a message naming the flag it came from:
a UNet config that does not fit the variance type (C output channels for a fixed variance, 2C for a learned
one, IDM), a preset or resolution the UNet rejects, a class-conditional model on data without labels.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Dict, List, Optional

import torch

from .presets import DEFAULT_PRESETS, RECOMMENDED_LEARNING_RATES
from .scheduler import LEARNED_VARIANCE_TYPES
from .train_config import TRAIN_RANGES, EvalSet, Range, check_ranges

logger = logging.getLogger(__name__)

MODEL_TYPES = ("ours", "unet2d")

# The one definition of the range of each numeric flag of training/train.py that TrainConfig does not take (its own:
# train_config.TRAIN_RANGES); README "Flag ranges" lists them. Checked by check_flags (model and data) and
# check_run_flags (the run's length and exports), before anything is built.
FLAG_RANGES = {
    "train_batch_size": Range(1, 65536, integer=True),
    "ddpm_num_steps": Range(2, 100_000, integer=True, why="the training timesteps T; 1000 to 4000 are usual"),
    "resolution": Range(1, 4096, integer=True, unset="left unset"),
    "num_class_embeds": Range(1, 100_000, integer=True, unset="left unset (unconditional)"),
    "eval_num_images": Range(1, integer=True),  # at most the held-out split is used
    "eval_quality_num_images": Range(0, 50_000, integer=True, why="0 skips sample quality, else at least 4; 50000 "
                                     "is FID's convention"),
    "validation_split_seed": Range(0, 2**32, high_open=True, integer=True),
    "ddpm_max_beta": Range(0, 1, low_open=True, high_open=True, why="the largest β_t; cosine's own is 0.999",
                           unset=""),
    "dataloader_num_workers": Range(0, 256, integer=True),
}
RUN_FLAG_RANGES = {
    "num_epochs": Range(1, 1_000_000, integer=True),
    "max_train_steps": Range(1, 1_000_000_000, integer=True, unset="left unset (--num_epochs decides)"),
    "save_model_epochs": Range(1, integer=True, unset="left unset"),
}


def allowed_range(name: str) -> Optional[Range]:
    """The range of the numeric flag ``--name`` of training/train.py (:data:`TRAIN_RANGES`, :data:`FLAG_RANGES`,
    :data:`RUN_FLAG_RANGES`); None for a flag without one."""
    for table in (TRAIN_RANGES, FLAG_RANGES, RUN_FLAG_RANGES):
        if name in table:
            return table[name]
    return None


def add_range_help(parser: argparse.ArgumentParser) -> None:
    """Append each numeric flag's allowed range to its ``--help`` text (from its one definition)."""
    for action in parser._actions:
        allowed = allowed_range(action.dest)
        if allowed is not None and action.help != argparse.SUPPRESS:
            action.help = " ".join(filter(None, [action.help, f"Must be {allowed.describe()}."]))


def check_flags(flags) -> None:
    """Reject bad combinations of the flags :func:`build_model` and :func:`build_data` read, before anything is
    built: the ranges of :data:`FLAG_RANGES`, the data source, the model source, class conditioning, step counts
    within T (``--ddpm_num_inference_steps``, ``--eval_bpd_steps``).

    Raises:
        ValueError: naming the flag(s), the bad value and what is allowed.
    """
    check_ranges(flags, FLAG_RANGES)
    quality_n = getattr(flags, "eval_quality_num_images", 0)
    if 0 < quality_n < 4:
        _fail(f"--eval_quality_num_images must be 0 (no sample quality) or an integer >= 4 (precision/recall "
              f"compare each image with its 3 nearest neighbours), got {quality_n!r}")
    size = getattr(flags, "validation_size", None)
    if size is not None and not ((isinstance(size, int) and not isinstance(size, bool) and size >= 1)
                                 or (isinstance(size, float) and 0.0 < size < 1.0)):
        _fail(f"--validation_size must be a number of images >= 1 (e.g. 500) or a fraction in (0, 1) (e.g. 0.1), "
              f"got {size!r}")
    if flags.unet_preset is not None and flags.unet_config is None:
        from .unet import UNET_PRESETS

        if flags.unet_preset not in UNET_PRESETS:
            _fail(f"--unet_preset {flags.unet_preset!r} is unknown; choose one of {sorted(UNET_PRESETS)}")
    check_unet_overrides(getattr(flags, "unet_overrides", None), flags.resolution)
    if flags.ddpm_num_inference_steps > flags.ddpm_num_steps:
        _fail(f"--ddpm_num_inference_steps ({flags.ddpm_num_inference_steps}) cannot exceed --ddpm_num_steps "
              f"({flags.ddpm_num_steps})")
    if getattr(flags, "eval_bpd_steps", 2) > flags.ddpm_num_steps:
        _fail(f"--eval_bpd_steps ({flags.eval_bpd_steps}) cannot exceed --ddpm_num_steps ({flags.ddpm_num_steps}): "
              f"bits/dim is exact at T = --ddpm_num_steps timesteps per image; use an integer in [2, "
              f"{flags.ddpm_num_steps}]")
    if flags.dataset_name is not None and flags.train_data_dir is not None:
        _fail("pass either --dataset_name or --train_data_dir, not both")
    if flags.image_column is not None and flags.dataset_name is None:
        _fail("--image_column only applies to --dataset_name (image folders and the built-in digits have no columns)")
    if flags.dataset_config_name is not None:
        _fail("--dataset_config_name is not supported by diffusers_ddpm_ext.data yet; save the config you want with "
              "datasets' save_to_disk and pass that folder as --dataset_name")
    if flags.unet_preset is not None and flags.unet_config is not None:
        _fail("pass either --unet_preset or --unet_config, not both")
    if flags.unet_config is not None and not os.path.isfile(unet_config_file(flags.unet_config)):
        _fail(f"--unet_config {flags.unet_config!r} is neither a JSON UNet config file nor a folder holding a "
              f"config.json")
    if flags.enable_xformers_memory_efficient_attention and flags.model_type != "unet2d":
        _fail("--enable_xformers_memory_efficient_attention applies to --model_type unet2d only")
    if flags.class_column is not None and flags.num_class_embeds is None:
        _fail(f"--class_column {flags.class_column!r} needs --num_class_embeds (the number of classes) so the UNet "
              f"gets a class embedding")
    if flags.num_class_embeds is not None and flags.class_column is None and flags.dataset_name is not None:
        _fail("--num_class_embeds with --dataset_name needs --class_column naming the label column")
    if flags.train_data_dir is not None and (flags.class_column is not None or flags.image_column is not None):
        _fail("--class_column/--image_column apply to --dataset_name; with --train_data_dir the labels come from one "
              "sub-folder per class")
    if flags.class_dropout_prob > 0 and flags.num_class_embeds is None:
        _fail("--class_dropout_prob drops class labels for classifier-free guidance and needs --num_class_embeds")
    if flags.class_dropout_prob > 0 and flags.model_type == "unet2d":
        _fail("--class_dropout_prob needs a null class, which UNet2DModel's class table lacks; use --model_type ours "
              "for classifier-free guidance")


def check_run_flags(flags) -> None:
    """Reject bad values of the flags that shape the run rather than the model or the data: its length, the
    export cadence (:data:`RUN_FLAG_RANGES`), a warm-up within ``--max_train_steps``, resuming, the Hub (before
    anything is built).

    Raises:
        ValueError: naming the flag(s), the bad value and what is allowed.
    """
    from .runflags import parse_allowed_flags

    check_ranges(flags, RUN_FLAG_RANGES)
    warmup = getattr(flags, "lr_warmup_steps", 0)
    if flags.max_train_steps is not None and warmup > flags.max_train_steps:
        # Not refused: a short smoke run (--max_train_steps 10) with the default warm-up is a normal thing to do.
        logger.warning("--lr_warmup_steps %d is longer than the run (--max_train_steps %d): the learning rate never "
                       "reaches --learning_rate %g", warmup, flags.max_train_steps, flags.learning_rate)
    if flags.resume_from_checkpoint is not None and flags.overwrite_output_dir:
        _fail("--resume_from_checkpoint continues the run in --output_dir; --overwrite_output_dir would delete its "
              "checkpoints. Pass one of them.")
    allowed = parse_allowed_flags(flags.allow_changed_flags)
    if allowed and flags.resume_from_checkpoint is None:
        _fail("--allow_changed_flags only applies with --resume_from_checkpoint")
    if flags.push_to_hub and flags.hub_model_id is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(flags.hub_model_id)
        except HFValidationError as exc:
            raise ValueError(f"--hub_model_id {flags.hub_model_id!r} is not a valid repo id ('user/name'): {exc}") \
                from exc
    if flags.hub_strategy is not None and not flags.push_to_hub:
        _fail(f"--hub_strategy {flags.hub_strategy} has no effect without --push_to_hub")
    if flags.hub_private_repo and not flags.push_to_hub:
        logger.warning("--hub_private_repo has no effect without --push_to_hub")


def check_environment(flags, accelerator) -> None:
    """What the flags need from this machine (run on the main process before training): xformers, a GPU for fp16,
    a Hub token for --push_to_hub (so a missing token fails now, not hours later at the first push)."""
    if flags.enable_xformers_memory_efficient_attention:
        try:
            import xformers  # noqa: F401
        except ImportError as exc:
            raise ValueError("--enable_xformers_memory_efficient_attention needs xformers installed") from exc
    if flags.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        _fail("--mixed_precision fp16 needs a GPU; on CPU use bf16 or no")
    if flags.push_to_hub:
        import huggingface_hub

        if not (flags.hub_token or os.environ.get("HF_TOKEN") or huggingface_hub.get_token()):
            _fail("--push_to_hub needs a Hub write token: pass --hub_token, set HF_TOKEN or run `hf auth login`")
    check_default_output_dir(flags)


def _fail(message: str) -> None:
    raise ValueError(message)


def unet_config_file(path: str) -> str:
    """The JSON file of a ``--unet_config`` value: the file itself, or ``config.json`` inside a folder (e.g. the
    ``unet/`` folder of a saved pipeline)."""
    return os.path.join(path, "config.json") if os.path.isdir(path) else path


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


def load_unet_config(path: str) -> Dict[str, Any]:
    """Read a UNet config: a JSON file, or a folder holding ``config.json`` (e.g. a saved ``unet/`` folder).

    A diffusers ``UNet2DModel`` config (recognised by ``down_block_types``) is translated to ours with
    :func:`diffusers_ddpm_ext.unet.unet2d_config_to_ours`; diffusers' private ``_``-keys are dropped.
    """
    from .unet import unet2d_config_to_ours

    file = unet_config_file(path)
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


def unet_config_from_flags(
    *,
    preset: Optional[str] = "digits-small",
    config_path: Optional[str] = None,
    resolution: Optional[int] = None,
    variance_type: str = "fixed_small",
    num_class_embeds: Optional[int] = None,
    overrides: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """The ``DDPMUNet2DModel`` config :func:`build_unet` builds (arguments as there): the preset's or the file's,
    with ``overrides``, ``sample_size``, ``out_channels`` (C or 2C for the variance type) and ``num_class_embeds``
    applied. Keys that are not ``DDPMUNet2DModel`` config keys are refused, naming the allowed ones."""
    from .unet import UNET_PRESETS

    if config_path is not None:
        config = load_unet_config(config_path)
        check_unet_config_keys(config, f"--unet_config {config_path!r}")
        explicit_out = config.get("out_channels")
    else:
        if preset not in UNET_PRESETS:
            raise ValueError(f"--unet_preset {preset!r} is unknown; choose one of {sorted(UNET_PRESETS)}")
        config = dict(UNET_PRESETS[preset]["config"])
        explicit_out = None  # presets are adapted to the variance type
    overrides = check_unet_overrides(overrides, resolution)
    config.update(overrides)
    explicit_out = overrides.get("out_channels", explicit_out)
    if resolution is not None:
        config["sample_size"] = resolution
    in_channels = config.get("in_channels", 3)
    config["out_channels"] = resolve_out_channels(in_channels, variance_type, explicit_out)
    if config.get("num_class_embeds") != num_class_embeds:
        if config.get("num_class_embeds") is not None and num_class_embeds is None:
            logger.warning("the UNet config has num_class_embeds=%s but no --num_class_embeds was given: training "
                           "an unconditional model", config.get("num_class_embeds"))
        config["num_class_embeds"] = num_class_embeds
    return config


def build_unet(
    *,
    preset: Optional[str] = "digits-small",
    config_path: Optional[str] = None,
    resolution: Optional[int] = None,
    variance_type: str = "fixed_small",
    num_class_embeds: Optional[int] = None,
    model_type: str = "ours",
    seed: Optional[int] = None,
    overrides: Optional[Dict[str, Any]] = None,
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
        overrides: config keys replacing the preset's or the file's (``--unet_overrides``), checked as
            ``config_path``'s keys are.

    Returns:
        The model, in training mode.
    """
    config = unet_config_from_flags(preset=preset, config_path=config_path, resolution=resolution,
                                    variance_type=variance_type, num_class_embeds=num_class_embeds,
                                    overrides=overrides)
    if seed is not None:
        torch.manual_seed(seed)
    model = _construct_unet(config, model_source(preset, config_path, overrides, resolution))
    if model_type == "unet2d":
        model = model.to_unet2d()
    elif model_type != "ours":
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    return model.train()


# ---- the default learning rate: one per preset, by size for --unet_config models

# The size rule: a straight line in log-log through digits-small (0.93M, 2e-3) and ddpm-cifar10 (35.7M, 2e-4),
# clamped to [1e-4, 2e-3] and rounded to two significant digits.
_SIZE_RULE = ((0.93e6, 2e-3), (35.7e6, 2e-4))
_SIZE_RULE_RANGE = (1e-4, 2e-3)


def learning_rate_for_size(num_parameters: int) -> float:
    """The default learning rate of a UNet with ``num_parameters`` trainable parameters (the size rule of
    :data:`RECOMMENDED_LEARNING_RATES`): 2e-3 at 0.93M, 2e-4 at 35.7M, a power law between and beyond, clamped to
    [1e-4, 2e-3], two significant digits."""
    import math

    (n0, lr0), (n1, lr1) = _SIZE_RULE
    slope = math.log(lr1 / lr0) / math.log(n1 / n0)
    lr = lr0 * (max(int(num_parameters), 1) / n0) ** slope
    lr = min(max(lr, _SIZE_RULE_RANGE[0]), _SIZE_RULE_RANGE[1])
    return float(f"{lr:.1e}")


def default_learning_rate(flags) -> Optional[float]:
    """``--learning_rate`` when it is not given: the preset's :data:`RECOMMENDED_LEARNING_RATES` entry, or for a
    ``--unet_config`` model :func:`learning_rate_for_size` of its parameter count (counted on the meta device,
    no weights allocated); a preset whose ``--unet_overrides`` change its parameter count gets the size rule too.
    None when the model flags are bad or the model is not chosen yet (:func:`check_flags` and
    :func:`resolve_model_for_data` then name the problem or choose the model)."""
    overrides = getattr(flags, "unet_overrides", None) or {}
    if flags.unet_config is None:
        entry = RECOMMENDED_LEARNING_RATES.get(flags.unet_preset)
        if entry is None or not overrides:
            return entry[0] if entry is not None else None
        try:
            sizes = [count_unet_parameters(unet_config_from_flags(
                preset=flags.unet_preset, resolution=flags.resolution, variance_type=flags.variance_type,
                num_class_embeds=flags.num_class_embeds, overrides=over), "") for over in (None, overrides)]
        except ValueError:  # bad overrides: named by check_flags / resolve_model_for_data
            return None
        return entry[0] if sizes[0] == sizes[1] else learning_rate_for_size(sizes[1])
    if flags.unet_preset is not None or not os.path.isfile(unet_config_file(flags.unet_config)):
        return None
    config = unet_config_from_flags(preset=None, config_path=flags.unet_config, resolution=flags.resolution,
                                    variance_type=flags.variance_type, num_class_embeds=flags.num_class_embeds,
                                    overrides=overrides)
    source = model_source(None, flags.unet_config, overrides, None)
    return learning_rate_for_size(count_unet_parameters(config, source))


# ---- which model: the flags, the overrides and the data's channels


def unet_config_keys() -> List[str]:
    """The config keys of :class:`~diffusers_ddpm_ext.unet.DDPMUNet2DModel` (its constructor's arguments)."""
    import inspect

    from .unet import DDPMUNet2DModel

    return [n for n in inspect.signature(DDPMUNet2DModel.__init__).parameters if n != "self"]


def check_unet_config_keys(config: Dict[str, Any], source: str) -> None:
    """Refuse a key of ``config`` that :class:`~diffusers_ddpm_ext.unet.DDPMUNet2DModel` does not take, naming it, the
    flag it came from (``source``) and the allowed keys."""
    allowed = unet_config_keys()
    for key in config:
        if key not in allowed:
            _fail(f"{source} has key {key!r}, which is not a DDPMUNet2DModel config key; allowed: "
                  f"{', '.join(sorted(allowed))}")


def unet_overrides_type(text: str) -> Dict[str, Any]:
    """argparse ``type`` of ``--unet_overrides``: a JSON object of UNet config keys."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"dropout\": 0.1}}', got {text!r} "
                                         f"({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"dropout\": 0.1}}', got {text!r}")
    return value


def check_unet_overrides(overrides, resolution: Optional[int] = None) -> Dict[str, Any]:
    """The ``--unet_overrides`` object, its keys checked (their values are checked when the model is built, by
    :func:`resolve_model_for_data` before training): known ``DDPMUNet2DModel`` keys, not ``num_class_embeds``
    (``--num_class_embeds`` sets the labels up too), a ``sample_size`` that agrees with ``--resolution``.

    Raises:
        ValueError: naming the key and the allowed ones.
    """
    if overrides is None:
        return {}
    if isinstance(overrides, str):
        try:
            overrides = unet_overrides_type(overrides)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"--unet_overrides {exc}") from None
    if not isinstance(overrides, dict):
        _fail(f"--unet_overrides must be a JSON object of UNet config keys, got {overrides!r}")
    check_unet_config_keys(overrides, f"--unet_overrides '{json.dumps(overrides)}'")
    if "num_class_embeds" in overrides:
        _fail("--unet_overrides key 'num_class_embeds': pass --num_class_embeds instead (it also reads the labels)")
    size = overrides.get("sample_size")
    if resolution is not None and size is not None and size != resolution:
        _fail(f"--unet_overrides sets sample_size={size!r} but --resolution is {resolution}; pass one of them")
    return dict(overrides)


def model_source(preset: Optional[str], config_path: Optional[str], overrides: Optional[Dict[str, Any]] = None,
                 resolution: Optional[int] = None) -> str:
    """How messages name the model: ``"--unet_preset 'rgb-small' with --unet_overrides '{...}'"``."""
    source = f"--unet_config {config_path!r}" if config_path is not None else f"--unet_preset {preset!r}"
    if overrides:
        source += f" with --unet_overrides '{json.dumps(overrides)}'"
    return source + (f" with --resolution {resolution}" if resolution is not None else "")


def _construct_unet(config: Dict[str, Any], source: str):
    """``DDPMUNet2DModel(**config)``; a bad value is a ValueError naming ``source`` (the flags it came from)."""
    from .unet import DDPMUNet2DModel

    try:
        return DDPMUNet2DModel(**config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source} gives an invalid UNet config: {exc}") from exc


def count_unet_parameters(config: Dict[str, Any], source: str) -> int:
    """Parameters of ``DDPMUNet2DModel(**config)``, built on the meta device (no weights allocated; checks every
    value as building does, naming ``source``)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return sum(p.numel() for p in _construct_unet(config, source).parameters())


def default_output_dir(dataset_name: Optional[str] = None, train_data_dir: Optional[str] = None) -> str:
    """train.py's ``--output_dir`` when it is not given, named after the data: ``ddpm-digits`` (the built-in
    digits), ``ddpm-<folder name>`` (``--train_data_dir``), ``ddpm-<dataset name>`` (``--dataset_name``: a local
    folder's name, or the Hub id with ``/`` replaced by ``-``)."""
    if train_data_dir is not None:
        return "ddpm-" + os.path.basename(os.path.abspath(train_data_dir))
    if dataset_name is not None:
        local = os.path.isdir(dataset_name)
        return "ddpm-" + (os.path.basename(os.path.abspath(dataset_name)) if local else dataset_name.replace("/", "-"))
    return "ddpm-digits"


def check_default_output_dir(flags) -> None:
    """Refuse to start a new run in the default ``--output_dir`` (:func:`default_output_dir`) when it already holds
    files (a run), before anything is built, as :func:`diffusers_ddpm_ext.rundir.prepare_output_dir` refuses any
    non-empty folder later: with --overwrite_output_dir or --resume_from_checkpoint it is used as asked.

    Raises:
        FileExistsError: naming the folder, what it holds and the three ways on.
    """
    output_dir = flags.output_dir
    if output_dir != default_output_dir(flags.dataset_name, flags.train_data_dir) or flags.overwrite_output_dir \
            or flags.resume_from_checkpoint is not None or not os.path.isdir(output_dir):
        return
    entries = sorted(name for name in os.listdir(output_dir) if not name.startswith("."))
    if entries:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise FileExistsError(
            f"the default --output_dir {output_dir!r} (named after the data) already holds a run ({shown}); pass "
            f"--output_dir <new folder> for a new run, --overwrite_output_dir to replace that run, or "
            f"--resume_from_checkpoint latest to continue it")


def complete_flags(flags) -> None:
    """Fill in training/train.py's defaults that follow from other flags, without reading any data:
    ``--model_config_name_or_path`` as ``--unet_config``, the grey default model for the built-in digits (other data
    is read by :func:`resolve_model_for_data`), ``--max_grad_norm 0`` as no clipping, the default ``--output_dir``
    (:func:`default_output_dir`) and ``--learning_rate`` (:func:`default_learning_rate`; None until the model is
    known)."""
    if flags.model_config_name_or_path is not None:
        if flags.unet_config is not None:
            raise ValueError("pass either --unet_config or --model_config_name_or_path, not both")
        flags.unet_config = flags.model_config_name_or_path
    if flags.unet_preset is None and flags.unet_config is None and flags.dataset_name is None \
            and flags.train_data_dir is None:
        flags.unet_preset = DEFAULT_PRESETS[1]  # the built-in digits are grey
    if flags.max_grad_norm == 0:
        flags.max_grad_norm = None
    if flags.output_dir is None:
        flags.output_dir = default_output_dir(flags.dataset_name, flags.train_data_dir)
    if flags.learning_rate is None:  # the model's recommended rate (None for bad model flags: check_flags names them)
        flags.learning_rate = default_learning_rate(flags)


def resolve_model_for_data(flags) -> None:
    """Match the model to the data's channels before anything is built (after :func:`check_flags`).

    Reads whether the data is grey or RGB (:func:`diffusers_ddpm_ext.data.data_channels`: image modes, a cheap
    header read). With no ``--unet_preset``/``--unet_config`` the model is the default for the data
    (:data:`~diffusers_ddpm_ext.presets.DEFAULT_PRESETS`: ``rgb-small`` for RGB, ``digits-small`` for grey; RGB
    when any image is colour, with a warning for mixed data), logged with its size; a chosen model whose
    ``in_channels`` (after ``--unet_overrides``) disagree with the data is refused, never converted. Then every
    config value is checked (on the meta device) and the default ``--learning_rate`` set.

    Raises:
        ValueError: an invalid config, naming the flags it came from;
        diffusers_ddpm_ext.images.DataChannelsError: the model's channels disagree with the data's.
    """
    from .data import check_data_channels, data_channels

    data = data_channels(flags.dataset_name, flags.train_data_dir, flags.image_column, flags.cache_dir)
    inferred = flags.unet_preset is None and flags.unet_config is None
    if inferred:
        flags.unet_preset = DEFAULT_PRESETS[data.channels or 1]
    overrides = getattr(flags, "unet_overrides", None)
    config = unet_config_from_flags(preset=flags.unet_preset, config_path=flags.unet_config,
                                    resolution=flags.resolution, variance_type=flags.variance_type,
                                    num_class_embeds=flags.num_class_embeds, overrides=overrides)
    source = model_source(flags.unet_preset, flags.unet_config, overrides, flags.resolution)
    num_parameters = count_unet_parameters(config, source)
    channels = int(config.get("in_channels", 3))
    if data.channels is not None and channels != data.channels:
        fix = (f"set in_channels to {data.channels} in --unet_overrides or drop it"
               if "in_channels" in (overrides or {}) else f"leave out --unet_preset/--unet_config to train the default model for {data.name} data "
               f"({DEFAULT_PRESETS[data.channels]}) or pass --unet_overrides '{{\"in_channels\": {data.channels}}}'")
        grey = ", or convert the images to grey yourself" if data.channels == 3 else ""
        check_data_channels(channels, data, source, f"To train on it, {fix}{grey}.")
    if inferred and data.channels is not None and int(os.environ.get("RANK", "0")) == 0:
        (logger.warning if data.num_colour and data.num_grey else logger.info)(
            "%s: %s: training %s (the default model for %s data: in_channels=%d, %s parameters)%s; --unet_preset, "
            "--unet_config or --unet_overrides choose another", data.source, data.describe(), flags.unet_preset,
            data.name, channels, f"{num_parameters:,}",
            ", the grey images repeated to 3 channels" if data.num_colour and data.num_grey else "")
    if flags.learning_rate is None:
        flags.learning_rate = default_learning_rate(flags)


def build_noise_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2",
                          prediction_type: str = "epsilon", variance_type: str = "learned_range",
                          max_beta: Optional[float] = None, **kwargs):
    """The training/sampling scheduler (:class:`GaussianDiffusionScheduler`) from the script's flags
    (``max_beta``: see :func:`clipped_betas`)."""
    from .scheduler import GaussianDiffusionScheduler

    kwargs.setdefault("trained_betas", clipped_betas(num_train_timesteps, beta_schedule, max_beta))
    return GaussianDiffusionScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction_type=prediction_type,
        variance_type=variance_type, **kwargs
    )


def clipped_betas(num_train_timesteps: int, beta_schedule: str, max_beta: Optional[float]) -> Optional[list]:
    """The schedule's β_t clipped at ``max_beta``, as a scheduler's ``trained_betas``; ``None`` when nothing is
    clipped (``max_beta`` None, or above every β_t).

    A clipped schedule travels as ``trained_betas``, not as a new config key: every diffusers scheduler built
    ``from_config`` then runs the same chain, where it would ignore an unknown key and sample with the unclipped
    β. Cosine's last β is 0.999 (IDM eq. 17), which multiplies the error of ε̂ in the last reverse mean by
    β/√(α(1 − ᾱ)) ≈ 32; a lower cap tames that term of the unclipped bound.
    """
    if max_beta is None:
        return None
    check_max_beta(max_beta)
    betas = schedule_betas(num_train_timesteps, beta_schedule)  # (T,) float64
    # Compared in the scheduler's float32: cosine's own 0.999 cap is then no clip.
    if not (betas.float() > torch.tensor(max_beta, dtype=torch.float32)).any():
        return None
    return betas.clamp(max=max_beta).tolist()


def schedule_betas(num_train_timesteps: int, beta_schedule: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The (T,) β of a named schedule with :class:`GaussianDiffusionScheduler`'s default ``beta_start`` /
    ``beta_end`` (what :func:`build_noise_scheduler` builds before any clip), without building a scheduler."""
    import inspect

    from .scheduler import GaussianDiffusionScheduler, make_betas

    defaults = inspect.signature(GaussianDiffusionScheduler.__init__).parameters
    return make_betas(num_train_timesteps, defaults["beta_start"].default, defaults["beta_end"].default,
                      beta_schedule, dtype=dtype)


def check_max_beta(max_beta) -> None:
    """``--ddpm_max_beta`` must be a number in (0, 1): β_t = 1 would zero ᾱ_t, and β_t <= 0 adds no noise."""
    FLAG_RANGES["ddpm_max_beta"].check("ddpm_max_beta", max_beta)


def check_model_scheduler(model, noise_scheduler, num_class_embeds: Optional[int] = None) -> None:
    """Cross-check a built model against the scheduler and the class flags (after building, before training)."""
    cfg = model.config
    out_channels = cfg.get("out_channels") or cfg.in_channels
    resolve_out_channels(cfg.in_channels, noise_scheduler.config.variance_type, out_channels)
    if num_class_embeds is not None and cfg.get("num_class_embeds") is None:
        raise ValueError("--num_class_embeds was given but the UNet has no class embedding")


def build_model(flags):
    """The UNet and its scheduler from the script's flags (``unet_preset``/``unet_config``, ``resolution``,
    ``variance_type``, ``num_class_embeds``, ``model_type``, ``seed``, ``ddpm_*``, ``prediction_type``, memory
    options), cross-checked. The weights are seeded: every process builds the same model.

    Returns:
        ``(model, noise_scheduler)``.
    """
    model = build_unet(preset=flags.unet_preset, config_path=flags.unet_config, resolution=flags.resolution,
                       variance_type=flags.variance_type, num_class_embeds=flags.num_class_embeds,
                       model_type=flags.model_type, seed=flags.seed, overrides=getattr(flags, "unet_overrides", None))
    noise_scheduler = build_noise_scheduler(flags.ddpm_num_steps, flags.ddpm_beta_schedule, flags.prediction_type,
                                            flags.variance_type, max_beta=getattr(flags, "ddpm_max_beta", None))
    check_model_scheduler(model, noise_scheduler, flags.num_class_embeds)
    if flags.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if flags.enable_xformers_memory_efficient_attention:
        model.enable_xformers_memory_efficient_attention()
    return model, noise_scheduler


def build_data(flags, model, accelerator):
    """The training loader and the held-out evaluation images at the UNet's resolution and channels, from the
    script's flags.

    The data is ``dataset_name`` (``datasets``), ``train_data_dir`` (an image folder) or, with neither, the
    built-in digits. :func:`diffusers_ddpm_ext.data.load_train_validation_split` holds out a validation split
    (the digits' fixed 300 held-out images; a dataset's own validation/test split; else ``validation_size``
    images carved with ``validation_split_seed``), which is never trained on and depends only on those flags and
    the data, not on the process or the run; each process gets its shard of every global batch of the rest
    (``data.make_dataloader``). Bits/dim is measured on the first ``eval_num_images`` held-out images, sample
    quality against all of them.

    Returns:
        ``(loader, eval_set, num_levels)``: a DataLoader over a ``ResumableBatchSampler``, a
        :class:`~diffusers_ddpm_ext.trainer.EvalSet` (with the split's ``info`` and the whole split as its
        ``reference``), and the data's grey levels (17 for the digits, else 256).
    """
    from .data import dataset_to_tensors, load_train_validation_split, make_dataloader

    in_channels, resolution = model.config.in_channels, model.config.sample_size
    if not isinstance(resolution, int):  # (H, W) configs: the data pipeline makes square images
        if len(set(resolution)) != 1:
            raise ValueError(f"the UNet's sample_size {resolution} is not square; pass --resolution")
        resolution = int(resolution[0])
    with accelerator.main_process_first():
        split = load_train_validation_split(
            dataset_name=flags.dataset_name, train_data_dir=flags.train_data_dir, image_column=flags.image_column,
            class_column=flags.class_column if flags.dataset_name is not None else None,  # folders/digits: own labels
            resolution=resolution, in_channels=in_channels, center_crop=flags.center_crop,
            random_flip=flags.random_flip, skip_bad_images=flags.skip_bad_images, cache_dir=flags.cache_dir,
            validation_size=flags.validation_size, validation_split_seed=flags.validation_split_seed)
    dataset, info = split.train, split.info
    num_classes = getattr(dataset, "num_classes", None)
    if flags.num_class_embeds is not None and num_classes is None:
        raise ValueError("--num_class_embeds was given but the dataset has no class labels (pass --class_column, "
                         "or use an image folder with one sub-folder per class)")
    if flags.num_class_embeds is not None and num_classes > flags.num_class_embeds:
        raise ValueError(f"the dataset has {num_classes} classes but --num_class_embeds is {flags.num_class_embeds}")
    if flags.eval_quality_num_images and len(split.validation) < 4:
        raise ValueError(f"the held-out {info['split']} split has {len(split.validation)} images; sample quality "
                         f"(--eval_quality_num_images {flags.eval_quality_num_images}) needs at least 4: pass a larger "
                         f"--validation_size, or --eval_quality_num_images 0")
    loader = make_dataloader(dataset, flags.train_batch_size, seed=flags.seed, shuffle=True, drop_last=True,
                             num_workers=flags.dataloader_num_workers, num_replicas=accelerator.num_processes,
                             rank=accelerator.process_index)
    images, labels = dataset_to_tensors(split.validation, flags.eval_num_images)
    eval_set = EvalSet(images, labels, info["split"], info=dict(info), reference=split.validation)
    return loader, eval_set, int(info["num_levels"])


def load_quality_extractor(flags, accelerator):
    """The feature extractor of the end-of-training sample quality, loaded by the main process before training so
    that an encoder named explicitly that cannot be loaded (offline and not cached, a typo) fails the run at once
    (None on the other processes and with ``--eval_quality_num_images 0``).

    ``--feature_extractor auto``: the digits classifier for the built-in digits, else ``facebook/dinov2-base``; where
    that cannot be loaded (offline and not cached: decided at once, without the Hub client's retries) one warning
    line and an ``evaluate.FeaturesUnavailable``: the run goes on and reports the weight-free SWD only
    (:func:`diffusers_ddpm_ext.evaluate.load_feature_extractor`).

    Raises:
        ValueError: one line naming ``--feature_extractor``, the cause and ``--eval_quality_num_images 0``.
    """
    if not flags.eval_quality_num_images:
        return None
    from .evaluate import load_feature_extractor
    from .metrics import DEFAULT_IMAGE_ENCODER

    from .processes import on_main_process

    digits = flags.dataset_name is None and flags.train_data_dir is None
    name = flags.feature_extractor
    shown = name if name != "auto" or digits else f"auto (= {DEFAULT_IMAGE_ENCODER})"
    loaded = []  # only the main process measures; the model is not sent to the others

    def load():
        try:
            loaded.append(load_feature_extractor(name, digits=digits, device=accelerator.device,
                                                 cache_dir=flags.cache_dir))
        except Exception as exc:  # noqa: BLE001 - any failure to load gets the same advice
            cause = " ".join(str(exc).split())  # one line
            raise ValueError(
                f"--feature_extractor {shown} could not be loaded for the end-of-training sample quality "
                f"(--eval_quality_num_images {flags.eval_quality_num_images}): {type(exc).__name__}: {cause}. Pass "
                f"--feature_extractor <a local folder or a cached Hub id of a transformers image encoder>, or auto "
                f"(SWD alone where no encoder loads), or --eval_quality_num_images 0 to train without sample "
                f"quality.") from exc

    on_main_process(accelerator, load)  # a failure is raised on every process
    return loaded[0] if loaded else None
