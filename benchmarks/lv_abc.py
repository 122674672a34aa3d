"""Lotka–Volterra as in Tran, Ranganath & Blei (2017): an amortized implicit posterior with 10⁴
simulations against SMC-ABC with 10⁵, at θ* (observation 1).

For each method: posterior sd of each log θ_i, the central 95 % interval and whether it holds
θ*, simulations used, seconds (training, or the whole SMC run). NPE on the same 10⁴ simulations
is added for reference. Writes lv_abc_<task>.json / .md; rows of methods left out of
``--methods`` are kept from the file already there (and said so in the table).

    python benchmarks/lv_abc.py --task lotka_volterra_sde --neural 10000 --abc 100000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import implicitbayes as ib  # noqa: E402
import simulators  # noqa: E402
from simulators.lotka_volterra import THETA_STAR  # noqa: E402

OUT = ROOT / "benchmarks" / "results"


def describe(name, post, x, sims, seconds):
    d = post.sample(10_000, x, seed=1)["theta"].log()
    star = torch.tensor(THETA_STAR).log()
    lo, hi = d.quantile(0.025, 0), d.quantile(0.975, 0)
    return {"method": name, "simulations": int(sims), "seconds": round(seconds, 1),
            "mean_log_theta": d.mean(0).tolist(), "sd_log_theta": d.std(0).tolist(),
            "interval_95": [lo.tolist(), hi.tolist()], "contains_theta_star": ((star >= lo) & (star <= hi)).tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="lotka_volterra_sde")
    ap.add_argument("--neural", type=int, default=10_000)
    ap.add_argument("--abc", type=int, default=100_000)
    ap.add_argument("--methods", default="implicit_vi,npe,smc_abc")
    args = ap.parse_args()
    task = simulators.get(args.task)
    x = task.observation(1)
    rows = []
    methods = args.methods.split(",")
    if {"implicit_vi", "npe"} & set(methods):
        t0 = time.perf_counter()
        data = ib.simulate(task.model, args.neural, observed="x", seed=0, progress=False)
        sim_s = time.perf_counter() - t0
        for name, cls in (("implicit_vi", ib.ImplicitVI), ("npe", ib.NPE)):
            if name in methods:
                t0 = time.perf_counter()
                post = cls(task.model, observed="x").fit(data, seed=0, progress=False)
                rows.append(describe(name, post, x, len(data), time.perf_counter() - t0 + sim_s))
                print(json.dumps(rows[-1]), flush=True)
    if "smc_abc" in methods:
        t0 = time.perf_counter()
        post = ib.ABC(task.model, observed="x", num_simulations=args.abc).fit(observation=x, seed=0, progress=False)
        rows.append(describe("smc_abc", post, x, post.training_summary["simulations"], time.perf_counter() - t0))
        rows[-1]["populations"] = post.training_summary["populations"]
        rows[-1]["epsilon"] = post.training_summary["epsilon"]
        print(json.dumps(rows[-1]), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    stem = f"lv_abc_{args.task}"
    previous, kept = OUT / f"{stem}.json", []
    if previous.exists():  # rows of the methods not run this time are kept from the last run
        order = {"implicit_vi": 0, "npe": 1, "smc_abc": 2}
        kept = [r for r in json.loads(previous.read_text())["rows"] if r["method"] not in methods]
        rows = sorted(kept + rows, key=lambda r: order.get(r["method"], len(order)))
    (OUT / f"{stem}.json").write_text(json.dumps({"task": args.task, "theta_star": THETA_STAR, "rows": rows}, indent=1))
    lines = [f"# {args.task} at θ* = {THETA_STAR}: posterior on log θ", "",
             f"`python benchmarks/lv_abc.py --task {args.task} --neural {args.neural} --abc {args.abc}`", "",
             *([f"Rows kept from an earlier run: {', '.join(r['method'] for r in kept)}.", ""] if kept else []),
             "| method | simulations | seconds (simulation + training) | sd log θ₁ | sd log θ₂ | sd log θ₃ | sd log θ₄ | "
             "θ* in 95 % interval |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        sds = " | ".join(f"{s:.3f}" for s in r["sd_log_theta"])
        lines.append(f"| {r['method']} | {r['simulations']} | {r['seconds']} | {sds} | "
                     f"{sum(r['contains_theta_star'])}/4 |")
    (OUT / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
