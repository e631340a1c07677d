"""The training loop (diffusers_ddpm_ext.trainer) used on its own: one step at a time on plain tensors, without
`accelerate launch`, as a notebook, a benchmark or the comparison harness uses it. The training script's runs
through the same loop are in test_train_script.py and test_reliability.py."""

import ast

import numpy as np
import pytest
import torch
from diffusers.training_utils import EMAModel

from diffusers_ddpm_ext import trainer as tr
from diffusers_ddpm_ext.checkpoints import load_checkpoint
from diffusers_ddpm_ext.processes import LocalAccelerator, all_finite_and_mean
from diffusers_ddpm_ext.publish import default_repo_name, public_training_config
from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler
from diffusers_ddpm_ext.unet import DDPMUNet2DModel

from train_helpers import ROOT


def tiny_unet(out_channels=2, seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(sample_size=8, in_channels=1, out_channels=out_channels, block_out_channels=(8, 8),
                  layers_per_block=1, attention_resolutions=(), add_attention=False, norm_num_groups=4, dropout=0.0)
    return DDPMUNet2DModel(**{**config, **overrides})


def tiny_trainer(seed=0, generator_seed=1, variance_type="learned_range", **config):
    config = {"loss_type": "hybrid", "lr_warmup_steps": 1, "timestep_sampler": "loss-second-moment", **config}
    scheduler = GaussianDiffusionScheduler(num_train_timesteps=10, variance_type=variance_type)
    model = tiny_unet(2 if variance_type.startswith("learned") else 1, seed)
    return tr.Trainer(model, scheduler, tr.TrainConfig(**config), max_train_steps=6,
                      generator=torch.Generator().manual_seed(generator_seed))


def batches(count, size=4, seed=7):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(size, 1, 8, 8, generator=generator) * 2 - 1 for _ in range(count)]  # (B, 1, 8, 8)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


# ---------------------------------------------------------------------------------------------- one step


def test_train_step_one_micro_batch_at_a_time_on_plain_tensors():
    trainer = tiny_trainer(gradient_accumulation_steps=2)
    before = weights(trainer.model)
    outputs = [trainer.train_step(x0) for x0 in batches(6)]
    assert outputs[0::2] == [None] * 3  # inside an accumulation window nothing is reported
    steps = outputs[1::2]
    assert [o.step for o in steps] == [1, 2, 3] and trainer.state.global_step == 3
    assert all(np.isfinite(o.loss) and o.mse > 0 and not o.skipped for o in steps)
    assert set(steps[0].logs) == {"loss", "lr", "grad_norm", "ema_decay"}
    assert trainer.state.losses == [o.loss for o in steps] and trainer.state.batch_in_epoch == 6
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.ema.optimization_step == 3
    assert int(trainer.timestep_sampler.loss_counts.sum()) == 6 * 4  # every example fed back to the sampler
    assert trainer.lr_scheduler.last_epoch == 3

    # The caller's generator decides noise, t and labels: the same seed gives the same run, another seed another.
    again = tiny_trainer(gradient_accumulation_steps=2)
    assert [again.train_step(x0) for x0 in batches(6)][1::2] == steps
    assert_same_weights(weights(trainer.model), weights(again.model))
    other = tiny_trainer(generator_seed=2, gradient_accumulation_steps=2)
    assert [other.train_step(x0) for x0 in batches(6)][1].loss != steps[0].loss


def test_local_accelerator_matches_accelerate():
    """Gradient accumulation, clipping and the optimizer step give the same weights with or without Accelerate."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    local = tiny_trainer(gradient_accumulation_steps=2, max_grad_norm=0.05)
    assert isinstance(local.accelerator, LocalAccelerator)
    try:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        scheduler = GaussianDiffusionScheduler(num_train_timesteps=10, variance_type="learned_range")
        config = tr.TrainConfig(loss_type="hybrid", lr_warmup_steps=1, timestep_sampler="loss-second-moment",
                                gradient_accumulation_steps=2, max_grad_norm=0.05)
        accelerated = tr.Trainer(tiny_unet(), scheduler, config, max_train_steps=6, accelerator=accelerator,
                                 generator=torch.Generator().manual_seed(1))
        for x0 in batches(6):
            a, b = local.train_step(x0), accelerated.train_step(x0)
            assert a == b
        assert_same_weights(weights(local.model), weights(accelerated.unwrapped))
        for p, q in zip(local.ema.shadow_params, accelerated.ema.shadow_params):
            assert torch.equal(p, q)
        with pytest.raises(ValueError, match="accumulates 2 micro-batches, the config 1"):
            tr.Trainer(tiny_unet(), scheduler, max_train_steps=6, accelerator=accelerator)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


# ---------------------------------------------------------------------------------------------- NaN policy


def test_nan_policy_skip_drops_the_step_and_stop_saves_the_last_good_state(tmp_path):
    skipping = tiny_trainer(nan_policy="skip", debug_nan_at_step=2)
    first = skipping.train_step(batches(1)[0])
    before = weights(skipping.model)
    skipped = skipping.train_step(batches(1, seed=8)[0])
    assert skipped.skipped and skipped.step == 1 and skipping.state.skipped_steps == 1
    assert_same_weights(before, weights(skipping.model))  # a skipped step never changes the weights
    assert skipping.train_step(batches(1, seed=9)[0]).step == 2  # the injected NaN happens once
    assert first.step == 1

    stopping = tiny_trainer(debug_nan_at_step=2)
    stopping.output_dir = str(tmp_path)
    stopping.train_step(batches(1)[0])
    with pytest.raises(tr.NonFiniteLossError, match=r"non-finite loss \(nan\) at optimizer step 2 .*checkpoint-1 in "
                                                    r".*--learning_rate"):
        stopping.train_step(batches(1, seed=8)[0])
    data = load_checkpoint(str(tmp_path / "checkpoint-1"))
    assert data.step == 1 and all(torch.isfinite(v).all() for v in data.model_state.values())
    nowhere = tiny_trainer(debug_nan_at_step=1)
    with pytest.raises(tr.NonFiniteLossError, match="no checkpoint was saved"):
        nowhere.train_step(batches(1)[0])


def test_run_on_a_plain_dataloader():
    loader = torch.utils.data.DataLoader(torch.cat(batches(3)), batch_size=4)  # 3 batches of (4, 1, 8, 8)
    trainer = tiny_trainer(use_ema=False, save_images_epochs=None, checkpointing_steps=None)
    ends = []
    state = trainer.run(loader, on_epoch_end=lambda t, epoch: ends.append((epoch, t.state.global_step)),
                        progress=False)
    assert state.global_step == 6 and len(state.losses) == 6 and (state.epoch, state.batch_in_epoch) == (1, 3)
    assert ends == [(0, 3)] and trainer.global_batch_size == 4  # the last epoch has no hook: the run ends there
    assert trainer.run(loader, progress=False).global_step == 6  # at max_train_steps already: nothing to do


# ---------------------------------------------------------------------------------------------- config and checks


@pytest.mark.parametrize("field, value, words", [
    ("loss_type", "l2", ["--loss_type", "'l2'", "hybrid"]),
    ("nan_policy", "ignore", ["--nan_policy", "skip"]),
    ("timestep_sampler", "importance", ["--timestep_sampler", "loss-second-moment"]),
    ("gradient_accumulation_steps", 0, ["--gradient_accumulation_steps", "0"]),
    ("checkpointing_steps", 0, ["--checkpointing_steps", "left unset"]),
    ("learning_rate", 0.0, ["--learning_rate"]),
    ("adam_beta2", 1.0, ["--adam_beta2", "[0, 1)"]),
    ("ema_max_decay", 1.5, ["--ema_max_decay"]),
    ("max_grad_norm", -1.0, ["--max_grad_norm", "-1.0"]),
    ("class_dropout_prob", 1.0, ["--class_dropout_prob", "1.0"]),
    ("snr_gamma", 0.0, ["--snr_gamma", "positive"]),
])
def test_train_config_names_the_bad_field(field, value, words):
    with pytest.raises(ValueError) as info:
        tr.TrainConfig(**{field: value})
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_train_config_from_flags_and_objective_checks():
    from argparse import Namespace

    config = tr.TrainConfig.from_flags(Namespace(loss_type="kl", seed=3, output_dir="x"), num_levels=17)
    assert (config.loss_type, config.seed, config.num_levels, config.nan_policy) == ("kl", 3, 17, "stop")
    with pytest.raises(ValueError, match="--snr_gamma weights the MSE term"):
        tr.TrainConfig(loss_type="kl", snr_gamma=5.0)
    with pytest.raises(ValueError, match="--loss_type hybrid .*'fixed_small'"):
        tr.check_objective("hybrid", "fixed_small")
    with pytest.raises(ValueError, match="--variance_type learned .*simple never trains"):
        tr.check_objective("simple", "learned")
    tr.check_objective("kl", "fixed_large")
    with pytest.raises(ValueError, match="--loss_type hybrid"):  # the trainer checks its scheduler too
        tiny_trainer(variance_type="fixed_small")


# ---------------------------------------------------------------------------------------------- EMA and guards


def test_ema_weights_context_restores_training_weights_even_on_error():
    trainer = tiny_trainer()
    for x0 in batches(2):
        trainer.train_step(x0)
    model, ema = trainer.model, trainer.ema
    before = weights(model)
    with trainer.ema_weights():
        for p, s in zip(model.parameters(), ema.shadow_params):
            assert torch.equal(p, s)
    with pytest.raises(RuntimeError):
        with tr.ema_weights(ema, model):
            raise RuntimeError("sampling failed")
    assert_same_weights(before, weights(model))
    assert any(not torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow_params))
    with tr.ema_weights(None, model) as same:
        assert same is model


def test_all_finite_and_mean():
    one = LocalAccelerator()
    assert all_finite_and_mean(one, torch.tensor(2.5)) == (True, 2.5)
    finite, value = all_finite_and_mean(one, torch.tensor(float("inf")))
    assert not finite and np.isnan(value)


def test_checksums_and_names():
    a, b = tiny_unet(), tiny_unet(seed=1)
    assert tr.parameter_checksum(a) != tr.parameter_checksum(b)
    b.load_state_dict(a.state_dict())
    assert tr.parameter_checksum(a) == tr.parameter_checksum(b)
    with torch.no_grad():
        b.conv_out.bias.add_(1e-7)
    assert tr.parameter_checksum(a) != tr.parameter_checksum(b)
    assert tr.ema_checksum(None) is None and tr.ema_checksum(EMAModel(a.parameters())) != tr.parameter_checksum(a)
    assert default_repo_name("/tmp/My Run (2)/") == "My-Run-2"
    assert public_training_config({"hub_token": "secret", "debug_nan_at_step": 3, "seed": 1}) == {"seed": 1}


# ---------------------------------------------------------------------------------------------- structure


def test_the_training_loop_is_written_once():
    """Only trainer.py calls `diffusion_loss` (besides its definition in losses.py) in the package, the training
    scripts and the benchmarks."""
    files = [*sorted((ROOT / "diffusers_ddpm_ext").glob("*.py")), *sorted((ROOT / "training").rglob("*.py")),
             *sorted((ROOT / "benchmarks").glob("*.py"))]
    callers = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == "diffusion_loss":
                callers.add(path.relative_to(ROOT).as_posix())
    assert callers == {"diffusers_ddpm_ext/trainer.py"}


def test_readme_trainer_snippet_runs(tmp_path, monkeypatch):
    import re

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Training"):text.index("\n## ", text.index("## Training") + 3)]
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", section, flags=re.S) if "Trainer(" in b]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 3 and namespace["images"].shape == (2, 16, 16, 1)
