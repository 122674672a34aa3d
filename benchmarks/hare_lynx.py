"""Real data: ``implicitbayes run hare_lynx`` against the NUTS reference, for the default settings
and the other methods beside them.

Each row is one run of the command (``implicitbayes.cli.main``, as a user types it) in a fresh
directory: its wall time, and from its ``reference.json`` the C2ST against the reference draws
and each parameter's posterior mean (offset in reference sds) and sd (ratio to the reference's).
The target (a run meets it or not): with at most 2·10⁴ simulations, every mean within 0.3
reference sd and every sd within 25 % of the reference's, in at most 10 minutes on 2 CPU cores.

For a run with a learned likelihood (NLE), the row also separates learning from sampling: over
the reference draws θ_i, d_i = log q(x_o | θ_i) − log p(x_o | θ_i), the learned log-likelihood
of the table minus the exact log-normal one. Its sd is how far the learned likelihood is from
the exact one where the posterior lives, and the reference reweighted by exp(d_i) is the
posterior the learned likelihood defines, free of MCMC error: its worst mean offset against the
run's says whether the sampler or the likelihood misses the target.

    python benchmarks/hare_lynx.py                      # the default run, seed 0
    python benchmarks/hare_lynx.py --configs default,nle_4_rounds,implicit_vi,npe --seeds 0
    python benchmarks/hare_lynx.py --table
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import (add_store_arguments, command_line, committed_code_state, key, locked_results,  # noqa: E402
                        parse_range, produced_by, results_path, store, versions)

# the command line of each configuration after `implicitbayes run hare_lynx`
CONFIGS = {
    "default": [],
    "nle_4_rounds": ["--rounds", "4"],
    # the learned likelihood trained at batch 200 and learning rate 1e-3 (NLE's default: 50 and 5e-4)
    "nle_batch_200": ["--method-option", "training={'batch_size': 200, 'lr': 1e-3, 'max_steps': 20000}"],
    # the learned likelihood validated and kept as an exponential moving average of its weights
    "nle_ema": ["--method-option", "training={'ema': 0.999}"],
    # the learned likelihood as the mixture of three flows trained together (NLE's ensemble)
    "nle_ensemble_3": ["--method-option", "ensemble=3"],
    # the learned likelihood's MADE layers 128 wide (NLE's default: 50, narrower than the 42 data)
    "nle_hidden_128": ["--method-option", "hidden_features=(128, 128)"],
    "implicit_vi": ["--method", "implicit-vi", "--rounds", "4"],
    "implicit_vi_8_rounds": ["--method", "implicit-vi", "--rounds", "8"],
    "implicit_vi_amortized": ["--method", "implicit-vi", "--rounds", "1"],
    "npe": ["--method", "npe", "--rounds", "4"],
    "npe_amortized": ["--method", "npe", "--rounds", "1"],
}
# Rows of a configuration the library no longer runs, kept under a name of their own
# (``relabelled_from`` holds the one they ran under; their command is the one that ran). The
# default's rows run as ``nle_linear_residual`` (``--method-option linear_residual=True``) before
# that became the default carry ``relabelled_from`` too.
RETIRED = {"default_warm": "the default before NLE's rounds became fresh fits on the simulations in the proposing "
                           "posterior's region: each round warm-started from the last, on all simulations so far",
           "default_auto_residual": "the default before the run kept NLE's linear residual in every round: NLE's "
                                    "`linear_residual=\"auto\"`, which drops it where the residuals do not look Gaussian "
                                    "(the region's log-pelts do not, by their excess kurtosis of 1.2–2.3 in the late rounds)"}
ORDER = list(CONFIGS) + list(RETIRED)
MEAN_TOLERANCE, SD_TOLERANCE, SECONDS, SIMULATIONS = 0.3, 0.25, 600, 20_000


def run_one(config: str, seed: int) -> dict:
    from implicitbayes.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        argv = ["run", "hare_lynx", *CONFIGS[config], "--seed", str(seed), "--quiet", "--out", f"{tmp}/run"]
        t0 = time.perf_counter()
        code = cli(argv)
        seconds = time.perf_counter() - t0
        if code != 0:
            raise SystemExit(f"{' '.join(argv)} exited with {code}")
        record = json.loads(Path(tmp, "run", "reference.json").read_text())
        learned = likelihood_check(Path(tmp, "run", "posterior.safetensors"))
        settings = json.loads(Path(tmp, "run", "run.json").read_text())
        summary = Path(tmp, "run", "summary.txt").read_text()
    params = record["parameters"]
    worst_mean = max(abs(p["mean_off_in_reference_sd"]) for p in params.values())
    worst_sd = max(abs(p["sd_ratio"] - 1) for p in params.values())
    met = (worst_mean <= MEAN_TOLERANCE and worst_sd <= SD_TOLERANCE and seconds <= SECONDS
           and settings["simulations"] <= SIMULATIONS)
    misspecification = next((line for line in summary.splitlines() if line.startswith("misspecification")), None)
    return {"config": config, "seed": seed, "argv": argv[:-2], "settings": settings, "seconds": seconds,
            "c2st": record["c2st"], "worst_mean_off": worst_mean, "worst_sd_error": worst_sd, "met": met,
            "parameters": params, "misspecification": misspecification, "likelihood": learned}


def likelihood_check(path: Path) -> dict | None:
    """The learned log-likelihood of the table against the exact one over the reference draws
    (module docstring); None for a posterior without one."""
    import torch

    import implicitbayes as ib
    import simulators

    task = simulators.get("hare_lynx")
    posterior = ib.load(path, model=task.model)
    if not hasattr(posterior, "log_likelihood"):
        return None
    ref, x = task.reference_samples(1).double(), task.observation(1).double()
    with torch.no_grad():
        exact = task.likelihood(ref).log_prob(x)
        learned = torch.cat([posterior.log_likelihood(x.expand(len(rows), *x.shape).float(), rows.float())
                             for rows in ref.split(2000)]).double()
    d = learned - exact
    w = torch.softmax(d, 0)
    mean = (w[:, None] * ref).sum(0)
    sd = (w[:, None] * (ref - mean) ** 2).sum(0).sqrt()
    offsets = ((mean - ref.mean(0)) / ref.std(0)).tolist()
    ratios = (sd / ref.std(0)).tolist()
    return {"error_sd": float(d.std()), "effective_draws": float(1 / (w ** 2).sum()),
            "reweighted_worst_mean_off": max(map(abs, offsets)), "reweighted_worst_sd_error": max(abs(r - 1) for r in ratios),
            "reweighted": {name: {"mean_off_in_reference_sd": o, "sd_ratio": r}
                           for name, o, r in zip(task.parameter_names, offsets, ratios)}}


def write_table(results: dict, path: Path) -> None:
    runs = sorted(results["runs"], key=lambda r: (ORDER.index(r["config"]), r["seed"]))
    lines = ["# Real data: hare and lynx, likelihood-free against NUTS", "",
             *produced_by("benchmarks/hare_lynx.py", (r["command"] for r in runs)),
             f"Target: at most {SIMULATIONS} simulations, every posterior mean within {MEAN_TOLERANCE} reference sd, "
             f"every sd within {int(SD_TOLERANCE * 100)} % of the reference's, at most {SECONDS // 60} minutes on "
             "2 CPU cores. The reference: `benchmarks/results/hare_lynx_reference.json`. *code*: the commit a row "
             "ran; a row that predates a change of the defaults ran what its commit had.",
             *[f"`{name}` ({', '.join(sorted({r['relabelled_from'] for r in runs if r['config'] == name}))} in its "
               f"command): {what}; no longer run." for name, what in RETIRED.items()
               if any(r["config"] == name for r in runs)],
             *[f"`{name}` rows run as `{old}` (in their command): the computation `{name}` runs now, measured "
               "before it became the default." for name, old in sorted({(r["config"], r["relabelled_from"]) for r in runs
                                                                       if r.get("relabelled_from") and r["config"] in CONFIGS})],
             "",
             "| configuration | command | simulations | rounds | seed | seconds | C2ST | worst mean offset (ref sd) "
             "| worst sd error | target | code |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        s = r["settings"]
        lines.append(f"| {r['config']} | `implicitbayes {' '.join(r['argv'])}` | {s['simulations']} | {s['rounds']} | "
                     f"{r['seed']} | {r['seconds']:.0f} | {r['c2st']:.3f} | {r['worst_mean_off']:.2f} | "
                     f"{100 * r['worst_sd_error']:.0f} % | {'met' if r['met'] else 'not met'} | "
                     f"{r['code']['commit'][:7]} |")
    lines += ["", "Per parameter (mean offset in reference sds / sd ratio):", "",
              "| configuration | seed | " + " | ".join(runs[0]["parameters"]) + " |",
              "| --- | --- | " + " | ".join("---" for _ in runs[0]["parameters"]) + " |"] if runs else []
    for r in runs:
        lines.append(f"| {r['config']} | {r['seed']} | " + " | ".join(
            f"{p['mean_off_in_reference_sd']:+.2f} / {p['sd_ratio']:.2f}" for p in r["parameters"].values()) + " |")
    learned = [r for r in runs if r.get("likelihood")]
    if learned:
        lines += ["", "The learned likelihood against the exact one (module docstring): the sd of their difference "
                  "over the reference draws, and the reference reweighted to the learned likelihood (no MCMC) beside "
                  "the run:", "",
                  "| configuration | seed | sd of log q − log p (nats) | reweighted: worst mean offset | reweighted: "
                  "worst sd error | run: worst mean offset |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['config']} | {r['seed']} | {r['likelihood']['error_sd']:.2f} | "
                  f"{r['likelihood']['reweighted_worst_mean_off']:.2f} | "
                  f"{100 * r['likelihood']['reweighted_worst_sd_error']:.0f} % | {r['worst_mean_off']:.2f} |"
                  for r in learned]
    checks = [r for r in runs if r.get("misspecification")]
    if checks:
        lines += ["", "The misspecification check of each run on the data:", ""]
        lines += [f"- {r['config']} (seed {r['seed']}): {r['misspecification']}" for r in checks]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="default")
    p.add_argument("--seeds", default="0")
    add_store_arguments(p)
    args = p.parse_args()
    path = results_path(args, "hare_lynx")
    if args.table:
        write_table(json.loads(path.read_text()), path.with_suffix(".md"))
        return
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; choose from {list(CONFIGS)}")
    code, vers = committed_code_state(args, "benchmarks/hare_lynx.py"), versions()
    command = command_line("benchmarks/hare_lynx.py")
    existing = json.loads(path.read_text())["runs"] if path.exists() else []
    for seed in parse_range(args.seeds):
        for config in configs:
            setup = key(config, CONFIGS[config], code["implicitbayes_tree"], code["simulators_tree"], vers["torch"])
            if any(r["config"] == config and r["seed"] == seed and r["setup"] == setup and not r["code"]["dirty"]
                   for r in existing):
                continue
            row = {**run_one(config, seed), "setup": setup, "code": code, "versions": vers, "command": command}
            store(path, lambda r: (r["config"], r["seed"]), row)
            print(f"{config:22s} seed {seed}: C2ST {row['c2st']:.3f}, worst mean offset {row['worst_mean_off']:.2f} sd, "
                  f"worst sd error {100 * row['worst_sd_error']:.0f} %, {row['seconds']:.0f} s: "
                  f"{'met' if row['met'] else 'not met'}", flush=True)
    with locked_results(path) as results:
        write_table(results, path.with_suffix(".md"))


if __name__ == "__main__":
    main()
