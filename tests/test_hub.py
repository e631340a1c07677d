"""Hub export, model card, offline Hub-id loading (hand-built HF cache) and push with HfApi intercepted."""

import hashlib
import math
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx2
import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, constants
from PIL import Image

import diffusers_ddpm_ext
from diffusers_ddpm_ext import hub
from diffusers_ddpm_ext.hub import HubPushError, export_pipeline, load_pipeline, push_to_hub
from diffusers_ddpm_ext.pipelines import ClassConditionalDDPMPipeline, GaussianDiffusionPipeline
from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler
from diffusers_ddpm_ext.unet import DDPMUNet2DModel

STEPS = 10
SHA = "0123456789abcdef0123456789abcdef01234567"
PKG = Path(diffusers_ddpm_ext.__file__).parent



def tiny_unet(num_class_embeds=None, seed=0):
    torch.manual_seed(seed)
    return DDPMUNet2DModel(
        sample_size=8, in_channels=1, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        attention_resolutions=(), num_class_embeds=num_class_embeds,
    ).eval()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def sample_ddpm(pipe):
    return pipe(batch_size=2, num_inference_steps=STEPS, generator=gen(), output_type="np").images


def sample_cc(pipe):
    return pipe(class_labels=[0, 1, 2], guidance_scale=2.0, num_inference_steps=STEPS, generator=gen(),
                output_type="np").images


def build_hf_cache(export_dir: Path, cache: Path, repo_id: str, sha: str = SHA) -> Path:
    """Lay an export out as huggingface_hub's cache would after an online download of `repo_id`."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = root / "snapshots" / sha
    shutil.copytree(export_dir, snapshot)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    files = {}
    for p in sorted(snapshot.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            git_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            files[p.relative_to(snapshot).as_posix()] = {"size": len(data), "blob_id": git_sha1}
    # The file listing an online `model_info` would give; diffusers reads it offline via get_cached_repo_tree.
    (root / "trees").mkdir()
    (root / "trees" / f"{sha}.json").write_text(json.dumps({"format_version": 1, "files": files}))
    return snapshot


def tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("hub")
    ddpm = DDPMPipeline(unet=tiny_unet(), scheduler=GaussianDiffusionScheduler(num_train_timesteps=STEPS))
    cc = ClassConditionalDDPMPipeline(unet=tiny_unet(num_class_embeds=3, seed=1),
                                      scheduler=GaussianDiffusionScheduler(num_train_timesteps=STEPS))
    for p in (ddpm, cc):
        p.set_progress_bar_config(disable=True)
    metrics = {"bits/dim": 1.2345, "frechet_distance": 12.5, "num_inference_steps": STEPS}
    training = {"learning_rate": 4e-4, "max_train_steps": 100, "loss_type": "hybrid"}
    export_pipeline(ddpm, base / "ddpm", repo_id="org/ddpm-tiny", metrics=metrics, training_config=training,
                    datasets=["sklearn-digits"], num_grid_images=4, grid_inference_steps=STEPS)
    export_pipeline(cc, base / "cc", repo_id="org/cc-tiny", num_grid_images=6, grid_inference_steps=2)
    # the DDPMPipeline kept as such (no pipeline module: plain diffusers loads it offline by repo id)
    export_pipeline(ddpm, base / "keep", repo_id="org/keep-tiny", sample_grid=False, keep_pipeline_class=True)
    cache = base / "hf_cache"
    build_hf_cache(base / "ddpm", cache, "org/ddpm-tiny")
    build_hf_cache(base / "cc", cache, "org/cc-tiny")
    build_hf_cache(base / "keep", cache, "org/keep-tiny")
    return dict(base=base, ddpm=ddpm, cc=cc, cache=cache, ref_ddpm=sample_ddpm(ddpm), ref_cc=sample_cc(cc))


def test_export_layout(exported):
    ddpm_dir, cc_dir, keep_dir = (exported["base"] / name for name in ("ddpm", "cc", "keep"))
    assert sorted(tree(ddpm_dir)) == [
        "README.md", "ddpm_ext_pipeline.py", "model_index.json", "sample_grid.png", "scheduler/ddpm_ext_scheduler.py",
        "scheduler/scheduler_config.json", "unet/config.json", "unet/ddpm_ext_unet.py",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    assert sorted(tree(cc_dir)) == sorted(tree(ddpm_dir))
    assert sorted(tree(keep_dir)) == sorted(set(tree(ddpm_dir)) - {"ddpm_ext_pipeline.py", "sample_grid.png"})
    index = json.loads((ddpm_dir / "model_index.json").read_text())
    # a DDPMPipeline is exported as our pipeline: plain diffusers then samples it with any scheduler
    assert index["_class_name"] == ["ddpm_ext_pipeline", "GaussianDiffusionPipeline"]
    assert index["unet"] == ["ddpm_ext_unet", "DDPMUNet2DModel"]
    assert index["scheduler"] == ["ddpm_ext_scheduler", "GaussianDiffusionScheduler"]
    cc_index = json.loads((cc_dir / "model_index.json").read_text())
    assert cc_index["_class_name"] == ["ddpm_ext_pipeline", "ClassConditionalDDPMPipeline"]
    assert json.loads((keep_dir / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    for folder in (ddpm_dir, cc_dir, keep_dir):  # no auto_map unless asked for (it makes every load warn)
        assert not [f for f in folder.rglob("*.json") if "auto_map" in json.loads(f.read_text())]
    # the remote-code files are verbatim copies of the installed, self-contained modules
    assert (ddpm_dir / "unet/ddpm_ext_unet.py").read_bytes() == (PKG / "unet.py").read_bytes()
    assert (ddpm_dir / "scheduler/ddpm_ext_scheduler.py").read_bytes() == (PKG / "scheduler.py").read_bytes()
    assert (cc_dir / "ddpm_ext_pipeline.py").read_bytes() == (PKG / "pipelines.py").read_bytes()
    grid = Image.open(ddpm_dir / "sample_grid.png")
    assert grid.size == (128, 128)  # 2 x 2 tiles of 8 px enlarged x8
    assert Image.open(cc_dir / "sample_grid.png").size == (192, 128)  # 6 images -> 2 rows x 3 cols
    assert not list(exported["base"].glob(".*tmp-*"))  # no temp folders left behind


PLAIN_DIFFUSERS = textwrap.dedent(
    """
    import importlib.abc, inspect, json, os, sys
    class Block(importlib.abc.MetaPathFinder):  # prove that nothing imports our package
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "diffusers_ddpm_ext":
                raise ImportError("blocked " + name)
    sys.meta_path.insert(0, Block())
    import numpy as np, torch
    torch.set_num_threads(1)
    from diffusers import DiffusionPipeline
    from diffusers.utils.constants import HF_MODULES_CACHE
    from huggingface_hub import snapshot_download
    base = sys.argv[1]
    g = lambda: torch.Generator().manual_seed(0)
    out, info = {}, {}
    try:
        DiffusionPipeline.from_pretrained(base + "/ddpm")
        info["no_trust"] = "loaded"
    except ValueError as e:
        info["no_trust"] = str(e)
    loads = {
        "dir_ddpm": base + "/ddpm", "dir_cc": base + "/cc", "dir_keep": base + "/keep", "id_keep": "org/keep-tiny",
        # diffusers resolves a custom *pipeline* class by repo id through model_info (network), so offline a
        # repo with our pipeline loads from its cached snapshot folder (test_model_card runs the by-id snippet)
        "id_ddpm": snapshot_download("org/ddpm-tiny", local_files_only=True),
        "id_cc": snapshot_download("org/cc-tiny", local_files_only=True),
    }
    for key, src in loads.items():
        p = DiffusionPipeline.from_pretrained(src, trust_remote_code=True)
        p.set_progress_bar_config(disable=True)
        if key.endswith("cc"):
            out[key] = p(class_labels=[0, 1, 2], guidance_scale=2.0, num_inference_steps=10, generator=g(),
                         output_type="np").images
        else:
            out[key] = p(batch_size=2, num_inference_steps=10, generator=g(), output_type="np").images
        info[key] = [type(p).__name__, type(p).__module__, type(p.unet).__module__, type(p.scheduler).__module__,
                     inspect.getsourcefile(type(p.unet)).startswith(HF_MODULES_CACHE)]
    info["ours_imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "diffusers_ddpm_ext")
    np.savez(base + "/plain.npz", **out)
    print(json.dumps(info))
    """
)


def test_plain_diffusers_loads_export_dir_and_repo_id_without_our_package(exported):
    base = exported["base"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(base / "hf_home"),
               HF_HUB_CACHE=str(exported["cache"]), HF_MODULES_CACHE=str(base / "modules"))
    res = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, str(base)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert "trust_remote_code=True" in info["no_trust"]
    assert info["ours_imported"] == []
    assert info["dir_ddpm"] == info["id_ddpm"] == [
        "GaussianDiffusionPipeline", "diffusers_modules.local.ddpm_ext_pipeline",
        "diffusers_modules.local.ddpm_ext_unet", "diffusers_modules.local.ddpm_ext_scheduler", True,
    ]
    assert info["dir_keep"] == info["id_keep"] == [
        "DDPMPipeline", "diffusers.pipelines.ddpm.pipeline_ddpm", "diffusers_modules.local.ddpm_ext_unet",
        "diffusers_modules.local.ddpm_ext_scheduler", True,
    ]
    assert info["dir_cc"] == info["id_cc"] == [
        "ClassConditionalDDPMPipeline", "diffusers_modules.local.ddpm_ext_pipeline",
        "diffusers_modules.local.ddpm_ext_unet", "diffusers_modules.local.ddpm_ext_scheduler", True,
    ]
    plain = np.load(base / "plain.npz")
    for key in ("dir_ddpm", "id_ddpm", "dir_keep", "id_keep"):  # our pipeline draws DDPMPipeline's images
        np.testing.assert_allclose(plain[key], exported["ref_ddpm"], atol=1e-6)
    for key in ("dir_cc", "id_cc"):
        np.testing.assert_allclose(plain[key], exported["ref_cc"], atol=1e-6)


def test_installed_classes_load_export_by_repo_id_offline(exported, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # any request would raise OfflineModeIsEnabled
    cache = exported["cache"]
    pipe = load_pipeline("org/ddpm-tiny", cache_dir=cache)
    assert type(pipe) is GaussianDiffusionPipeline and type(pipe.unet) is DDPMUNet2DModel
    assert type(pipe.scheduler) is GaussianDiffusionScheduler
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(sample_ddpm(pipe), exported["ref_ddpm"], atol=1e-6)
    assert type(load_pipeline("org/keep-tiny", cache_dir=cache)) is DDPMPipeline

    cc = load_pipeline("org/cc-tiny", cache_dir=cache)
    assert type(cc) is ClassConditionalDDPMPipeline and type(cc.unet) is DDPMUNet2DModel
    cc.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(sample_cc(cc), exported["ref_cc"], atol=1e-6)

    # the component-by-component route documented in the card
    unet = DDPMUNet2DModel.from_pretrained("org/ddpm-tiny", subfolder="unet", cache_dir=cache)
    sched = GaussianDiffusionScheduler.from_pretrained("org/ddpm-tiny", subfolder="scheduler", cache_dir=cache)
    manual = DDPMPipeline(unet=unet, scheduler=sched)
    manual.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(sample_ddpm(manual), exported["ref_ddpm"], atol=1e-6)

    bf16 = load_pipeline(exported["base"] / "cc", dtype=torch.bfloat16)
    assert bf16.unet.dtype == torch.bfloat16


def test_model_card_parses_and_validates(exported):
    card = ModelCard.load(exported["base"] / "ddpm" / "README.md")
    meta = hub.validate_card_metadata(card)
    assert meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == "unconditional-image-generation"
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["sklearn-digits"]
    assert {"diffusers", "ddpm", "diffusers-ddpm-ext"} <= set(meta["tags"])
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    # quality metrics only: num_inference_steps (not a quality figure) is dropped
    assert results == {"bits/dim": pytest.approx(1.2345), "Fréchet distance": pytest.approx(12.5)}
    text = card.text
    for snippet in (
        'DiffusionPipeline.from_pretrained("org/ddpm-tiny", trust_remote_code=True)',
        "pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)",
        'load_pipeline("org/ddpm-tiny")',
        'DDPMUNet2DModel.from_pretrained("org/ddpm-tiny", subfolder="unet")',
        'GaussianDiffusionScheduler.from_pretrained("org/ddpm-tiny", subfolder="scheduler")',
        "![Samples](sample_grid.png)", "| `learning_rate` | 0.0004 |",
        "| bits/dim | 1.234 | not recorded | not recorded |", "## Limitations",
    ):
        assert snippet in text, snippet
    assert "num_inference_steps | 10" not in text and "pip install diffusers-ddpm-ext" not in text
    cc_card = ModelCard.load(exported["base"] / "cc" / "README.md")
    hub.validate_card_metadata(cc_card)
    assert "class-conditional" in cc_card.data.tags
    assert "pipe(class_labels=[0, 1, 2], guidance_scale=3.0" in cc_card.text
    assert "GaussianDiffusionPipeline(unet=unet, scheduler=DPMSolverMultistepScheduler" in cc_card.text
    assert "No evaluation figures" in cc_card.text and cc_card.data.eval_results is None
    bad = str(card).replace("library_name: diffusers", "library_name: timm")
    with pytest.raises(ValueError, match="library_name"):
        hub.validate_card_metadata(bad)
    # the packaged template is the model_cards/ template (one copy)
    repo_template = PKG.parent / "model_cards" / "model_card_template.md"
    from diffusers_ddpm_ext import model_card

    assert model_card._template_text() == repo_template.read_text(encoding="utf-8")


def test_export_from_folder_drops_checkpoints_and_logs(exported, tmp_path):
    src = tmp_path / "trained"
    exported["ddpm"].save_pretrained(src)
    (src / "checkpoint-100").mkdir()
    (src / "checkpoint-100" / "optimizer.bin").write_bytes(b"x" * 10)
    (src / "logs").mkdir()
    (src / "logs" / "events.out.tfevents").write_text("log")
    (src / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickled")
    out = export_pipeline(src, tmp_path / "out", sample_grid=False)
    files = sorted(tree(out))
    assert files == ["README.md", "ddpm_ext_pipeline.py", "model_index.json", "scheduler/ddpm_ext_scheduler.py",
                     "scheduler/scheduler_config.json", "unet/config.json", "unet/ddpm_ext_unet.py",
                     "unet/diffusion_pytorch_model.safetensors"]
    # the folder's absolute path, recorded by from_pretrained as _name_or_path, is in no exported config
    assert str(src) not in "".join((out / f).read_text() for f in files if f.endswith(".json"))
    assert not [f for f in files if f.endswith(".json") and "_name_or_path" in json.loads((out / f).read_text())]
    assert "![Samples]" not in (out / "README.md").read_text()


def test_export_refuses_nonempty_overwrites_atomically(exported, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_pipeline(exported["ddpm"], out, sample_grid=False)
    assert tree(out) == {"keep.txt": hashlib.sha256(b"precious").hexdigest()}
    # a failure half-way (bad metrics type while rendering the card) leaves the old folder as it was
    with pytest.raises(TypeError, match="metrics"):
        export_pipeline(exported["ddpm"], out, sample_grid=False, metrics=[1, 2], overwrite=True)
    assert sorted(tree(out)) == ["keep.txt"]
    with pytest.raises(ValueError, match="repo id"):
        export_pipeline(exported["ddpm"], out, sample_grid=False, repo_id="bad//id", overwrite=True)
    grid = Image.new("RGB", (10, 10), "red")
    export_pipeline(exported["ddpm"], out, sample_grid=grid, overwrite=True)
    assert "keep.txt" not in tree(out) and (out / "unet" / "ddpm_ext_unet.py").is_file()
    assert Image.open(out / "sample_grid.png").getpixel((0, 0)) == (255, 0, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or backup folders


def test_make_sample_grid():
    imgs = [Image.new("L", (16, 16), 10 * i) for i in range(5)]
    grid = hub.make_sample_grid(imgs, rows=2)
    assert grid.size == (3 * 64, 2 * 64)
    assert grid.getpixel((64 + 5, 5)) == (10, 10, 10)  # second tile, enlarged
    assert grid.getpixel((2 * 64 + 5, 64 + 5)) == (0, 0, 0)  # black padding cell
    with pytest.raises(ValueError):
        hub.make_sample_grid([])


# ------------------------------------------------------------------------------------------------ push


class FakeHub:
    """Stands in for the two HfApi methods push_to_hub calls; records instead of sending requests."""

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def install(self, monkeypatch):
        fake = self

        def create_repo(api, repo_id, **kw):
            fake.calls.append(("create_repo", repo_id, kw, api.token))
            if fake.fail_on == "create_repo":
                raise httpx2.ConnectError("Name or service not known")
            return f"https://huggingface.co/{repo_id}"

        def create_commit(api, repo_id, operations, **kw):
            fake.calls.append(("create_commit", repo_id, operations, kw))
            if fake.fail_on == "create_commit":
                raise httpx2.ReadTimeout("timed out")
            return "commit-info"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # anything else would raise, never reach out


def test_push_single_commit_with_exact_files_and_private_flag(exported, monkeypatch):
    fake = FakeHub()
    fake.install(monkeypatch)
    folder = exported["base"] / "cc"
    before = tree(folder)
    assert push_to_hub(folder, "org/cc-tiny", token="hf_test", private=True) == "commit-info"
    assert [c[0] for c in fake.calls] == ["create_repo", "create_commit"]
    _, repo_id, kw, token = fake.calls[0]
    assert repo_id == "org/cc-tiny" and kw["private"] is True and kw["exist_ok"] is True and token == "hf_test"
    ops = fake.calls[1][2]
    assert all(isinstance(op, CommitOperationAdd) for op in ops)
    assert sorted(op.path_in_repo for op in ops) == sorted(before)
    for op in ops:
        assert Path(op.path_or_fileobj).read_bytes() == (folder / op.path_in_repo).read_bytes()
    assert tree(folder) == before


def test_push_token_from_env_and_missing_token(exported, monkeypatch, tmp_path):
    fake = FakeHub()
    fake.install(monkeypatch)
    folder = exported["base"] / "ddpm"
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    push_to_hub(folder, "org/ddpm-tiny")
    assert fake.calls[0][3] == "hf_env" and fake.calls[0][2]["private"] is False
    fake.calls.clear()
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)  # no `hf auth login` token either
    with pytest.raises(HubPushError, match="HF_TOKEN.*hf auth login"):
        push_to_hub(folder, "org/ddpm-tiny")
    assert fake.calls == []


@pytest.mark.parametrize("fail_on", ["create_repo", "create_commit"])
def test_push_network_failure_leaves_export_untouched(exported, monkeypatch, fail_on):
    FakeHub(fail_on).install(monkeypatch)
    folder = exported["base"] / "ddpm"
    before = tree(folder)
    with pytest.raises(HubPushError) as err:
        push_to_hub(folder, "org/ddpm-tiny", token="hf_test")
    msg = str(err.value)
    assert fail_on in msg and "could not be reached" in msg and "intact" in msg and "re-run" in msg
    assert tree(folder) == before


@pytest.mark.parametrize("repo_id", ["org/name/extra", "bad..name", "org/na me", "", "-lead/x--y"])
def test_push_malformed_repo_id_fails_before_network(exported, monkeypatch, repo_id):
    fake = FakeHub()
    fake.install(monkeypatch)
    with pytest.raises(ValueError, match="repo id"):
        push_to_hub(exported["base"] / "ddpm", repo_id, token="hf_test")
    assert fake.calls == []


def test_cli_export_and_push(exported, tmp_path, monkeypatch, capsys):
    src = tmp_path / "saved"
    exported["ddpm"].save_pretrained(src)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"bits/dim": 2.5}))
    out = tmp_path / "exp"
    argv = ["export", str(src), str(out), "--no-sample-grid", "--metrics", str(metrics), "--repo-id", "me/m"]
    assert hub.main(argv) == 0
    assert "| bits/dim | 2.5 |" in (out / "README.md").read_text()
    assert hub.main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert hub.main(argv + ["--overwrite"]) == 0
    fake = FakeHub()
    fake.install(monkeypatch)
    assert hub.main(["push", str(out), "me/m", "--private", "--token", "hf_x"]) == 0
    assert fake.calls[0][2]["private"] is True and fake.calls[0][3] == "hf_x"
    assert hub.main(["push", str(out), "me/m/x", "--token", "hf_x"]) == 2
    assert "Malformed repo id" in capsys.readouterr().err


class NotSelfContainedUNet(DDPMUNet2DModel):
    """Defined in this test module, which imports pytest and our package: not valid remote code."""


def test_export_refuses_component_that_is_not_self_contained(tmp_path):
    torch.manual_seed(0)
    unet = NotSelfContainedUNet(sample_size=8, in_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                                norm_num_groups=4, attention_resolutions=())
    pipe = DDPMPipeline(unet=unet, scheduler=GaussianDiffusionScheduler(num_train_timesteps=STEPS))
    with pytest.raises(ValueError, match="diffusers_ddpm_ext"):
        export_pipeline(pipe, tmp_path / "out", sample_grid=False)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


# --------------------------------------------------------------------------------------------- non-finite weights


def corrupt_weights(weights_file, **values):
    """Write one value into flat position 3 of each named tensor of a safetensors file (a bit flip's effect)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights_file))
    for name, value in values.items():
        tensors[name].view(-1)[min(3, tensors[name].numel() - 1)] = value
    save_file(tensors, str(weights_file))


def test_non_finite_weights_are_refused_by_from_pretrained_of_the_model_and_of_the_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    from diffusers_ddpm_ext.unet import NonFiniteWeightsError

    for cls in (DDPMPipeline, GaussianDiffusionPipeline):
        folder = tmp_path / cls.__name__
        cls(unet=tiny_unet(), scheduler=GaussianDiffusionScheduler(num_train_timesteps=STEPS)).save_pretrained(folder)
        assert DDPMUNet2DModel.from_pretrained(folder / "unet") is not None  # finite: loads
        corrupt_weights(folder / "unet" / "diffusion_pytorch_model.safetensors",
                        **{"conv_in.weight": float("inf"), "up_blocks.0.resnets.0.conv1.bias": float("nan")})
        both = r"'conv_in.weight' holds NaN or infinite values \(1 \+inf of 72; so do 'up_blocks.0.resnets.0.conv1.bias' " \
               r"\(1 NaN of 16\)\)"
        with pytest.raises(NonFiniteWeightsError, match=f"unet: DDPMUNet2DModel weight {both}") as caught:
            DDPMUNet2DModel.from_pretrained(folder / "unet")
        assert isinstance(caught.value, ValueError)
        assert caught.value.tensor_names == ["conv_in.weight", "up_blocks.0.resnets.0.conv1.bias"]
        with pytest.raises(ValueError, match=f"{cls.__name__}: unet weight {both}"):
            DDPMUNet2DModel.from_pretrained(folder, subfolder="unet")
        with pytest.raises(ValueError, match=f"DDPMUNet2DModel weight {both}"):
            DiffusionPipeline.from_pretrained(folder)
        with pytest.raises(ValueError, match=f"{cls.__name__}: unet weight {both}"):
            load_pipeline(folder)


def test_load_pipeline_refuses_non_finite_weights_of_diffusers_models_with_the_same_check(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=STEPS)).save_pretrained(tmp_path / "p")
    corrupt_weights(tmp_path / "p" / "unet" / "diffusion_pytorch_model.safetensors", **{"conv_out.bias": -math.inf})
    with pytest.raises(ValueError, match=r"p: unet weight 'conv_out.bias' holds NaN or infinite values \(1 -inf of 1\)"):
        load_pipeline(tmp_path / "p")
