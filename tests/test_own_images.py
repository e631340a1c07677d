"""Your own images (issue 26): grey or RGB read from the data, the rgb-small preset, --unet_overrides, the run's size
and time estimate, a default --output_dir named after the data, and README's quickstart section."""

import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import FAST, ROOT, TRAIN, run_train

from diffusers_ddpm_ext import build
from diffusers_ddpm_ext import data as D
from diffusers_ddpm_ext.images import DataChannelsError
from diffusers_ddpm_ext.presets import DEFAULT_PRESETS, RECOMMENDED_LEARNING_RATES, UNET_PRESETS
from diffusers_ddpm_ext.shapes import SHAPES, make_shapes_folder
from diffusers_ddpm_ext.unet import DDPMUNet2DModel

README = ROOT / "README.md"
QUICK = [*FAST, "--max_train_steps", "2", "--lr_warmup_steps", "1", "--checkpointing_steps", "100"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Small folders of generated shapes: RGB, grey (mode L), mixed (grey plus one colour file)."""
    base = tmp_path_factory.mktemp("own")
    rgb = make_shapes_folder(str(base / "shapes"), 24, size=32, seed=1)
    grey = make_shapes_folder(str(base / "grey"), 12, size=16, seed=2, mode="L")
    mixed = make_shapes_folder(str(base / "mixed"), 11, size=16, seed=3, mode="L")
    make_shapes_folder(mixed, 1, size=16, seed=4, start=11)  # one colour image among the grey ones
    return {"rgb": rgb, "grey": grey, "mixed": mixed, "base": base}


def _validated(*argv):
    args = TRAIN.parse_args([str(a) for a in argv])
    TRAIN.validate_args(args)
    return args


# ---- the shapes folder


def test_shapes_folder_is_seeded_and_holds_every_shape(tmp_path):
    a = make_shapes_folder(str(tmp_path / "a"), 30, size=32, seed=5)
    b = make_shapes_folder(str(tmp_path / "b"), 30, size=32, seed=5)
    files = sorted(os.listdir(a))
    assert files == sorted(os.listdir(b)) and len(files) == 30
    assert {f.split("_")[0] for f in files} == set(SHAPES)
    for name in files:
        assert (Path(a) / name).read_bytes() == (Path(b) / name).read_bytes()
    first = Image.open(Path(a) / files[0])
    assert first.mode == "RGB" and first.size == (32, 32)
    pixels = np.asarray(first).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 2  # a shape on a background, with smoothed edges
    grey = Path(make_shapes_folder(str(tmp_path / "g"), 6, size=16, seed=5, mode="L"))
    assert {Image.open(p).mode for p in grey.iterdir()} == {"L"} and len(os.listdir(grey)) == 6
    with pytest.raises(ValueError, match="num_images must be an int >= 1, got 0"):
        make_shapes_folder(str(tmp_path / "c"), 0)


# ---- grey or RGB, read from the data


def test_data_channels_of_folders_datasets_and_digits(folders, tmp_path):
    rgb = D.data_channels(train_data_dir=folders["rgb"])
    assert (rgb.channels, rgb.num_colour, rgb.num_grey) == (3, 24, 0) and rgb.describe() == "all 24 images are colour"
    grey = D.data_channels(train_data_dir=folders["grey"])
    assert (grey.channels, grey.num_colour, grey.num_grey) == (1, 0, 12)
    mixed = D.data_channels(train_data_dir=folders["mixed"])
    assert (mixed.channels, mixed.num_colour, mixed.num_grey) == (3, 1, 11)
    assert mixed.describe().startswith("1 of 12 images are colour (first: ") and mixed.first_colour.endswith("11.png")
    digits = D.data_channels()
    assert digits.channels == 1 and digits.source == "the built-in digits"
    # A palette image of greys is grey, one with a colour is RGB; a broken file is left to the full check.
    odd = tmp_path / "odd"
    odd.mkdir()
    Image.new("L", (16, 16), 90).convert("P").save(odd / "grey_palette.png")
    (odd / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert D.data_channels(train_data_dir=str(odd)).channels == 1
    Image.new("RGB", (16, 16), (200, 30, 30)).convert("P").save(odd / "red_palette.png")
    assert D.data_channels(train_data_dir=str(odd)).channels == 3
    # datasets: the image feature's mode when declared, else the images themselves (a save_to_disk folder).
    images = [Image.open(os.path.join(folders["rgb"], f)) for f in sorted(os.listdir(folders["rgb"]))[:4]]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"img": images}).cast_column("img", datasets.Image()).save_to_disk(str(saved))
    found = D.data_channels(dataset_name=str(saved))
    assert (found.channels, found.num_colour, found.source) == (3, 4, f"--dataset_name {str(saved)!r}")
    declared = tmp_path / "declared"
    datasets.Dataset.from_dict({"img": images}).cast_column("img", datasets.Image(mode="L")).save_to_disk(
        str(declared))
    assert D.data_channels(dataset_name=str(declared)).channels == 1


def test_without_a_model_the_data_chooses_it(folders, caplog):
    caplog.set_level(logging.INFO, logger="diffusers_ddpm_ext.build")
    args = _validated("--train_data_dir", folders["rgb"])
    assert args.unet_preset == DEFAULT_PRESETS[3] == "rgb-small"
    assert args.learning_rate == RECOMMENDED_LEARNING_RATES["rgb-small"][0]
    (line,) = [r for r in caplog.records if "default model" in r.getMessage()]
    message = line.getMessage()
    assert line.levelno == logging.INFO and "all 24 images are colour" in message and "rgb-small" in message
    count = int(re.search(r"([\d,]+) parameters", message).group(1).replace(",", ""))
    model, _ = build.build_model(args)
    assert count == sum(p.numel() for p in model.parameters()) and model.config.in_channels == 3
    caplog.clear()
    assert _validated("--train_data_dir", folders["grey"]).unet_preset == "digits-small"
    assert _validated().unet_preset == "digits-small"  # the built-in digits: grey
    caplog.clear()
    assert _validated("--train_data_dir", folders["mixed"]).unet_preset == "rgb-small"  # RGB wins, and says so
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "1 of 12 images are colour" in warning.getMessage() and "repeated to 3 channels" in warning.getMessage()


@pytest.mark.parametrize("which, flags, words", [
    ("rgb", ["--unet_preset", "digits-small"], ["--unet_preset 'digits-small'", "in_channels=1", "in_channels=3",
                                                 "all 24 images are colour", "rgb-small", "convert the images"]),
    ("grey", ["--unet_preset", "ddpm-cifar10"], ["--unet_preset 'ddpm-cifar10'", "in_channels=3", "in_channels=1",
                                                 "grey", "digits-small"]),
    (None, ["--unet_overrides", '{"in_channels": 3}'], ["in_channels=3", "the built-in digits", "--unet_overrides"]),
    ("rgb", ["--unet_overrides", '{"in_channels": 1}'], ["--unet_preset 'rgb-small' with --unet_overrides",
                                                         "set in_channels to 3"]),
])
def test_a_model_that_disagrees_with_the_data_is_refused_before_anything_is_written(which, flags, words, folders,
                                                                                    tmp_path):
    data = ["--train_data_dir", folders[which]] if which else []
    with pytest.raises(DataChannelsError) as info:
        run_train("--output_dir", tmp_path / "run", *data, *flags, *QUICK)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)
    assert not (tmp_path / "run").exists()


def test_evaluate_refuses_data_of_other_channels(folders, tmp_path, capsys):
    from diffusers import DDPMPipeline

    from diffusers_ddpm_ext import evaluate as E
    from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler

    unet = DDPMUNet2DModel(sample_size=16, in_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                           norm_num_groups=4, attention_resolutions=())
    DDPMPipeline(unet=unet, scheduler=GaussianDiffusionScheduler()).save_pretrained(
        tmp_path / "grey-pipe")
    with pytest.raises(DataChannelsError, match=r"the pipeline's UNet .*grey-pipe.*in_channels=1.* is RGB"):
        E.evaluate_pipeline(str(tmp_path / "grey-pipe"), None, train_data_dir=folders["rgb"], device="cpu",
                            progress=False)
    with pytest.raises(SystemExit) as info:
        E.main(["--pipeline", str(tmp_path / "grey-pipe"), "--output_dir", str(tmp_path / "eval"),
                "--train_data_dir", folders["rgb"]])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the pipeline's UNet") and "in_channels=3" in err[-1]
    assert not (tmp_path / "eval").exists()


def test_compare_chooses_and_checks_the_model_by_the_data(folders, monkeypatch):
    sys.path.insert(0, str(ROOT / "training"))
    import compare as cli
    from comparison import CompareConfig
    from comparison.datasets import load_data

    seen = []
    monkeypatch.setattr(cli, "run_comparison", lambda config, *a, **k: seen.append(config) or {"verdict": [],
                                                                                                "wall_seconds": 0})
    monkeypatch.setattr(cli, "readme_table", lambda report: "")
    cli.main(["--output_dir", "unused", "--train_data_dir", folders["rgb"]])
    cli.main(["--output_dir", "unused", "--train_data_dir", folders["grey"]])
    cli.main(["--output_dir", "unused", "--train_data_dir", folders["rgb"], "--unet_overrides", '{"in_channels": 3}'])
    assert [c.preset for c in seen] == ["rgb-small", "digits-small", "digits-small"]
    with pytest.raises(DataChannelsError, match="the comparison's UNet"):
        load_data(CompareConfig(train_data_dir=folders["rgb"]), in_channels=1, resolution=16)


# ---- the rgb-small preset and --unet_overrides


def test_rgb_small_is_about_a_million_parameters_and_in_the_readme():
    with torch.device("meta"):
        model = DDPMUNet2DModel.from_preset("rgb-small")
    count = sum(p.numel() for p in model.parameters())
    assert 0.8e6 < count < 1.3e6 and model.config.out_channels == 6 and model.config.in_channels == 3
    assert UNET_PRESETS["rgb-small"]["config"]["sample_size"] == 32
    assert f"| `rgb-small` |" in README.read_text() and f"| {count:,} |" in README.read_text()
    assert build.learning_rate_for_size(count) == RECOMMENDED_LEARNING_RATES["rgb-small"][0]


def test_unet_overrides_apply_on_top_of_any_model_with_the_config_checks(folders, tmp_path):
    args = _validated("--train_data_dir", folders["rgb"], "--unet_overrides", '{"block_out_channels": [16, 32, 32]}')
    model, _ = build.build_model(args)
    assert tuple(model.config.block_out_channels) == (16, 32, 32) and model.config.in_channels == 3
    size = sum(p.numel() for p in model.parameters())
    assert args.learning_rate == build.learning_rate_for_size(size) != RECOMMENDED_LEARNING_RATES["rgb-small"][0]
    same = _validated("--unet_preset", "digits-small", "--unet_overrides", '{"dropout": 0.1}')
    assert same.learning_rate == 2e-3 and build.build_model(same)[0].config.dropout == 0.1  # same size: same rate
    config = dict(UNET_PRESETS["digits-small"]["config"])
    config.pop("out_channels")
    (tmp_path / "unet.json").write_text(json.dumps(config))
    from_file = build.build_model(_validated("--unet_config", tmp_path / "unet.json", "--unet_overrides",
                                             '{"layers_per_block": 2}'))[0]
    assert from_file.config.layers_per_block == 2
    bad = [
        ('{"num_res_blocks": 2}', ["--unet_overrides", "'num_res_blocks'", "not a DDPMUNet2DModel config key",
                                   "allowed:", "layers_per_block"]),
        ('{"norm_num_groups": 7}', ["--unet_preset 'digits-small' with --unet_overrides", "norm_num_groups`=7"]),
        ('{"upsample_type": "pixelshuffle"}', ["upsample_type", "'pixelshuffle'", "allowed"]),
        ('{"num_class_embeds": 10}', ["num_class_embeds", "--num_class_embeds"]),
        ('{"sample_size": 32}', ["sample_size=32", "--resolution is 16"]),
    ]
    for overrides, words in bad:
        extra = ["--resolution", "16"] if "sample_size" in overrides else []
        with pytest.raises(ValueError) as info:
            _validated("--unet_overrides", overrides, *extra)
        for word in words:
            assert word in str(info.value), (word, str(info.value))
    with pytest.raises(SystemExit):  # not JSON: argparse's one-line error
        TRAIN.parse_args(["--unet_overrides", "{dropout: 0.1}"])
    with pytest.raises(ValueError, match=r"--unet_config .*unknown.json' has key 'num_res_blocks'.*allowed: "):
        (tmp_path / "unknown.json").write_text(json.dumps({**config, "num_res_blocks": 2}))
        _validated("--unet_config", tmp_path / "unknown.json")


# ---- the run: its size and time estimate, its folder named after the data


def test_run_logs_its_size_steps_and_a_time_estimate(caplog):
    from diffusers_ddpm_ext.progress import RunClock, format_duration
    from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler
    from diffusers_ddpm_ext.trainer import TrainConfig, Trainer, count_parameters

    caplog.set_level(logging.INFO, logger="diffusers_ddpm_ext.trainer")
    torch.manual_seed(0)
    model = DDPMUNet2DModel(sample_size=8, in_channels=1, out_channels=2, block_out_channels=(8, 8),
                            layers_per_block=1, attention_resolutions=(), add_attention=False, norm_num_groups=4)
    trainer = Trainer(model, GaussianDiffusionScheduler(num_train_timesteps=10, variance_type="learned_range"),
                      TrainConfig(loss_type="hybrid", lr_warmup_steps=1, use_ema=False, save_images_epochs=None,
                                  checkpointing_steps=None), max_train_steps=8)
    loader = torch.utils.data.DataLoader(torch.rand(16, 1, 8, 8) * 2 - 1, batch_size=4)  # 4 steps per epoch
    trainer.run(loader, progress=False)
    lines = [r.getMessage() for r in caplog.records]
    start = [m for m in lines if m.startswith("training ")]
    assert len(start) == 1 and f"training {count_parameters(model):,} parameters for 8 optimizer steps" in start[0]
    assert "4 per epoch" in start[0] and "global batch 4" in start[0]
    (estimate,) = [m for m in lines if re.match(r"step \d+/8: ", m)]
    match = re.match(r"step (\d+)/8: ~([\d.]+) s/step, about (\d+) (s|min|h)", estimate)
    assert match and int(match.group(1)) == 6 and float(match.group(2)) > 0, estimate
    # A resumed part says where it starts; a slow first step alone gives the estimate after after_seconds.
    caplog.clear()
    clock = RunClock(100, start_step=40, after_seconds=0.0)
    clock.log_start(1234, 10, None)
    clock.log_estimate(41)
    clock.log_estimate(42)  # once only
    assert [r.getMessage() for r in caplog.records][0].startswith("training 1,234 parameters for 100 optimizer steps "
                                                                  "(60 to go from step 40, 10 per epoch)")
    assert len(caplog.records) == 2 and clock.seconds_per_step > 0
    assert (format_duration(42), format_duration(600), format_duration(7500)) == ("42 s", "10 min", "2 h 5 min")
    caplog.clear()
    RunClock(5, 0, enabled=False).log_start(10, 1)  # not the main process: silent
    assert not caplog.records


def test_default_output_dir_is_named_after_the_data_and_never_reused(folders, tmp_path, monkeypatch, caplog):
    saved = tmp_path / "my_saved"
    saved.mkdir()
    assert build.default_output_dir() == "ddpm-digits"
    assert build.default_output_dir(train_data_dir=folders["rgb"] + "/") == "ddpm-shapes"
    assert build.default_output_dir(dataset_name="user/photos") == "ddpm-user-photos"
    assert build.default_output_dir(dataset_name=str(saved)) == "ddpm-my_saved"
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO)
    metrics = run_train("--train_data_dir", folders["rgb"], *QUICK)  # no model, no --output_dir
    out = tmp_path / "ddpm-shapes"
    assert metrics["train_steps"] == 2 and (out / "model_index.json").is_file()
    unet = json.loads((out / "unet" / "config.json").read_text())
    assert (unet["in_channels"], unet["out_channels"], unet["block_out_channels"]) == (3, 6, [32, 64, 64])
    assert json.loads((out / "training_args.json").read_text())["unet_preset"] == "rgb-small"
    assert any(r.getMessage().startswith("training 1,114,822 parameters for 2 optimizer steps") for r in caplog.records)
    with pytest.raises(FileExistsError) as info:
        run_train("--train_data_dir", folders["rgb"], *QUICK)
    message = str(info.value)
    for word in ("'ddpm-shapes'", "already holds a run", "--output_dir", "--overwrite_output_dir",
                 "--resume_from_checkpoint latest"):
        assert word in message, (word, message)
    args = TRAIN.parse_args(["--train_data_dir", folders["rgb"], "--resume_from_checkpoint", "latest"])
    build.check_default_output_dir(args)  # continuing or replacing the run is asked for: no refusal
    build.check_default_output_dir(TRAIN.parse_args(["--train_data_dir", folders["rgb"], "--overwrite_output_dir"]))


# ---- README: the own-images quickstart works as written


def _section():
    text = README.read_text()
    start = text.index("## Train on your own images")
    return text[start:text.index("\n## ", start + 3)]


def test_readme_quickstart_commands_and_snippet_run(tmp_path, monkeypatch):
    """The section's commands, in order, on a small shapes folder: the folder command, train.py's flags (parsed and
    validated: the rgb-small default), evaluate and export for real on a tiny stand-in of the trained pipeline, and
    the sampling snippet."""
    from diffusers_ddpm_ext import evaluate as E
    from diffusers_ddpm_ext import hub, shapes
    from diffusers_ddpm_ext.pipelines import GaussianDiffusionPipeline

    section = _section()
    commands = [" ".join(line.rstrip("\\").split("#")[0].split()) for block in
                re.findall(r"```bash\n(.*?)```", section, flags=re.S) for line in block.replace("\\\n", " ").splitlines()]
    commands = [c for c in commands if c]
    monkeypatch.chdir(tmp_path)
    by_tool = {}
    for command in commands:
        words = shlex.split(command)
        tool = next(w for w in words if w.endswith("train.py") or w.startswith("diffusers_ddpm_ext."))
        by_tool[tool] = words[words.index(tool) + 1:]
    folder_args = by_tool["diffusers_ddpm_ext.shapes"]
    folder_args[folder_args.index("--num_images") + 1] = "24"  # the same command, a smaller folder
    shapes.main(folder_args)
    train = TRAIN.parse_args(by_tool["training/train.py"])
    TRAIN.validate_args(train)
    assert train.unet_preset == "rgb-small" and train.output_dir == "ddpm-shapes" and train.train_data_dir == "shapes"
    # A tiny stand-in of what train.py writes (the same classes, channels and size), then evaluate and export.
    torch.manual_seed(0)
    unet = DDPMUNet2DModel.from_preset("rgb-small", block_out_channels=(8, 16, 16), norm_num_groups=4)
    scheduler = build.build_noise_scheduler(100, max_beta=0.5)
    GaussianDiffusionPipeline(unet=unet, scheduler=scheduler).save_pretrained("ddpm-shapes")
    GaussianDiffusionPipeline(unet=unet, scheduler=scheduler)(batch_size=4, num_inference_steps=2,
                                                               output_type="pil").images[0].save(
        "ddpm-shapes/sample_grid.png")
    evaluate = by_tool["diffusers_ddpm_ext.evaluate"]
    report = E.main(evaluate + ["--bpd_timesteps", "4", "--no_progress"])
    assert report["sample_quality"] == [] and report["in_channels"] == 3 and report["bits_per_dim"]["num_images"] > 0
    assert hub.main(by_tool["diffusers_ddpm_ext.hub"]) == 0
    export = by_tool["diffusers_ddpm_ext.hub"][2]
    assert (tmp_path / export / "model_index.json").is_file() and (tmp_path / export / "README.md").is_file()
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    images = namespace["images"]
    assert len(images) == 16 and images[0].size == (32, 32) and images[0].mode == "RGB"
    assert type(namespace["pipe"].scheduler).__name__ == "DPMSolverMultistepScheduler"
