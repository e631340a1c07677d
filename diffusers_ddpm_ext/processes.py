"""One process or several: what the trainer asks of Accelerate, how a run stops, and how a command exits.

- :class:`LocalAccelerator` does what the trainer asks of Accelerate in this process alone (no ``accelerate
  launch``, no distributed state), e.g. in a notebook or a benchmark.
- The collective helpers (gather an object, run a check on the main process and share its result or error, agree
  on a NaN or a stop request) make every process take the same branch, so none is left waiting at a collective
  call; with one process they call no ``accelerate`` function at all.
- :func:`stop_signals` turns SIGTERM and SIGINT into a stop request: the trainer writes a checkpoint of the last
  completed optimizer step and raises :class:`RunInterrupted` (one process abandons the step in progress at once;
  several finish it together). :func:`follow_launcher` makes a process started by ``accelerate launch`` (or
  torchrun) get SIGTERM when its launcher dies, so no run outlives it; the stop then survives the launcher's
  closed stderr pipe (:func:`redirect_broken_output`).
- :func:`run_cli` runs a training command: one ``error: ...`` (or ``stopped by ...``) line and a documented exit code
  (:data:`EXIT_CODES`) instead of a traceback for every failure the user can act on.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import signal
import sys
import threading
from typing import Any, Callable, Optional

import torch

from .checkpoints import CheckpointError, list_checkpoints
from .rundir import OutputWriteError

logger = logging.getLogger(__name__)


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
    no process is left waiting at the next collective call; on the other processes the error is marked
    ``reported_by_main`` (:func:`run_cli` prints it once, on the main process).
    """
    result, error, main_error = None, None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except Exception as exc:  # re-raised below on every rank (as itself on the main process)
            error, main_error = (type(exc).__name__, str(exc)), exc
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [result, error]
        broadcast_object_list(box)
        result, error = box
    if error is not None:
        name, message = error
        if main_error is not None:
            raise main_error
        exc = {"FileExistsError": FileExistsError, "OutputDirBusyError": FileExistsError,
               "CheckpointError": CheckpointError}.get(name, ValueError)(message)
        exc.reported_by_main = True
        raise exc
    return result


def all_finite_and_mean(accelerator, loss: torch.Tensor):
    """(every process's loss is finite, mean loss over processes) with one collective call.

    All processes must take the same branch after a non-finite loss (skip or stop), or DDP would hang
    waiting for a gradient all-reduce that one process never starts.
    """
    finite, mean, _ = step_consensus(accelerator, loss)
    return finite, mean


def step_consensus(accelerator, loss: torch.Tensor, stop: int = 0):
    """(every loss is finite, mean loss over processes, the largest stop request) with one collective call.

    ``stop`` is this process's stop request (a signal number, 0 for none). Every process gets the same three
    values at the same micro-batch, so all of them stop after the same optimizer step (naming the same signal)
    when a signal reached only some of them, or reached them at different moments.
    """
    value = loss.detach().float().reshape(1)
    packed = torch.cat([torch.isfinite(value).float(), torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0),
                        torch.tensor([float(stop)])])
    if accelerator.num_processes > 1:
        packed = accelerator.gather(packed.to(accelerator.device)).reshape(-1, 3)
    else:
        packed = packed.reshape(1, 3)
    finite = bool(packed[:, 0].min() > 0)
    return finite, float(packed[:, 1].mean()) if finite else float("nan"), int(packed[:, 2].max())


def largest_on_any_process(accelerator, value: int) -> int:
    """The largest of every process's ``value`` (one collective call with several processes)."""
    if accelerator.num_processes == 1:
        return int(value)
    return max(int(v) for v in gather_object(accelerator, int(value)))


# --------------------------------------------------------------------------------------------------
# Stopping on SIGTERM / SIGINT
# --------------------------------------------------------------------------------------------------


class RunInterrupted(Exception):
    """The run was stopped by SIGINT or SIGTERM. ``exit_code`` is 128 + the signal number: 130 or 143."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """The SIGTERM/SIGINT handler of :func:`stop_signals` and what it received.

    Attributes:
        signum: the first stop signal received (None: none yet); ``requested`` is ``signum is not None``.
        defer: True inside the training loop: a signal is only recorded, and the trainer stops at its next safe
            point. False elsewhere (building, evaluation, export, a one-process run's forward and backward passes,
            all of which are safe to abandon because everything they write is atomic and the weights change only in
            the optimizer step): a signal raises :class:`RunInterrupted` at once.
        output_dir: named in the message of an immediate stop.
    """

    def __init__(self, output_dir: Optional[str] = None, defer: bool = False):
        self.output_dir, self.defer = output_dir, defer
        self.signum: Optional[int] = None
        self._raised = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        redirect_broken_output()  # the launcher may have died with the read end of our stderr (SIGTERM by PDEATHSIG)
        name = signal.Signals(signum).name
        again, self.signum = self.signum is not None, self.signum if self.signum is not None else signum
        if self._raised:
            return  # already stopping at once
        # A second Ctrl-C means "now"; a second SIGTERM (a launcher's after the process group's, or after the
        # kernel's when the launcher died) never cuts the stop under way short, deferred or not.
        if again and signum != signal.SIGINT:
            logger.warning("%s: already stopping", name)
            return
        if not self.defer or again:
            self._raised = True
            raise RunInterrupted(self._message(name, again), signum)
        logger.warning("%s: stopping with a checkpoint of the last completed optimizer step (Ctrl-C again stops at "
                       "once, without that checkpoint)", name)

    def _message(self, name: str, again: bool) -> str:
        what = f"stopped by {'a second ' if again else ''}{name} outside a training step"
        if self.output_dir is None:
            return f"{what}; no training step had started"
        found = list_checkpoints(self.output_dir, verify=False)
        if not found:
            return f"{what}; {self.output_dir} has no checkpoint yet"
        return (f"{what}; {os.path.basename(found[-1])} in {self.output_dir} is the newest checkpoint: continue "
                f"with --resume_from_checkpoint latest")


_active_stop: Optional[StopSignals] = None


@contextlib.contextmanager
def stop_signals(output_dir: Optional[str] = None, defer: bool = False):
    """Inside the block SIGTERM and SIGINT are a stop request instead of killing the process.

    ``defer=False``: the signal raises :class:`RunInterrupted` at once. ``defer=True``: it is recorded in the
    yielded :class:`StopSignals`; the trainer stops at its next optimizer-step boundary. Nested blocks share
    the outermost handler and only switch its mode (and set its ``output_dir`` if it had none). A signal that
    is ignored when the block starts (``SIG_IGN``, e.g. SIGINT of a background job) stays ignored. Outside the
    main thread, where Python cannot install handlers, nothing is installed and None is yielded.
    """
    global _active_stop
    outer = _active_stop
    if outer is not None:
        previous = outer.defer
        outer.defer = defer
        outer.output_dir = outer.output_dir or output_dir
        try:
            yield outer
        finally:
            outer.defer = previous
        return
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    stop, saved = StopSignals(output_dir, defer), {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN:
            continue
        saved[signum] = signal.SIG_DFL if current is None else current
        signal.signal(signum, stop._handle)
    _active_stop = stop
    try:
        yield stop
    finally:
        _active_stop = None
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def follow_launcher() -> bool:
    """Ask the kernel for SIGTERM when this process's launcher dies (Linux; only under a launcher).

    ``accelerate launch`` (one process) starts the script with ``subprocess.Popen`` and dies at once on SIGTERM
    or SIGINT sent to it alone, which would leave the training running on (a "ghost" that keeps writing the
    output folder). With ``PR_SET_PDEATHSIG`` the training gets SIGTERM when that happens and stops gracefully
    (:func:`stop_signals`). The multi-process launcher (torch elastic, also behind ``accelerate launch
    --multi_gpu`` and ``torchrun``) forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to its workers itself, waits
    ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (default 30), then sends SIGKILL; this covers it being killed
    with SIGKILL. A script started from a shell (``python train.py``, ``nohup``) is left alone.

    Returns:
        True when the death signal was set.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    if not _is_launcher(parent):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
        logger.warning("could not ask for SIGTERM on the launcher's death: %s", os.strerror(ctypes.get_errno()))
        return False
    if os.getppid() != parent:  # the launcher died before the prctl call
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def redirect_broken_output() -> list:
    """Point stderr (then stdout) at a working target when its pipe has no reader any more; returns the fds moved.

    accelerate 1.16's one-process launcher pipes the script's stderr through itself: once it is killed, every write
    to stderr fails with EPIPE, so a log line or the final ``stopped by ...`` line would raise ``BrokenPipeError``
    before the checkpoint is written. A broken stderr is redirected to stdout when that still works (where
    ``accelerate launch ... > log`` sends it), otherwise to ``/dev/null``, at the file-descriptor level so that
    every Python stream and handler writing to it keeps working. Healthy descriptors are left alone.
    """
    moved = [fd for fd in (1, 2) if _pipe_without_reader(fd)]
    if 2 in moved and 1 not in moved:
        os.dup2(1, 2)
    elif moved:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in moved:
            os.dup2(devnull, fd)
        os.close(devnull)
    return moved


def _pipe_without_reader(fd: int) -> bool:
    """Writing to ``fd`` would fail with EPIPE: poll reports POLLERR for a pipe whose read end is closed."""
    try:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (OSError, ValueError):  # fd closed or not pollable: nothing to repair here
        return False


def _is_launcher(pid: int) -> bool:
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torch elastic worker: its parent is the agent
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = [os.path.basename(w.decode(errors="replace")) for w in f.read().split(b"\0")]
    except OSError:
        return False
    return any(w == "accelerate" or w.startswith("accelerate.commands") for w in words) and "launch" in " ".join(words)


# --------------------------------------------------------------------------------------------------
# Exit codes of the training command
# --------------------------------------------------------------------------------------------------

EXIT_CODES = {
    0: "the run completed",
    2: "refused before training: a bad flag or flag combination, a protected or busy --output_dir, a resume whose "
       "flags differ from the checkpoint's, a missing or unusable checkpoint, unreadable data",
    3: "training diverged (NaN/inf loss or gradient); the last good state is saved as a checkpoint",
    4: "the final push to the Hub failed; everything local was written",
    5: "a file could not be written: disk full, file too large, read-only file system, no permission",
    130: "stopped by SIGINT (Ctrl-C) after writing a checkpoint of the last completed step",
    143: "stopped by SIGTERM after writing a checkpoint of the last completed step",
}
# OS errors that mean "cannot write here" (as opposed to a bug): one line and exit code 5.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def exit_line(exc: BaseException) -> Optional[tuple]:
    """``(exit code, one line)`` for a failure the user can act on or a stop by a signal; None for anything else
    (a bug: its traceback is worth more than a line)."""
    stop = _stop_in_chain(exc)
    if isinstance(stop, RunInterrupted):  # "stopped by SIGTERM after step 6: saved checkpoint-6 in ..."
        return stop.exit_code, str(stop)
    if isinstance(stop, KeyboardInterrupt):  # SIGINT where no handler of ours was installed (another thread)
        return 130, "stopped by SIGINT"
    from .hub import HubPushError
    from .trainer import NonFiniteLossError

    if isinstance(exc, NonFiniteLossError):
        return 3, f"error: {exc}"
    if isinstance(exc, HubPushError):
        return 4, f"error: {exc}"
    if isinstance(exc, (ValueError, FileExistsError)):
        return 2, f"error: {exc}"
    if isinstance(exc, OutputWriteError):
        return 5, f"error: {exc}"
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
        where = f" while writing {exc.filename}" if exc.filename else ""
        return 5, f"error: {(exc.strerror or str(exc)).lower()}{where}"
    return None


def _stop_in_chain(exc: BaseException) -> Optional[BaseException]:
    """The RunInterrupted or KeyboardInterrupt ``exc`` is or was raised from, if any.

    A signal can land inside an import that diffusers performs lazily: it then arrives wrapped, as ``RuntimeError:
    Failed to import diffusers.schedulers...`` caused by our RunInterrupted (or a KeyboardInterrupt).
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (RunInterrupted, KeyboardInterrupt)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def run_cli(main: Callable[[], Any]) -> None:
    """Run a training command's ``main()``: stop signals, the launcher's death, one-line errors, exit codes.

    SIGTERM/SIGINT stop the run gracefully (:func:`stop_signals`; the trainer writes a checkpoint of the last
    completed step); every failure :func:`exit_line` knows is printed as one line to stderr and exits with its
    :data:`EXIT_CODES` code. With several processes, an error raised on every process alike (flags, data,
    output folder: anything the main process checked for all) is printed by the main process only; other
    processes prefix their lines with ``[rank N]``.
    """
    follow_launcher()
    try:
        with stop_signals():
            main()
    except (Exception, KeyboardInterrupt) as exc:
        known = exit_line(exc)
        if known is None:
            raise
        code, line = known
        rank = int(os.environ.get("RANK", "0") or 0)
        if rank == 0:
            print(line, file=sys.stderr, flush=True)
        elif not getattr(exc, "reported_by_main", False):
            print(f"[rank {rank}] {line}", file=sys.stderr, flush=True)
        sys.exit(code)


def lock_on_main_process(accelerator, output_dir: str):
    """The main process takes ``output_dir``'s lock (:func:`~diffusers_ddpm_ext.rundir.lock_output_dir`); a refusal
    is raised on every process. Returns a context manager that releases it (a no-op on the other processes)."""
    from .rundir import lock_output_dir

    held: list = []
    on_main_process(accelerator, lambda: held.append(lock_output_dir(output_dir)))
    return held[0] if held else contextlib.nullcontext()
