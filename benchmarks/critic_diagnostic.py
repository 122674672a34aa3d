"""The critic as a diagnostic: does ``ib.diagnostics.critic_divergence`` rank observations as the
true C2ST does?

Protocol. For each sbibm task one SimulationSet (``--budget`` simulations, ``--seed``) trains
ImplicitVI at its defaults once (amortized); at each of observations 1–10 the posterior draws
10 000 samples, critic-corrected and from the generator alone, each scored with sbibm's ``c2st``
against the reference posterior, and ``critic_divergence`` (10 000 generator draws, no reference)
gives its implied C2ST for both. The row reports Spearman's rank correlation over the ten
observations between the implied and the true C2ST, for the corrected draws (what a user gets)
and for the generator (what the critic estimates directly). Target: ≥ 0.7 on every task.
Nothing here was tuned on these numbers (the diagnostic has no settings).

    OMP_NUM_THREADS=1 python benchmarks/critic_diagnostic.py --tasks two_moons,slcp
    python benchmarks/critic_diagnostic.py --table
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import (add_store_arguments, command_line, committed_code_state, key, parse_range,  # noqa: E402
                        produced_by, results_path, store, tensors_hash, versions)
from sbibm_suite import TASKS, sbibm_c2st  # noqa: E402

TARGET = 0.7


def row_identity(r: dict) -> tuple:
    return r["task"], r["budget"], r["seed"], tuple(r["observations"])


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def run_task(name: str, budget: int, seed: int, observations: list[int], num_samples: int, c2st) -> dict:
    import implicitbayes as ib
    import simulators

    task = simulators.get(name)
    data = ib.simulate(task.model, budget, observed="x", seed=seed, progress=False)
    t0 = time.perf_counter()
    post = ib.ImplicitVI(task.model, observed="x").fit(data, seed=seed, progress=False)
    train_s = time.perf_counter() - t0
    per_obs = {}
    for k in observations:
        x, ref = {"x": task.observation(k)}, task.reference_samples(k)
        scores = {}
        for label, correction in (("corrected", "default"), ("generator", None)):
            draws = post.sample(num_samples, x, seed=seed, correction=correction)["theta"]
            scores[label] = float(c2st(ref, draws.reshape(num_samples, -1).float(), seed=1)[0])
        t0 = time.perf_counter()
        diag = ib.diagnostics.critic_divergence(post, x, num_samples=num_samples, seed=seed)
        per_obs[str(k)] = {"c2st": scores["corrected"], "c2st_generator": scores["generator"],
                           "diagnostic_seconds": time.perf_counter() - t0, **diag}
        print(f"{name:18s} obs {k:2d}  C2ST {scores['corrected']:.3f} (generator {scores['generator']:.3f})  "
              f"implied {diag['implied_c2st']:.3f} (generator {diag['implied_c2st_generator']:.3f})", flush=True)
    rows = list(per_obs.values())
    return {"train_seconds": train_s, "temperature": post.config.temperature, "observations_detail": per_obs,
            "data_hash": tensors_hash(data["theta"], data["x"]),
            "spearman": spearman([r["implied_c2st"] for r in rows], [r["c2st"] for r in rows]),
            "spearman_generator": spearman([r["implied_c2st_generator"] for r in rows],
                                           [r["c2st_generator"] for r in rows])}


def write_table(results: dict, path: Path) -> None:
    runs = sorted(results["runs"], key=lambda r: (TASKS.index(r["task"]), r["budget"], r["seed"]))
    lines = ["# The critic as a diagnostic: implied C2ST against the true C2ST, over observations", "",
             *produced_by("benchmarks/critic_diagnostic.py", (r["command"] for r in runs)),
             f"Spearman's rank correlation over the observations between `ib.diagnostics.critic_divergence`'s "
             f"implied C2ST (no reference draws) and sbibm's C2ST against the reference posterior; target ≥ {TARGET}. "
             "'corrected': the draws `sample` returns; 'generator': `correction=None`. Mean absolute gap: "
             "|implied − true| averaged over the observations.", "",
             "| task | simulations | seed | observations | Spearman corrected | Spearman generator | "
             "mean C2ST corrected (implied) | mean C2ST generator (implied) | mean abs gap corrected | target |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        obs = list(r["observations_detail"].values())
        mean = lambda key: sum(o[key] for o in obs) / len(obs)  # noqa: E731
        gap = sum(abs(o["implied_c2st"] - o["c2st"]) for o in obs) / len(obs)
        met = r["spearman"] >= TARGET
        lines.append(f"| {r['task']} | {r['budget']} | {r['seed']} | {parse_label(r['observations'])} | "
                     f"{r['spearman']:.2f} | {r['spearman_generator']:.2f} | {mean('c2st'):.3f} "
                     f"({mean('implied_c2st'):.3f}) | {mean('c2st_generator'):.3f} ({mean('implied_c2st_generator'):.3f}) | "
                     f"{gap:.3f} | {'met' if met else 'not met'} |")
    lines += ["", "Per observation (true C2ST / implied, corrected; then the generator's):", "",
              "| task | seed | " + " | ".join(f"obs {k}" for k in range(1, 11)) + " |",
              "| --- | --- | " + " | ".join("---" for _ in range(10)) + " |"]
    for r in runs:
        cells = [f"{o['c2st']:.3f} / {o['implied_c2st']:.3f}; {o['c2st_generator']:.3f} / {o['implied_c2st_generator']:.3f}"
                 for o in r["observations_detail"].values()]
        lines.append(f"| {r['task']} | {r['seed']} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def parse_label(observations: list[int]) -> str:
    return f"{observations[0]}–{observations[-1]}" if observations == list(range(observations[0], observations[-1] + 1)) \
        else ",".join(map(str, observations))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--budget", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--observations", default="1-10")
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=1)
    add_store_arguments(p)
    args = p.parse_args()
    path = results_path(args, "critic_diagnostic")
    if args.table:
        write_table(json.loads(path.read_text()), path.with_suffix(".md"))
        return
    unknown = [t for t in args.tasks.split(",") if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; choose from {TASKS}")
    code, vers = committed_code_state(args, "benchmarks/critic_diagnostic.py", "benchmarks/provenance.py"), versions()
    torch.set_num_threads(args.threads)
    c2st, observations = sbibm_c2st(), parse_range(args.observations)
    for name in args.tasks.split(","):
        result = run_task(name, args.budget, args.seed, observations, args.num_samples, c2st)
        row = {"task": name, "budget": args.budget, "seed": args.seed, "observations": observations,
               "num_samples": args.num_samples, "code": code, "versions": vers, "command": command_line(
                   "benchmarks/critic_diagnostic.py"), "setup": key(code["implicitbayes_tree"], vers["torch"]), **result}
        store(path, row_identity, row)
        print(f"{name:18s} Spearman corrected {row['spearman']:.2f}, generator {row['spearman_generator']:.2f}",
              flush=True)
        write_table(json.loads(path.read_text()), path.with_suffix(".md"))


if __name__ == "__main__":
    main()
