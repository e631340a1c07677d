"""Time `DDPMUNet2DModel` against the converted-equal diffusers `UNet2DModel` in one process.

Both models carry identical weights (ours is made with `DDPMUNet2DModel.from_unet2d`). For every row (layout x batch
size x mode x thread count) the variants are timed alternately, one call each per round (so machine-load drift hits
all alike), after warm-up rounds, and the medians compared. One JSON line per row:

    python benchmarks/bench_unet.py                        # all layouts, batch 16 and 64, train_step + forward
    python benchmarks/bench_unet.py --layouts small32 --batch-sizes 16 --threads 1 2
    python benchmarks/bench_unet.py --layouts small32 --batch-sizes 16 --modes forward --compile
    python benchmarks/bench_unet.py --memory               # + peak memory per model (one subprocess each)

Variants: `ours` (fp32, the default mode, parity with UNet2DModel), `ours_bf16` (`torch.autocast` bf16; AMX/AVX512-
BF16 on CPU, tensor cores on CUDA), `unet2d` (UNet2DModel fp32, the reference), and optionally `unet2d_bf16`
(`--bf16-baseline`), `ours_cl` (`--channels-last`), `ours_fused` (`--fused-qkv`: after diffusers'
`fuse_qkv_projections()`, one QKV GEMM per attention layer instead of three), and `ours_compile` / `unet2d_compile`
(`--compile`: inductor, ours with `fullgraph=True`, weight freezing for forward rows; compile time is excluded and
reported separately).

Each row has `<variant>_s` (median seconds per call), `speed_ratio` = unet2d / ours (> 1: ours is faster),
`bf16_speed_ratio` = unet2d fp32 / ours_bf16, achieved GFLOP/s per variant (FLOPs counted with
`torch.utils.flop_counter`) and `peak_fp32_gflops` / `peak_bf16_gflops`: a large 3x3 convolution timed in the same
process at the same thread count, the practical ceiling of this machine for conv-dominated networks. On CPU,
`unet2d_dense_fraction` / `ours_dense_fraction` are the shares of a profiled step spent in convolutions, GEMMs and
attention kernels (identical shapes and kernels in both models), and `ceiling_speed_ratio` = 1 / unet2d's share:
the most any identical-FLOP model calling the same dense kernels could gain over UNet2DModel on that row.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from diffusers_ddpm_ext.unet import DDPMUNet2DModel

DDPM_DOWN = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
DDPM_UP = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
LAYOUTS = ("ddpm-cifar10", "small32", "digits-small")


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
    raise ValueError(f"Unknown layout {layout!r}; allowed: {list(LAYOUTS)}.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(cfg, batch: int, device):
    size = (cfg.sample_size, cfg.sample_size) if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, *size, generator=g).to(device)
    noise = torch.randn(batch, cfg.out_channels, *size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    return x, noise, t


def step_fn(model, mode: str, batch: int, bf16: bool, channels_last: bool = False, call=None):
    """A closure running one training step (forward + MSE + backward + AdamW) or one inference forward."""
    device = next(model.parameters()).device
    x, noise, t = make_inputs(model.config, batch, device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    call = model if call is None else call
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    if mode == "forward":
        def step():
            model.eval()
            with torch.no_grad(), autocast:
                call(x, t)
            _sync(device)
        return step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = call(x, t).sample
        F.mse_loss(out.float(), noise).backward()
        opt.step()
        _sync(device)

    return step


def compiled_step(model, mode: str, batch: int):
    """(step, compile seconds) for `torch.compile(model)` (inductor). Forward rows compile with inductor's freezing:
    weights become constants, so convolution weights are pre-packed for oneDNN and bias/scale arithmetic is folded
    (inference weight folding); training rows compile forward and backward graphs without it. Ours must compile
    with `fullgraph=True` (no graph breaks); UNet2DModel is compiled as diffusers documents it."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    fullgraph = isinstance(model, DDPMUNet2DModel)
    with inductor_config.patch(freezing=mode == "forward"):
        step = step_fn(model, mode, batch, False, call=torch.compile(model, fullgraph=fullgraph))
        start = time.perf_counter()
        step()  # compiles
        return step, round(time.perf_counter() - start, 1)


def count_flops(model, mode: str, batch: int) -> int:
    x, noise, t = make_inputs(model.config, batch, next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    with counter:
        if mode == "forward":
            with torch.no_grad():
                model(x, t)
        else:
            F.mse_loss(model(x, t).sample, noise).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def conv_peak_gflops(dtype: torch.dtype, device) -> float:
    """Best GFLOP/s of a large 3x3 conv (256 -> 256 channels, 16x16, batch 32) over both memory formats."""
    best = 0.0
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(device, dtype)
    x = torch.randn(32, 256, 16, 16, device=device, dtype=dtype)
    flops = 2 * 32 * 256 * 256 * 9 * 16 * 16
    for fmt in (torch.contiguous_format, torch.channels_last):
        c, xi = conv.to(memory_format=fmt), x.contiguous(memory_format=fmt)
        with torch.no_grad():
            for _ in range(2):
                c(xi)
            times = []
            for _ in range(5):
                start = time.perf_counter()
                c(xi)
                _sync(xi.device)
                times.append(time.perf_counter() - start)
        best = max(best, flops / statistics.median(times) / 1e9)
    return best


# Dense kernels: the convolutions, GEMMs and attention that both models run on the same shapes (same oneDNN / BLAS
# kernels). Everything else (norms, activations, adds, copies, concatenations, Python) is where an identical-FLOP
# implementation can save time.
DENSE_KERNELS = ("convolution", "aten::mm", "aten::addmm", "aten::bmm", "scaled_dot_product", "aten::linear")


def dense_kernel_fraction(step) -> float:
    """Share of one step's self CPU time spent in DENSE_KERNELS (torch.profiler, one profiled call after one
    unprofiled one). `1 / fraction` bounds the speed-up any identical-FLOP model can reach over this one while it
    calls the same dense kernels: the ratio it would get if everything else cost nothing."""
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    dense = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in DENSE_KERNELS))
    return dense / total


def time_round_robin(fns: dict, warmup: int, repeats: int, desc: str) -> dict:
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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def step_peak_rss_mb(step, calls: int = 2) -> float:
    """Peak growth of the resident set (MiB) over `calls` steps, sampled every 0.2 ms by a thread (torch kernels
    release the GIL). Linux only; approximate, but the same probe for both models."""
    import threading

    base, peak, done = _rss_bytes(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    for _ in range(calls):
        step()
    done.set()
    thread.join()
    return (max(peak[0], _rss_bytes()) - base) / 2**20


def peak_memory_mb(layout: str, which: str, mode: str, batch: int, threads: int) -> float:
    """Peak RSS growth (MiB) of two steps of one model, each model in a fresh subprocess."""
    code = (
        "import sys,torch;sys.path.insert(0,%r);import bench_unet as b\n"
        "from diffusers_ddpm_ext.convert import unet2d_config_to_ours\n"
        "torch.set_num_threads(%d);torch.manual_seed(0);cfg=b.unet2d_config(%r)\n"
        "with torch.device('meta'): full=dict(b.UNet2DModel(**cfg).config)\n"
        "m=b.UNet2DModel(**cfg) if %r=='unet2d' else b.DDPMUNet2DModel(**unet2d_config_to_ours(full))\n"
        "print(b.step_peak_rss_mb(b.step_fn(m,%r,%d,False)))\n"
    ) % (os.path.dirname(os.path.abspath(__file__)), threads, layout, which, mode, batch)
    # Ours is built directly from the translated config (converting would briefly hold two copies of the
    # weights), so both processes start from the same imports and parameter bytes.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--modes", nargs="+", default=["train_step", "forward"], choices=["train_step", "forward"])
    parser.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads()],
                        help="torch.set_num_threads values to run every row at (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-bf16", action="store_true", help="skip the ours_bf16 variant")
    parser.add_argument("--bf16-baseline", action="store_true", help="also time UNet2DModel under bf16 autocast")
    parser.add_argument("--channels-last", action="store_true", help="also time ours with channels_last memory")
    parser.add_argument("--fused-qkv", action="store_true", help="also time ours after fuse_qkv_projections()")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of both models (ours with "
                        "fullgraph=True; inductor freezing for forward rows); compile time is reported, not timed")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory (subprocess per model)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)

    for layout in args.layouts:
        torch.manual_seed(0)
        theirs = UNet2DModel(**unet2d_config(layout)).to(device)
        ours = DDPMUNet2DModel.from_unet2d(theirs).to(device)
        x, _, t = make_inputs(theirs.config, 2, device)
        with torch.no_grad():  # parity of this very pair (eval: dropout off)
            ref = theirs.eval()(x, t).sample
            max_abs_diff = (ours.eval()(x, t).sample - ref).abs().max().item()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                low = ours(x, t).sample.float()
            bf16_rel_err = ((low - ref).norm() / ref.norm()).item()
        models = {"ours": ours, "unet2d": theirs}
        if args.channels_last:
            models["ours_cl"] = DDPMUNet2DModel.from_unet2d(theirs).to(device, memory_format=torch.channels_last)
        if args.fused_qkv:
            models["ours_fused"] = DDPMUNet2DModel.from_unet2d(theirs).to(device)
            models["ours_fused"].fuse_qkv_projections()
        if args.compile:  # own copies: freezing turns the weights of a compiled forward into constants
            models["ours_compile"] = DDPMUNet2DModel.from_unet2d(theirs).to(device)
            models["unet2d_compile"] = UNet2DModel.from_config(theirs.config).to(device)
            models["unet2d_compile"].load_state_dict(theirs.state_dict())
        for threads in args.threads:
            torch.set_num_threads(threads)
            peak32 = peak16 = 0.0
            for batch in args.batch_sizes:
                for mode in args.modes:
                    # Re-measured before every row, keeping the best: a peak taken during a load spike of this shared
                    # machine would understate the ceiling.
                    peak32 = max(peak32, conv_peak_gflops(torch.float32, device))
                    peak16 = max(peak16, conv_peak_gflops(torch.bfloat16, device))
                    flops = count_flops(ours, mode, batch)
                    fns = {"ours": step_fn(ours, mode, batch, False), "unet2d": step_fn(theirs, mode, batch, False)}
                    if not args.no_bf16:
                        fns["ours_bf16"] = step_fn(ours, mode, batch, True)
                    if args.bf16_baseline:
                        fns["unet2d_bf16"] = step_fn(theirs, mode, batch, True)
                    if args.fused_qkv:
                        fns["ours_fused"] = step_fn(models["ours_fused"], mode, batch, False)
                    if args.channels_last:
                        fns["ours_cl"] = step_fn(models["ours_cl"], mode, batch, False, channels_last=True)
                    compile_s = {}
                    if args.compile:
                        for name, m in (("ours", models["ours_compile"]), ("unet2d", models["unet2d_compile"])):
                            fns[f"{name}_compile"], compile_s[name] = compiled_step(m, mode, batch)
                    med = time_round_robin(fns, args.warmup, args.repeats, f"{layout} b{batch} {mode} t{threads}")
                    row = {"bench": "unet", "layout": layout, "mode": mode, "batch_size": batch, "threads": threads}
                    row.update({f"{k}_s": round(v, 4) for k, v in med.items()})
                    row["speed_ratio"] = round(med["unet2d"] / med["ours"], 3)
                    for k in med:
                        if k not in ("ours", "unet2d"):
                            row[f"{k}_speed_ratio"] = round(med["unet2d"] / med[k], 3)
                    row.update({f"{k}_gflops": round(flops / v / 1e9, 1) for k, v in med.items()})
                    row.update(peak_fp32_gflops=round(peak32, 1), peak_bf16_gflops=round(peak16, 1),
                               ours_fraction_of_fp32_peak=round(flops / med["ours"] / 1e9 / peak32, 3),
                               unet2d_fraction_of_fp32_peak=round(flops / med["unet2d"] / 1e9 / peak32, 3))
                    if device.type == "cpu":
                        frac = dense_kernel_fraction(fns["unet2d"])
                        row.update(unet2d_dense_fraction=round(frac, 3), ceiling_speed_ratio=round(1 / frac, 3),
                                   ours_dense_fraction=round(dense_kernel_fraction(fns["ours"]), 3))
                    row.update({f"{k}_compile_s": v for k, v in compile_s.items()})
                    if args.memory:
                        row["ours_peak_mb"] = round(peak_memory_mb(layout, "ours", mode, batch, threads), 1)
                        row["unet2d_peak_mb"] = round(peak_memory_mb(layout, "unet2d", mode, batch, threads), 1)
                    row.update(gflop_per_call=round(flops / 1e9, 2), params=sum(p.numel() for p in ours.parameters()),
                               max_abs_diff=max_abs_diff, bf16_rel_err=round(bf16_rel_err, 5),
                               repeats=args.repeats, torch=torch.__version__, device=args.device,
                               machine=platform.machine(), load_avg=round(os.getloadavg()[0], 2))
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
