"""The ``implicitbayes`` command: list simulators, run a whole analysis, simulate to a resumable
store, run the demo.

Errors a user can cause (unknown simulator, bad option, unavailable device) are printed as
one-line messages with exit status 2, not tracebacks.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option: expected KEY=VALUE, got {pair!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _executor(spec: str | None):
    """``local`` | ``processes[=N]`` | ``dask[=ADDRESS]`` → (executor or None, closer)."""
    if spec in (None, "local"):
        return None, lambda: None
    kind, _, arg = spec.partition("=")
    if kind == "processes":
        import concurrent.futures as cf
        import multiprocessing as mp

        ex = cf.ProcessPoolExecutor(max_workers=int(arg) if arg else None, mp_context=mp.get_context("spawn"))
        return ex, ex.shutdown
    if kind == "dask":
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError as e:
            raise ValueError("--executor dask needs dask.distributed: pip install 'implicitbayes[dask]'") from e
        if arg:
            try:
                client = Client(arg, timeout="5s")
            except (OSError, TimeoutError) as e:
                raise ValueError(f"--executor: no Dask scheduler answers at {arg!r}: {e}") from e
            return client.get_executor(), client.close
        cluster = LocalCluster(processes=True, threads_per_worker=1)
        client = Client(cluster)
        return client.get_executor(), lambda: (client.close(), cluster.close())
    raise ValueError(f"--executor: expected local, processes[=N] or dask[=ADDRESS], got {spec!r}")


def _cmd_list(args) -> int:
    import simulators

    for name in simulators.names():
        try:
            description = simulators.description(name)
        except Exception as e:  # a broken third-party entry point must not hide the others
            description = f"(cannot load: {e})"
        print(f"{name:28s} {description}")
    return 0


def _cmd_simulate(args) -> int:
    import implicitbayes as ib
    import simulators

    task = simulators.get(args.simulator, **_options(args.option))
    out = Path(args.out)
    executor, close = _executor(args.executor)
    try:
        data = ib.simulate(task.model, args.simulations, observed=list(task.observed), batch_size=args.batch_size,
                           seed=args.seed, device=args.device, executor=executor, store=out / "store")
    finally:
        close()
    data.save(out / "simulations.safetensors")
    print(f"{data}\nwritten to {out / 'simulations.safetensors'}")
    return 0


METHODS = {"implicit-vi": "ImplicitVI", "npe": "NPE", "nre": "NRE", "lfvi": "LFVI", "abc": "ABC"}
_RUN_MARKER = "run.json"
_OWN = ("run.json", "store", "checkpoint", "checkpoint.generator", "checkpoint.critic", "posterior.safetensors",
        "inference_data.nc", "pair.png", "ppc.png", "sbc.png", "coverage.png", "training.png", "summary.txt")


def _read_data_file(path: str, shape: tuple[int, ...]):
    import numpy as np
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--data: no file {path!r}")
    try:
        values = np.loadtxt(p, delimiter=",", ndmin=1, dtype=float)
    except ValueError:
        try:
            values = np.loadtxt(p, delimiter=",", ndmin=1, dtype=float, skiprows=1)  # a header line
        except ValueError as e:
            raise ValueError(f"--data: {path} is not a CSV of numbers: {e}") from e
    size = int(np.prod(shape)) if shape else 1
    if values.size != size:
        raise ValueError(f"--data: {path} holds {values.size} numbers (shape {values.shape}), but the simulator's "
                         f"observation has shape {tuple(shape)} ({size} numbers)")
    if not np.isfinite(values).all():
        raise ValueError(f"--data: {path} contains NaN or inf")
    return torch.as_tensor(values.reshape(shape), dtype=torch.get_default_dtype())


def _prepare_out(out: Path, config: dict, force: bool) -> None:
    import json
    import shutil

    marker = out / _RUN_MARKER
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a directory")
    if marker.exists():
        previous = json.loads(marker.read_text())
        if previous != config:
            if not force:
                changed = sorted(k for k in set(config) | set(previous) if config.get(k) != previous.get(k))
                raise ValueError(f"--out: {out} holds a run with other settings ({', '.join(changed)}); use another "
                                 "--out, or --force to replace that run")
            for name in _OWN:
                target = out / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    elif out.exists() and any(out.iterdir()) and not force:
        raise ValueError(f"--out: {out} is not empty and is not an implicitbayes run directory; use another --out, "
                         "or --force to write into it")
    out.mkdir(parents=True, exist_ok=True)
    probe = out / ".write-test"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"--out: cannot write to {out}: {e}") from e
    marker.write_text(json.dumps(config, indent=1))


def _cmd_run(args) -> int:

    import matplotlib

    matplotlib.use("Agg")
    import arviz as az
    import matplotlib.pyplot as plt
    import torch

    import implicitbayes as ib
    import simulators
    from implicitbayes.diagnostics import plots
    from implicitbayes.simulate import resolve_device

    t_start = time.perf_counter()
    if args.method not in METHODS:
        raise ValueError(f"--method: expected one of {', '.join(METHODS)}, got {args.method!r}")
    if args.simulations < 1:
        raise ValueError(f"--simulations: expected a positive integer, got {args.simulations}")
    device = resolve_device(args.device)
    sim_options, method_options = _options(args.option), _options(args.method_option)
    task = simulators.get(args.simulator, **sim_options)
    observed = list(task.observed)
    shapes = {"x": tuple(task.x_shape)}
    if args.data is not None:
        x_obs, truth, label = _read_data_file(args.data, shapes[observed[0]]), None, f"data {args.data}"
    else:
        k = args.observation or 1
        x_obs, label = task.observation(k), f"observation {k}"
        truth = task.true_parameters(k)
        truth = truth if isinstance(truth, dict) else {"theta": truth}
    out = Path(args.out)
    config = {"simulator": args.simulator, "simulator_options": sim_options, "method": args.method,
              "method_options": method_options, "simulations": args.simulations, "seed": args.seed,
              "observation": args.observation if args.data is None else None,
              "data": str(Path(args.data).resolve()) if args.data else None}
    _prepare_out(out, config, args.force)
    method = getattr(ib, METHODS[args.method])(task.model, observed=observed, device=device, **method_options)
    amortized = args.method in ("implicit-vi", "npe", "nre")
    post_path = out / "posterior.safetensors"
    data = None
    if args.method != "lfvi":
        executor, close = _executor(args.executor)
        try:
            print(f"simulating {args.simulations} × {args.simulator} into {out / 'store'} (resumable)")
            data = ib.simulate(task.model, args.simulations, observed=observed, seed=args.seed, device=device,
                               executor=executor, store=out / "store", progress=not args.quiet)
        finally:
            close()
    if post_path.exists():
        print(f"loading the trained posterior from {post_path}")
        post = ib.load(post_path, device=device, model=task.model)
    else:
        print(f"training {METHODS[args.method]} (checkpoints in {out}; Ctrl-C and re-run to resume)")
        fit = dict(seed=args.seed, progress=not args.quiet, max_steps=args.max_steps, time_budget=args.time_budget)
        if amortized:
            post = method.fit(data, checkpoint=str(out / "checkpoint"), **fit)
        elif args.method == "lfvi":
            post = method.fit(observation=x_obs, checkpoint=str(out / "checkpoint"), **fit)
        else:
            post = method.fit(data, observation=x_obs, **fit)
        post.save(post_path)
        if any("history" in (v if isinstance(v, dict) else {}) for v in [post.training_summary,
                                                                         *post.training_summary.values()]):
            plots.plot_training(post.training_summary).savefig(out / "training.png", dpi=100)
            plt.close("all")
    post.set_default_observed(x_obs if len(observed) > 1 else {observed[0]: x_obs})
    obs = {observed[0]: x_obs}
    idata = ib.to_inference_data(post, obs, num_samples=args.num_samples, seed=args.seed)
    partial = out / ".inference_data.nc.partial"  # written whole, then renamed: readers never see half a file
    idata.to_netcdf(str(partial))
    os.replace(partial, out / "inference_data.nc")
    draws = {k: torch.as_tensor(idata.posterior[k].values).reshape((-1,) + idata.posterior[k].shape[2:])
             for k in post.space.names}
    fig = plots.plot_pair(draws, truth, log=args.simulator.startswith("lotka_volterra_") and
                          args.simulator != "lotka_volterra_population")
    fig.savefig(out / "pair.png", dpi=100)
    # posterior predictive: trajectories where the task has them, else the observation's entries
    if hasattr(task, "trajectories") and args.data is None:
        theta = draws["theta"][:200]
        series = task.trajectories(theta, seed=args.seed)
        fig = plots.plot_ppc_series(task.observed_trajectory(args.observation or 1), series,
                                    times=task.record_times, names=["predators X", "prey Y"])
    else:
        pred = torch.as_tensor(idata.posterior_predictive[observed[0]].values)
        pred = pred.reshape((-1,) + tuple(x_obs.shape))
        fig = plots.plot_ppc_series(x_obs.reshape(1, -1), pred.reshape(pred.shape[0], 1, -1), names=[observed[0]])
    fig.savefig(out / "ppc.png", dpi=100)
    plt.close("all")
    if args.sbc:
        if not amortized:
            print("--sbc: skipped; SBC needs an amortized posterior (implicit-vi, npe, nre)")
        else:
            from implicitbayes.diagnostics import coverage_from_draws, sbc_ranks
            from implicitbayes.diagnostics.calibration import calibration_draws

            theta, cal, names = calibration_draws(post, task.model, observed=observed, num_datasets=args.sbc,
                                                  num_samples=99, seed=args.seed + 7, progress=not args.quiet)
            result = sbc_ranks(theta, cal, names=names)
            result.plot().savefig(out / "sbc.png", dpi=100)
            coverage_from_draws(theta, cal).plot().savefig(out / "coverage.png", dpi=100)
            plt.close("all")
            print(f"SBC over {args.sbc} datasets: Bonferroni p = {result.p_value:.3g} "
                  f"({'passed' if result.passed else 'FAILED'}); plots sbc.png, coverage.png")
    summary = az.summary(idata, kind="stats", hdi_prob=0.95)
    lines = [f"{args.simulator}, {label}: {METHODS[args.method]} on {args.simulations} simulations, "
             f"{args.num_samples} posterior draws", summary.to_string()]
    if truth is not None:
        inside, total = 0, 0
        for name, value in truth.items():
            d = draws[name].reshape(draws[name].shape[0], -1)
            lo, hi = d.quantile(0.025, 0), d.quantile(0.975, 0)
            v = torch.as_tensor(value).reshape(-1)
            inside += int(((v >= lo) & (v <= hi)).sum())
            total += v.numel()
        lines.append(f"true parameters inside the central 95 % intervals: {inside}/{total}")
    lines.append(f"wall time {time.perf_counter() - t_start:.1f} s; outputs in {out}: posterior.safetensors, "
                 "inference_data.nc, pair.png, ppc.png" + (", sbc.png, coverage.png" if args.sbc and amortized else ""))
    text = "\n".join(lines)
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    return 0



def _cmd_demo(args) -> int:
    """Simulate the Lotka–Volterra SDE at θ*, plot trajectories, print a one-line summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from simulators.lotka_volterra import THETA_STAR, lv_sde, lv_summaries

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = args.simulations
    theta = torch.tensor(THETA_STAR).expand(n, 4)
    t0 = time.perf_counter()
    paths = lv_sde(theta, generator=torch.Generator().manual_seed(args.seed))
    seconds = time.perf_counter() - t0
    times = torch.arange(paths.shape[-1]) * 0.2
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, i, label, colour in ((axes[0], 0, "predators X", "tab:red"), (axes[1], 1, "prey Y", "tab:blue")):
        lo, med, hi = torch.quantile(paths[:, i], torch.tensor([0.05, 0.5, 0.95]), dim=0)
        ax.fill_between(times, lo, hi, color=colour, alpha=0.2, label="5–95 %")
        ax.plot(times, med, color=colour, label="median")
        for k in range(3):
            ax.plot(times, paths[k, i], color=colour, lw=0.6, alpha=0.7)
        ax.set(xlabel="time", ylabel=label, title=f"{label}, {n} paths at θ*")
        ax.legend()
    for k in range(5):
        axes[2].plot(paths[k, 1], paths[k, 0], lw=0.6)
    axes[2].set(xlabel="prey Y", ylabel="predators X", title="phase plane (5 paths)")
    fig.tight_layout()
    png = out / "lotka_volterra_sde.png"
    fig.savefig(png, dpi=110)
    extinct = (paths[:, 0, -1] == 0).float().mean().item()
    s = lv_summaries(paths).mean(0)
    print(f"lotka_volterra_sde at θ*={THETA_STAR}: {n} paths × {paths.shape[-1]} records in {seconds:.2f} s "
          f"({n * 3000 / seconds:.3g} path-steps/s); predators extinct by T=30 in {100 * extinct:.1f} %; "
          f"mean X {s[0]:.1f}, mean Y {s[1]:.1f}; plot: {png}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="implicitbayes", description="Likelihood-free Bayesian inference for Pyro simulators.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the registered simulators").set_defaults(func=_cmd_list)
    s = sub.add_parser("simulate", help="simulate a registered simulator into a resumable store")
    s.add_argument("simulator")
    s.add_argument("-n", "--simulations", type=int, default=10_000)
    s.add_argument("--out", default="simulations", help="directory (store/ and simulations.safetensors)")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None)
    s.add_argument("--executor", default="local", help="local | processes[=N] | dask[=ADDRESS]")
    s.add_argument("--option", action="append", metavar="KEY=VALUE", help="simulator option, repeatable")
    s.set_defaults(func=_cmd_simulate)
    r = sub.add_parser("run", help="simulate, train, and write posterior, ArviZ data and plots (resumable)")
    r.add_argument("simulator", help="a registered simulator (see `implicitbayes list`)")
    r.add_argument("--method", default="implicit-vi", help="implicit-vi | npe | nre | lfvi | abc (default implicit-vi)")
    r.add_argument("-n", "--simulations", type=int, default=10_000)
    g = r.add_mutually_exclusive_group()
    g.add_argument("--observation", type=int, default=None, help="the simulator's observation K (default 1)")
    g.add_argument("--data", default=None, help="a CSV file with the observation (its numbers, in the site's shape)")
    r.add_argument("--device", default=None, help="cpu | cuda[:i]")
    r.add_argument("--executor", default="local", help="local | processes[=N] | dask[=ADDRESS], for simulation")
    r.add_argument("--out", default=None, help="run directory (default results/<simulator>-<method>); re-running "
                   "with the same one resumes")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--num-samples", type=int, default=1000, help="posterior draws written and summarised")
    r.add_argument("--max-steps", type=int, default=None)
    r.add_argument("--time-budget", type=float, default=None, help="seconds of training at most")
    r.add_argument("--sbc", type=int, nargs="?", const=100, default=0, metavar="DATASETS",
                   help="also run SBC and expected coverage on DATASETS simulated datasets (default 100)")
    r.add_argument("--option", action="append", metavar="KEY=VALUE", help="simulator option, repeatable")
    r.add_argument("--method-option", action="append", metavar="KEY=VALUE", help="method option, repeatable")
    r.add_argument("--force", action="store_true", help="write into a directory that holds something else")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=_cmd_run)
    d = sub.add_parser("demo", help="Lotka–Volterra SDE at θ*: trajectory plot and summary")
    d.add_argument("--out", default="results/demo")
    d.add_argument("-n", "--simulations", type=int, default=1000)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "command", None) == "run" and args.out is None:
        args.out = f"results/{args.simulator}-{args.method}"
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"implicitbayes {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the store", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
