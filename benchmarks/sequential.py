"""Sequential inference focused on one observation: ours (``ib.sequential`` with NPE, NLE and
ImplicitVI) against sbi 0.27's TSNPE (NPE-NSF with ``RestrictedPrior``, quantile 10⁻⁴) and SNLE,
same task, observation, budget, number of rounds and simulation seed, in the same run; C2ST
against sbibm's reference posteriors.

Protocol (as ``sbibm_suite.py``): settings are chosen on the development cells (observations 1–5,
seed 0: ``--cells dev``) and reported on held-out cells (observations 6–8 by default, 6–10 with
``--observations 6-10``; seeds 1, 2, 3). A sequential run serves one observation, so each row is
one (task, budget, method, seed, observation). The budget is split evenly over ``--rounds``
rounds (the first takes the remainder), for ours and the peers alike; round 1 of every method
draws from the prior with the same seed. Rows record the commit, code trees, versions, the
configuration, each round's prior mass (ours) and the command; a row whose setup changed is run
again. A run that raises (ours or a peer's) is recorded with its error and listed, not scored.
``sequential.md`` is rewritten from all rows, with a plot per task of C2ST against simulations
beside the amortized rows of ``sbibm_suite.json`` on the same observations.

``npe_seq`` is ``ib.sequential``'s default for NPE, fresh fits each round since they became the
default; ``npe_seq_warm`` warm-starts (``implicit_vi_seq_warm`` and ``nle_seq_warm`` likewise for
ImplicitVI and NLE, whose default fresh fits train on the simulations in the proposing posterior's
region). Rows that ran before such a change under the names ``npe_seq`` (then warm),
``npe_seq_fresh`` (then the option), ``nle_seq`` and ``nle_seq_nsf`` (then warm) are relabelled to
what they ran and keep the old name in ``relabelled_from``; their ``command`` is the one that ran. So are the
``implicit_vi_seq`` rows that ran before ImplicitVI's region became a fitted density's and its
rounds fresh fits: ``implicit_vi_seq_balls`` (``RETIRED``), a configuration no longer run.

    OMP_NUM_THREADS=1 python benchmarks/sequential.py --tasks slcp --budgets 10000 --seeds 1
    python benchmarks/sequential.py --table
"""

from __future__ import annotations

import argparse
import json
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
from provenance import (add_store_arguments, command_line, committed_code_state, key, locked_results,  # noqa: E402
                        parse_range, produced_by, results_path, store, versions)
from sbibm_suite import sbibm_c2st, verdict  # noqa: E402

TASKS = ("slcp", "two_moons", "sir", "bernoulli_glm", "lotka_volterra_ode")
METHODS = ("npe_seq", "npe_seq_warm", "nle_seq", "nle_seq_warm", "nle_seq_nsf", "implicit_vi_seq",
           "implicit_vi_seq_warm", "sbi_tsnpe", "sbi_snle")
# Rows of configurations the library no longer has, kept in the table under a name of their own
# (``relabelled_from`` holds the name they ran under): implicit_vi_seq_balls is ImplicitVI's rounds
# before its region became a fitted density's and its rounds fresh fits (a union of balls around
# its draws, warm starts); nle_seq_nsf_warm is the spline-flow ablation of NLE before its rounds
# became fresh fits on the region's simulations.
RETIRED = {"implicit_vi_seq_balls": "ImplicitVI's rounds with the union-of-balls region and warm starts, "
                                    "before its region became a fitted density's and its rounds fresh fits",
           "nle_seq_nsf_warm": "NLE's rounds with its spline flow, warm-started, before NLE's rounds became fresh "
                               "fits on the simulations in the proposing posterior's region"}
ORDER = METHODS + tuple(RETIRED)
PEER = {"npe_seq": "sbi_tsnpe", "npe_seq_warm": "sbi_tsnpe", "implicit_vi_seq": "sbi_tsnpe",
        "implicit_vi_seq_warm": "sbi_tsnpe", "implicit_vi_seq_balls": "sbi_tsnpe", "nle_seq": "sbi_snle",
        "nle_seq_warm": "sbi_snle", "nle_seq_nsf": "sbi_snle", "nle_seq_nsf_warm": "sbi_snle"}
CELLS = {"dev": ((1, 2, 3, 4, 5), (0,)), "heldout": ((6, 7, 8), (1, 2, 3))}
QUANTILE = 1e-4
# The peers as the issue names them: TSNPE is NPE-C with a neural spline flow (sbi's default is MAF),
# SNLE is NLE-A with sbi's default MAF (as in sbibm's SNLE rows).
SBI_ESTIMATOR = {"sbi_tsnpe": "nsf", "sbi_snle": "maf"}
# Sequential NLE as chosen on the development cells: the vectorized slice sampler (slcp's posterior
# has four modes; NUTS's default two chains, one after another, hold at most two of them) and a
# MAF likelihood (NLE's default spline flow, nle_seq_nsf, is the ablation row).
OPTIONS = {"nle_seq": {"sampler": "slice", "flow": "maf"}, "nle_seq_warm": {"sampler": "slice", "flow": "maf"},
           "nle_seq_nsf": {"sampler": "slice"}}
# ib.sequential's own options: npe_seq_warm, nle_seq_warm and implicit_vi_seq_warm, the ablation rows
# of the fresh fits, warm-start every round from the previous one. Rows labelled so (and npe_seq,
# nle_seq) before the default became fresh fits carry `relabelled_from`, the name they ran under
# (module docstring).
SEQUENTIAL_OPTIONS = {"npe_seq_warm": {"warm_start": True}, "nle_seq_warm": {"warm_start": True},
                      "implicit_vi_seq_warm": {"warm_start": True}}


def ours(method: str, task, x_o, budget: int, rounds: int, seed: int):
    cls = {"npe_seq": ib.NPE, "npe_seq_warm": ib.NPE, "nle_seq": ib.NLE, "nle_seq_warm": ib.NLE, "nle_seq_nsf": ib.NLE,
           "implicit_vi_seq": ib.ImplicitVI, "implicit_vi_seq_warm": ib.ImplicitVI}[method]
    options = OPTIONS.get(method, {})
    post = ib.sequential(cls(task.model, observed="x", **options), observation={"x": x_o}, num_simulations=budget,
                         rounds=rounds, seed=seed, progress=False, quantile=QUANTILE, **SEQUENTIAL_OPTIONS.get(method, {}))
    info = {"config": {"class": cls.__name__, **post.config.to_json()},
            "rounds": [{k: r[k] for k in ("simulations", "prior_mass", "acceptance", "envelope", "seconds")}
                       for r in post.rounds]}
    return (lambda n: post.sample(n, seed=seed)["theta"]), info


def round_budgets(budget: int, rounds: int) -> list[int]:
    return [budget // rounds + (budget % rounds if r == 0 else 0) for r in range(rounds)]


def sbi_run(method: str, task, x_o, budget: int, rounds: int, seed: int):
    """sbi's TSNPE (``sbi_tsnpe``) or SNLE (``sbi_snle``) as its tutorials run them."""
    from sbi.inference import NLE_A, NPE_C
    from sbi.utils import RestrictedPrior, get_density_thresholder

    torch.manual_seed(seed)
    x_flat = x_o.reshape(1, -1)
    inference = (NPE_C if method == "sbi_tsnpe" else NLE_A)(prior=task.prior, density_estimator=SBI_ESTIMATOR[method],
                                                            show_progress_bars=False)
    proposal = task.prior
    for r, n in enumerate(round_budgets(budget, rounds)):
        theta = proposal.sample((n,))
        x = task.simulate(theta, seed=seed * 1000 + r).reshape(n, -1)
        if method == "sbi_tsnpe":
            estimator = inference.append_simulations(theta, x).train(force_first_round_loss=True)
            posterior = inference.build_posterior(estimator).set_default_x(x_flat)
            threshold = get_density_thresholder(posterior, quantile=QUANTILE)
            proposal = RestrictedPrior(task.prior, threshold, sample_with="rejection")
        else:
            estimator = inference.append_simulations(theta, x).train()
            posterior = inference.build_posterior(estimator).set_default_x(x_flat)
            proposal = posterior
    config = {"class": "sbi." + ("NPE_C + RestrictedPrior" if method == "sbi_tsnpe" else "NLE_A"),
              "density_estimator": SBI_ESTIMATOR[method], "quantile": QUANTILE}
    return (lambda n: posterior.sample((n,), show_progress_bars=False)), {"config": config, "rounds": None}


def setup_key(method: str, code: dict, vers: dict, rounds: int, num_samples: int) -> str:
    parts = [method, code["simulators_tree"], vers["torch"], vers["sbibm"], rounds, num_samples, QUANTILE]
    parts += [vers["sbi"], SBI_ESTIMATOR[method]] if method.startswith("sbi") else [code["implicitbayes_tree"],
                                                                                   sorted(OPTIONS.get(method, {}).items())]
    parts += sorted(SEQUENTIAL_OPTIONS.get(method, {}).items())
    return key(*parts)


def row_identity(r: dict) -> tuple:
    return r["task"], r["budget"], r["method"], r["seed"], r["observation"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--budgets", default="1000,3000,10000")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cells", choices=sorted(CELLS), default="heldout")
    p.add_argument("--observations", help="override the cells' observations")
    p.add_argument("--seeds", help="override the cells' simulation seeds")
    p.add_argument("--num-samples", type=int, default=10_000)
    add_store_arguments(p)
    args = p.parse_args()
    path = results_path(args, "sequential")
    if args.table:
        write_table(json.loads(path.read_text()), path.with_suffix(".md"))
        return
    methods, tasks = args.methods.split(","), args.tasks.split(",")
    unknown = [m for m in methods if m not in METHODS] + [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown methods or tasks {unknown}; choose from {METHODS} and {TASKS}")
    obs, seeds = CELLS[args.cells]
    obs = tuple(parse_range(args.observations)) if args.observations else obs
    seeds = tuple(parse_range(args.seeds)) if args.seeds else seeds
    code, vers = committed_code_state(args, "benchmarks/sequential.py", "benchmarks/provenance.py"), versions()
    torch.set_num_threads(1)
    c2st = sbibm_c2st()
    existing = json.loads(path.read_text())["runs"] if path.exists() else []
    done = {(*row_identity(r), r["setup"]) for r in existing if not r["code"]["dirty"]}
    command = command_line("benchmarks/sequential.py")
    for seed in seeds:
        for name in tasks:
            task = simulators.get(name)
            for budget in map(int, args.budgets.split(",")):
                for k in obs:
                    for method in methods:
                        setup = setup_key(method, code, vers, args.rounds, args.num_samples)
                        if (name, budget, method, seed, k, setup) in done:
                            continue
                        x_o = task.observation(k)
                        t0 = time.perf_counter()
                        run = sbi_run if method.startswith("sbi") else ours
                        try:
                            sampler, info = run(method, task, x_o, budget, args.rounds, seed)
                            draws = sampler(args.num_samples).reshape(args.num_samples, -1).float()
                        except Exception as e:  # a run that fails is a result too: recorded, listed, not scored
                            score, info = None, {"failed": f"{type(e).__name__}: {e}"}
                        else:
                            score = float(c2st(task.reference_samples(k), draws, seed=1)[0])
                        seconds = time.perf_counter() - t0
                        cells = "dev" if (k in CELLS["dev"][0] and seed in CELLS["dev"][1]) else (
                            "heldout" if k in CELLS["heldout"][0] and seed in CELLS["heldout"][1] else "custom")
                        row = {"task": name, "budget": budget, "method": method, "seed": seed, "observation": k,
                               "rounds": args.rounds, "cells": cells, "setup": setup, "code": code, "versions": vers,
                               "command": command, "c2st": score, "seconds": seconds, **info}
                        store(path, row_identity, row)
                        result = f"C2ST {score:.3f}" if score is not None else f"FAILED ({info['failed']})"
                        print(f"{name:18s} {budget:>6d} seed {seed} obs {k:2d} {method:16s} {result} "
                              f"{seconds:7.1f} s", flush=True)
    with locked_results(path) as results:
        write_table(results, path.with_suffix(".md"))


def per_seed(rows: list[dict]) -> dict:
    """(task, budget, method) -> {seed: mean C2ST over its observations} and mean seconds."""
    out: dict = {}
    for r in rows:
        out.setdefault((r["task"], r["budget"], r["method"]), {}).setdefault(r["seed"], []).append(r)
    return {k: {"c2st": {s: statistics.fmean(x["c2st"] for x in v) for s, v in seeds.items()},
                "seconds": statistics.fmean(x["seconds"] for v in seeds.values() for x in v),
                "observations": sorted({x["observation"] for v in seeds.values() for x in v})}
            for k, seeds in out.items()}


def write_table(results: dict, path: Path) -> None:
    failed = [r for r in results["runs"] if r.get("failed")]
    runs = [r for r in results["runs"] if not r.get("failed")]
    lines = ["# Sequential inference: C2ST against sbibm's reference posteriors (0.5 is perfect)", "",
             *produced_by("benchmarks/sequential.py", (r["command"] for r in results["runs"]))]
    relabelled = sorted({(r["relabelled_from"], r["method"]) for r in results["runs"] if r.get("relabelled_from")})
    if relabelled:
        lines += ["Rows that ran before a default changed are shown under what they ran: "
                  + "; ".join(f"`{old}` in their command is `{new}` here" for old, new in relabelled) + "."
                  + "".join(f" `{name}`: {what} (no longer run)." for name, what in RETIRED.items()
                            if any(new == name for _, new in relabelled)), ""]
    lines += ["*seconds per run* is wall time on one thread; rows that ran beside other processes on the "
              "2-core machine (most did) are inflated by up to 2×, so the column is no timing comparison.", ""]
    for cells, title in (("heldout", "Held-out cells"), ("dev", "Development cells (settings chosen here)"),
                         ("custom", "Other cells")):
        rows = [r for r in runs if r["cells"] == cells]
        if not rows:
            continue
        summary = per_seed(rows)
        lines += [f"## {title}", "", "| task | simulations | method | observations | C2ST mean | per seed | "
                  "vs peer (same seeds and observations) | seconds per run |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for (task, budget, method), s in sorted(summary.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                               ORDER.index(kv[0][2]))):
            against = "—"
            if PEER.get(method):
                mine = [r for r in rows if (r["task"], r["budget"], r["method"]) == (task, budget, method)]
                theirs = [r for r in rows if (r["task"], r["budget"], r["method"]) == (task, budget, PEER[method])]
                shared = {(r["seed"], r["observation"]) for r in mine} & {(r["seed"], r["observation"]) for r in theirs}
                if shared:
                    a, b = (per_seed([r for r in part if (r["seed"], r["observation"]) in shared])[
                        (task, budget, m)]["c2st"] for part, m in ((mine, method), (theirs, PEER[method])))
                    seeds = sorted(a)
                    a, b = [a[k] for k in seeds], [b[k] for k in seeds]
                    against = (f"{statistics.fmean(a) - statistics.fmean(b):+.3f} {verdict(a, b)} ({PEER[method]}, "
                               f"{len(shared)} cells)")
            values = list(s["c2st"].values())
            lines.append(f"| {task} | {budget} | {method} | {','.join(map(str, s['observations']))} | "
                         f"{statistics.fmean(values):.3f} | "
                         + " ".join(f"{s['c2st'][k]:.3f} ({k})" for k in sorted(s["c2st"]))
                         + f" | {against} | {s['seconds']:.0f} |")
        lines.append("")
    if failed:
        lines += ["## Runs that failed (not scored; a peer's failure leaves its cells out of the comparison)", "",
                  "| task | simulations | method | seed | observation | error |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['task']} | {r['budget']} | {r['method']} | {r['seed']} | {r['observation']} | "
                  f"{r['failed'][:200]} |" for r in sorted(failed, key=row_identity)]
        lines.append("")
    plots = plot(runs, path.parent)
    if plots:
        lines += ["## C2ST against simulations", "",
                  "Held-out cells where measured (else all rows); the amortized lines are `sbibm_suite.json`'s npe "
                  "and sbi_npe rows on the same observations and seeds.", "",
                  *[f"![{p.stem}]({p.name})" for p in plots], ""]
    path.write_text("\n".join(lines) + "\n")


def plot(runs: list[dict], folder: Path) -> list[Path]:
    """One figure per task: mean C2ST against simulations for each method, sequential (solid)
    and amortized from the sbibm suite on the same observations (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suite = folder / "sbibm_suite.json"
    amortized = json.loads(suite.read_text())["runs"] if suite.exists() else []
    out = []
    for task in sorted({r["task"] for r in runs}):
        rows = [r for r in runs if r["task"] == task]
        rows = [r for r in rows if r["cells"] == "heldout"] or rows
        cells = {(r["observation"], r["seed"]) for r in rows}
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method in ORDER:
            points = sorted({r["budget"] for r in rows if r["method"] == method})
            if points:
                ax.plot(points, [statistics.fmean(r["c2st"] for r in rows if r["method"] == method and r["budget"] == b)
                                 for b in points], "o-", label=method)
        for method in ("npe", "sbi_npe"):
            values = {}
            for r in amortized:
                if r["task"] == task and r["method"] == method and r.get("applicable", True):
                    for k, v in r["c2st"].items():
                        if (int(k), r["seed"]) in cells:
                            values.setdefault(r["budget"], []).append(v)
            if values:
                ax.plot(sorted(values), [statistics.fmean(values[b]) for b in sorted(values)], "s--",
                        label=f"{method} (amortized)")
        ax.set(xscale="log", xlabel="simulations", ylabel="C2ST", title=task)
        ax.legend(fontsize=7)
        fig.tight_layout()
        target = folder / f"sequential_{task}.png"
        fig.savefig(target, dpi=100)
        plt.close(fig)
        out.append(target)
    return out


if __name__ == "__main__":
    main()
