"""Accuracy and speed on sbibm tasks: our methods and sbi 0.27's NPE (neural spline flow) on
the same simulations, in the same run, scored by C2ST against sbibm's reference posteriors.

For each task and budget, one SimulationSet is drawn with ``ib.simulate`` (seeded); every
method trains on exactly those simulations; each trained posterior draws 10 000 samples per
observation, scored with sbibm's own ``c2st`` (MLP classifier, 5-fold CV, z-scored). Results
accumulate in ``benchmarks/results/sbibm_suite.json`` (re-running skips what is there) and a
markdown table ``sbibm_suite.md``.

    python benchmarks/sbibm_suite.py --tasks two_moons,slcp --methods implicit_vi,npe,sbi_npe \\
        --budgets 1000,10000 --observations 1-5
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import implicitbayes as ib  # noqa: E402
import simulators  # noqa: E402

METHODS = ("implicit_vi", "npe", "sbi_npe")


def train_ours(method, task, data, seed):
    cls = {"implicit_vi": ib.ImplicitVI, "npe": ib.NPE}[method]
    post = cls(task.model, observed="x").fit(data, seed=seed, progress=False)
    return lambda x, n: post.sample(n, x, seed=seed)["theta"]


def train_sbi(task, data, seed):
    from sbi.inference import NPE_C

    torch.manual_seed(seed)
    inference = NPE_C(prior=task.prior, density_estimator="nsf", show_progress_bars=False)
    estimator = inference.append_simulations(data["theta"], data["x"].reshape(len(data), -1)).train()
    posterior = inference.build_posterior(estimator)
    return lambda x, n: posterior.sample((n,), x=x.reshape(1, -1), show_progress_bars=False)


def sbibm_c2st():
    """sbibm's own c2st function, loaded from its file: importing ``sbibm.metrics`` would pull
    in the dependencies of every other metric (autograd, future, ...)."""
    import importlib.util

    spec = importlib.util.find_spec("sbibm")
    if spec is None:
        raise SystemExit("sbibm is needed for the reference posteriors: pip install --no-deps sbibm==1.1.0")
    path = Path(spec.submodule_search_locations[0], "metrics", "c2st.py")
    module_spec = importlib.util.spec_from_file_location("_sbibm_c2st", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.c2st


def parse_range(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="two_moons,slcp")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--budgets", default="1000,10000")
    p.add_argument("--observations", default="1-5")
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    c2st = sbibm_c2st()

    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sbibm_suite.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": []}
    obs = parse_range(args.observations)
    done = {(r["task"], r["budget"], r["method"], r["seed"]) for r in results["runs"]
            if sorted(map(int, r["c2st"])) == obs}
    results["environment"] = {"torch": torch.__version__, "python": platform.python_version(),
                              "threads": torch.get_num_threads()}
    for name in args.tasks.split(","):
        task = simulators.get(name)
        for budget in map(int, args.budgets.split(",")):
            todo = [m for m in methods if (name, budget, m, args.seed) not in done]
            if not todo:
                continue
            data = ib.simulate(task.model, budget, observed="x", seed=args.seed, progress=False)
            for method in todo:
                t0 = time.perf_counter()
                sampler = train_sbi(task, data, args.seed) if method == "sbi_npe" else train_ours(method, task, data, args.seed)
                train_s = time.perf_counter() - t0
                scores, sample_s = {}, []
                for k in obs:
                    x = task.observation(k)
                    t0 = time.perf_counter()
                    draws = sampler(x, args.num_samples)
                    sample_s.append(time.perf_counter() - t0)
                    scores[k] = float(c2st(task.reference_samples(k), draws.reshape(args.num_samples, -1).float(), seed=1)[0])
                row = {"task": name, "budget": budget, "method": method, "seed": args.seed, "c2st": scores,
                       "c2st_mean": sum(scores.values()) / len(scores), "train_seconds": train_s,
                       "sample_seconds_per_10k": sum(sample_s) / len(sample_s) * 10_000 / args.num_samples}
                results["runs"].append(row)
                path.write_text(json.dumps(results, indent=1))
                print(f"{name:18s} {budget:>7d} {method:12s} C2ST {row['c2st_mean']:.3f}  train {train_s:6.1f} s  "
                      f"sample {row['sample_seconds_per_10k']:.2f} s", flush=True)
    write_table(results, out / "sbibm_suite.md")


def write_table(results: dict, path: Path) -> None:
    rows = sorted(results["runs"], key=lambda r: (r["task"], r["budget"], r["method"]))
    lines = ["# sbibm suite: C2ST (mean over observations; 0.5 is perfect), seconds", "",
             f"Environment: {results.get('environment')}", "",
             *[f"- {note}" for note in results.get("notes", [])], *([""] if results.get("notes") else []),
             "| task | simulations | method | C2ST mean | − sbi_npe | per observation | train (s) | 10k draws (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    peer = {(r["task"], r["budget"]): r["c2st_mean"] for r in rows if r["method"] == "sbi_npe"}
    for r in rows:
        per = " ".join(f"{v:.3f}" for v in r["c2st"].values())
        ref = peer.get((r["task"], r["budget"]))
        delta = "—" if ref is None or r["method"] == "sbi_npe" else f"{r['c2st_mean'] - ref:+.3f}"
        lines.append(f"| {r['task']} | {r['budget']} | {r['method']} | {r['c2st_mean']:.3f} | {delta} | {per} | "
                     f"{r['train_seconds']:.1f} | {r['sample_seconds_per_10k']:.2f} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
