#!/usr/bin/env python
"""Ablation of the default recipe at equal budget: which ingredient helps held-out bits/dim and FD.

    python benchmarks/ablation.py --quick --output_dir ablation-digits
    python benchmarks/ablation.py --cells default linear cap0.999 --max_train_steps 800 --output_dir ablation

Every cell is a recipe given as train.py flags (the comparison harness, `training/comparison/`), trained in
lockstep with the others on the same data, noise and budget through `Trainer`; each gets held-out bits/dim under
both bounds (x̂0 clipped as it samples, and unclipped), FD ± s.e. (in the extractor's features; none with
``--feature_extractor auto`` offline without a cached encoder) and SWD ×10³ ± s.e. (no weights) at
``--sample_steps``, beside SWD's real-data floor (as many training images against the same held-out images). Writes
``ablation.md``, ``ablation.png`` and ``ablation.json`` (plus the comparison's report) and prints one JSON line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "training"))

from compare import add_shared_flags, command_line, config_from_args  # noqa: E402
from comparison.recipes import RECIPES, Recipe  # noqa: E402
from comparison.report import to_jsonable  # noqa: E402
from comparison.run import run_comparison  # noqa: E402

# name -> train.py flags changed from the default recipe (cosine β clipped at 0.5, learned_range, hybrid, lr 2e-3,
# EMA 0.9999)
CELLS = {
    "default": "",
    "linear": "--ddpm_beta_schedule linear",
    "cap0.999": "--ddpm_max_beta 0.999",  # cosine as IDM clips it
    "cap0.99": "--ddpm_max_beta 0.99",
    "cap0.9": "--ddpm_max_beta 0.9",
    "fixed-simple": "--variance_type fixed_small --loss_type simple",
    "kl-lsm": "--loss_type kl --timestep_sampler loss-second-moment",
    "min-snr5": "--snr_gamma 5",
    "lr1e-3": "--learning_rate 1e-3",
    "lr5e-3": "--learning_rate 5e-3",
    "no-ema": "--no-use_ema",
}


def build_parser():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shared_flags(p)
    p.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS), help="Cells to train.")
    p.add_argument("--no_baseline", action="store_true", help="Leave out diffusers' recipe.")
    p.add_argument("--sample_steps", type=int, nargs="+", default=[100], help="Sampling steps of the FD.")
    p.add_argument("--num_samples", type=int, default=200, help="Images per FD.")
    p.add_argument("--from_json", default=None, help="Only redraw ablation.png from this ablation.json (no training).")
    return p


def plot_ablation(result: dict, path: str) -> None:
    """One horizontal bar per cell: held-out bits/dim as sampled, unclipped, FD (when there were features) and SWD at
    the first sampling step count, each ± its standard error; the diffusers baseline's level dashed, SWD's real-data
    floor dotted."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    rows = result["rows"]
    step = next(iter(rows[0]["fd"]))
    panels = [("bits/dim, as sampled (x̂0 clipped)", "bits_per_dim", "bits_per_dim_se"),
              ("bits/dim, unclipped", "bits_per_dim_unclipped", "bits_per_dim_unclipped_se")]
    if rows[0]["fd"][step][0] is not None:
        panels.append((f"FD @{step} steps (n = {rows[0]['fd'][step][2]})", "fd", None))
    if step in rows[0].get("swd", {}):
        panels.append((f"SWD×10³ @{step} steps (n = {rows[0]['swd'][step][2]})", "swd", None))
    fig = Figure(figsize=(4 * len(panels), 0.35 * len(rows) + 1.6), dpi=100)
    y = list(range(len(rows)))[::-1]
    for i, (title, key, se_key) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        values = [r[key][step][0] if se_key is None else r[key] for r in rows]
        errors = [(r[key][step][1] or 0.0) if se_key is None else r[se_key] for r in rows]
        colors = ["tab:gray" if r["cell"] == "diffusers" else "tab:blue" for r in rows]
        ax.barh(y, values, xerr=errors, color=colors, capsize=2)
        if rows[0]["cell"] == "diffusers":
            ax.axvline(values[0], color="k", linestyle="--", linewidth=0.8)
        floor = (result.get("swd_floor") or {}).get(step) if key == "swd" else None
        if floor:
            ax.axvline(floor[0], color="tab:green", linestyle=":", linewidth=1)
            title += f"\nreal images (dotted): {floor[0]:.1f} ± {floor[1]:.1f}"
        ax.set_yticks(y)
        ax.set_yticklabels([r["cell"] for r in rows] if i == 0 else [])
        ax.set_title(title, fontsize=9)
    data = result["data"]
    fig.suptitle(f"{data.get('source', data) if isinstance(data, dict) else data}: {result['steps']} steps at batch {result['batch_size']} per cell, "
                 f"bits/dim on {result['bpd_images']} held-out images", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        plot_ablation(result, os.path.join(args.output_dir, "ablation.png"))
        return result
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    start = time.perf_counter()
    recipes = ([] if args.no_baseline else [RECIPES["diffusers"]]) + [
        Recipe(name, CELLS[name], CELLS[name] or "default recipe") for name in args.cells]
    args.recipes, args.recipe = None, []
    config = config_from_args(args, sample_steps=tuple(args.sample_steps),
                              num_samples=(args.num_samples,) * len(args.sample_steps), measure_cost=False,
                              bpd_exact_images=0)
    config.recipes = tuple(recipes)
    report = run_comparison(config, os.path.join(args.output_dir, "report"), progress=not args.no_progress,
                            command=command_line("benchmarks/ablation.py", argv))
    rows = []
    for name, r in report["recipes"].items():
        bpd = r["bits_per_dim"]
        rows.append({"cell": name, "flags": r["flags"], "bits_per_dim": bpd["bits_per_dim"],
                     "bits_per_dim_se": bpd["standard_error"], "bits_per_dim_unclipped": bpd["unclipped"]["bits_per_dim"],
                     "bits_per_dim_unclipped_se": bpd["unclipped"]["standard_error"],
                     "fd": {s: (q["quality"]["fd"], q["quality"]["fd_standard_error"], q["num_images"])
                            for s, q in r["samples"].items()},
                     "kid": {s: (q["quality"]["kid_mean"], q["quality"]["kid_std"]) for s, q in r["samples"].items()},
                     "swd": {s: (q["quality"]["swd"], q["quality"]["swd_standard_error"], q["num_images"])
                             for s, q in r["samples"].items()}})
    # SWD's real-data floor per step count: N training images scored as samples (the comparison's real rows).
    real = report["real_data_reference"]
    swd_floor = {s: (real[str(n)]["swd"], real[str(n)]["swd_standard_error"], n)
                 for s, n in zip(map(str, config.sample_steps), config.num_samples)}
    result = {"rows": rows, "steps": config.max_train_steps, "batch_size": config.batch_size,
              "bpd_images": rows and report["recipes"][rows[0]["cell"]]["bits_per_dim"]["num_images"],
              "data": report["data"]["split"], "swd_floor": swd_floor,
              "swd_method": next(iter(real.values()))["swd_method"], "wall_seconds": time.perf_counter() - start,
              "command": report["command"]}
    steps = list(map(str, args.sample_steps))
    lines = ["| cell | train.py flags | held-out bits/dim as sampled (x̂0 clipped) | unclipped | "
             + " | ".join(f"FD @{s} ± s.e. (n) | KID @{s} ± s.d. | SWD×10³ @{s} ± s.e. (n)" for s in steps) + " |",
             "|---|---|---|---|" + "---|---|---|" * len(steps)]

    def pm(value, se, digits):
        return "–" if value is None else f"{value:.{digits}f} ± {(se or 0.0):.{digits}f}"

    for row in rows:
        lines.append(f"| `{row['cell']}` | `{row['flags'] or '(defaults)'}` | {row['bits_per_dim']:.3f} ± "
                     f"{row['bits_per_dim_se']:.3f} | {row['bits_per_dim_unclipped']:.3f} ± "
                     f"{row['bits_per_dim_unclipped_se']:.3f} | "
                     + " | ".join(f"{pm(*row['fd'][s][:2], 2)} ({row['fd'][s][2]}) | {pm(*row['kid'][s], 4)} | "
                                  f"{pm(*row['swd'][s][:2], 1)} ({row['swd'][s][2]})" for s in steps)
                     + " |")
    lines += ["", "SWD's real-data floor (the same N of training images against the held-out images: what samples "
              "as good as real images score): " + "; ".join(f"@{s} steps {pm(*swd_floor[s][:2], 1)} (n = "
                                                           f"{swd_floor[s][2]})" for s in steps) + ".",
              "", f"SWD method: {result['swd_method']}."]
    table = "\n".join(lines)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "ablation.md"), "w") as f:
        f.write(f"```bash\n{result['command']}\n```\n\n{config.max_train_steps} steps at batch {config.batch_size} "
                f"per cell; wall time {result['wall_seconds']:.0f} s.\n\n{table}\n")
    plot_ablation(result, os.path.join(args.output_dir, "ablation.png"))
    line = json.dumps(to_jsonable(result))
    with open(os.path.join(args.output_dir, "ablation.json"), "w") as f:
        f.write(line + "\n")
    print(line)
    print(table)
    return result


if __name__ == "__main__":
    main()
