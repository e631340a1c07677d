#!/usr/bin/env python
"""Progressive distillation of a trained DDPM into a few-step student (Salimans & Ho, ICLR 2022).

    accelerate launch training/distill.py --teacher ddpm-digits --student_steps 4 --teacher_steps 64
    accelerate launch training/distill.py --teacher ddpm-digits ... --resume_from_checkpoint latest

Each round halves the number of deterministic DDIM steps (teacher_steps → … → student_steps); every round's student
is saved as ``<output_dir>/student-N-steps``, a pipeline that plain diffusers samples in N steps. This file is
flags -> ``diffusers_ddpm_ext.distill.run_distillation`` (rounds of ``diffusers_ddpm_ext.trainer.Trainer``: the
checkpoints, resume, output-folder lock, stop signals and progress of training/train.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Optional, Sequence

if __name__ == "__main__":  # a stop in the seconds of imports below: nothing is written yet; one line and exit
    def _stopped_during_start_up(signum, frame):
        sys.stderr.write(f"stopped by {signal.Signals(signum).name} during start-up; nothing was written\n")
        os._exit(128 + signum)
    for _signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(_signum) is not signal.SIG_IGN:
            signal.signal(_signum, _stopped_during_start_up)

from diffusers_ddpm_ext.data import VALIDATION_SPLIT_SEED  # noqa: E402
from diffusers_ddpm_ext.distill import (STUDENT_PREDICTION_TYPES, push_final_student,  # noqa: E402
                                        run_distillation)
from diffusers_ddpm_ext.evaluate import validation_size_type  # noqa: E402
from diffusers_ddpm_ext.processes import run_cli  # noqa: E402
from diffusers_ddpm_ext.trainer import NAN_POLICIES, TrainConfig  # noqa: E402

DEFAULT_OUTPUT_DIR = "ddpm-distilled"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Progressive distillation (Salimans & Ho, ICLR 2022) of a trained DDPM "
                                "into a few-step deterministic sampler.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--teacher", required=True, help="The trained pipeline: a save_pretrained folder or Hub id (ours, or a "
      "UNet2DModel pipeline such as DDPMPipeline); ε, x0 or v prediction; a learned variance's channels are ignored.")
    a("--student_steps", type=int, default=4, help="Sampling steps of the final student.")
    a("--teacher_steps", type=int, default=None, help="DDIM steps of the teacher in the first round: student_steps "
      "times a power of two, at most T. Default: the largest such value (e.g. 512 for 4 steps and T = 1000).")
    a("--steps_per_round", type=int, default=500, help="Optimizer steps of every round.")
    a("--student_prediction_type", default="v_prediction", choices=[*STUDENT_PREDICTION_TYPES, "epsilon"],
      help="What the student predicts (epsilon is refused: it cannot take the last steps).")
    a("--clip_sample", action=argparse.BooleanOptionalAction, default=None, help="Clip x̂ to [-1, 1] in the "
      "teacher's DDIM steps and in the students' schedulers. Default: as the teacher's scheduler does.")
    a("--eval_teacher", action=argparse.BooleanOptionalAction, default=True, help="Also measure the teacher with "
      "DDIM at each student's step count (same network calls).")
    # ---- data (training/train.py's names; the resolution is the teacher's)
    a("--dataset_name", default=None, help="Hub dataset id or local path; neither this nor --train_data_dir = "
      "the built-in digits.")
    a("--train_data_dir", default=None, help="Folder of images.")
    a("--image_column", default=None, help="Image column of --dataset_name.")
    a("--cache_dir", default=None, help="`datasets` / transformers cache folder.")
    a("--center_crop", action="store_true")
    a("--random_flip", action="store_true")
    a("--skip_bad_images", action="store_true")
    a("--dataloader_num_workers", type=int, default=0)
    a("--validation_size", type=validation_size_type, default=None, help="Held-out images (never trained on).")
    a("--validation_split_seed", type=int, default=VALIDATION_SPLIT_SEED)
    # ---- optimisation (training/train.py's names)
    a("--output_dir", default=DEFAULT_OUTPUT_DIR)
    a("--overwrite_output_dir", action="store_true")
    a("--seed", type=int, default=0)
    a("--train_batch_size", type=int, default=32)
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--learning_rate", type=float, default=5e-4)
    a("--lr_scheduler", default="linear", help="diffusers.optimization.get_scheduler name; linear decays to 0 in "
      "every round, as in the paper.")
    a("--lr_warmup_steps", type=int, default=0)
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=0.0)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--use_ema", action=argparse.BooleanOptionalAction, default=True)
    a("--ema_inv_gamma", type=float, default=1.0)
    a("--ema_power", type=float, default=3 / 4)
    a("--ema_max_decay", type=float, default=0.9999)
    a("--mixed_precision", default=None, choices=("no", "fp16", "bf16"))
    a("--nan_policy", default="stop", choices=NAN_POLICIES)
    a("--checkpointing_steps", type=int, default=250)
    a("--checkpoints_total_limit", type=int, default=2)
    a("--resume_from_checkpoint", default=None, choices=("latest",), help="Continue: saved rounds are kept, the "
      "first unsaved one continues from its newest checkpoint.")
    a("--allow_changed_flags", default=None)
    # ---- evaluation
    a("--eval_quality_num_images", type=int, default=256, help="Images per FD measurement (0 skips them).")
    a("--feature_extractor", default="auto", help="As in training/train.py: the digits classifier on the digits.")
    a("--eval_batch_size", type=int, default=64)
    # ---- hub (the final student)
    a("--push_to_hub", action="store_true", help="Export the final student (Hub folder <output_dir>-hub, with "
      "its distillation card) and push it; the token is checked before distilling.")
    a("--hub_model_id", default=None, help="Repo id (default: the --output_dir folder name).")
    a("--hub_token", default=None, help="Hub write token (default: $HF_TOKEN or `hf auth login`).")
    a("--hub_private_repo", action="store_true")
    a("--debug_interrupt_after_step", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(class_column=None, num_class_embeds=None, dataset_config_name=None, eval_num_images=16,
                   save_images_epochs=None, enable_xformers_memory_efficient_attention=False)
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from accelerate import Accelerator

    from diffusers_ddpm_ext.build import check_environment, load_quality_extractor
    from diffusers_ddpm_ext.processes import on_main_process

    args = build_parser().parse_args(argv)
    args.max_grad_norm = args.max_grad_norm or None
    TrainConfig.from_flags(args)  # bad optimisation flags fail here, named
    for name in ("student_steps", "steps_per_round", "train_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision)
    on_main_process(accelerator, lambda: check_environment(args, accelerator))  # e.g. no Hub token: fail now
    extractor = load_quality_extractor(args, accelerator)
    summary = run_distillation(args, accelerator, extractor)
    if accelerator.is_main_process:
        push_final_student(args, summary)
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    run_cli(main)
