"""Analytic-DPM variances for a `UNet2DModel` trained with diffusers' recipe: held-out bits/dim by number of steps.

One network is trained as diffusers' `train_unconditional.py` does (linear β, T = 1000, `fixed_small`, ε-MSE; a
small `UNet2DModel`, a few hundred steps, on the built-in digits at 16x16), then evaluated, unchanged, under three
reverse variances: diffusers' `fixed_small` (β̃) and `fixed_large` (β), and the analytic variance of Bao et al.
(2022), whose Γ table comes from one `estimate_analytic_gamma` pass over training images. Each chain of K steps is
IDM's even respacing ("K", both ends kept) or, for the analytic variance, also the trajectory found by dynamic
programming on the model's expected bound terms (Γ and `x0_mse_clipped` from the same pass). Bits/dim is the bound
of the process the model samples with (x_0 clipped to [-1, 1], DDPMScheduler's default), on held-out digits, exact
for K <= 100 and the unbiased stratified estimate for K = 1000. All variances see the same x_t draws (same
generator), so the per-image differences are paired; standard errors are std over images / √N. Prints ONE JSON line.

    python benchmarks/analytic_variance.py            # 4 min on one busy CPU core

Measured: see README, "Analytic variances". Training is a plain loop on purpose (diffusers' recipe, nothing of ours).
The network calls are the same for every variance type (only σ² differs), so each evaluation after the first
replays the recorded outputs (checked input by input) instead of calling the network again.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from diffusers import DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from diffusers_ddpm_ext.analytic import estimate_analytic_gamma, optimal_trajectory
from diffusers_ddpm_ext.data import DIGITS_NUM_LEVELS, load_digits_tensors
from diffusers_ddpm_ext.likelihood import bits_per_dim, estimate_bits_per_dim
from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler

VARIANCES = ("fixed_small", "fixed_large", "analytic")


class ReplayModel(torch.nn.Module):
    """Calls `model` while recording, then replays the recorded outputs for identical inputs (the same generator
    gives every variance type the same x_t), calling the model only on a mismatch."""

    def __init__(self, model):
        super().__init__()
        self.model, self.record, self.position, self.calls = model, [], 0, 0

    def rewind(self):
        self.position = 0

    def forward(self, sample, timestep):
        if self.position < len(self.record):
            x, t, out = self.record[self.position]
            if torch.equal(x, sample) and torch.equal(t, timestep):
                self.position += 1
                return out
        out = self.model(sample, timestep).sample
        self.calls += sample.shape[0]
        self.record.append((sample.clone(), timestep.clone(), out))
        self.position += 1
        return out


def train(args, images):
    """diffusers' recipe: DDPMScheduler defaults (linear β, T = 1000, fixed_small), ε-MSE, AdamW."""
    torch.manual_seed(args.seed)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    losses = []
    for _ in tqdm(range(args.steps), desc="train", disable=not args.progress):
        x0 = images[torch.randint(0, images.shape[0], (args.batch_size,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (args.batch_size,), generator=g)
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return unet.eval(), scheduler, sum(losses[-50:]) / len(losses[-50:])


def summary(values):
    values = values.double()
    return [round(values.mean().item(), 4), round(values.std().item() / math.sqrt(values.numel()), 4)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gamma_samples", type=int, default=32, help="training images per timestep for Γ")
    p.add_argument("--heldout", type=int, default=100, help="held-out digits evaluated")
    p.add_argument("--nfe", default="10,20,50,100,1000", help="chain lengths; 1000 uses the stratified estimate")
    p.add_argument("--estimate_calls", type=int, default=50, help="network calls per image for the K = 1000 estimate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    train_images, _ = load_digits_tensors("train", resolution=16)
    heldout, _ = load_digits_tensors("heldout", resolution=16)
    heldout = heldout[: args.heldout]
    unet, ddpm, final_mse = train(args, train_images)
    train_seconds = time.perf_counter() - start

    tic = time.perf_counter()
    with torch.no_grad():
        est = estimate_analytic_gamma(unet, ddpm, train_images, num_samples=args.gamma_samples, batch_size=500,
                                      generator=torch.Generator().manual_seed(1), progress=args.progress)
    gamma_seconds = time.perf_counter() - tic
    schedulers = {kind: GaussianDiffusionScheduler.from_config(ddpm.config, variance_type=kind,
                                                               analytic_gamma=est.gamma.tolist())
                  for kind in VARIANCES}
    replay = ReplayModel(unet)
    kw = dict(num_levels=DIGITS_NUM_LEVELS, batch_size=500, progress=args.progress)
    rows, bound, trajectories = {}, None, {}
    for nfe in (int(k) for k in args.nfe.split(",")):
        replay.record.clear()
        per_image = {}
        for kind in VARIANCES:
            replay.rewind()
            g = torch.Generator().manual_seed(100 + nfe)
            if nfe == 1000:
                out = estimate_bits_per_dim(replay, schedulers[kind], heldout, args.estimate_calls, generator=g, **kw)
            else:
                out = bits_per_dim(replay, schedulers[kind], heldout, generator=g, num_inference_steps=str(nfe), **kw)
            per_image[kind], bound = out.bits_per_dim, out.bound
        if nfe < 1000:
            dp_chain = optimal_trajectory(schedulers["analytic"], nfe, x0_mse=est.x0_mse_clipped)
            out = bits_per_dim(unet, schedulers["analytic"], heldout, generator=torch.Generator().manual_seed(7),
                               timesteps=dp_chain, **kw)
            per_image["analytic_optimal_trajectory"] = out.bits_per_dim
            if nfe <= 20:
                trajectories[nfe] = dp_chain
        row = {kind: summary(values) for kind, values in per_image.items()}
        for kind in ("fixed_small", "fixed_large"):
            row[f"analytic_minus_{kind}"] = summary(per_image["analytic"] - per_image[kind])
        rows[str(nfe)] = row
    print(json.dumps(dict(
        benchmark="analytic_variance",
        model="UNet2DModel 16x16, block_out_channels (16, 32), 1 layer per block, no attention",
        recipe=f"diffusers: linear beta, T=1000, fixed_small, eps-MSE, AdamW lr {args.lr}, {args.steps} steps x "
               f"batch {args.batch_size}",
        final_train_mse=round(final_mse, 4),
        heldout_images=heldout.shape[0],
        gamma_samples=args.gamma_samples,
        chains="IDM even respacing 'K' (both ends kept); optimal_trajectory: dynamic programming on the expected "
               "analytic bound terms (Γ and the clipped x0 error from the same calls)",
        bound_example=bound,
        k1000_method=f"stratified unbiased estimate, {args.estimate_calls} calls per image",
        bits_per_dim_mean_se=rows,
        gamma_first_mid_last=[round(est.gamma[i].item(), 4) for i in (0, 500, 999)],
        network_calls_eval=replay.calls,
        train_seconds=round(train_seconds, 1),
        gamma_seconds=round(gamma_seconds, 1),
        total_seconds=round(time.perf_counter() - start, 1),
        optimal_trajectories={str(k): v for k, v in trajectories.items()},
        torch_threads=torch.get_num_threads(),
    )))


if __name__ == "__main__":
    main()
