"""`python -m diffusers_ddpm_ext.evaluate`: end to end on tiny saved pipelines (RGB folder + tiny DINOv2, digits)."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

from diffusers_ddpm_ext import ClassConditionalDDPMPipeline, DDPMUNet2DModel, GaussianDiffusionScheduler
from diffusers_ddpm_ext import data as D
from diffusers_ddpm_ext import evaluate as E
from diffusers_ddpm_ext import metrics as M
from diffusers_ddpm_ext.likelihood import estimate_bits_per_dim

from test_metrics import save_tiny_dinov2

T = 20  # training timesteps of the tiny pipelines


def save_tiny_pipeline(folder, in_channels=3, num_class_embeds=None, sample_size=8, seed=0, num_train_timesteps=T):
    torch.manual_seed(seed)
    unet = DDPMUNet2DModel(sample_size=sample_size, in_channels=in_channels, block_out_channels=(8, 16),
                           layers_per_block=1, norm_num_groups=4, attention_resolutions=(),
                           num_class_embeds=num_class_embeds)
    scheduler = GaussianDiffusionScheduler(num_train_timesteps=num_train_timesteps)
    cls = DDPMPipeline if num_class_embeds is None else ClassConditionalDDPMPipeline
    cls(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return str(folder)


def write_rgb_folder(root, n=24, size=12):
    os.makedirs(root)
    rng = np.random.default_rng(0)
    for i in range(n):
        # Smooth colour blobs: images the tiny encoder gives varied features.
        small = rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(root / f"img_{i:02d}.png")
    return str(root)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("evaluate")
    return {"rgb_pipe": save_tiny_pipeline(base / "rgb_pipe"), "folder": write_rgb_folder(base / "photos"),
            "encoder": str(save_tiny_dinov2(base / "tiny-dinov2")), "base": base,
            "classifier_cache": str(base / "clf_cache")}  # the real default digits classifier, trained once here


def _quick(**over):
    kw = dict(num_inference_steps=[2, 5], num_images=8, fd_bootstrap=3, kid_num_subsets=5, bpd_num_images=4,
              bpd_timesteps=4, sample_batch_size=5, grid_num_images=6, device="cpu", progress=False)
    kw.update(over)
    return kw


def test_rgb_folder_with_a_pretrained_encoder(setup, tmp_path):
    out = tmp_path / "report"
    report = E.evaluate_pipeline(setup["rgb_pipe"], str(out), train_data_dir=setup["folder"], validation_size=8,
                                 feature_extractor=setup["encoder"], **_quick())
    assert sorted(os.listdir(out)) == ["report.json", "report.md", "samples_2_steps.png", "samples_5_steps.png"]
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    data = report["data"]
    assert (data["split"], data["num_images"], data["num_train_images"]) == ("validation", 8, 16)
    # Bits/dim: the bound of the process the pipeline samples with, equal to a direct estimate.
    bpd = report["bits_per_dim"]
    assert (bpd["split"], bpd["num_images"], bpd["num_levels"], bpd["network_calls_per_image"]) == \
        ("validation", 4, 256, 4)
    assert bpd["clip_denoised"] is True and "stratified" in bpd["method"] and bpd["standard_error"] > 0
    split = D.load_train_validation_split(train_data_dir=setup["folder"], resolution=8, in_channels=3,
                                          validation_size=8)
    images, _ = D.dataset_to_tensors(split.validation, 4)
    pipe = E.load_pipeline(setup["rgb_pipe"], "cpu")
    direct = estimate_bits_per_dim(pipe.unet, pipe.scheduler, images, num_timesteps_sampled=4, num_levels=256,
                                   generator=torch.Generator().manual_seed(0), progress=False, clip_denoised=True)
    assert bpd["bits_per_dim"] == pytest.approx(direct.mean, rel=1e-6)
    assert bpd["monte_carlo_standard_error"] == pytest.approx(direct.mean_standard_error, rel=1e-6)
    # Sample quality: same N at every step count, the split and the encoder named.
    steps = [q["num_inference_steps"] for q in report["sample_quality"]]
    assert steps == [2, 5]
    for q in report["sample_quality"]:
        assert (q["num_generated"], q["num_reference"], q["split"]) == (8, 8, "validation")
        assert q["fd"] > 0 and q["fd_standard_error"] > 0 and 0 <= q["precision"] <= 1
        assert q["feature_dim"] == 32 and q["mode_coverage"] is None
        # SWD beside FD (8 px images: one pyramid level), with the real-data floor of 8 training images.
        assert q["swd_resolutions"] == [8] and q["swd"] == q["swd_8"] > 0 and q["swd_standard_error"] > 0
        floor = q["swd_real_data_floor"]
        assert (floor["n_real"], floor["n_reference"], floor["split"]) == (8, 8, "train vs validation")
        assert 0 < floor["swd"] and floor == report["sample_quality"][0]["swd_real_data_floor"]  # computed once
    assert report["feature_extractor"]["name"] == setup["encoder"]
    assert report["feature_extractor"]["model_type"] == "dinov2"
    assert report["feature_extractor"]["pooling"] == "cls"  # "auto" on a ViT: the CLS token
    # The FD figure is the metric of the sampled images against the validation images.
    generated = E.generate_images(pipe, 8, 5, batch_size=5, seed=0, progress=False)
    reference, _ = D.dataset_to_tensors(split.validation)
    enc = M.load_image_encoder(setup["encoder"], device="cpu")
    expected = M.frechet_distance(M.extract_features(enc, generated), M.extract_features(enc, reference)).distance
    assert report["sample_quality"][1]["fd"] == pytest.approx(expected, rel=1e-6)
    md = (out / "report.md").read_text()
    for text in ("split **validation**, 8 images", "N = 8 images at every step count", "biased upward at small N",
                 "compare FDs only at equal N", "| 5 | 8 | 8 |", "![5 steps](samples_5_steps.png)",
                 "| real-data floor: 8 train images | 8 | 8 |", "8 px level ± s.e.", "Laplacian pyramid levels 8 px"):
        assert text in md, text
    with Image.open(out / "samples_2_steps.png") as grid:
        assert grid.mode == "RGB"
    # An existing report is refused, then replaced with overwrite.
    with pytest.raises(FileExistsError, match="--overwrite"):
        E.evaluate_pipeline(setup["rgb_pipe"], str(out), train_data_dir=setup["folder"], **_quick())
    again = E.evaluate_pipeline(setup["rgb_pipe"], str(out), train_data_dir=setup["folder"], validation_size=8,
                                feature_extractor=setup["encoder"], overwrite=True,
                                **_quick(num_inference_steps=[5], bpd_num_images=0))
    assert again["bits_per_dim"] is None and again["sample_quality"][0]["fd"] == pytest.approx(expected, rel=1e-6)


class LabelSpy:
    """A class-conditional pipeline that records the labels it is asked for."""

    def __init__(self, pipe):
        self.pipe, self.unet, self.calls = pipe, pipe.unet, []

    def __call__(self, class_labels=None, guidance_scale=1.0, **kwargs):
        self.calls.append(list(class_labels))
        return self.pipe(class_labels=class_labels, guidance_scale=guidance_scale, **kwargs)


def test_digits_with_the_digits_classifier_through_the_command_line(setup, tmp_path, monkeypatch):
    monkeypatch.setenv(M.CACHE_ENV, setup["classifier_cache"])
    pipe_dir = save_tiny_pipeline(tmp_path / "digits_pipe", in_channels=1, num_class_embeds=10)
    out = tmp_path / "eval"
    report = E.main(["--pipeline", pipe_dir, "--output_dir", str(out), "--num_inference_steps", "3",
                     "--num_images", "20", "--validation_size", "60", "--bpd_num_images", "6", "--bpd_timesteps",
                     "4", "--fd_bootstrap", "3", "--kid_num_subsets", "5", "--device", "cpu", "--no_progress"])
    assert report["class_conditional"] is True and report["data"]["split"] == "heldout"
    assert report["data"]["num_images"] == 60 and report["data"]["num_train_images"] == 1497
    assert report["bits_per_dim"]["num_levels"] == D.DIGITS_NUM_LEVELS
    assert "conditional on the images' class labels" in report["bits_per_dim"]["method"]
    q = report["sample_quality"][0]
    assert (q["num_generated"], q["num_reference"], q["split"]) == (20, 60, "heldout")
    assert report["feature_extractor"]["name"] == E.DIGITS_EXTRACTOR
    assert report["feature_extractor"]["heldout_accuracy"] > 0.9
    assert q["mode_coverage"] is not None and len(q["class_histogram"]) == 10
    assert os.path.isfile(out / "samples_3_steps.png")
    # Class-conditional sampling asks for the labels round-robin.
    spy = LabelSpy(E.load_pipeline(pipe_dir, "cpu"))
    images = E.generate_images(spy, 13, 2, batch_size=5, num_classes=10, progress=False)
    assert images.shape == (13, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    assert spy.calls == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 1, 2]]


def test_diffusers_scheduler_pipeline_and_skips(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=T)).save_pretrained(tmp_path / "baseline")
    report = E.evaluate_pipeline(str(tmp_path / "baseline"), None, **_quick(num_inference_steps=[]))
    assert report["sample_quality"] == [] and report["scheduler_class"] == "DDPMScheduler"
    bpd = report["bits_per_dim"]
    assert bpd["clip_denoised"] is True and bpd["num_train_timesteps"] == T and np.isfinite(bpd["bits_per_dim"])
    assert not os.path.exists(tmp_path / "report.json")  # output_dir None writes nothing


def test_bad_arguments_fail_early(setup, tmp_path):
    kw = dict(train_data_dir=setup["folder"], device="cpu", progress=False)
    with pytest.raises(ValueError, match="resolution 16 differs from the pipeline's sample_size 8"):
        E.evaluate_pipeline(setup["rgb_pipe"], None, resolution=16, **kw)
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1, got 0"):
        E.evaluate_pipeline(setup["rgb_pipe"], None, num_inference_steps=[0], **kw)
    with pytest.raises(ValueError, match=r"num_inference_steps \[25\] exceed the scheduler's num_train_timesteps=20"):
        E.evaluate_pipeline(setup["rgb_pipe"], None, num_inference_steps=[5, 25], **kw)
    with pytest.raises(ValueError, match="repeated"):
        E.evaluate_pipeline(setup["rgb_pipe"], None, num_inference_steps=[5, 5], **kw)
    with pytest.raises(ValueError, match="num_images must be an int >= 4"):
        E.evaluate_pipeline(setup["rgb_pipe"], None, num_images=2, **kw)
    with pytest.raises(ValueError, match="could not load the pipeline"):
        E.evaluate_pipeline(str(tmp_path / "nothing"), None, **kw)
    cc = save_tiny_pipeline(tmp_path / "cc", num_class_embeds=3)
    with pytest.raises(ValueError, match="class-conditional but the data has no class labels"):
        E.evaluate_pipeline(cc, None, num_inference_steps=[5], **kw)
    with pytest.raises(SystemExit):
        E.main(["--pipeline", "x", "--output_dir", "y", "--validation_size", "lots"])


def test_readme_snippet_runs(setup, tmp_path, monkeypatch):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("## Evaluate a trained pipeline")
    section = text[start:text.find("\n## ", start + 3)]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(M.CACHE_ENV, setup["classifier_cache"])
    save_tiny_pipeline(tmp_path / "ddpm-digits", in_channels=1, num_train_timesteps=100)  # a stand-in for train.py's
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    report = namespace["report"]
    assert [q["num_generated"] for q in report["sample_quality"]] == [200, 200]
    assert report["data"]["split"] == "heldout" and os.path.isfile(tmp_path / "eval-digits" / "report.md")


def test_split_matches_training_when_bad_images_are_skipped(setup, tmp_path):
    import shutil

    folder = tmp_path / "with_bad"
    shutil.copytree(setup["folder"], folder)
    (folder / "zz_corrupt.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipped 1 of 25"):
        training = D.load_train_validation_split(train_data_dir=str(folder), resolution=8, in_channels=3,
                                                 skip_bad_images=True, validation_size=0.25)
    with pytest.warns(UserWarning, match="skipped 1 of 25"):
        report = E.evaluate_pipeline(setup["rgb_pipe"], None, train_data_dir=str(folder), skip_bad_images=True,
                                     validation_size=0.25, **_quick(num_inference_steps=[]))
    assert report["data"] == json.loads(json.dumps(training.info))
    assert report["bits_per_dim"]["num_images"] == 4


def test_non_finite_weights_are_refused_before_any_work(setup, tmp_path, monkeypatch):
    """One +inf weight (ours, refused by from_pretrained) or one NaN (diffusers' UNet2DModel, refused by the check
    after loading): `python -m diffusers_ddpm_ext.evaluate` prints one `error:` line naming the tensor and exits 2
    without reading data, sampling or writing anything."""
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    from diffusers_ddpm_ext.unet import NonFiniteWeightsError

    ours = save_tiny_pipeline(tmp_path / "ours_inf")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=T)).save_pretrained(tmp_path / "theirs_nan")
    for folder, name, value in ((ours, "conv_in.weight", float("inf")),
                                (tmp_path / "theirs_nan", "conv_out.bias", float("nan"))):
        weights = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
        tensors = load_file(weights)
        tensors[name].view(-1)[0] = value
        save_file(tensors, weights)
    # in process: refused at load, before the data is read
    monkeypatch.setattr(D, "load_train_validation_split", lambda *a, **k: pytest.fail("data read"))
    for folder, name in ((ours, "conv_in.weight"), (tmp_path / "theirs_nan", "conv_out.bias")):
        with pytest.raises(NonFiniteWeightsError, match=f"unet.* weight '{name}' holds NaN or infinite values"):
            E.evaluate_pipeline(str(folder), str(tmp_path / "never"), train_data_dir=setup["folder"], **_quick())
        assert not os.path.exists(tmp_path / "never")
    # the command line
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for folder, name, kind in ((ours, "conv_in.weight", "1 +inf"), (tmp_path / "theirs_nan", "conv_out.bias", "1 NaN")):
        out = tmp_path / f"report_{os.path.basename(folder)}"
        res = subprocess.run(
            [sys.executable, "-m", "diffusers_ddpm_ext.evaluate", "--pipeline", str(folder), "--output_dir", str(out),
             "--train_data_dir", setup["folder"], "--validation_size", "8", "--feature_extractor", setup["encoder"],
             "--num_inference_steps", "2", "--num_images", "4", "--bpd_num_images", "2", "--bpd_timesteps", "2",
             "--fd_bootstrap", "0", "--kid_num_subsets", "2", "--device", "cpu", "--no_progress"],
            capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
        errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
        assert str(folder) in errors[0] and f" weight '{name}' holds NaN or infinite values ({kind} of" in errors[0]
        assert "wrote" not in res.stdout and not os.path.exists(out)


def test_a_thresholded_scheduler_is_evaluated_with_the_bound_it_samples_as_train_py_does():
    """Issue 27 item 2: "does the sampler clip x̂_0?" had four answers; the evaluate CLI ignored `thresholding`, so it
    reported another bound than train.py for a thresholded model. One rule now (likelihood.sampler_clips_x0)."""
    from diffusers_ddpm_ext import trainer as tr
    from diffusers_ddpm_ext.likelihood import sampler_clips_x0

    torch.manual_seed(0)
    unet = DDPMUNet2DModel(sample_size=8, in_channels=1, out_channels=2, block_out_channels=(8, 16),
                           layers_per_block=1, norm_num_groups=4, attention_resolutions=()).eval()
    images = torch.randint(0, 17, (4, 1, 8, 8)).float() / 8 - 1
    for config in ({"thresholding": True, "clip_sample": False}, {"clip_sample": True}, {"clip_sample": False}):
        scheduler = GaussianDiffusionScheduler(num_train_timesteps=20, variance_type="learned_range", **config)
        expected = sampler_clips_x0(scheduler)
        assert tr.Trainer(unet, scheduler, max_train_steps=1).clip_denoised is expected
        got = E.evaluate_bits_per_dim(unet, scheduler, images, None, num_levels=17, split="heldout",
                                      num_timesteps_sampled=4, progress=False)
        reference = estimate_bits_per_dim(unet, scheduler, images, num_levels=17, num_timesteps_sampled=4,
                                          generator=torch.Generator().manual_seed(0), clip_denoised=expected)
        assert got["clip_denoised"] is expected
        assert got["bits_per_dim"] == pytest.approx(float(reference.mean), rel=1e-6)
    assert sampler_clips_x0(DDPMScheduler(thresholding=True, clip_sample=False))


def test_offline_the_cli_decides_at_once_reports_swd_and_a_named_missing_encoder_exits_2(setup, tmp_path):
    """Issue 25 §2 and 26 item 5. The Hub does not answer (HF_ENDPOINT on a closed port, HF_HUB_OFFLINE unset) and
    the default encoder is not cached: one warning line naming --feature_extractor, a report with SWD beside its
    floor, exit 0, within seconds (before: ~95 s of Hub retries after bits/dim, then a raw ValueError and no
    report). An encoder named explicitly: one `error:` line and exit code 2 before anything is computed."""
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(OMP_NUM_THREADS="1", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "empty-hf-home"))
    args = [sys.executable, "-m", "diffusers_ddpm_ext.evaluate", "--pipeline", setup["rgb_pipe"], "--train_data_dir",
            setup["folder"], "--validation_size", "8", "--num_inference_steps", "2", "--num_images", "6",
            "--bpd_num_images", "2", "--bpd_timesteps", "2", "--device", "cpu", "--no_progress"]
    out = tmp_path / "report"
    start = time.perf_counter()
    res = subprocess.run(args + ["--output_dir", str(out)], capture_output=True, text=True, env=env, timeout=600)
    seconds = time.perf_counter() - start
    assert res.returncode == 0, res.stderr[-3000:]
    warnings = [line for line in res.stderr.splitlines() if " WARNING " in line and "--feature_extractor" in line]
    assert len(warnings) == 1 and "facebook/dinov2-base" in warnings[0], res.stderr[-3000:]
    assert "no answer from http://127.0.0.1:9" in warnings[0] and "Retry" not in res.stderr
    report = json.loads((out / "report.json").read_text())
    (q,) = report["sample_quality"]
    assert q["fd"] is None and q["kid_mean"] is None and q["fd_method"].startswith("not computed")
    assert q["swd"] > 0 and q["swd_8_standard_error"] > 0 and q["num_generated"] == 6
    assert q["swd_real_data_floor"]["n_real"] == 6 and report["feature_extractor"]["tried"] == "facebook/dinov2-base"
    assert "| real-data floor: 6 train images |" in (out / "report.md").read_text()

    missing = tmp_path / "report-missing"
    start_missing = time.perf_counter()
    res = subprocess.run(args + ["--output_dir", str(missing), "--feature_extractor", "tiny-org/not-cached"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in res.stderr and "Retry" not in res.stderr, res.stderr[-3000:]
    assert errors[0].startswith("error: --feature_extractor tiny-org/not-cached: the image encoder "
                                "'tiny-org/not-cached' is not in the Hugging Face cache")
    assert "no answer from http://127.0.0.1:9" in errors[0]
    assert "bits/dim on" not in res.stderr and not missing.exists()  # nothing computed, nothing written
    print(f"offline report {seconds:.1f} s, missing encoder {time.perf_counter() - start_missing:.1f} s")
