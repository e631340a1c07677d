"""Time `DDPMUNet2DModel` against the converted-equal diffusers `UNet2DModel` in one process.

Both models carry identical weights (ours is made with `DDPMUNet2DModel.from_unet2d`). For every row (layout x batch
size x mode x thread count) the variants are timed alternately, one call each per round (so machine-load drift hits
all alike), after warm-up rounds, and the medians compared. One JSON line per row:

    python benchmarks/bench_unet.py                        # all layouts, batch 16 and 64, train_step + forward
    python benchmarks/bench_unet.py --layouts small32 --batch-sizes 16 --threads 1 2
    python benchmarks/bench_unet.py --layouts small32 --batch-sizes 16 --modes forward --compile
    python benchmarks/bench_unet.py --memory               # + peak memory per model (one subprocess each)
    python benchmarks/bench_unet.py --device cuda --layouts ddpm-cifar10 idm-cifar10 --batch-sizes 64 128 \
        --precisions fp32 bf16 fp16                        # GPU: CUDA events, max_memory_allocated per variant
    python benchmarks/bench_unet.py --device cuda --layouts ddpm-cifar10 --sampling-steps 1000 50  # images/s

Variants: `ours` (fp32, the default mode, parity with UNet2DModel), `ours_bf16` (`torch.autocast` bf16; AMX/AVX512-
BF16 on CPU, tensor cores on CUDA), `unet2d` (UNet2DModel fp32, the reference), and optionally `unet2d_bf16`
(`--bf16-baseline`), `ours_cl` (`--channels-last`), `ours_fused` (`--fused-qkv`: after diffusers'
`fuse_qkv_projections()`, one QKV GEMM per attention layer instead of three), and `ours_compile` / `unet2d_compile`
(`--compile`: inductor, ours with `fullgraph=True`, weight freezing for forward rows; compile time is excluded and
reported separately, as `<model>_compile_time_s`).

`--precisions fp32 bf16 fp16` replaces that set: both models at each precision (`ours`/`unet2d` in fp32,
`ours_<p>`/`unet2d_<p>` under `torch.autocast` to p; fp16 training steps go through a `torch.amp.GradScaler`, as
fp16 training does), each row adding `speed_ratio_<p>` = unet2d_<p> / ours_<p>. `--compile-precision` sets the
autocast of the compiled variants (default fp32).

On CUDA (`--device cuda`) every call is timed with CUDA events around it (the step synchronises at its end), TF32
stays as PyTorch sets it (reported: `cudnn_tf32` / `matmul_tf32`), and `<variant>_step_mib` is
`torch.cuda.max_memory_allocated` during one call minus what was allocated before it (activations, gradients and
workspaces; weights and AdamW state are resident before). `--sampling-steps 1000 50` times sampling instead: our
`GaussianDiffusionPipeline` against `DDPMPipeline` with the converted-equal UNet2DModel and a `DDPMScheduler` of the
same configuration, one warm-up call then `--repeats` timed calls per chain length, as images/s (`bench: sampling`
rows).

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
LAYOUTS = ("ddpm-cifar10", "small32", "digits-small")  # the default set
ALL_LAYOUTS = (*LAYOUTS, "idm-cifar10")
PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    if layout in ("digits-small", "idm-cifar10"):  # idm-cifar10: IDM's CIFAR-10 net (52.5M, learned σ: 6 outputs)
        with torch.device("meta"):
            return dict(DDPMUNet2DModel.from_preset(layout).to_unet2d().config)
    raise ValueError(f"Unknown layout {layout!r}; allowed: {list(ALL_LAYOUTS)}.")


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


def _precision(value) -> str:
    """"fp32" / "bf16" / "fp16" from a precision name or the old boolean `bf16` argument."""
    if isinstance(value, bool):
        return "bf16" if value else "fp32"
    if value not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {value!r}")
    return value


def step_fn(model, mode: str, batch: int, bf16, channels_last: bool = False, call=None):
    """A closure running one training step (forward + MSE + backward + AdamW) or one inference forward.

    `bf16`: True/False (bf16 autocast or fp32, as before) or a precision name "fp32", "bf16", "fp16". An fp16
    training step scales the loss with a `torch.amp.GradScaler` (unscale, inf check, step, update), as fp16 training
    must."""
    precision = _precision(bf16)
    device = next(model.parameters()).device
    x, noise, t = make_inputs(model.config, batch, device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    call = model if call is None else call
    dtype = AUTOCAST_DTYPES.get(precision, torch.bfloat16)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")

    if mode == "forward":
        def step():
            model.eval()
            with torch.no_grad(), autocast():
                call(x, t)
            _sync(device)
        return step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = call(x, t).sample
        loss = F.mse_loss(out.float(), noise)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        _sync(device)

    return step


def compiled_step(model, mode: str, batch: int, precision: str = "fp32"):
    """(step, compile seconds) for `torch.compile(model)` (inductor). Forward rows compile with inductor's freezing:
    weights become constants, so convolution weights are pre-packed for oneDNN and bias/scale arithmetic is folded
    (inference weight folding); training rows compile forward and backward graphs without it. Ours must compile
    with `fullgraph=True` (no graph breaks); UNet2DModel is compiled as diffusers documents it. `precision`: the
    autocast the compiled call runs (and is compiled) under. Call `torch._dynamo.reset()` before compiling a row's
    models, not between them: a reset drops the code compiled for the first, which then recompiles in the timing."""
    import torch._inductor.config as inductor_config

    fullgraph = isinstance(model, DDPMUNet2DModel)
    with inductor_config.patch(freezing=mode == "forward"):
        step = step_fn(model, mode, batch, precision, call=torch.compile(model, fullgraph=fullgraph))
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
    """Best GFLOP/s of a large 3x3 conv (256 -> 256 channels, 16x16, batch 32; batch 512 on CUDA, where a batch of
    32 is over in microseconds) over both memory formats."""
    device = torch.device(device)
    best = 0.0
    batch = 512 if device.type == "cuda" else 32
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(device, dtype)
    x = torch.randn(batch, 256, 16, 16, device=device, dtype=dtype)
    flops = 2 * batch * 256 * 256 * 9 * 16 * 16
    timer = Timer(device)
    for fmt in (torch.contiguous_format, torch.channels_last):
        c, xi = conv.to(memory_format=fmt), x.contiguous(memory_format=fmt)

        def run():
            c(xi)
            _sync(device)

        with torch.no_grad():
            for _ in range(2):
                run()
            times = [timer(run) for _ in range(5)]
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


class Timer:
    """Seconds one call of `fn` takes: `time.perf_counter` on the CPU; on CUDA the elapsed time between two CUDA
    events recorded around it (after a synchronisation, so no earlier work is counted; `fn` synchronises at its end)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def time_round_robin(fns: dict, warmup: int, repeats: int, desc: str, device="cpu") -> dict:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    timer = Timer(device)
    times = {name: [] for name in fns}
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        for name, fn in fns.items():
            times[name].append(timer(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def cuda_step_mib(fn) -> float:
    """MiB `torch.cuda.max_memory_allocated` rose above the memory allocated before one call of `fn`."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def sampling_rows(layout: str, theirs, ours, args, device) -> None:
    """Images/s of our GaussianDiffusionPipeline and of DDPMPipeline with the converted-equal UNet2DModel (and a
    DDPMScheduler of the same configuration) for each chain length of `--sampling-steps`: one JSON row each."""
    from diffusers import DDPMPipeline, DDPMScheduler

    from diffusers_ddpm_ext.pipelines import GaussianDiffusionPipeline
    from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler

    learned = theirs.config.out_channels == 2 * theirs.config.in_channels
    config = dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                  variance_type="learned_range" if learned else "fixed_small")
    pipes = {"ours": GaussianDiffusionPipeline(unet=ours.eval(), scheduler=GaussianDiffusionScheduler(**config)),
             "ddpm_pipeline": DDPMPipeline(unet=theirs.eval(), scheduler=DDPMScheduler(**config))}
    timer = Timer(device)
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    for precision in args.precisions or ["fp32"]:
        def sample(pipe, steps):
            with torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(precision, torch.bfloat16),
                                enabled=precision != "fp32"):
                pipe(batch_size=args.sampling_batch, num_inference_steps=steps,
                     generator=torch.Generator().manual_seed(0), output_type="np")
            _sync(device)

        for pipe in pipes.values():  # warm-up (kernel selection, allocator) on a short chain
            sample(pipe, 2)
        for steps in args.sampling_steps:
            times = {name: [] for name in pipes}
            for _ in range(args.repeats):
                for name, pipe in pipes.items():
                    times[name].append(timer(lambda: sample(pipe, steps)))
            med = {name: statistics.median(ts) for name, ts in times.items()}
            row = {"bench": "sampling", "layout": layout, "precision": precision, "steps": steps,
                   "batch_size": args.sampling_batch, "variance_type": config["variance_type"]}
            row.update({f"{name}_images_per_s": round(args.sampling_batch / v, 3) for name, v in med.items()})
            row.update({f"{name}_s": round(v, 4) for name, v in med.items()})
            row["speed_ratio"] = round(med["ddpm_pipeline"] / med["ours"], 3)
            row.update(repeats=args.repeats, torch=torch.__version__, device=str(device), gpu=_gpu_name(device))
            print(json.dumps(row), flush=True)


def _gpu_name(device):
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None


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
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=ALL_LAYOUTS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--modes", nargs="+", default=["train_step", "forward"], choices=["train_step", "forward"])
    parser.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads()],
                        help="torch.set_num_threads values to run every row at (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-bf16", action="store_true", help="skip the ours_bf16 variant")
    parser.add_argument("--bf16-baseline", action="store_true", help="also time UNet2DModel under bf16 autocast")
    parser.add_argument("--precisions", nargs="+", default=None, choices=PRECISIONS, help="time both models at each "
                        "of these precisions (autocast; fp16 training with a GradScaler) instead of ours, unet2d and "
                        "ours_bf16")
    parser.add_argument("--channels-last", action="store_true", help="also time ours with channels_last memory")
    parser.add_argument("--fused-qkv", action="store_true", help="also time ours after fuse_qkv_projections()")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of both models (ours with "
                        "fullgraph=True; inductor freezing for forward rows); compile time is reported, not timed")
    parser.add_argument("--compile-precision", default="fp32", choices=PRECISIONS, help="autocast of the compiled "
                        "variants")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory (subprocess per model; CPU)")
    parser.add_argument("--sampling-steps", nargs="+", type=int, default=None, help="time sampling chains of these "
                        "lengths (ours vs DDPMPipeline, images/s) instead of UNet calls")
    parser.add_argument("--sampling-batch", type=int, default=64, help="images per sampling call")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    precisions = args.precisions

    for layout in args.layouts:
        torch.manual_seed(0)
        theirs = UNet2DModel(**unet2d_config(layout)).to(device)
        ours = DDPMUNet2DModel.from_unet2d(theirs).to(device)
        if args.sampling_steps:
            sampling_rows(layout, theirs, ours, args, device)
            continue
        x, _, t = make_inputs(theirs.config, 2, device)
        half_errors = {}
        with torch.no_grad():  # parity of this very pair (eval: dropout off)
            ref = theirs.eval()(x, t).sample
            max_abs_diff = (ours.eval()(x, t).sample - ref).abs().max().item()
            for name in ["bf16"] + (["fp16"] if precisions and "fp16" in precisions else []):
                with torch.autocast(device.type, dtype=AUTOCAST_DTYPES[name]):
                    low = ours(x, t).sample.float()
                half_errors[f"{name}_rel_err"] = round(((low - ref).norm() / ref.norm()).item(), 5)
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
            peaks = {}
            for batch in args.batch_sizes:
                for mode in args.modes:
                    # Re-measured before every row, keeping the best: a peak taken during a load spike of this shared
                    # machine would understate the ceiling.
                    peak_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
                    if precisions and "fp16" in precisions:
                        peak_dtypes["fp16"] = torch.float16
                    for name, dtype in peak_dtypes.items():
                        peaks[name] = max(peaks.get(name, 0.0), conv_peak_gflops(dtype, device))
                    peak32 = peaks["fp32"]
                    flops = count_flops(ours, mode, batch)
                    if precisions is None:  # the CPU set of the README's tables
                        fns = {"ours": step_fn(ours, mode, batch, False),
                               "unet2d": step_fn(theirs, mode, batch, False)}
                        if not args.no_bf16:
                            fns["ours_bf16"] = step_fn(ours, mode, batch, True)
                        if args.bf16_baseline:
                            fns["unet2d_bf16"] = step_fn(theirs, mode, batch, True)
                    else:
                        fns = {}
                        for precision in precisions:
                            suffix = "" if precision == "fp32" else f"_{precision}"
                            fns[f"ours{suffix}"] = step_fn(ours, mode, batch, precision)
                            fns[f"unet2d{suffix}"] = step_fn(theirs, mode, batch, precision)
                    if args.fused_qkv:
                        fns["ours_fused"] = step_fn(models["ours_fused"], mode, batch, False)
                    if args.channels_last:
                        fns["ours_cl"] = step_fn(models["ours_cl"], mode, batch, False, channels_last=True)
                    compile_s, compile_errors = {}, {}
                    if args.compile:
                        torch._dynamo.reset()  # a fresh cache per row (new shapes), once for both models
                        for name, m in (("ours", models["ours_compile"]), ("unet2d", models["unet2d_compile"])):
                            try:
                                fns[f"{name}_compile"], compile_s[name] = compiled_step(m, mode, batch,
                                                                                        args.compile_precision)
                            except Exception as exc:  # a failed compile is a figure too; the eager rows go on
                                compile_errors[f"{name}_compile_error"] = f"{type(exc).__name__}: {exc}"[:300]
                    med = time_round_robin(fns, args.warmup, args.repeats, f"{layout} b{batch} {mode} t{threads}",
                                           device)
                    row = {"bench": "unet", "layout": layout, "mode": mode, "batch_size": batch, "threads": threads}
                    row.update({f"{k}_s": round(v, 4) for k, v in med.items()})
                    if "ours" in med and "unet2d" in med:
                        row["speed_ratio"] = round(med["unet2d"] / med["ours"], 3)
                        for k in med:
                            if k not in ("ours", "unet2d"):
                                row[f"{k}_speed_ratio"] = round(med["unet2d"] / med[k], 3)
                    for precision in precisions or ():
                        if precision != "fp32":
                            row[f"speed_ratio_{precision}"] = round(med[f"unet2d_{precision}"] /
                                                                    med[f"ours_{precision}"], 3)
                    row.update({f"{k}_gflops": round(flops / v / 1e9, 1) for k, v in med.items()})
                    row.update({f"peak_{name}_gflops": round(v, 1) for name, v in peaks.items()})
                    for name in ("ours", "unet2d"):
                        if name in med:
                            row[f"{name}_fraction_of_fp32_peak"] = round(flops / med[name] / 1e9 / peak32, 3)
                    if device.type == "cpu":  # of the fp32 pair, else the first precision's
                        first = "" if "ours" in fns else f"_{precisions[0]}"
                        frac = dense_kernel_fraction(fns[f"unet2d{first}"])
                        row.update(unet2d_dense_fraction=round(frac, 3), ceiling_speed_ratio=round(1 / frac, 3),
                                   ours_dense_fraction=round(dense_kernel_fraction(fns[f"ours{first}"]), 3))
                    if device.type == "cuda":
                        row.update({f"{k}_step_mib": round(cuda_step_mib(fn), 1) for k, fn in fns.items()})
                        row.update(cudnn_tf32=torch.backends.cudnn.allow_tf32,
                                   matmul_tf32=torch.backends.cuda.matmul.allow_tf32)
                    row.update({f"{k}_compile_time_s": v for k, v in compile_s.items()})  # <k>_compile_s: per call
                    row.update(compile_errors)
                    if args.compile:
                        row["compile_precision"] = args.compile_precision
                    if args.memory:
                        row["ours_peak_mb"] = round(peak_memory_mb(layout, "ours", mode, batch, threads), 1)
                        row["unet2d_peak_mb"] = round(peak_memory_mb(layout, "unet2d", mode, batch, threads), 1)
                    row.update(gflop_per_call=round(flops / 1e9, 2), params=sum(p.numel() for p in ours.parameters()),
                               max_abs_diff=max_abs_diff, **half_errors,
                               repeats=args.repeats, torch=torch.__version__, device=args.device,
                               machine=platform.machine(), load_avg=round(os.getloadavg()[0], 2))
                    if device.type == "cuda":
                        row["gpu"] = _gpu_name(device)
                    print(json.dumps(row), flush=True)

if __name__ == "__main__":
    main()
