"""Sampling speed: seconds for 10 000 posterior draws at one observation, ImplicitVI (critic-
corrected, K = 8), our NPE and sbi 0.27's NPE-NSF, measured in the same run, per sbibm task.

The cost of drawing does not depend on how long a network was trained, only on its
architecture, so each method is fitted briefly (``--steps`` steps; sbi one epoch) on the
same ``--simulations`` simulations with the default architecture. ImplicitVI's correction
strength λ is set to 1 so that every draw goes through the K-candidate resampler (a trained
posterior whose held-out score chose λ = 0 draws faster, from the generator alone). Each method
draws ``--repeats`` times after two warm-up calls; the table gives the fastest and the median.

    OMP_NUM_THREADS=1 python benchmarks/sampling_time.py
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import implicitbayes as ib  # noqa: E402
import simulators  # noqa: E402

TASKS = "two_moons,gaussian_linear,slcp,gaussian_mixture,bernoulli_glm,sir,lotka_volterra_ode"
DRAWS = 10_000


def samplers(task, data, steps: int, seed: int) -> dict:
    from sbi.inference import NPE_C

    implicit = ib.ImplicitVI(task.model, observed="x").fit(data, seed=seed, progress=False, max_steps=steps)
    implicit.config.temperature = 1.0  # every draw through the K-candidate resampler
    npe = ib.NPE(task.model, observed="x").fit(data, seed=seed, progress=False, max_steps=steps)
    torch.manual_seed(seed)
    inference = NPE_C(prior=task.prior, density_estimator="nsf", show_progress_bars=False)
    estimator = inference.append_simulations(data["theta"], data["x"].reshape(len(data), -1)).train(
        max_num_epochs=1, show_train_summary=False)
    sbi = inference.build_posterior(estimator)
    return {"implicit_vi": lambda x: implicit.sample(DRAWS, x, seed=seed),
            "npe": lambda x: npe.sample(DRAWS, x, seed=seed),
            "sbi_npe": lambda x: sbi.sample((DRAWS,), x=x.reshape(1, -1), show_progress_bars=False)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--simulations", type=int, default=2000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    if args.repeats < 1 or args.simulations < 100 or args.steps < 1:
        raise SystemExit(f"--repeats ≥ 1, --simulations ≥ 100 and --steps ≥ 1 expected, got {args.repeats}, "
                         f"{args.simulations}, {args.steps}")
    rows = []
    for name in args.tasks.split(","):
        task = simulators.get(name)
        data = ib.simulate(task.model, args.simulations, observed="x", seed=args.seed, progress=False)
        x = task.observation(1)
        for method, draw in samplers(task, data, args.steps, args.seed).items():
            for _ in range(2):
                draw(x)
            seconds = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                draw(x)
                seconds.append(time.perf_counter() - t0)
            rows.append({"task": name, "method": method, "min_seconds": min(seconds),
                         "median_seconds": statistics.median(seconds), "seconds": seconds})
            print(f"{name:18s} {method:12s} 10k draws: {min(seconds):.3f} s (median {statistics.median(seconds):.3f})",
                  flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "threads": torch.get_num_threads()},
              "settings": vars(args), "rows": rows}
    (out / "sampling_time.json").write_text(json.dumps(result, indent=1))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["# Seconds for 10 000 posterior draws at observation 1 (fastest of "
             f"{args.repeats}; median in brackets)", "", f"Environment: {result['environment']}", "",
             "    OMP_NUM_THREADS=1 python benchmarks/sampling_time.py", "",
             "| task | " + " | ".join(methods) + " | ImplicitVI / sbi | NPE / sbi |",
             "| --- | " + " | ".join("---" for _ in methods) + " | --- | --- |"]
    for name in dict.fromkeys(r["task"] for r in rows):
        by = {r["method"]: r for r in rows if r["task"] == name}
        cells = [f"{by[m]['min_seconds']:.3f} ({by[m]['median_seconds']:.3f})" for m in methods]
        ratio = lambda m: f"{by[m]['min_seconds'] / by['sbi_npe']['min_seconds']:.2f}"  # noqa: E731
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio('implicit_vi')} | {ratio('npe')} |")
    (out / "sampling_time.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
