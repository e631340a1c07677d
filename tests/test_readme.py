"""The README's usage snippets run as written (the Hub ones need the network and are exercised in test_hub.py)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 3)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_usage_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _python_blocks("Use it like any diffusers model")
    assert len(blocks) == 4
    namespace: dict = {}
    for block in blocks[:3]:
        exec(compile(block, str(README), "exec"), namespace)
    from diffusers_ddpm_ext import DDPMUNet2DModel, GaussianDiffusionScheduler

    assert isinstance(namespace["pipe"].unet, DDPMUNet2DModel)
    assert isinstance(namespace["pipe"].scheduler, GaussianDiffusionScheduler)
    assert len(namespace["images"]) == 2
    assert namespace["unet"].config.out_channels == 6
    assert len(namespace["scheduler"].timesteps) == 50
    # The conversion snippet round-trips the weights exactly.
    theirs, back = namespace["theirs"].state_dict(), namespace["back"].state_dict()
    assert theirs.keys() == back.keys()
    assert all((theirs[k] == back[k]).all() for k in theirs)
    # The dims snippet: a 1D and a 3D model, sampled with the scheduler directly.
    dims_ns: dict = {}
    exec(compile(blocks[3], str(README), "exec"), dims_ns)
    assert (dims_ns["seq"].config.dims, dims_ns["clip"].config.dims) == (1, 3)
    assert dims_ns["x"].shape == (2, 1, 4, 16, 16) and torch.isfinite(dims_ns["x"]).all()


def test_training_loop_snippet_runs():
    (block,) = _python_blocks("Learned variance, the hybrid loss and bits/dim")
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    out, est = namespace["out"], namespace["est"]
    assert out.vlb is not None and out.loss.shape == (8,)
    assert all(p.grad is not None for p in namespace["unet"].parameters() if p.requires_grad and p.dim() > 1)
    assert est.mean > 0 and est.mean_standard_error > 0


def test_sampling_snippet_runs():
    (block,) = _python_blocks("Sample with any scheduler")
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    from diffusers_ddpm_ext import GaussianDiffusionPipeline

    pipe, fast = namespace["pipe"], namespace["fast"]
    assert pipe.unet.config.out_channels == 2 * pipe.unet.config.in_channels  # a learned-variance model
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler) and len(pipe.scheduler.timesteps) == 20
    assert len(namespace["images"]) == 2 and namespace["images"][0].size == (16, 16)
    assert type(fast) is GaussianDiffusionPipeline and fast.unet is namespace["unet"]
    assert isinstance(fast.scheduler, UniPCMultistepScheduler)
    assert namespace["latents"].shape == (2, 1, 16, 16) and torch.isfinite(namespace["latents"]).all()
