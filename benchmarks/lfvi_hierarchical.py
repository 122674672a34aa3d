"""LFVI on ``hierarchical_gaussian`` against its exact posterior.

For each observation: global posterior means of μ and τ within 0.1 exact posterior sd, their sds
within 15 %, and the local θ_n 90 % central intervals holding 85–95 % of the exact posterior's
mass (mean over n). One fit per observation (training seed 0), 10 000 draws. Each row also
records the worst local marginal's 1-Wasserstein distance in exact sds (``tests/exact.py``; the
slow test ``test_lfvi_at_its_defaults_matches_the_exact_local_marginals`` asks < 0.15 on
observation 2), the commit, the code trees and the options. Rows accumulate in
``benchmarks/results/lfvi_hierarchical.json`` (an observation already there with the same code
and options is skipped); ``lfvi_hierarchical.md`` is rewritten from them.

    OMP_NUM_THREADS=1 python benchmarks/lfvi_hierarchical.py --observations 1-5
    OMP_NUM_THREADS=1 python benchmarks/lfvi_hierarchical.py --options "local='implicit'"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import implicitbayes as ib  # noqa: E402
import simulators  # noqa: E402
from exact import sliced_errors  # noqa: E402
from provenance import (add_store_arguments, command_line, committed_code_state, key, parse_range,  # noqa: E402
                        produced_by, run_and_tabulate, store, versions)

# the choices this benchmark made, one row each (the sections below are the evidence for the
# current ones; the measurements behind the older ones are in git's history of this file)
DECISIONS = [
    ("8 000 steps (`LFVI.TRAINING.max_steps`)", "4 000 steps met every target on 1 of 5 observations (τ mean "
     "errors up to 0.16 sd); 8 000 on 5 of 5", "**default**"),
    ("reference class drawn at another particle's x, not the observed x", "with the observed x the critic "
     "separates the classes by x alone (loss → 0.03) and the local intervals cover 77 %", "**default**"),
    ("`local=\"flow\"`: q(z \\| x, β) a conditional flow whose density enters the critic's logit", "here the "
     "implicit sampler met every target on 5 of 5 observations too (local coverage 0.888–0.900, git history of "
     "this file) but its worst local marginal is at w1 0.17 on observation 2 (slow tests), the flow's 0.032–0.048 "
     "(below); on "
     "`lotka_volterra_population` the implicit sampler collapses where a local posterior is much narrower than "
     "the prior (`lfvi_coverage.md`), and on the narrow-local test model it is off by up to 1.4 sd where the flow "
     "is within 0.2", "**default**"),
    ("`critic_loss=\"hinge\"`", "never measured better than the logistic loss here; a classifier, not a ratio "
     "estimator", "*removed* (`git checkout 3ec6d40` for it)"),
]


def identity(r: dict) -> tuple:
    return r["observation"], r["options"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--observations", default="1-5")
    ap.add_argument("--options", default="", help="LFVI options as Python keyword arguments, e.g. local='implicit'")
    add_store_arguments(ap)
    args = ap.parse_args()
    run_and_tabulate(args, "lfvi_hierarchical", run, write_table)


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
    row["local_w1"] = sliced_errors(draws["theta"], ref["theta"], diagonals=False)["w1"]
    row["met"] = (all(abs(row[f"{n}_mean_error_sd"]) <= 0.1 and abs(row[f"{n}_sd_ratio"] - 1) <= 0.15
                      for n in ("mu", "tau")) and 0.85 <= row["local_coverage"] <= 0.95)
    return row


def run(args, path: Path) -> None:
    code, vers = committed_code_state(args, "benchmarks/lfvi_hierarchical.py", "benchmarks/provenance.py"), versions()
    options = eval(f"dict({args.options})")  # noqa: S307 — a benchmark's command line
    setup = key(code["implicitbayes_tree"], code["simulators_tree"], vers["torch"], args.options)
    existing = json.loads(path.read_text())["runs"] if path.exists() else []
    done = {identity(r) for r in existing if r["setup"] == setup and not r["code"]["dirty"]}
    task = simulators.get("hierarchical_gaussian")
    command = command_line("benchmarks/lfvi_hierarchical.py")
    for k in parse_range(args.observations):
        if (k, args.options) in done:
            continue
        t0 = time.perf_counter()
        post = ib.LFVI(task.model, observed="x", **options).fit(observation=task.observation(k), seed=0, progress=False)
        row = {"observation": k, "options": args.options, "setup": setup, "code": code, "versions": vers,
               "command": command, "local": post.config.local, "train_seconds": round(time.perf_counter() - t0, 1),
               "simulated_groups": post.training_summary["simulations"], **score(task, post, k)}
        store(path, identity, row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("code", "versions")}), flush=True)


def write_table(results: dict, path: Path) -> None:
    by_state: dict = {}  # one section per options and code state, newest first
    for r in results["runs"]:
        by_state.setdefault((r["options"], r["setup"]), []).append(r)
    lines = ["# LFVI on hierarchical_gaussian vs the exact posterior", "",
             *produced_by("benchmarks/lfvi_hierarchical.py", (r["command"] for r in results["runs"])),
             "Targets: means within 0.1 posterior sd, sds within 15 %, local 90 % intervals covering 85–95 %. "
             "'local w1': the worst θ_n marginal's 1-Wasserstein distance in exact sds (a 0.3-sd shift scores "
             "0.31, a 1.5× variance 0.20). One thread, beside another benchmark process.", "",
             "Decisions (one row each):", "", "| option | evidence | verdict |", "| --- | --- | --- |",
             *[f"| {a} | {b} | {c} |" for a, b, c in DECISIONS], ""]
    for (options, _), rows in reversed(list(by_state.items())):
        rows = sorted(rows, key=lambda r: r["observation"])
        lines += [f"## Options: {options or 'defaults'} (q(z | x, β): {rows[0]['local']}), code at "
                  f"{rows[0]['code']['commit'][:7]}", "",
                  "| obs | μ mean err (sd) | μ sd ratio | τ mean err (sd) | τ sd ratio | local 90 % coverage "
                  "| local w1 | all targets | train (s) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            lines.append(f"| {r['observation']} | {r['mu_mean_error_sd']:+.3f} | {r['mu_sd_ratio']:.3f} | "
                         f"{r['tau_mean_error_sd']:+.3f} | {r['tau_sd_ratio']:.3f} | {r['local_coverage']:.3f} | "
                         f"{r['local_w1']:.3f} | {'met' if r['met'] else 'not met'} | {r['train_seconds']} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
