"""Scale: simulation into a store with bounded memory, training on a memory-mapped store, and
simulation throughput with 1, 2 and 4 Dask worker processes.

Each measurement runs in a fresh subprocess, so its peak RSS (``ru_maxrss``) is its own;
``anon`` is the process' anonymous memory at the end (``RssAnon``: what it needs, excluding
file pages of the memory-mapped store, which the kernel can drop at any time).

    python benchmarks/scale.py --parts simulate,train,dask --simulations 1000000

Parts:
  simulate  ib.simulate of N Lotka-Volterra SDE simulations (9 summaries) into a store, at
            N/10 and N, and of a tiny model (24 bytes per simulation) at N and 10 N: peak RSS
            should not grow with N (one chunk plus the index), even where the set outweighs it.
  train     NPE and ImplicitVI on the N-simulation store, memory-mapped vs loaded into RAM
            (same steps): samples/s and memory; and NPE on a wide synthetic store (x of 2 000
            numbers per simulation) whose size exceeds what the process holds.
  dask      simulations/s with LocalCluster(n_workers=k, threads_per_worker=1) for k = 1, 2, 4,
            and in-process; scaling efficiency = rate_k / (k · rate_1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


# -- measurements (each runs in its own subprocess) ---------------------------------------------
def _status_mb(key: str) -> float | None:
    path = Path("/proc/self/status")
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return None


class _AnonPeak:
    """Samples RssAnon every 20 ms in a thread: the peak of the memory the process needs, which
    ``ru_maxrss`` cannot tell apart from pages of memory-mapped files."""

    def __init__(self):
        import threading

        self.peak, self._stop = _status_mb("RssAnon") or 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _status_mb("RssAnon") or 0.0)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_mb("RssAnon") or 0.0)


_PEAK: list = []


def _memory() -> dict:
    import resource

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_anon_mb": _status_mb("RssAnon"), "rss_file_mb": _status_mb("RssFile")}
    if _PEAK:
        out["peak_anon_mb"] = _PEAK.pop().stop()
    return out


def _track() -> None:
    """Start sampling the anonymous-memory peak; the next ``_memory()`` reports and stops it."""
    _PEAK.append(_AnonPeak())


def _lv_model():
    sys.path.insert(0, str(ROOT))
    import simulators

    return simulators.get("lotka_volterra_sde").model


def m_simulate(n: int, store: str, batch_size: int, model: str = "lotka_volterra_sde") -> dict:
    import implicitbayes as ib

    name = model
    if model == "small":
        sys.path.insert(0, str(ROOT))
        from benchmarks.scale_models import small_model as model
    else:
        model = _lv_model()
    before = _memory()
    _track()
    t0 = time.perf_counter()
    data = ib.simulate(model, n, observed="x", seed=0, batch_size=batch_size, store=store, progress=False)
    seconds = time.perf_counter() - t0
    disk = sum(p.stat().st_size for p in Path(store).rglob("*") if p.is_file())
    whole = sum(data[k].numel() * data[k].element_size() for k in data.keys()) + data.index.numel() * 8
    return {"model": name, "simulations": n, "valid": len(data), "batch_size": batch_size, "seconds": seconds,
            "simulations_per_s": n / seconds, "memory_mapped": data.is_memory_mapped,
            "set_mb": whole / 2**20, "store_mb_on_disk": disk / 2**20,
            "after_import": before, **_memory()}


def m_train(method: str, store: str, mapped: bool, steps: int) -> dict:
    import torch

    import implicitbayes as ib

    model = _lv_model()
    data = ib.SimulationSet.load(store)
    if not mapped:  # the same rows, copied into RAM
        data = data.subset(slice(None))
        data = ib.SimulationSet({k: data[k].clone() for k in data.keys()}, latent_names=data.latent_names,
                                observed_names=data.observed_names, index=data.index.clone())
    before = _memory()
    _track()
    cls = {"npe": ib.NPE, "implicit_vi": ib.ImplicitVI}[method]
    opts = {"training": {"validation_fraction": 0.01}} if method == "npe" else {}
    fitter = cls(model, observed="x", **opts)
    t0 = time.perf_counter()
    post = fitter.fit(data, max_steps=steps, seed=0, progress=False)
    seconds = time.perf_counter() - t0
    summary = post.training_summary
    stages = [summary] if "steps" in summary else [v for v in summary.values() if isinstance(v, dict) and "steps" in v]
    done = sum(s["steps"] for s in stages)
    batch = fitter.loop.batch_size
    return {"method": method, "memory_mapped": data.is_memory_mapped, "rows": len(data), "steps": done,
            "batch_size": batch, "seconds": seconds, "samples_per_s": done * batch / seconds,
            "after_load": before, **_memory(), "torch_threads": torch.get_num_threads()}


def m_wide(store: str, n: int, width: int, steps: int) -> dict:
    """A store of ``n`` simulations with ``width`` numbers each, then NPE on it memory-mapped."""
    from torch import nn

    import implicitbayes as ib

    sys.path.insert(0, str(ROOT))
    from benchmarks.scale_models import wide_model

    _track()
    t0 = time.perf_counter()
    data = ib.simulate(wide_model, n, observed="x", seed=0, batch_size=5_000, store=store, progress=False,
                       model_kwargs={"width": width})
    sim_s = time.perf_counter() - t0
    after_sim = _memory()
    data = ib.SimulationSet.load(store)
    _track()
    embedding = nn.Sequential(nn.Flatten(), nn.Linear(width, 32), nn.GELU())
    embedding.out_features = 32
    t0 = time.perf_counter()
    post = ib.NPE(wide_model, observed="x", model_kwargs={"width": width}, embedding=embedding,
                  training={"validation_fraction": 0.002}).fit(data, max_steps=steps, seed=0, progress=False)
    train_s = time.perf_counter() - t0
    x_bytes = data["x"].numel() * data["x"].element_size()
    return {"simulations": n, "width": width, "x_mb": x_bytes / 2**20, "simulate_seconds": sim_s,
            "after_simulate": after_sim, "memory_mapped": data.is_memory_mapped,
            "steps": post.training_summary["steps"], "train_seconds": train_s,
            "samples_per_s": post.training_summary["steps"] * 50 / train_s, **_memory()}


def m_dask(workers: int, n: int, batch_size: int) -> dict:
    import implicitbayes as ib

    model = _lv_model()
    if workers == 0:
        ib.simulate(model, batch_size, observed="x", seed=1, batch_size=batch_size, progress=False)  # warm-up
        t0 = time.perf_counter()
        ib.simulate(model, n, observed="x", seed=0, batch_size=batch_size, progress=False)
        return {"workers": 0, "simulations": n, "seconds": time.perf_counter() - t0}
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        ex = client.get_executor()
        client.run(lambda: sys.path.insert(0, str(ROOT)))
        # warm-up: every worker imports torch, the simulator and compiles nothing
        ib.simulate(model, workers * batch_size, observed="x", seed=1, batch_size=batch_size, executor=ex,
                    progress=False)
        t0 = time.perf_counter()
        ib.simulate(model, n, observed="x", seed=0, batch_size=batch_size, executor=ex, progress=False)
        return {"workers": workers, "simulations": n, "seconds": time.perf_counter() - t0}


# -- driver ------------------------------------------------------------------------------------
def _sub(fn: str, **kw) -> dict:
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import json; from benchmarks.scale import {fn}; "
            f"print('RESULT', json.dumps({fn}(**{kw!r})))")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{fn}({kw}) failed:\n{out.stderr[-3000:]}")
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
    result = json.loads(line[7:])
    print(fn, json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="simulate,train,dask")
    ap.add_argument("--simulations", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=20_000)
    ap.add_argument("--train-steps", type=int, default=2_000)
    ap.add_argument("--wide", default="200000x2000", help="simulations x width of the wide synthetic store")
    ap.add_argument("--dask-simulations", type=int, default=200_000)
    ap.add_argument("--workdir", default=None, help="where the stores go (default: a temporary directory)")
    ap.add_argument("--note", default=None, help="conditions of this run, kept per part in the results")
    args = ap.parse_args()
    parts = args.parts.split(",")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ib-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    path = OUT / "scale.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    command = " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]])
    results.setdefault("commands", {}).update({part: command for part in parts})
    import torch

    results["environment"] = {"torch": torch.__version__, "python": platform.python_version(),
                              "cpus": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS", "1")}
    big = str(work / f"lv-{args.simulations}")
    if "simulate" in parts:
        small = str(work / f"lv-{args.simulations // 10}")
        results["simulate"] = [_sub("m_simulate", n=args.simulations // 10, store=small, batch_size=args.batch_size),
                               _sub("m_simulate", n=args.simulations, store=big, batch_size=args.batch_size)]
        for n in (args.simulations, 10 * args.simulations):  # a model whose set outweighs its chunk
            results["simulate"].append(_sub("m_simulate", n=n, store=str(work / f"small-{n}"),
                                            batch_size=args.batch_size, model="small"))
    if "train" in parts:
        if not Path(big, "set").exists():
            _sub("m_simulate", n=args.simulations, store=big, batch_size=args.batch_size)
        results["train"] = [_sub("m_train", method=m, store=big, mapped=mapped, steps=args.train_steps)
                            for m in ("npe", "implicit_vi") for mapped in (True, False)]
        n, width = map(int, args.wide.split("x"))
        results["wide"] = _sub("m_wide", store=str(work / f"wide-{n}x{width}"), n=n, width=width,
                               steps=args.train_steps)
    if "dask" in parts:
        rows = [_sub("m_dask", workers=k, n=args.dask_simulations, batch_size=10_000) for k in (0, 1, 2, 4)]
        one = next(r for r in rows if r["workers"] == 1)
        for r in rows:
            r["simulations_per_s"] = r["simulations"] / r["seconds"]
            if r["workers"]:
                r["efficiency"] = r["simulations_per_s"] / (r["workers"] * one["simulations"] / one["seconds"])
        results["dask"] = rows
    if args.note:
        results.setdefault("notes", {}).update({p: args.note for p in parts})
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    write_table(results, OUT / "scale.md")


def write_table(r: dict, path: Path) -> None:
    lines = ["# Scale: bounded-memory simulation, memory-mapped training, Dask workers", "",
             f"Environment: {r.get('environment')}", ""]
    for part, command in r.get("commands", {}).items():
        lines.append(f"- {part}: `{command}`")
    for part, note in r.get("notes", {}).items():
        lines.append(f"- {part}: {note}")
    if r.get("notes"):
        lines.append("")
    if "simulate" in r:
        lines += ["## ib.simulate into a store (Lotka-Volterra SDE, 9 summaries)", "",
                  "| model | simulations | batch | seconds | sims/s | peak RSS (MB) | peak RssAnon (MB) | RSS after import (MB) | set in RAM would be (MB) | store on disk (MB) | memory-mapped |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for s in r["simulate"]:
            lines.append(f"| {s.get('model', 'lotka_volterra_sde')} | {s['simulations']} | {s['batch_size']} | {s['seconds']:.1f} | {s['simulations_per_s']:.0f} | "
                         f"{s['peak_rss_mb']:.0f} | {s.get('peak_anon_mb', float('nan')):.0f} | {s['after_import']['peak_rss_mb']:.0f} | {s['set_mb']:.1f} | "
                         f"{s['store_mb_on_disk']:.1f} | {s['memory_mapped']} |")
        lines.append("")
    if "train" in r:
        lines += ["## Training on the store: memory-mapped vs in RAM (same rows, same steps)", "",
                  "| method | data | rows | steps | samples/s | seconds | peak RSS (MB) | peak RssAnon (MB) | RssAnon at end (MB) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for t in r["train"]:
            lines.append(f"| {t['method']} | {'memory-mapped' if t['memory_mapped'] else 'in RAM'} | {t['rows']} | "
                         f"{t['steps']} | {t['samples_per_s']:.0f} | {t['seconds']:.1f} | {t['peak_rss_mb']:.0f} | "
                         f"{t.get('peak_anon_mb', float('nan')):.0f} | {t['rss_anon_mb']:.0f} |")
        lines.append("")
    if "wide" in r:
        w = r["wide"]
        lines += ["## NPE on a wide store (memory-mapped)", "",
                  "| simulations | numbers each | x on disk (MB) | simulate peak RssAnon (MB) | steps | samples/s | train peak RSS (MB) | train peak RssAnon (MB) | RssAnon at end (MB) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
                  f"| {w['simulations']} | {w['width']} | {w['x_mb']:.0f} | {w['after_simulate'].get('peak_anon_mb', float('nan')):.0f} | "
                  f"{w['steps']} | {w['samples_per_s']:.0f} | {w['peak_rss_mb']:.0f} | {w.get('peak_anon_mb', float('nan')):.0f} | "
                  f"{w['rss_anon_mb']:.0f} |", ""]
    if "dask" in r:
        lines += ["## Simulations per second with Dask worker processes (LocalCluster, 1 thread each)", "",
                  "| workers | simulations | seconds | sims/s | efficiency |", "| --- | --- | --- | --- | --- |"]
        for d in r["dask"]:
            eff = f"{d['efficiency']:.2f}" if "efficiency" in d else "—"
            lines.append(f"| {d['workers'] or 'in-process'} | {d['simulations']} | {d['seconds']:.1f} | "
                         f"{d['simulations_per_s']:.0f} | {eff} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
