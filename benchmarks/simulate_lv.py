"""Lotka–Volterra simulator throughput: our SDE vs torchsde on the identical CLE; our exact MJP.

Both integrate the chemical Langevin equation of the LV reactions (simulators/lotka_volterra.py)
with Euler–Maruyama, batch 16 384 paths at θ*, dt = 0.01, T = 30, recorded every 0.2, float32,
in the same process. torchsde gets its fastest formulation: diagonal noise with the two
merged Brownian motions (√(h1+h2) dB1, √(h3+h4) dB2; the same process in law), and
absorption at 0 in the drift/diffusion by clamping. Peak memory is the process' peak RSS
increase (ru_maxrss) measured in a fresh subprocess per simulator.

End to end (``--simulations``): ``ib.simulate`` of the task's Pyro model (prior draws,
simulation, summaries, chunks of 10 000) with the compiled kernel found on disk (warm), and
with an empty kernel cache (cold: ``backend="auto"`` then builds the kernel only where the run
pays for it, else runs eagerly); torchsde on the same work: the same number of prior draws,
in the same chunks. One process per row; compile and load times are inside the seconds.

The exact Gillespie MJP (no peer here) is timed on 10 000 prior draws (log θ ~ U(−5, 2)^4, the
batch ``ib.simulate`` uses by default) and on 1 000 paths at θ*, float64, one call each.

Writes benchmarks/results/simulate_lv.json and .md. Usage:
    python benchmarks/simulate_lv.py [--batch 16384] [--repeats 3] [--device cpu]
        [--simulations 100000,1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulators.lotka_volterra import THETA_STAR, lv_mjp, lv_sde  # noqa: E402

T, DT, RECORD = 30.0, 0.01, 0.2
CHUNK = 10_000  # ib.simulate's default batch


def run_ours(theta: torch.Tensor, backend: str) -> torch.Tensor:
    return lv_sde(theta, dt=DT, T=T, record_every=RECORD, backend=backend,
                  generator=torch.Generator(theta.device).manual_seed(0))


def run_task(theta: torch.Tensor) -> torch.Tensor:
    """The task's public simulator at its defaults (``backend="auto"``), 9 summaries."""
    import simulators

    return simulators.get("lotka_volterra_sde").simulate(theta, seed=0)


def run_torchsde(theta: torch.Tensor) -> torch.Tensor:
    import torchsde

    class CLE(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def __init__(self, rates):
            super().__init__()
            self.register_buffer("rates", rates)

        def _hazards(self, u):
            u = u.clamp_min(0.0)
            x, y = u[:, 0], u[:, 1]
            r = self.rates
            return r[:, 0] * x * y, r[:, 1] * x, r[:, 2] * y, r[:, 3] * x * y

        def f(self, t, u):
            a, b, c, d = self._hazards(u)
            return torch.stack([a - b, c - d], 1)

        def g(self, t, u):
            a, b, c, d = self._hazards(u)
            return torch.stack([(a + b).sqrt(), (c + d).sqrt()], 1)

    n = theta.shape[0]
    u0 = torch.tensor([50.0, 100.0], device=theta.device).expand(n, 2).contiguous()
    ts = torch.arange(0, round(T / RECORD) + 1, device=theta.device) * RECORD
    bm = torchsde.BrownianInterval(t0=0.0, t1=T, size=(n, 2), device=theta.device, entropy=0)
    with torch.no_grad():
        return torchsde.sdeint(CLE(theta), u0, ts, method="euler", dt=DT, bm=bm).clamp_min(0.0)


def measure(name: str, batch: int, repeats: int, device: str) -> dict:
    theta = torch.tensor(THETA_STAR, device=device).expand(batch, 4).contiguous()
    fn = {"ours-eager": lambda: run_ours(theta, "eager"), "ours-compiled": lambda: run_ours(theta, "compile"),
          "task-simulate": lambda: run_task(theta), "torchsde": lambda: run_torchsde(theta)}[name]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = fn()  # warm-up (and compilation, timed separately)
    sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    steps = round(T / DT)
    best = min(times)
    return {"simulator": name, "batch": batch, "steps": steps, "seconds": best, "first_call_seconds": first,
            "path_steps_per_s": batch * steps / best, "finite": bool(torch.isfinite(out).all()),
            "peak_rss_increase_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024,
            "device": device}


def measure_end_to_end(name: str, n: int, device: str) -> dict:
    """Seconds for ``n`` prior simulations, everything included (the task's pilot run too)."""
    if name == "torchsde":
        import torchsde  # noqa: F401  (imports outside the clock, as ours are)
    t0 = time.perf_counter()
    if name == "torchsde":
        g = torch.Generator(device).manual_seed(0)
        for start in range(0, n, CHUNK):
            theta = torch.exp(-5.0 + 7.0 * torch.rand((min(CHUNK, n - start), 4), generator=g, device=device))
            run_torchsde(theta)
    else:
        import implicitbayes as ib
        import simulators

        task = simulators.get("lotka_volterra_sde")
        ib.simulate(task.model, n, observed="x", seed=0, batch_size=CHUNK, device=device, progress=False)
    sync(device)
    sec = time.perf_counter() - t0
    return {"runner": name, "simulations": n, "seconds": sec, "path_steps_per_s": n * round(T / DT) / sec,
            "device": device}


def measure_mjp(device: str) -> list[dict]:
    """Seconds for one batched MJP call: 10 000 prior draws, then 1 000 paths at θ*."""
    g = torch.Generator(device).manual_seed(0)
    prior = torch.exp(-5.0 + 7.0 * torch.rand((10_000, 4), generator=g, device=device))
    star = torch.tensor(THETA_STAR, device=device).expand(1000, 4).contiguous()
    rows = []
    for name, theta in (("mjp-prior", prior), ("mjp-theta*", star)):
        t0 = time.perf_counter()
        out = lv_mjp(theta, T=T, record_every=RECORD, generator=g)
        sync(device)
        sec = time.perf_counter() - t0
        rows.append({"simulator": name, "batch": theta.shape[0], "seconds": sec,
                     "simulations_per_s": theta.shape[0] / sec, "finite": bool(torch.isfinite(out).all()),
                     "device": device})
    return rows


def subprocess_row(arguments: list[str], env: dict | None = None):
    """This script with ``arguments`` in a fresh process; its JSON line."""
    res = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{' '.join(arguments)} failed")
    return json.loads(res.stdout.strip().splitlines()[-1])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--simulations", default="100000,1000000",
                   help="end-to-end sizes (comma-separated; empty: skip that part)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one simulator, in a subprocess
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    if args.only == "mjp":
        print(json.dumps(measure_mjp(args.device)))
        return
    if args.only and args.n:
        print(json.dumps(measure_end_to_end(args.only, args.n, args.device)))
        return
    if args.only:
        print(json.dumps(measure(args.only, args.batch, args.repeats, args.device)))
        return
    rows = []
    for name in ("torchsde", "ours-eager", "ours-compiled", "task-simulate"):
        rows.append(subprocess_row(["--only", name, "--batch", str(args.batch), "--repeats", str(args.repeats),
                                    "--device", args.device]))
        print(f"{name:14s} {rows[-1]['path_steps_per_s']:.3g} path-steps/s ({rows[-1]['seconds']:.2f} s)")
    e2e = []
    for n in [int(v) for v in args.simulations.split(",") if v]:
        for runner, cache in (("torchsde", None), ("ib.simulate, warm kernel cache", None),
                              ("ib.simulate, cold kernel cache", "cold")):
            with tempfile.TemporaryDirectory() as empty:
                env = dict(os.environ, IMPLICITBAYES_CACHE=empty) if cache else None
                row = subprocess_row(["--only", "torchsde" if runner == "torchsde" else "ours", "--n", str(n),
                                      "--device", args.device], env=env)
            row["runner"] = runner
            e2e.append(row)
            print(f"{runner:32s} {n:>8d} simulations {row['seconds']:8.1f} s")
        peer = e2e[-3]["seconds"]
        for r in e2e[-3:]:
            r["speedup_vs_torchsde"] = peer / r["seconds"]
    mjp_rows = subprocess_row(["--only", "mjp", "--device", args.device])
    peer = next(r for r in rows if r["simulator"] == "torchsde")["path_steps_per_s"]
    for r in rows:
        r["speedup_vs_torchsde"] = r["path_steps_per_s"] / peer
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "machine": platform.machine(), "cpu_count": __import__("os").cpu_count()}
    try:
        import torchsde

        env["torchsde"] = torchsde.__version__
    except ImportError:
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "simulate_lv" if args.device == "cpu" else f"simulate_lv_{args.device.replace(':', '')}"
    (out / f"{stem}.json").write_text(json.dumps({"config": {"T": T, "dt": DT, "record_every": RECORD,
                                                               "batch": args.batch, "theta": THETA_STAR},
                                                    "environment": env, "results": rows, "end_to_end": e2e,
                                                    "mjp": mjp_rows},
                                                   indent=1))
    lines = [f"# Lotka–Volterra SDE throughput ({args.device}, batch {args.batch}, dt {DT}, T {T}, record every {RECORD})",
             "", f"`{' '.join(['python', 'benchmarks/simulate_lv.py', *sys.argv[1:]])}`", "",
             f"torch {env['torch']}, {env['threads']} threads, torchsde {env.get('torchsde', '-')}", "",
             "| simulator | path-steps/s | seconds | first call (s) | × torchsde | peak RSS increase (MB) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['simulator']} | {r['path_steps_per_s']:.3g} | {r['seconds']:.3f} | "
                     f"{r['first_call_seconds']:.1f} | {r['speedup_vs_torchsde']:.1f} | {r['peak_rss_increase_mb']:.0f} |")
    if e2e:
        lines += ["", f"## End to end: `ib.simulate` of the task's model, prior draws, chunks of {CHUNK} "
                  f"({args.device}); torchsde on the same draws", "",
                  "| runner | simulations | seconds | path-steps/s | × torchsde |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['runner']} | {r['simulations']} | {r['seconds']:.1f} | {r['path_steps_per_s']:.3g} | "
                  f"{r['speedup_vs_torchsde']:.1f} |" for r in e2e]
    lines += ["", f"## Exact MJP (Gillespie, float64, {args.device}, one batched call, T {T})", "",
              "| simulator | batch | seconds | simulations/s |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['simulator']} | {r['batch']} | {r['seconds']:.1f} | {r['simulations_per_s']:.0f} |"
              for r in mjp_rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
