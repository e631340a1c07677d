"""Issue 19: one writer per output folder, graceful SIGTERM/SIGINT, resume that refuses changed flags, every flag
checked before training, one-line disk errors, exit codes, file permissions, safe pipeline loading.

Real processes throughout: a second training process (one or two ranks) meets the lock of a live one; real
signals reach the trainer and the `accelerate launch` launchers; a file-size limit (RLIMIT_FSIZE), a real 6 MiB
tmpfs and read-only bind mounts make writes fail. Training processes are forkserver children
(`train_helpers.start_process`, `cli=True` runs them as `python training/train.py` does) or real launchers.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import train_helpers
from PIL import Image
from safetensors.torch import load_file, save_file
from train_helpers import TRAIN, TRAIN_PY, assert_same_checkpoint, forkserver, run_train
from train_helpers import finish_process as finish
from train_helpers import start_process as start
from train_helpers import train_process

from diffusers_ddpm_ext import checkpoints as ck
from diffusers_ddpm_ext import processes, rundir, runflags
from diffusers_ddpm_ext import trainer as tr
from diffusers_ddpm_ext.processes import RunInterrupted
from diffusers_ddpm_ext.unet import DDPMUNet2DModel

# Tiny but real: train_helpers.FAST on 8x8 digits with T = 50.
FAST = [*train_helpers.FAST, "--resolution", "8", "--ddpm_num_steps", "50"]
# The signal tests: a checkpoint at step 4 tells the test the run is under way; the signal stops it at 5-9.
SIGNAL_RUN = ["--max_train_steps", 10, "--checkpointing_steps", 4, "--checkpoints_total_limit", 3, *FAST]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture(scope="module")
def spawner():
    return forkserver()


def wait_for(condition, proc=None, timeout=240):
    """Poll ``condition`` every 10 ms; fail if ``proc`` (a Process or Popen) ends first or time runs out."""
    deadline = time.time() + timeout
    while not condition():
        ended = proc is not None and (proc.poll() is not None if hasattr(proc, "poll") else not proc.is_alive())
        assert not ended and time.time() < deadline, "the run ended (or timed out) before the condition held"
        time.sleep(0.01)


def lines_of(text: str) -> list:
    """Non-empty lines, progress-bar carriage returns split like newlines."""
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip()]


def last_line(log) -> str:
    return lines_of(Path(log).read_text())[-1]


def leftovers(folder) -> list:
    return sorted(p.name for p in Path(folder).rglob("*") if p.name.startswith((".tmp", ".trash")))


def checkpoint_names(folder):
    return [os.path.basename(p) for p in ck.list_checkpoints(str(folder))]


# ------------------------------------------------------------------------------------------------------------
# One writer per output folder
# ------------------------------------------------------------------------------------------------------------


def test_second_run_is_refused_naming_the_live_one_and_a_killed_run_leaves_no_lock(spawner, tmp_path):
    """A live run holds the lock: a resuming run with another seed (the issue's ghost), an overwriting run and a
    two-process run are refused naming its pid, host and start time, and it trains on untouched. Killed with
    SIGKILL, it leaves its lock file but no lock: the next run starts."""
    out, live_log = tmp_path / "run", tmp_path / "live.log"
    live = start(spawner, live_log, "--output_dir", out, "--max_train_steps", 100000, "--checkpointing_steps", 2,
                 *FAST, cli=True)
    wait_for(lambda: checkpoint_names(out), live)
    holder = json.loads((out / rundir.RUN_LOCK_NAME).read_text())
    assert holder["pid"] == live.pid and holder["host"] == socket.gethostname()
    expected = (f"error: --output_dir '{out}' is in use by another training run (pid {live.pid} on this machine, "
                f"started {holder['started']}")
    for name, extra in (("resume", ["--resume_from_checkpoint", "latest", "--seed", 1]),
                        ("overwrite", ["--overwrite_output_dir"])):
        log = tmp_path / f"{name}.log"
        train_process(spawner, log, "--output_dir", out, "--max_train_steps", 4, *FAST, *extra, cli=True, expect=2)
        assert lines_of(log.read_text()) == [last_line(log)] and last_line(log).startswith(expected), log.read_text()
        assert f"`kill -TERM {live.pid}` saves a checkpoint first" in last_line(log)

    # Two processes: the main one meets the lock; the refusal reaches both, printed once.
    cmd = [*ACCELERATE, "--multi_gpu", "--num_processes", "2", str(TRAIN_PY), "--output_dir", str(out),
           "--resume_from_checkpoint", "latest", *map(str, FAST)]
    two = subprocess.run(cmd, env=dict(os.environ, ACCELERATE_USE_CPU="1"), capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert two.returncode == 1  # torch elastic reports the failed workers (ChildFailedError), see the README
    errors = [line for line in lines_of(two.stderr) if "error: " in line and "ChildFailedError" not in line]
    assert len(errors) == 1 and errors[0].startswith(expected), two.stderr[-3000:]
    assert "exitcode  : 2" in two.stderr

    # The live run was not disturbed: it is still training and checkpointing.
    newest = ck.checkpoint_step(checkpoint_names(out)[-1])
    wait_for(lambda: ck.checkpoint_step(checkpoint_names(out)[-1]) > newest + 2, live)
    os.kill(live.pid, signal.SIGKILL)
    finish(live, live_log, -signal.SIGKILL)
    assert (out / rundir.RUN_LOCK_NAME).exists()  # the file stays; the lock died with its holder
    log = tmp_path / "after.log"
    train_process(spawner, log, "--output_dir", out, "--overwrite_output_dir", "--max_train_steps", 2,
                  "--checkpointing_steps", 100, *FAST, cli=True)
    assert checkpoint_names(out) == ["checkpoint-2"] and (out / "model_index.json").is_file()
    assert not (out / rundir.RUN_LOCK_NAME).exists()  # a finished run removes it


def test_lock_is_reentrant_in_its_process_and_refuses_another_open_file(tmp_path):
    folder = tmp_path / "out"
    # Another holder: a separate open file description of the lock file (as another process has), flocked.
    folder.mkdir()
    fd = os.open(folder / rundir.RUN_LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({"pid": 4242, "host": "gpu-7", "started": "2025-01-02 03:04:05 +0000",
                             "command": "train.py --seed 3"}).encode())
    with pytest.raises(rundir.OutputDirBusyError) as busy:
        rundir.lock_output_dir(str(folder))
    assert "(pid 4242 on host gpu-7, started 2025-01-02 03:04:05 +0000: train.py --seed 3)" in str(busy.value)
    assert busy.value.holder["pid"] == 4242 and isinstance(busy.value, FileExistsError)
    os.close(fd)  # the holder goes away: its lock with it
    with rundir.lock_output_dir(str(folder)) as lock:
        assert json.loads(Path(lock.path).read_text())["pid"] == os.getpid()
        inner = rundir.lock_output_dir(str(folder))  # the trainer re-enters the script's lock
        inner.release()
        assert Path(lock.path).exists()
    assert not (folder / rundir.RUN_LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------------------------
# Signals
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(spawner, tmp_path_factory):
    """SIGNAL_RUN without interruption, in a process of its own."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train_process(spawner, out.parent / "log", "--output_dir", out, *SIGNAL_RUN)
    return out


def assert_stopped(log, name, out, steps=range(4, 11)) -> int:
    """The run printed one `stopped by <name> after step N: saved checkpoint-N` line last, checkpoint-N is
    complete, nothing half-written or exported is left and the lock is released; returns N."""
    line = last_line(log)
    match = re.fullmatch(rf"stopped by {name} after step (\d+): saved checkpoint-(\d+) in {re.escape(str(out))}; "
                         rf"continue with --resume_from_checkpoint latest", line)
    assert match and match.group(1) == match.group(2), Path(log).read_text()[-3000:]
    step = int(match.group(1))
    assert step in steps and checkpoint_names(out)[-1] == f"checkpoint-{step}"
    assert ck.load_checkpoint(str(out / f"checkpoint-{step}")).step == step  # complete, every SHA-256 right
    assert leftovers(out) == [] and not (out / "model_index.json").exists()
    assert not (out / rundir.RUN_LOCK_NAME).exists()
    return step


def assert_resumes_bit_identically(spawner, out, straight, log):
    train_process(spawner, log, "--output_dir", out, *SIGNAL_RUN, "--resume_from_checkpoint", "latest")
    state, _ = assert_same_checkpoint(straight / "checkpoint-10", out / "checkpoint-10")
    assert len(state["losses"]) == 10
    name = "unet/diffusion_pytorch_model.safetensors"
    assert (out / name).read_bytes() == (straight / name).read_bytes()


def test_sigint_to_the_trainer_saves_the_last_step_and_resume_is_bit_identical(spawner, straight_run, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = start(spawner, log, "--output_dir", out, *SIGNAL_RUN, cli=True)
    wait_for(lambda: (out / "checkpoint-4").is_dir(), proc)
    os.kill(proc.pid, signal.SIGINT)
    finish(proc, log, 130)
    step = assert_stopped(log, "SIGINT", out)
    print(f"SIGINT to the trainer: stopped after step {step}, checkpoint-{step}, exit 130")
    assert_resumes_bit_identically(spawner, out, straight_run, tmp_path / "resume.log")


def launcher_exited_by(returncode, signum) -> bool:
    """The launcher ended because of ``signum``: killed by it (accelerate <= 1.15 dies at once on SIGTERM), or
    exiting with 128 + signum after stopping its children (accelerate >= 1.16 catches SIGTERM, and its torch-elastic
    path turns SIGINT into exit 130; <= 1.15 re-raised that as a traceback, exit 1)."""
    return returncode in (-signum, 128 + signum) or (signum == signal.SIGINT and returncode == 1)


def trainer_exit_code(pid: int):
    """The exit code of the trainer process ``pid`` (reaped here as its subreaper), or None when its launcher waited
    for it itself (accelerate >= 1.16 stops its child before exiting); then it must be gone."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        assert not Path(f"/proc/{pid}").exists(), f"trainer {pid} outlived its launcher"
        return None
    return os.waitstatus_to_exitcode(status)


@contextlib.contextmanager
def subreaper():
    """Orphaned processes (a trainer whose launcher died) become children of this process while inside."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def test_sigterm_to_the_accelerate_launcher_stops_its_training_too(spawner, straight_run, tmp_path):
    """`accelerate launch` (one process) ends on SIGTERM: <= 1.15 dies at once and the training process gets SIGTERM
    from the kernel (PR_SET_PDEATHSIG); >= 1.16 sends it SIGTERM itself and waits 5 s. Either way the training
    writes the checkpoint of its last completed step, prints its line and exits 143: no ghost run."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    with subreaper():
        with open(log, "w") as sink:
            launcher = subprocess.Popen([*ACCELERATE, "--num_processes", "1", str(TRAIN_PY), "--output_dir",
                                         str(out), *map(str, SIGNAL_RUN)], stdout=sink, stderr=subprocess.STDOUT)
        wait_for(lambda: (out / "checkpoint-4").is_dir(), launcher)
        trainer_pid = json.loads((out / rundir.RUN_LOCK_NAME).read_text())["pid"]
        assert trainer_pid != launcher.pid
        launcher.send_signal(signal.SIGTERM)
        assert launcher_exited_by(launcher.wait(60), signal.SIGTERM)
        assert trainer_exit_code(trainer_pid) in (143, None)
    step = assert_stopped(log, "SIGTERM", out)
    print(f"SIGTERM to accelerate launch: trainer stopped after step {step}, launcher rc {launcher.returncode}")
    assert_resumes_bit_identically(spawner, out, straight_run, tmp_path / "resume.log")


# Steps of seconds each on 2 cores (batch 1024 at 16x16): longer than accelerate 1.16's 5 s grace on a busy machine.
SLOW_RUN = [*train_helpers.FAST, "--train_batch_size", 1024, "--max_train_steps", 4, "--checkpointing_steps", 1,
            "--save_images_epochs", 100]


def test_a_stop_during_a_long_step_saves_the_last_completed_step_within_the_launchers_grace(tmp_path):
    """Issue 24 item 4: SIGTERM to the process group of `accelerate launch` while a long step runs. accelerate 1.16
    SIGKILLs its child 5 s after its own SIGTERM; finishing the step lost the checkpoint and the line. The step in
    progress is abandoned: the checkpoint of the last completed step is written and the run ends by itself."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    with open(log, "w") as sink:
        launcher = subprocess.Popen([*ACCELERATE, "--num_processes", "1", str(TRAIN_PY), "--output_dir", str(out),
                                     *map(str, SLOW_RUN)], stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    wait_for(lambda: (out / "checkpoint-1").is_dir(), launcher)  # step 2 has started
    os.killpg(launcher.pid, signal.SIGTERM)  # what a scheduler (slurm, k8s) or a terminal's group signal does
    assert launcher_exited_by(launcher.wait(60), signal.SIGTERM)
    text = Path(log).read_text()
    assert "Killed" not in text and "-9" not in text, text[-3000:]
    assert_stopped(log, "SIGTERM", out, steps=[1])  # step 2 was abandoned, not finished
    assert checkpoint_names(out) == ["checkpoint-1"]


def test_sigkill_of_the_launcher_alone_still_stops_with_a_checkpoint_despite_the_closed_stderr(tmp_path):
    """Issue 24 item 5: accelerate 1.16 pipes the trainer's stderr through the launcher. SIGKILL the launcher alone:
    the trainer gets SIGTERM (PR_SET_PDEATHSIG) with a stderr that has no reader; its log lines used to die with
    BrokenPipeError (exit 1, no checkpoint). Now stderr is redirected (to stdout, here the log file), the
    checkpoint is written and the trainer exits 143 with its line."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    with subreaper():
        with open(log, "w") as sink:
            launcher = subprocess.Popen([*ACCELERATE, "--num_processes", "1", str(TRAIN_PY), "--output_dir",
                                         str(out), *map(str, SIGNAL_RUN)], stdout=sink, stderr=sink)
        wait_for(lambda: (out / "checkpoint-4").is_dir(), launcher)
        trainer_pid = json.loads((out / rundir.RUN_LOCK_NAME).read_text())["pid"]
        launcher.kill()
        assert launcher.wait(60) == -signal.SIGKILL
        assert trainer_exit_code(trainer_pid) == 143, Path(log).read_text()[-3000:]
    text = Path(log).read_text()
    assert "BrokenPipeError" not in text and "Logging error" not in text, text[-3000:]
    step = assert_stopped(log, "SIGTERM", out)
    print(f"SIGKILL to the launcher alone: trainer stopped after step {step}, exit 143")


def test_sigint_to_a_two_process_launch_stops_both_ranks_after_the_same_step(tmp_path):
    """torch elastic (behind `accelerate launch --multi_gpu`) forwards SIGINT to both ranks; they agree on the
    step to stop after, write one checkpoint holding both ranks' RNG states, and one line says so."""
    out = tmp_path / "mp"
    cmd = [*ACCELERATE, "--multi_gpu", "--num_processes", "2", str(TRAIN_PY), "--output_dir", str(out),
           "--max_train_steps", "1000", "--checkpointing_steps", "4", *map(str, FAST)]
    launcher = subprocess.Popen(cmd, env=dict(os.environ, ACCELERATE_USE_CPU="1"), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    wait_for(lambda: (out / "checkpoint-4").is_dir(), launcher, timeout=300)
    launcher.send_signal(signal.SIGINT)
    output, _ = launcher.communicate(timeout=120)
    assert launcher_exited_by(launcher.returncode, signal.SIGINT), output[-3000:]
    assert output.count("closing signal SIGINT") == 2  # forwarded to both workers
    stops = [line for line in lines_of(output) if "stopped by" in line]
    assert len(stops) == 1, output[-3000:]  # rank 1 stopped after the same step and stays quiet
    step = int(re.fullmatch(r"stopped by SIGINT after step (\d+): saved checkpoint-\1 in .*", stops[0]).group(1))
    data = ck.load_checkpoint(str(out / f"checkpoint-{step}"))
    assert len(data.rng_states) == 2 and data.step == step
    assert leftovers(out) == [] and not (out / rundir.RUN_LOCK_NAME).exists()
    print(f"SIGINT to a 2-process launch: both ranks stopped after step {step}, launcher rc {launcher.returncode}")


def test_weights_that_overflow_in_an_update_stop_the_run_without_calling_themselves_good(tmp_path):
    """Issue 24 items 9-10: an update that overflows (a huge learning rate) leaves non-finite weights after a step
    whose loss and gradient were finite. The next checkpoint must not be refused with a ValueError (exit 2,
    "refused before training") nor the bad state be called the last good one: the NaN policy stops the run naming
    the tensor and the newest checkpoint that is good."""
    loader = torch.utils.data.DataLoader(TINY_DATA, batch_size=4)
    trainer = _tiny_trainer(tmp_path / "run", checkpointing_steps=1, checkpoints_total_limit=None)
    real_step, steps = trainer.optimizer.step, [0]

    def overflowing_step(*args, **kwargs):
        real_step(*args, **kwargs)
        steps[0] += 1
        if steps[0] == 3:
            with torch.no_grad():
                trainer.unwrapped.conv_in.weight.view(-1)[0] = float("inf")

    trainer.optimizer.step = overflowing_step
    with pytest.raises(tr.NonFiniteLossError, match=r"the weights hold NaN or infinite values \(conv_in.weight\) "
                                                    r"after optimizer step 3, so they are not saved; the last good "
                                                    r"state is checkpoint-2 in ") as info:
        trainer.run(loader, progress=False)
    assert processes.exit_line(info.value)[0] == 3
    assert checkpoint_names(tmp_path / "run") == ["checkpoint-1", "checkpoint-2"]


def test_a_stop_wrapped_by_a_lazy_import_is_still_a_stop(capsys):
    """Issue 24 item 6: a signal landing inside one of diffusers' lazy imports reaches run_cli as `RuntimeError:
    Failed to import diffusers...` raised from our RunInterrupted (or from a KeyboardInterrupt): it is the same
    one-line stop with the signal's exit code, not a traceback."""
    def main_stopped_in_an_import():
        try:
            raise RunInterrupted("stopped by SIGINT outside a training step; x has no checkpoint yet", signal.SIGINT)
        except RunInterrupted as exc:
            raise RuntimeError("Failed to import diffusers.schedulers.scheduling_euler_discrete") from exc

    with pytest.raises(SystemExit) as info:
        processes.run_cli(main_stopped_in_an_import)
    assert info.value.code == 130
    assert capsys.readouterr().err == "stopped by SIGINT outside a training step; x has no checkpoint yet\n"

    def main_interrupted():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("Failed to import diffusers.pipelines")  # implicit chaining (__context__)

    with pytest.raises(SystemExit) as info:
        processes.run_cli(main_interrupted)
    assert info.value.code == 130 and capsys.readouterr().err == "stopped by SIGINT\n"
    assert processes.exit_line(RuntimeError("Failed to import x")) is None  # a real import failure stays a bug


def test_a_signal_during_the_start_up_imports_gives_one_line(tmp_path):
    """Issue 24 item 6: SIGINT in the seconds `python training/train.py` spends importing torch and diffusers
    (before run_cli's handlers exist) printed a raw KeyboardInterrupt traceback."""
    proc = subprocess.Popen([sys.executable, str(TRAIN_PY), "--output_dir", str(tmp_path / "run")],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    time.sleep(1.0)  # the imports take seconds (torch alone more than one); the handler is set before them
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert lines_of(err) == ["stopped by SIGINT during start-up; nothing was written"]
    assert not (tmp_path / "run").exists()


def test_stop_signals_defer_to_the_step_boundary_and_a_second_ctrl_c_stops_at_once(tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with processes.stop_signals(str(tmp_path), defer=True) as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        signal.raise_signal(signal.SIGTERM)  # a dying launcher's SIGTERM after ours: still a graceful stop
        with pytest.raises(RunInterrupted, match=r"stopped by a second SIGINT .* has no checkpoint yet") as info:
            signal.raise_signal(signal.SIGINT)
        assert info.value.exit_code == 130
    with processes.stop_signals() as stop:  # not deferred: at once
        with pytest.raises(RunInterrupted, match="stopped by SIGTERM outside a training step") as info:
            signal.raise_signal(signal.SIGTERM)
        assert info.value.exit_code == 143
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # an ignored SIGINT (a background job) stays ignored
    try:
        with processes.stop_signals(defer=True) as stop:
            signal.raise_signal(signal.SIGINT)
            assert not stop.requested
    finally:
        signal.signal(signal.SIGINT, before[0])


def _tiny_trainer(output_dir, **config):
    from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler

    torch.manual_seed(0)
    unet = DDPMUNet2DModel(sample_size=8, in_channels=1, out_channels=2, block_out_channels=(8, 16),
                           layers_per_block=1, norm_num_groups=4, attention_resolutions=())
    scheduler = GaussianDiffusionScheduler(num_train_timesteps=20, variance_type="learned_range")
    config = tr.TrainConfig(gradient_accumulation_steps=2, save_images_epochs=None, **config)
    return tr.Trainer(unet, scheduler, config, max_train_steps=12, output_dir=str(output_dir))


TINY_DATA = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)


def test_a_signal_abandons_the_step_in_progress_and_saves_the_last_completed_one(tmp_path):
    """The library's loop (no script), issue 24 item 4: a one-process run stopped during the forward or the
    backward pass of an optimizer step (accumulation 2) abandons that step and writes the checkpoint of the last
    completed one at once, so a launcher's grace period (accelerate 1.16: SIGKILL 5 s after SIGTERM) is never
    spent finishing a long step. The checkpoint is exactly the uninterrupted run's state at that step. A SIGINT in
    the epoch-end hook stops at once with the checkpoint too."""
    loader = torch.utils.data.DataLoader(TINY_DATA, batch_size=4)  # 4 optimizer steps per epoch
    straight = _tiny_trainer(tmp_path / "straight", checkpointing_steps=1, checkpoints_total_limit=None)
    straight.run(loader, progress=False)

    # Between the two micro-batches of optimizer step 3: abandoned, the checkpoint is step 2's.
    trainer = _tiny_trainer(tmp_path / "a", checkpointing_steps=100)
    calls, real_step = [0], trainer.train_step

    def signalled_step(batch):
        calls[0] += 1
        if calls[0] == 6:
            signal.raise_signal(signal.SIGTERM)
        return real_step(batch)

    trainer.train_step = signalled_step
    with pytest.raises(RunInterrupted, match=r"stopped by SIGTERM after step 2: saved checkpoint-2 in ") as info:
        trainer.run(loader, progress=False)
    assert calls[0] == 6 and info.value.exit_code == 143  # micro-batch 6 was not trained
    assert checkpoint_names(tmp_path / "a") == ["checkpoint-2"]
    assert_same_checkpoint(tmp_path / "straight" / "checkpoint-2", tmp_path / "a" / "checkpoint-2")

    # In the middle of a backward pass (a signal raised by a gradient hook of optimizer step 4's first micro-batch):
    # the pass is cut short between two parameters, its partial gradients dropped.
    trainer = _tiny_trainer(tmp_path / "b", checkpointing_steps=100)
    backwards = [0]

    def signal_in_backward(grad):
        backwards[0] += 1
        if backwards[0] == 7:
            signal.raise_signal(signal.SIGINT)
        return grad

    trainer.model.conv_in.weight.register_hook(signal_in_backward)
    with pytest.raises(RunInterrupted, match=r"stopped by SIGINT after step 3: saved checkpoint-3"):
        trainer.run(loader, progress=False)
    assert backwards[0] == 7 and all(p.grad is None for p in trainer.model.parameters())
    assert_same_checkpoint(tmp_path / "straight" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    assert all(not p._post_accumulate_grad_hooks for p in trainer.model.parameters())  # run() removed its hooks

    trainer = _tiny_trainer(tmp_path / "c", checkpointing_steps=100)
    with pytest.raises(RunInterrupted, match=r"stopped by SIGINT after step 4: saved checkpoint-4"):
        trainer.run(loader, progress=False, on_epoch_end=lambda t, epoch: signal.raise_signal(signal.SIGINT))
    assert checkpoint_names(tmp_path / "c") == ["checkpoint-4"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after run()


# ------------------------------------------------------------------------------------------------------------
# Resume compares the flags that change the result
# ------------------------------------------------------------------------------------------------------------

RESUME = ["--max_train_steps", 4, "--checkpointing_steps", 2, *FAST]


def interrupted_run(out):
    """A run of RESUME stopped after step 2 (checkpoint-2 written)."""
    with pytest.raises(tr.SimulatedInterrupt):
        run_train("--output_dir", out, *RESUME, "--debug_interrupt_after_step", 2)
    assert checkpoint_names(out) == ["checkpoint-2"]


def folder_digest(folder):
    return {f: hashlib.sha256((Path(folder) / f).read_bytes()).hexdigest() for f in rundir.files_under(str(folder))}


REFUSED_CHANGES = [
    (["--learning_rate", "1e-4"], ["--learning_rate 0.002 -> 0.0001", "--allow_changed_flags learning_rate"]),
    (["--train_batch_size", 4, "--gradient_accumulation_steps", 2],
     ["--train_batch_size 8 -> 4", "--gradient_accumulation_steps 1 -> 2", "--train_batch_size cannot change"]),
    (["--seed", 1], ["--seed 0 -> 1", "random streams"]),
    (["--ddpm_beta_schedule", "linear", "--prediction_type", "v_prediction"],
     ["--ddpm_beta_schedule 'squaredcos_cap_v2' -> 'linear'", "--prediction_type 'epsilon' -> 'v_prediction'",
      "--allow_changed_flags prediction_type,ddpm_beta_schedule"]),
    (["--loss_type", "kl"], ["--loss_type 'hybrid' -> 'kl'"]),
    (["--timestep_sampler", "loss-second-moment"], ["--timestep_sampler 'uniform' -> 'loss-second-moment'"]),
    (["--max_train_steps", 6], ["--max_train_steps 4 -> 6"]),
    (["--ddpm_max_beta", "0.9"], ["--ddpm_max_beta 0.5 -> 0.9", "--allow_changed_flags ddpm_max_beta"]),
]


def test_resume_refuses_changed_result_flags_naming_both_values(tmp_path):
    out = tmp_path / "run"
    interrupted_run(out)
    before = folder_digest(out)
    for extra, fragments in REFUSED_CHANGES:
        with pytest.raises(ValueError) as err:
            run_train("--output_dir", out, *RESUME, "--resume_from_checkpoint", "latest", *extra)
        message = str(err.value)
        assert message.startswith(f"cannot resume from {out / 'checkpoint-2'} with changed flags: "), message
        for fragment in fragments:
            assert fragment in message, (fragment, message)
        assert folder_digest(out) == before  # refused before anything was written
    # Flags that never change the weights are not compared.
    metrics = run_train("--output_dir", out, *RESUME, "--resume_from_checkpoint", "latest", "--eval_num_images", 3,
                        "--eval_bpd_steps", 4, "--checkpointing_steps", 3, "--save_images_epochs", 5,
                        "--eval_batch_size", 1, "--ddpm_num_inference_steps", 2, "--gradient_checkpointing")
    assert metrics["train_steps"] == 4 and metrics["bits_per_dim_num_images"] == 3
    assert "changed_on_resume" not in json.loads((out / rundir.RUN_MARKER_NAME).read_text())


def test_a_changed_schedule_is_one_change_not_two(tmp_path):
    """Issue 24 item 10: the largest β is recorded as the schedule runs it, so another schedule reported a change of
    --ddpm_max_beta the user never made, and --allow_changed_flags ddpm_beta_schedule was still refused for it."""
    out = tmp_path / "run"
    interrupted_run(out)
    with pytest.raises(ValueError) as err:
        run_train("--output_dir", out, *RESUME, "--resume_from_checkpoint", "latest", "--ddpm_beta_schedule", "linear")
    assert "--ddpm_beta_schedule 'squaredcos_cap_v2' -> 'linear'" in str(err.value)
    assert "ddpm_max_beta" not in str(err.value), str(err.value)
    metrics = run_train("--output_dir", out, *RESUME, "--resume_from_checkpoint", "latest", "--ddpm_beta_schedule",
                        "linear", "--allow_changed_flags", "ddpm_beta_schedule")
    assert metrics["train_steps"] == 4 and metrics["max_beta"] == pytest.approx(0.02)
    assert json.loads((out / rundir.RUN_MARKER_NAME).read_text())["changed_on_resume"] == [
        "ddpm_beta_schedule 'squaredcos_cap_v2' -> 'linear' from step 2"]
    # On the same schedule the largest β is still compared: a changed clip is its own change.
    assert runflags.compare_flags({"ddpm_beta_schedule": "linear", "ddpm_max_beta": 0.02},
                                  {"ddpm_beta_schedule": "linear", "ddpm_max_beta": 0.01},
                                  allowed=["ddpm_max_beta"]) == [("ddpm_max_beta", 0.02, 0.01)]


def test_allowed_changes_take_effect_and_are_recorded(tmp_path):
    from diffusers.optimization import get_scheduler

    out = tmp_path / "run"
    interrupted_run(out)
    changed = ["--learning_rate", "1e-3", "--max_train_steps", 6, "--adam_beta1", "0.9", "--ema_max_decay", "0.99",
               "--timestep_sampler", "loss-second-moment"]
    run_train("--output_dir", out, *RESUME, "--resume_from_checkpoint", "latest", *changed, "--allow_changed_flags",
              "learning_rate,max_train_steps,--adam_beta1,ema_max_decay,timestep_sampler")
    # The optimizer and LR schedule follow the new values: lr(4) of a cosine schedule with peak 1e-3, 2 warm-up
    # steps and 6 steps in all, AdamW's beta1 0.9, the EMA's decay cap 0.99, a loss-second-moment history.
    reference = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-3)
    schedule = get_scheduler("cosine", reference, num_warmup_steps=2, num_training_steps=6)
    for _ in range(4):
        reference.step()
        schedule.step()
    data = ck.load_checkpoint(str(out / "checkpoint-4"))
    group = data.optimizer_state["param_groups"][0]
    assert group["lr"] == reference.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert tuple(group["betas"]) == (0.9, 0.999) and data.lr_scheduler_state["base_lrs"] == [1e-3]
    assert data.training_state["ema"]["decay"] == 0.99
    assert set(load_file(str(out / "checkpoint-6" / "timestep_sampler.safetensors"))) == {"loss_history",
                                                                                          "loss_counts"}
    expected = ["learning_rate 0.002 -> 0.001 from step 2", "max_train_steps 4 -> 6 from step 2",
                "adam_beta1 0.95 -> 0.9 from step 2", "ema_max_decay 0.9999 -> 0.99 from step 2",
                "timestep_sampler 'uniform' -> 'loss-second-moment' from step 2"]
    args = json.loads((out / rundir.RUN_MARKER_NAME).read_text())
    assert args["learning_rate"] == 1e-3 and args["changed_on_resume"] == expected
    card = (out / "README.md").read_text()
    assert "`changed_on_resume`" in card and "learning_rate 0.002 -> 0.001 from step 2" in card
    final = ck.load_checkpoint(str(out / "checkpoint-6")).training_state
    assert final["flags"]["learning_rate"] == 1e-3 and final["flag_changes"] == expected
    # A later resume compares with what checkpoint-4 recorded: the new values pass, the history is kept.
    run_train("--output_dir", out, *RESUME, *changed, "--resume_from_checkpoint", "checkpoint-4")
    assert json.loads((out / rundir.RUN_MARKER_NAME).read_text())["changed_on_resume"] == expected


def test_resume_of_a_cosine_run_from_before_the_beta_clip_is_refused_unless_it_keeps_its_betas(tmp_path):
    out = tmp_path / "run"
    interrupted_run(out)
    path = out / "checkpoint-2"
    state = json.loads((path / "training_state.json").read_text())
    assert state["flags"]["ddpm_max_beta"] == 0.5  # the largest β the clipped cosine schedule runs
    del state["flags"]["ddpm_max_beta"]  # as written before --ddpm_max_beta existed (cosine up to 0.999)
    (path / "training_state.json").write_text(json.dumps(state))
    manifest = json.loads((path / ck.MANIFEST_NAME).read_text())
    blob = (path / "training_state.json").read_bytes()
    manifest["files"]["training_state.json"] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    (path / ck.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=re.escape("--ddpm_max_beta 0.999 -> 0.5")):
        run_train("--output_dir", out, *RESUME, "--resume_from_checkpoint", "latest")
    metrics = run_train("--output_dir", out, *RESUME, "--resume_from_checkpoint", "latest", "--ddpm_max_beta", "0.999")
    assert metrics["train_steps"] == 4 and metrics["max_beta"] == pytest.approx(0.999)
    # A linear schedule never reaches a clip: any --ddpm_max_beta above its 0.02 is the same chain.
    assert runflags.with_legacy_flags({"ddpm_beta_schedule": "linear", "ddpm_num_steps": 50})["ddpm_max_beta"] == 0.02


def test_resume_of_a_checkpoint_without_recorded_flags_compares_its_training_args(tmp_path):
    out = tmp_path / "run"
    interrupted_run(out)
    path = out / "checkpoint-2"
    state = json.loads((path / "training_state.json").read_text())
    del state["flags"], state["flag_changes"]  # as written before checkpoints recorded their flags
    (path / "training_state.json").write_text(json.dumps(state))
    manifest = json.loads((path / ck.MANIFEST_NAME).read_text())
    blob = (path / "training_state.json").read_bytes()
    manifest["files"]["training_state.json"] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    (path / ck.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=re.escape(f"{path} (flags of its training_args.json) with changed flags: "
                                                   "--learning_rate 0.002 -> 0.0001")):
        run_train("--output_dir", out, *RESUME, "--resume_from_checkpoint", "latest", "--learning_rate", "1e-4")


@pytest.mark.parametrize("value, words", [
    ("seed", ["--allow_changed_flags seed", "can never change on resume", "random streams"]),
    ("learning_rate,bogus", ["'bogus' is not a flag that resume compares", "learning_rate"]),
])
def test_allow_changed_flags_names_only_changeable_flags(value, words):
    with pytest.raises(ValueError) as err:
        TRAIN.validate_args(TRAIN.parse_args(["--resume_from_checkpoint", "latest", "--allow_changed_flags", value]))
    assert all(w in str(err.value) for w in words), str(err.value)
    with pytest.raises(ValueError, match="only applies with --resume_from_checkpoint"):
        TRAIN.validate_args(TRAIN.parse_args(["--allow_changed_flags", "learning_rate"]))


def test_every_flag_is_classified_for_resume():
    """A new flag must be declared as compared on resume (changeable or fixed) or as not changing the result."""
    flags = {a.dest for a in TRAIN.build_parser()._actions if a.dest != "help"}
    classified = set(runflags.COMPARED_FLAGS) | set(runflags.NOT_COMPARED)
    assert flags == classified, (flags - classified, classified - flags)
    assert not set(runflags.COMPARED_FLAGS) & set(runflags.NOT_COMPARED)
    assert set(runflags.SCRIPT_RESULT_FLAGS) <= set(runflags.COMPARED_FLAGS)


# ------------------------------------------------------------------------------------------------------------
# Every numeric flag checked before anything is built
# ------------------------------------------------------------------------------------------------------------

NUMERIC_BAD_VALUES = {
    "resolution": [0, -8], "dataloader_num_workers": [-1], "num_class_embeds": [0, -1],
    "class_dropout_prob": [-0.1, 1.0, "nan"], "ddpm_num_steps": [0, -1], "ddpm_num_inference_steps": [0, -1, 51],
    "ddpm_max_beta": [0, -0.1, 1.0, "nan"],
    "snr_gamma": [0, -1, "nan", "inf"], "seed": [-1, 2**32], "train_batch_size": [0, -1], "eval_batch_size": [0, -1],
    "num_epochs": [0, -1], "max_train_steps": [0, -1], "save_images_epochs": [0, -1], "save_model_epochs": [0, -1],
    "gradient_accumulation_steps": [0, -1], "learning_rate": [0, -1, "nan", "inf"], "lr_warmup_steps": [-1],
    "adam_beta1": [-0.1, 1.0, "nan"], "adam_beta2": [-0.1, 1.0, "nan"], "adam_weight_decay": [-1, "nan", "inf"],
    "adam_epsilon": [0, -1, "nan"], "max_grad_norm": [-1, "nan", "inf"], "ema_inv_gamma": [0, -1, "nan"],
    "ema_power": [0, -1, "inf"], "ema_max_decay": [-0.1, 1.5, "nan"], "checkpointing_steps": [0, -1],
    "checkpoints_total_limit": [0, -1], "eval_bpd_steps": [0, 1, -1], "eval_num_images": [0, -5],
    "eval_quality_num_images": [-1, 2], "validation_split_seed": [-1, 2**32],
    "eval_every": [0, -1], "guidance_scale": [-1, "nan", "inf"], "debug_nan_at_step": [0, -1],
    "debug_interrupt_after_step": [0, -1],
}
IGNORED_NUMERIC_FLAGS = {"local_rank"}  # set by launchers, ignored
BAD_NUMBERS = [(flag, value) for flag, values in NUMERIC_BAD_VALUES.items() for value in values]


def test_every_numeric_flag_has_bad_values_in_the_sweep():
    numeric = {a.dest for a in TRAIN.build_parser()._actions if a.type in (int, float)}
    assert numeric == set(NUMERIC_BAD_VALUES) | IGNORED_NUMERIC_FLAGS


@pytest.mark.parametrize("flag, value", BAD_NUMBERS, ids=[f"{f}={v}" for f, v in BAD_NUMBERS])
def test_bad_numeric_flag_is_refused_before_anything_is_built(flag, value, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError(f"--{flag} {value} got past the flag checks")

    monkeypatch.setattr(TRAIN, "build_model", never)
    monkeypatch.setattr(tr.Trainer, "train_step", never)
    with pytest.raises(ValueError) as err:
        run_train("--output_dir", tmp_path / "out", "--max_train_steps", 2, *FAST, f"--{flag}", value)
    assert f"--{flag}" in str(err.value) and str(value).split(".")[0].lstrip("-") in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------------
# Disk full, file too large, read-only: one line naming the path and the cause, nothing truncated in place
# ------------------------------------------------------------------------------------------------------------


def test_file_size_limit_during_training_is_one_line_and_keeps_the_earlier_checkpoint(spawner, tmp_path):
    out, log = tmp_path / "run", tmp_path / "limited.log"
    interrupted_run(out)
    before = folder_digest(out / "checkpoint-2")
    # 1 MB per file: the 3.7 MB weights of checkpoint-4 cannot be written.
    train_process(spawner, log, "--output_dir", out, *RESUME, "--resume_from_checkpoint", "latest", cli=True,
                  file_size_limit=1_000_000, expect=5)
    assert last_line(log) == f"error: file too large while writing {out}/checkpoint-4/model.safetensors"
    assert "Traceback" not in log.read_text()
    assert checkpoint_names(out) == ["checkpoint-2"] and folder_digest(out / "checkpoint-2") == before
    assert leftovers(out) == [] and not (out / "checkpoint-4").exists()


_ARTEFACTS = """
import json, os, resource, signal, sys
from PIL import Image
from diffusers_ddpm_ext import rundir, viz

folder = sys.argv[1]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
writers = {
    "loss_curve.png": lambda p: viz.save_loss_curve(range(1, 300), [1 / i for i in range(1, 300)], p),
    "metrics.json": lambda p: rundir.write_json_atomic(p, {"bits_per_dim": 1.0, "notes": "x" * 5000}),
    "samples/epoch_0001.png": lambda p: rundir.write_image_atomic(p, Image.effect_noise((64, 64), 60)),
}
results = {}
for name, write in writers.items():
    try:
        write(os.path.join(folder, name))
        results[name] = "written"
    except rundir.OutputWriteError as exc:
        results[name] = [str(exc), exc.errno]
print(json.dumps(results))
"""


def test_artefacts_are_replaced_atomically_when_a_write_fails(tmp_path):
    """loss_curve.png, metrics.json and a sample grid over a file-size limit: the error names the file and the
    cause, the previous file stays byte for byte, no temporary is left."""
    from diffusers_ddpm_ext import viz

    viz.save_loss_curve([1, 2, 3], [3.0, 2.0, 1.0], str(tmp_path / "loss_curve.png"))
    rundir.write_json_atomic(str(tmp_path / "metrics.json"), {"bits_per_dim": 2.0})
    rundir.write_image_atomic(str(tmp_path / "samples" / "epoch_0001.png"), Image.new("L", (4, 4)))
    before = folder_digest(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _ARTEFACTS, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (message, code) in results.items():
        assert message == f"file too large while writing {tmp_path / name}" and code == 27, (name, message)
    assert folder_digest(tmp_path) == before and leftovers(tmp_path) == []


@pytest.fixture
def mount():
    """mount(*args, target): a real mount, lazily unmounted after the test (the tests run as root)."""
    targets = []

    def do(*args, target):
        proc = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
        if proc.returncode != 0 and not targets and ("permission denied" in proc.stderr.lower()
                                                     or "must be superuser" in proc.stderr.lower()
                                                     or "not permitted" in proc.stderr.lower()):
            # Containers without CAP_SYS_ADMIN cannot mount at all; the disk-full path is still exercised there
            # by the RLIMIT_FSIZE tests above. Anything else that breaks a mount is a failure.
            pytest.skip(f"mount(8) is not permitted on this machine: {proc.stderr.strip()}")
        assert proc.returncode == 0, f"this test needs mount(8) (root): {proc.stderr}"
        targets.append(target)

    yield do
    for target in reversed(targets):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_full_and_read_only_file_systems_give_one_line(spawner, tmp_path, mount):
    # A 6 MiB tmpfs: the first checkpoint (3.7 MB weights, 3.7 MB EMA, 7.4 MB AdamW moments) fills it.
    small = tmp_path / "small"
    small.mkdir()
    mount("-t", "tmpfs", "-o", "size=6m", "tmpfs", target=small)
    out, log = small / "run", tmp_path / "full.log"
    train_process(spawner, log, "--output_dir", out, *RESUME, cli=True, expect=5)
    assert last_line(log) == f"error: no space left on device while writing {out}/checkpoint-2/ema.safetensors"
    assert "Traceback" not in log.read_text()
    assert sorted(os.listdir(out)) == [rundir.RUN_MARKER_NAME]  # no checkpoint, no temporary, no lock file
    assert os.statvfs(small).f_bfree * os.statvfs(small).f_frsize > 5_000_000  # the partial checkpoint is gone

    # A read-only output folder (a read-only bind mount: chmod does not stop root).
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    mount("--bind", str(frozen), target=frozen)
    mount("-o", "remount,bind,ro", target=frozen)
    log = tmp_path / "ro.log"
    train_process(spawner, log, "--output_dir", frozen / "run", *RESUME, cli=True, expect=5)
    assert last_line(log) == f"error: read-only file system while writing {frozen}/run/{rundir.RUN_LOCK_NAME}"

    # A folder that turns read-only under a running run: its sample grids cannot be written.
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(20):  # 2 optimizer steps per epoch at batch 8
        Image.fromarray((rng.random((12, 12)) * 255).astype(np.uint8), mode="L").save(images / f"{index:02d}.png")
    out = tmp_path / "grids"
    (out / "samples").mkdir(parents=True)
    mount("--bind", str(out / "samples"), target=out / "samples")
    mount("-o", "remount,bind,ro", target=out / "samples")
    log = tmp_path / "grids.log"
    train_process(spawner, log, "--output_dir", out, "--resume_from_checkpoint", "latest", "--train_data_dir", images,
                  "--save_images_epochs", 1, *RESUME, cli=True, expect=5)
    assert last_line(log) == f"error: read-only file system while writing {out}/samples/epoch_0001.png"
    assert checkpoint_names(out) == ["checkpoint-2"] and leftovers(out) == []


# ------------------------------------------------------------------------------------------------------------
# Exit codes under `accelerate launch`
# ------------------------------------------------------------------------------------------------------------


def test_error_exit_is_one_line_with_its_code_and_what_accelerate_launch_adds(spawner, tmp_path):
    bad = ["--output_dir", tmp_path / "out", "--eval_bpd_steps", 1]
    line = "error: --eval_bpd_steps must be >= 2 (bits/dim draws two timesteps per stratum), got 1"
    log = tmp_path / "direct.log"
    train_process(spawner, log, *bad, cli=True, expect=2)  # as `python training/train.py` runs
    assert lines_of(log.read_text()) == [line]
    launched = subprocess.run([*ACCELERATE, "--num_processes", "1", str(TRAIN_PY), *map(str, bad)],
                              capture_output=True, text=True, timeout=300)
    # accelerate's one-process launcher re-raises any non-zero exit as a CalledProcessError traceback, exit 1.
    assert launched.returncode == 1 and lines_of(launched.stderr).count(line) == 1
    assert lines_of(launched.stderr)[-1].endswith("returned non-zero exit status 2.")
    quiet = subprocess.run([*ACCELERATE, "-q", "--num_processes", "1", str(TRAIN_PY), *map(str, bad)],
                           capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 1 and line in lines_of(quiet.stderr) and "Traceback" not in quiet.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------------
# Smaller items: permissions, loading, --unet_config folders
# ------------------------------------------------------------------------------------------------------------


def _tiny_unet(**overrides):
    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=1, out_channels=2, block_out_channels=(4, 8), layers_per_block=1,
                  norm_num_groups=2, attention_resolutions=())
    return DDPMUNet2DModel(**{**config, **overrides})


def test_published_pipeline_files_get_the_usual_permissions(tmp_path):
    """Under umask 022 every file of the run is 0644 (safetensors alone would write the weights 0600)."""
    out = tmp_path / "run"
    saved = os.umask(0o022)
    try:
        run_train("--output_dir", out, "--max_train_steps", 1, "--checkpointing_steps", 1, *FAST)
    finally:
        os.umask(saved)
    for name in ("unet/diffusion_pytorch_model.safetensors", "unet/config.json", "model_index.json", "README.md",
                 "sample_grid.png", "loss_curve.png", "metrics.json", rundir.RUN_MARKER_NAME,
                 "checkpoint-1/model.safetensors", "checkpoint-1/optimizer.pt", "checkpoint-1/checkpoint.json"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o644, (name, oct(os.stat(out / name).st_mode))


def test_load_pipeline_names_a_broken_index_and_refuses_non_finite_weights(tmp_path):
    from diffusers import DDPMPipeline

    from diffusers_ddpm_ext.hub import load_pipeline
    from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler

    folder = tmp_path / "pipe"
    DDPMPipeline(unet=_tiny_unet(), scheduler=GaussianDiffusionScheduler(num_train_timesteps=10)).save_pretrained(
        folder)
    index = folder / "model_index.json"
    good = index.read_text()
    index.write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match=re.escape(str(index)) + " is not valid JSON"):
        load_pipeline(str(folder))
    index.write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(str(index)) + " is not a pipeline index"):
        load_pipeline(str(folder))
    index.write_text(good)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["conv_in.weight"].view(-1)[3] = float("nan")  # a bit flip in the exponent: one NaN weight
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"unet weight 'conv_in.weight' holds NaN or infinite values"):
        load_pipeline(str(folder))


def test_unet_config_accepts_a_folder_holding_config_json(tmp_path):
    from diffusers_ddpm_ext.build import build_model

    _tiny_unet(block_out_channels=(8, 16), norm_num_groups=4).save_pretrained(tmp_path / "unet")
    args = TRAIN.parse_args(["--unet_config", str(tmp_path / "unet"), "--resolution", "8"])
    TRAIN.validate_args(args)
    model, _ = build_model(args)
    assert tuple(model.config.block_out_channels) == (8, 16) and model.config.out_channels == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--unet_config .*empty' is neither a JSON UNet config file nor a folder "
                                         "holding a config.json"):
        TRAIN.validate_args(TRAIN.parse_args(["--unet_config", str(tmp_path / "empty")]))
