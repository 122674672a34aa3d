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


def _options(pairs: list[str], flag: str = "--option") -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag}: expected KEY=VALUE, got {pair!r}")
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


METHODS = {"implicit-vi": "ImplicitVI", "npe": "NPE", "nre": "NRE", "nle": "NLE", "lfvi": "LFVI", "abc": "ABC"}
# `run`'s settings where neither the command line nor the task (its ``run_defaults``) sets them
RUN_DEFAULTS = {"method": "implicit-vi", "simulations": 10_000, "rounds": 1, "num_samples": 1000}
_RUN_MARKER = "run.json"
_OWN = ("run.json", "store", "checkpoint", "checkpoint.generator", "checkpoint.critic", "posterior.safetensors",
        "inference_data.nc", "pair.png", "ppc.png", "sbc.png", "coverage.png", "training.png", "summary.txt",
        "sequential", "reference.json")


def _read_data_file(path: str, shape: tuple[int, ...], site: str):
    """The observation of ``site`` from a CSV (numbers; a header line and ``#`` comments allowed)
    or a ``.npy`` file, checked against the site's shape and for NaN or inf."""
    import numpy as np
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--data: no file {path!r}")
    if p.suffix == ".npy":
        try:
            values = np.load(p, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"--data: {path} is not a .npy array of numbers: {e}") from e
        if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
            raise ValueError(f"--data: {path} holds {values.dtype} values, expected real numbers")
        values = values.astype(float)
    else:
        try:
            values = np.loadtxt(p, delimiter=",", ndmin=1, dtype=float)
        except ValueError:
            try:
                values = np.loadtxt(p, delimiter=",", ndmin=1, dtype=float, skiprows=1)  # a header line
            except ValueError as e:
                raise ValueError(f"--data: {path} is not a CSV of numbers: {e}") from e
    size = int(np.prod(shape)) if shape else 1
    if values.size != size:
        raise ValueError(f"--data: {path} holds {values.size} numbers (shape {values.shape}), but the observed site "
                         f"{site!r} has shape {tuple(shape)} ({size} numbers)")
    if not np.isfinite(values).all():
        raise ValueError(f"--data: {path} contains NaN or inf")
    return torch.as_tensor(values.reshape(shape), dtype=torch.get_default_dtype())


def _load_model(target: str):
    """``path/to/file.py:function`` or ``module:function`` → the function (a Pyro model)."""
    import importlib.util
    from importlib import import_module

    where, _, name = target.rpartition(":")
    if not where or not all(part.isidentifier() for part in name.split(".")):
        raise ValueError(f"TARGET: expected a simulator name, FILE.py:FUNCTION or MODULE:FUNCTION, got {target!r}")
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"TARGET: no file {where!r}")
        spec = importlib.util.spec_from_file_location(f"implicitbayes_user_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        loader = spec.loader.exec_module
    else:
        module, loader = None, None
    try:
        if loader is not None:
            sys.modules[spec.name] = module  # so that what the file defines can be found by name (pickling)
            loader(module)
        else:
            module = import_module(where)
    except ModuleNotFoundError as e:
        raise ValueError(f"TARGET: cannot import {where!r}: {e}") from e
    except Exception as e:  # the user's file itself fails
        raise ValueError(f"TARGET: importing {where!r} failed: {type(e).__name__}: {e}") from e
    obj = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"TARGET: {where!r} has no function {name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"TARGET: {target!r} is a {type(obj).__name__}, not a function (a Pyro model)")
    return obj


def _model_site(model, target: str, observed: str | None) -> tuple[str, tuple[int, ...]]:
    """Run the model once (one prior predictive draw) and find the observed site and its shape:
    ``observed`` if given, else the model's one ``ib.Implicit`` site."""
    import pyro

    from implicitbayes.distributions import implicit_of

    try:
        with pyro.poutine.block():
            trace = pyro.poutine.trace(model).get_trace()
    except Exception as e:
        raise ValueError(f"TARGET: running {target!r} as a Pyro model without arguments failed: "
                         f"{type(e).__name__}: {e}") from e
    sites = [n for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]]
    if not sites:
        raise ValueError(f"TARGET: {target!r} is not a Pyro model: it draws no pyro.sample sites")
    def is_implicit(name: str) -> bool:
        try:
            implicit_of(trace.nodes[name]["fn"], name)
        except TypeError:
            return False
        return True

    implicit = [n for n in sites if is_implicit(n)]
    if observed is None:
        if len(implicit) != 1:
            raise ValueError(f"--observed: name the observed site of {target!r}; its ib.Implicit sites are "
                             f"{implicit or 'none'} and its sample sites {sites}")
        observed = implicit[0]
    elif observed not in sites:
        raise ValueError(f"--observed: {target!r} has no sample site {observed!r}; its sample sites are {sites}")
    if len(sites) == 1:
        raise ValueError(f"TARGET: {target!r} has no latent site besides the observed {observed!r}: nothing to infer")
    return observed, tuple(trace.nodes[observed]["value"].shape)


def _prepare_out(out: Path, config: dict, force: bool) -> None:
    import json
    import shutil

    marker = out / _RUN_MARKER
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a directory")
    if marker.exists():
        previous = json.loads(marker.read_text())
        # a run directory written before `rounds` and `observed` were recorded ran amortized on the default site
        previous = {"rounds": 1, "observed": config.get("observed"), **previous}
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


def _resolve_run(args):
    """TARGET and the options that depend on it → (task or None, model, observed sites, observed
    value, true parameters or None, label). Every check runs before anything is written."""
    import simulators

    sim_options = _options(args.option)
    if ":" not in args.simulator:
        task = simulators.get(args.simulator, **sim_options)
        model, observed = task.model, list(task.observed)
        if args.observed is not None and args.observed != observed[0]:
            raise ValueError(f"--observed: {args.simulator} observes {observed}, not {args.observed!r}")
        shape = tuple(task.x_shape)
        defaults = {**RUN_DEFAULTS, **getattr(task, "run_defaults", {})}
        # the task's method options go with its own method only
        default_options = defaults.pop("method_options", {})
        if args.method not in (None, defaults["method"]):
            default_options = {}
    else:
        if sim_options:
            raise ValueError("--option: simulator options apply to registered simulators; a model given as "
                             f"{args.simulator!r} takes none")
        if args.observation is not None:
            raise ValueError(f"--observation: {args.simulator!r} has no stored observations; pass the data with --data")
        if args.data is None:
            raise ValueError(f"--data: a model given as FILE.py:FUNCTION or MODULE:FUNCTION ({args.simulator!r}) "
                             "has no stored observations; pass its data with --data (CSV or .npy)")
        task, model = None, _load_model(args.simulator)
        site, shape = _model_site(model, args.simulator, args.observed)
        observed, defaults, default_options = [site], dict(RUN_DEFAULTS), {}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.method not in METHODS:
        raise ValueError(f"--method: expected one of {', '.join(METHODS)}, got {args.method!r}")
    for name in ("simulations", "rounds", "num_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.rounds > 1:
        for name in ("max_steps", "time_budget"):
            if getattr(args, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')}: applies to one fit; with --rounds {args.rounds} set "
                                 f"it for every round with --method-option training={{'{name}': ...}}")
        if args.executor not in (None, "local"):
            raise ValueError(f"--executor: --rounds {args.rounds} simulates each round in this process; run "
                             "amortized (--rounds 1) to simulate on an executor")
    if args.data is not None:
        x_obs, truth, label = _read_data_file(args.data, shape, observed[0]), None, f"data {args.data}"
    else:
        k = args.observation or 1
        x_obs, label = task.observation(k), f"observation {k}"
        truth = task.true_parameters(k)
        truth = None if truth is None else truth if isinstance(truth, dict) else {"theta": truth}
    if args.out is None:
        where, _, name = args.simulator.rpartition(":")
        slug = f"{Path(where).stem}-{name}" if where else args.simulator
        args.out = f"results/{slug}-{args.method}"
    args.method_options = {**default_options, **_options(args.method_option, "--method-option")}
    return task, model, observed, x_obs, truth, label


def _reference_lines(task, draws: dict, reference, seed: int) -> tuple[list[str], dict]:
    """Our posterior against the task's reference draws: per-parameter mean and sd, and C2ST."""
    import torch

    from implicitbayes.diagnostics import c2st

    ours = torch.cat([v.reshape(v.shape[0], -1) for v in draws.values()], 1).float()
    reference = torch.as_tensor(reference).float()
    names = list(getattr(task, "parameter_names", None) or [f"theta[{i}]" for i in range(ours.shape[1])])
    rows = {}
    for i, name in enumerate(names):
        m, sd = float(reference[:, i].mean()), float(reference[:, i].std())
        rows[name] = {"reference_mean": m, "reference_sd": sd, "mean": float(ours[:, i].mean()),
                      "sd": float(ours[:, i].std()), "mean_off_in_reference_sd": float((ours[:, i].mean() - m) / sd),
                      "sd_ratio": float(ours[:, i].std() / sd)}
    n = min(len(ours), len(reference))
    pick = torch.randperm(len(reference), generator=torch.Generator().manual_seed(seed))[:n]
    score = c2st(ours[:n], reference[pick], seed=seed)
    lines = [f"against the reference posterior ({len(reference)} draws; C2ST {score:.3f} on {n} draws each, "
             "0.5 = indistinguishable):",
             f"{'parameter':12s} {'mean':>10s} {'ref mean':>10s} {'off/ref sd':>10s} {'sd':>10s} {'ref sd':>10s} "
             f"{'sd ratio':>8s}"]
    for name, r in rows.items():
        lines.append(f"{name:12s} {r['mean']:10.4g} {r['reference_mean']:10.4g} {r['mean_off_in_reference_sd']:+10.2f} "
                     f"{r['sd']:10.3g} {r['reference_sd']:10.3g} {r['sd_ratio']:8.2f}")
    return lines, {"c2st": score, "draws": n, "parameters": rows}


def _misspecification_line(post, obs: dict, simulations, method: str, seed: int) -> str:
    """The summary's line on ``ib.diagnostics.misspecification`` of the observation against the
    run's simulations from the prior predictive (amortized: all of them; rounds: round 1's)."""
    import implicitbayes as ib
    from implicitbayes.diagnostics.misspecification import has_summary_space

    if not has_summary_space(post):
        return f"misspecification check: not available for {method} (its posterior has no summary space)"
    if simulations is None:
        return "misspecification check: not available (no simulations from the prior predictive in this run)"
    if not isinstance(simulations, ib.SimulationSet):
        simulations = ib.SimulationSet.load(simulations)
    if len(simulations) < 200:
        return f"misspecification check: skipped, {len(simulations)} simulations from the prior are too few (200)"
    n_ref = min(1000, len(simulations) // 2)
    n_null = min(1000, len(simulations) - n_ref)
    r = ib.diagnostics.misspecification(post, obs, simulations, num_reference=n_ref, num_null=n_null, seed=seed)
    verdict = ("LIKELY MISSPECIFIED: the observation is unlike the model's simulations, so the posterior may mean "
               "little; check the model" if r["p_value"] < 0.01 else "the observation looks like the model's simulations")
    return (f"misspecification check (MMD in the posterior's summary space, {n_ref} simulations against a null of "
            f"{n_null} more): statistic {r['statistic']:.3g}, p = {r['p_value']:.3g}; {verdict}")


def _cmd_run(args) -> int:
    from .simulate import shared_trial_runs

    with shared_trial_runs():  # the model's trial run (shapes) once for the whole analysis
        return _run_analysis(args)


def _run_analysis(args) -> int:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import arviz as az
    import matplotlib.pyplot as plt
    import torch

    import implicitbayes as ib
    from implicitbayes.diagnostics import plots
    from implicitbayes.simulate import resolve_device

    t_start = time.perf_counter()
    device = resolve_device(args.device)
    task, model, observed, x_obs, truth, label = _resolve_run(args)
    sim_options, method_options = _options(args.option), args.method_options
    out = Path(args.out)
    config = {"simulator": args.simulator, "simulator_options": sim_options, "method": args.method,
              "method_options": method_options, "simulations": args.simulations, "rounds": args.rounds,
              "seed": args.seed, "observed": observed,
              "observation": args.observation if args.data is None else None,
              "data": str(Path(args.data).resolve()) if args.data else None}
    _prepare_out(out, config, args.force)
    method = getattr(ib, METHODS[args.method])(model, observed=observed, device=device, **method_options)
    amortized = args.method in ("implicit-vi", "npe", "nre") and args.rounds == 1
    post_path = out / "posterior.safetensors"
    data = None
    if args.method != "lfvi" and args.rounds == 1:
        executor, close = _executor(args.executor)
        try:
            print(f"simulating {args.simulations} × {args.simulator} into {out / 'store'} (resumable)")
            data = ib.simulate(model, args.simulations, observed=observed, seed=args.seed, device=device,
                               executor=executor, store=out / "store", progress=not args.quiet)
        finally:
            close()
    if post_path.exists():
        print(f"loading the trained posterior from {post_path}")
        post = ib.load(post_path, device=device, model=model)
    else:
        fit = dict(seed=args.seed, progress=not args.quiet, max_steps=args.max_steps, time_budget=args.time_budget)
        if args.rounds > 1:
            print(f"focused on the {label}: {METHODS[args.method]} in {args.rounds} rounds, {args.simulations} "
                  f"simulations in all (resumable store {out / 'sequential'})")
            post = ib.sequential(method, observation={observed[0]: x_obs}, num_simulations=args.simulations,
                                 rounds=args.rounds, seed=args.seed, store=out / "sequential", progress=not args.quiet)
            for r, info in enumerate(post.rounds, 1):
                pool = info.get("pool") or {}
                resumed = "" if pool.get("effective_fraction") is None else \
                    f" (pool {'resumed' if pool['resumed'] else 'started cold'}: weights " \
                    f"{100 * pool['effective_fraction']:.0f} % effective)"
                where = ("from the prior" if info["proposal"] == "prior" else f"at draws of the posterior{resumed}"
                         if info["prior_mass"] is None else f"region prior mass {info['prior_mass']:.3g}")
                print(f"  round {r}: {info['simulations']} simulations {where}, {info['seconds']:.0f} s")
        else:
            print(f"training {METHODS[args.method]} (checkpoints in {out}; Ctrl-C and re-run to resume)")
            if args.method in ("implicit-vi", "npe", "nre", "nle"):
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
        if x_obs.dim() == 2 and x_obs.shape[1] <= 4:  # a table: one series per column
            names = getattr(task, "series_names", None) or [f"{observed[0]}[:, {c}]" for c in range(x_obs.shape[1])]
            fig = plots.plot_ppc_series(x_obs.T, pred.transpose(1, 2), times=getattr(task, "record_times", None),
                                        names=names)
        else:
            fig = plots.plot_ppc_series(x_obs.reshape(1, -1), pred.reshape(pred.shape[0], 1, -1), names=[observed[0]])
    fig.savefig(out / "ppc.png", dpi=100)
    plt.close("all")
    if args.sbc:
        if not amortized:
            print("--sbc: skipped; SBC needs an amortized posterior (implicit-vi, npe, nre with --rounds 1)")
        else:
            from implicitbayes.diagnostics import coverage_from_draws, sbc_ranks
            from implicitbayes.diagnostics.calibration import calibration_draws

            theta, cal, names = calibration_draws(post, model, observed=observed, num_datasets=args.sbc,
                                                  num_samples=99, seed=args.seed + 7, progress=not args.quiet)
            result = sbc_ranks(theta, cal, names=names)
            result.plot().savefig(out / "sbc.png", dpi=100)
            coverage_from_draws(theta, cal).plot().savefig(out / "coverage.png", dpi=100)
            plt.close("all")
            print(f"SBC over {args.sbc} datasets: Bonferroni p = {result.p_value:.3g} "
                  f"({'passed' if result.passed else 'FAILED'}); plots sbc.png, coverage.png")
    summary = az.summary(idata, kind="stats", hdi_prob=0.95)
    how = f"{args.rounds} rounds of " if args.rounds > 1 else ""
    lines = [f"{args.simulator}, {label}: {METHODS[args.method]} on {how}{args.simulations} simulations, "
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
    lines.append(_misspecification_line(post, obs, data if args.rounds == 1 else out / "sequential" / "round-1",
                                        METHODS[args.method], args.seed))
    reference = task.reference_samples(args.observation or 1) if task is not None and args.data is None else None
    written = ["posterior.safetensors", "inference_data.nc", "pair.png", "ppc.png"]
    if reference is not None:
        more, record = _reference_lines(task, draws, reference, args.seed)
        lines += more
        (out / "reference.json").write_text(json.dumps(record, indent=1) + "\n")
        written.append("reference.json")
    written += ["sbc.png", "coverage.png"] if args.sbc and amortized else []
    lines.append(f"wall time {time.perf_counter() - t_start:.1f} s; outputs in {out}: {', '.join(written)}")
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
    r.add_argument("simulator", metavar="TARGET", help="a registered simulator (see `implicitbayes list`), or your "
                   "own Pyro model as path/to/file.py:function or module:function (with --data)")
    r.add_argument("--method", default=None, help="implicit-vi | npe | nre | nle | lfvi | abc (default: the "
                   "simulator's, else implicit-vi)")
    r.add_argument("-n", "--simulations", type=int, default=None, help="simulations in all (default: the "
                   "simulator's, else 10000)")
    r.add_argument("--rounds", type=int, default=None, help="1: amortized; R > 1: R rounds focused on the "
                   "observation (ib.sequential; default: the simulator's, else 1)")
    r.add_argument("--observed", default=None, help="the observed site of your own model (default: its one "
                   "ib.Implicit site)")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--observation", type=int, default=None, help="the simulator's observation K (default 1)")
    g.add_argument("--data", default=None, help="a CSV or .npy file with the observation (its numbers, in the "
                   "site's shape)")
    r.add_argument("--device", default=None, help="cpu | cuda[:i]")
    r.add_argument("--executor", default="local", help="local | processes[=N] | dask[=ADDRESS], for simulation")
    r.add_argument("--out", default=None, help="run directory (default results/<target>-<method>); re-running "
                   "with the same one resumes")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--num-samples", type=int, default=None, help="posterior draws written and summarised "
                   "(default: the simulator's, else 1000)")
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
