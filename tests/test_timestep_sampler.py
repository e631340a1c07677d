import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffusers_ddpm_ext.timestep_sampler import (
    LossSecondMomentSampler,
    UniformSampler,
    create_timestep_sampler,
)

T = 50


def per_t_loss(t: torch.Tensor) -> torch.Tensor:
    # Heavy at small t like a real VLB, so importance sampling matters.
    return 5.0 * torch.exp(-t.double() / 4.0) + 0.05 + 0.01 * t.double()


def warm_sampler(generator=None, noise=0.1):
    sampler = LossSecondMomentSampler(T)
    g = torch.Generator().manual_seed(1)
    for _ in range(sampler.history_per_term):
        t = torch.arange(T)
        sampler.update(t, per_t_loss(t) * (1 + noise * torch.randn(T, generator=g, dtype=torch.float64)))
    return sampler


def test_factory_and_bad_names():
    assert isinstance(create_timestep_sampler("uniform", 10), UniformSampler)
    s = create_timestep_sampler("loss-second-moment", 10, history_per_term=3)
    assert isinstance(s, LossSecondMomentSampler) and s.history_per_term == 3
    with pytest.raises(ValueError, match="uniform"):
        create_timestep_sampler("lossaware", 10)
    with pytest.raises(ValueError):
        LossSecondMomentSampler(0)
    with pytest.raises(ValueError):
        LossSecondMomentSampler(10, uniform_prob=0.0)


def test_uniform_sampler_range_and_weights():
    t, w = UniformSampler(T).sample(10_000, "cpu", torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() == T - 1
    assert torch.equal(w, torch.ones(10_000))
    counts = torch.bincount(t, minlength=T).double()
    assert counts.min() > 0.6 * 10_000 / T


def test_uniform_until_warm_then_second_moment():
    sampler = LossSecondMomentSampler(T)
    t = torch.arange(T)
    for i in range(sampler.history_per_term - 1):
        sampler.update(t, per_t_loss(t))
    sampler.update(t[:-1], per_t_loss(t[:-1]))  # last timestep still has only 9 entries
    assert not sampler.warmed_up()
    assert torch.allclose(sampler.probabilities(), torch.full((T,), 1.0 / T, dtype=torch.float64))
    _, w = sampler.sample(100)
    assert torch.equal(w, torch.ones(100))
    sampler.update(t[-1:], per_t_loss(t[-1:]))
    assert sampler.warmed_up()
    # Constant history per t: sqrt(E[L^2]) = L_t exactly; 0.1% uniform mix.
    expected = per_t_loss(t) / per_t_loss(t).sum() * 0.999 + 0.001 / T
    assert torch.allclose(sampler.probabilities(), expected, rtol=1e-12)


def test_history_keeps_last_ten():
    sampler = LossSecondMomentSampler(3, history_per_term=10)
    for i in range(25):
        sampler.update(torch.tensor([1]), torch.tensor([float(i)]))
    assert sampler.loss_counts.tolist() == [0, 10, 0]
    assert sampler.loss_history[1].tolist() == [float(i) for i in range(15, 25)]
    # The same t repeated inside one batch is recorded in order.
    sampler.update(torch.tensor([2, 2, 2]), torch.tensor([1.0, 2.0, 3.0]))
    assert sampler.loss_history[2, :3].tolist() == [1.0, 2.0, 3.0]


def test_importance_weights_unbiased():
    sampler = warm_sampler()
    probs = sampler.probabilities()
    t_all = torch.arange(T)
    uniform_mean = per_t_loss(t_all).mean()
    # Exact identity: E_p[w L] = sum_t p_t L_t / (T p_t) = mean_t L_t.
    assert torch.allclose((probs * per_t_loss(t_all) / (T * probs)).sum(), uniform_mean, rtol=1e-12)
    # Non-uniform after warm-up, favouring the heavy small-t losses.
    assert probs[0] > 5 * probs[-1]
    # Statistical check with the sampler's own draws (fixed seed).
    g = torch.Generator().manual_seed(123)
    n = 200_000
    t, w = sampler.sample(n, "cpu", g)
    est = w.double() * per_t_loss(t)
    mean, stderr = est.mean(), est.std() / n**0.5
    assert abs(mean - uniform_mean) < 4 * stderr, (mean, uniform_mean, stderr)
    # Importance sampling should reduce the variance compared with uniform draws.
    tu, _ = UniformSampler(T).sample(n, "cpu", g)
    assert est.std() < per_t_loss(tu).std()
    # Empirical frequencies follow p.
    freq = torch.bincount(t, minlength=T).double() / n
    assert torch.allclose(freq, probs, atol=5 * (probs.max() / n) ** 0.5)


def test_sampling_is_seeded():
    sampler = warm_sampler()
    a = sampler.sample(64, "cpu", torch.Generator().manual_seed(7))
    b = sampler.sample(64, "cpu", torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].dtype == torch.long and a[1].dtype == torch.float32


def test_state_dict_roundtrip_weights_only(tmp_path):
    sampler = warm_sampler()
    sampler.update(torch.tensor([3, 3, 4]), torch.tensor([9.0, 8.0, 7.0]))
    path = tmp_path / "sampler.pt"
    torch.save(sampler.state_dict(), path)
    state = torch.load(path, weights_only=True)
    restored = LossSecondMomentSampler(T)
    restored.load_state_dict(state)
    assert torch.equal(restored.loss_history, sampler.loss_history)
    assert torch.equal(restored.loss_counts, sampler.loss_counts)
    assert torch.equal(restored.probabilities(), sampler.probabilities())
    a = sampler.sample(32, "cpu", torch.Generator().manual_seed(3))
    b = restored.sample(32, "cpu", torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # The restored copy is independent of the saved dict.
    restored.update(torch.tensor([0]), torch.tensor([1.0]))
    assert not torch.equal(restored.loss_history, sampler.loss_history)
    with pytest.raises(ValueError, match="shape"):
        LossSecondMomentSampler(T + 1).load_state_dict(state)
    with pytest.raises(ValueError, match="keys"):
        LossSecondMomentSampler(T).load_state_dict({"loss_history": state["loss_history"]})
    assert UniformSampler(T).state_dict() == {}


def _distributed_worker(rank, world_size, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        sampler = LossSecondMomentSampler(8, history_per_term=2)
        # Unequal batch sizes per rank; rank-specific losses.
        for step in range(3):
            n = 5 + 3 * rank + step
            g = torch.Generator().manual_seed(100 * rank + step)
            t = torch.randint(0, 8, (n,), generator=g)
            sampler.update(t, torch.rand(n, generator=g) + rank)
        torch.save(sampler.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_update_all_gathers_across_processes(tmp_path):
    mp.spawn(_distributed_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.equal(s0["loss_history"], s1["loss_history"])
    assert torch.equal(s0["loss_counts"], s1["loss_counts"])
    # Same state as a single process fed rank 0's batch then rank 1's batch at each step.
    ref = LossSecondMomentSampler(8, history_per_term=2)
    for step in range(3):
        for rank in range(2):
            n = 5 + 3 * rank + step
            g = torch.Generator().manual_seed(100 * rank + step)
            t = torch.randint(0, 8, (n,), generator=g)
            losses = torch.rand(n, generator=g) + rank
            ref.update(t, losses)
    assert torch.allclose(ref.loss_history, s0["loss_history"])
    assert torch.equal(ref.loss_counts, s0["loss_counts"])
