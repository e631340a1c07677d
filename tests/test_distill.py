"""Progressive distillation (diffusers_ddpm_ext.distill, training/distill.py; Salimans & Ho, ICLR 2022)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_helpers import run_main

from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers_ddpm_ext import DDPMUNet2DModel, GaussianDiffusionPipeline, GaussianDiffusionScheduler
from diffusers_ddpm_ext import distill as d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("ddpm_ext_distill_script", os.path.join(ROOT, "training", "distill.py"))
SCRIPT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(SCRIPT)
FAST = ["--train_batch_size", "8", "--eval_quality_num_images", "0", "--checkpointing_steps", "2"]


def run_script(*argv):
    return run_main(SCRIPT.main, *argv)


def tiny_teacher(folder, *, unet2d=False, T=100):
    """A saved tiny 8×8 teacher: ours with a learned variance (2C outputs), or UNet2DModel + DDPMScheduler."""
    torch.manual_seed(0)
    if unet2d:
        unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                           layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                           up_block_types=("UpBlock2D",) * 2)
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2"))
    else:
        unet = DDPMUNet2DModel(sample_size=8, in_channels=1, out_channels=2, block_out_channels=(8, 8), layers_per_block=1,
                               attention_resolutions=(), add_attention=False, norm_num_groups=4, dropout=0.0)
        pipe = GaussianDiffusionPipeline(unet=unet, scheduler=GaussianDiffusionScheduler(
            num_train_timesteps=T, beta_schedule="linear", variance_type="learned_range"))  # α_T ≈ 0.6: bounded x̂
    pipe.save_pretrained(folder)
    return str(folder)


# ------------------------------------------------------------------------------------------------ the math


def test_target_formula_against_hand_computation():
    """x̃ = (z'' − (σ''/σ) z) / (α'' − (σ''/σ) α), Alg. 2, with numbers worked by hand; its DDIM step lands on z''."""
    a, s, a2, s2 = 0.6, 0.8, 0.96, 0.28
    z, z2 = torch.tensor([1.5]), torch.tensor([0.7])
    # ratio 0.28/0.8 = 0.35; numerator 0.7 − 0.35·1.5 = 0.175; denominator 0.96 − 0.35·0.6 = 0.75
    target = d.distillation_target(z, z2, a, s, a2, s2)
    assert target.item() == pytest.approx(0.175 / 0.75, abs=1e-7)
    assert d.ddim_step(target, z, a, s, a2, s2).item() == pytest.approx(0.7, abs=1e-6)
    # t'' = −1 is the data: α = 1, σ = 0, so x̃ is the teacher's z''
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    assert d.distillation_target(z.double(), z2.double(), a, s, one, zero).item() == pytest.approx(0.7)
    assert d.truncated_snr_weight(torch.tensor([0.6, 0.96]), torch.tensor([0.8, 0.28])).tolist() == \
        pytest.approx([1.0, 0.96**2 / 0.28**2])
    ac = torch.tensor([0.64, 0.36])
    alpha, sigma = d.alpha_sigma(ac, torch.tensor([1, -1]), ndim=1)
    assert alpha.tolist() == pytest.approx([0.6, 1.0]) and sigma.tolist() == pytest.approx([0.8, 0.0])


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16, 128])
def test_saved_scheduler_reproduces_the_trained_timesteps(steps):
    """The student's chain (trailing, then −1) is what its saved scheduler runs: DDIMScheduler where N divides T
    (its step t → t − T//N), our DDIM scheduler elsewhere; ᾱ bit-equal to the teacher's, clipped β included."""
    from diffusers_ddpm_ext.build import build_noise_scheduler

    teacher = build_noise_scheduler(1000, "squaredcos_cap_v2", max_beta=0.5)  # trained_betas, as train.py saves
    chain = d.student_timesteps(1000, steps)
    scheduler = d.student_scheduler(teacher, steps)
    assert isinstance(scheduler, DDIMScheduler if 1000 % steps == 0 else GaussianDiffusionScheduler)
    assert torch.equal(scheduler.alphas_cumprod, teacher.alphas_cumprod)
    loaded = type(scheduler).from_config(scheduler.config)
    loaded.set_timesteps(steps)
    assert loaded.timesteps.tolist() == chain
    if isinstance(loaded, DDIMScheduler):
        nxt = [t - 1000 // steps for t in chain]
        assert loaded.config.timestep_spacing == "trailing" and loaded.config.set_alpha_to_one
    else:
        nxt = [loaded.previous_timestep(t) for t in chain]
    assert nxt == chain[1:] + [-1]
    if steps > 1:
        assert d.student_timesteps(1000, steps // 2) == chain[::2]  # nested: each round keeps every second step


def test_plans_and_refusals_name_the_allowed_values():
    assert d.plan_rounds(1000, 64, 4) == [32, 16, 8, 4]
    assert d.default_teacher_steps(1000, 4) == 512
    with pytest.raises(ValueError, match=r"--teacher_steps 48 .* one of \[8, 16, 32, 64"):
        d.plan_rounds(1000, 48, 4)
    with pytest.raises(ValueError, match="epsilon cannot be distilled.*'v_prediction', 'sample'"):
        d.check_student_prediction_type("epsilon")
    with pytest.raises(ValueError, match="exceeds the teacher's 100 training timesteps"):
        d.plan_rounds(100, 128, 1)


# ------------------------------------------------------------------------------------------------ Gaussian data


class GaussianTeacher(torch.nn.Module):
    """The exact ε-predictor of data ~ N(μ, s²I): E[x | z_t] = μ + α s²/(α² s² + σ²) (z_t − α μ)."""

    def __init__(self, alphas_cumprod, mu, s):
        super().__init__()
        self.ac, self.mu, self.s = alphas_cumprod, mu, s

    def forward(self, z, t):
        alpha, sigma = d.alpha_sigma(self.ac, torch.as_tensor(t).reshape(-1).expand(z.shape[0]), z.ndim)
        z = z.double()
        x0 = self.mu + alpha * self.s**2 / (alpha**2 * self.s**2 + sigma**2) * (z - alpha * self.mu)
        return SimpleNamespace(sample=(z - alpha * x0) / sigma)


class AffineStudent(torch.nn.Module):
    """x̂_t(z) = A_t z + B_t on the student's grid, output as v (the exact student when the teacher is affine)."""

    def __init__(self, alphas_cumprod, coefficients):
        super().__init__()
        self.ac, self.coefficients = alphas_cumprod, coefficients

    def forward(self, z, t):
        t = torch.as_tensor(t).reshape(-1).expand(z.shape[0])
        A = torch.tensor([self.coefficients[int(u)][0] for u in t], dtype=torch.float64).reshape(-1, 1, 1, 1)
        B = torch.tensor([self.coefficients[int(u)][1] for u in t], dtype=torch.float64).reshape(-1, 1, 1, 1)
        alpha, sigma = d.alpha_sigma(self.ac, t, z.ndim)
        return SimpleNamespace(sample=d.prediction_from_x0(A * z.double() + B, z.double(), alpha, sigma,
                                                           "v_prediction"))


def exact_student(loss):
    """The student whose x̂ is the target x̃ exactly: x̃ is affine in z_t (read off at z = 0 and z = 1)."""
    coefficients = {}
    for t in loss.timesteps:
        tt = torch.tensor([t, t])
        x0, x1 = loss.target(torch.stack([torch.zeros(1, 1, 1), torch.ones(1, 1, 1)]), tt).reshape(2).tolist()
        coefficients[t] = (x1 - x0, x0)
    return AffineStudent(loss.alphas_cumprod, coefficients)


def test_exact_students_of_gaussian_data_equal_their_teachers_ddim():
    """Rounds 8 → 4 → 2 → 1 with the closed-form teacher: each round's exact-x0 student (zero distillation loss)
    samples in N steps what its teacher samples in 2N, so the 1-step student equals the teacher's 8-step DDIM, in
    our reference loop and through the saved DDIMScheduler."""
    base = GaussianDiffusionScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    ac, mu, s = base.alphas_cumprod, 0.3, 0.5
    teacher = previous = GaussianTeacher(ac, mu, s)
    pt = "epsilon"
    noise = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for steps in d.plan_rounds(1000, 8, 1):
        loss = d.ProgressiveDistillationLoss(previous, ac, steps, pt, "v_prediction")
        student = exact_student(loss)
        x0 = mu + s * torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(steps))
        t = torch.tensor(loss.timesteps).repeat(16)[:16]
        z = base.add_noise(x0, torch.randn_like(x0), t)
        assert loss(student(z, t).sample, x0, None, t, z).unweighted_loss.max() < 1e-10
        two = d.ddim_sample(previous, ac, d.student_timesteps(1000, 2 * steps), pt, noise)
        one = d.ddim_sample(student, ac, loss.timesteps, "v_prediction", noise)
        torch.testing.assert_close(one, two, atol=1e-5, rtol=0)
        previous, pt = student, "v_prediction"
    full = d.ddim_sample(teacher, ac, d.student_timesteps(1000, 8), "epsilon", noise)
    torch.testing.assert_close(one, full, atol=1e-5, rtol=0)
    scheduler = d.student_scheduler(base, 1)
    scheduler.set_timesteps(1)
    z = noise.clone()
    for t in scheduler.timesteps:
        z = scheduler.step(student(z, t).sample.float(), t, z).prev_sample
    torch.testing.assert_close(z, full, atol=1e-5, rtol=0)
    assert float(full.mean()) == pytest.approx(mu, abs=0.25)  # sanity: the chain lands near the data


# ------------------------------------------------------------------------------------------------ the script


def distillation_error(student, loss, images, seed=0):
    """Mean ‖x̂_student − x̃‖²/d over every grid timestep (the student's distance to its teacher's two steps)."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for t in loss.timesteps:
            tt = torch.full((images.shape[0],), t)
            alpha, sigma = (v.float() for v in d.alpha_sigma(loss.alphas_cumprod, tt))
            z = alpha * images + sigma * torch.randn(images.shape, generator=g)
            total += loss(student.eval()(z, tt).sample, images, None, tt, z).unweighted_loss.mean().item()
    return total / len(loss.timesteps)


def test_one_round_on_digits_lowers_the_error_against_the_teacher(tmp_path, monkeypatch):
    """A learned-variance teacher (2C outputs) gives a C-output v-student; one short round brings its one step
    closer to the teacher's two DDIM steps on held-out digits, and the folder is a loadable, carded pipeline."""
    from diffusers_ddpm_ext.data import load_digits_tensors
    from diffusers_ddpm_ext.hub import load_pipeline

    from train_helpers import FakeHubApi

    hub_api = FakeHubApi().install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    folder = tiny_teacher(tmp_path / "teacher")
    out = tmp_path / "out"
    run_script("--teacher", folder, "--output_dir", out, "--teacher_steps", 4, "--student_steps", 2,
               "--steps_per_round", 30, "--learning_rate", 2e-3, "--no-use_ema", *FAST, "--push_to_hub",
               "--no-clip_sample",  # the untrained teacher's clipped x̂ is a sign-like target a tiny net learns slowly
               "--hub_model_id", "you/student")
    upload = [c for c in hub_api.calls if c[0] == "upload"]
    assert len(upload) == 1 and upload[0][1] == "you/student" and "unet/diffusion_pytorch_model.safetensors" in upload[0][2]
    assert b"progressive distillation" in upload[0][4]["README.md"]
    teacher, scheduler = d.load_teacher(folder)
    loss = d.ProgressiveDistillationLoss(teacher, scheduler.alphas_cumprod, 2, "epsilon", "v_prediction")
    images = load_digits_tensors("heldout", resolution=8)[0][:64]
    before = distillation_error(d.make_student(teacher), loss, images)
    student = load_pipeline(out / "student-2-steps")
    assert student.unet.config.out_channels == 1 and student.scheduler.config.prediction_type == "v_prediction"
    assert student.scheduler.config.clip_sample is False  # --no-clip_sample overrides the teacher's clipping
    after = distillation_error(student.unet, loss, images)
    assert after < 0.5 * before, (before, after)
    card = (out / "student-2-steps" / "README.md").read_text()
    assert "progressive distillation" in card and "round 1 of 1 (4 → 2" in card
    assert not (out / "round-01").exists()  # the saved student replaces the round's checkpoints


def test_resume_mid_round_is_bit_identical(tmp_path):
    """Two rounds (4 → 2 → 1); a run stopped after the 3rd step of round 2 (its checkpoint-2 kept) and resumed
    saves the same students, bit for bit, as an uninterrupted run."""
    from diffusers_ddpm_ext.trainer import SimulatedInterrupt

    folder = tiny_teacher(tmp_path / "teacher")
    common = ["--teacher", folder, "--teacher_steps", 4, "--student_steps", 1, "--steps_per_round", 4, *FAST]
    run_script(*common, "--output_dir", tmp_path / "full")
    with pytest.raises(SimulatedInterrupt):
        run_script(*common, "--output_dir", tmp_path / "cut", "--debug_interrupt_after_step", 7)
    assert (tmp_path / "cut" / "student-2-steps").is_dir() and not (tmp_path / "cut" / "student-1-steps").exists()
    assert (tmp_path / "cut" / "round-02" / "checkpoint-2").is_dir()
    run_script(*common, "--output_dir", tmp_path / "cut", "--resume_from_checkpoint", "latest")
    for steps in (2, 1):
        name = f"student-{steps}-steps/unet/diffusion_pytorch_model.safetensors"
        a, b = load_file(tmp_path / "full" / name), load_file(tmp_path / "cut" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="--steps_per_round 4 -> 5"):
        run_script(*common[:-len(FAST) - 2], "--steps_per_round", 5, *FAST, "--output_dir", tmp_path / "cut",
                   "--resume_from_checkpoint", "latest")


_FRESH = """
import sys, numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
images = pipe(batch_size=3, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
assert "diffusers_ddpm_ext" not in sys.modules, "plain diffusers only"
np.save(sys.argv[2], images)
print(type(pipe).__name__, type(pipe.scheduler).__name__)
"""


def test_saved_student_samples_identically_in_plain_diffusers(tmp_path):
    """A UNet2DModel/DDPMScheduler teacher gives a DDIMPipeline + DDIMScheduler student: a fresh process with plain
    diffusers (our package never imported) samples it as our pipeline with our DDIM scheduler and as the reference
    loop do from the same noise."""
    folder = tiny_teacher(tmp_path / "teacher", unet2d=True)
    out = tmp_path / "out"
    run_script("--teacher", folder, "--output_dir", out, "--teacher_steps", 4, "--student_steps", 2,
               "--steps_per_round", 2, *FAST)
    student = out / "student-2-steps"
    done = subprocess.run([sys.executable, "-c", _FRESH, str(student), str(tmp_path / "plain.npy")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["DDIMPipeline", "DDIMScheduler"]
    with open(student / "scheduler" / "scheduler_config.json") as f:
        assert json.load(f)["clip_sample"] is True  # by default x̂ is clipped as the teacher's DDPMScheduler clips
    plain = np.load(tmp_path / "plain.npy")
    unet = UNet2DModel.from_pretrained(student / "unet")
    with open(student / "scheduler" / "scheduler_config.json") as f:
        config = json.load(f)
    ours = GaussianDiffusionPipeline(unet=unet, scheduler=GaussianDiffusionScheduler.from_config(config))
    images = ours(batch_size=3, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    np.testing.assert_allclose(images, plain, atol=1e-5)
    noise = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    ref = d.ddim_sample(unet, DDIMScheduler.from_config(config).alphas_cumprod, [99, 49], "v_prediction", noise)
    np.testing.assert_allclose((ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), plain, atol=1e-5)
    # The Hub export keeps the pipeline plain diffusers runs and the distillation card.
    exported = d.export_student(str(student), str(tmp_path / "export"), repo_id="you/student", num_grid_images=2)
    card = (exported / "README.md").read_text()
    assert json.loads((exported / "model_index.json").read_text())["_class_name"] == "DDIMPipeline"
    assert "2-step student distilled from the teacher `teacher (local folder)`" in card and "4 → 2" in card
    assert "num_inference_steps=2" in card


def test_card_metrics_list_fd_per_step_count_for_student_and_teacher():
    entry = dict(fd=1.5, fd_standard_error=0.1, split="heldout", num_generated=500, num_reference=300,
                 fd_method="Fréchet distance", num_inference_steps=4)
    rows = d.card_metrics([{"round": 3, "student_steps": 4, "student_quality": entry,
                            "teacher_quality": {**entry, "fd": 9.0}}])
    assert rows["FD, student @ 4 steps (round 3)"]["value"] == 1.5
    assert rows["FD, teacher DDIM @ 4 steps"]["value"] == 9.0
    assert rows["FD, teacher DDIM @ 4 steps"]["num_images"] == "500 generated vs 300 real"


def test_readme_snippet_runs():
    """The Python snippet of the README section trains two steps of a 4-step student and samples it."""
    import re

    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index("## Few-step students (progressive distillation)")
    blocks = re.findall(r"```python\n(.*?)```", text[start:text.find("\n## ", start + 3)], flags=re.S)
    namespace: dict = {}
    exec(compile(blocks[-1], "README.md", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 2 and np.isfinite(namespace["out"].loss)
    assert namespace["student"].config.out_channels == 1 and namespace["images"].shape == (2, 16, 16, 1)
    assert namespace["loss_fn"].timesteps == [999, 749, 499, 249]
