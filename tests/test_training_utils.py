"""Unit tests of the training script's building blocks (diffusers_ddpm_ext.training_utils)."""

import json
import logging
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from diffusers_ddpm_ext import training_utils as tu
from diffusers_ddpm_ext.timestep_sampler import create_timestep_sampler
from diffusers_ddpm_ext.unet import DDPMUNet2DModel

from train_helpers import TRAIN


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
    path = tu.save_checkpoint(str(folder), step, model=model, ema=ema, optimizer=optimizer, lr_scheduler=lr_scheduler,
                              sampler_state=sampler.state_dict(), training_state={"epoch": 1, "batch_in_epoch": 2},
                              rng_states=[tu.capture_rng_state()], **kwargs)
    return path, (model, optimizer, lr_scheduler, ema, sampler)


# ---------------------------------------------------------------------------------------------- validation


def parse(*argv):
    return TRAIN.parse_args(list(argv))


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--loss_type", "hybrid", "--variance_type", "fixed_small"], ["--loss_type hybrid", "learned"]),
        (["--loss_type", "simple", "--variance_type", "learned_range"], ["--loss_type simple", "never trains"]),
        (["--class_column", "label"], ["--class_column", "--num_class_embeds"]),
        (["--class_dropout_prob", "0.1"], ["--class_dropout_prob", "--num_class_embeds"]),
        (["--num_class_embeds", "3", "--dataset_name", "x"], ["--class_column"]),
        (["--num_class_embeds", "3", "--class_column", "y", "--train_data_dir", "x"], ["--class_column",
                                                                                      "sub-folder"]),
        (["--dataset_name", "a", "--train_data_dir", "b"], ["--dataset_name", "--train_data_dir"]),
        (["--snr_gamma", "5", "--loss_type", "kl"], ["--snr_gamma", "kl"]),
        (["--snr_gamma", "-1"], ["--snr_gamma", "positive"]),
        (["--resume_from_checkpoint", "latest", "--overwrite_output_dir"], ["--resume_from_checkpoint",
                                                                            "--overwrite_output_dir"]),
        (["--train_batch_size", "0"], ["--train_batch_size", "0"]),
        (["--learning_rate", "0"], ["--learning_rate"]),
        (["--ddpm_num_inference_steps", "2000"], ["--ddpm_num_inference_steps", "2000", "1000"]),
        (["--unet_preset", "digits-small", "--unet_config", "c.json"], ["--unet_preset", "--unet_config"]),
        (["--unet_config", "/nonexistent/c.json"], ["--unet_config", "not a file"]),
        (["--ema_max_decay", "1.5"], ["--ema_max_decay"]),
        (["--push_to_hub", "--hub_model_id", "a/b/c"], ["--hub_model_id"]),
        (["--hub_strategy", "end"], ["--hub_strategy end", "--push_to_hub"]),
        (["--image_column", "img"], ["--image_column"]),
    ],
)
def test_validate_args_rejects_bad_combinations(argv, words):
    args = parse(*argv)
    with pytest.raises(ValueError) as info:
        tu.validate_args(args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_validate_args_accepts_defaults_and_common_variants():
    tu.validate_args(parse())
    tu.validate_args(parse("--loss_type", "simple", "--variance_type", "fixed_small", "--prediction_type",
                           "v_prediction", "--snr_gamma", "5"))
    tu.validate_args(parse("--num_class_embeds", "10", "--class_dropout_prob", "0.1"))
    tu.validate_args(parse("--loss_type", "kl", "--variance_type", "fixed_large"))


def test_resolve_out_channels():
    assert tu.resolve_out_channels(3, "learned_range") == 6
    assert tu.resolve_out_channels(1, "fixed_small") == 1
    assert tu.resolve_out_channels(3, "learned", 6) == 6
    with pytest.raises(ValueError, match="out_channels=3.*needs out_channels=6"):
        tu.resolve_out_channels(3, "learned_range", 3)
    with pytest.raises(ValueError, match="needs out_channels=1"):
        tu.resolve_out_channels(1, "fixed_small", 2)


def test_build_unet_sets_out_channels_and_checks_explicit_config(tmp_path):
    assert tu.build_unet(variance_type="learned_range", seed=0).config.out_channels == 2
    assert tu.build_unet(variance_type="fixed_small", seed=0).config.out_channels == 1
    conditional = tu.build_unet(variance_type="fixed_small", num_class_embeds=10, seed=0)
    assert conditional.config.num_class_embeds == 10 and conditional.null_class_label == 10
    # Same seed -> same initial weights (every process builds the same model).
    a, b = tu.build_unet(seed=3), tu.build_unet(seed=3)
    assert tu.parameter_checksum(a) == tu.parameter_checksum(b)
    config = dict(tiny_unet().config)
    config["out_channels"] = 1
    path = tmp_path / "unet.json"
    path.write_text(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))
    with pytest.raises(ValueError, match="learned variance needs 2×C"):
        tu.build_unet(config_path=str(path), variance_type="learned_range")
    assert tu.build_unet(config_path=str(path), variance_type="fixed_small").config.out_channels == 1
    unet2d = tu.build_unet(variance_type="learned_range", model_type="unet2d", seed=0)
    assert type(unet2d).__name__ == "UNet2DModel" and unet2d.config.out_channels == 2
    # A UNet2DModel config.json is accepted as --unet_config too.
    unet2d.save_config(str(tmp_path / "u2d"))
    assert tu.build_unet(config_path=str(tmp_path / "u2d"), variance_type="learned_range").config.out_channels == 2


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_restores_everything(tmp_path):
    path, (model, optimizer, lr_scheduler, ema, sampler) = save_tiny_checkpoint(tmp_path, step=3)
    assert os.path.basename(path) == "checkpoint-3"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporaries left
    data = tu.load_checkpoint(path)
    assert data.step == 3 and data.training_state["epoch"] == 1 and data.training_state["batch_in_epoch"] == 2
    for key, value in model.state_dict().items():
        assert torch.equal(data.model_state[key], value)

    # Fresh objects take the saved state exactly.
    torch.manual_seed(123)
    model2 = tiny_unet()
    tu.check_checkpoint_matches(data, model2)
    model2.load_state_dict(data.model_state)
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    # As in the script: build the LR schedule first (it rewrites the groups' lr), then load both states.
    lr2 = get_scheduler("cosine", optimizer2, num_warmup_steps=1, num_training_steps=10)
    optimizer2.load_state_dict(data.optimizer_state)
    lr2.load_state_dict(data.lr_scheduler_state)
    ema2 = EMAModel(model2.parameters(), decay=0.999, use_ema_warmup=True, power=0.75)
    tu.load_ema_state(ema2, model2, data)
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
            "lr_scheduler.pt", "training_state.json", "rng_states.json", tu.MANIFEST_NAME} <= names
    for name in ("optimizer.pt", "lr_scheduler.pt"):
        torch.load(os.path.join(path, name), weights_only=True)  # loads without unpickling code
    load_file(os.path.join(path, "ema.safetensors"))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ddpm_ext_pwned",))


def _rewrite_manifest(path):
    manifest = json.loads(Path(path, tu.MANIFEST_NAME).read_text())
    for name in manifest["files"]:
        file = os.path.join(path, name)
        manifest["files"][name] = {"size": os.path.getsize(file), "sha256": tu._sha256(file)}
    Path(path, tu.MANIFEST_NAME).write_text(json.dumps(manifest))


def test_load_checkpoint_never_unpickles_code(tmp_path):
    if os.path.exists("/tmp/ddpm_ext_pwned"):
        os.unlink("/tmp/ddpm_ext_pwned")
    path, _ = save_tiny_checkpoint(tmp_path)
    with open(os.path.join(path, "optimizer.pt"), "wb") as f:
        pickle.dump({"state": _Exploit()}, f, protocol=2)
    _rewrite_manifest(path)  # an attacker controlling the folder can fix the manifest too
    with pytest.raises(tu.CheckpointError, match="cannot read checkpoint"):
        tu.load_checkpoint(path)
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
    os.unlink(os.path.join(half_written, tu.MANIFEST_NAME))  # what a folder without its manifest looks like
    os.makedirs(tmp_path / ".tmp-checkpoint-12-1-1")  # an interrupted write
    os.makedirs(tmp_path / "checkpoint-notanumber")

    with pytest.raises(tu.CheckpointError, match="truncated"):
        tu.load_checkpoint(truncated)
    with pytest.raises(tu.CheckpointError, match="SHA-256"):
        tu.load_checkpoint(tampered)
    with pytest.raises(tu.CheckpointError, match="missing"):
        tu.load_checkpoint(half_written)
    # The tampered one passes the cheap size check of the listing; `latest` hashes and skips it, with a warning.
    assert [os.path.basename(p) for p in tu.list_checkpoints(str(tmp_path))] == ["checkpoint-5", "checkpoint-8"]
    with caplog.at_level(logging.WARNING, logger=tu.logger.name):
        assert tu.resolve_resume_path("latest", str(tmp_path)) == good
    assert any("checkpoint-8" in r.getMessage() and "SHA-256" in r.getMessage() for r in caplog.records)
    assert tu.resolve_resume_path("checkpoint-5", str(tmp_path)) == good
    with pytest.raises(tu.CheckpointError, match="available"):
        tu.resolve_resume_path("checkpoint-99", str(tmp_path))
    assert tu.resolve_resume_path("latest", str(tmp_path / "empty")) is None
    assert tu.clean_stale_temporaries(str(tmp_path)) == [".tmp-checkpoint-12-1-1"]
    # quarantine (what train.py's main process asks for): the altered one is kept, renamed out of the listing
    assert tu.resolve_resume_path("latest", str(tmp_path), quarantine=True) == good
    assert not os.path.exists(tampered)
    (aside,) = [n for n in os.listdir(tmp_path) if n.startswith("checkpoint-8.corrupt-")]
    assert Path(tmp_path, aside, "model.safetensors").read_bytes() == bytes(blob)
    assert [os.path.basename(p) for p in tu.list_checkpoints(str(tmp_path))] == ["checkpoint-5"]


def test_latest_refuses_when_no_checkpoint_is_intact(tmp_path):
    """Resuming from nothing would silently restart a run: all-altered checkpoints are an error, and untouched."""
    only, _ = save_tiny_checkpoint(tmp_path, step=3)
    weights = Path(only, "model.safetensors")
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(tu.CheckpointError, match=r"none of the 1 checkpoints .* is intact.*checkpoint-3"):
        tu.resolve_resume_path("latest", str(tmp_path), quarantine=True)
    assert os.path.isdir(only)


def test_rotate_checkpoints_keeps_newest(tmp_path):
    for step in (2, 4, 6, 8):
        save_tiny_checkpoint(tmp_path, step=step)
    deleted = tu.rotate_checkpoints(str(tmp_path), 2)
    assert [os.path.basename(p) for p in deleted] == ["checkpoint-2", "checkpoint-4"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-6", "checkpoint-8"]
    assert tu.rotate_checkpoints(str(tmp_path), None) == []


def test_check_checkpoint_matches_rejects_other_architecture(tmp_path):
    path, _ = save_tiny_checkpoint(tmp_path)
    data = tu.load_checkpoint(path)
    with pytest.raises(tu.CheckpointError, match="another architecture.*block_out_channels"):
        tu.check_checkpoint_matches(data, tiny_unet(block_out_channels=(8, 16)))
    with pytest.raises(tu.CheckpointError, match="UNet2DModel"):
        tu.check_checkpoint_matches(data, tiny_unet().to_unet2d())


def test_save_checkpoint_refuses_nan_weights(tmp_path):
    model, optimizer, lr_scheduler, ema, sampler = trained_state()
    with torch.no_grad():
        model.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="conv_in.weight.*NaN"):
        tu.save_checkpoint(str(tmp_path), 1, model=model, ema=ema, optimizer=optimizer)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- RNG


def test_rng_state_round_trip_is_json_and_exact():
    generator = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    state = json.loads(json.dumps(tu.capture_rng_state({"noise": generator})))
    first = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist(), torch.rand(2, generator=generator).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9), generator.manual_seed(9)
    tu.restore_rng_state(state, {"noise": generator})
    second = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist(), torch.rand(2, generator=generator).tolist())
    assert first == second
    with pytest.raises(tu.CheckpointError, match="noise"):
        tu.restore_rng_state(state, {})


# ---------------------------------------------------------------------------------------------- output folder


def test_prepare_output_dir_protects_user_files(tmp_path):
    out = tmp_path / "run"
    tu.prepare_output_dir(str(out))  # created
    tu.prepare_output_dir(str(out))  # empty: fine
    (out / "notes.txt").write_text("mine")
    (out / "model_index.json").write_text("{}")
    os.makedirs(out / "checkpoint-4")
    os.makedirs(out / "logs")
    with pytest.raises(FileExistsError, match="--overwrite_output_dir.*--resume_from_checkpoint"):
        tu.prepare_output_dir(str(out))
    tu.prepare_output_dir(str(out), resuming=True)
    assert (out / "checkpoint-4").is_dir()
    tu.prepare_output_dir(str(out), overwrite=True)
    # Old checkpoints/logs are gone; the user's file and the old pipeline stay until replaced.
    assert sorted(os.listdir(out)) == ["model_index.json", "notes.txt"]
    with pytest.raises(FileExistsError, match="not a folder"):
        tu.prepare_output_dir(str(out / "notes.txt"))


def test_publish_dir_and_recovery_after_a_crash(tmp_path):
    out = tmp_path / "out"
    (out / "unet").mkdir(parents=True)
    (out / "unet" / "weights").write_text("old")
    (out / "unet" / "stale.bin").write_text("old")
    (out / "keep.txt").write_text("user")
    src = out / ".tmp-export-1"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "weights").write_text("new")
    (src / "model_index.json").write_text("new")
    files = tu.publish_dir(str(src), str(out), remove=["unet/stale.bin"])
    assert files == ["model_index.json", "unet/weights"]
    assert (out / "unet" / "weights").read_text() == "new" and not (out / "unet" / "stale.bin").exists()
    assert sorted(os.listdir(out)) == ["keep.txt", "model_index.json", "unet"]

    # Crash after the journal and one move: the next start finishes the job.
    src = out / ".tmp-export-2"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "weights").write_text("newer")
    (src / "model_index.json").write_text("newer")
    tu.write_json_atomic(str(out / tu.PUBLISH_JOURNAL_NAME),
                         {"src": src.name, "files": ["model_index.json", "unet/weights"], "remove": []})
    os.replace(src / "model_index.json", out / "model_index.json")
    assert (out / "unet" / "weights").read_text() == "new"  # half-published state
    tu.prepare_output_dir(str(out), resuming=True)
    assert (out / "unet" / "weights").read_text() == "newer" and (out / "model_index.json").read_text() == "newer"
    assert sorted(os.listdir(out)) == ["keep.txt", "model_index.json", "unet"]


def test_write_json_atomic_refuses_nan_and_leaves_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    tu.write_json_atomic(str(path), {"a": 1})
    with pytest.raises(ValueError):
        tu.write_json_atomic(str(path), {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)


# ---------------------------------------------------------------------------------------------- EMA and guards


def test_ema_weights_context_restores_training_weights_even_on_error():
    model, _, _, ema, _ = trained_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with tu.ema_weights(ema, model):
        for p, s in zip(model.parameters(), ema.shadow_params):
            assert torch.equal(p, s)
    with pytest.raises(RuntimeError):
        with tu.ema_weights(ema, model):
            raise RuntimeError("sampling failed")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert any(not torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow_params))
    with tu.ema_weights(None, model) as same:
        assert same is model


class _OneProcess:
    num_processes = 1
    device = torch.device("cpu")


def test_all_finite_and_mean():
    assert tu.all_finite_and_mean(_OneProcess(), torch.tensor(2.5)) == (True, 2.5)
    finite, value = tu.all_finite_and_mean(_OneProcess(), torch.tensor(float("inf")))
    assert not finite and np.isnan(value)


def test_checksums_and_names():
    a, b = tiny_unet(), tiny_unet()
    b.load_state_dict(a.state_dict())
    assert tu.parameter_checksum(a) == tu.parameter_checksum(b)
    with torch.no_grad():
        b.conv_out.bias.add_(1e-7)
    assert tu.parameter_checksum(a) != tu.parameter_checksum(b)
    assert tu.ema_checksum(None) is None
    assert tu.default_repo_name("/tmp/My Run (2)/") == "My-Run-2"
    assert tu.training_config_for_card(parse("--hub_token", "secret")).get("hub_token") is None


# ---------------------------------------------------------------------------------------------- reporting


def test_image_grid_and_loss_curve(tmp_path):
    images = np.random.rand(6, 4, 5, 1)
    grid = tu.make_image_grid(images, nrow=3, scale=2, padding=1)
    assert grid.mode == "L" and grid.size == ((3 * 6 + 1) * 2, (2 * 5 + 1) * 2)
    rgb = tu.make_image_grid(np.zeros((4, 3, 3, 3)))
    assert rgb.mode == "RGB" and rgb.size == (2 * 4 + 1, 2 * 4 + 1)
    with pytest.raises(ValueError, match="shape"):
        tu.make_image_grid(np.zeros((3, 3)))
    path = tmp_path / "curve.png"
    tu.save_loss_curve(range(1, 31), np.linspace(1, 0.1, 30), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
