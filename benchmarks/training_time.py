"""Training wall time at equal simulations: our methods and sbi 0.27's NPE-NSF, one after the other
in one process on one thread, on the simulations of the sbibm grid's held-out cells.

For each task and simulation seed one SimulationSet is drawn exactly as ``sbibm_suite.py`` draws
it (``ib.simulate(task.model, budget, observed="x", seed=seed)``), and every method is trained on
it with the training seed the grid uses, by the grid's own training functions — so each fit here
is the computation of the grid's row for that cell, and its C2ST is that row's (the table joins
it where the grid has it from the same code). Only seconds are measured here; time a comparison
alone on the machine (one process), as the table's numbers assume. Each run starts with an empty
Inductor cache, so a compiled training step (``TrainConfig.compile``) is timed with its compile.

Rows accumulate in ``benchmarks/results/training_time.json``; a cell (task, budget, seed) is
skipped when one earlier run timed every method asked for at an unchanged setup, and otherwise
every method is timed again, so that each ratio in ``training_time.md`` (rewritten from all
rows) is of two fits on the same simulations in the same run.

    OMP_NUM_THREADS=1 python benchmarks/training_time.py --tasks two_moons,sir --seeds 1
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
from provenance import (add_store_arguments, command_line, committed_code_state, parse_range, produced_by,  # noqa: E402
                        run_and_tabulate, store, tensors_hash, versions)
from sbibm_suite import PEER, SBI, TASKS, method_variant, setup_key, train_ours, train_sbi  # noqa: E402


def identity(r: dict) -> tuple:
    return r["task"], r["budget"], r["method"], r["seed"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default="npe,sbi_npe")
    p.add_argument("--budget", type=int, default=10_000)
    p.add_argument("--seeds", default="1")
    add_store_arguments(p)
    args = p.parse_args()
    run_and_tabulate(args, "training_time", run, write_table)


def run(args, path: Path) -> None:
    import os
    import tempfile

    # every run compiles from a cold cache, as a user's first fit does: Inductor's on-disk cache
    # would otherwise hold the kernels of an earlier run and hide the compile's cost
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="implicitbayes-inductor-")
    methods = args.methods.split(",")
    bad = [m for m in methods if method_variant(m)[0] not in (*SBI, "npe", "implicit_vi")]
    bad += [t for t in args.tasks.split(",") if t not in TASKS]
    if bad:
        raise SystemExit(f"unknown methods or tasks {bad}")
    code, vers = committed_code_state(args, "benchmarks/training_time.py", "benchmarks/sbibm_suite.py",
                                      "benchmarks/provenance.py"), versions()
    torch.set_num_threads(1)
    existing = json.loads(path.read_text())["runs"] if path.exists() else []
    # a cell is done when one earlier run timed all the methods asked for, each at its current setup:
    # a ratio is only ever of two fits timed in the same run
    timed: dict = {}
    for r in existing:
        if not r["code"]["dirty"] and "run" in r:
            timed.setdefault((r["task"], r["budget"], r["seed"], r["run"]), set()).add((r["method"], r["setup"]))
    command = command_line("benchmarks/training_time.py")
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    for seed in parse_range(args.seeds):
        for name in args.tasks.split(","):
            keys = {m: setup_key(m, code, vers, 0) for m in methods}
            want = {(m, keys[m]) for m in methods}
            if any(k[:3] == (name, args.budget, seed) and want <= v for k, v in timed.items()):
                continue
            todo = methods
            task = simulators.get(name)
            data = ib.simulate(task.model, args.budget, observed="x", seed=seed, progress=False)
            for method in todo:
                t0 = time.perf_counter()
                if method in SBI:
                    _, config = train_sbi(task, data, seed, method=method)
                else:
                    _, config = train_ours(method, task, data, seed)
                seconds = time.perf_counter() - t0
                store(path, identity, {"task": name, "budget": args.budget, "method": method, "seed": seed,
                                       "run": run_id, "setup": keys[method], "code": code, "versions": vers,
                                       "data_hash": tensors_hash(data["theta"], data["x"]), "command": command,
                                       "config": config, "train_seconds": seconds})
                print(f"{name:18s} {args.budget:>6d} seed {seed} {method:20s} train {seconds:7.1f} s", flush=True)


def grid_c2st(task: str, budget: int, method: str, seed: int, row: dict) -> float | None:
    """The grid's held-out C2ST for the same fit (same simulations and code), if it has it."""
    grid = ROOT / "benchmarks" / "results" / "sbibm_suite.json"
    if not grid.exists():
        return None
    for r in json.loads(grid.read_text())["runs"]:
        same_code = r["code"]["implicitbayes_tree"] == row["code"]["implicitbayes_tree"] or method in SBI
        if ((r["task"], r["budget"], r["method"], r["seed"]) == (task, budget, method, seed) and r.get("applicable", True)
                and r["data_hash"] == row["data_hash"] and same_code and r["cells"] == "heldout"):
            return r["c2st_mean"]
    return None


def write_table(results: dict, path: Path) -> None:
    runs = results["runs"]
    lines = ["# Training wall time on the same simulations, one thread, one process", "",
             *produced_by("benchmarks/training_time.py", (r["command"] for r in runs)),
             f"Commits: {', '.join(sorted({r['code']['commit'][:10] for r in runs}))}. Each fit is the grid's fit "
             "for that cell (same simulations, seeds and code); *C2ST* is the grid's held-out value for it "
             "(observations 6–10) where the grid has it, — where not.", "",
             f"| task | simulations | seed | method | commit | train (s) | {PEER} train (s) → ratio | C2ST | {PEER} C2ST |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = {t: i for i, t in enumerate(TASKS)}
    ratios: dict = {}
    for r in sorted(runs, key=lambda r: (order.get(r["task"], 99), r["budget"], r["seed"], r["method"])):
        if r["method"] == PEER:
            continue
        peer = next((q for q in runs if identity(q)[:2] == identity(r)[:2] and q["method"] == PEER
                     and q["seed"] == r["seed"] and q["data_hash"] == r["data_hash"]
                     and q.get("run") == r.get("run")), None)  # timed in the same run
        ratio = r["train_seconds"] / peer["train_seconds"] if peer else None
        if ratio is not None:
            ratios.setdefault(r["method"], []).append(ratio)
        c2st = grid_c2st(r["task"], r["budget"], r["method"], r["seed"], r)
        peer_c2st = grid_c2st(r["task"], r["budget"], PEER, r["seed"], peer) if peer else None
        fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
        lines.append(f"| {r['task']} | {r['budget']} | {r['seed']} | {r['method']} | {r['code']['commit'][:10]} | "
                     f"{r['train_seconds']:.1f} | "
                     f"{fmt(peer and peer['train_seconds'], '.1f')} → {fmt(ratio, '.2f')} | {fmt(c2st, '.3f')} | "
                     f"{fmt(peer_c2st, '.3f')} |")
    lines += ["", *[f"{m}: time over {PEER} {min(v):.2f}–{max(v):.2f} (median {statistics.median(v):.2f}) on "
                    f"{len(v)} cells; at most 1 on {sum(x <= 1 for x in v)}." for m, v in ratios.items()], ""]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
