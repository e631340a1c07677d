#!/usr/bin/env python
"""Train a DDPM (our `DDPMUNet2DModel` or diffusers' `UNet2DModel`) with Accelerate.

    accelerate launch training/train.py                       # digits-small on the built-in digits, a few minutes on CPU
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 training/train.py ...   # 2 gloo processes

A superset of diffusers' examples/unconditional_image_generation/train_unconditional.py (same flag names) with
its faults fixed: --overwrite_output_dir and --hub_private_repo are honoured, only the exported pipeline is
pushed (with a model card; at every --save_model_epochs save and at the end, as there), checkpoints are atomic
and resume exactly, EMA weights never overwrite the training weights. This file is flags -> build -> train ->
publish: the loop is `diffusers_ddpm_ext.trainer.Trainer`, the export `diffusers_ddpm_ext.publish.RunPublisher`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import time
from typing import Optional, Sequence

if __name__ == "__main__":  # a stop in the seconds of imports below: nothing is written yet; one line and exit
    def _stopped_during_start_up(signum, frame):
        sys.stderr.write(f"stopped by {signal.Signals(signum).name} during start-up; nothing was written\n")
        os._exit(128 + signum)
    for _signum in (signal.SIGINT, signal.SIGTERM):  # run_cli installs the training's handlers after the imports
        if signal.getsignal(_signum) is not signal.SIG_IGN:
            signal.signal(_signum, _stopped_during_start_up)

import torch  # noqa: E402

from diffusers_ddpm_ext.build import (MODEL_TYPES, add_range_help, build_data, build_model, check_environment,
                                      check_flags, check_run_flags, complete_flags, load_quality_extractor,
                                      resolve_model_for_data, unet_overrides_type)
from diffusers_ddpm_ext.data import VALIDATION_SPLIT_SEED
from diffusers_ddpm_ext.evaluate import validation_size_type
from diffusers_ddpm_ext.losses import LOSS_TYPES
from diffusers_ddpm_ext.processes import lock_on_main_process, on_main_process, run_cli
from diffusers_ddpm_ext.publish import RunPublisher, public_training_config
from diffusers_ddpm_ext.rundir import RUN_MARKER_NAME, prepare_output_dir, write_json_atomic
from diffusers_ddpm_ext.runflags import parse_allowed_flags, script_flags
from diffusers_ddpm_ext.scheduler import BETA_SCHEDULE_ALIASES, BETA_SCHEDULES, PREDICTION_TYPES, VARIANCE_TYPES
from diffusers_ddpm_ext.timestep_sampler import SAMPLER_NAMES
from diffusers_ddpm_ext.trainer import (NAN_POLICIES, TrainConfig, Trainer, check_objective, process_seed,
                                        seed_everything, steps_per_epoch)

logger = logging.getLogger("train")

MIXED_PRECISIONS = ("no", "fp16", "bf16")


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
    a("--validation_size", type=validation_size_type, default=None, help="Held-out images, never trained on "
      "(bits/dim, sample quality): a number (500) or a fraction (0.1). Default: a dataset's own validation/test "
      "split (all of it), else 10%% of the images, at most 1000; the digits: their fixed 300 held-out digits.")
    a("--validation_split_seed", type=int, default=VALIDATION_SPLIT_SEED, help="Seed of the held-out split (kept "
      "apart from --seed: runs with different seeds are evaluated on the same images).")
    # ---- model
    a("--unet_preset", default=None, help="UNet preset (DDPMUNet2DModel.list_presets()); default: by the data's "
      "channels (read before training), rgb-small for RGB images (any colour image), digits-small for grey ones.")
    a("--unet_config", default=None, help="JSON UNet config (ours or a UNet2DModel config.json), or a folder "
      "holding a config.json (e.g. a saved pipeline's unet/), instead of a preset.")
    a("--unet_overrides", type=unet_overrides_type, default=None, help="JSON object of UNet config keys applied on "
      "top of the preset, --unet_config or default model, e.g. '{\"block_out_channels\": [64, 128, 128]}'.")
    a("--model_config_name_or_path", default=None, help="train_unconditional.py's name for --unet_config (local "
      "config only).")
    a("--model_type", default="ours", choices=MODEL_TYPES, help="'ours' trains DDPMUNet2DModel; 'unet2d' "
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
    a("--ddpm_beta_schedule", default="squaredcos_cap_v2", choices=[*BETA_SCHEDULES, *BETA_SCHEDULE_ALIASES],
      help="Beta schedule ('cosine' = squaredcos_cap_v2, IDM).")
    a("--ddpm_max_beta", type=float, default=0.5, help="Clip every β_t at this value, in (0, 1); the scheduler "
      "stores the clipped β as `trained_betas`, which every diffusers scheduler reads. Cosine's own cap is 0.999 "
      "(IDM eq. 17): its last step then multiplies ε̂'s error by ~32 in the reverse mean and the unclipped bound "
      "grows heavy tails; 0.5 changes only cosine's last 3 β (README, ablation). Linear β never reach it.")
    a("--prediction_type", default="epsilon", choices=PREDICTION_TYPES, help="What the UNet predicts.")
    a("--variance_type", default="learned_range", choices=VARIANCE_TYPES, help="Reverse-process variance. "
      "learned/learned_range make the UNet output 2×C channels: a preset's out_channels is set automatically; "
      "an explicit out_channels in --unet_config must match. Needs --loss_type hybrid or kl.")
    a("--loss_type", default="hybrid", choices=LOSS_TYPES, help="simple = MSE (Ho et al.); hybrid = MSE "
      "+ 0.001·T·L_vlb with the mean detached (IDM, needs a learned variance); kl = T·L_vlb only.")
    a("--snr_gamma", type=float, default=None, help="Min-SNR-γ weighting of the MSE term (5 is the paper's value).")
    a("--timestep_sampler", default="uniform", choices=SAMPLER_NAMES, help="How training "
      "timesteps are drawn; loss-second-moment is IDM's importance sampling (best with --loss_type kl).")
    # ---- optimisation (train_unconditional.py names)
    a("--output_dir", default=None, help="Where the pipeline, checkpoints, logs and metrics go. Default: named after "
      "the data, ddpm-digits, ddpm-<folder name> or ddpm-<dataset name> (refused if it holds a run).")
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
    a("--learning_rate", type=float, default=None, help="Peak learning rate (AdamW). Default: the preset's "
      "recommended rate (2e-3 for digits-small, 2e-4 for ddpm-cifar10; README lists them), by parameter count for "
      "--unet_config (2e-3 at 1M down to 2e-4 at 36M, at least 1e-4).")
    a("--lr_scheduler", default="cosine", choices=["linear", "cosine", "cosine_with_restarts", "polynomial",
      "constant", "constant_with_warmup"], help="diffusers.optimization.get_scheduler name.")
    a("--lr_warmup_steps", type=int, default=50, help="Linear warm-up steps (longer than the run: a warning).")
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
    a("--mixed_precision", default=None, choices=MIXED_PRECISIONS, help="Autocast precision; default: "
      "accelerate config / 'no'. fp16 needs a GPU.")
    a("--nan_policy", default="stop", choices=NAN_POLICIES, help="On a NaN/inf loss or gradient: stop "
      "(after saving the last good state as a checkpoint) or skip the step (stops after 20 in a row).")
    # ---- checkpoints
    a("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N optimizer steps.")
    a("--checkpoints_total_limit", type=int, default=2, help="Keep at most this many checkpoints.")
    a("--resume_from_checkpoint", default=None, help="'latest' (newest complete checkpoint in --output_dir; a "
      "fresh start if none) or a checkpoint folder. Restores weights, EMA, optimizer, LR schedule, RNG, "
      "timestep-sampler state and the data position. Every flag that changes the result must be the checkpoint's "
      "(a difference is refused, naming the flag and both values) unless --allow_changed_flags names it.")
    a("--allow_changed_flags", default=None, help="With --resume_from_checkpoint: comma-separated flags whose new "
      "values are intended (e.g. learning_rate,max_train_steps); they apply from the resumed step and are recorded "
      "(training_args.json 'changed_on_resume', the model card). Seed, batch size, accumulation, data and T never "
      "change on resume.")
    # ---- evaluation
    a("--eval_bpd_steps", type=int, default=20, help="Timesteps per image for the held-out bits/dim estimate "
      "(stratified, unbiased; exact at T = --ddpm_num_steps, the most allowed).")
    a("--eval_num_images", type=int, default=300, help="Held-out images for bits/dim (the first of the split).")
    a("--eval_quality_num_images", type=int, default=256, help="Images sampled at the end (--ddpm_num_inference_steps)"
      " for SWD (no weights; beside its real-data floor) and FD/KID/PR against the held-out split; 0 skips it.")
    a("--feature_extractor", default="auto", help="FD/KID/PR features: 'auto' = the digits classifier for the digits, "
      "else facebook/dinov2-base (FD_DINOv2; if not loadable, one warning and SWD only); 'digits-classifier'; or any "
      "transformers image encoder id or local folder, loaded before training (a failure stops the run then).")
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
    add_range_help(p)  # "Must be ...": each numeric flag's range, from its one definition (build.allowed_range)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    complete_flags(args)  # defaults that follow from other flags (output folder, learning rate); no data is read
    return args


def validate_args(args) -> None:
    """Reject bad flags before anything is built, naming the flag, the value and what is allowed (`TrainConfig`,
    `check_objective`, `build.check_flags`, `build.check_run_flags`); `build.resolve_model_for_data` reads whether
    the data is grey or RGB: the default model for it, or a chosen model that disagrees refused."""
    from_data = args.learning_rate is None  # no rate yet: the data chooses the model (or the model flags are bad)
    if from_data:
        check_flags(args)
        resolve_model_for_data(args)
    TrainConfig.from_flags(args)
    check_objective(args.loss_type, args.variance_type)
    check_flags(args)
    if not from_data:
        resolve_model_for_data(args)
    check_run_flags(args)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run training; returns the metrics dict (also written to ``<output_dir>/metrics.json``)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    wall_start = time.time()
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    validate_args(args)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.logger == "none" else args.logger,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)))
    on_main_process(accelerator, functools.partial(check_environment, args, accelerator))
    feature_extractor = load_quality_extractor(args, accelerator)  # before training: a failure costs nothing

    # ---- build: model and scheduler (identical initial weights on every rank: seeded before building), data
    model, noise_scheduler = build_model(args)
    loader, eval_set, num_levels = build_data(args, model, accelerator)
    epoch_steps = steps_per_epoch(loader, args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * epoch_steps

    # Only now that the flags, the model and the data are known to be good may the output folder be touched:
    # --overwrite_output_dir deletes the previous run's checkpoints, which a typo in a flag must never cost. And
    # only by this run: its main process holds the folder's lock until the end (a second run is refused).
    with lock_on_main_process(accelerator, args.output_dir):
        resuming = args.resume_from_checkpoint is not None
        on_main_process(accelerator, functools.partial(prepare_output_dir, args.output_dir, args.overwrite_output_dir,
                                                       resuming))
        accelerator.wait_for_everyone()

        # ---- train. Per-rank randomness (dropout, noise, t, label dropout); the data order is the sampler's.
        generator = torch.Generator(device=accelerator.device)
        seed_everything(process_seed(args.seed, accelerator.process_index), generator)
        trainer = Trainer(model, noise_scheduler, TrainConfig.from_flags(args, num_levels=num_levels),
                          max_train_steps=max_train_steps, accelerator=accelerator, generator=generator,
                          output_dir=args.output_dir, eval_set=eval_set, run_flags=script_flags(args, accelerator))
        trainer.resume(args.resume_from_checkpoint, parse_allowed_flags(args.allow_changed_flags))
        run_config = public_training_config(vars(args))
        if trainer.flag_changes:  # what actually ran: the flags of this segment, and what earlier ones changed
            run_config["changed_on_resume"] = trainer.flag_changes
        if accelerator.is_main_process:
            write_json_atomic(os.path.join(args.output_dir, RUN_MARKER_NAME), run_config)
            if args.logger != "none":  # tensorboard's hparams take int/float/str/bool only
                accelerator.init_trackers("train", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                           for k, v in run_config.items()})
        publisher = RunPublisher(trainer, run_config, dataset_name=args.dataset_name,
                                 save_model_epochs=args.save_model_epochs, push_to_hub=args.push_to_hub,
                                 hub_model_id=args.hub_model_id, hub_token=args.hub_token,
                                 hub_private_repo=args.hub_private_repo, hub_strategy=args.hub_strategy)
        trainer.run(loader, on_epoch_end=publisher.on_epoch_end)

        # ---- measure and publish
        metrics = trainer.report(feature_extractor, args.eval_quality_num_images, loader.dataset)  # SWD floor: train
        accelerator.wait_for_everyone()
        push_error = publisher.publish_final(metrics)
        if accelerator.is_main_process:
            metrics["wall_time_s"] = time.time() - wall_start
            if args.push_to_hub:
                metrics["hub_pushes"] = publisher.pushes
            write_json_atomic(os.path.join(args.output_dir, "metrics.json"), metrics)
            logger.info("done: %d steps, final loss %.4f, bits/dim (%s, %d images) %.3f ± %.3f (unclipped %.3f), "
                        "%.0f s", metrics["train_steps"], metrics["final_loss"] or float("nan"), eval_set.split,
                        metrics["bits_per_dim_num_images"], metrics["bits_per_dim"],
                        metrics["bits_per_dim_standard_error"], metrics["bits_per_dim_unclipped"],
                        metrics["wall_time_s"])
        accelerator.end_training()
    if push_error is not None:  # the final upload must not fail quietly; everything local is written by now
        raise publisher.final_push_error(push_error) from push_error
    return metrics


if __name__ == "__main__":
    # One line and an exit code for each failure the user can act on; SIGTERM/SIGINT stop with a checkpoint.
    run_cli(main)
