"""The ``implicitbayes`` command: list simulators, simulate to a resumable store, run the demo.

Errors a user can cause (unknown simulator, bad option, unavailable device) are printed as
one-line messages with exit status 2, not tracebacks.
"""

from __future__ import annotations

import argparse
import ast
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
                client = Client(arg, timeout="10s")
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
    except (ValueError, TypeError, FileNotFoundError, PermissionError) as e:
        print(f"implicitbayes {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the store", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
