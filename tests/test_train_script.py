"""End-to-end runs of training/train.py (short real CPU runs; in-process through main(argv) where possible)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import diffusers_ddpm_ext  # noqa: F401
from diffusers_ddpm_ext import training_utils as tu

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "training" / "train.py"
# Tiny but real: a few steps, a 2-image grid with 3 sampling steps, bits/dim on 4 images with 2 timesteps each.
FAST = ["--train_batch_size", "8", "--eval_batch_size", "2", "--ddpm_num_inference_steps", "3",
        "--eval_bpd_steps", "2", "--eval_num_images", "4", "--logger", "none", "--lr_warmup_steps", "2"]


def _load_train():
    spec = importlib.util.spec_from_file_location("ddpm_ext_train_script_e2e", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN = _load_train()


def run(*argv):
    """main(argv) in this process; accelerate's singletons are reset so the next run starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    try:
        return TRAIN.main([str(a) for a in argv])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def checkpoint_tensors(path):
    out = {}
    for name in ("model.safetensors", "ema.safetensors", "timestep_sampler.safetensors"):
        if os.path.exists(os.path.join(path, name)):
            out.update({f"{name}:{k}": v for k, v in load_file(os.path.join(path, name)).items()})
    optimizer = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
    for index, state in optimizer["state"].items():
        for key, value in state.items():
            out[f"optimizer:{index}:{key}"] = value
    return out


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The no-argument default (digits-small, cosine, learned_range, hybrid), shortened by flags."""
    out = tmp_path_factory.mktemp("default") / "ddpm-digits"
    argv = ["--output_dir", out, "--max_train_steps", 4, "--checkpointing_steps", 2, *FAST]
    argv[argv.index("--logger") + 1] = "tensorboard"
    metrics = run(*argv)
    return out, metrics


def test_default_run_writes_a_loadable_pipeline(default_run):
    from diffusers import DDPMPipeline, DiffusionPipeline

    from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler
    from diffusers_ddpm_ext.unet import DDPMUNet2DModel

    out, metrics = default_run
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "unet/config.json",
                 "scheduler/scheduler_config.json", "sample_grid.png", "loss_curve.png", "metrics.json", "README.md",
                 tu.RUN_MARKER_NAME, "checkpoint-4/checkpoint.json"):
        assert (out / name).is_file(), name
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no tensorboard events"
    assert not list(out.rglob("*.bin")) and not [p for p in os.listdir(out) if p.startswith(".")]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["train_steps"] == metrics["train_steps"] == 4
    assert saved["bits_per_dim_split"] == "heldout" and 0 < saved["bits_per_dim"] < 20
    assert saved["final_loss"] > 0 and saved["wall_time_s"] > 0 and saved["num_processes"] == 1
    assert saved["loss_type"] == "hybrid" and saved["variance_type"] == "learned_range"
    assert sorted(os.listdir(out)).count("checkpoint-2") == 1 and (out / "checkpoint-2").is_dir()
    assert "hub_token" not in (out / tu.RUN_MARKER_NAME).read_text()
    assert "bits/dim" in (out / "README.md").read_text()

    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert isinstance(pipe, DDPMPipeline)
    assert isinstance(pipe.unet, DDPMUNet2DModel) and isinstance(pipe.scheduler, GaussianDiffusionScheduler)
    assert pipe.unet.config.out_channels == 2 and pipe.scheduler.config.variance_type == "learned_range"
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    image = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 16, 16, 1) and np.isfinite(image).all()

    # The exported UNet holds the EMA weights; the checkpoint keeps the (different) training weights.
    exported = load_file(str(out / "unet/diffusion_pytorch_model.safetensors"))
    ema = load_file(str(out / "checkpoint-4/ema.safetensors"))
    train = load_file(str(out / "checkpoint-4/model.safetensors"))
    names = [n for n, _ in pipe.unet.named_parameters()]
    assert all(torch.equal(exported[n], ema[n]) for n in names)
    assert any(not torch.equal(train[n], ema[n]) for n in names)


def test_output_dir_of_another_run_is_refused_and_bad_combos_fail_before_training(default_run, tmp_path):
    out, _ = default_run
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(FileExistsError, match="not empty.*--overwrite_output_dir"):
        run("--output_dir", out, "--max_train_steps", 1, *FAST)
    assert sorted(p.name for p in out.iterdir()) == before

    fresh = tmp_path / "fresh"
    # Resume from a checkpoint of another architecture (fixed variance: C output channels, not 2C).
    with pytest.raises(tu.CheckpointError, match="another architecture.*out_channels"):
        run("--output_dir", fresh, "--resume_from_checkpoint", out / "checkpoint-4", "--variance_type", "fixed_small",
            "--loss_type", "simple", *FAST)
    assert not list(fresh.glob("checkpoint-*"))
    config = json.loads((out / "unet" / "config.json").read_text())
    config["out_channels"] = 1
    (tmp_path / "unet.json").write_text(json.dumps(config))
    bad = [
        (["--loss_type", "hybrid", "--variance_type", "fixed_small"], "learned"),
        (["--class_column", "label"], "--num_class_embeds"),
        (["--unet_config", tmp_path / "unet.json"], "needs out_channels=2"),
        (["--num_class_embeds", 10, "--class_dropout_prob", 0.1, "--model_type", "unet2d"], "null class"),
    ]
    for extra, message in bad:
        with pytest.raises(ValueError, match=message):
            run("--output_dir", tmp_path / "bad", *extra, *FAST)
        assert not list((tmp_path / "bad").glob("checkpoint-*"))


def test_help_lists_flags_with_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        TRAIN.parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--dataset_name", "--train_data_dir", "--resolution", "--center_crop", "--random_flip",
                 "--train_batch_size", "--eval_batch_size", "--dataloader_num_workers", "--num_epochs",
                 "--save_images_epochs", "--save_model_epochs", "--gradient_accumulation_steps", "--learning_rate",
                 "--lr_scheduler", "--lr_warmup_steps", "--adam_beta1", "--adam_beta2", "--adam_weight_decay",
                 "--adam_epsilon", "--use_ema", "--ema_inv_gamma", "--ema_power", "--ema_max_decay", "--push_to_hub",
                 "--hub_token", "--hub_model_id", "--hub_private_repo", "--logger", "--logging_dir", "--local_rank",
                 "--mixed_precision", "--prediction_type", "--ddpm_num_steps", "--ddpm_num_inference_steps",
                 "--ddpm_beta_schedule", "--checkpointing_steps", "--checkpoints_total_limit",
                 "--resume_from_checkpoint", "--enable_xformers_memory_efficient_attention", "--output_dir",
                 "--overwrite_output_dir", "--cache_dir", "--dataset_config_name", "--model_config_name_or_path",
                 "--seed", "--max_train_steps", "--image_column", "--class_column", "--num_class_embeds",
                 "--class_dropout_prob", "--gradient_checkpointing", "--max_grad_norm", "--unet_preset",
                 "--unet_config", "--model_type", "--variance_type", "--loss_type", "--snr_gamma",
                 "--timestep_sampler", "--eval_bpd_steps", "--eval_every", "--nan_policy", "--skip_bad_images"):
        assert flag in text, flag
    assert "default: hybrid" in text and "default: learned_range" in text and "debug_" not in text


@pytest.fixture
def image_folder(tmp_path):
    """20 small grey images in two class sub-folders (resized to 16 by the loader)."""
    rng = np.random.default_rng(0)
    for index in range(20):
        folder = tmp_path / "images" / ("bars" if index % 2 else "blobs")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((20, 20)) * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{index:02d}.png")
    return tmp_path / "images"


def test_resume_is_exact_class_conditional_image_folder(image_folder, tmp_path):
    """Interrupted after step 4, resumed from checkpoint-3 (mid-epoch), ends bit-identical to a straight run.

    Exercises everything resume must restore: dropout (global RNG), noise/timestep/label-dropout generator,
    random flips, gradient accumulation, the IDM timestep sampler's history, EMA, AdamW moments, the LR
    schedule and the data position across three epoch boundaries.
    """
    from diffusers_ddpm_ext.hub import load_pipeline
    from diffusers_ddpm_ext.pipelines import ClassConditionalDDPMPipeline
    from diffusers_ddpm_ext.unet import UNET_PRESETS

    config = dict(UNET_PRESETS["digits-small"]["config"], dropout=0.1)
    config.pop("out_channels")
    (tmp_path / "unet.json").write_text(json.dumps(config))
    common = ["--train_data_dir", image_folder, "--num_class_embeds", 2, "--class_dropout_prob", 0.3,
              "--unet_config", tmp_path / "unet.json", "--random_flip", "--timestep_sampler", "loss-second-moment",
              "--train_batch_size", 4, "--gradient_accumulation_steps", 2, "--max_train_steps", 7,
              "--checkpointing_steps", 3, "--checkpoints_total_limit", 5, *FAST[2:]]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run("--output_dir", straight, *common)
    with pytest.raises(tu.SimulatedInterrupt):
        run("--output_dir", resumed, *common, "--debug_interrupt_after_step", 4)
    assert sorted(os.listdir(resumed)) == ["checkpoint-3", tu.RUN_MARKER_NAME]  # no pipeline from a dead run
    run("--output_dir", resumed, *common, "--resume_from_checkpoint", "latest")

    a, b = checkpoint_tensors(straight / "checkpoint-7"), checkpoint_tensors(resumed / "checkpoint-7")
    assert a.keys() == b.keys() and any(k.startswith("ema") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state_a = json.loads((straight / "checkpoint-7" / "training_state.json").read_text())
    state_b = json.loads((resumed / "checkpoint-7" / "training_state.json").read_text())
    assert state_a["losses"] == state_b["losses"] and len(state_a["losses"]) == 7
    assert (state_a["epoch"], state_a["batch_in_epoch"]) == (3, 2)  # 4 micro-batches (2 steps) per epoch
    exported_a = load_file(str(straight / "unet/diffusion_pytorch_model.safetensors"))
    exported_b = load_file(str(resumed / "unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(exported_a[k], exported_b[k]) for k in exported_a)

    pipe = load_pipeline(str(resumed))
    assert isinstance(pipe, ClassConditionalDDPMPipeline) and pipe.unet.config.num_class_embeds == 2
    images = pipe(class_labels=[0, 1], guidance_scale=2.0, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 1)
    assert json.loads((resumed / "metrics.json").read_text())["bits_per_dim_split"] == "train"


def test_v_prediction_with_nan_skip(tmp_path):
    metrics = run("--output_dir", tmp_path / "v", "--prediction_type", "v_prediction", "--loss_type", "simple",
                  "--variance_type", "fixed_small", "--snr_gamma", 5, "--max_train_steps", 3, "--nan_policy", "skip",
                  "--debug_nan_at_step", 2, "--checkpointing_steps", 100, *FAST)
    assert metrics["train_steps"] == 3 and metrics["skipped_steps"] == 1
    assert metrics["prediction_type"] == "v_prediction" and np.isfinite(metrics["bits_per_dim"])
    weights = load_file(str(tmp_path / "v" / "unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(tu.NonFiniteLossError, match=r"step 3 .*checkpoint-2"):
        run("--output_dir", out, "--max_train_steps", 6, "--debug_nan_at_step", 3, "--checkpointing_steps", 100,
            *FAST)
    assert not (out / "model_index.json").exists()  # nothing exported from a diverged run
    data = tu.load_checkpoint(str(out / "checkpoint-2"))
    assert data.step == 2 and all(torch.isfinite(v).all() for v in data.model_state.values())
    # It resumes (the injected NaN is gone on the second try): the guard kept a usable state.
    metrics = run("--output_dir", out, "--max_train_steps", 6, "--checkpointing_steps", 100,
                  "--resume_from_checkpoint", "latest", *FAST)
    assert metrics["train_steps"] == 6


def test_unet2d_run_overwrite_and_push_uploads_exactly_the_export(tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline, UNet2DModel

    from diffusers_ddpm_ext import hub

    uploads = []

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
            uploads.append(("create_repo", repo_id, private, self.token))

        def _record(self, repo_id, named_files, folder):
            listed = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            uploads.append(("upload", repo_id, sorted(named_files), listed,
                            {f: (folder / f).read_bytes() for f in named_files}))
            return "commit"

        def upload_folder(self, repo_id, folder_path, allow_patterns=None, **kwargs):
            return self._record(repo_id, allow_patterns, Path(folder_path))

        def create_commit(self, repo_id, operations, **kwargs):
            paths = {op.path_in_repo: Path(op.path_or_fileobj) for op in operations}
            folder = Path(os.path.commonpath([str(p) for p in paths.values()]))
            while not (folder / "model_index.json").exists():
                folder = folder.parent
            return self._record(repo_id, list(paths), folder)

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    out = tmp_path / "u2d"
    out.mkdir()
    (out / "my_notes.txt").write_text("keep me")
    (out / "checkpoint-99").mkdir()  # a previous run's checkpoint: removed by --overwrite_output_dir
    run("--output_dir", out, "--overwrite_output_dir", "--model_type", "unet2d", "--max_train_steps", 2,
        "--checkpointing_steps", 1, "--push_to_hub", "--hub_model_id", "me/digits-u2d", "--hub_private_repo",
        "--hub_token", "hf_dummy", *FAST)
    assert (out / "my_notes.txt").read_text() == "keep me" and not (out / "checkpoint-99").exists()
    assert uploads[0] == ("create_repo", "me/digits-u2d", True, "hf_dummy")
    _, repo, files, listed, contents = uploads[1]
    assert repo == "me/digits-u2d" and files == listed  # every file of the export folder, nothing else
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "README.md",
            "scheduler/scheduler_config.json", "sample_grid.png"} <= set(files)
    assert not [f for f in files if "checkpoint" in f or f.startswith("logs") or f.endswith((".pt", ".bin"))]
    # The upload is the Hub export of the pipeline published locally (plus its remote-code module files).
    for name in ("unet/diffusion_pytorch_model.safetensors", "sample_grid.png", "scheduler/scheduler_config.json"):
        assert (out / name).read_bytes() == contents[name], name
    assert json.loads(contents["model_index.json"])["scheduler"] == ["ddpm_ext_scheduler", "GaussianDiffusionScheduler"]
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # the temporary export is gone
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert isinstance(pipe.unet, UNet2DModel) and pipe.unet.config.out_channels == 2
    assert json.loads((out / "metrics.json").read_text())["model_type"] == "unet2d"


def test_two_process_run_synchronises_and_writes_one_output(tmp_path):
    out = tmp_path / "mp"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN_PY),
           "--output_dir", str(out), "--max_train_steps", "2", "--checkpointing_steps", "2",
           "--timestep_sampler", "loss-second-moment", *[str(a) for a in FAST]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = re.findall(r"\[rank (\d)\] weight checksum (\w+) ema (\w+)", proc.stdout)
    assert sorted(rank for rank, _, _ in lines) == ["0", "1"]
    assert len({(w, e) for _, w, e in lines}) == 1  # both ranks hold identical weights and EMA
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["global_batch_size"] == 16
    assert [c["rank"] for c in metrics["rank_checksums"]] == [0, 1]
    assert sorted(os.listdir(out)) == sorted(["README.md", "checkpoint-2", "loss_curve.png", "metrics.json",
                                              "model_index.json", "sample_grid.png", "scheduler",
                                              tu.RUN_MARKER_NAME, "unet"])
    data = tu.load_checkpoint(str(out / "checkpoint-2"))
    assert len(data.rng_states) == 2 and data.rng_states[0] != data.rng_states[1]
