"""Time `DDPMUNet2DModel` against the converted-equal diffusers `UNet2DModel` in one process.

Both models carry identical weights (ours is made with `DDPMUNet2DModel.from_unet2d`). For each mode, the two
are timed alternately (so machine-load drift hits both alike) and the medians compared. One JSON line per row:

    python benchmarks/bench_unet.py                                  # small32 layout, batch 16
    python benchmarks/bench_unet.py --layout ddpm-cifar10 --batch-size 64
    python benchmarks/bench_unet.py --layout digits-small --modes forward

`speed_ratio` = ours speed / UNet2DModel speed = their median time / our median time (> 1: ours is faster).
"""

import argparse
import json
import platform
import statistics
import time

import torch
from diffusers import UNet2DModel
from tqdm import tqdm

from diffusers_ddpm_ext.unet import DDPMUNet2DModel

DDPM_DOWN = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
DDPM_UP = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")


def unet2d_config(layout: str) -> dict:
    """UNet2DModel configs: the DDPM CIFAR-10 network, a small 64-128 channel 32x32 RGB net, and our
    digits-small preset (translated)."""
    if layout == "ddpm-cifar10":  # google/ddpm-cifar10-32
        return dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                    layers_per_block=2, down_block_types=DDPM_DOWN, up_block_types=DDPM_UP, attention_head_dim=None,
                    flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, downsample_padding=0, dropout=0.1)
    if layout == "small32":
        return dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(64, 128, 128),
                    layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None)
    if layout == "digits-small":
        with torch.device("meta"):
            return dict(DDPMUNet2DModel.from_preset("digits-small").to_unet2d().config)
    raise ValueError(f"Unknown layout {layout!r}; allowed: ['small32', 'ddpm-cifar10', 'digits-small'].")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step_fn(model, batch: int, size: tuple, channels: int):
    device = model.device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, *size, generator=g).to(device)
    noise = torch.randn(batch, model.config.out_channels, *size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x, t).sample, noise).backward()
        opt.step()
        _sync(device)

    return step


def forward_fn(model, batch: int, size: tuple, channels: int):
    device = model.device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, *size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)

    def step():
        model.eval()
        with torch.no_grad():
            model(x, t)
        _sync(device)

    return step


def time_pair(fns: dict, warmup: int, repeats: int, desc: str) -> dict:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="small32", choices=["small32", "ddpm-cifar10", "digits-small"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--modes", nargs="+", default=["train_step", "forward"], choices=["train_step", "forward"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    theirs = UNet2DModel(**unet2d_config(args.layout))
    ours = DDPMUNet2DModel.from_unet2d(theirs)
    device = torch.device(args.device)
    theirs.to(device)
    ours.to(device)
    cfg = theirs.config
    size = (cfg.sample_size, cfg.sample_size) if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
    with torch.no_grad():  # parity of this very pair (eval: dropout off)
        x = torch.randn(2, cfg.in_channels, *size, device=device)
        t = torch.tensor([10, 900], device=device)
        max_abs_diff = (ours.eval()(x, t).sample - theirs.eval()(x, t).sample).abs().max().item()

    makers = {"train_step": train_step_fn, "forward": forward_fn}
    for mode in args.modes:
        pair = (("ours", ours), ("theirs", theirs))
        fns = {name: makers[mode](m, args.batch_size, size, cfg.in_channels) for name, m in pair}
        med = time_pair(fns, args.warmup, args.repeats, f"{args.layout} {mode}")
        print(json.dumps({
            "bench": "unet", "layout": args.layout, "mode": mode, "batch_size": args.batch_size,
            "ours_s": round(med["ours"], 5), "unet2d_s": round(med["theirs"], 5),
            "speed_ratio": round(med["theirs"] / med["ours"], 3),
            "params": sum(p.numel() for p in ours.parameters()), "max_abs_diff": max_abs_diff,
            "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": args.device, "machine": platform.machine(),
        }), flush=True)


if __name__ == "__main__":
    main()
