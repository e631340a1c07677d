"""One process or several: what the trainer asks of Accelerate, and :class:`LocalAccelerator`, which does it in
this process alone (no ``accelerate launch``, no distributed state), e.g. in a notebook or a benchmark.

The collective helpers (gather an object, run a check on the main process and share its result or error, agree
on a NaN) make every process take the same branch, so none is left waiting at a collective call; with
one process they call no ``accelerate`` function at all.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch

from .checkpoints import CheckpointError


class LocalAccelerator:
    """The part of ``accelerate.Accelerator`` the trainer uses, for one process without Accelerate.

    Gradient accumulation works as Accelerate's does (the loss is divided by the window length and the
    optimizer steps on every ``gradient_accumulation_steps``-th micro-batch), so a run gives the same weights
    with either on one CPU process. No mixed precision, no trackers.
    """

    num_processes, process_index = 1, 0
    is_main_process = is_local_main_process = True
    scaler = None

    def __init__(self, gradient_accumulation_steps: int = 1, device: Optional[torch.device] = None):
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.device = torch.device(device or "cpu")
        self.sync_gradients = True
        self._micro_batches = 0

    @contextlib.contextmanager
    def accumulate(self, model):
        self._micro_batches += 1
        self.sync_gradients = self._micro_batches % self.gradient_accumulation_steps == 0
        yield

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.gradient_accumulation_steps).backward()

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def prepare(self, *objects):
        return objects

    def unwrap_model(self, model):
        return model

    def wait_for_everyone(self) -> None:
        pass

    def log(self, values: dict, step: Optional[int] = None) -> None:
        pass


def gather_object(accelerator, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (every rank gets the list)."""
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def on_main_process(accelerator, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the main process and return its result on every process.

    If it raises, every process raises the same message (as FileExistsError, CheckpointError or ValueError), so
    no process is left waiting at the next collective call.
    """
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except Exception as exc:  # re-raised below on every rank
            error = (type(exc).__name__, str(exc))
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [result, error]
        broadcast_object_list(box)
        result, error = box
    if error is not None:
        name, message = error
        raise {"FileExistsError": FileExistsError, "CheckpointError": CheckpointError}.get(name, ValueError)(message)
    return result


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
