"""The reference posterior of ``hare_lynx``: Pyro NUTS on the task's model with its log-normal
likelihood written out (``HareLynx.likelihood_model``), four chains, checked against the Stan case
study's published posterior summaries, written to ``simulators/data/hare_lynx_reference.csv.bz2``
(10 000 draws, header = parameter names) with its diagnostics in
``benchmarks/results/hare_lynx_reference.json``.

The ODE solve is compiled (``torch.compile``) once: a gradient then costs about 2 ms instead of
75 ms, which is what makes 14 000 NUTS iterations a few minutes.

    OMP_NUM_THREADS=1 python benchmarks/hare_lynx_reference.py
"""

from __future__ import annotations

import argparse
import bz2
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import simulators  # noqa: E402
from implicitbayes.infer.mcmc import MCMCDiagnostics, run_nuts  # noqa: E402
from simulators.hare_lynx import REFERENCE  # noqa: E402

# Posterior mean and sd in the Stan case study (Carpenter 2018, "Predator-Prey Population Dynamics"),
# its table of theta, z_init and sigma; the same data and priors.
PUBLISHED = {"alpha": (0.55, 0.07), "beta": (0.028, 0.004), "gamma": (0.80, 0.10), "delta": (0.024, 0.004),
             "u0": (33.9, 2.9), "v0": (5.9, 0.5), "sigma_hare": (0.25, 0.04), "sigma_lynx": (0.25, 0.05)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    task = simulators.get("hare_lynx")
    task.populations = torch.compile(task.populations)  # the same solve, compiled
    y = task.observation(1)
    record = MCMCDiagnostics()
    t0 = time.perf_counter()
    draws = run_nuts(task.likelihood_model, ["theta"], args.num_samples, num_chains=args.chains,
                     warmup_steps=args.warmup, seed=args.seed, device=torch.device("cpu"), record=record,
                     model_args=(y,), what="hare_lynx reference NUTS", progress=True)["theta"]
    seconds = time.perf_counter() - t0
    summary = record.summary()
    names = task.parameter_names
    mean, sd = draws.mean(0), draws.std(0)
    table = {n: {"mean": float(mean[i]), "sd": float(sd[i]), "published_mean": PUBLISHED[n][0],
                 "published_sd": PUBLISHED[n][1],
                 "mean_off_in_published_sd": float((mean[i] - PUBLISHED[n][0]) / PUBLISHED[n][1]),
                 "r_hat": float(summary["theta"]["r_hat"][i]), "n_eff": float(summary["theta"]["n_eff"][i])}
             for i, n in enumerate(names)}
    for n, row in table.items():
        print(f"{n:11s} mean {row['mean']:.4g} (published {row['published_mean']}) sd {row['sd']:.3g} "
              f"(published {row['published_sd']}) R-hat {row['r_hat']:.3f} n_eff {row['n_eff']:.0f}")
    with bz2.open(REFERENCE, "wt") as fh:
        fh.write(",".join(names) + "\n")
        for row in draws.tolist():
            fh.write(",".join(f"{v:.8g}" for v in row) + "\n")
    out = ROOT / "benchmarks" / "results" / "hare_lynx_reference.json"
    out.write_text(json.dumps({"command": "OMP_NUM_THREADS=1 python benchmarks/hare_lynx_reference.py",
                               "chains": args.chains, "warmup": args.warmup, "num_samples": args.num_samples,
                               "seed": args.seed, "divergences": summary["divergences"], "seconds": seconds,
                               "torch": torch.__version__, "parameters": table}, indent=1) + "\n")
    print(f"{len(draws)} draws in {seconds:.0f} s, divergences per chain {summary['divergences']}; wrote {REFERENCE}")


if __name__ == "__main__":
    main()
