"""Model cards: quality metrics only (split, N, method), the training configuration and data set always, no local
paths, the run's own grid step count, install lines that work, a local card that claims only what the folder has,
`auto_map` as an opt-in, and every python snippet of every card run offline (hand-built HF cache)."""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from huggingface_hub import ModelCard
from PIL import Image

from diffusers_ddpm_ext import hub
from diffusers_ddpm_ext.hub import card_metric_rows, export_pipeline, render_model_card
from diffusers_ddpm_ext.model_card import DEFAULT_METRICS_NOTE
from diffusers_ddpm_ext.pipelines import ClassConditionalDDPMPipeline, GaussianDiffusionPipeline
from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler
from diffusers_ddpm_ext.unet import DDPMUNet2DModel
from test_hub import build_hf_cache

T, GRID_STEPS = 50, 3


def tiny_unet(num_class_embeds=None):
    torch.manual_seed(0)
    return DDPMUNet2DModel(sample_size=8, in_channels=1, out_channels=2, block_out_channels=(8, 16),
                           layers_per_block=1, norm_num_groups=4, attention_resolutions=(),
                           num_class_embeds=num_class_embeds).eval()


def scheduler():
    return GaussianDiffusionScheduler(num_train_timesteps=T, beta_schedule="cosine", variance_type="learned_range")


def training_args(out_dir, **overrides):
    """What training/train.py writes to training_args.json (the keys the card reads, and a few others)."""
    return {"dataset_name": None, "train_data_dir": None, "resolution": 8, "ddpm_num_inference_steps": GRID_STEPS,
            "ddpm_num_steps": T, "eval_num_images": 300, "eval_bpd_steps": 5, "learning_rate": 2e-3,
            "output_dir": str(out_dir), "seed": 0, **overrides}


# What training/train.py writes to metrics.json: one quality figure among bookkeeping.
TRAIN_METRICS = {
    "bits_per_dim": 1.4321, "bits_per_dim_standard_error": 0.0123, "bits_per_dim_split": "heldout",
    "bits_per_dim_num_images": 300, "bits_per_dim_clip_denoised": True, "eval_bpd_steps": 5, "train_steps": 828,
    "skipped_steps": 0, "final_loss": 0.05, "train_time_s": 301.5, "wall_time_s": 333.3, "num_processes": 1,
    "global_batch_size": 32, "num_parameters": 925985, "model_type": "ours", "loss_type": "hybrid",
    "variance_type": "learned_range", "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon",
    "rank_checksums": [{"rank": 0, "weights": "abc123", "ema": "def456"}],
}


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A training output folder as train.py leaves it (DDPMPipeline, local card, run files), and its export made
    with README's own command."""
    base = tmp_path_factory.mktemp("card")
    folder = base / "digits-run"
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=scheduler())
    pipe.save_pretrained(folder)
    config = training_args(folder)
    (folder / "training_args.json").write_text(json.dumps(config))
    (folder / "metrics.json").write_text(json.dumps(TRAIN_METRICS))
    # train.py's local card: render_model_card without module files, train.py's card figures
    render_model_card(pipe, repo_id="your-username/digits-run", metrics={"bits/dim": 1.4321, "train_steps": 828},
                      training_config=config, sample_grid=hub.GRID_NAME).save(folder / "README.md")
    export = base / "export"
    argv = ["export", str(folder), str(export), "--repo-id", "org/digits", "--metrics", str(folder / "metrics.json"),
            "--grid-size", "4"]
    assert hub.main(argv) == 0  # README's export command
    cc = ClassConditionalDDPMPipeline(unet=tiny_unet(num_class_embeds=3), scheduler=scheduler())
    export_pipeline(cc, base / "cc", repo_id="org/digits-cc", training_config=training_args(folder),
                    num_grid_images=3, auto_map=True, source_url="https://example.org/diffusers-ddpm-ext.git")
    cache = base / "hf_cache"
    for name, repo in (("export", "org/digits"), ("cc", "org/digits-cc")):
        build_hf_cache(base / name, cache, repo)
    return dict(base=base, folder=folder, export=export, cc=base / "cc", cache=cache, pipe=pipe)


def test_only_quality_metrics_each_with_split_n_and_method(run):
    card = ModelCard.load(run["export"] / "README.md")
    table = card.text[card.text.index("## Evaluation"):card.text.index("## Limitations")]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Metric")]
    assert len(rows) == 1
    assert rows[0].startswith("| bits/dim | 1.432 ± 0.0123 | heldout | 300 | variational bound")
    assert "5 of the 50 terms per image" in rows[0] and "clipped" in rows[0]
    for bookkeeping in ("checksum", "abc123", "model_type", "wall_time", "train_time", "828", "global_batch_size",
                        "final_loss", "num_parameters"):
        assert bookkeeping not in table, bookkeeping
    assert {r.metric_name: (r.metric_value, r.dataset_split) for r in card.data.eval_results or []} == {}  # no Hub id


def test_card_metric_rows_reads_every_form():
    rows = card_metric_rows(TRAIN_METRICS, num_train_timesteps=1000)
    assert [(r["name"], r["value"], r["error"], r["split"], r["num_images"]) for r in rows] == [
        ("bits/dim", 1.4321, 0.0123, "heldout", 300)]
    assert rows[0]["method"].startswith("variational bound") and "5 of the 1000" in rows[0]["method"]
    # train.py's flat card figures: split, N and method from the run's configuration
    (flat,) = card_metric_rows({"bits/dim": 2.0, "train_steps": 5}, training_args("/x"), 1000)
    assert (flat["split"], flat["num_images"]) == ("held-out digits (never trained on)", 300)
    (own,) = card_metric_rows({"bits/dim": 2.0}, training_args("/x", train_data_dir="/imgs", eval_num_images=64))
    assert (own["split"], own["num_images"]) == ("train (first images)", "≤ 64")
    # an evaluation report (bits/dim dict + one sample-quality entry per step count)
    report = {"bits_per_dim": {"bits_per_dim": 1.1, "standard_error": 0.01, "split": "validation", "num_images": 256,
                               "method": "exact"},
              "sample_quality": [{"num_inference_steps": 50, "split": "validation", "num_generated": 500,
                                  "num_reference": 300, "fd": 3.5, "fd_method": "FD in DINOv2 features",
                                  "kid_mean": 0.01, "kid_std": 0.002, "kid_method": "MMD",
                                  "precision": 0.7, "recall": 0.6, "pr_method": "k=3"}],
              "wall_time_s": 10.0}
    names = [(r["name"], r["split"], r["num_images"], r["method"]) for r in card_metric_rows(report)]
    assert names == [("bits/dim", "validation", 256, "exact"),
                     ("Fréchet distance @ 50 steps", "validation", "500 generated vs 300 real", "FD in DINOv2 features"),
                     ("KID @ 50 steps", "validation", "500 generated vs 300 real", "MMD"),
                     ("precision @ 50 steps", "validation", "500 generated vs 300 real", "k=3"),
                     ("recall @ 50 steps", "validation", "500 generated vs 300 real", "k=3")]
    structured = {"FD": {"value": 4.0, "split": "test", "num_images": 1000, "method": "Inception"}, "steps": 7}
    assert [(r["name"], r["num_images"]) for r in card_metric_rows(structured)] == [("FD", 1000)]


def test_card_rows_show_swd_per_level_beside_its_real_data_floor():
    """train.py's metrics.json (and an evaluation report) hold SWD per sample-quality entry: the card shows the
    average and each level ± s.e. with the entry's split and N, then the real-data floor with its own N; an entry
    without features (auto offline) has no FD rows and keeps its SWD rows."""
    levels = {"swd_16": 30.0, "swd_16_standard_error": 2.0, "swd_8": 50.0, "swd_8_standard_error": 3.0}
    entry = {"num_inference_steps": 100, "split": "validation", "num_generated": 256, "num_reference": 40,
             "fd": None, "fd_method": "not computed: no feature extractor", "kid_mean": None, "kid_std": None,
             "precision": None, "recall": None, "swd": 40.0, "swd_standard_error": 2.5, **levels,
             "swd_resolutions": [16, 8], "swd_num_bootstrap": 20,
             "swd_real_data_floor": {"swd": 12.0, "swd_standard_error": 1.5, "swd_16": 8.0, "swd_8": 16.0,
                                     "swd_resolutions": [16, 8], "swd_num_bootstrap": 20, "n_real": 256,
                                     "n_reference": 40, "split": "train vs validation"}}
    rows = card_metric_rows({"bits_per_dim": 1.5, "sample_quality": [entry]}, num_train_timesteps=1000)
    shown = [(r["name"], r["value"], r["error"], r["split"], r["num_images"]) for r in rows[1:]]
    n = "256 generated vs 40 real"
    assert shown == [("SWD @ 100 steps", 40.0, 2.5, "validation", n),
                     ("SWD, 16 px level @ 100 steps", 30.0, 2.0, "validation", n),
                     ("SWD, 8 px level @ 100 steps", 50.0, 3.0, "validation", n),
                     ("SWD of real training images (real-data floor)", 12.0, 1.5, "train vs validation",
                      "256 training vs 40 real")]
    assert all("Karras et al. 2018" in r["method"] and "levels 16, 8 px" in r["method"] for r in rows[1:])
    assert "in place of samples" in rows[-1]["method"]
    assert "SWD" in DEFAULT_METRICS_NOTE and "real-data floor" in DEFAULT_METRICS_NOTE


def test_training_configuration_is_read_and_has_no_local_paths(run):
    export, folder = run["export"], run["folder"]
    text = (export / "README.md").read_text()
    assert "Not recorded" not in text and "| `learning_rate` | 0.002 |" in text
    assert "| `output_dir` | digits-run (local path) |" in text
    # no local path anywhere in the export: configs, card, anything textual
    for path in export.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".py"):
            assert str(run["base"]) not in path.read_text(), path
    assert "_name_or_path" not in json.loads((export / "unet" / "config.json").read_text())
    # a pipeline loaded from the folder (so it knows where it came from) gets the same configuration
    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(folder)
    card = render_model_card(loaded, repo_id="org/x")
    assert "| `learning_rate` | 0.002 |" in card.text


def test_data_set_named_with_licence_and_hub_datasets_in_metadata(run):
    text = (run["export"] / "README.md").read_text()
    assert "sklearn.datasets.load_digits" in text and "UCI ML *Optical Recognition of Handwritten Digits*" in text
    assert "Licence: CC BY 4.0" in text
    assert "datasets" not in ModelCard.load(run["export"] / "README.md").data.to_dict()  # no Hub id to name
    hub_run = training_args("/x", dataset_name="someone/pets")
    card = render_model_card(run["pipe"], repo_id="org/pets", training_config=hub_run, metrics=TRAIN_METRICS)
    meta = hub.validate_card_metadata(card)
    assert meta["datasets"] == ["someone/pets"]
    assert "[`someone/pets`](https://huggingface.co/datasets/someone/pets)" in card.text
    (result,) = card.data.eval_results
    assert (result.dataset_type, result.dataset_split, result.metric_name) == ("someone/pets", "heldout", "bits/dim")


def test_sample_grid_uses_the_runs_own_step_count(run):
    text = (run["export"] / "README.md").read_text()
    assert f"4 unconditional samples, {GRID_STEPS} steps, seed 0." in text
    assert f"num_inference_steps={GRID_STEPS}, generator=generator" in text
    expected, _ = hub.generate_sample_grid(GaussianDiffusionPipeline.from_pipe(run["pipe"]), 4, GRID_STEPS, 0)
    assert np.array_equal(np.asarray(Image.open(run["export"] / "sample_grid.png")), np.asarray(expected))


def test_install_lines_name_a_source_not_an_index(run):
    for folder in (run["export"], run["cc"], run["folder"]):
        assert "pip install diffusers-ddpm-ext" not in (folder / "README.md").read_text()
    assert "pip install ./diffusers-ddpm-ext" in (run["export"] / "README.md").read_text()
    assert 'pip install "git+https://example.org/diffusers-ddpm-ext.git"' in (run["cc"] / "README.md").read_text()


def test_local_card_claims_only_what_the_folder_has(run, tmp_path):
    folder = run["folder"]
    text = (folder / "README.md").read_text()
    assert "trust_remote_code" not in text and "ddpm_ext_unet" not in text and "load_pipeline" not in text
    assert not list(folder.glob("**/ddpm_ext_*.py"))
    assert "python -m diffusers_ddpm_ext.hub export digits-run digits-run-hub" in text
    (block,) = python_blocks(text)
    namespace = run_in(block, cwd=folder.parent)
    assert len(namespace["images"]) == 4 and namespace["images"][0].size == (8, 8)
    assert type(namespace["fast"].scheduler).__name__ == "DPMSolverMultistepScheduler"


def run_in(block, cwd):
    saved = os.getcwd()
    os.chdir(cwd)
    try:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)
        return namespace
    finally:
        os.chdir(saved)


# Offline stand-in for the one network call left: diffusers asks the Hub (model_info) for the commit of a repo's
# pipeline code; answer it from the hand-built cache's refs/main, as the Hub would.
HUB_STUB = textwrap.dedent(
    """
    import importlib.abc, os, sys, types
    if os.environ.get("BLOCK_OURS"):
        class Block(importlib.abc.MetaPathFinder):  # prove that the plain-diffusers snippets never import us
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "diffusers_ddpm_ext":
                    raise ImportError("blocked " + name)
        sys.meta_path.insert(0, Block())
    import torch
    torch.set_num_threads(1)
    import diffusers.utils.dynamic_modules_utils as dynamic
    def model_info(repo_id, revision=None, token=None):
        ref = os.path.join(os.environ["HF_HUB_CACHE"], "models--" + repo_id.replace("/", "--"), "refs", "main")
        return types.SimpleNamespace(sha=open(ref).read().strip())
    dynamic.model_info = model_info
    """
)
RUN_BLOCKS = textwrap.dedent(
    """
    import json
    report = []
    for block in json.loads(sys.argv[1]):
        ns = {}
        exec(compile(block, "README.md", "exec"), ns)  # each snippet on its own, as a reader would run it
        found = {k: type(ns[k]).__module__ + "." + type(ns[k]).__name__ for k in ("pipe", "unet") if k in ns}
        found["pipe_scheduler"] = type(ns["pipe"].scheduler).__name__ if "pipe" in ns else None
        found["images"] = len(ns["images"]) if "images" in ns else None
        report.append(found)
    print(json.dumps({"blocks": report, "ours": sorted(m for m in sys.modules if m.startswith("diffusers_ddpm_ext"))}))
    """
)


def run_snippets(blocks, run, tmp_path, block_ours):
    """Run card snippets verbatim in one fresh offline process (`block_ours`: our package cannot be imported)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"),
               HF_HUB_CACHE=str(run["cache"]), HF_MODULES_CACHE=str(tmp_path / "modules"))
    if block_ours:
        env["BLOCK_OURS"] = "1"
    res = subprocess.run([sys.executable, "-c", HUB_STUB + RUN_BLOCKS, json.dumps(blocks)], capture_output=True,
                         text=True, env=env, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("which", ["export", "cc"])
def test_every_hub_card_snippet_runs_offline(run, tmp_path, which):
    blocks = python_blocks((run[which] / "README.md").read_text())
    plain = [b for b in blocks if "trust_remote_code=True" in b]
    installed = [b for b in blocks if "diffusers_ddpm_ext" in b]
    assert len(plain) + len(installed) == len(blocks) and len(installed) == 2
    assert len(plain) == (2 if which == "cc" else 1)  # the cc export has auto_map: the AutoModel snippet too
    result = run_snippets(plain, run, tmp_path, block_ours=True)
    assert result["ours"] == []
    first = result["blocks"][0]
    assert first["pipe"].startswith("diffusers_modules.") and first["pipe"].endswith(
        ("ddpm_ext_pipeline.GaussianDiffusionPipeline", "ddpm_ext_pipeline.ClassConditionalDDPMPipeline"))
    assert first["pipe_scheduler"] == "DPMSolverMultistepScheduler" and first["images"] in (3, 4)  # swapped, sampled
    if which == "cc":
        assert result["blocks"][1]["unet"].endswith("ddpm_ext_unet.DDPMUNet2DModel")  # AutoModel, remote code
    result = run_snippets(installed, run, tmp_path, block_ours=False)
    loader, components = result["blocks"]
    assert loader["pipe"].startswith("diffusers_ddpm_ext.pipelines.")  # load_pipeline: installed classes
    assert components["pipe"] == "diffusers_ddpm_ext.pipelines.GaussianDiffusionPipeline"
    assert components["pipe_scheduler"] == "DPMSolverMultistepScheduler" and components["images"] in (3, 4)


AUTO_MODEL = textwrap.dedent(
    """
    from diffusers import AutoModel
    try:
        unet = AutoModel.from_pretrained(sys.argv[1], subfolder="unet", trust_remote_code=True)
        print(json.dumps(type(unet).__module__))
    except ValueError as error:
        print(json.dumps("ValueError: " + str(error)))
    """
)


def test_auto_map_is_opt_in_and_makes_automodel_work(run, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", BLOCK_OURS="1",
               HF_MODULES_CACHE=str(tmp_path / "modules"))
    outcome = {}
    for name in ("export", "cc"):  # the cc export was made with auto_map=True
        res = subprocess.run([sys.executable, "-c", HUB_STUB + "import json\n" + AUTO_MODEL,
                              str(run[name])], capture_output=True, text=True, env={**env, "HF_HUB_CACHE": "x"},
                             timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        outcome[name] = json.loads(res.stdout.strip().splitlines()[-1])
    assert outcome["cc"] == "diffusers_modules.local.ddpm_ext_unet"
    assert outcome["export"].startswith("ValueError") and "custom code" in outcome["export"]
    auto_map = {"AutoModel": "ddpm_ext_unet.DDPMUNet2DModel"}
    assert json.loads((run["cc"] / "unet" / "config.json").read_text())["auto_map"] == auto_map
    assert json.loads((run["cc"] / "model_index.json").read_text())["auto_map"] == auto_map
