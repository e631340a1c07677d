"""`import diffusers_ddpm_ext` loads only unet, scheduler and pipelines; every public name still imports (PEP 562)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import diffusers_ddpm_ext

ROOT = Path(__file__).resolve().parents[1]
EAGER = ["diffusers_ddpm_ext", "diffusers_ddpm_ext.pipelines", "diffusers_ddpm_ext.scheduler",
         "diffusers_ddpm_ext.unet"]
# Names public before the package became lazy (plus the new pipeline); all must keep importing.
PUBLIC = [
    "ClassConditionalDDPMPipeline", "DDPMUNet2DModel", "DDPMUNet2DOutput", "GaussianDiffusionModelOutput",
    "GaussianDiffusionPipeline", "GaussianDiffusionScheduler", "GaussianDiffusionSchedulerOutput", "UNET_PRESETS",
    "bits_per_dim", "create_timestep_sampler", "diffusion_loss", "estimate_bits_per_dim", "parse_respacing",
]

FRESH = textwrap.dedent(
    """
    import json, sys
    from diffusers import DDPMPipeline, UNet2DModel, DDPMScheduler  # the baseline our import is measured against
    before = set(sys.modules)
    import diffusers_ddpm_ext
    plain = sorted(m for m in sys.modules if m.startswith("diffusers_ddpm_ext"))
    extra = sorted(m for m in set(sys.modules) - before if not m.startswith("diffusers_ddpm_ext"))
    names = json.loads(sys.argv[1])
    ns = {}
    exec("from diffusers_ddpm_ext import " + ", ".join(names), ns)
    after = sorted(m for m in sys.modules if m.startswith("diffusers_ddpm_ext"))
    print(json.dumps({"plain": plain, "extra": extra, "after": after, "found": [n for n in names if n in ns]}))
    """
)


def test_plain_import_is_lean_and_every_public_name_imports():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", FRESH, json.dumps(PUBLIC)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["plain"] == EAGER
    assert info["extra"] == ["diffusers.callbacks"]  # nothing else beyond the baseline import (a tiny module)
    assert info["found"] == PUBLIC
    assert {"diffusers_ddpm_ext.likelihood", "diffusers_ddpm_ext.losses",
            "diffusers_ddpm_ext.timestep_sampler"} <= set(info["after"])  # imported on use


def test_lazy_names_are_the_real_objects_and_listed():
    from diffusers_ddpm_ext import likelihood, losses, timestep_sampler

    assert diffusers_ddpm_ext.bits_per_dim is likelihood.bits_per_dim
    assert diffusers_ddpm_ext.estimate_bits_per_dim is likelihood.estimate_bits_per_dim
    assert diffusers_ddpm_ext.diffusion_loss is losses.diffusion_loss
    assert diffusers_ddpm_ext.create_timestep_sampler is timestep_sampler.create_timestep_sampler
    presets = importlib.util.find_spec("diffusers_ddpm_ext.presets")
    home = importlib.import_module("diffusers_ddpm_ext.presets" if presets else "diffusers_ddpm_ext.unet")
    assert diffusers_ddpm_ext.UNET_PRESETS is home.UNET_PRESETS
    assert set(diffusers_ddpm_ext.__all__) == set(PUBLIC)
    assert set(PUBLIC) <= set(dir(diffusers_ddpm_ext))
    for module in ("data", "hub", "metrics", "training_utils"):
        assert getattr(diffusers_ddpm_ext, module).__name__ == f"diffusers_ddpm_ext.{module}"
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        diffusers_ddpm_ext.not_a_name
    assert not hasattr(diffusers_ddpm_ext, "not_a_module")


def test_import_benchmark_reports_one_json_line():
    spec = importlib.util.spec_from_file_location("bench_import", ROOT / "benchmarks" / "bench_import.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # one child process (no timing asserted): the child's module listing is what the report is built from
    result = bench.time_import(bench.CHILD["ours"])
    assert result["s"] > 0
    assert sorted(m for m in result["modules"] if m.startswith("diffusers_ddpm_ext")) == EAGER
