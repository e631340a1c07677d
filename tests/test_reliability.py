"""Reliability: kill -9 at any point resumes exactly, NaN handling, safe loading, bad CLI combinations.

The crash tests run the real training script in separate processes and kill them with SIGKILL, either at exact
points through the fault-injection hook (`DDPM_EXT_FAULT=<point>:<n>`, `rundir.fault_point`) or from
outside at a moment chosen by the clock. To keep nine process starts affordable, the processes are forked from a
multiprocessing forkserver that has imported torch/diffusers/accelerate once (`train_helpers.forkserver`; each
child is still a fresh process: it loads `training/train.py`, trains, and dies by SIGKILL when told to).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import train_helpers
from train_helpers import ROOT, TRAIN, assert_same_checkpoint, forkserver, run_train
from train_helpers import finish_process as finish
from train_helpers import start_process as start
from train_helpers import train_process

import diffusers_ddpm_ext  # noqa: F401
from diffusers_ddpm_ext import checkpoints as ck
from diffusers_ddpm_ext import rundir
from diffusers_ddpm_ext import trainer as tr
from diffusers_ddpm_ext.unet import DDPMUNet2DModel

PACKAGE = ROOT / "diffusers_ddpm_ext"
# Tiny but real: train_helpers.FAST on 8x8 digits with T = 50.
FAST = [*train_helpers.FAST, "--resolution", "8", "--ddpm_num_steps", "50"]
SIGKILLED = -signal.SIGKILL


# ------------------------------------------------------------------------------------------------------------
# Separate training processes (forkserver children)
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spawner():
    return forkserver()


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def pipeline_files(folder):
    """sha256 of every exported-pipeline file (weights, configs, card, grid) in an output folder."""
    folder = Path(folder)
    names = [f for f in rundir.files_under(str(folder))
             if f.split(os.sep)[0] in ("unet", "scheduler") or f in ("model_index.json", "README.md",
                                                                      "sample_grid.png")]
    return {f: digest(folder / f) for f in names}


def checkpoint_names(folder):
    return [os.path.basename(p) for p in ck.list_checkpoints(str(folder))]


def test_kill9_at_every_point_resumes_to_the_uninterrupted_result(spawner, tmp_path):
    """One run killed six times (mid-step, while writing a checkpoint, before renaming one, by an external
    SIGKILL, while sampling the final grid, half-way through publishing the pipeline) ends bit-identical to an
    uninterrupted run, and the finished run it overwrites is never left half-overwritten."""
    common = ["--max_train_steps", 8, "--checkpointing_steps", 2, "--checkpoints_total_limit", 3, *FAST]
    straight, out, log = tmp_path / "straight", tmp_path / "out", tmp_path / "train.log"
    train_process(spawner, log, "--output_dir", straight, *common)

    # A finished run of another seed occupies the folder the interrupted run overwrites.
    train_process(spawner, log, "--output_dir", out, "--seed", 7, "--max_train_steps", 2,
                  "--checkpointing_steps", 100, *FAST)
    finished = pipeline_files(out)
    assert "unet/diffusion_pytorch_model.safetensors" in finished and len(finished) >= 6

    # 1. killed between backward and optimizer step 5: checkpoints 2 and 4 survive, the old pipeline is intact.
    train_process(spawner, log, "--output_dir", out, "--overwrite_output_dir", *common, fault="step:5",
                  expect=SIGKILLED)
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-4"]
    assert pipeline_files(out) == finished

    resume = ["--output_dir", out, "--resume_from_checkpoint", "latest", *common]
    # 2. killed with checkpoint-6 half written: a temporary folder without manifest, never taken for a checkpoint.
    train_process(spawner, log, *resume, fault="checkpoint_write:1", expect=SIGKILLED)
    partial = [p for p in out.iterdir() if p.name.startswith(".tmp-checkpoint-6")]
    assert len(partial) == 1 and (partial[0] / "model.safetensors").exists()
    assert not (partial[0] / ck.MANIFEST_NAME).exists()
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-4"]
    assert ck.resolve_resume_path("latest", str(out)).endswith("checkpoint-4")

    # 3. killed with checkpoint-6 complete but not yet renamed: still not chosen; the stale folder is cleaned.
    train_process(spawner, log, *resume, fault="checkpoint_rename:1", expect=SIGKILLED)
    stale = [p.name for p in out.iterdir() if p.name.startswith(".tmp-checkpoint-6")]
    assert len(stale) == 1 and stale[0] != partial[0].name  # the first one was removed by the restart
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-4"]

    # 4. a real SIGKILL from outside, timed by the clock: as soon as checkpoint-6 appears.
    proc = start(spawner, log, *resume)
    deadline = time.time() + 300
    while not (out / "checkpoint-6").exists() and proc.is_alive() and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    finish(proc, log, SIGKILLED)
    assert "checkpoint-6" in checkpoint_names(out)
    assert pipeline_files(out) == finished

    # 5. killed while sampling the final grid (after the last checkpoint): the old pipeline is still intact.
    train_process(spawner, log, *resume, fault="sample:1", expect=SIGKILLED)
    assert checkpoint_names(out)[-1] == "checkpoint-8"
    assert pipeline_files(out) == finished

    # 6. killed after two files of the new pipeline were moved in: every file is a complete old or new file,
    # and the journal tells the next start to finish the swap.
    train_process(spawner, log, *resume, fault="publish:2", expect=SIGKILLED)
    assert (out / rundir.PUBLISH_JOURNAL_NAME).exists()
    final = pipeline_files(straight)
    mixed = pipeline_files(out)
    assert mixed.keys() == finished.keys() and mixed["README.md"] != finished["README.md"]  # the card moved first
    from diffusers_ddpm_ext.hub import load_pipeline

    with pytest.raises(OSError, match="interrupted export"):  # our loader refuses the mix until it is completed
        load_pipeline(str(out))
    for f in mixed:
        if f != "README.md":  # (the card names the output folder, so it differs from the straight run's)
            assert mixed[f] in (finished[f], final[f]), f

    # 7. the last start completes the swap, re-exports, and everything equals the uninterrupted run.
    train_process(spawner, log, *resume)
    assert not (out / rundir.PUBLISH_JOURNAL_NAME).exists()
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp", ".trash"))]
    state_a, _ = assert_same_checkpoint(straight / "checkpoint-8", out / "checkpoint-8")
    assert len(state_a["losses"]) == 8
    ours = pipeline_files(out)
    assert {f for f in ours if f != "README.md"} == {f for f in final if f != "README.md"}
    for f in ours:
        if f != "README.md":
            assert ours[f] == final[f], f
    assert json.loads((out / "metrics.json").read_text())["bits_per_dim"] == \
        json.loads((straight / "metrics.json").read_text())["bits_per_dim"]
    assert load_pipeline(str(out)).unet.config.sample_size == 8


# ------------------------------------------------------------------------------------------------------------
# NaN / inf
# ------------------------------------------------------------------------------------------------------------

HUGE_LR = ["--learning_rate", "1", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--max_grad_norm", "0"]


def _assert_finite_checkpoint(path):
    data = ck.load_checkpoint(str(path))
    for name, tensors in (("model", data.model_state), ("ema", data.ema_state)):
        assert all(torch.isfinite(v).all() for v in tensors.values()), name
    return data


def test_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "diverged"
    with pytest.raises(tr.NonFiniteLossError) as err:
        run_train("--output_dir", out, "--max_train_steps", 10, "--checkpointing_steps", 100, *FAST, *HUGE_LR)
    message = str(err.value)
    import re

    step, good = map(int, re.search(r"optimizer step (\d+) .*checkpoint-(\d+)", message).groups())
    assert 1 < step <= 10 and good == step - 1, message
    assert "--learning_rate" in message  # says what to do about it
    assert checkpoint_names(out) == [f"checkpoint-{good}"]
    data = _assert_finite_checkpoint(out / f"checkpoint-{good}")
    assert data.step == good and len(data.training_state["losses"]) == good
    assert not (out / "model_index.json").exists() and not (out / "unet").exists()  # nothing exported


def test_skip_policy_gives_up_after_20_bad_steps_without_saving_nan(tmp_path):
    out = tmp_path / "skipping"
    with pytest.raises(tr.NonFiniteLossError, match=r"20 consecutive non-finite steps before optimizer step (\d+).*"
                                                    r"checkpoint-\d+"):
        run_train("--output_dir", out, "--max_train_steps", 40, "--checkpointing_steps", 100, "--nan_policy",
                  "skip", *FAST, *HUGE_LR)
    (kept,) = checkpoint_names(out)
    data = _assert_finite_checkpoint(out / kept)
    assert data.training_state["skipped_steps"] == 20
    assert not (out / "unet").exists()


def test_weights_with_nan_are_never_written(tmp_path):
    from diffusers.training_utils import EMAModel

    model = _tiny_unet()
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(ValueError, match="model weights.*NaN"):
        ck.save_checkpoint(str(tmp_path), 3, model=model)
    good = _tiny_unet()
    ema = EMAModel(good.parameters())
    with torch.no_grad():
        ema.shadow_params[0][0] = float("inf")
    with pytest.raises(ValueError, match="EMA weights.*NaN or infinite"):
        ck.save_checkpoint(str(tmp_path), 3, model=good, ema=ema)
    assert os.listdir(tmp_path) == []  # no checkpoint, no temporary folder left behind


# ------------------------------------------------------------------------------------------------------------
# Safe loading
# ------------------------------------------------------------------------------------------------------------


def _tiny_unet(**overrides):
    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=1, block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2,
                  attention_resolutions=())
    return DDPMUNet2DModel(**{**config, **overrides})


def _sources():
    files = sorted(PACKAGE.glob("*.py")) + sorted((ROOT / "training").glob("*.py"))
    assert len(files) > 10
    return [(f, ast.parse(f.read_text(), filename=str(f))) for f in files]


def _docstrings(tree):
    nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                nodes.add(id(first.value))
    return nodes


def test_source_never_unpickles_unsafely_nor_trusts_remote_code():
    """Every torch.load passes weights_only=True; nothing calls pickle.load; no call sets trust_remote_code and
    no code string carries it (only docstrings and the model-card template tell users about it)."""
    torch_loads = 0
    for path, tree in _sources():
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name.endswith("torch.load"):
                    torch_loads += 1
                    kw = {k.arg: k.value for k in node.keywords}
                    assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                        f"{path.name}:{node.lineno}: torch.load without weights_only=True"
                unpickles = name.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") and \
                    name.endswith(("load", "loads"))
                assert not unpickles, f"{path.name}:{node.lineno}: {name}"
                for k in node.keywords:
                    assert k.arg != "trust_remote_code", f"{path.name}:{node.lineno} sets trust_remote_code"
                    if k.arg == "safe_serialization":
                        assert isinstance(k.value, ast.Constant) and k.value.value is True, \
                            f"{path.name}:{node.lineno}: save without safetensors"
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                assert "trust_remote_code" not in node.value, f"{path.name}:{node.lineno}: {node.value[:80]!r}"
    assert torch_loads >= 1  # the checkpoint loader's, found and checked


def _fake_checkpoint(folder, step, model=None, with_optimizer=True):
    model = model or _tiny_unet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 8, 8), 1).sample.mean().backward()
    optimizer.step()
    return ck.save_checkpoint(str(folder), step, model=model, optimizer=optimizer if with_optimizer else None,
                              training_state={"global_step": step}, rng_states=[ck.capture_rng_state()])


def test_checkpoint_files_are_safetensors_json_and_weights_only_pickles(tmp_path, monkeypatch):
    path = _fake_checkpoint(tmp_path, 2)
    names = sorted(os.listdir(path))
    assert names == sorted(["model.safetensors", "optimizer.pt", "training_state.json", "rng_states.json",
                            ck.MANIFEST_NAME]), names
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    data = ck.load_checkpoint(path)
    assert calls == [True] and data.optimizer_state["state"]


def test_malicious_pickle_in_a_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = _fake_checkpoint(tmp_path / "run", 2)
    torch.save({"state": {0: Payload()}, "param_groups": []}, os.path.join(path, "optimizer.pt"))
    # The attacker also rewrites the manifest, so sizes and hashes match.
    manifest = json.loads(Path(path, ck.MANIFEST_NAME).read_text())
    for name, info in manifest["files"].items():
        info.update(size=os.path.getsize(os.path.join(path, name)), sha256=digest(os.path.join(path, name)))
    Path(path, ck.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ck.CheckpointError, match=r"cannot read checkpoint .*checkpoint-2.*Unpickl|weights_only"):
        ck.load_checkpoint(path)
    assert not marker.exists()
    assert pickle.dumps(Payload())  # (the payload itself is fine: it is the loader that refused it)


def test_truncated_or_tampered_checkpoints_name_the_file_and_latest_skips_half_written_ones(tmp_path):
    good = _fake_checkpoint(tmp_path, 2)
    bad = _fake_checkpoint(tmp_path, 4)
    weights = os.path.join(bad, "model.safetensors")
    blob = Path(weights).read_bytes()
    Path(weights).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ck.CheckpointError, match=r"checkpoint-4/model.safetensors is truncated"):
        ck.load_checkpoint(bad)
    assert ck.resolve_resume_path("latest", str(tmp_path)) == good  # the broken one is never chosen

    # Same size, one byte flipped: the SHA-256 in the manifest catches it.
    Path(weights).write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(ck.CheckpointError, match=r"checkpoint-4/model.safetensors does not match its SHA-256"):
        ck.load_checkpoint(bad)
    Path(weights).write_bytes(blob)
    assert ck.load_checkpoint(bad).step == 4


def test_latest_skips_an_altered_newest_checkpoint_and_the_resumed_run_rewrites_it(tmp_path):
    """A same-size corruption of the newest checkpoint: `latest` resumes from the one before, moves the altered
    folder aside, and the resumed run writes a fresh, verifiable checkpoint at that step again."""
    out = tmp_path / "run"
    common = ["--max_train_steps", 4, "--checkpointing_steps", 2, *FAST]
    run_train("--output_dir", out, *common)
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-4"]
    weights = out / "checkpoint-4" / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    run_train("--output_dir", out, "--resume_from_checkpoint", "latest", *common)
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-4"]
    assert ck.load_checkpoint(str(out / "checkpoint-4"), check_hashes=True).step == 4
    (aside,) = [p for p in out.iterdir() if p.name.startswith("checkpoint-4.corrupt-")]
    assert (aside / "model.safetensors").read_bytes() != blob  # the altered copy is kept, not deleted


def test_latest_never_skips_a_truncated_checkpoint_silently_nor_deletes_it(tmp_path, caplog):
    """Issue 24 item 7: a truncated newest checkpoint was dropped by the listing's size check before `latest` saw
    it: the run restarted from step 0 and rotation then replaced the damaged folder. Now `latest` stops when no
    checkpoint is intact (the damaged one untouched), and falls back to an older intact one with a warning,
    moving the damaged one aside."""
    out = tmp_path / "run"
    common = ["--max_train_steps", 10, "--checkpointing_steps", 5, *FAST]
    run_train("--output_dir", out, "--checkpoints_total_limit", 1, *common)
    assert checkpoint_names(out) == ["checkpoint-10"]
    optimizer = out / "checkpoint-10" / "optimizer.pt"
    damaged = optimizer.read_bytes()[:-1]
    optimizer.write_bytes(damaged)  # truncate -s -1
    with pytest.raises(ck.CheckpointError, match=r"none of the 1 checkpoints .* is intact.*checkpoint-10/optimizer"
                                                 r"\.pt is truncated"):
        run_train("--output_dir", out, "--resume_from_checkpoint", "latest", "--checkpoints_total_limit", 1, *common)
    assert optimizer.read_bytes() == damaged and not [p for p in out.iterdir() if ".corrupt-" in p.name]  # untouched

    # With an intact older checkpoint: resume from it, with a warning naming the damaged one, kept aside.
    shutil.rmtree(out)
    run_train("--output_dir", out, *common)
    assert checkpoint_names(out) == ["checkpoint-5", "checkpoint-10"]
    optimizer.write_bytes(optimizer.read_bytes()[:-1])
    with caplog.at_level("WARNING", logger=ck.logger.name):
        run_train("--output_dir", out, "--resume_from_checkpoint", "latest", *common)
    assert any("checkpoint-10" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    (aside,) = [p for p in out.iterdir() if p.name.startswith("checkpoint-10.corrupt-")]
    assert len((aside / "optimizer.pt").read_bytes()) == len(damaged)
    assert ck.load_checkpoint(str(out / "checkpoint-10")).step == 10  # trained again from step 5


def test_resume_from_a_truncated_checkpoint_fails_before_training(tmp_path):
    out = tmp_path / "run"
    path = _fake_checkpoint(out, 3)
    weights = os.path.join(path, "model.safetensors")
    Path(weights).write_bytes(Path(weights).read_bytes()[:100])
    with pytest.raises(ck.CheckpointError, match=r"model.safetensors is truncated or altered: 100 bytes"):
        run_train("--output_dir", out, "--resume_from_checkpoint", path, "--max_train_steps", 4, *FAST)
    assert checkpoint_names(out) == [] and not (out / "unet").exists()


def _truncate(path, keep):
    blob = Path(path).read_bytes()
    Path(path).write_bytes(blob[:keep] if isinstance(keep, int) else keep(blob))


@pytest.mark.parametrize("damage", ["half", "header", "empty"])
def test_damaged_weights_file_gives_a_clear_error_naming_it(tmp_path, damage):
    from diffusers import DDPMPipeline

    from diffusers_ddpm_ext.hub import load_pipeline
    from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler

    folder = tmp_path / "pipe"
    DDPMPipeline(unet=_tiny_unet(), scheduler=GaussianDiffusionScheduler(num_train_timesteps=10)).save_pretrained(
        folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    cut = {"half": lambda b: b[: len(b) // 2], "header": lambda b: b[:8] + b"{not json" + b[17:],
           "empty": lambda b: b""}[damage]
    _truncate(weights, cut)
    with pytest.raises(OSError, match=re_escape(str(weights))):
        DDPMUNet2DModel.from_pretrained(folder / "unet")
    with pytest.raises(OSError, match=re_escape(str(weights))):
        load_pipeline(str(folder))


def re_escape(text):
    import re

    return re.escape(text)


def test_load_pipeline_never_falls_back_to_pickled_weights(tmp_path):
    from diffusers import DDPMPipeline

    from diffusers_ddpm_ext.hub import load_pipeline
    from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler

    folder = tmp_path / "pickled"
    DDPMPipeline(unet=_tiny_unet(), scheduler=GaussianDiffusionScheduler(num_train_timesteps=10)).save_pretrained(
        folder, safe_serialization=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").exists()
    with pytest.raises(OSError, match="diffusion_pytorch_model.safetensors"):
        load_pipeline(str(folder))


# ------------------------------------------------------------------------------------------------------------
# Bad command lines fail before training (and before touching the output folder)
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    from diffusers_ddpm_ext.unet import UNET_PRESETS

    root = tmp_path_factory.mktemp("configs")
    base = dict(UNET_PRESETS["digits-small"]["config"])
    base.pop("out_channels")  # derived from --variance_type
    (root / "forced_c.json").write_text(json.dumps({**base, "out_channels": 1}))
    (root / "groups7.json").write_text(json.dumps({**base, "norm_num_groups": 7}))
    (root / "unknown_key.json").write_text(json.dumps({**base, "num_res_blocks": 2}))
    (root / "not_json.json").write_text("{sample_size: 16")
    bad_images = root / "images" / "a"
    bad_images.mkdir(parents=True)
    from PIL import Image

    for i in range(9):
        Image.new("L", (16, 16), 30 * i).save(bad_images / f"{i}.png")
    (bad_images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


BAD_COMMAND_LINES = [
    # (flags, error type, every fragment the message must contain)
    (["--variance_type", "learned_range", "--loss_type", "hybrid", "--unet_config", "{c}/forced_c.json"],
     ValueError, ["out_channels=1", "--variance_type learned_range", "out_channels=2"]),
    (["--class_column", "label"], ValueError, ["--class_column 'label'", "--num_class_embeds"]),
    (["--loss_type", "hybrid", "--variance_type", "fixed_small"], ValueError, ["--loss_type hybrid", "'fixed_small'"]),
    (["--loss_type", "simple", "--variance_type", "learned"], ValueError, ["--variance_type learned", "simple"]),
    (["--unet_preset", "cifar-huge"], ValueError, ["--unet_preset 'cifar-huge'", "digits-small"]),
    (["--unet_config", "{c}/groups7.json"], ValueError, ["--unet_config", "groups7.json", "norm_num_groups`=7"]),
    (["--unet_config", "{c}/unknown_key.json"], ValueError, ["--unet_config", "unknown_key.json", "num_res_blocks"]),
    (["--unet_config", "{c}/not_json.json"], ValueError, ["not_json.json"]),
    (["--unet_config", "{c}/missing.json"], ValueError, ["--unet_config", "missing.json"]),
    (["--unet_preset", "digits-small", "--unet_config", "{c}/forced_c.json"], ValueError,
     ["--unet_preset", "--unet_config"]),
    (["--resolution", "12"], ValueError, ["--unet_preset 'digits-small'", "--resolution 12", "sample_size`=12"]),
    (["--snr_gamma", "5", "--loss_type", "kl", "--variance_type", "learned_range"], ValueError,
     ["--snr_gamma", "kl"]),
    (["--snr_gamma", "-1"], ValueError, ["--snr_gamma", "-1"]),
    (["--ddpm_num_inference_steps", "100"], ValueError, ["--ddpm_num_inference_steps (100)", "--ddpm_num_steps (50)"]),
    (["--learning_rate", "-0.1"], ValueError, ["--learning_rate", "-0.1"]),
    (["--train_batch_size", "0"], ValueError, ["--train_batch_size", "0"]),
    (["--gradient_accumulation_steps", "0"], ValueError, ["--gradient_accumulation_steps", "0"]),
    (["--num_class_embeds", "0"], ValueError, ["--num_class_embeds", "0"]),
    (["--class_dropout_prob", "0.1"], ValueError, ["--class_dropout_prob", "--num_class_embeds"]),
    (["--class_dropout_prob", "1.5", "--num_class_embeds", "10"], ValueError, ["--class_dropout_prob", "1.5"]),
    (["--eval_bpd_steps", "0"], ValueError, ["--eval_bpd_steps", "0"]),
    (["--checkpoints_total_limit", "0"], ValueError, ["--checkpoints_total_limit", "0"]),
    (["--ema_max_decay", "1.5"], ValueError, ["--ema_max_decay", "1.5"]),
    (["--adam_beta1", "1.0"], ValueError, ["--adam_beta1", "1.0"]),
    (["--max_grad_norm", "-1"], ValueError, ["--max_grad_norm", "-1"]),
    (["--mixed_precision", "fp16"], ValueError, ["--mixed_precision fp16", "GPU"]),
    (["--dataset_name", "x/y", "--train_data_dir", "{c}/images"], ValueError, ["--dataset_name", "--train_data_dir"]),
    (["--image_column", "img"], ValueError, ["--image_column", "--dataset_name"]),
    (["--train_data_dir", "{c}/images"], ValueError, ["broken.png", "corrupt", "--skip_bad_images"]),
    (["--resume_from_checkpoint", "latest", "--overwrite_output_dir"], ValueError,
     ["--resume_from_checkpoint", "--overwrite_output_dir"]),
    (["--resume_from_checkpoint", "checkpoint-999"], ck.CheckpointError, ["'checkpoint-999'", "checkpoint-3"]),
    (["--push_to_hub", "--hub_model_id", "not a valid/repo id!"], ValueError, ["--hub_model_id", "not a valid"]),
    (["--model_type", "unet2d", "--num_class_embeds", "10", "--class_dropout_prob", "0.1"], ValueError,
     ["--class_dropout_prob", "--model_type ours"]),
]


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory):
    """An output folder holding another run: a checkpoint and a pipeline index (copied per test)."""
    out = tmp_path_factory.mktemp("previous") / "run"
    _fake_checkpoint(out, 3)
    (out / "model_index.json").write_text("{}")
    return out


@pytest.mark.parametrize("flags,error,fragments", BAD_COMMAND_LINES,
                         ids=[" ".join(f[0])[:60] for f in BAD_COMMAND_LINES])
def test_bad_command_line_fails_before_touching_the_output_folder(flags, error, fragments, configs, previous_run,
                                                                  tmp_path):
    """Each bad combination fails before training with a message naming the flags and values; a previous run's
    checkpoints in the folder survive even with --overwrite_output_dir."""
    out = tmp_path / "previous-run"
    shutil.copytree(previous_run, out)
    previous = out / "checkpoint-3"
    before = sorted(rundir.files_under(str(out)))
    flags = [f.replace("{c}", str(configs)) for f in flags]
    overwrite = [] if "--resume_from_checkpoint" in flags else ["--overwrite_output_dir"]
    with pytest.raises(error) as err:
        run_train("--output_dir", out, *overwrite, "--max_train_steps", 2, *FAST, *flags)
    for fragment in fragments:
        assert fragment in str(err.value), f"{fragment!r} not in: {err.value}"
    assert sorted(rundir.files_under(str(out))) == before and os.path.isdir(previous)


def test_unknown_choice_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        TRAIN.parse_args(["--ddpm_beta_schedule", "quadratic"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--ddpm_beta_schedule" in err and "'quadratic'" in err and "squaredcos_cap_v2" in err


def test_resume_from_a_checkpoint_of_another_architecture_fails_before_training(tmp_path):
    other = _fake_checkpoint(tmp_path / "elsewhere", 5, model=_tiny_unet(out_channels=2))
    out = tmp_path / "new"
    with pytest.raises(ck.CheckpointError) as err:
        run_train("--output_dir", out, "--resume_from_checkpoint", other, "--max_train_steps", 6, *FAST)
    message = str(err.value)
    assert other in message and "another architecture" in message and "block_out_channels" in message
    assert "--unet_preset/--unet_config" in message
    assert checkpoint_names(out) == [] and not (out / "unet").exists()


def test_skip_bad_images_flag_trains_on_the_good_ones(configs, tmp_path):
    out = tmp_path / "skipped"
    with pytest.warns(UserWarning, match=r"skipped 1 of 10 images: 1 corrupt"):
        metrics = run_train("--output_dir", out, "--train_data_dir", configs / "images", "--skip_bad_images",
                            *FAST, "--train_batch_size", 4, "--max_train_steps", 1, "--checkpointing_steps", 100)
    assert metrics["train_steps"] == 1 and (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
