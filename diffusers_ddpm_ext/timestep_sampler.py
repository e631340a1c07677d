"""Timestep samplers for diffusion training: uniform, and IDM's loss-second-moment importance sampler.

A sampler draws training timesteps t with probabilities p_t and returns importance weights
1/(T·p_t), so that mean(weights · L_t) is an unbiased estimate of the uniform average of L_t
(IDM, Nichol & Dhariwal 2021, section 3.3). ``update`` feeds back per-example losses; across
processes every rank receives every rank's losses so that all ranks keep the same state and draw
from the same distribution.
"""

from __future__ import annotations

import abc
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

SAMPLER_NAMES = ("uniform", "loss-second-moment")


class TimestepSampler(abc.ABC):
    """Base class: subclasses define :meth:`probabilities`; sampling and weighting are shared."""

    def __init__(self, num_timesteps: int):
        if not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
        self.num_timesteps = num_timesteps

    @abc.abstractmethod
    def probabilities(self) -> torch.Tensor:
        """(T,) float64 probabilities p_t of drawing each timestep."""

    def sample(
        self, batch_size: int, device="cpu", generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Draw a batch of timesteps.

        Args:
            batch_size: number of timesteps.
            device: device of the returned tensors.
            generator: optional ``torch.Generator`` (its device is where the draw happens).

        Returns:
            ``(timesteps, weights)``: (B,) long timesteps and (B,) float32 weights 1/(T·p_t).
        """
        probs = self.probabilities()
        draw_device = generator.device if generator is not None else torch.device("cpu")
        timesteps = torch.multinomial(probs.to(draw_device), batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * probs.to(draw_device)[timesteps])
        return timesteps.to(device), weights.to(device=device, dtype=torch.float32)

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-example losses (no-op for samplers that do not adapt)."""

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        if state_dict:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state_dict)}")


class UniformSampler(TimestepSampler):
    """t ~ Uniform{0, …, T−1}, weights all 1."""

    def probabilities(self) -> torch.Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch_size, device="cpu", generator=None):
        draw_device = generator.device if generator is not None else torch.device("cpu")
        timesteps = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=draw_device)
        return timesteps.to(device), torch.ones(batch_size, device=device)


def _all_gather_varsize(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor from every process in rank order (batch sizes may differ per rank)."""
    world_size = dist.get_world_size()
    # NCCL only moves CUDA tensors; gloo only CPU ones. Follow the backend.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = tensor.detach().to(device)
    size = torch.tensor([local.numel()], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    max_size = int(max(s.item() for s in sizes))
    padded = torch.zeros(max_size, device=device, dtype=local.dtype)
    padded[: local.numel()] = local
    gathered = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)]).cpu()


class LossSecondMomentSampler(TimestepSampler):
    """IDM's importance sampler: p_t ∝ √E[L_t²] over the last ``history_per_term`` losses at t.

    Until every t has a full history it samples uniformly (weights 1). Afterwards the distribution is
    mixed with ``uniform_prob`` of the uniform one so that no p_t is zero (IDM eq. 17 and its code).

    Args:
        num_timesteps: T.
        history_per_term: losses remembered per timestep (10 in IDM).
        uniform_prob: weight of the uniform mixture component (0.001 in IDM).
    """

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        if not isinstance(history_per_term, int) or history_per_term < 1:
            raise ValueError(f"history_per_term must be a positive integer, got {history_per_term!r}")
        if not 0.0 < uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must be in (0, 1], got {uniform_prob!r}")
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self.loss_history = torch.zeros(num_timesteps, history_per_term, dtype=torch.float64)  # (T, H)
        self.loss_counts = torch.zeros(num_timesteps, dtype=torch.long)  # (T,)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history_per_term).all())

    def probabilities(self) -> torch.Tensor:
        uniform = torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)
        if not self.warmed_up():
            return uniform
        second_moment = torch.sqrt((self.loss_history**2).mean(dim=-1))
        if not second_moment.sum() > 0:  # all recorded losses are zero: nothing to prefer
            return uniform
        probs = second_moment / second_moment.sum()
        return probs * (1.0 - self.uniform_prob) + uniform * self.uniform_prob

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Record losses; gathers from every process when ``torch.distributed`` is initialised.

        Call it on every rank with that rank's (B,) timesteps and (B,) detached per-example losses
        (before importance weighting); batch sizes may differ between ranks.
        """
        timesteps = timesteps.reshape(-1)
        losses = losses.detach().reshape(-1)
        if timesteps.numel() != losses.numel():
            raise ValueError(f"got {timesteps.numel()} timesteps but {losses.numel()} losses")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            timesteps = _all_gather_varsize(timesteps.long())
            losses = _all_gather_varsize(losses.double())
        for t, loss in zip(timesteps.tolist(), losses.double().cpu().tolist()):
            if not 0 <= t < self.num_timesteps:
                raise ValueError(f"timestep {t} out of range [0, {self.num_timesteps})")
            count = int(self.loss_counts[t])
            if count == self.history_per_term:  # drop the oldest, append the newest
                self.loss_history[t, :-1] = self.loss_history[t, 1:].clone()
                self.loss_history[t, -1] = loss
            else:
                self.loss_history[t, count] = loss
                self.loss_counts[t] = count + 1

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Plain tensors only, so it loads with ``torch.load(weights_only=True)``."""
        return {"loss_history": self.loss_history.clone(), "loss_counts": self.loss_counts.clone()}

    def load_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        expected = {"loss_history": tuple(self.loss_history.shape), "loss_counts": tuple(self.loss_counts.shape)}
        if set(state_dict) != set(expected):
            raise ValueError(f"expected keys {sorted(expected)}, got {sorted(state_dict)}")
        for key, shape in expected.items():
            if tuple(state_dict[key].shape) != shape:
                raise ValueError(f"{key} has shape {tuple(state_dict[key].shape)}, expected {shape}")
        self.loss_history = state_dict["loss_history"].to(torch.float64).clone()
        self.loss_counts = state_dict["loss_counts"].to(torch.long).clone()


def create_timestep_sampler(name: str, num_timesteps: int, **kwargs) -> TimestepSampler:
    """Build a sampler by name: "uniform" or "loss-second-moment" (extra kwargs go to its constructor)."""
    if name == "uniform":
        return UniformSampler(num_timesteps, **kwargs)
    if name == "loss-second-moment":
        return LossSecondMomentSampler(num_timesteps, **kwargs)
    raise ValueError(f"unknown timestep sampler {name!r}; choose one of {SAMPLER_NAMES}")
