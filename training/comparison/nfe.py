"""Sample quality per network call: FD/KID of every sampler at several NFE, for every trained recipe.

Samplers, each built from the recipe's scheduler config with ``from_config`` and run through
`GaussianDiffusionPipeline` (which strips a learned-variance channel for schedulers that do not read it):

* ``ddpm``: diffusers' `DDPMScheduler` (ancestral; 1000 steps is `DDPMPipeline`'s default: the baseline);
* ``ddim``: `DDIMScheduler` (η = 0);
* ``dpmsolver++``: `DPMSolverMultistepScheduler` with ``algorithm_type="dpmsolver++"``;
* ``unipc``: `UniPCMultistepScheduler`;

  both with ``timestep_spacing="trailing"`` (their recommended spacing for few steps; the ``"leading"`` spacing a
  DDPM config carries makes them run every step at t = 0 when NFE = T, a diffusers quirk), and with
  ``thresholding`` at ``clip_sample_range`` when the model's scheduler clips x̂0 (as its ancestral sampler does);
* ``ours``: our `GaussianDiffusionScheduler`, the respaced ancestral sampler (IDM) with the model's learned
  variances where it has them.

Every sampler makes one network call per step, so NFE = steps. The same N and the same initial noise at every
point; against the held-out split: SWD ×10³ (weight-free, per pyramid level and averaged, ± bootstrap standard
error) beside its real-data floor (N training images scored the same way, once), and FD ± bootstrap standard error
and KID in the extractor's features (none with ``--feature_extractor auto`` offline without a cached encoder: then
the reach of the baseline is read in SWD).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Dict, Optional, Sequence

import numpy as np

SAMPLERS = ("ddpm", "ddim", "dpmsolver++", "unipc", "ours")
NFE_DEFAULT = (5, 10, 20, 50, 100, 250, 1000)


def make_sampler(name: str, scheduler):
    """The ``name`` sampler (:data:`SAMPLERS`) from a trained recipe's scheduler config."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    from diffusers_ddpm_ext.scheduler import GaussianDiffusionScheduler

    config = scheduler.config
    if name == "ddpm":
        return DDPMScheduler.from_config(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    # The solvers do not read clip_sample; where the model's own sampler clips x̂0 to ±1 they get diffusers'
    # thresholding at 1.0 instead (the same clip, as diffusers recommends for pixel-space models). Without it, a
    # cosine model's first trailing step from t = T − 1 (ᾱ ≈ 3e-6) divides ε̂'s error by √ᾱ and the multistep
    # history carries that x̂0: FD 9–10 at 5–20 NFE on the digits, against 0.6–1.0 with the clip.
    clip = dict(thresholding=True, sample_max_value=float(config.get("clip_sample_range", 1.0))) \
        if config.get("clip_sample", False) else {}
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++",
                                                       timestep_spacing="trailing", **clip)
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(config, timestep_spacing="trailing", **clip)
    if name == "ours":
        return GaussianDiffusionScheduler.from_config(config)
    raise ValueError(f"sampler {name!r} is unknown; choose from {SAMPLERS}")


def quality_per_nfe(models: Dict[str, tuple], reference, extractor, *, nfe: Sequence[int] = NFE_DEFAULT,
                    samplers: Sequence[str] = SAMPLERS, num_images: int = 500, batch_size: int = 250, seed: int = 0,
                    fd_bootstrap: int = 20, max_nfe_others: Optional[int] = None, progress: bool = False,
                    train_images=None, swd_bootstrap: Optional[int] = None) -> dict:
    """Measure every (recipe, sampler, NFE) point; the first recipe's ``ddpm`` at the largest NFE is the baseline
    (a run without ``ddpm`` has no baseline and no reach: a part for :func:`merge_results`).

    Args:
        models: ``{recipe: (unet, scheduler)}`` trained models (EMA weights), the baseline recipe first.
        reference: ``(M, C, H, W)`` held-out images in ``[-1, 1]``.
        extractor: feature extractor (`evaluate.load_feature_extractor`); None or `evaluate.FeaturesUnavailable`:
            SWD only (``fd`` and ``kid_*`` None, the reach read in SWD).
        nfe, samplers: the grid.
        num_images: N generated images at every point.
        batch_size, seed: sampling batches and their seed (the same initial noise at every point).
        fd_bootstrap: resamples of the FD standard error.
        max_nfe_others: points above this NFE are measured only with ``ddpm`` (every recipe's ancestral sampler at
            high NFE, the baseline among them), to save time (None: all points). The deterministic samplers
            converge to the same probability-flow ODE there, which costs as many calls per point.
        train_images: ``(M, C, H, W)`` training images (never the reference's): N of them give
            ``swd_real_data_floor`` (None: no floor).
        swd_bootstrap: bootstrap resamples of the SWD standard errors (None: ``metrics.SWD_SETTINGS``).

    Returns:
        dict with ``points`` (one per measured point: recipe, sampler, nfe, fd, fd_standard_error, kid_mean,
        kid_std, swd, swd_standard_error, swd_<px> and swd_<px>_standard_error per level, wall_seconds,
        n_generated, n_reference), ``swd_real_data_floor``, ``swd_method``, ``swd_resolutions``, ``baseline``
        (recipe, sampler, nfe, fd, its s.e., swd, its s.e.) and ``reach`` (per recipe: the fewest NFE, its sampler
        and wall time with FD ≤ baseline FD + its s.e.; in SWD without features, ``reach_metric`` says which).
    """
    from diffusers_ddpm_ext.evaluate import generate_images, has_features, training_subset
    from diffusers_ddpm_ext.metrics import (extract_features, sample_quality, sliced_wasserstein_figures,
                                            swd_real_data_floor)
    from diffusers_ddpm_ext.pipelines import GaussianDiffusionPipeline

    for s in samplers:
        if s not in SAMPLERS:
            raise ValueError(f"sampler {s!r} is unknown; choose from {SAMPLERS}")
    if not isinstance(num_images, int) or num_images < 4:
        raise ValueError(f"num_images must be an int >= 4, got {num_images!r}")
    names = list(models)
    features = has_features(extractor)
    reference_features = extract_features(extractor, reference) if features else None
    floor = None if train_images is None else swd_real_data_floor(
        training_subset(train_images, num_images), reference, num_bootstrap=swd_bootstrap)
    points, swd_info = [], {}
    for recipe in names:
        unet, scheduler = models[recipe]
        for sampler in samplers:
            for k in sorted(nfe):
                if max_nfe_others is not None and k > max_nfe_others and sampler != "ddpm":
                    continue
                pipe = GaussianDiffusionPipeline(unet=unet.eval(), scheduler=make_sampler(sampler, scheduler))
                pipe.set_progress_bar_config(disable=True)
                t0 = time.perf_counter()
                images = generate_images(pipe, num_images, k, batch_size, seed, progress=progress)
                seconds = time.perf_counter() - t0
                swd = sliced_wasserstein_figures(images, reference, seed=seed, num_bootstrap=swd_bootstrap)
                q = sample_quality(images, reference, extractor, reference_features=reference_features,
                                   fd_bootstrap=fd_bootstrap, seed=seed) if features else {}
                swd_info = {k: swd[k] for k in ("swd_method", "swd_resolutions", "swd_num_bootstrap")}
                points.append({"recipe": recipe, "sampler": sampler, "nfe": int(k), "fd": q.get("fd"),
                               "fd_standard_error": q.get("fd_standard_error"), "kid_mean": q.get("kid_mean"),
                               "kid_std": q.get("kid_std"), "wall_seconds": seconds,
                               "n_generated": swd["n_generated"], "n_reference": swd["n_reference"],
                               **{key: v for key, v in swd.items() if key.startswith("swd") and key not in swd_info}})
                if progress:
                    print(json.dumps(points[-1]), flush=True)
    result = {"points": points, "num_images": num_images, "nfe": sorted(nfe), "samplers": list(samplers),
              "max_nfe_others": max_nfe_others,
              "extractor": (getattr(extractor, "name", None) or type(extractor).__name__) if features else None,
              "swd_real_data_floor": floor, **swd_info}
    if "ddpm" in samplers:  # without it this run is a part to merge (merge_results) with one that has the baseline
        result.update(reach_of_baseline(points))
    return result


def reach_of_baseline(points: Sequence[dict]) -> dict:
    """``baseline`` (the first recipe's ``ddpm`` point at the largest NFE), ``reach_metric`` (``"fd"``, or
    ``"swd"`` for points without features), ``threshold_fd`` / ``threshold_swd`` (the baseline's figure + its s.e.)
    and ``reach`` (per recipe, in order of appearance: its fewest-NFE point at or under the threshold, or None)."""
    names = list(dict.fromkeys(p["recipe"] for p in points))
    top = max(p["nfe"] for p in points)
    base = next((p for p in points if p["recipe"] == names[0] and p["sampler"] == "ddpm" and p["nfe"] == top), None)
    if base is None:
        raise ValueError(f"no baseline point: the first recipe {names[0]!r} has no ddpm point at NFE {top}")
    key = "fd" if base.get("fd") is not None else "swd"
    threshold = base[key] + (base.get(f"{key}_standard_error") or 0.0)
    reach = {}
    for recipe in names:
        ok = [p for p in points if p["recipe"] == recipe and p.get(key) is not None and p[key] <= threshold]
        best = min(ok, key=lambda p: (p["nfe"], p[key])) if ok else None
        reach[recipe] = None if best is None else {
            "nfe": best["nfe"], "sampler": best["sampler"], key: best[key], "wall_seconds": best["wall_seconds"],
            "speedup_vs_baseline_nfe": top / best["nfe"]}
    kept = ("recipe", "sampler", "nfe", "fd", "fd_standard_error", "swd", "swd_standard_error", "wall_seconds")
    return {"baseline": {k: base.get(k) for k in kept}, "reach_metric": key, f"threshold_{key}": threshold,
            "reach": reach}


def merge_results(results: Sequence[dict]) -> dict:
    """One result from runs split by recipe, sampler or NFE (e.g. one process per recipe), the baseline's first.

    Raises:
        ValueError: runs with different N or features, or a (recipe, sampler, NFE) point twice.
    """
    first = results[0]
    for other in results[1:]:
        for key in ("num_images", "extractor", "swd_resolutions", "swd_num_bootstrap"):
            if other.get(key) != first.get(key):
                raise ValueError(f"cannot merge runs with different {key}: {first.get(key)!r} vs {other.get(key)!r}")
    points = [p for r in results for p in r["points"]]
    keys = [(p["recipe"], p["sampler"], p["nfe"]) for p in points]
    if len(set(keys)) != len(keys):
        raise ValueError("cannot merge runs that measured the same (recipe, sampler, NFE) point twice")
    merged = {k: first[k] for k in ("num_images", "max_nfe_others", "extractor", "swd_real_data_floor", "swd_method",
                                    "swd_resolutions", "swd_num_bootstrap") if k in first}
    merged["nfe"] = sorted({p["nfe"] for p in points})
    merged["samplers"] = [s for s in SAMPLERS if any(p["sampler"] == s for p in points)]
    merged["points"] = points
    merged.update(reach_of_baseline(points))
    return merged


def _metrics(result: dict) -> list:
    """``[(key, label)]`` of the figures the points hold: FD when there were features, SWD always."""
    out = []
    if any(p.get("fd") is not None for p in result["points"]):
        out.append(("fd", f"FD ({result['extractor']} features)"))
    if any(p.get("swd") is not None for p in result["points"]):
        out.append(("swd", "SWD×10³ (no weights)"))
    return out


def plot_fd_vs_nfe(result: dict, path: str) -> None:
    """FD ± s.e. (with features) and SWD ± s.e. against NFE (log axes), one line per (recipe, sampler); the
    baseline's level + s.e. dashed, SWD's real-data floor dotted."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    panels = _metrics(result)
    fig = Figure(figsize=(8 * len(panels), 5), dpi=100)
    recipes = list(dict.fromkeys(p["recipe"] for p in result["points"]))
    styles = ["-", "--", ":", "-."]
    markers = {"ddpm": "o", "ddim": "s", "dpmsolver++": "^", "unipc": "v", "ours": "*"}
    b = result.get("baseline")
    for j, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), j + 1)
        for i, recipe in enumerate(recipes):
            for sampler in result["samplers"]:
                pts = sorted((p for p in result["points"] if p["recipe"] == recipe and p["sampler"] == sampler),
                             key=lambda p: p["nfe"])
                if pts:
                    ax.errorbar([p["nfe"] for p in pts], [p[key] for p in pts],
                                yerr=[p.get(f"{key}_standard_error") or 0 for p in pts], ls=styles[i % 4],
                                marker=markers.get(sampler, "o"), capsize=2, label=f"{recipe} / {sampler}")
        if b is not None and result.get(f"threshold_{key}") is not None:
            ax.axhline(result[f"threshold_{key}"], color="gray", ls="--", lw=1)
            ax.annotate(f"{b['recipe']} ddpm@{b['nfe']} {key.upper()} + s.e.", (0.01, result[f"threshold_{key}"]),
                        xycoords=("axes fraction", "data"), fontsize=7, color="gray", va="bottom")
        floor = result.get("swd_real_data_floor")
        if key == "swd" and floor:
            ax.axhline(floor["swd"], color="black", ls=":", lw=1)
            ax.annotate(f"real training images, N = {floor['n_real']}", (0.01, floor["swd"]),
                        xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("network calls per image (NFE)")
        ax.set_ylabel(label)
        ax.set_title(f"sample quality per network call (N = {result['num_images']} per point)", fontsize=10)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png")


def markdown_table(result: dict) -> str:
    """FD ± s.e. (with features) and SWD ± s.e. per (recipe, sampler) row and NFE column, SWD's real-data floor,
    then the reach of the baseline per recipe."""
    nfe = result["nfe"]
    index = {(p["recipe"], p["sampler"], p["nfe"]): p for p in result["points"]}
    rows = []
    for key, label in _metrics(result):
        digits = 2 if key == "fd" else 1
        if rows:
            rows.append("")
        rows += [f"{label}, ± bootstrap standard error:", "",
                 "| recipe | sampler | " + " | ".join(f"NFE {k}" for k in nfe) + " |", "|---|---|" + "---|" * len(nfe)]
        for recipe in dict.fromkeys(p["recipe"] for p in result["points"]):
            for sampler in result["samplers"]:
                cells = []
                for k in nfe:
                    p = index.get((recipe, sampler, k))
                    cells.append("–" if p is None or p.get(key) is None else
                                 f"{p[key]:.{digits}f} ± {(p.get(f'{key}_standard_error') or 0):.{digits}f}")
                if any(c != "–" for c in cells):
                    rows.append(f"| `{recipe}` | {sampler} | " + " | ".join(cells) + " |")
        floor = result.get("swd_real_data_floor")
        if key == "swd":
            rows += ["", f"SWD method: {result.get('swd_method')}."]
            if floor:
                levels = ", ".join(f"{r} px {floor[f'swd_{r}']:.1f} ± "
                                   f"{(floor.get(f'swd_{r}_standard_error') or 0):.1f}"
                                   for r in floor.get("swd_resolutions", []))
                rows += ["", f"Real-data floor (what samples as good as real images score): {floor['swd']:.1f} ± "
                             f"{(floor.get('swd_standard_error') or 0):.1f} ({levels}; {floor['n_real']} training "
                             f"images vs the {floor['n_reference']} held-out images)."]
    b = result.get("baseline")
    if b is None:  # a part without the ddpm sampler: see merge_results
        return "\n".join(rows)
    key = result.get("reach_metric", "fd")
    name = "FD" if key == "fd" else "SWD×10³"
    rows += ["", f"Baseline: `{b['recipe']}` with `ddpm` at {b['nfe']} NFE, {name} {b[key]:.3f} ± "
             f"{(b.get(f'{key}_standard_error') or 0):.3f} ({b['wall_seconds']:.0f} s for N = {result['num_images']}).",
             "", f"| recipe | fewest NFE reaching the baseline {name} (within its s.e.) | sampler | {name} | "
             "sampling wall time, N images | speed-up in NFE |", "|---|---|---|---|---|---|"]
    for recipe, r in result["reach"].items():
        rows.append(f"| `{recipe}` | " + ("not reached | – | – | – | –" if r is None else
                                          f"{r['nfe']} | {r['sampler']} | {r[key]:.3f} | {r['wall_seconds']:.1f} s | "
                                          f"{r['speedup_vs_baseline_nfe']:.0f}×") + " |")
    return "\n".join(rows)


def fmt_json_line(result: dict) -> str:
    def clean(o):
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, np.generic):
            return o.item()
        return o

    return json.dumps(clean(result))
