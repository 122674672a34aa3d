"""Coverage of LFVI's 90 % intervals on ``lotka_volterra_population`` (the hierarchical LV-SDE
model: global μ, σ of the log-rates; local log θ_n of 10 systems) over datasets simulated from
the prior: for dataset i, (μ, σ, log θ, x) is drawn from the model with seed 1000 + i, LFVI is
fitted to x at its defaults (training seed i), and each true coordinate is checked against the
central 90 % interval of 4 000 draws. Calibrated intervals cover 90 % on average; the target is
80–97 % for each of μ, σ and the locals. Each row also records the simulations and seconds the
fit took. Rows accumulate in ``benchmarks/results/lfvi_coverage.json`` (resumable: a dataset
already there with the same code and options is skipped); the table ``lfvi_coverage.md``.

    OMP_NUM_THREADS=1 python benchmarks/lfvi_coverage.py --datasets 1-20
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import implicitbayes as ib  # noqa: E402
import simulators  # noqa: E402
from provenance import (add_store_arguments, command_line, committed_code_state, key, parse_range,  # noqa: E402
                        produced_by, run_and_tabulate, store, tensors_hash, versions)

SITES = ("mu", "sigma", "log_theta")
TARGET = (0.80, 0.97)


def identity(r: dict) -> tuple:
    return r["dataset"], r["options"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="1-20")
    ap.add_argument("--options", default="", help="LFVI options as Python keyword arguments (default: none)")
    ap.add_argument("--num-samples", type=int, default=4000)
    add_store_arguments(ap)
    args = ap.parse_args()
    run_and_tabulate(args, "lfvi_coverage", run, write_table)


def run(args, path: Path) -> None:
    code, vers = committed_code_state(args, "benchmarks/lfvi_coverage.py", "benchmarks/provenance.py"), versions()
    options = eval(f"dict({args.options})")  # noqa: S307 — a benchmark's command line
    setup = key(code["implicitbayes_tree"], code["simulators_tree"], vers["torch"], args.options, args.num_samples)
    existing = json.loads(path.read_text())["runs"] if path.exists() else []
    done = {(r["dataset"], r["options"]) for r in existing if r["setup"] == setup and not r["code"]["dirty"]}
    task = simulators.get("lotka_volterra_population")
    command = command_line("benchmarks/lfvi_coverage.py")
    for i in parse_range(args.datasets):
        if (i, args.options) in done:
            continue
        truth = ib.simulate(task.model, 1, observed="x", seed=1000 + i, progress=False)
        t0 = time.perf_counter()
        base = {"dataset": i, "seed": 1000 + i, "options": args.options, "setup": setup, "code": code,
                "versions": vers, "data_hash": tensors_hash(truth["x"]), "command": command}
        try:
            post = ib.LFVI(task.model, observed="x", **options).fit(observation=truth["x"][0], seed=i, progress=False)
        except (ib.SimulationError, ib.TrainingError) as e:  # a fit that failed: a result too
            message = str(e).splitlines()[0]
            store(path, identity, {**base, "failed": message, "inside": None,
                                   "train_seconds": time.perf_counter() - t0, "simulations": None})
            print(f"dataset {i:3d}  fit failed: {message}", flush=True)
            continue
        seconds = time.perf_counter() - t0
        draws = post.sample(args.num_samples, seed=i)
        inside = {}
        for site in SITES:
            lo, hi = draws[site].quantile(0.05, 0), draws[site].quantile(0.95, 0)
            value = truth[site][0]
            inside[site] = ((value >= lo) & (value <= hi)).flatten().tolist()
        row = {**base, "inside": inside, "train_seconds": seconds, "simulations": post.training_summary["simulations"]}
        store(path, identity, row)
        print(f"dataset {i:3d}  " + "  ".join(f"{s} {sum(v)}/{len(v)}" for s, v in inside.items())
              + f"  {seconds:.0f} s  {row['simulations']} simulations", flush=True)


def write_table(results: dict, path: Path) -> None:
    by_state: dict = {}  # one section per options and code state, in the order first run
    for r in results["runs"]:
        by_state.setdefault((r["options"], r["setup"]), []).append(r)
    latest = {options: setup for options, setup in by_state}  # the last state run with those options
    lines = ["# LFVI on lotka_volterra_population: coverage of 90 % intervals over datasets from the prior", "",
             *produced_by("benchmarks/lfvi_coverage.py", (r["command"] for r in results["runs"])),
             f"Target: {TARGET[0]:.0%}–{TARGET[1]:.0%} for each group. ± is one binomial sd over the intervals "
             "counted (coordinates of different datasets are independent; those of one dataset are not, so it "
             "understates the spread).", ""]
    for (options, setup), every in reversed(list(by_state.items())):
        every = sorted(every, key=lambda r: r["dataset"])
        rows = [r for r in every if not r.get("failed")]
        failed = [r for r in every if r.get("failed")]
        commit = every[0]["code"]["commit"][:7]
        superseded = "" if latest[options] == setup else ", superseded by the code state above"
        lines += [f"## Options: {options or 'defaults'}, code at {commit} ({len(every)} datasets, {len(failed)} fits "
                  f"failed{superseded})", ""]
        if failed:
            lines += ["Failed fits (counted in no coverage; the target is not met while any fit fails):", "",
                      *[f"- dataset {r['dataset']}: {r['failed']}" for r in failed], ""]
        if not rows:
            continue
        lines += ["Coverage over the fits that completed:", "",
                  "| parameters | intervals | coverage | target met |", "| --- | --- | --- | --- |"]
        for site in SITES:
            hits = [h for r in rows for h in r["inside"][site]]
            p = sum(hits) / len(hits)
            sd = math.sqrt(p * (1 - p) / len(hits))
            met = "met" if TARGET[0] <= p <= TARGET[1] and not failed else "not met"
            lines.append(f"| {site} | {len(hits)} | {p:.3f} ± {sd:.3f} | {met if len(every) >= 20 else met + ' (fewer than 20 datasets)'} |")
        secs = [r["train_seconds"] for r in rows]
        sims = [r["simulations"] for r in rows]
        lines += ["", f"Per fit: {sum(secs) / len(secs):.0f} s on average ({min(secs):.0f}–{max(secs):.0f}), "
                      f"{sum(sims) / len(sims):,.0f} simulated systems on average.", "",
                  "| dataset | μ inside | σ inside | log θ inside | seconds | simulations |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            cells = " | ".join(f"{sum(r['inside'][s])}/{len(r['inside'][s])}" for s in SITES)
            lines.append(f"| {r['dataset']} | {cells} | {r['train_seconds']:.0f} | {r['simulations']} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
