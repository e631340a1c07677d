#!/usr/bin/env python
"""Train a DDPM (our `DDPMUNet2DModel` or diffusers' `UNet2DModel`) with Accelerate.

    accelerate launch training/train.py                       # digits-small on the built-in digits, a few minutes on CPU
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 training/train.py ...   # 2 gloo processes

A superset of diffusers' examples/unconditional_image_generation/train_unconditional.py (same flag names) with
its faults fixed: --overwrite_output_dir and --hub_private_repo are honoured, only the exported pipeline is
pushed (with a model card; at every --save_model_epochs save and at the end, as there), checkpoints are atomic
and resume exactly, EMA weights never overwrite the training weights. The building blocks live in
`diffusers_ddpm_ext.training_utils`; this file parses flags and wires them together.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from typing import Optional, Sequence

import torch

import diffusers_ddpm_ext  # noqa: F401  (registers our classes for DiffusionPipeline loading)
from diffusers_ddpm_ext import training_utils as tu

logger = logging.getLogger("train")

DEFAULT_OUTPUT_DIR = "ddpm-digits"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a DDPM with Accelerate (defaults: digits-small preset on the built-in digits, cosine "
                    "schedule, learned_range variance, hybrid loss).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    # ---- data (train_unconditional.py names)
    a("--dataset_name", default=None, help="Hub dataset id or local path read by `datasets` (Dataset.save_to_disk "
      "folders too). Default: neither this nor --train_data_dir = the built-in scikit-learn digits (offline).")
    a("--dataset_config_name", default=None, help="Config name of --dataset_name (not supported yet: an error).")
    a("--train_data_dir", default=None, help="Folder of images; one sub-folder per class gives labels.")
    a("--image_column", default=None, help="Image column of --dataset_name (auto-detected when unset).")
    a("--class_column", default=None, help="Label column for class conditioning ('label' for an image folder with "
      "class sub-folders). Needs --num_class_embeds. The built-in digits use their digit labels.")
    a("--cache_dir", default=None, help="`datasets` cache folder.")
    a("--resolution", type=int, default=None, help="Training image size; default: the UNet's sample_size "
      "(16 for digits-small). Images are resized (shorter side) and cropped to it.")
    a("--center_crop", action="store_true", help="Center crop instead of random crop.")
    a("--random_flip", action="store_true", help="Random horizontal flips (off: a mirrored digit is another glyph).")
    a("--skip_bad_images", action="store_true", help="Skip unreadable/too small images with a counted warning "
      "instead of failing before training.")
    a("--dataloader_num_workers", type=int, default=0, help="DataLoader workers (the data stream does not depend "
      "on it).")
    # ---- model
    a("--unet_preset", default=None, help="UNet preset (DDPMUNet2DModel.list_presets()); default digits-small.")
    a("--unet_config", default=None, help="JSON UNet config (ours or a UNet2DModel config.json, or a folder with "
      "one) instead of a preset.")
    a("--model_config_name_or_path", default=None, help="train_unconditional.py's name for --unet_config (local "
      "config only).")
    a("--model_type", default="ours", choices=["ours", "unet2d"], help="'ours' trains DDPMUNet2DModel; 'unet2d' "
      "trains diffusers' UNet2DModel with the same architecture (converted with to_unet2d) for comparisons.")
    a("--num_class_embeds", type=int, default=None, help="Number of classes: trains a class-conditional UNet "
      "(with a null class for classifier-free guidance). Unset = unconditional.")
    a("--class_dropout_prob", type=float, default=0.0, help="Probability of replacing a label by the null class "
      "(classifier-free guidance training; 0.1 is common). Needs --num_class_embeds and --model_type ours.")
    a("--gradient_checkpointing", action="store_true", help="Recompute activations in backward to save memory.")
    a("--enable_xformers_memory_efficient_attention", action="store_true", help="Use xformers attention "
      "(UNet2DModel only; needs xformers installed).")
    # ---- diffusion
    a("--ddpm_num_steps", type=int, default=1000, help="Training timesteps T.")
    a("--ddpm_num_inference_steps", type=int, default=100, help="Sampling steps for sample grids (respaced "
      "chain, IDM: learned variances keep sample quality at ~100 steps).")
    a("--ddpm_beta_schedule", default="squaredcos_cap_v2", choices=["linear", "scaled_linear", "squaredcos_cap_v2",
      "cosine", "sigmoid", "laplace"], help="Beta schedule ('cosine' = squaredcos_cap_v2, IDM).")
    a("--prediction_type", default="epsilon", choices=["epsilon", "sample", "v_prediction"],
      help="What the UNet predicts.")
    a("--variance_type", default="learned_range", choices=list(tu.VARIANCE_TYPES), help="Reverse-process variance. "
      "learned/learned_range make the UNet output 2×C channels: a preset's out_channels is set automatically; "
      "an explicit out_channels in --unet_config must match. Needs --loss_type hybrid or kl.")
    a("--loss_type", default="hybrid", choices=list(tu.LOSS_TYPES), help="simple = MSE (Ho et al.); hybrid = MSE "
      "+ 0.001·T·L_vlb with the mean detached (IDM, needs a learned variance); kl = T·L_vlb only.")
    a("--snr_gamma", type=float, default=None, help="Min-SNR-γ weighting of the MSE term (5 is the paper's value).")
    a("--timestep_sampler", default="uniform", choices=["uniform", "loss-second-moment"], help="How training "
      "timesteps are drawn; loss-second-moment is IDM's importance sampling (best with --loss_type kl).")
    # ---- optimisation (train_unconditional.py names)
    a("--output_dir", default=DEFAULT_OUTPUT_DIR, help="Where the pipeline, checkpoints, logs and metrics go.")
    a("--overwrite_output_dir", action="store_true", help="Allow a non-empty --output_dir: its previous "
      "checkpoints/logs are removed now, its pipeline replaced atomically at the end; other files are kept.")
    a("--seed", type=int, default=0, help="Seed of weights, data order, noise and sampling.")
    a("--train_batch_size", type=int, default=32, help="Batch size per process.")
    a("--eval_batch_size", type=int, default=64, help="Number of images in sample grids.")
    a("--num_epochs", type=int, default=18, help="Epochs (ignored when --max_train_steps is set); the default "
      "is 828 steps on the digits, a few minutes on 2 CPU cores.")
    a("--max_train_steps", type=int, default=None, help="Optimizer steps to train; overrides --num_epochs.")
    a("--save_images_epochs", type=int, default=10, help="Write a sample grid to samples/ every N epochs.")
    a("--save_model_epochs", type=int, default=None, help="Export the pipeline into --output_dir every N epochs "
      "(it is always exported at the end); with --push_to_hub each of these exports is also pushed.")
    a("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    a("--learning_rate", type=float, default=2e-3, help="Peak learning rate (AdamW).")
    a("--lr_scheduler", default="cosine", choices=["linear", "cosine", "cosine_with_restarts", "polynomial",
      "constant", "constant_with_warmup"], help="diffusers.optimization.get_scheduler name.")
    a("--lr_warmup_steps", type=int, default=50, help="Linear warm-up steps.")
    a("--adam_beta1", type=float, default=0.95)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-6)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (unset/0 = no clipping).")
    a("--use_ema", action=argparse.BooleanOptionalAction, default=True, help="Keep an EMA of the weights "
      "(diffusers EMAModel); samples, bits/dim and the exported pipeline use it.")
    a("--ema_inv_gamma", type=float, default=1.0, help="EMA warm-up inverse gamma.")
    a("--ema_power", type=float, default=3 / 4, help="EMA warm-up power.")
    a("--ema_max_decay", type=float, default=0.9999, help="EMA maximum decay.")
    a("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="Autocast precision; default: "
      "accelerate config / 'no'. fp16 needs a GPU.")
    a("--nan_policy", default="stop", choices=list(tu.NAN_POLICIES), help="On a NaN/inf loss or gradient: stop "
      "(after saving the last good state as a checkpoint) or skip the step (stops after 20 in a row).")
    # ---- checkpoints
    a("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N optimizer steps.")
    a("--checkpoints_total_limit", type=int, default=2, help="Keep at most this many checkpoints.")
    a("--resume_from_checkpoint", default=None, help="'latest' (newest complete checkpoint in --output_dir; a "
      "fresh start if none) or a checkpoint folder. Restores weights, EMA, optimizer, LR schedule, RNG, "
      "timestep-sampler state and the data position.")
    # ---- evaluation
    a("--eval_bpd_steps", type=int, default=20, help="Timesteps per image for the held-out bits/dim estimate "
      "(stratified, unbiased; exact needs T).")
    a("--eval_num_images", type=int, default=300, help="Images for bits/dim (held-out digits; else the first "
      "training images).")
    a("--eval_every", type=int, default=None, help="Also estimate bits/dim every N steps (logged).")
    a("--guidance_scale", type=float, default=None, help="Classifier-free guidance scale of class-conditional "
      "sample grids (default 2 with --class_dropout_prob > 0, else 1).")
    # ---- logging and hub
    a("--logger", default="tensorboard", choices=["tensorboard", "wandb", "none"], help="Tracker.")
    a("--logging_dir", default="logs", help="Tracker folder, relative to --output_dir.")
    a("--push_to_hub", action="store_true", help="Push the exported pipeline (not checkpoints or logs) to the Hub, "
      "one commit per push: at every --save_model_epochs export (message 'Epoch E, step S') and at the end. A "
      "token is required before training starts. A failed intermediate push is logged as a warning and training "
      "goes on (the next save point pushes the newer pipeline again); a failed final push is an error (exit code "
      "4), raised after the local pipeline and metrics.json are written. Every push's outcome is listed in "
      "metrics.json (hub_pushes).")
    a("--hub_strategy", default=None, choices=["every_save", "end"], help="With --push_to_hub: push at "
      "every --save_model_epochs export and at the end (every_save, the default), or only the final pipeline (end).")
    a("--hub_token", default=None, help="Hub write token (default: $HF_TOKEN or `hf auth login`).")
    a("--hub_model_id", default=None, help="Repo id (default: the --output_dir folder name).")
    a("--hub_private_repo", action="store_true", help="Create the Hub repo private.")
    a("--local_rank", type=int, default=-1, help="Ignored (set by launchers; accelerate reads LOCAL_RANK).")
    # ---- testing aids (hidden)
    a("--debug_nan_at_step", type=int, default=None, help=argparse.SUPPRESS)
    a("--debug_interrupt_after_step", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.model_config_name_or_path is not None:
        if args.unet_config is not None:
            raise ValueError("pass either --unet_config or --model_config_name_or_path, not both")
        args.unet_config = args.model_config_name_or_path
    if args.unet_preset is None and args.unet_config is None:
        args.unet_preset = "digits-small"
    if args.max_grad_norm == 0:
        args.max_grad_norm = None
    return args


def _check_environment(args, accelerator) -> None:
    if args.dataset_config_name is not None:
        raise ValueError("--dataset_config_name is not supported by diffusers_ddpm_ext.data yet; save the config "
                         "you want with datasets' save_to_disk and pass that folder as --dataset_name")
    if args.enable_xformers_memory_efficient_attention:
        if args.model_type != "unet2d":
            raise ValueError("--enable_xformers_memory_efficient_attention applies to --model_type unet2d only")
        try:
            import xformers  # noqa: F401
        except ImportError as exc:
            raise ValueError("--enable_xformers_memory_efficient_attention needs xformers installed") from exc
    if args.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("--mixed_precision fp16 needs a GPU; on CPU use bf16 or no")
    if args.class_dropout_prob > 0 and args.model_type == "unet2d":
        raise ValueError("--class_dropout_prob needs a null class, which UNet2DModel's class table lacks; use "
                         "--model_type ours for classifier-free guidance")


def _check_hub_token(args) -> None:
    """--push_to_hub: fail before training, not hours later at the first push, when no token is available."""
    import huggingface_hub

    if not (args.hub_token or os.environ.get("HF_TOKEN") or huggingface_hub.get_token()):
        raise ValueError("--push_to_hub needs a Hub write token: pass --hub_token, set HF_TOKEN or run "
                         "`hf auth login`")


def _push_failure(exc: Exception) -> str:
    """One line for a failed push, without hub.push_to_hub's advice to re-push its export folder (ours is gone)."""
    return f"{type(exc).__name__}: " + str(exc).split(" Nothing local was changed (")[0]


def _on_main(accelerator, fn):
    """Run fn on the main process; if it raises, raise the same message on every process (no hang)."""
    from accelerate.utils import broadcast_object_list

    error = [None]
    if accelerator.is_main_process:
        try:
            fn()
        except Exception as exc:  # re-raised below on every rank
            error = [(type(exc).__name__, str(exc))]
    if accelerator.num_processes > 1:
        broadcast_object_list(error)
    if error[0] is not None:
        name, message = error[0]
        kind = {"FileExistsError": FileExistsError, "CheckpointError": tu.CheckpointError}.get(name, ValueError)
        raise kind(message)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run training; returns the metrics dict (also written to ``<output_dir>/metrics.json``)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, broadcast_object_list, gather_object
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from diffusers_ddpm_ext.data import DIGITS_NUM_LEVELS, load_heldout_digits, load_training_dataset, make_dataloader
    from diffusers_ddpm_ext.losses import diffusion_loss
    from diffusers_ddpm_ext.timestep_sampler import create_timestep_sampler

    wall_start = time.time()
    args = parse_args(argv)
    tu.validate_args(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.logger == "none" else args.logger,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    _check_environment(args, accelerator)
    if args.push_to_hub:
        _on_main(accelerator, lambda: _check_hub_token(args))
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    resuming = args.resume_from_checkpoint is not None

    # ---- model, scheduler, data (identical initial weights on every rank: seeded before building)
    model = tu.build_unet(preset=args.unet_preset, config_path=args.unet_config, resolution=args.resolution,
                          variance_type=args.variance_type, num_class_embeds=args.num_class_embeds,
                          model_type=args.model_type, seed=args.seed)
    noise_scheduler = tu.build_noise_scheduler(args.ddpm_num_steps, args.ddpm_beta_schedule, args.prediction_type,
                                               args.variance_type)
    tu.check_model_scheduler(model, noise_scheduler, args.num_class_embeds)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        model.enable_xformers_memory_efficient_attention()
    in_channels, resolution = model.config.in_channels, model.config.sample_size
    if not isinstance(resolution, int):  # (H, W) configs: the data pipeline makes square images
        if len(set(resolution)) != 1:
            raise ValueError(f"the UNet's sample_size {resolution} is not square; pass --resolution")
        resolution = int(resolution[0])
    builtin = args.dataset_name is None and args.train_data_dir is None
    class_column = args.class_column if args.dataset_name is not None else None  # folders/digits: own labels
    with accelerator.main_process_first():
        dataset = load_training_dataset(
            dataset_name=args.dataset_name, train_data_dir=args.train_data_dir, image_column=args.image_column,
            class_column=class_column, resolution=resolution, in_channels=in_channels, center_crop=args.center_crop,
            random_flip=args.random_flip, skip_bad_images=args.skip_bad_images, cache_dir=args.cache_dir,
        )
    conditional = args.num_class_embeds is not None
    if conditional:
        num_classes = getattr(dataset, "num_classes", None)
        if num_classes is None:
            raise ValueError("--num_class_embeds was given but the dataset has no class labels (pass --class_column, "
                             "or use an image folder with one sub-folder per class)")
        if num_classes > args.num_class_embeds:
            raise ValueError(f"the dataset has {num_classes} classes but --num_class_embeds is {args.num_class_embeds}")
    loader = make_dataloader(dataset, args.train_batch_size, seed=args.seed, shuffle=True, drop_last=True,
                             num_workers=args.dataloader_num_workers, num_replicas=world, rank=rank)
    batch_sampler = loader.batch_sampler
    micro_per_epoch = (batch_sampler.batches_per_epoch // args.gradient_accumulation_steps) * \
        args.gradient_accumulation_steps
    if micro_per_epoch == 0:
        raise ValueError(f"{len(dataset)} training images are fewer than one optimizer step needs (batch "
                         f"{args.train_batch_size} × {world} processes × {args.gradient_accumulation_steps} "
                         f"accumulation steps)")
    steps_per_epoch = micro_per_epoch // args.gradient_accumulation_steps
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)

    # Only now that the flags, the model and the data are known to be good may the output folder be touched:
    # --overwrite_output_dir deletes the previous run's checkpoints, which a typo in a flag must never cost.
    _on_main(accelerator, lambda: tu.prepare_output_dir(args.output_dir, args.overwrite_output_dir, resuming))
    accelerator.wait_for_everyone()

    # ---- optimisation state
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    # Stepped by us once per optimizer step (not through accelerate, which steps it once per process).
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_train_steps)
    ema = None
    if args.use_ema:
        ema = EMAModel(model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
                       power=args.ema_power, model_cls=type(model), model_config=model.config)
    sampler = create_timestep_sampler(args.timestep_sampler, args.ddpm_num_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    if ema is not None:
        ema.to(device)
    # Per-rank randomness (dropout, noise, t, label dropout); data order comes from the sampler's (seed, epoch).
    noise_gen = torch.Generator(device=device)
    tu.seed_everything(args.seed * 7919 + 1000 + rank, noise_gen)
    generators = {"noise": noise_gen}

    state = {"global_step": 0, "epoch": 0, "batch_in_epoch": 0, "loss_steps": [], "losses": [],
             "skipped_steps": 0, "train_time_s": 0.0}
    # The main process picks (and hashes) the checkpoint and moves altered newer ones aside; every process then
    # loads the same one.
    resume_path = [None]
    _on_main(accelerator, lambda: resume_path.__setitem__(
        0, tu.resolve_resume_path(args.resume_from_checkpoint, args.output_dir, quarantine=True)))
    if world > 1:
        broadcast_object_list(resume_path)
    resume_path = resume_path[0]
    if resume_path is not None:
        # `latest` has just checked every SHA-256; an explicitly named checkpoint is checked here.
        data = tu.load_checkpoint(resume_path, check_hashes=args.resume_from_checkpoint != "latest")
        tu.check_checkpoint_matches(data, unwrapped)
        unwrapped.load_state_dict(data.model_state, strict=True)
        optimizer.load_state_dict(data.optimizer_state)
        lr_scheduler.load_state_dict(data.lr_scheduler_state)
        if data.scaler_state is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(data.scaler_state)
        if ema is not None:
            tu.load_ema_state(ema, unwrapped, data)
        sampler.load_state_dict(data.sampler_state)
        if len(data.rng_states) != world:
            raise tu.CheckpointError(f"{resume_path} was written by {len(data.rng_states)} processes, this run has "
                                     f"{world}: exact resume needs the same number of processes")
        tu.restore_rng_state(data.rng_states[rank], generators)
        for key in state:
            state[key] = data.training_state.get(key, state[key])
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, state["global_step"],
                    state["epoch"], state["batch_in_epoch"])
    elif args.resume_from_checkpoint == "latest":
        logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting a new run", args.output_dir)

    run_config = tu.training_config_for_card(args)
    if accelerator.is_main_process:
        tu.write_json_atomic(os.path.join(args.output_dir, tu.RUN_MARKER_NAME), run_config)
        if args.logger != "none":
            accelerator.init_trackers("train", config=tu.tracker_config(run_config))

    # ---- evaluation data
    if builtin:
        eval_images, eval_labels = load_heldout_digits(resolution, in_channels)
        num_levels, eval_split = DIGITS_NUM_LEVELS, "heldout"
    else:
        count = min(args.eval_num_images, len(dataset))
        items = [dataset[i] for i in range(count)]
        eval_images = torch.stack([it["pixel_values"] for it in items])
        eval_labels = torch.stack([it["class_labels"] for it in items]) if "class_labels" in items[0] else None
        num_levels, eval_split = 256, "train"
    eval_images, eval_labels = eval_images[: args.eval_num_images], (
        eval_labels[: args.eval_num_images] if eval_labels is not None else None)
    if not conditional:
        eval_labels = None
    guidance = args.guidance_scale if args.guidance_scale is not None else (2.0 if args.class_dropout_prob > 0 else 1.0)

    def make_pipeline():
        from diffusers import DDPMPipeline

        from diffusers_ddpm_ext.pipelines import ClassConditionalDDPMPipeline

        cls = ClassConditionalDDPMPipeline if conditional else DDPMPipeline
        pipe = cls(unet=unwrapped, scheduler=tu.build_noise_scheduler(
            args.ddpm_num_steps, args.ddpm_beta_schedule, args.prediction_type, args.variance_type))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample_grid():
        """EMA-weight samples as a PIL grid (fixed seed; the global RNG is left untouched)."""
        tu.fault_point("sample")
        with torch.random.fork_rng(devices=[]), tu.ema_weights(ema, unwrapped), tu.eval_mode(unwrapped):
            pipe = make_pipeline()
            generator = torch.Generator(device="cpu").manual_seed(args.seed)
            kwargs = dict(num_inference_steps=args.ddpm_num_inference_steps, generator=generator, output_type="np")
            if conditional:
                labels = [i % args.num_class_embeds for i in range(args.eval_batch_size)]
                images = pipe(class_labels=labels, guidance_scale=guidance, **kwargs).images
                nrow = args.num_class_embeds if args.eval_batch_size % args.num_class_embeds == 0 else None
            else:
                images = pipe(batch_size=args.eval_batch_size, **kwargs).images
                nrow = None
        return tu.make_image_grid(images, nrow=nrow, scale=max(1, 64 // max(images.shape[1], 1)))

    # The bound of the model as it samples: with clip_sample the reverse mean uses the clipped x̂_0 (as IDM's
    # NLL evaluation, clip_denoised=True). Unclipped, the cosine schedule's last step (β = 0.999, ᾱ ≈ 2e-9)
    # turns a small ε error into several bits/dim of KL for a model that samples exactly the same.
    clip_denoised = bool(noise_scheduler.config.clip_sample)

    def evaluate_bpd():
        from diffusers_ddpm_ext.likelihood import estimate_bits_per_dim

        with torch.random.fork_rng(devices=[]), tu.ema_weights(ema, unwrapped), tu.eval_mode(unwrapped):
            result = estimate_bits_per_dim(
                unwrapped, noise_scheduler, eval_images.to(device), num_timesteps_sampled=args.eval_bpd_steps,
                num_levels=num_levels, class_labels=None if eval_labels is None else eval_labels.to(device),
                batch_size=256, generator=torch.Generator(device=device).manual_seed(args.seed),
                progress=accelerator.is_local_main_process, clip_denoised=clip_denoised)
        return result

    def save_checkpoint(snapshot):
        """Every rank contributes its RNG state; the main process writes. `snapshot` = last step boundary."""
        rng_states = gather_object([snapshot["rng"]])
        existing = os.path.join(args.output_dir, f"{tu.CHECKPOINT_PREFIX}{snapshot['global_step']}")
        if accelerator.is_main_process and existing in tu.list_checkpoints(args.output_dir):
            logger.info("%s already holds this state", existing)  # e.g. the NaN guard right after a save
        elif accelerator.is_main_process:
            n = snapshot["num_losses"]
            training_state = {k: snapshot[k] for k in ("global_step", "epoch", "batch_in_epoch", "skipped_steps",
                                                        "train_time_s")}
            training_state.update(loss_steps=state["loss_steps"][:n], losses=state["losses"][:n])
            path = tu.save_checkpoint(
                args.output_dir, snapshot["global_step"], model=unwrapped, ema=ema, optimizer=optimizer,
                lr_scheduler=lr_scheduler, scaler=accelerator.scaler, sampler_state=sampler.state_dict(),
                training_state=training_state, rng_states=rng_states)
            tu.rotate_checkpoints(args.output_dir, args.checkpoints_total_limit)
            logger.info("saved %s", path)
        accelerator.wait_for_everyone()

    hub_repo_id = args.hub_model_id or tu.default_repo_name(args.output_dir)
    hub_pushes = []  # outcome of every push of this process: written to metrics.json
    kept_export = []  # the Hub export folder kept after a failed final upload, for the retry command

    def export(final_metrics=None, commit_message=None, keep_failed_upload=False):
        """Publish the pipeline (EMA weights) into --output_dir; with a `commit_message`, also push a Hub export.

        The local folder is a plain `save_pretrained` folder (model_index.json names `diffusers_ddpm_ext.*`, so
        `DiffusionPipeline.from_pretrained` loads it after `import diffusers_ddpm_ext`, no remote code) plus the
        model card and sample grid. The Hub copy is `hub.export_pipeline`'s folder (self-contained module files
        so plain diffusers can load the repo), built in a temporary folder and deleted after the upload.
        Both are assembled in temporary folders first; the local one is published file by file before the
        upload starts, so neither a failed nor a killed upload costs the local pipeline.

        With `keep_failed_upload`, a complete export whose upload failed is moved next to --output_dir
        (`<output_dir>-hub`, numbered if taken) and recorded in `kept_export`, so the retry is one push.

        Returns:
            The exception that stopped the Hub export or push (main process; None when it succeeded or there
            was none). The caller decides whether it is fatal.
        """
        from diffusers_ddpm_ext import hub

        error = None
        if accelerator.is_main_process:
            grid = sample_grid()
            stage = os.path.join(args.output_dir, f".tmp-pipeline-{os.getpid()}")
            hub_dir = os.path.join(args.output_dir, f".tmp-hub-{os.getpid()}")
            repo_id = args.hub_model_id or f"your-username/{tu.default_repo_name(args.output_dir)}"
            datasets = [args.dataset_name] if args.dataset_name else None
            try:
                with tu.ema_weights(ema, unwrapped):
                    tu.assert_finite(dict(unwrapped.state_dict()), "exported weights")
                    pipe = make_pipeline()
                    pipe.save_pretrained(stage, safe_serialization=True)
                    grid.save(os.path.join(stage, hub.GRID_NAME))
                    hub.render_model_card(pipe, repo_id=repo_id, metrics=final_metrics, training_config=run_config,
                                          datasets=datasets, sample_grid=hub.GRID_NAME,
                                          num_inference_steps=args.ddpm_num_inference_steps,
                                          sample_grid_caption=f"EMA samples, {args.ddpm_num_inference_steps} "
                                                              f"steps, seed {args.seed}.",
                                          ).save(os.path.join(stage, "README.md"))
                    if commit_message is not None:
                        try:
                            hub.export_pipeline(pipe, hub_dir, sample_grid=grid, metrics=final_metrics,
                                                training_config=run_config, repo_id=repo_id, datasets=datasets)
                        except Exception as exc:  # the local pipeline is still published below
                            error = exc
                tu.fsync_tree(stage)
                new_files = tu.files_under(stage)
                stale = [f for f in tu.files_under(args.output_dir)
                         if f.split(os.sep)[0] in ("unet", "scheduler") and f not in new_files]
                tu.publish_dir(stage, args.output_dir, remove=stale)
                if commit_message is not None and error is None:
                    try:
                        hub.push_to_hub(hub_dir, hub_repo_id, token=args.hub_token, private=args.hub_private_repo,
                                        commit_message=commit_message)
                    except Exception as exc:
                        error = exc
            finally:
                built = os.path.isfile(os.path.join(hub_dir, "model_index.json"))
                if keep_failed_upload and error is not None and built:
                    base = kept = os.path.normpath(args.output_dir) + "-hub"
                    number = 1
                    while os.path.exists(kept):  # never overwrite an earlier kept export
                        number += 1
                        kept = f"{base}-{number}"
                    os.replace(hub_dir, kept)
                    kept_export.append(kept)
                else:
                    tu.remove_tree_safely(hub_dir)
            if commit_message is not None:
                failure = None if error is None else _push_failure(error)
                hub_pushes.append({"commit_message": commit_message, "step": state["global_step"],
                                   "ok": error is None, "error": failure})
        accelerator.wait_for_everyone()
        return error

    # ---- training loop
    def snapshot_now():
        epoch, batch = state["epoch"], state["batch_in_epoch"]
        if batch >= micro_per_epoch:
            epoch, batch = epoch + 1, 0
        # Loss lists only grow: remember their length instead of copying them every step.
        return dict(state, epoch=epoch, batch_in_epoch=batch, num_losses=len(state["losses"]),
                    rng=tu.capture_rng_state(generators))

    snapshot = snapshot_now()
    progress = tu.progress_bar(max_train_steps, state["global_step"], disable=not accelerator.is_local_main_process)
    model.train()
    null_label = args.num_class_embeds
    window, window_loss, consecutive_skips, nan_injected = [], [], 0, False
    segment_start = time.time()
    first_epoch, first_batch = snapshot["epoch"], snapshot["batch_in_epoch"]
    done = state["global_step"] >= max_train_steps
    for epoch in range(first_epoch, num_epochs):
        if done:
            break
        state["epoch"], state["batch_in_epoch"] = epoch, first_batch if epoch == first_epoch else 0
        batch_sampler.set_epoch(epoch)
        batch_sampler.skip(state["batch_in_epoch"])
        with torch.random.fork_rng(devices=[]):  # creating a DataLoader iterator draws from the global RNG
            batches = iter(loader)
        for batch in batches:
            if state["batch_in_epoch"] >= micro_per_epoch:
                break
            x0 = batch["pixel_values"].to(device)  # (B, C, H, W) in [-1, 1]
            bsz = x0.shape[0]
            noise = torch.randn(x0.shape, generator=noise_gen, device=device)
            timesteps, weights = sampler.sample(bsz, device, generator=noise_gen)
            labels = None
            if conditional:
                labels = batch["class_labels"].to(device).long()
                if args.class_dropout_prob > 0:
                    drop = torch.rand(bsz, generator=noise_gen, device=device) < args.class_dropout_prob
                    labels = torch.where(drop, torch.full_like(labels, null_label), labels)
            noisy = noise_scheduler.add_noise(x0, noise, timesteps)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    extra = {"class_labels": labels} if conditional else {}
                    model_output = model(noisy, timesteps, **extra).sample  # (B, C or 2C, H, W)
                out = diffusion_loss(model_output.float(), x0, noise, timesteps, noise_scheduler,
                                     loss_type=args.loss_type, snr_gamma=args.snr_gamma, num_levels=num_levels,
                                     weights=weights, noisy_samples=noisy)
                loss = out.loss.mean()
                if args.debug_nan_at_step == state["global_step"] + 1 and not nan_injected:
                    loss, nan_injected = loss * float("nan"), True  # once: a skipped step is retried with new data
                finite, mean_loss = tu.all_finite_and_mean(accelerator, loss)
                if not finite:
                    if args.nan_policy == "stop":
                        progress.close()
                        save_checkpoint(snapshot)
                        raise tu.NonFiniteLossError(
                            f"non-finite loss ({loss.item()}) at optimizer step {state['global_step'] + 1} (epoch "
                            f"{epoch}); the last good state is checkpoint-{snapshot['global_step']} in "
                            f"{args.output_dir}. Lower --learning_rate, set --max_grad_norm, or pass --nan_policy skip.")
                    window = None  # the whole accumulation window is dropped
                else:
                    accelerator.backward(loss)
                    tu.fault_point("step")  # crash tests: a kill between backward and the optimizer step
                    if window is not None:
                        window.append((timesteps, out.unweighted_loss.detach()))
                        window_loss.append(mean_loss)
                grad_norm = None
                if accelerator.sync_gradients and window is not None:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
                    if not math.isfinite(float(grad_norm)) and accelerator.scaler is None:
                        if args.nan_policy == "stop":
                            progress.close()
                            save_checkpoint(snapshot)
                            raise tu.NonFiniteLossError(
                                f"non-finite gradient norm at optimizer step {state['global_step'] + 1}; the last "
                                f"good state is checkpoint-{snapshot['global_step']} in {args.output_dir}")
                        window = None
                if accelerator.sync_gradients:
                    if window is None:
                        optimizer.zero_grad(set_to_none=True)
                    else:
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
            state["batch_in_epoch"] += 1
            if not accelerator.sync_gradients:
                continue
            if window is None:  # skipped step
                state["skipped_steps"] += 1
                consecutive_skips += 1
                logger.warning("skipped a step with a non-finite loss/gradient before step %d (%d skipped so far)",
                               state["global_step"] + 1, state["skipped_steps"])
                window, window_loss = [], []
                snapshot = snapshot_now()
                if consecutive_skips >= 20:
                    progress.close()
                    save_checkpoint(snapshot)  # skipped steps never changed the weights: the last good state
                    raise tu.NonFiniteLossError(
                        f"20 consecutive non-finite steps before optimizer step {state['global_step'] + 1}; giving "
                        f"up. The last good state is checkpoint-{snapshot['global_step']} in {args.output_dir}. "
                        f"Lower --learning_rate or set --max_grad_norm.")
                continue
            consecutive_skips = 0
            sampler.update(torch.cat([t for t, _ in window]), torch.cat([l for _, l in window]))
            if ema is not None:
                ema.step(unwrapped.parameters())
            state["global_step"] += 1
            step_loss = sum(window_loss) / len(window_loss)
            state["loss_steps"].append(state["global_step"])
            state["losses"].append(step_loss)
            window, window_loss = [], []
            now = time.time()
            state["train_time_s"] += now - segment_start
            segment_start = now
            snapshot = snapshot_now()
            logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}
            if ema is not None:
                logs["ema_decay"] = ema.cur_decay_value
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=state["global_step"])
            if args.checkpointing_steps and state["global_step"] % args.checkpointing_steps == 0:
                save_checkpoint(snapshot)
            if args.debug_interrupt_after_step == state["global_step"]:
                raise tu.SimulatedInterrupt(f"stopped after step {state['global_step']} (--debug_interrupt_after_step)")
            if args.eval_every and state["global_step"] % args.eval_every == 0 and accelerator.is_main_process:
                accelerator.log({"bits_per_dim": evaluate_bpd().mean}, step=state["global_step"])
            if state["global_step"] >= max_train_steps:
                done = True
                break
        epoch_finished = state["batch_in_epoch"] >= micro_per_epoch
        if epoch_finished and not done:
            if args.save_images_epochs and (epoch + 1) % args.save_images_epochs == 0 and accelerator.is_main_process:
                grid = sample_grid()
                path = os.path.join(args.output_dir, "samples", f"epoch_{epoch + 1:04d}.png")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                grid.save(path)
            if args.save_model_epochs and (epoch + 1) % args.save_model_epochs == 0:
                push = args.push_to_hub and args.hub_strategy != "end"
                message = f"Epoch {epoch + 1}, step {state['global_step']}"
                error = export(commit_message=message if push else None)
                if error is not None:  # hours of training are worth more than one snapshot: go on
                    logger.warning("pushing %r to %s failed; training goes on (the next save point and the end "
                                   "of training push again). %s", message, hub_repo_id, _push_failure(error))
    progress.close()

    # ---- final checkpoint, evaluation, export
    if args.checkpointing_steps and not os.path.isdir(
            os.path.join(args.output_dir, f"{tu.CHECKPOINT_PREFIX}{state['global_step']}")):
        save_checkpoint(snapshot)
    checksums = gather_object([{"rank": rank, "weights": tu.parameter_checksum(unwrapped),
                                "ema": tu.ema_checksum(ema)}])
    for entry in checksums if accelerator.is_main_process else []:
        print(f"[rank {entry['rank']}] weight checksum {entry['weights']} ema {entry['ema']}", flush=True)
    metrics = {}
    if accelerator.is_main_process:
        if len({(c["weights"], c["ema"]) for c in checksums}) != 1:
            raise RuntimeError(f"processes ended with different weights: {checksums}")
        bpd = evaluate_bpd()
        metrics = {
            "bits_per_dim": bpd.mean,
            "bits_per_dim_standard_error": bpd.mean_standard_error,
            "bits_per_dim_split": eval_split,
            "bits_per_dim_num_images": int(eval_images.shape[0]),
            "bits_per_dim_clip_denoised": clip_denoised,
            "eval_bpd_steps": bpd.timesteps_per_image,
            "train_steps": state["global_step"],
            "skipped_steps": state["skipped_steps"],
            "final_loss": state["losses"][-1] if state["losses"] else None,
            "final_loss_mean_last_50": (sum(state["losses"][-50:]) / len(state["losses"][-50:]))
            if state["losses"] else None,
            "train_time_s": state["train_time_s"],
            "wall_time_s": None,
            "num_processes": world,
            "global_batch_size": args.train_batch_size * world * args.gradient_accumulation_steps,
            "num_parameters": tu.count_parameters(unwrapped),
            "model_type": args.model_type,
            "loss_type": args.loss_type,
            "variance_type": args.variance_type,
            "beta_schedule": noise_scheduler.config.beta_schedule,
            "prediction_type": args.prediction_type,
            "rank_checksums": checksums,
        }
        if state["losses"]:
            tu.save_loss_curve(state["loss_steps"], state["losses"], os.path.join(args.output_dir, "loss_curve.png"),
                               title=f"{args.loss_type} loss, {args.variance_type}, {noise_scheduler.config.beta_schedule}")
        card_metrics = {"bits/dim": round(bpd.mean, 4), "train_steps": state["global_step"]}
    accelerator.wait_for_everyone()
    final_message = None
    if args.push_to_hub:
        final_message = f"End of training: epoch {state['epoch'] + 1}, step {state['global_step']}"
        if accelerator.is_main_process:
            final_message += f", bits/dim {card_metrics['bits/dim']}"
    push_error = export(card_metrics if accelerator.is_main_process else None, commit_message=final_message,
                        keep_failed_upload=True)
    if accelerator.is_main_process:
        metrics["wall_time_s"] = time.time() - wall_start
        if args.push_to_hub:
            metrics["hub_pushes"] = hub_pushes
        tu.write_json_atomic(os.path.join(args.output_dir, "metrics.json"), metrics)
        logger.info("done: %d steps, final loss %.4f, bits/dim (%s) %.3f ± %.3f, %.0f s",
                    metrics["train_steps"], metrics["final_loss"] or float("nan"), eval_split, metrics["bits_per_dim"],
                    metrics["bits_per_dim_standard_error"], metrics["wall_time_s"])
    accelerator.end_training()
    if push_error is not None:  # the final upload must not fail quietly; everything local is written by now
        from diffusers_ddpm_ext.hub import HubPushError

        out, private = args.output_dir, " --private" if args.hub_private_repo else ""
        if kept_export:  # the export (model card included) was built; only its upload failed
            retry = f"`python -m diffusers_ddpm_ext.hub push {kept_export[0]} {hub_repo_id}{private}`"
        else:  # the export itself failed: rebuild it beside the output folder (an export may not lie inside it)
            export_dir = os.path.normpath(out) + "-hub"
            retry = (f"`python -m diffusers_ddpm_ext.hub export {out} {export_dir} --repo-id {hub_repo_id} --metrics "
                     f"{os.path.join(out, 'metrics.json')}` then `python -m diffusers_ddpm_ext.hub push {export_dir} "
                     f"{hub_repo_id}{private}`")
        raise HubPushError(f"{_push_failure(push_error)} The run itself completed: {out} holds the pipeline, "
                           f"metrics.json and checkpoints. Retry the upload with {retry}.") from push_error
    return metrics


if __name__ == "__main__":
    from diffusers_ddpm_ext.hub import HubPushError

    try:
        main()
    except (ValueError, FileExistsError, tu.NonFiniteLossError, HubPushError) as exc:
        # Bad flags, a protected output folder, a diverged run or a failed final upload: one clear line.
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(3 if isinstance(exc, tu.NonFiniteLossError) else 4 if isinstance(exc, HubPushError) else 2)
