"""Checkpoints (diffusers_ddpm_ext.checkpoints): atomic, verified, never unpickled, exact RNG state."""

import json
import logging
import os
import re
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from diffusers_ddpm_ext import checkpoints as ck
from diffusers_ddpm_ext.rundir import clean_stale_temporaries, sha256_file
from diffusers_ddpm_ext.timestep_sampler import create_timestep_sampler
from diffusers_ddpm_ext.unet import DDPMUNet2DModel


def tiny_unet(**overrides):
    config = dict(sample_size=8, in_channels=1, out_channels=2, block_out_channels=(8, 8), layers_per_block=1,
                  attention_resolutions=(), add_attention=False, norm_num_groups=4, dropout=0.1)
    config.update(overrides)
    return DDPMUNet2DModel(**config)


def trained_state(seed=0, steps=2):
    """A tiny model after a few AdamW steps, with EMA, LR schedule and an IDM sampler that has seen losses."""
    torch.manual_seed(seed)
    model = tiny_unet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=10)
    ema = EMAModel(model.parameters(), decay=0.999, use_ema_warmup=True, power=0.75)
    sampler = create_timestep_sampler("loss-second-moment", 10, history_per_term=2)
    for _ in range(steps):
        x = torch.randn(4, 1, 8, 8)
        t = torch.randint(0, 10, (4,))
        loss = model(x, t).sample.pow(2).mean()
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema.step(model.parameters())
        sampler.update(t, torch.rand(4))
    return model, optimizer, lr_scheduler, ema, sampler


def save_tiny_checkpoint(folder, step=3, **kwargs):
    model, optimizer, lr_scheduler, ema, sampler = trained_state()
    path = ck.save_checkpoint(str(folder), step, model=model, ema=ema, optimizer=optimizer, lr_scheduler=lr_scheduler,
                              sampler_state=sampler.state_dict(), training_state={"epoch": 1, "batch_in_epoch": 2},
                              rng_states=[ck.capture_rng_state()], **kwargs)
    return path, (model, optimizer, lr_scheduler, ema, sampler)


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_restores_everything(tmp_path):
    path, (model, optimizer, lr_scheduler, ema, sampler) = save_tiny_checkpoint(tmp_path, step=3)
    assert os.path.basename(path) == "checkpoint-3"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporaries left
    data = ck.load_checkpoint(path)
    assert data.step == 3 and data.training_state["epoch"] == 1 and data.training_state["batch_in_epoch"] == 2
    for key, value in model.state_dict().items():
        assert torch.equal(data.model_state[key], value)

    # Fresh objects take the saved state exactly.
    torch.manual_seed(123)
    model2 = tiny_unet()
    ck.check_checkpoint_matches(data, model2)
    model2.load_state_dict(data.model_state)
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    # As in the script: build the LR schedule first (it rewrites the groups' lr), then load both states.
    lr2 = get_scheduler("cosine", optimizer2, num_warmup_steps=1, num_training_steps=10)
    optimizer2.load_state_dict(data.optimizer_state)
    lr2.load_state_dict(data.lr_scheduler_state)
    ema2 = EMAModel(model2.parameters(), decay=0.999, use_ema_warmup=True, power=0.75)
    ck.load_ema_state(ema2, model2, data)
    sampler2 = create_timestep_sampler("loss-second-moment", 10, history_per_term=2)
    sampler2.load_state_dict(data.sampler_state)

    assert ema2.optimization_step == ema.optimization_step == 2
    for a, b in zip(ema.shadow_params, ema2.shadow_params):
        assert torch.equal(a, b)
    assert lr2.get_last_lr() == lr_scheduler.get_last_lr()
    for key in ("loss_history", "loss_counts"):
        assert torch.equal(sampler.state_dict()[key], sampler2.state_dict()[key])
    # The next step is identical: same optimizer moments, same LR.
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    for m, opt in ((model, optimizer), (model2, optimizer2)):
        m.eval()
        m(x, t).sample.pow(2).mean().backward()
        opt.step()
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_files_are_safe_formats(tmp_path):
    path, _ = save_tiny_checkpoint(tmp_path)
    names = set(os.listdir(path))
    assert {"model.safetensors", "ema.safetensors", "timestep_sampler.safetensors", "optimizer.pt",
            "lr_scheduler.pt", "training_state.json", "rng_states.json", ck.MANIFEST_NAME} <= names
    for name in ("optimizer.pt", "lr_scheduler.pt"):
        torch.load(os.path.join(path, name), weights_only=True)  # loads without unpickling code
    load_file(os.path.join(path, "ema.safetensors"))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ddpm_ext_pwned",))


def _rewrite_manifest(path):
    manifest = json.loads(Path(path, ck.MANIFEST_NAME).read_text())
    for name in manifest["files"]:
        file = os.path.join(path, name)
        manifest["files"][name] = {"size": os.path.getsize(file), "sha256": sha256_file(file)}
    Path(path, ck.MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize("file, what", [("ema.safetensors", "EMA weights"), ("model.safetensors", "weights")])
def test_a_checkpoint_with_non_finite_weights_is_refused_on_load_naming_the_tensor(tmp_path, file, what):
    """Issue 24 item 10: a checkpoint whose EMA held a NaN loaded and the run stopped 5 steps later; one whose
    weights held a NaN diverged at once and named that same checkpoint "the last good state". save_checkpoint never
    writes such a state (it was altered, manifest included), so loading refuses it before any training."""
    from safetensors.torch import load_file, save_file

    path, _ = save_tiny_checkpoint(tmp_path)
    tensors = load_file(os.path.join(path, file))
    name = sorted(tensors)[1]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, os.path.join(path, file))
    _rewrite_manifest(path)  # the hashes match: only the values are wrong
    with pytest.raises(ck.CheckpointError, match=rf"checkpoint-3 is not a good state: its {what} hold NaN or "
                                                 rf"infinite values \({re.escape(name)}\)"):
        ck.load_checkpoint(path)


def test_load_checkpoint_never_unpickles_code(tmp_path):
    if os.path.exists("/tmp/ddpm_ext_pwned"):
        os.unlink("/tmp/ddpm_ext_pwned")
    path, _ = save_tiny_checkpoint(tmp_path)
    with open(os.path.join(path, "optimizer.pt"), "wb") as f:
        pickle.dump({"state": _Exploit()}, f, protocol=2)
    _rewrite_manifest(path)  # an attacker controlling the folder can fix the manifest too
    with pytest.raises(ck.CheckpointError, match="cannot read checkpoint"):
        ck.load_checkpoint(path)
    assert not os.path.exists("/tmp/ddpm_ext_pwned")


def test_tampered_or_truncated_checkpoints_are_detected_and_skipped(tmp_path, caplog):
    good, _ = save_tiny_checkpoint(tmp_path, step=5)
    truncated, _ = save_tiny_checkpoint(tmp_path, step=7)
    tampered, _ = save_tiny_checkpoint(tmp_path, step=8)
    half_written, _ = save_tiny_checkpoint(tmp_path, step=9)
    weights = os.path.join(truncated, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    blob = bytearray(Path(tampered, "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    Path(tampered, "model.safetensors").write_bytes(bytes(blob))
    os.unlink(os.path.join(half_written, ck.MANIFEST_NAME))  # what a folder without its manifest looks like
    os.makedirs(tmp_path / ".tmp-checkpoint-12-1-1")  # an interrupted write
    os.makedirs(tmp_path / "checkpoint-notanumber")

    with pytest.raises(ck.CheckpointError, match="truncated"):
        ck.load_checkpoint(truncated)
    with pytest.raises(ck.CheckpointError, match="SHA-256"):
        ck.load_checkpoint(tampered)
    with pytest.raises(ck.CheckpointError, match="missing"):
        ck.load_checkpoint(half_written)
    # The tampered one passes the cheap size check of the listing; `latest` hashes and skips it, with a warning.
    assert [os.path.basename(p) for p in ck.list_checkpoints(str(tmp_path))] == ["checkpoint-5", "checkpoint-8"]
    with caplog.at_level(logging.WARNING, logger=ck.logger.name):
        assert ck.resolve_resume_path("latest", str(tmp_path)) == good
    assert any("checkpoint-8" in r.getMessage() and "SHA-256" in r.getMessage() for r in caplog.records)
    # the truncated and the manifest-less ones are named too: `latest` never drops a damaged checkpoint unseen
    assert any("checkpoint-7" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    assert any("checkpoint-9" in r.getMessage() and "missing" in r.getMessage() for r in caplog.records)
    assert ck.resolve_resume_path("checkpoint-5", str(tmp_path)) == good
    with pytest.raises(ck.CheckpointError, match="available"):
        ck.resolve_resume_path("checkpoint-99", str(tmp_path))
    assert ck.resolve_resume_path("latest", str(tmp_path / "empty")) is None
    assert clean_stale_temporaries(str(tmp_path)) == [".tmp-checkpoint-12-1-1"]
    # quarantine (what train.py's main process asks for): the altered one is kept, renamed out of the listing
    assert ck.resolve_resume_path("latest", str(tmp_path), quarantine=True) == good
    assert not os.path.exists(tampered)
    assert sorted(n.split(".corrupt-")[0] for n in os.listdir(tmp_path) if ".corrupt-" in n) == [
        "checkpoint-7", "checkpoint-8", "checkpoint-9"]
    (aside,) = [n for n in os.listdir(tmp_path) if n.startswith("checkpoint-8.corrupt-")]
    assert Path(tmp_path, aside, "model.safetensors").read_bytes() == bytes(blob)
    assert [os.path.basename(p) for p in ck.list_checkpoints(str(tmp_path))] == ["checkpoint-5"]


def test_latest_refuses_when_no_checkpoint_is_intact(tmp_path):
    """Resuming from nothing would silently restart a run: all-altered checkpoints are an error, and untouched."""
    only, _ = save_tiny_checkpoint(tmp_path, step=3)
    weights = Path(only, "model.safetensors")
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ck.CheckpointError, match=r"none of the 1 checkpoints .* is intact.*checkpoint-3"):
        ck.resolve_resume_path("latest", str(tmp_path), quarantine=True)
    assert os.path.isdir(only)


def test_rotate_checkpoints_keeps_newest(tmp_path):
    for step in (2, 4, 6, 8):
        save_tiny_checkpoint(tmp_path, step=step)
    deleted = ck.rotate_checkpoints(str(tmp_path), 2)
    assert [os.path.basename(p) for p in deleted] == ["checkpoint-2", "checkpoint-4"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-6", "checkpoint-8"]
    assert ck.rotate_checkpoints(str(tmp_path), None) == []


def test_check_checkpoint_matches_rejects_other_architecture(tmp_path):
    path, _ = save_tiny_checkpoint(tmp_path)
    data = ck.load_checkpoint(path)
    with pytest.raises(ck.CheckpointError, match="another architecture.*block_out_channels"):
        ck.check_checkpoint_matches(data, tiny_unet(block_out_channels=(8, 16)))
    with pytest.raises(ck.CheckpointError, match="UNet2DModel"):
        ck.check_checkpoint_matches(data, tiny_unet().to_unet2d())


def test_save_checkpoint_refuses_nan_weights(tmp_path):
    model, optimizer, lr_scheduler, ema, sampler = trained_state()
    with torch.no_grad():
        model.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="conv_in.weight.*NaN"):
        ck.save_checkpoint(str(tmp_path), 1, model=model, ema=ema, optimizer=optimizer)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- RNG


def test_rng_state_round_trip_is_json_and_exact():
    generator = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    state = json.loads(json.dumps(ck.capture_rng_state({"noise": generator})))
    first = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist(), torch.rand(2, generator=generator).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9), generator.manual_seed(9)
    ck.restore_rng_state(state, {"noise": generator})
    second = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist(), torch.rand(2, generator=generator).tolist())
    assert first == second
    with pytest.raises(ck.CheckpointError, match="noise"):
        ck.restore_rng_state(state, {})


