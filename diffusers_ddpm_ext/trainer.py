"""The training loop: a :class:`Trainer` that turns batches into optimizer steps of a diffusion model.

    trainer = Trainer(unet, scheduler, TrainConfig(loss_type="hybrid"), max_train_steps=1000)
    for x0 in batches:                      # (B, C, H, W) in [-1, 1], or dicts with "pixel_values"/"class_labels"
        out = trainer.train_step(x0)        # one micro-batch; a StepOutput when an optimizer step completed
    trainer.run(loader)                     # or: the whole loop, with checkpoints, samples and logging

One step (:meth:`Trainer.train_step`) is: draw noise ε and timesteps t (from the timestep sampler, with its
importance weights) and drop class labels to the null class for classifier-free guidance, all from the trainer's
generator; x_t = q(x_t | x_0) by ``add_noise``; :func:`~diffusers_ddpm_ext.losses.diffusion_loss` of the model
output; backward through Accelerate's gradient accumulation; clip; AdamW and LR-schedule step; then the EMA and
the timestep sampler's loss history are updated. A non-finite loss or gradient norm is handled by the NaN policy:
``stop`` saves the last good state as a checkpoint and raises :class:`NonFiniteLossError`, ``skip`` drops the
whole accumulation window (and gives up after :data:`MAX_CONSECUTIVE_SKIPS` in a row).

:meth:`Trainer.run` adds the rest of a run: epochs over a :class:`~diffusers_ddpm_ext.data.ResumableBatchSampler`
loader with an exact data position, a checkpoint every ``checkpointing_steps`` (:meth:`Trainer.resume` restores
one bit for bit), bits/dim every ``eval_every`` steps, a sample grid every ``save_images_epochs`` epochs, a
progress bar and tracker logs, and an ``on_epoch_end`` hook (the training script exports the pipeline there). It
holds the output folder's lock (one writer per folder) and stops on SIGTERM/SIGINT after the optimizer step in
progress, with a checkpoint of it. A resume compares the flags that change the result with those the checkpoint
recorded (:mod:`diffusers_ddpm_ext.runflags`).

Without an ``accelerator`` the trainer runs in this process on the model's device (:class:`LocalAccelerator`):
what a notebook, a benchmark or a side-by-side comparison needs. The training script builds the model, the
scheduler and the data from its flags with :mod:`diffusers_ddpm_ext.build`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import random
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from . import checkpoints, runflags
from .checkpoints import CheckpointError, capture_rng_state, restore_rng_state
from .train_config import NAN_POLICIES, EvalSet, StepOutput, TrainConfig, TrainState, check_objective  # noqa: F401
from .losses import diffusion_loss
from .processes import (LocalAccelerator, RunInterrupted, gather_object, largest_on_any_process,
                        lock_on_main_process, on_main_process, step_consensus, stop_signals)
from .progress import RunClock
from .rundir import CHECKPOINT_PREFIX, fault_point, write_image_atomic
from .timestep_sampler import create_timestep_sampler

logger = logging.getLogger(__name__)

# With --nan_policy skip, this many non-finite optimizer steps in a row stop the run: the model has diverged.
MAX_CONSECUTIVE_SKIPS = 20


class NonFiniteLossError(RuntimeError):
    """Raised when the loss (or the gradient norm) of a training step is NaN or infinite."""


class SimulatedInterrupt(RuntimeError):
    """Raised after ``TrainConfig.debug_interrupt_after_step`` steps (tests of resume)."""


# --------------------------------------------------------------------------------------------------
# Checks and seeds
# --------------------------------------------------------------------------------------------------




def process_seed(seed: int, rank: int = 0) -> int:
    """The seed of one process's noise, timesteps, label dropout and dropout masks (different on every rank)."""
    return seed * 7919 + 1000 + rank


def seed_everything(seed: int, *generators: torch.Generator) -> None:
    """Seed python, numpy, torch (all devices) and the given generators with ``seed``."""
    seed = int(seed) % (2**32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    for generator in generators:
        generator.manual_seed(seed)


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


def ema_checksum(ema) -> Optional[str]:
    """SHA-256 of an EMAModel's shadow weights (None without EMA)."""
    if ema is None:
        return None
    digest = hashlib.sha256()
    for tensor in ema.shadow_params:
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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


def _let_signal_handlers_run(param: torch.Tensor) -> None:
    """A post-accumulate-grad hook that does nothing: the interpreter runs a pending signal handler on entering
    it, so a stop signal can interrupt a long backward pass between two parameters."""


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Put ``model`` in eval mode inside the block and restore its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def steps_per_epoch(loader, gradient_accumulation_steps: int = 1) -> int:
    """Optimizer steps in one pass over ``loader`` (a last, incomplete accumulation window is not trained on)."""
    sampler = getattr(loader, "batch_sampler", None)
    steps = (getattr(sampler, "batches_per_epoch", None) or len(loader)) // gradient_accumulation_steps
    if steps == 0:
        raise ValueError(f"{len(loader.dataset)} training images are fewer than one optimizer step needs (batch "
                         f"{sampler.batch_size} × {getattr(sampler, 'num_replicas', 1)} processes × "
                         f"{gradient_accumulation_steps} accumulation steps)")
    return steps


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------




class Trainer:
    """Trains a diffusion UNet with a noise scheduler; see the module docstring for one step and one run.

    Args:
        model: a ``DDPMUNet2DModel`` or diffusers ``UNet2DModel`` (output C or 2C channels for the scheduler's
            variance type), on the device to train on.
        noise_scheduler: the scheduler that defines q(x_t | x_0) and the loss (a ``GaussianDiffusionScheduler``;
            any scheduler with ``add_noise`` together with a ``loss_fn``).
        config: a :class:`TrainConfig` (default: its defaults).
        max_train_steps: optimizer steps of the run (the LR schedule's length).
        accelerator: an ``accelerate.Accelerator`` (multi-process, mixed precision, trackers); None = this
            process alone (:class:`LocalAccelerator`). Its ``gradient_accumulation_steps`` must be the config's.
        generator: the generator of noise, timesteps and label dropout (default: seeded with
            :func:`process_seed` of ``config.seed`` and the process index). Pass one to share a stream.
        output_dir: where checkpoints and sample grids go (None = nowhere; the NaN guard then saves nothing).
        eval_set: images for :meth:`evaluate_bpd` and ``eval_every``.
        loss_fn: replaces :func:`diffusion_loss`: ``loss_fn(model_output, x0, noise, timesteps, noisy)`` returning
            an object with ``loss`` (its mean is minimised: (B,) per example, or already reduced),
            ``unweighted_loss`` ((B,), fed to the timestep sampler) and optionally ``mse`` ((B,)), e.g. diffusers'
            plain ε-MSE for a ``DDPMScheduler``.
        run_flags: values of result-changing flags the trainer cannot see (the training script passes
            :func:`~diffusers_ddpm_ext.runflags.script_flags`: batch size, data, precision). Recorded with the
            config's and the scheduler's in every checkpoint; :meth:`resume` compares them.
    """

    def __init__(self, model, noise_scheduler, config: Optional[TrainConfig] = None, *, max_train_steps: int,
                 accelerator=None, generator: Optional[torch.Generator] = None, output_dir: Optional[str] = None,
                 eval_set: Optional[EvalSet] = None, loss_fn: Optional[Callable] = None,
                 run_flags: Optional[Dict[str, Any]] = None):
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        self.config = config = config if config is not None else TrainConfig()
        if accelerator is None:
            accelerator = LocalAccelerator(config.gradient_accumulation_steps, next(model.parameters()).device)
        if accelerator.gradient_accumulation_steps != config.gradient_accumulation_steps:
            raise ValueError(f"the accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches, "
                             f"the config {config.gradient_accumulation_steps}")
        if loss_fn is None:
            check_objective(config.loss_type, noise_scheduler.config.variance_type)
        if not isinstance(max_train_steps, int) or max_train_steps < 1:
            raise ValueError(f"max_train_steps must be a positive int, got {max_train_steps!r}")
        self.accelerator, self.noise_scheduler, self.max_train_steps = accelerator, noise_scheduler, max_train_steps
        self.output_dir, self.eval_set, self.loss_fn = output_dir, eval_set, loss_fn
        self.num_class_embeds = model.config.get("num_class_embeds")  # labels in 0..K-1, K = the null class
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                      betas=(config.adam_beta1, config.adam_beta2),
                                      weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
        # Stepped by us once per optimizer step (not through accelerate, which steps it once per process).
        self.lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                          num_training_steps=max_train_steps)
        self.ema = None
        if config.use_ema:
            self.ema = EMAModel(model.parameters(), decay=config.ema_max_decay, use_ema_warmup=True,
                                inv_gamma=config.ema_inv_gamma, power=config.ema_power, model_cls=type(model),
                                model_config=model.config)
        self.timestep_sampler = create_timestep_sampler(config.timestep_sampler,
                                                        int(noise_scheduler.config.num_train_timesteps))
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.unwrapped = accelerator.unwrap_model(self.model)
        if self.ema is not None:
            self.ema.to(accelerator.device)
        if generator is None:
            generator = torch.Generator(device=accelerator.device)
            generator.manual_seed(process_seed(config.seed, accelerator.process_index))
        self.generator = generator
        self.state = TrainState()
        self.micro_batches_per_epoch: Optional[int] = None  # set by run(); normalises the saved data position
        self.global_batch_size: Optional[int] = None  # set by run(): images per optimizer step, all processes
        # The accumulation window being trained: (timesteps, unweighted losses) per micro-batch and their mean
        # losses; None once a non-finite value dropped it.
        self._window: Optional[list] = []
        self._window_loss: List[float] = []
        self._window_mse: List[float] = []
        self._consecutive_skips = 0
        self._nan_injected = False
        self._segment_start = time.time()
        self._snapshot = self._take_snapshot()
        self.run_flags = dict(run_flags or {})
        # Flags changed on resume with --allow_changed_flags, as "name old -> new from step N" (all segments).
        self.flag_changes: List[str] = []
        self._stop = None  # the StopSignals of run(); _stop_agreed: the signal every process agreed to stop on
        self._stop_agreed = 0

    # ---- one step

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def _unpack(self, batch):
        """(x0 (B, C, H, W) in [-1, 1], class labels (B,) or None) from a tensor or a data-module batch dict."""
        if isinstance(batch, torch.Tensor):
            x0, labels = batch, None
        else:
            x0, labels = batch["pixel_values"], batch.get("class_labels")
        x0 = x0.to(self.device)
        if self.num_class_embeds is None:
            return x0, None
        if labels is None:
            raise ValueError("the model is class-conditional but the batch has no class_labels")
        return x0, labels.to(self.device).long()

    def train_step(self, batch) -> Optional[StepOutput]:
        """Train on one micro-batch.

        Args:
            batch: a (B, C, H, W) tensor in [-1, 1], or a dict with ``pixel_values`` (and ``class_labels`` for a
                class-conditional model), as :mod:`diffusers_ddpm_ext.data` yields.

        Returns:
            A :class:`StepOutput` when this micro-batch completed an optimizer step (or the step was skipped),
            None inside an accumulation window.

        Raises:
            NonFiniteLossError: a non-finite loss or gradient with ``nan_policy="stop"`` (after saving the last good
                state when there is an ``output_dir``), or too many skipped steps in a row.
        """
        acc, config, generator = self.accelerator, self.config, self.generator
        grad_norm = None
        with acc.accumulate(self.model):
            # Until the optimizer step the weights, optimizer, EMA and sampler are those of the last step boundary:
            # a one-process run abandons this part at once on a stop signal (see _interruptible).
            with self._interruptible():
                x0, labels = self._unpack(batch)
                noise = torch.randn(x0.shape, generator=generator, device=self.device)
                timesteps, weights = self.timestep_sampler.sample(x0.shape[0], self.device, generator=generator)
                if labels is not None and config.class_dropout_prob > 0:  # the null class (index K) for CFG
                    drop = torch.rand(x0.shape[0], generator=generator, device=self.device) < config.class_dropout_prob
                    labels = torch.where(drop, torch.full_like(labels, self.num_class_embeds), labels)
                noisy = self.noise_scheduler.add_noise(x0, noise, timesteps)
                with acc.autocast():
                    extra = {} if labels is None else {"class_labels": labels}
                    model_output = self.model(noisy, timesteps, **extra).sample  # (B, C or 2C, H, W)
                out = self._loss(model_output.float(), x0, noise, timesteps, noisy, weights)
                loss = out.loss.mean()
                if config.debug_nan_at_step == self.state.global_step + 1 and not self._nan_injected:
                    loss, self._nan_injected = loss * float("nan"), True  # once: a skipped step retries with new data
                finite, mean_loss, stop = step_consensus(acc, loss, self._stop_signum())
                self._stop_agreed = max(self._stop_agreed, stop)
                if not finite:
                    self._non_finite(f"non-finite loss ({loss.item()}) at optimizer step {self.state.global_step + 1} "
                                     f"(epoch {self.state.epoch})",
                                     "Lower --learning_rate, set --max_grad_norm, or pass --nan_policy skip.")
                else:
                    acc.backward(loss)
                    fault_point("step")  # crash tests: a kill between backward and the optimizer step
                    if self._window is not None:
                        self._window.append((timesteps, out.unweighted_loss.detach()))
                        self._window_loss.append(mean_loss)
                        if getattr(out, "mse", None) is not None:
                            self._window_mse.append(float(out.mse.detach().mean()))
            if acc.sync_gradients and self._window is not None:
                grad_norm = acc.clip_grad_norm_(self.model.parameters(), config.max_grad_norm or float("inf"))
                if not math.isfinite(float(grad_norm)) and acc.scaler is None:
                    self._non_finite(f"non-finite gradient norm at optimizer step {self.state.global_step + 1}",
                                     "Lower --learning_rate or set --max_grad_norm.")
            if acc.sync_gradients:
                if self._window is not None:
                    self.optimizer.step()
                    if getattr(self.optimizer, "step_was_skipped", False):
                        # fp16: the GradScaler found inf/NaN gradients, left the weights and lowered its scale. A
                        # skipped step whatever the NaN policy (no LR, EMA or sampler step; 20 in a row give up).
                        self._window = None
                    else:
                        self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.state.batch_in_epoch += 1
        if not acc.sync_gradients:
            return None
        return self._end_step(grad_norm)

    def _loss(self, model_output, x0, noise, timesteps, noisy, weights):
        if self.loss_fn is not None:
            return self.loss_fn(model_output, x0, noise, timesteps, noisy)
        config = self.config
        return diffusion_loss(model_output, x0, noise, timesteps, self.noise_scheduler, loss_type=config.loss_type,
                              snr_gamma=config.snr_gamma, num_levels=config.num_levels, weights=weights,
                              noisy_samples=noisy)

    def _non_finite(self, what: str, advice: str) -> None:
        """The NaN policy: stop with the last good state saved, or drop the accumulation window."""
        if self.config.nan_policy == "skip":
            self._window = None
        else:
            self._give_up(what, advice)

    def _give_up(self, what: str, advice: str) -> None:
        if self.output_dir is None:
            raise NonFiniteLossError(f"{what}; no checkpoint was saved (no output_dir). {advice}")
        self.save_checkpoint()  # the snapshot of the last step boundary: the last good state
        raise NonFiniteLossError(f"{what}; the last good state is {CHECKPOINT_PREFIX}{self._snapshot['global_step']} "
                                 f"in {self.output_dir}. {advice} (--resume_from_checkpoint latest continues from it; "
                                 f"name changed flags in --allow_changed_flags.)")

    def _end_step(self, grad_norm) -> StepOutput:
        """Book-keeping after the last micro-batch of an optimizer step (done or skipped)."""
        state, window, losses, mses = self.state, self._window, self._window_loss, self._window_mse
        self._window, self._window_loss, self._window_mse = [], [], []
        if window is None:  # dropped by nan_policy="skip": the weights did not change
            state.skipped_steps += 1
            self._consecutive_skips += 1
            logger.warning("skipped a step with a non-finite loss/gradient before step %d (%d skipped so far)",
                           state.global_step + 1, state.skipped_steps)
            self._snapshot = self._take_snapshot()
            if self._consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                self._give_up(f"{MAX_CONSECUTIVE_SKIPS} consecutive non-finite steps before optimizer step "
                              f"{state.global_step + 1}; giving up", "Lower --learning_rate or set --max_grad_norm.")
            return StepOutput(step=state.global_step, loss=float("nan"), skipped=True)
        self._consecutive_skips = 0
        self.timestep_sampler.update(torch.cat([t for t, _ in window]), torch.cat([l for _, l in window]))
        if self.ema is not None:
            self.ema.step(self.unwrapped.parameters())
        state.global_step += 1
        step_loss = sum(losses) / len(losses)
        state.loss_steps.append(state.global_step)
        state.losses.append(step_loss)
        now = time.time()
        state.train_time_s += now - self._segment_start
        self._segment_start = now
        self._snapshot = self._take_snapshot()
        logs = {"loss": step_loss, "lr": self.lr_scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}
        if self.ema is not None:
            logs["ema_decay"] = self.ema.cur_decay_value
        mse = sum(mses) / len(mses) if mses else None
        return StepOutput(step=state.global_step, loss=step_loss, mse=mse, logs=logs)

    # ---- the run

    def run(self, loader, on_epoch_end: Optional[Callable[["Trainer", int], None]] = None,
            progress: bool = True, handle_signals: bool = True) -> TrainState:
        """Train to ``max_train_steps`` over ``loader``, epoch after epoch, from where :attr:`state` stands.

        With an ``output_dir`` the main process holds the folder's lock (:func:`~diffusers_ddpm_ext.rundir.
        lock_output_dir`) for the whole run: a second run on the same folder is refused.

        Args:
            loader: a DataLoader; with a :class:`~diffusers_ddpm_ext.data.ResumableBatchSampler` as its batch
                sampler (``data.make_dataloader``) the data order and position are restored exactly on resume.
            on_epoch_end: called as ``on_epoch_end(trainer, epoch)`` after every complete epoch but the last.
            progress: show a progress bar (main process).
            handle_signals: SIGTERM/SIGINT (Ctrl-C) stop the run with a checkpoint of the last completed optimizer
                step (with an ``output_dir``) and raise :class:`~diffusers_ddpm_ext.processes.RunInterrupted`: a
                one-process run abandons the step in progress, its evaluation, sample grid or ``on_epoch_end`` at
                once; several processes finish the step together first. A second Ctrl-C stops at once.

        Returns:
            The final :class:`TrainState`. A checkpoint of the last step is written if ``checkpointing_steps``.

        Raises:
            RunInterrupted: stopped by a signal (after the checkpoint of the last completed step).
        """
        with contextlib.ExitStack() as stack:
            if self.output_dir is not None:  # one writer per output folder (the script's lock is re-entered)
                stack.enter_context(lock_on_main_process(self.accelerator, self.output_dir))
            self._stop = stack.enter_context(stop_signals(self.output_dir, defer=True)) if handle_signals else None
            if self._stop is not None and self.accelerator.num_processes == 1:
                # The backward pass is one C++ call: without Python code in it, a signal handler would wait for
                # its end. A no-op hook per parameter lets a stop request abandon it (see _interruptible).
                for param in self.unwrapped.parameters():
                    if param.requires_grad:
                        stack.callback(param.register_post_accumulate_grad_hook(_let_signal_handlers_run).remove)
            self._stop_agreed = 0
            try:
                return self._run(loader, on_epoch_end, progress)
            finally:
                self._stop = None

    def _run(self, loader, on_epoch_end, progress: bool) -> TrainState:
        from tqdm.auto import tqdm

        acc, config, state = self.accelerator, self.config, self.state
        batch_sampler = getattr(loader, "batch_sampler", None)
        per_epoch = steps_per_epoch(loader, config.gradient_accumulation_steps)
        self.micro_batches_per_epoch = per_epoch * config.gradient_accumulation_steps
        batch_size = getattr(batch_sampler, "batch_size", None) or getattr(loader, "batch_size", None)
        if batch_size is not None:
            self.global_batch_size = batch_size * acc.num_processes * config.gradient_accumulation_steps
        num_epochs = math.ceil(self.max_train_steps / per_epoch)
        self._snapshot = self._take_snapshot()
        first_epoch, first_batch = self._snapshot["epoch"], self._snapshot["batch_in_epoch"]
        bar = tqdm(total=self.max_train_steps, initial=state.global_step, desc="steps", dynamic_ncols=True,
                   disable=not (progress and acc.is_local_main_process))
        self.model.train()
        self._segment_start = time.time()
        clock = RunClock(self.max_train_steps, state.global_step, acc.is_main_process).log_start(self, per_epoch)
        done = state.global_step >= self.max_train_steps
        try:
            for epoch in range(first_epoch, num_epochs):
                if done:
                    break
                state.epoch, state.batch_in_epoch = epoch, first_batch if epoch == first_epoch else 0
                if hasattr(batch_sampler, "skip"):
                    batch_sampler.set_epoch(epoch)
                    batch_sampler.skip(state.batch_in_epoch)
                with torch.random.fork_rng(devices=[]):  # creating a DataLoader iterator draws from the global RNG
                    batches = iter(loader)
                for batch in batches:
                    if state.batch_in_epoch >= self.micro_batches_per_epoch:
                        break
                    out = self.train_step(batch)
                    if out is None:
                        continue
                    if not out.skipped:
                        bar.update(1)
                        bar.set_postfix(loss=f"{out.loss:.4f}", lr=f"{out.logs['lr']:.2e}")
                        self._after_step(out)
                        clock.log_estimate(state.global_step)
                    if self._should_stop():
                        self._stop_now()
                    if out.skipped:
                        continue
                    self._periodic_evaluation()
                    if state.global_step >= self.max_train_steps:
                        done = True
                        break
                if state.batch_in_epoch >= self.micro_batches_per_epoch and not done:
                    self._after_epoch(epoch, on_epoch_end)
        finally:
            bar.close()
        if self.output_dir is not None and config.checkpointing_steps and not os.path.isdir(
                os.path.join(self.output_dir, f"{CHECKPOINT_PREFIX}{state.global_step}")):
            self.save_checkpoint()
        if self._stop is not None:  # a request during the last step
            signum = largest_on_any_process(acc, self._stop_signum())
            if signum:
                self._stop_now(signum)
        return state

    def _after_step(self, out: StepOutput) -> None:
        """Book-keeping after an optimizer step: logs and the periodic checkpoint."""
        acc, config, step = self.accelerator, self.config, self.state.global_step
        acc.log(out.logs, step=step)
        if self.output_dir is not None and config.checkpointing_steps and step % config.checkpointing_steps == 0:
            self.save_checkpoint()
        if config.debug_interrupt_after_step == step:
            raise SimulatedInterrupt(f"stopped after step {step} (--debug_interrupt_after_step)")

    def _periodic_evaluation(self) -> None:
        """Bits/dim every ``eval_every`` steps (main process)."""
        acc, config, step = self.accelerator, self.config, self.state.global_step
        if config.eval_every and step % config.eval_every == 0 and acc.is_main_process and self.eval_set is not None:
            with self._interruptible():
                acc.log({"bits_per_dim": self.evaluate_bpd().mean}, step=step)

    def _after_epoch(self, epoch: int, on_epoch_end) -> None:
        """Periodic work after a complete epoch: a sample grid, then the caller's hook."""
        every = self.config.save_images_epochs
        with self._interruptible():
            if every and (epoch + 1) % every == 0 and self.accelerator.is_main_process and self.output_dir is not None:
                path = os.path.join(self.output_dir, "samples", f"epoch_{epoch + 1:04d}.png")
                write_image_atomic(path, self.sample_grid())
            if on_epoch_end is not None:
                on_epoch_end(self, epoch)

    # ---- stopping on a signal

    def _stop_signum(self) -> int:
        """The signal that asked this process to stop, 0 for none."""
        return int(self._stop.signum or 0) if self._stop is not None else 0

    def _should_stop(self) -> bool:
        """A stop was requested: on this process (one process), or on any process (agreed in ``train_step``)."""
        if self.accelerator.num_processes == 1:
            return bool(self._stop_signum())
        return bool(self._stop_agreed)

    @contextlib.contextmanager
    def _interruptible(self):
        """Work a one-process run abandons at once on a signal, to stop with the checkpoint of the last step
        boundary: the forward and backward passes (the weights, optimizer, EMA, sampler and RNG snapshot are
        untouched until the optimizer step; the partial gradients are dropped) and the periodic evaluation and
        sample grid (they write only atomic files). So the checkpoint is written within a launcher's grace period
        (accelerate 1.16 sends SIGKILL 5 s after its SIGTERM) however long a step takes. With several processes
        the others wait in a collective call, so the request waits for the next step boundary."""
        if self._should_stop():  # a request that came after the last step's check
            self._stop_now()
        if self._stop is None or self.accelerator.num_processes > 1:
            yield
            return
        try:
            with stop_signals(defer=False):
                yield
        except RunInterrupted as exc:
            self.optimizer.zero_grad(set_to_none=True)
            self._window, self._window_loss, self._window_mse = [], [], []
            self._stop_now(exc.signum)

    def _stop_now(self, signum: Optional[int] = None) -> None:
        """Write the checkpoint of the last completed step (with an output_dir) and raise RunInterrupted."""
        signum = signum or self._stop_agreed or self._stop_signum() or signal.SIGTERM
        step = self._snapshot["global_step"]
        if self.output_dir is None:
            where = "no checkpoint was written (the trainer has no output_dir)"
        else:
            self.save_checkpoint()
            where = (f"saved {CHECKPOINT_PREFIX}{step} in {self.output_dir}; continue with "
                     f"--resume_from_checkpoint latest")
        exc = RunInterrupted(f"stopped by {signal.Signals(signum).name} after step {step}: {where}", signum)
        exc.reported_by_main = not self.accelerator.is_main_process  # every process stops after the same step
        raise exc

    # ---- checkpoints

    def _take_snapshot(self) -> Dict[str, Any]:
        """The state at this step boundary, what a checkpoint written now (or after a NaN) must hold."""
        state = self.state
        epoch, batch = state.epoch, state.batch_in_epoch
        if self.micro_batches_per_epoch is not None and batch >= self.micro_batches_per_epoch:
            epoch, batch = epoch + 1, 0
        # Loss lists only grow: remember their length instead of copying them every step.
        return {"global_step": state.global_step, "epoch": epoch, "batch_in_epoch": batch,
                "skipped_steps": state.skipped_steps, "train_time_s": state.train_time_s,
                "num_losses": len(state.losses), "rng": capture_rng_state({"noise": self.generator})}

    def save_checkpoint(self) -> None:
        """Write ``<output_dir>/checkpoint-<step>`` of the last step boundary (every process calls this).

        Every process contributes its RNG state; the main process writes and rotates old checkpoints.
        """
        snapshot, acc = self._snapshot, self.accelerator
        if self.output_dir is None:
            raise ValueError("save_checkpoint needs the trainer's output_dir")
        bad = checkpoints.first_non_finite(self.unwrapped.state_dict())
        if bad is not None:  # an update overflowed with a finite loss and gradient: no good state in memory
            found = checkpoints.list_checkpoints(self.output_dir)
            last = (f"the last good state is {os.path.basename(found[-1])} in {self.output_dir} (--resume_from_"
                    f"checkpoint latest continues from it)" if found else "no checkpoint was written")
            raise NonFiniteLossError(f"the weights hold NaN or infinite values ({bad}) after optimizer step "
                                     f"{snapshot['global_step']}, so they are not saved; {last}. Lower "
                                     f"--learning_rate or set --max_grad_norm.")
        rng_states = gather_object(acc, snapshot["rng"])
        existing = os.path.join(self.output_dir, f"{CHECKPOINT_PREFIX}{snapshot['global_step']}")
        if acc.is_main_process and existing in checkpoints.list_checkpoints(self.output_dir):
            logger.info("%s already holds this state", existing)  # e.g. the NaN guard right after a save
        elif acc.is_main_process:
            n = snapshot["num_losses"]
            training_state = {k: snapshot[k] for k in ("global_step", "epoch", "batch_in_epoch", "skipped_steps",
                                                        "train_time_s")}
            training_state.update(loss_steps=self.state.loss_steps[:n], losses=self.state.losses[:n],
                                  flags=self.recorded_flags(), flag_changes=self.flag_changes)
            path = checkpoints.save_checkpoint(
                self.output_dir, snapshot["global_step"], model=self.unwrapped, ema=self.ema,
                optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, scaler=acc.scaler,
                sampler_state=self.timestep_sampler.state_dict(), training_state=training_state,
                rng_states=rng_states)
            checkpoints.rotate_checkpoints(self.output_dir, self.config.checkpoints_total_limit)
            logger.info("saved %s", path)
        acc.wait_for_everyone()

    def resume(self, checkpoint: Optional[str], allow_changed_flags: Sequence[str] = ()) -> Optional[str]:
        """Restore weights, EMA, optimizer, LR schedule, timestep sampler, RNG states and position.

        The flags that change the result (:meth:`recorded_flags`) are compared with those the checkpoint
        recorded first (:func:`~diffusers_ddpm_ext.runflags.compare_flags`): a difference is refused unless the
        flag is in ``allow_changed_flags``; an allowed new value then takes effect from this step on (learning
        rate, schedule, AdamW and EMA hyperparameters are set into the restored optimizer, schedule and EMA; a
        changed timestep sampler starts with an empty history) and is recorded in :attr:`flag_changes`.

        Args:
            checkpoint: ``"latest"`` (the newest intact checkpoint in ``output_dir``; None when there is none
                yet, so a first run starts fresh), a checkpoint folder, or None (nothing to do).
            allow_changed_flags: flag names (:data:`~diffusers_ddpm_ext.runflags.CHANGEABLE_ON_RESUME`) whose
                change is intended.

        Returns:
            The folder resumed from, or None.

        Raises:
            CheckpointError: missing, altered, from another architecture or another number of processes.
            ValueError: a result-changing flag differs from the checkpoint's and is not allowed to.
        """
        if checkpoint is None:
            return None
        acc = self.accelerator
        # The main process picks (and hashes) the checkpoint and moves altered newer ones aside; every process then
        # loads the same one.
        path = on_main_process(
            acc, lambda: checkpoints.resolve_resume_path(checkpoint, self.output_dir, quarantine=True))
        if path is None:
            logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting a new run",
                        self.output_dir)
            return None
        # `latest` has just checked every SHA-256; an explicitly named checkpoint is checked here.
        data = checkpoints.load_checkpoint(path, check_hashes=checkpoint != "latest")
        checkpoints.check_checkpoint_matches(data, self.unwrapped)
        changes = on_main_process(acc, lambda: self._compare_flags(data, allow_changed_flags))
        changed = {name for name, _, _ in changes}
        self.unwrapped.load_state_dict(data.model_state, strict=True)
        self.optimizer.load_state_dict(data.optimizer_state)
        self.lr_scheduler.load_state_dict(data.lr_scheduler_state)
        if data.scaler_state is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(data.scaler_state)
        if self.ema is not None:
            checkpoints.load_ema_state(self.ema, self.unwrapped, data)
        if "timestep_sampler" in changed:
            logger.info("--timestep_sampler %s starts with an empty loss history", self.config.timestep_sampler)
        else:
            try:
                self.timestep_sampler.load_state_dict(data.sampler_state)
            except ValueError as exc:
                raise CheckpointError(f"{path}: its timestep-sampler state does not fit --timestep_sampler "
                                      f"{self.config.timestep_sampler} ({exc})") from exc
        if len(data.rng_states) != acc.num_processes:
            raise CheckpointError(f"{path} was written by {len(data.rng_states)} processes, this run has "
                                  f"{acc.num_processes}: exact resume needs the same number of processes")
        restore_rng_state(data.rng_states[acc.process_index], {"noise": self.generator})
        defaults = TrainState()
        self.state = TrainState(**{f.name: data.training_state.get(f.name, getattr(defaults, f.name))
                                   for f in dataclasses.fields(TrainState)})
        self._apply_changed_flags(changed)
        self.flag_changes = list(data.training_state.get("flag_changes", [])) + runflags.describe_changes(
            changes, self.state.global_step)
        self._snapshot = self._take_snapshot()
        logger.info("resumed from %s at step %d (epoch %d, batch %d)%s", path, self.state.global_step,
                    self.state.epoch, self.state.batch_in_epoch,
                    "".join(f"; --{n} {o!r} -> {v!r}" for n, o, v in changes))
        return path

    def recorded_flags(self) -> Dict[str, Any]:
        """The result-changing flags of this run, by flag name, as every checkpoint records them: the config's,
        the scheduler's (``ddpm_num_steps``, ``ddpm_beta_schedule``, ``prediction_type``, ``variance_type``, and
        ``ddpm_max_beta`` as the largest β it runs),
        ``max_train_steps`` and the ``run_flags`` given."""
        sched = self.noise_scheduler.config
        flags = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)
                 if f.name in runflags.COMPARED_FLAGS}
        flags.update(max_train_steps=self.max_train_steps, ddpm_num_steps=sched.get("num_train_timesteps"),
                     ddpm_beta_schedule=sched.get("beta_schedule"), prediction_type=sched.get("prediction_type"),
                     variance_type=sched.get("variance_type"),
                     ddpm_max_beta=runflags.largest_beta(self.noise_scheduler.betas))
        flags.update(self.run_flags)
        return flags

    def _compare_flags(self, data, allowed: Sequence[str]) -> list:
        recorded, source = data.training_state.get("flags"), data.path
        if recorded is None:  # written before checkpoints recorded their flags: the run's training_args.json
            recorded = runflags.flags_from_training_args(runflags.recorded_flags_path(data.path))
            source = f"{data.path} (flags of its training_args.json)"
        if recorded is None:
            logger.warning("%s records no flags (an older checkpoint without training_args.json): resuming without "
                           "comparing them", data.path)
            return []
        return runflags.compare_flags(runflags.with_legacy_flags(recorded), self.recorded_flags(), allowed, source)

    def _apply_changed_flags(self, changed: set) -> None:
        """Put allowed new hyperparameters into the optimizer, LR schedule and EMA just restored (which carry the
        checkpoint's); the schedule's shape (type, warm-up, length) is already this run's."""
        config = self.config
        if changed & {"learning_rate", "lr_scheduler", "lr_warmup_steps", "max_train_steps", "adam_beta1",
                      "adam_beta2", "adam_weight_decay", "adam_epsilon"}:
            groups, schedule = self.optimizer.param_groups, self.lr_scheduler
            for group in groups:
                group.update(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                             weight_decay=config.adam_weight_decay, initial_lr=config.learning_rate)
            schedule.base_lrs = [config.learning_rate] * len(groups)
            for group, base, factor in zip(groups, schedule.base_lrs, schedule.lr_lambdas):
                group["lr"] = base * factor(schedule.last_epoch)
            schedule._last_lr = [group["lr"] for group in groups]
        if self.ema is not None and changed & {"ema_inv_gamma", "ema_power", "ema_max_decay"}:
            self.ema.inv_gamma, self.ema.power, self.ema.decay = config.ema_inv_gamma, config.ema_power, \
                config.ema_max_decay

    # ---- sampling and evaluation (EMA weights)

    def ema_weights(self):
        """Context manager: the model holds its EMA weights inside (see :func:`ema_weights`)."""
        return ema_weights(self.ema, self.unwrapped)

    def pipeline(self):
        """A :class:`~diffusers_ddpm_ext.pipelines.GaussianDiffusionPipeline` (class-conditional models:
        ``ClassConditionalDDPMPipeline``, its subclass) around the model and a fresh scheduler: it samples with
        every diffusers scheduler, so the exported pipeline does too."""
        from .pipelines import ClassConditionalDDPMPipeline, GaussianDiffusionPipeline

        cls = GaussianDiffusionPipeline if self.num_class_embeds is None else ClassConditionalDDPMPipeline
        scheduler = type(self.noise_scheduler).from_config(self.noise_scheduler.config)
        pipe = cls(unet=self.unwrapped, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @property
    def guidance_scale(self) -> float:
        if self.config.guidance_scale is not None:
            return self.config.guidance_scale
        return 2.0 if self.config.class_dropout_prob > 0 else 1.0

    def sample_images(self, num_images: Optional[int] = None) -> np.ndarray:
        """EMA-weight samples, (N, H, W, C) in [0, 1]; a fixed seed, the global RNG left untouched.

        Class-conditional models cycle through the classes; ``num_images`` defaults to ``eval_batch_size``.
        """
        config = self.config
        num_images = num_images or config.eval_batch_size
        fault_point("sample")
        with torch.random.fork_rng(devices=[]), self.ema_weights(), eval_mode(self.unwrapped):
            pipe = self.pipeline()
            kwargs = dict(num_inference_steps=config.ddpm_num_inference_steps, output_type="np",
                          generator=torch.Generator(device="cpu").manual_seed(config.seed))
            if self.num_class_embeds is None:
                return pipe(batch_size=num_images, **kwargs).images
            labels = [i % self.num_class_embeds for i in range(num_images)]
            return pipe(class_labels=labels, guidance_scale=self.guidance_scale, **kwargs).images

    def sample_grid(self):
        """:meth:`sample_images` as a PIL grid (one row per class cycle when it fits)."""
        from .viz import make_image_grid

        images = self.sample_images()
        classes = self.num_class_embeds
        nrow = classes if classes is not None and len(images) % classes == 0 else None
        return make_image_grid(images, nrow=nrow, min_tile=64)

    def evaluate_bpd(self, clip_denoised: Optional[bool] = None):
        """Bits/dim of :attr:`eval_set` with the EMA weights (``likelihood.estimate_bits_per_dim``).

        Args:
            clip_denoised: None (default) = the bound of the reverse process the model samples with (x̂_0 clipped
                or thresholded exactly when the scheduler's sampler does); False = the unclipped bound. The same
                seed draws the same timesteps and noise either way, so the two are a paired comparison.
        """
        from .likelihood import estimate_bits_per_dim

        if self.eval_set is None:
            raise ValueError("evaluate_bpd needs the trainer's eval_set")
        labels = self.eval_set.class_labels if self.num_class_embeds is not None else None
        with torch.random.fork_rng(devices=[]), self.ema_weights(), eval_mode(self.unwrapped):
            return estimate_bits_per_dim(
                self.unwrapped, self.noise_scheduler, self.eval_set.images.to(self.device),
                num_timesteps_sampled=self.config.eval_bpd_steps, num_levels=self.config.num_levels,
                class_labels=None if labels is None else labels.to(self.device), batch_size=256,
                generator=torch.Generator(device=self.device).manual_seed(self.config.seed),
                progress=self.accelerator.is_local_main_process, clip_denoised=clip_denoised)

    @property
    def clip_denoised(self) -> bool:
        """The bound of the model as it samples (:func:`~diffusers_ddpm_ext.likelihood.sampler_clips_x0`)."""
        from .likelihood import sampler_clips_x0

        return sampler_clips_x0(self.noise_scheduler)

    def evaluate_sample_quality(self, feature_extractor, num_images: int, train_data=None) -> Dict[str, Any]:
        """SWD, and FD/KID/precision/recall in the features of ``feature_extractor`` (none for an
        ``evaluate.FeaturesUnavailable``), of ``num_images`` EMA samples at ``ddpm_num_inference_steps`` against the
        held-out split (:attr:`EvalSet.reference`; :func:`~diffusers_ddpm_ext.evaluate.sample_quality_at_steps`,
        seeded by the config); N images of ``train_data`` (the training split) give SWD's real-data floor.

        Returns:
            ``{"sample_quality": [entry], "feature_extractor": {...}}``; the entry names its split, N generated,
            N reference and each figure's method.
        """
        from .data import dataset_to_tensors
        from .evaluate import extractor_info, sample_quality_at_steps

        if self.eval_set is None or self.eval_set.reference is None:
            raise ValueError("evaluate_sample_quality needs an eval_set with the held-out split as its reference")
        reference, _ = dataset_to_tensors(self.eval_set.reference)  # (M, C, H, W) in [-1, 1]
        num_classes = getattr(self.eval_set.reference, "num_classes", None) or self.num_class_embeds
        with torch.random.fork_rng(devices=[]), self.ema_weights(), eval_mode(self.unwrapped):
            entries = sample_quality_at_steps(
                self.pipeline(), reference, [self.config.ddpm_num_inference_steps], num_images, feature_extractor,
                split=self.eval_set.split, sample_batch_size=self.config.eval_batch_size, seed=self.config.seed,
                num_classes=num_classes if self.num_class_embeds is not None else None, train_images=train_data,
                guidance_scale=self.guidance_scale, progress=self.accelerator.is_local_main_process)
        return {"sample_quality": entries, "feature_extractor": extractor_info(feature_extractor)}

    def report(self, feature_extractor=None, quality_num_images: int = 0, train_data=None) -> Dict[str, Any]:
        """Check every process ended with the same weights, then measure the run (main process; {} elsewhere).

        Prints one ``[rank r] weight checksum ... ema ...`` line per process, raises if they differ, and on the
        main process estimates bits/dim under both bounds (``bits_per_dim``: the reverse process the model samples
        with, clipped as its scheduler clips; ``bits_per_dim_unclipped`` beside it, each with its ``*_bound``
        label), with a ``feature_extractor`` and ``quality_num_images`` > 0 also the sample quality
        (:meth:`evaluate_sample_quality`: SWD and its floor from ``train_data``, and FD), and writes the loss curve.

        Returns:
            The run's metrics (the keys of ``metrics.json`` but ``wall_time_s``, which is None here).
        """
        from .viz import save_loss_curve

        acc, state, sched = self.accelerator, self.state, self.noise_scheduler.config
        checksums = gather_object(acc, {"rank": acc.process_index, "weights": parameter_checksum(self.unwrapped),
                                         "ema": ema_checksum(self.ema)})
        if not acc.is_main_process:
            return {}
        for entry in checksums:
            print(f"[rank {entry['rank']}] weight checksum {entry['weights']} ema {entry['ema']}", flush=True)
        if len({(c["weights"], c["ema"]) for c in checksums}) != 1:
            raise RuntimeError(f"processes ended with different weights: {checksums}")
        bpd = self.evaluate_bpd()
        # Unclipped beside it (IDM's heavy-tailed last cosine steps show here); the same draws: a paired figure.
        unclipped = self.evaluate_bpd(clip_denoised=False) if bpd.clip_denoised else bpd
        last = state.losses[-50:]
        metrics = {
            "bits_per_dim": bpd.mean,
            "bits_per_dim_standard_error": bpd.mean_standard_error,
            "bits_per_dim_bound": "as sampled: " + bpd.bound,
            "bits_per_dim_clip_denoised": bool(bpd.clip_denoised),
            "bits_per_dim_unclipped": unclipped.mean,
            "bits_per_dim_unclipped_standard_error": unclipped.mean_standard_error,
            "bits_per_dim_unclipped_bound": "unclipped: " + unclipped.bound,
            "bits_per_dim_split": self.eval_set.split,
            "bits_per_dim_num_images": int(self.eval_set.images.shape[0]),
            "validation_split": self.eval_set.info,
            "eval_bpd_steps": bpd.timesteps_per_image,
            "train_steps": state.global_step,
            "skipped_steps": state.skipped_steps,
            "final_loss": state.losses[-1] if state.losses else None,
            "final_loss_mean_last_50": sum(last) / len(last) if last else None,
            "train_time_s": state.train_time_s,
            "wall_time_s": None,
            "num_processes": acc.num_processes,
            "global_batch_size": self.global_batch_size,
            "num_parameters": count_parameters(self.unwrapped),
            "model_type": "unet2d" if type(self.unwrapped).__name__ == "UNet2DModel" else "ours",
            "loss_type": self.config.loss_type,
            "variance_type": sched.variance_type,
            "beta_schedule": sched.beta_schedule,
            "max_beta": runflags.largest_beta(self.noise_scheduler.betas),
            "prediction_type": sched.prediction_type,
            "rank_checksums": checksums,
        }
        if feature_extractor is not None and quality_num_images:  # logs one line: SWD, its floor, FD, N, split
            metrics.update(self.evaluate_sample_quality(feature_extractor, quality_num_images, train_data))
        if state.losses and self.output_dir is not None:
            save_loss_curve(state.loss_steps, state.losses, os.path.join(self.output_dir, "loss_curve.png"),
                            title=f"{self.config.loss_type} loss, {sched.variance_type}, {sched.beta_schedule}")
        return metrics
