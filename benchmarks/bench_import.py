"""Import time of `diffusers_ddpm_ext` against the diffusers classes it builds on, in fresh processes.

    python benchmarks/bench_import.py              # 7 rounds
    python benchmarks/bench_import.py --rounds 11

Each round starts one fresh Python process per variant, in alternating order (so machine-load drift hits both
alike), and each process times only its import statement with `time.perf_counter` (interpreter start-up excluded):

* `diffusers`: ``from diffusers import DDPMPipeline, UNet2DModel, DDPMScheduler`` (the baseline);
* `ours`: ``import diffusers_ddpm_ext`` (which imports diffusers itself, then our UNet, scheduler and pipelines);
* `ours_after_diffusers`: our import alone, timed in a process that has already done the baseline import (the
  marginal cost of our package).

Prints one JSON line: median and minimum seconds per variant, every sample, and
* `overhead_ratio` = median(ours_after_diffusers) / median(diffusers): what our package adds to the baseline import
  (the budget is 0.10). On a busy machine the fresh-process figures swing by seconds between runs, so this paired
  measurement is the stable one;
* `fresh_ratio_median` / `fresh_ratio_min` = ours / diffusers - 1 over the fresh processes (same quantity, noisy);
* the modules of ours a plain import loaded (those imported on use, e.g. `hub` or `data`, must not be among them)
  and the diffusers modules it loads beyond the baseline's.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

CHILD = {
    "diffusers": "from diffusers import DDPMPipeline, UNet2DModel, DDPMScheduler",
    "ours": "import diffusers_ddpm_ext",
}
TIMER = """
import sys, time, json
{before}
t0 = time.perf_counter()
{statement}
elapsed = time.perf_counter() - t0
print(json.dumps({{"s": elapsed, "modules": sorted(m for m in sys.modules if m.startswith("diffusers"))}}))
"""


def time_import(statement: str, before: str = "") -> dict:
    code = TIMER.format(statement=statement, before=before)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="fresh processes per variant")
    args = parser.parse_args(argv)
    samples = {"diffusers": [], "ours": [], "ours_after_diffusers": []}
    modules = {}
    for i in range(args.rounds):
        order = ["diffusers", "ours"] if i % 2 == 0 else ["ours", "diffusers"]
        for name in order:
            result = time_import(CHILD[name])
            samples[name].append(result["s"])
            modules[name] = set(result["modules"])
        samples["ours_after_diffusers"].append(time_import(CHILD["ours"], before=CHILD["diffusers"])["s"])
    medians = {name: statistics.median(values) for name, values in samples.items()}
    minima = {name: min(values) for name, values in samples.items()}
    report = {
        "bench": "import",
        "rounds": args.rounds,
        **{f"{name}_median_s": round(value, 4) for name, value in medians.items()},
        **{f"{name}_min_s": round(value, 4) for name, value in minima.items()},
        "overhead_ratio": round(medians["ours_after_diffusers"] / medians["diffusers"], 4),
        "fresh_ratio_median": round(medians["ours"] / medians["diffusers"] - 1, 4),
        "fresh_ratio_min": round(minima["ours"] / minima["diffusers"] - 1, 4),
        "budget_ratio": 0.10,
        "samples_s": {name: [round(v, 4) for v in values] for name, values in samples.items()},
        "ours_loaded_by_plain_import": sorted(m for m in modules["ours"] if m.startswith("diffusers_ddpm_ext")),
        "diffusers_modules_beyond_baseline": sorted(
            m for m in modules["ours"] - modules["diffusers"] if not m.startswith("diffusers_ddpm_ext")),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
