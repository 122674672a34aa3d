"""Accuracy and speed on sbibm tasks: our methods and sbi 0.27's NPE (neural spline flow) on
the same simulations, in the same run, scored by C2ST against sbibm's reference posteriors.

Protocol. Settings are chosen on the *development cells* only (observations 1–5, simulation
seed 0: ``--cells dev``); results are reported on the *held-out cells* (observations 6–10,
simulation seeds 1, 2, 3: ``--cells heldout``, the default). For each task, budget and seed one
SimulationSet is drawn with ``ib.simulate``; every method and peer trains on exactly those
simulations (training seed = simulation seed) and draws 10 000 samples per observation, scored
with sbibm's own ``c2st`` (MLP classifier, 5-fold CV, z-scored).

Methods: ``implicit_vi`` and ``npe`` at their defaults (``npe+batch_size=200+patience=30``: with
those training-loop settings changed, a development-cell probe kept apart by its label); ``implicit_vi_fm``, ``implicit_vi_score``,
``implicit_vi_cm`` = ImplicitVI with the flow-matching, score-based or consistency generator
(``family=``), critic-corrected; ``implicit_vi_fm_distilled`` = the flow-matching sampler
distilled into a one-step network (``distill=True``) before the critic; ``sbi_npe`` = sbi's
NPE-NSF at its defaults; ``sbi_fmpe`` = sbi's flow-matching posterior (FMPE) at its defaults;
``sbi_npse`` = sbi's score-based posterior (NPSE: VE SDE, MLP score network, sampled by the
reverse SDE) at its defaults; ``sbi_npe_std`` = sbi's NPE-NSF trained on observations passed through our input
standardisation (``implicitbayes.nn.Standardize``: log space for positive features, the robust
asinh step), run only on tasks where that differs from plain z-scoring — the fairness row that
separates the method from the preprocessing.

Every row records the commit, the git trees of ``implicitbayes/`` and ``simulators/``, a hash of
its simulations, the versions of torch / sbi / sbibm / pyro, the resolved configuration and the
command. A row is skipped as done only if its setup (code trees, versions, method, draws) is
unchanged; a row with a changed setup replaces the old one. Rows accumulate in
``benchmarks/results/sbibm_suite.json`` (several processes may run at once: writes are locked);
``sbibm_suite.md`` is rewritten from all rows.

    OMP_NUM_THREADS=1 python benchmarks/sbibm_suite.py --tasks two_moons,slcp --budgets 1000
    python benchmarks/sbibm_suite.py --table   # only rewrite the markdown
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
from implicitbayes.nn import Standardize  # noqa: E402
from provenance import (add_store_arguments, command_line, committed_code_state, key, locked_results,  # noqa: E402
                        parse_range, produced_by, results_path, store, tensors_hash, versions)

METHODS = ("implicit_vi", "implicit_vi_fm", "implicit_vi_fm_distilled", "implicit_vi_score", "implicit_vi_cm", "npe", "sbi_npe", "sbi_npe_std", "sbi_fmpe", "sbi_npse")
SBI = {"sbi_npe": ("sbi.NPE_C", "nsf"), "sbi_fmpe": ("sbi.FMPE", "mlp vector field"),
       "sbi_npse": ("sbi.NPSE", "mlp score network, VE SDE")}  # sbi's methods, each at its defaults
PEER = "sbi_npe"
TASKS = ("two_moons", "gaussian_linear", "slcp", "gaussian_mixture", "bernoulli_glm", "sir", "lotka_volterra_ode")
CELLS = {"dev": ((1, 2, 3, 4, 5), (0,)), "heldout": ((6, 7, 8, 9, 10), (1, 2, 3))}


# ----------------------------------------------------------------------------- methods
def method_variant(method: str) -> tuple[str, dict]:
    """``"npe+batch_size=200+patience=30"`` → ``("npe", {"batch_size": 200, "patience": 30})``:
    one of our methods with some training-loop settings changed (a development-cell probe; the
    label keeps its rows apart from the default's)."""
    base, *changes = method.split("+")
    training = {}
    for change in changes:
        field, sep, value = change.partition("=")
        if not sep:
            raise SystemExit(f"method {method!r}: expected +field=value after the method name, got {change!r}")
        try:
            training[field] = json.loads(value)
        except json.JSONDecodeError:
            training[field] = value
    if training and (base not in METHODS or base in SBI or base == "sbi_npe_std"):
        raise SystemExit(f"method {method!r}: training changes apply to our methods only")
    return base, training


def train_ours(method, task, data, seed):
    method, training = method_variant(method)
    options = {"training": training} if training else {}
    cls, family = {"implicit_vi": (ib.ImplicitVI, {}), "implicit_vi_fm": (ib.ImplicitVI, {"family": "flow_matching"}),
                    "implicit_vi_fm_distilled": (ib.ImplicitVI, {"family": "flow_matching", "distill": True}),
                    "implicit_vi_score": (ib.ImplicitVI, {"family": "score"}),
                    "implicit_vi_cm": (ib.ImplicitVI, {"family": "consistency"}), "npe": (ib.NPE, {})}[method]
    post = cls(task.model, observed="x", **family, **options).fit(data, seed=seed, progress=False)
    config = {"class": cls.__name__, **post.config.to_json(), **({"training": training} if training else {})}
    return (lambda x, n: post.sample(n, x, seed=seed)["theta"]), config


def input_standardization(data) -> Standardize | None:
    """Our standardisation of the flattened simulations, or None where it is plain z-scoring."""
    x = data["x"].reshape(len(data), -1)
    std = Standardize((x.shape[1],)).fit(x)
    return std if bool(std.use_log.any() or std.use_asinh.any()) else None


def train_sbi(task, data, seed, standardize: Standardize | None = None, method: str = "sbi_npe"):
    from sbi.inference import FMPE, NPE_C, NPSE

    x = data["x"].reshape(len(data), -1)
    transform = (lambda v: v) if standardize is None else (lambda v: standardize(v.reshape(-1, x.shape[1])))
    torch.manual_seed(seed)
    if method == "sbi_fmpe":  # flow matching at sbi's defaults (an MLP vector field)
        inference = FMPE(prior=task.prior, show_progress_bars=False)
    elif method == "sbi_npse":  # score-based at sbi's defaults (VE SDE; sampled by the reverse SDE)
        inference = NPSE(prior=task.prior, show_progress_bars=False)
    else:
        inference = NPE_C(prior=task.prior, density_estimator="nsf", show_progress_bars=False)
    estimator = inference.append_simulations(data["theta"], transform(x)).train()
    posterior = inference.build_posterior(estimator)
    name, estimator_kind = SBI["sbi_npe" if method == "sbi_npe_std" else method]
    config = {"class": name, "density_estimator": estimator_kind,
              "input": "sbi z-score" if standardize is None else
              {"implicitbayes.Standardize": {"log": standardize.use_log.tolist(), "asinh": standardize.use_asinh.tolist()}}}
    return (lambda v, n: posterior.sample((n,), x=transform(v.reshape(1, -1)), show_progress_bars=False)), config


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


# ----------------------------------------------------------------------------- provenance
def setup_key(method: str, code: dict, vers: dict, num_samples: int) -> str:
    """What a row's numbers depend on besides task, budget, seed and observations."""
    parts = [method, code["simulators_tree"], vers["torch"], vers["sbibm"], num_samples]
    if method not in SBI:  # ours, and the fairness row (our Standardize)
        parts.append(code["implicitbayes_tree"])
    if method.startswith("sbi"):
        parts.append(vers["sbi"])
    return key(*parts)


def cell_name(observations, seed) -> str:
    for name, (obs, seeds) in CELLS.items():
        if tuple(observations) == obs and seed in seeds:
            return name
    return "custom"


def row_identity(r: dict) -> tuple:
    return r["task"], r["budget"], r["method"], r["seed"], tuple(r["observations"])


# ----------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--budgets", default="1000,10000")
    p.add_argument("--cells", choices=sorted(CELLS), default="heldout",
                   help="dev: observations 1-5, seed 0 (tuning); heldout: observations 6-10, seeds 1,2,3 (reporting)")
    p.add_argument("--observations", help="override the cells' observations (rows are then 'custom')")
    p.add_argument("--seeds", help="override the cells' simulation seeds")
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=1)
    add_store_arguments(p)
    args = p.parse_args()
    path = results_path(args, "sbibm_suite")
    if args.table:
        write_table(json.loads(path.read_text()), path.with_suffix(".md"))
        return

    methods = args.methods.split(",")
    unknown = [m for m in methods if method_variant(m)[0] not in METHODS] + [t for t in args.tasks.split(",") if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown methods or tasks {unknown}; choose from {METHODS} and {TASKS}")
    obs, seeds = CELLS[args.cells]
    obs = tuple(parse_range(args.observations)) if args.observations else obs
    seeds = tuple(parse_range(args.seeds)) if args.seeds else seeds
    code, vers = committed_code_state(args, "benchmarks/sbibm_suite.py", "benchmarks/provenance.py"), versions()
    torch.set_num_threads(args.threads)
    c2st = sbibm_c2st()
    existing = json.loads(path.read_text())["runs"] if path.exists() else []
    done = {(*row_identity(r), r["setup"]) for r in existing if not r["code"]["dirty"]}
    command = command_line("benchmarks/sbibm_suite.py")

    for seed in seeds:
        for name in args.tasks.split(","):
            task = simulators.get(name)
            for budget in map(int, args.budgets.split(",")):
                keys = {m: setup_key(m, code, vers, args.num_samples) for m in methods}
                todo = [m for m in methods if (name, budget, m, seed, obs, keys[m]) not in done]
                if not todo:
                    continue
                data = ib.simulate(task.model, budget, observed="x", seed=seed, progress=False)
                for method in todo:
                    base = {"task": name, "budget": budget, "method": method, "seed": seed, "observations": list(obs),
                            "cells": cell_name(obs, seed), "setup": keys[method], "code": code, "versions": vers,
                            "data_hash": tensors_hash(data["theta"], data["x"]), "num_samples": args.num_samples,
                            "threads": torch.get_num_threads(), "command": command}
                    t0 = time.perf_counter()
                    if method == "sbi_npe_std":
                        std = input_standardization(data)
                        if std is None:
                            store(path, row_identity, {**base, "applicable": False,
                                         "config": "our standardisation is plain z-scoring here: same as sbi_npe"})
                            continue
                        sampler, config = train_sbi(task, data, seed, std)
                    elif method in SBI:
                        sampler, config = train_sbi(task, data, seed, method=method)
                    else:
                        sampler, config = train_ours(method, task, data, seed)
                    train_s = time.perf_counter() - t0
                    scores, sample_s = {}, []
                    for k in obs:
                        x = task.observation(k)
                        t0 = time.perf_counter()
                        draws = sampler(x, args.num_samples)
                        sample_s.append(time.perf_counter() - t0)
                        draws = draws.reshape(args.num_samples, -1).float()
                        scores[str(k)] = float(c2st(task.reference_samples(k), draws, seed=1)[0])
                    row = {**base, "applicable": True, "config": config, "c2st": scores,
                           "c2st_mean": statistics.fmean(scores.values()), "train_seconds": train_s,
                           "sample_seconds_per_10k": statistics.fmean(sample_s) * 10_000 / args.num_samples}
                    store(path, row_identity, row)
                    print(f"{name:18s} {budget:>6d} seed {seed} {method:12s} C2ST {row['c2st_mean']:.3f}  "
                          f"train {train_s:6.1f} s  sample {row['sample_seconds_per_10k']:.2f} s", flush=True)
    with locked_results(path) as results:
        write_table(results, path.with_suffix(".md"))


# ----------------------------------------------------------------------------- table
MIN_SEEDS = 3  # a verdict needs every held-out seed


def verdict(ours: list[float], peer: list[float]) -> str:
    """Lower C2ST is better; decided only where the seed ranges [min, max] do not overlap, on the
    seeds both have (at least ``MIN_SEEDS``)."""
    if len(ours) < MIN_SEEDS:
        return f"undecided ({len(ours)} of {MIN_SEEDS} seeds)"
    if max(ours) < min(peer):
        return "ahead"
    if min(ours) > max(peer):
        return "behind"
    return "undecided"


def summarise(rows: list[dict]) -> dict:
    """(task, budget, method) -> {seed: C2ST mean} and mean training / sampling seconds."""
    out: dict = {}
    for r in rows:
        if r.get("applicable", True):
            out.setdefault((r["task"], r["budget"], r["method"]), []).append(r)
    return {k: {"c2st": {r["seed"]: r["c2st_mean"] for r in v},
                "setups": len({r["setup"] for r in v}),
                "train": statistics.fmean(r["train_seconds"] for r in v),
                "sample": statistics.fmean(r["sample_seconds_per_10k"] for r in v)} for k, v in out.items()}


def cell_table(rows: list[dict], title: str, note: str) -> list[str]:
    summary = summarise(rows)
    lines = [f"## {title}", "", note, "",
             "| task | simulations | method | C2ST mean | seed range | per seed | vs sbi_npe (same seeds) | train (s) | 10k draws (s) | code states |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    counts: dict = {}
    order = {t: i for i, t in enumerate(TASKS)}
    for (task, budget, method), s in sorted(summary.items(), key=lambda kv: (
            order.get(kv[0][0], 99), kv[0][1], METHODS.index(method_variant(kv[0][2])[0]), kv[0][2])):
        peer = summary.get((task, budget, PEER))
        common = sorted(set(s["c2st"]) & set(peer["c2st"])) if peer else []
        if method == PEER or not common:
            against = "—"
        else:
            ours, theirs = [s["c2st"][k] for k in common], [peer["c2st"][k] for k in common]
            v = verdict(ours, theirs)
            counts.setdefault(method, {}).setdefault(v, 0)
            counts[method][v] += 1
            against = f"{statistics.fmean(ours) - statistics.fmean(theirs):+.3f} {v}"
        values = list(s["c2st"].values())
        per = " ".join(f"{s['c2st'][k]:.3f} ({k})" for k in sorted(s["c2st"]))
        lines.append(f"| {task} | {budget} | {method} | {statistics.fmean(values):.3f} | "
                     f"{min(values):.3f}–{max(values):.3f} | {per} | {against} | {s['train']:.1f} | "
                     f"{s['sample']:.2f} | {s['setups']} |")
    lines += ["", "Against sbi_npe: " + "; ".join(
        f"{m}: " + ", ".join(f"{n} {v}" for v, n in sorted(c.items())) for m, c in counts.items()), ""]
    return lines


def seeds_text(seeds) -> str:
    return ", ".join(map(str, sorted(seeds)))


def missing(rows: list[dict], budgets=(1000, 10000)) -> list[str]:
    """The held-out cells of the full grid without a row: one line per task and budget."""
    have = {(r["task"], r["budget"], r["method"], r["seed"]) for r in rows}
    out = []
    for task in TASKS:
        for budget in budgets:
            gaps = {m: [s for s in CELLS["heldout"][1] if (task, budget, m, s) not in have] for m in METHODS}
            gaps = {m: s for m, s in gaps.items() if s}
            if gaps:
                out.append(f"- {task} {budget}: " + "; ".join(f"{m} seed {seeds_text(s)}" for m, s in gaps.items()))
    return out or ["- nothing: every task, budget, method and seed is in."]


def write_table(results: dict, path: Path) -> None:
    runs = results["runs"]
    heldout = [r for r in runs if r["cells"] == "heldout"]
    dev = [r for r in runs if r["cells"] == "dev"]
    custom = [r for r in runs if r["cells"] == "custom"]
    commits = sorted({r["code"]["commit"][:10] for r in runs})
    same_std = {}  # (task, budget) -> the seeds whose simulations ours standardises by plain z-scoring
    for r in runs:
        if r["method"] == "sbi_npe_std" and not r["applicable"]:
            same_std.setdefault((r["task"], r["budget"]), set()).add(r["seed"])
    lines = ["# sbibm suite: C2ST against sbibm's reference posteriors (0.5 is perfect), seconds", "",
             *produced_by("benchmarks/sbibm_suite.py", (r["command"] for r in runs)),
             f"Commits: {', '.join(commits)}; versions: {runs[-1]['versions'] if runs else {}}. "
             "Each row of the JSON holds its commit, code trees, simulation hash and configuration.", "",
             "C2ST mean is over the cells' observations and then over simulation seeds; *seed range* is the "
             "smallest and largest per-seed mean; *per seed* gives each seed's mean (seed in brackets). *vs sbi_npe* "
             "compares on the seeds both have: the difference of the means and a verdict — ahead / behind where "
             "the seed ranges do not overlap, undecided where they do or fewer than three seeds are in. Training seconds are per "
             "fit on one thread; rows that ran beside another process are inflated by up to 2×. *Code states* counts the "
             "distinct setups (library tree, simulators, versions) among a line's seeds: 1 means all its seeds ran the "
             "same code; more means some seeds predate a change and are due a re-run.", "",
             "sbi_npe_std is sbi's NPE-NSF on our input standardisation; it is absent where ours is plain "
             "z-scoring, which is decided on each seed's simulations ("
             f"{', '.join(f'{t} {b} seed {seeds_text(s)}' for (t, b), s in sorted(same_std.items())) or 'none measured'}).",
             ""]
    lines += ["## Not measured yet (held-out cells)", "", *missing(heldout), ""]
    if heldout:
        lines += cell_table(heldout, "Held-out cells: observations 6–10, simulation seeds 1, 2, 3",
                            "The reported numbers: no setting was chosen on these cells.")
    if dev:
        lines += cell_table(dev, "Development cells: observations 1–5, simulation seed 0",
                            "The cells the defaults were tuned on; shown for reference, not for claims.")
    if custom:
        lines += cell_table(custom, "Other cells", "Runs with --observations or --seeds: not part of the protocol.")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
