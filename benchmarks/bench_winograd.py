"""Can a Winograd convolution beat oneDNN's direct 3x3 kernel on this machine? One JSON line per conv shape.

The UNet's time is 75-92 % 3x3 convolutions already running near the fp32 peak (see bench_unet.py), so fewer
multiplications are the only fp32 lever left. Winograd F(2x2, 3x3) (Lavin & Gray 2016, "Fast Algorithms for
Convolutional Neural Networks") computes each 2x2 output tile from a 4x4 input tile with 16 instead of 36
multiplications: transform input tiles (B^T d B) and weights (G g G^T), 16 batched GEMMs over channels, then
transform back (A^T m A). Here it is written with torch ops (transforms as strided adds, GEMMs as one `bmm`) and
timed against `F.conv2d` on the UNet's conv shapes:

    python benchmarks/bench_winograd.py --threads 1

Each row: `direct_s`, `winograd_s`, `speed_ratio` = direct / winograd (> 1: Winograd faster), the time share of
the GEMMs, their GFLOP/s, and the max abs error of both against a float64 reference.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

# F(2x2, 3x3) with interpolation points 0, 1, -1 (Lavin & Gray 2016, section 4.1).
G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
SHAPES = [  # (batch, C_in, H=W, C_out): ddpm-cifar10, small32 and digits-small levels
    (16, 128, 32, 128), (64, 128, 32, 128), (16, 256, 16, 256), (64, 256, 16, 256), (64, 256, 8, 256),
    (64, 64, 32, 64), (16, 32, 16, 32), (64, 48, 8, 48),
]


def winograd_weight(w: torch.Tensor) -> torch.Tensor:
    """(K, C, 3, 3) -> (16, C, K): G g G^T per (k, c), in float64 then rounded once."""
    u = torch.einsum("ai,kcij,bj->abck", G, w.double(), G)
    return u.reshape(16, w.shape[1], w.shape[0]).to(w.dtype).contiguous()


def _input_transform(r0, r1, r2, r3, out):
    """B^T d along one axis: (d0 - d2, d1 + d2, d2 - d1, d1 - d3) written into out[0..3]."""
    torch.sub(r0, r2, out=out[0])
    torch.add(r1, r2, out=out[1])
    torch.sub(r2, r1, out=out[2])
    torch.sub(r1, r3, out=out[3])


def winograd_conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor, timings: dict) -> torch.Tensor:
    """3x3 conv, padding 1. x: (N, C, H, W); u: winograd_weight(w) (16, C, K) -> (N, K, H, W)."""
    n, c, h, w = x.shape
    k = u.shape[2]
    th, tw = (h + 1) // 2, (w + 1) // 2
    xp = x.new_zeros(n, 2 * th + 2, 2 * tw + 2, c)  # channels last, zero padded
    xp[:, 1:h + 1, 1:w + 1] = x.permute(0, 2, 3, 1)
    rows = x.new_empty(4, n, th, 2 * tw + 2, c)
    _input_transform(*(xp[:, i:i + 2 * th:2] for i in range(4)), rows)
    v = x.new_empty(4, 4, n, th, tw, c)
    for a in range(4):
        _input_transform(*(rows[a][:, :, i:i + 2 * tw:2] for i in range(4)), v[a])
    start = time.perf_counter()
    m = torch.bmm(v.view(16, n * th * tw, c), u).view(4, 4, n, th, tw, k)  # (16, tiles, K)
    timings["gemm"] = time.perf_counter() - start
    # A^T m A with A^T = [[1, 1, 1, 0], [0, 1, -1, -1]], rows then columns
    half = torch.stack([m[0] + m[1] + m[2], m[1] - m[2] - m[3]])  # (2, 4, N, th, tw, K)
    y = x.new_empty(n, th, 2, tw, 2, k)
    for i in range(2):
        y[:, :, i, :, 0] = half[i, 0] + half[i, 1] + half[i, 2]
        y[:, :, i, :, 1] = half[i, 1] - half[i, 2] - half[i, 3]
    y = y.view(n, 2 * th, 2 * tw, k)[:, :h, :w] + bias
    return y.permute(0, 3, 1, 2)


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for n, c, hw, k in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, c, hw, hw, generator=g)
        w = torch.randn(k, c, 3, 3, generator=g) / (3 * c**0.5)
        b = torch.randn(k, generator=g)
        u = winograd_weight(w)
        timings = {}
        direct_s = median_time(lambda: F.conv2d(x, w, b, padding=1), args.repeats)
        wino_s = median_time(lambda: winograd_conv3x3(x, u, b, timings), args.repeats)
        ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
        gemm_flops = 2 * 16 * n * ((hw + 1) // 2) ** 2 * c * k
        print(json.dumps({
            "bench": "winograd", "shape": [n, c, hw, hw], "out_channels": k, "threads": args.threads,
            "direct_s": round(direct_s, 5), "winograd_s": round(wino_s, 5),
            "speed_ratio": round(direct_s / wino_s, 3),
            "direct_gflops": round(2 * 9 * n * hw * hw * c * k / direct_s / 1e9, 1),
            "gemm_share": round(timings["gemm"] / wino_s, 3),
            "gemm_gflops": round(gemm_flops / timings["gemm"] / 1e9, 1),
            "direct_max_err": float((F.conv2d(x, w, b, padding=1).double() - ref).abs().max()),
            "winograd_max_err": float((winograd_conv3x3(x, u, b, {}).double() - ref).abs().max()),
        }), flush=True)


if __name__ == "__main__":
    main()
