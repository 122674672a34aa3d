"""LFVI on ``hierarchical_gaussian`` against its exact posterior (targets of issue 5).

For each observation: global posterior means of μ and τ within 0.1 exact posterior sd, their sds
within 15 %, and the local θ_n 90 % central intervals holding 85–95 % of the exact posterior's
mass (mean over n). Default LFVI settings; one fit per observation, 10 000 draws. Writes
lfvi_hierarchical.json / .md.

    python benchmarks/lfvi_hierarchical.py --observations 1-5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import implicitbayes as ib  # noqa: E402
import simulators  # noqa: E402

OUT = ROOT / "benchmarks" / "results"


def score(task, post, k: int) -> dict:
    draws = post.sample(10_000, seed=1)
    ref = task.reference_samples(k)
    row = {}
    for name in ("mu", "tau"):
        a, b = draws[name], ref[name]
        row[f"{name}_mean_error_sd"] = float((a.mean() - b.mean()) / b.std())
        row[f"{name}_sd_ratio"] = float(a.std() / b.std())
    lo, hi = draws["theta"].quantile(0.05, 0), draws["theta"].quantile(0.95, 0)
    cov = ((ref["theta"] >= lo) & (ref["theta"] <= hi)).float().mean(0)
    row["local_coverage"] = float(cov.mean())
    row["local_coverage_per_group"] = [round(float(c), 3) for c in cov]
    row["met"] = (all(abs(row[f"{n}_mean_error_sd"]) <= 0.1 and abs(row[f"{n}_sd_ratio"] - 1) <= 0.15
                      for n in ("mu", "tau")) and 0.85 <= row["local_coverage"] <= 0.95)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--observations", default="1-5")
    ap.add_argument("--options", default="", help="LFVI options as Python keyword arguments, e.g. num_particles=32, training={'max_steps': 8000}")
    args = ap.parse_args()
    a, _, b = args.observations.partition("-")
    obs = range(int(a), int(b or a) + 1)
    options = eval(f"dict({args.options})")  # noqa: S307 — a benchmark's command line
    task = simulators.get("hierarchical_gaussian")
    rows = []
    for k in obs:
        t0 = time.perf_counter()
        post = ib.LFVI(task.model, observed="x", **options).fit(observation=task.observation(k), seed=0, progress=False)
        seconds = time.perf_counter() - t0
        row = {"observation": k, "options": args.options, "train_seconds": round(seconds, 1),
               "simulated_groups": post.training_summary["simulations"], **score(task, post, k)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "lfvi_hierarchical.json").write_text(json.dumps(rows, indent=1))
    lines = ["| obs | μ mean err (sd) | μ sd ratio | τ mean err (sd) | τ sd ratio | local 90 % coverage | all targets | train (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['observation']} | {r['mu_mean_error_sd']:+.3f} | {r['mu_sd_ratio']:.3f} | "
                     f"{r['tau_mean_error_sd']:+.3f} | {r['tau_sd_ratio']:.3f} | {r['local_coverage']:.3f} | "
                     f"{'met' if r['met'] else 'not met'} | {r['train_seconds']} |")
    (OUT / "lfvi_hierarchical.md").write_text(
        "# LFVI on hierarchical_gaussian vs the exact posterior\n\n`python benchmarks/lfvi_hierarchical.py "
        f"--observations {args.observations}`{' --options ' + args.options if args.options else ''}\n\n"
        "Targets: means within 0.1 posterior sd, sds within 15 %, local 90 % intervals covering 85–95 %.\n\n"
        + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
