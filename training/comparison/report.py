"""The comparison's report: derived ratios, the verdict (sentences computed from the numbers), plots,
``report.md`` and ``report.json``, and the compact table the README quotes."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from diffusers_ddpm_ext.viz import make_image_grid

MIB = 2**20


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def comparisons(report: dict) -> dict:
    """Ratios of every recipe to the baseline, and how close ours-same's loss curve is to diffusers'."""
    base, recipes = report["baseline"], report["recipes"]
    b = recipes[base]
    out = {"ratios_vs_baseline": {}}
    for name, r in recipes.items():
        out["ratios_vs_baseline"][name] = {
            "parameters": _ratio(r["parameters"], b["parameters"]),
            "flops_per_image": _ratio(r.get("flops_per_image"), b.get("flops_per_image")),
            "train_img_per_s": _ratio(r["training"]["train_img_per_s"], b["training"]["train_img_per_s"]),
            "peak_train_memory": _ratio(_get(r, "train_memory", "peak_bytes"), _get(b, "train_memory", "peak_bytes")),
            "peak_sample_memory": _ratio(_get(r, "sample_memory", "peak_bytes"),
                                         _get(b, "sample_memory", "peak_bytes")),
            "sample_img_per_s": _ratio(_get(r, "sampling_speed", "image_steps_per_s"),
                                       _get(b, "sampling_speed", "image_steps_per_s")),
        }
    if "diffusers" in recipes and "ours-same" in recipes:
        l1 = np.asarray(recipes["diffusers"]["loss_curve"]["loss"])
        l2 = np.asarray(recipes["ours-same"]["loss_curve"]["loss"])
        n = min(len(l1), len(l2))
        rel = np.abs(l2[:n] - l1[:n]) / np.maximum(np.abs(l1[:n]), 1e-12)
        out["ours_same_vs_diffusers_loss"] = {
            "steps_compared": int(n), "max_rel_diff": float(rel.max()) if n else None,
            "mean_rel_diff": float(rel.mean()) if n else None,
            "max_rel_diff_first_10_steps": float(rel[:10].max()) if n else None,
            "near_identical": bool(n and rel.mean() < 0.02)}
    return out


def _speed_word(ratio: Optional[float], tol: float = 0.05) -> str:
    if ratio is None:
        return "not measured"
    if ratio > 1 + tol:
        return f"{ratio:.2f}x (faster)"
    if ratio < 1 - tol:
        return f"{ratio:.2f}x (slower)"
    return f"{ratio:.2f}x (tie within ±{tol:.0%})"


def _compare_word(diff: float, se: float) -> str:
    return "tie" if abs(diff) <= 2 * se else ("better (lower)" if diff < 0 else "worse (higher)")


def verdict(report: dict) -> List[str]:
    """Plain sentences from the numbers (ties: ±5 % for speed, 2 standard errors for bits/dim and FD)."""
    recipes, base = report["recipes"], report["baseline"]
    ratios = report["comparisons"]["ratios_vs_baseline"]
    lines = []
    b_bpd = recipes[base]["bits_per_dim"]
    for name in recipes:
        if name == base:
            continue
        r = ratios[name]
        if r["sample_img_per_s"] is not None:
            lines.append(
                f"{name} vs {base}: training throughput {_speed_word(r['train_img_per_s'])}; sampling throughput "
                f"{_speed_word(r['sample_img_per_s'])}"
                + (f"; peak training memory {r['peak_train_memory']:.2f}x" if r["peak_train_memory"] else "")
                + (f", peak sampling memory {r['peak_sample_memory']:.2f}x" if r["peak_sample_memory"] else "") + ".")
        bpd = recipes[name]["bits_per_dim"]
        for label, a, b in (("as sampled (x̂0 clipped as its scheduler clips)", bpd, b_bpd),
                            ("unclipped", bpd["unclipped"], b_bpd["unclipped"])):
            diff = a["bits_per_dim"] - b["bits_per_dim"]
            se = math.hypot(a["standard_error"], b["standard_error"])
            lines.append(f"{name} held-out bits/dim {label} {a['bits_per_dim']:.3f} vs {b['bits_per_dim']:.3f}: "
                         f"{_compare_word(diff, se)} (difference {diff:+.3f} ± {se:.3f}, Monte-Carlo error).")
        for key, label in (("fd", "Fréchet distance"), ("swd", "SWD×10³")):
            parts = []
            for s, q in recipes[name]["samples"].items():
                qa, qb = q["quality"], recipes[base]["samples"][s]["quality"]
                if qa.get(key) is None or qb.get(key) is None:
                    continue
                se = math.hypot(qa.get(f"{key}_standard_error") or 0.0, qb.get(f"{key}_standard_error") or 0.0)
                floor = _get(report, "real_data_reference", str(q["num_images"]), key)
                parts.append(f"{qa[key]:.2f} vs {qb[key]:.2f} at {s} steps (n={q['num_images']}"
                             + (f", {_compare_word(qa[key] - qb[key], se)}" if se else "")
                             + (f"; real images {floor:.2f}" if floor is not None else "") + ")")
            if parts:
                lines.append(f"{name} {label} (lower is better): " + "; ".join(parts) + ".")
    cmp_loss = report["comparisons"].get("ours_same_vs_diffusers_loss")
    if cmp_loss:
        lines.append(
            "ours-same and diffusers loss curves are "
            + ("near-identical" if cmp_loss["near_identical"] else "NOT near-identical")
            + f" (mean relative difference {cmp_loss['mean_rel_diff']:.2e}, max {cmp_loss['max_rel_diff']:.2e} over "
            f"{cmp_loss['steps_compared']} steps; first 10 steps max {cmp_loss['max_rel_diff_first_10_steps']:.1e}).")
    return lines


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(v) < window:
        return v
    return np.convolve(v, np.ones(window) / window, mode="valid")


def plot_losses(report: dict, path: str) -> None:
    """ε-MSE curves of every recipe (moving average), and ours-same vs diffusers' relative loss difference."""
    recipes = report["recipes"]
    fig = _figure(11, 4)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, r in recipes.items():
        mse = r["loss_curve"]["mse"]
        window = max(1, len(mse) // 30)
        steps = np.arange(1, len(mse) + 1)[window - 1:]
        ax1.plot(steps, _smooth(mse, window), label=name, lw=2.5 if name == "diffusers" else 1.5,
                 ls="--" if name == "ours-same" else "-")
    ax1.set_yscale("log")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("ε-MSE (moving average)")
    ax1.set_title("training ε-MSE (moving average)\nβ schedules weight the timesteps differently", fontsize=10)
    ax1.legend(fontsize=8)
    if "diffusers" in recipes and "ours-same" in recipes:
        l1 = np.asarray(recipes["diffusers"]["loss_curve"]["loss"])
        l2 = np.asarray(recipes["ours-same"]["loss_curve"]["loss"])
        n = min(len(l1), len(l2))
        rel = np.abs(l2[:n] - l1[:n]) / np.maximum(np.abs(l1[:n]), 1e-12)
        steps = np.arange(1, n + 1)
        nonzero = rel > 0
        ax2.semilogy(steps[nonzero], rel[nonzero], ".", ms=3)
        ax2.set_title(f"ours-same vs diffusers: relative loss difference\n({int((~nonzero).sum())} of {n} steps "
                      "exactly equal, not shown)", fontsize=10)
        ax2.set_xlabel("optimizer step")
        ax2.set_ylabel("relative difference")
    else:
        ax2.axis("off")
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_quality(report: dict, path: str) -> None:
    """Cost ratios to the baseline (when measured), FD ± s.e. (with features) and SWD ± s.e. against sampling steps,
    the real images' figures at each N dotted."""
    base = report["baseline"]
    ratios = report["comparisons"]["ratios_vs_baseline"]
    names = [n for n in report["recipes"] if n != base]
    keys = [k for k in ratios[base] if ratios[base][k] is not None]
    metrics = [("swd", "SWD×10³ (no weights)")]
    if _extractor(report) is not None:
        metrics.insert(0, ("fd", f"Fréchet distance ({_extractor(report)} features)"))
    fig = _figure(5.5 * (1 + len(metrics)), 4.2)
    ax = fig.add_subplot(1, 1 + len(metrics), 1)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ax.bar(np.arange(len(keys)) + i * width, [ratios[name].get(k) or 0.0 for k in keys], width, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(keys)) + width * (len(names) - 1) / 2)
    ax.set_xticklabels([k.replace("_", " ") for k in keys], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(f"ratio to {base}")
    ax.set_title(f"relative to {base} (throughput: higher is better; memory: lower)", fontsize=10)
    if names:
        ax.legend(fontsize=8, loc="lower right")
    for i, (key, label) in enumerate(metrics):
        ax2 = fig.add_subplot(1, 1 + len(metrics), 2 + i)
        for name, r in report["recipes"].items():
            steps = sorted(int(s) for s in r["samples"])
            q = [r["samples"][str(s)]["quality"] for s in steps]
            ax2.errorbar(steps, [x[key] for x in q], yerr=[x.get(f"{key}_standard_error") or 0.0 for x in q],
                         label=name, marker="x" if name == "ours-same" else "o",
                         ls="--" if name == "ours-same" else "-", capsize=3)
        for n, row in report["real_data_reference"].items():
            if row.get(key) is not None:
                ax2.axhline(row[key], color="gray", ls=":", lw=1)
                ax2.annotate(f"real images, n={n}", (0.01, row[key]), xycoords=("axes fraction", "data"), fontsize=7,
                             color="gray", va="bottom")
        ax2.set_xscale("log")
        ax2.set_xlabel("sampling steps")
        ax2.set_ylabel(label)
        ax2.set_title("sample quality vs sampling steps (n per point in report.md)", fontsize=10)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _extractor(report: dict) -> Optional[str]:
    """The features' name, None when there were none (SWD only)."""
    r = next(iter(report["recipes"].values()))
    return next(iter(r["samples"].values()))["quality"].get("extractor")


# ----------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------


def _mib(b):
    return "–" if b is None else f"{b / MIB:.1f}"


def _pm(value, se, digits=3):
    return "–" if value is None else (f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else ""))


def readme_table(report: dict) -> str:
    """The compact markdown table the README quotes (one row per recipe)."""
    base = report["recipes"][report["baseline"]]
    steps = list(base["samples"])
    cost = "flops_per_image" in base
    head = ["recipe", "params"] + (["fwd GFLOPs/img", "train img/s", "peak train MiB", "sample img/s (50 steps)"]
                                   if cost else []) + [
        "held-out bits/dim, as sampled (x̂0 clipped)", "held-out bits/dim, unclipped"] + [
        f"FD @{s} ± s.e. (n)" for s in steps] + [f"SWD×10³ @{s} ± s.e. (n; real images)" for s in steps]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in report["recipes"].items():
        bpd = r["bits_per_dim"]
        cells = [f"`{name}`", f"{r['parameters']:,}"]
        if cost:
            s50 = r["samples"].get("50")
            cells += [f"{r['flops_per_image'] / 1e9:.3f}", f"{r['training']['train_img_per_s']:.0f}",
                      _mib(r["train_memory"]["peak_bytes"]), f"{s50['img_per_s']:.1f}" if s50 else "–"]
        cells += [_pm(bpd["bits_per_dim"], bpd["standard_error"]),
                  _pm(bpd["unclipped"]["bits_per_dim"], bpd["unclipped"]["standard_error"])]
        cells += [f"{_pm(q['quality']['fd'], q['quality'].get('fd_standard_error'), 2)} ({q['num_images']})"
                  for q in r["samples"].values()]
        cells += [f"{_pm(q['quality'].get('swd'), q['quality'].get('swd_standard_error'), 1)} ({q['num_images']}; "
                  f"{_pm(_get(report, 'real_data_reference', str(q['num_images']), 'swd'), None, 1)})"
                  for q in r["samples"].values()]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _data_sentence(report: dict) -> str:
    cfg, data = report["config"], report["data"]
    split = data["split"]
    source = split.get("source", "?")
    return (f"Data: {source}, {data['train_images']} training images and {data['heldout_images']} held-out images "
            f"(split `{split.get('split')}`: {split.get('method')}), {data['channels']}×{data['resolution']}×"
            f"{data['resolution']}, {data['num_levels']} levels per channel; architecture "
            + (f"`{cfg['unet_config']}`" if cfg.get("unet_config") else f"`{cfg['preset']}`")
            + (f" with overrides {json.dumps(cfg['unet_overrides'])}" if cfg["unet_overrides"] else "") + ".")


def markdown(report: dict, files: Dict[str, Any]) -> str:
    cfg, env, recipes, base = report["config"], report["environment"], report["recipes"], report["baseline"]
    names = list(recipes)
    lines = ["# diffusers UNet2DModel vs diffusers-ddpm-ext: side-by-side comparison", ""]
    if report.get("command"):
        lines += ["Produced by:", "", "```bash", report["command"], "```", ""]
    train_steps = {n: recipes[n]["training"]["steps"] for n in names}
    lines += [
        _data_sentence(report), "",
        "Every recipe: the same initial weights (where shapes allow), the same batches in the same order, the same "
        "noise and timestep draws, trained through `diffusers_ddpm_ext.trainer.Trainer`, AdamW with the recipe's "
        f"learning rate, {cfg['lr_warmup_steps']} warm-up steps, batch {cfg['batch_size']}, "
        + (f"wall-clock budget {cfg['budget_seconds']} s per recipe → steps {train_steps}" if cfg["budget_seconds"]
           else f"{cfg['max_train_steps']} optimizer steps ({cfg['max_train_steps'] * cfg['batch_size']:,} images) "
                f"each") + f", T = {cfg['num_train_timesteps']}, seed {cfg['seed']}; samples and bits/dim use the "
        "EMA weights.", "",
        f"Machine: {env['cpu_count']} CPU cores, torch {env['torch']} with {env['torch_threads']} threads, diffusers "
        f"{env['diffusers']}, Python {env['python']}; load average at start {env['load_average_start']}, at end "
        f"{env['load_average_end']}. Total wall time {report.get('wall_seconds', 0):.0f} s.", "",
        "## Recipes", ""]
    for n in names:
        r = recipes[n]
        lines.append(f"- **{n}**: {r['label']} — `{r['model_class']}` + `{r['scheduler_class']}`, β "
                     f"`{r['beta_schedule']}`, variance `{r['variance_type']}`, loss `{r['loss']}`, timesteps "
                     f"`{r['timestep_sampler']}`, lr {r['learning_rate']:g}, EMA max decay {r['ema_max_decay']}"
                     + (f"; train.py flags `{r['flags']}`" if r["flags"] else "") + ".")
    lines += ["", "## Summary", "", readme_table(report), "", "## All figures", "",
              "| | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---|" * len(names)]

    def row(label, values):
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    cost = "flops_per_image" in recipes[base]
    ratios = report["comparisons"]["ratios_vs_baseline"]
    row("parameters", [f"{recipes[n]['parameters']:,}" for n in names])
    row("training steps (images)", [f"{recipes[n]['training']['steps']} ({recipes[n]['training']['images_seen']:,})"
                                    for n in names])
    row("training throughput, img/s (median step)",
        [f"{recipes[n]['training']['train_img_per_s']:.1f} ({ratios[n]['train_img_per_s']:.2f}×)" for n in names])
    if cost:
        row("forward FLOPs / image", [f"{recipes[n]['flops_per_image'] / 1e6:.2f} M" for n in names])
        row(f"peak training memory, MiB (batch {cfg['batch_size']})",
            [f"{_mib(recipes[n]['train_memory']['peak_bytes'])} (step adds "
             f"{_mib(recipes[n]['train_memory']['step_extra_bytes'])})" for n in names])
        row(f"peak sampling memory, MiB (batch {cfg['sample_batch_size']})",
            [_mib(recipes[n]["sample_memory"]["peak_bytes"]) for n in names])
        for s in recipes[base]["samples"]:
            row(f"sampling throughput @{s} steps, img/s",
                [f"{recipes[n]['samples'][s]['img_per_s']:.2f} ({ratios[n]['sample_img_per_s']:.2f}×)"
                 for n in names])
    row(f"final ε-MSE (mean of last {recipes[base]['training']['final_window']} steps)",
        [f"{recipes[n]['training']['final_mse']:.4f}" for n in names])
    row("final training loss (objective)", [f"{recipes[n]['training']['final_loss']:.4f}" for n in names])
    bpd0 = recipes[base]["bits_per_dim"]
    what = f"{bpd0['num_images']} images × {bpd0['network_calls_per_image']} calls, ± MC s.e."
    row(f"held-out bits/dim as sampled: x̂0 clipped iff the scheduler clips ({what})",
        [_pm(recipes[n]["bits_per_dim"]["bits_per_dim"], recipes[n]["bits_per_dim"]["standard_error"])
         + ("" if recipes[n]["bits_per_dim"]["clip_denoised"] else " (no clipping)") for n in names])
    row(f"held-out bits/dim, x̂0 unclipped ({what})",
        [_pm(recipes[n]["bits_per_dim"]["unclipped"]["bits_per_dim"],
             recipes[n]["bits_per_dim"]["unclipped"]["standard_error"]) for n in names])
    if bpd0.get("exact"):
        row(f"held-out bits/dim as sampled, exact ({bpd0['exact']['num_images']} images) ± s.e.",
            [_pm(recipes[n]["bits_per_dim"]["exact"]["bits_per_dim"],
                 recipes[n]["bits_per_dim"]["exact"]["standard_error"]) for n in names])
    for s in recipes[base]["samples"]:
        q = {n: recipes[n]["samples"][s]["quality"] for n in names}
        ns = recipes[base]["samples"][s]["num_images"]
        floor = report["real_data_reference"].get(str(ns), {})
        if q[names[0]].get("fd") is not None:
            row(f"FD @{s} steps ± bootstrap s.e. (n={ns})",
                [_pm(q[n]["fd"], q[n].get("fd_standard_error")) for n in names])
            row(f"KID @{s} steps (n={ns})", [f"{q[n]['kid_mean']:.4f} ± {q[n]['kid_std']:.4f}" for n in names])
            row(f"precision / recall @{s} steps (n={ns})",
                [f"{q[n]['precision']:.3f} / {q[n]['recall']:.3f}" for n in names])
            if q[names[0]].get("mode_coverage") is not None:
                row(f"mode coverage @{s} steps (n={ns})", [f"{q[n]['mode_coverage']:.2f}" for n in names])
        if q[names[0]].get("swd") is not None:
            row(f"SWD×10³ @{s} steps ± bootstrap s.e. (n={ns}; real images "
                f"{_pm(floor.get('swd'), floor.get('swd_standard_error'), 1)})",
                [_pm(q[n]["swd"], q[n].get("swd_standard_error"), 1) for n in names])
            for r in q[names[0]]["swd_resolutions"]:
                row(f"SWD×10³ {r} px level @{s} steps (n={ns}; real images "
                    f"{_pm(floor.get(f'swd_{r}'), floor.get(f'swd_{r}_standard_error'), 1)})",
                    [_pm(q[n][f"swd_{r}"], q[n].get(f"swd_{r}_standard_error"), 1) for n in names])
    lines += ["", "ε-MSE values of recipes with different β schedules are not comparable; bits/dim and the sample "
              "metrics are.", "", "Real training images scored the same way against the held-out images (the best "
              "a model can do with this many samples: the real-data floor of each figure at that n):", "",
              "| n | FD ± s.e. | KID | precision / recall | SWD×10³ ± s.e. | SWD×10³ per level |",
              "|---|---|---|---|---|---|"]
    for n, q in report["real_data_reference"].items():
        kid = "–" if q.get("kid_mean") is None else f"{q['kid_mean']:.4f} ± {q['kid_std']:.4f}"
        pr = "–" if q.get("precision") is None else f"{q['precision']:.3f} / {q['recall']:.3f}"
        levels = ", ".join(f"{r} px {_pm(q.get(f'swd_{r}'), q.get(f'swd_{r}_standard_error'), 1)}"
                           for r in q.get("swd_resolutions") or [])
        lines.append(f"| {n} | {_pm(q['fd'], q.get('fd_standard_error'))} | {kid} | {pr} | "
                     f"{_pm(q.get('swd'), q.get('swd_standard_error'), 1)} | {levels or '–'} |")
    lines += ["", "## Verdict (computed from the numbers above)", ""] + [f"- {v}" for v in report["verdict"]]
    lines += ["", "## Plots", "", f"![loss curves]({files['loss_curves']})", "",
              f"![quality and cost]({files['ratios']})", "", "## Samples (EMA weights, same seeds for every recipe)",
              "", "| steps | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---|" * len(names)]
    for s in recipes[base]["samples"]:
        lines.append(f"| {s} | " + " | ".join(f"![{n} {s}]({files['grids'].get(n, {}).get(s, '')})" for n in names)
                     + " |")
    q0 = recipes[base]["samples"][next(iter(recipes[base]["samples"]))]["quality"]
    lines += [
        "", "## How it is measured", "",
        "- **Training**: every recipe is a `diffusers_ddpm_ext.trainer.Trainer` (diffusers' recipe with its plain "
        "ε-MSE as `loss_fn` and a `DDPMScheduler`); one step of each in turn on the same batch, the order rotating "
        "every step so background load hits all alike. Throughput is batch / median step time.",
        "- **Bits/dim**: `estimate_bits_per_dim`, the stratified unbiased estimate of the full-chain bound on the "
        "held-out split, ± its Monte-Carlo standard error. *As sampled* is the bound of the reverse process the "
        "model samples with (x̂0 clipped as its scheduler's `clip_sample` says — what `train.py`'s metrics.json and "
        "`python -m diffusers_ddpm_ext.evaluate` report); *unclipped* uses the raw x̂0, with the same draws. The "
        "diffusers recipe is evaluated through `GaussianDiffusionScheduler.from_config(DDPMScheduler.config)`.",
        (f"- **Sample quality**: `DDPMPipeline` samples, extractor `{q0['extractor']}`"
         + (f" (held-out accuracy {q0['extractor_heldout_accuracy']:.3f})" if q0.get("extractor_heldout_accuracy")
            else "") + f"; FD (± bootstrap standard error), KID, precision/recall against the {q0['n_reference']} "
         "held-out images. FD is biased upward at small n: compare recipes at the same n."
         if q0.get("fd") is not None else
         "- **Sample quality**: `DDPMPipeline` samples; FD, KID and precision/recall not computed (no feature "
         "extractor could be loaded: `--feature_extractor auto` offline without a cached encoder)."),
        f"- **SWD** (weight-free, against the {q0['n_reference']} held-out images, ± bootstrap standard error): "
        f"{q0.get('swd_method')}. Biased upward at small n like FD: read it against the real images' figure at the "
        "same n (the real-data floor), not 0.",
    ]
    if cost:
        lines += [
            "- **FLOPs**: `torch.utils.flop_counter.FlopCounterMode` on one image (2 per multiply-add of convolutions, "
            "matmuls and attention).",
            "- **Peak memory**: tensor bytes from `torch.profiler` allocation events: live bytes before the step plus "
            "the step's peak on top (not RSS).",
            f"- **Sampling throughput**: `DDPMPipeline` at batch {cfg['sample_batch_size']}: batch / (steps × median "
            f"seconds per denoising step) over {cfg['speed_rounds']} interleaved rounds."]
    lines += ["- Same seed and thread count reproduce every number except timings.", ""]
    return "\n".join(lines)


def to_jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def save_grid(images: torch.Tensor, path: str, nrow: int = 8) -> None:
    """(N, C, H, W) in [-1, 1] as a PNG grid (`viz.make_image_grid`, tiles at least 64 px)."""
    x = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, C) in [0, 1]
    make_image_grid(x, nrow=min(nrow, len(x)), min_tile=64).save(path)


def write_report(report: dict, output_dir: str, images: Optional[Dict[str, Dict[int, torch.Tensor]]] = None) -> dict:
    """Write ``report.md``, ``report.json``, ``loss_curves.png``, ``ratios.png`` and one sample grid per recipe ×
    step count (``samples_<recipe>_<steps>steps.png``) into ``output_dir``. Returns the file map."""
    os.makedirs(output_dir, exist_ok=True)
    files = {"loss_curves": "loss_curves.png", "ratios": "ratios.png", "grids": {}}
    plot_losses(report, os.path.join(output_dir, files["loss_curves"]))
    plot_quality(report, os.path.join(output_dir, files["ratios"]))
    for name, by_steps in (images or {}).items():
        files["grids"][name] = {}
        for steps, imgs in by_steps.items():
            fname = f"samples_{name}_{steps}steps.png"
            save_grid(imgs, os.path.join(output_dir, fname))
            files["grids"][name][str(steps)] = fname
    report["files"] = files
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write(markdown(report, files))
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(to_jsonable(report), f, indent=1)
    return files
