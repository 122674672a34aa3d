"""The GPU path, measured in one short run: Lotka–Volterra SDE path-steps/s and training
throughput, CPU against GPU on the same work.

1. ``lv_sde`` at θ* (T = 30, dt = 0.01, record every 0.2, float32) on the GPU, eager and
   compiled (the AOTInductor kernel of ``implicitbayes.kernels``, built for the device on the
   first call: its build time is reported, the rate is the best of ``--repeats`` after it),
   at ``--paths`` paths per call.
2. Training throughput of NPE and ImplicitVI on one grid row (``--task``, ``--simulations``
   simulations of seed 1, the methods' default settings), ``--steps`` optimiser steps of each
   stage, on the CPU and on the GPU: samples/s = steps × batch size / seconds of ``fit``.
3. ``--tests``: the tests marked ``gpu`` first (``pytest -m gpu``), their outcome recorded.

Writes benchmarks/results/gpu.json and .md. Needs CUDA; without it, says so and exits 2.
Usage (a few minutes on an H100/H200-class device):
    python benchmarks/gpu.py [--tests] [--paths 1048576,4194304] [--task slcp] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import implicitbayes as ib  # noqa: E402
import simulators  # noqa: E402
from simulators.lotka_volterra import THETA_STAR, lv_sde  # noqa: E402

T, DT, RECORD = 30.0, 0.01, 0.2


def sde_rows(paths: list[int], repeats: int) -> list[dict]:
    rows = []
    for n in paths:
        theta = torch.tensor(THETA_STAR, device="cuda").expand(n, 4).contiguous()
        for backend in ("eager", "compile"):
            def run():
                out = lv_sde(theta, dt=DT, T=T, record_every=RECORD, backend=backend,
                             generator=torch.Generator("cuda").manual_seed(0))
                torch.cuda.synchronize()
                return out

            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:  # a kernel that cannot be built runs eagerly
                warnings.simplefilter("always")
                out = run()
            first = time.perf_counter() - t0
            note = "; ".join(str(w.message) for w in caught)
            best = min(_timed(run) for _ in range(repeats))
            rows.append({"backend": backend, "paths": n, "first_call_seconds": first, "seconds": best,
                         "path_steps_per_s": n * round(T / DT) / best, "finite": bool(torch.isfinite(out).all()), "note": note})
            print(f"lv_sde {backend:8s} {n:>9d} paths  {rows[-1]['path_steps_per_s']:.3g} path-steps/s "
                  f"(first call {first:.1f} s) {note}", flush=True)
            del out
        torch.cuda.empty_cache()
    return rows


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _steps(summary) -> int:
    """Optimiser steps in a training summary (every stage's ``steps``)."""
    if isinstance(summary, dict):
        return int(summary.get("steps", 0)) + sum(_steps(v) for k, v in summary.items() if k != "steps")
    return 0


def training_rows(task_name: str, simulations: int, steps: int) -> Iterator[dict]:
    task = simulators.get(task_name)
    data = ib.simulate(task.model, simulations, observed="x", seed=1, progress=False)
    rows = []
    for method in ("NPE", "ImplicitVI"):
        cls = getattr(ib, method)
        for device in ("cpu", "cuda"):
            est = cls(task.model, observed="x", device=device)
            batch = est.training.batch_size
            t0 = time.perf_counter()
            post = est.fit(data, max_steps=steps, seed=1, progress=False)
            if device == "cuda":
                torch.cuda.synchronize()
            sec = time.perf_counter() - t0
            taken = _steps(post.training_summary)
            rows.append({"method": method, "device": device, "task": task_name, "simulations": simulations,
                         "steps": taken, "batch_size": batch, "seconds": sec, "samples_per_s": taken * batch / sec})
            print(f"{method:11s} {device:5s} {taken} steps in {sec:.1f} s: {rows[-1]['samples_per_s']:.3g} samples/s",
                  flush=True)
            yield rows[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paths", default="1048576,4194304")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--task", default="slcp")
    p.add_argument("--simulations", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tests", action="store_true", help="run the tests marked gpu first")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: CUDA is not available on this machine; nothing measured", file=sys.stderr)
        raise SystemExit(2)
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": torch.cuda.get_device_name(),
           "cpu_threads": torch.get_num_threads()}
    tests = None
    if args.tests:  # modules that cannot be imported here (a peer not installed) hold no gpu test
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-m", "gpu", "-p", "no:cacheprovider",
                              "--continue-on-collection-errors", "tests"], cwd=ROOT, capture_output=True, text=True)
        print(res.stdout, res.stderr[-4000:], flush=True)
        tests = {"returncode": res.returncode, "summary": res.stdout.strip().splitlines()[-1] if res.stdout else ""}
        print("gpu tests:", tests["summary"], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sde, training = [], []
    write(out, env, tests, sde, training, args)  # after every section: a run cut short keeps what it measured
    sde += sde_rows([int(v) for v in args.paths.split(",") if v], args.repeats)
    write(out, env, tests, sde, training, args)
    for row in training_rows(args.task, args.simulations, args.steps):
        training.append(row)
        write(out, env, tests, sde, training, args)
    print((out / "gpu.md").read_text())


def write(out: Path, env: dict, tests, sde: list, training: list, args) -> None:
    (out / "gpu.json").write_text(json.dumps({"environment": env, "tests": tests, "lv_sde": sde,
                                              "training": training, "command": sys.argv}, indent=1))
    lines = [f"# GPU path ({env['device']}, torch {env['torch']})", "",
             f"`python benchmarks/gpu.py {' '.join(sys.argv[1:])}`", ""]
    if tests:
        lines += [f"Tests marked gpu: {tests['summary']} (exit {tests['returncode']})", ""]
    lines += ["## Lotka–Volterra SDE at θ* (T 30, dt 0.01, float32)", "",
              "| backend | paths | path-steps/s | seconds | first call (s) | note |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['backend']} | {r['paths']} | {r['path_steps_per_s']:.3g} | {r['seconds']:.3f} | "
              f"{r['first_call_seconds']:.1f} | {r['note'][:200]} |" for r in sde]
    lines += ["", f"## Training throughput ({args.task}, {args.simulations} simulations of seed 1, "
              f"{args.steps} steps per stage)", "",
              "| method | device | steps | batch | seconds | samples/s | GPU / CPU |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in training:
        cpu = next((c for c in training if c["method"] == r["method"] and c["device"] == "cpu"), None)
        ratio = f"{r['samples_per_s'] / cpu['samples_per_s']:.2f}" if cpu else "–"
        lines.append(f"| {r['method']} | {r['device']} | {r['steps']} | {r['batch_size']} | {r['seconds']:.1f} | "
                     f"{r['samples_per_s']:.3g} | {ratio} |")
    (out / "gpu.md").write_text("\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
