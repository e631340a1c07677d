"""What the tests of training/train.py share: the loaded script, an in-process runner, separate training
processes, tiny flags, checkpoint readers and a recording stand-in for the Hub API (imported by
test_train_script.py, test_reliability.py and test_run_safety.py)."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "training" / "train.py"
# Tiny but real: a few steps, a 2-image grid with 3 sampling steps, bits/dim on 4 images with 2 timesteps each, no
# sample quality (the tests that measure it ask for it).
FAST = ["--train_batch_size", "8", "--eval_batch_size", "2", "--ddpm_num_inference_steps", "3",
        "--eval_bpd_steps", "2", "--eval_num_images", "4", "--logger", "none", "--lr_warmup_steps", "2",
        "--eval_quality_num_images", "0"]


def load_train_script():
    """training/train.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("ddpm_ext_train_script", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN = load_train_script()


def run_main(main, *argv):
    """A script's ``main(argv)`` in this process; accelerate's singletons are reset so the next run starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    try:
        return main([str(a) for a in argv])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def run_train(*argv):
    """training/train.py's main(argv) in this process (:func:`run_main`)."""
    return run_main(TRAIN.main, *argv)


# ------------------------------------------------------------------------------------------------------------
# Separate training processes (forkserver children)
# ------------------------------------------------------------------------------------------------------------

# Executed by `exec` in the child: picklable by reference, and no test module has to be importable there.
_CHILD = """
import os, sys, importlib.util
log = os.open(LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
os.dup2(log, 1)
os.dup2(log, 2)
os.environ.pop("DDPM_EXT_FAULT", None)
os.environ.update(ENV)
if FILE_SIZE_LIMIT is not None:
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
import torch
torch.set_num_threads(1)  # every run the same: bitwise comparisons across processes
spec = importlib.util.spec_from_file_location("ddpm_ext_train_child", TRAIN_PY)
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
if CLI:  # as `python training/train.py` runs: one-line errors, exit codes, stop signals
    from diffusers_ddpm_ext.processes import run_cli
    run_cli(lambda: train.main(ARGV))
else:
    train.main(ARGV)
"""
_PRELOAD = ["torch", "numpy", "accelerate", "diffusers", "diffusers.training_utils", "diffusers.optimization",
            "diffusers_ddpm_ext", "diffusers_ddpm_ext.trainer", "diffusers_ddpm_ext.build", "diffusers_ddpm_ext.publish",
            "diffusers_ddpm_ext.likelihood", "diffusers_ddpm_ext.losses", "diffusers_ddpm_ext.data",
            "diffusers_ddpm_ext.hub", "matplotlib.figure"]


def forkserver():
    """The multiprocessing context whose children start with torch/diffusers/accelerate already imported."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def start_process(ctx, log, *argv, fault=None, cli=False, file_size_limit=None):
    """Start training/train.py's main(argv) in a fresh process, its output appended to ``log``.

    Args:
        fault: a DDPM_EXT_FAULT value (kill at a point).
        cli: run it as the command does (processes.run_cli): exit codes, one-line errors, stop signals.
        file_size_limit: RLIMIT_FSIZE in bytes (SIGXFSZ ignored, so larger writes fail with EFBIG).
    """
    env = {"DDPM_EXT_FAULT": fault} if fault else {}
    g = {"LOG": str(log), "ENV": env, "TRAIN_PY": str(TRAIN_PY), "ARGV": [str(a) for a in argv], "CLI": cli,
         "FILE_SIZE_LIMIT": file_size_limit}
    proc = ctx.Process(target=exec, args=(_CHILD, g), daemon=True)
    proc.start()
    return proc


def finish_process(proc, log, expect, timeout=300):
    """Wait for ``proc`` and assert its exit code (negative: killed by that signal)."""
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
    assert proc.exitcode == expect, f"exit code {proc.exitcode}, expected {expect}; log tail:\n" + \
        Path(log).read_text()[-3000:]


def train_process(ctx, log, *argv, fault=None, expect=0, **kwargs):
    proc = start_process(ctx, log, *argv, fault=fault, **kwargs)
    finish_process(proc, log, expect)


def checkpoint_tensors(path):
    """Every tensor of a checkpoint folder (weights, EMA, sampler history, AdamW moments) by a unique name."""
    out = {}
    for name in ("model.safetensors", "ema.safetensors", "timestep_sampler.safetensors"):
        if os.path.exists(os.path.join(path, name)):
            out.update({f"{name}:{k}": v for k, v in load_file(os.path.join(path, name)).items()})
    optimizer = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
    for index, state in optimizer["state"].items():
        for key, value in state.items():
            out[f"optimizer:{index}:{key}"] = value
    return out


def assert_same_checkpoint(path_a, path_b) -> tuple[dict, dict]:
    """Assert two checkpoint folders hold bit-identical tensors (EMA included) and the same loss history; return
    both training_state.json dicts for further checks."""
    a, b = checkpoint_tensors(path_a), checkpoint_tensors(path_b)
    assert a.keys() == b.keys() and any(k.startswith("ema") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state_a, state_b = (json.loads((Path(p) / "training_state.json").read_text()) for p in (path_a, path_b))
    assert state_a["losses"] == state_b["losses"]
    return state_a, state_b


class FakeHubApi:
    """Replaces `diffusers_ddpm_ext.hub.HfApi`: records what a push would send instead of sending it.

    `calls` holds ("create_repo", repo_id, private, token) and ("upload", repo_id, files named in the commit,
    files in the uploaded folder, {file: bytes}) in call order; `messages` the commit message of every
    create_commit call, failed ones included. Commits numbered (from 1) in `fail_commits` raise a connection
    error, which hub.push_to_hub turns into a HubPushError.
    """

    def __init__(self, fail_commits=()):
        self.calls, self.messages, self.fail_commits = [], [], set(fail_commits)

    def install(self, monkeypatch):
        from diffusers_ddpm_ext import hub

        fake = self

        class Api:
            def __init__(self, token=None):
                self.token = token

            def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
                fake.calls.append(("create_repo", repo_id, private, self.token))

            def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
                fake.messages.append(commit_message)
                if len(fake.messages) in fake.fail_commits:
                    raise ConnectionError("Name or service not known")
                paths = {op.path_in_repo: Path(op.path_or_fileobj) for op in operations}
                folder = Path(os.path.commonpath([str(p) for p in paths.values()]))
                while not (folder / "model_index.json").exists():
                    folder = folder.parent
                listed = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                fake.calls.append(("upload", repo_id, sorted(paths), listed,
                                   {f: path.read_bytes() for f, path in paths.items()}))
                return "commit"

        monkeypatch.setattr(hub, "HfApi", Api)
        return self
