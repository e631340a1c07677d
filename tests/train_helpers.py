"""What the tests of training/train.py share: the loaded script, an in-process runner, tiny flags, checkpoint
readers and a recording stand-in for the Hub API (imported by test_train_script.py and test_reliability.py)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "training" / "train.py"
# Tiny but real: a few steps, a 2-image grid with 3 sampling steps, bits/dim on 4 images with 2 timesteps each.
FAST = ["--train_batch_size", "8", "--eval_batch_size", "2", "--ddpm_num_inference_steps", "3",
        "--eval_bpd_steps", "2", "--eval_num_images", "4", "--logger", "none", "--lr_warmup_steps", "2"]


def load_train_script():
    """training/train.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("ddpm_ext_train_script", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN = load_train_script()


def run_train(*argv):
    """main(argv) in this process; accelerate's singletons are reset so the next run starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    try:
        return TRAIN.main([str(a) for a in argv])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


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
