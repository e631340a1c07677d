"""What a training run tells its user about its length: the model's size and step count before the first step, then
one time estimate from the first steps (:class:`RunClock`, used by :meth:`diffusers_ddpm_ext.trainer.Trainer.run`).
"""

from __future__ import annotations

import logging
import time
from typing import Optional

logger = logging.getLogger("diffusers_ddpm_ext.trainer")


def format_duration(seconds: float) -> str:
    """``"40 s"``, ``"12 min"``, ``"2 h 5 min"``: a time estimate as a person reads it."""
    seconds = max(float(seconds), 0.0)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


class RunClock:
    """The start line and the one time estimate of a run (or of a resumed part of it), logged on the main process.

    Args:
        max_train_steps: the run's optimizer steps.
        start_step: the step the run starts (or resumes) from.
        enabled: log (the main process) or stay silent (the others).
        after_steps, after_seconds: the estimate is logged ``after_steps`` steps past the first (which pays for
            start-up and is left out of the rate), or after ``after_seconds`` seconds, whichever comes first.
    """

    def __init__(self, max_train_steps: int, start_step: int = 0, enabled: bool = True, after_steps: int = 5,
                 after_seconds: float = 10.0):
        self.max_train_steps, self.start_step, self.enabled = int(max_train_steps), int(start_step), enabled
        self.after_steps, self.after_seconds = after_steps, after_seconds
        self.start_time = time.time()
        self.first: Optional[tuple] = None  # (step, time) at the end of the first step
        self.seconds_per_step: Optional[float] = None  # once estimated
        self.done = not enabled or self.start_step >= self.max_train_steps

    def log_start(self, model, steps_per_epoch: int, global_batch_size: Optional[int] = None) -> "RunClock":
        """``training 1,114,822 parameters for 1500 optimizer steps (...); a time estimate follows after ...``.

        Args:
            model: the model (its trainable parameters are counted), its parameter count, or a
                :class:`~diffusers_ddpm_ext.trainer.Trainer` (its unwrapped model and global batch size).
            steps_per_epoch: optimizer steps per epoch.
            global_batch_size: images per optimizer step over all processes (None: not shown).

        Returns:
            ``self``.
        """
        if hasattr(model, "unwrapped"):  # a Trainer
            model, global_batch_size = model.unwrapped, getattr(model, "global_batch_size", global_batch_size)
        num_parameters = model if isinstance(model, int) else sum(
            p.numel() for p in model.parameters() if p.requires_grad)
        if self.done:
            return self
        to_go = self.max_train_steps - self.start_step
        where = f"{to_go} to go from step {self.start_step}" if self.start_step else "from step 0"
        batch = f", global batch {global_batch_size}" if global_batch_size else ""
        logger.info("training %s parameters for %d optimizer steps (%s, %d per epoch%s); a time estimate follows "
                    "after %d steps or %.0f s", f"{int(num_parameters):,}", self.max_train_steps, where,
                    steps_per_epoch, batch, self.after_steps + 1, self.after_seconds)
        return self

    def log_estimate(self, step: int) -> None:
        """Call after every optimizer step; logs ``step 6/1500: ~0.42 s/step, about 10 min of training left`` once."""
        if self.done:
            return
        now = time.time()
        if self.first is None:
            self.first = (step, now)
        first_step, first_time = self.first
        if step - first_step < self.after_steps and now - self.start_time < self.after_seconds:
            return
        if step > first_step:
            self.seconds_per_step = (now - first_time) / (step - first_step)
        else:  # one slow first step: its own time is all there is
            self.seconds_per_step = (now - self.start_time) / max(step - self.start_step, 1)
        logger.info("step %d/%d: ~%.2f s/step, about %s of training left", step, self.max_train_steps,
                    self.seconds_per_step, format_duration(self.seconds_per_step * (self.max_train_steps - step)))
        self.done = True
