"""``simulate``: run a Pyro model many times, vectorized, seeded, chunked, resumable.

The model runs under one outer ``pyro.plate`` per chunk of ``batch_size`` simulations, placed
to the left of every plate (and batch dimension) the model uses itself, so a model written for
one dataset simulates a whole batch in one call. Chunk ``k`` is seeded from ``(seed, k)`` alone
(torch, numpy and ``random`` are seeded inside and restored afterwards), so for a given seed and
batch size the result does not depend on the executor, the order chunks finish in, or whether
the run was interrupted and resumed from a ``store``.

Invalid outputs policy: a simulation with a NaN or infinite value in any site is dropped,
counted in ``SimulationSet.num_invalid`` and reported in a warning with the parameter ranges
that produced it; if more than half of all simulations are invalid, :class:`SimulationError`.

Failures: a chunk whose simulator raises is tried again (``retries`` times, same seed, so a
transient failure leaves no trace in the result), then bisected with its latents held fixed
until the simulations that fail on their own are found. Those are named with their parameters
in the error (``on_error="raise"``) or dropped and counted like invalid outputs
(``on_error="drop"``); the rest of the chunk is kept. Every simulation index appears exactly
once: in the result, or among the invalid/failed.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import contextvars
import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyro
import pyro.poutine as poutine
from pyro.poutine.subsample_messenger import _Subsample
import torch

from .errors import SimulationError, SimulatorOutputError, StoreMismatchError
from .io import atomic_write_text, load_tensors, save_tensors
from .checks import integer
from .seeding import seeded
from .simulation_set import SimulationSet

__all__ = ["simulate", "simulate_at", "run_given", "trace_given", "model_sites", "SiteInfo", "resolve_device",
           "device_context", "plate_layout", "planned_simulations", "trial_trace",
           "shared_trial_runs", "sharing_trial_runs"]

_OUTER_PLATE = "_ib_simulations"
_STORE_KIND = "implicitbayes.SimulationStore"
_CHUNK_KIND = "implicitbayes.SimulationChunk"
_STORE_VERSION = 1
_INDEX = "__index__"
DEFAULT_BATCH_SIZE = 10_000
_TRIAL_ATTEMPTS = 5


_PLANNED: contextvars.ContextVar[int | None] = contextvars.ContextVar("ib_planned_simulations", default=None)


def planned_simulations() -> int | None:
    """How many simulations the :func:`simulate` call that is running the model will run in
    this process in all (its chunks still to do), or ``None`` outside one. A simulator with a
    one-off cost (compiling a kernel) weighs it against the whole run, not one chunk."""
    return _PLANNED.get()


@dataclass(frozen=True)
class SiteInfo:
    """One random site of a model, as seen in a single (unbatched) run."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    observed: bool
    batch_ndim: int  # batch dims of the site in one run (plates and distribution batch shape)
    plates: tuple[str, ...] = ()  # the vectorized plates the site is in, leftmost dim first


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``; a clear error for an unknown or unavailable one."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {device!r} is not a device; expected e.g. 'cpu', 'cuda', 'cuda:0'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was asked for but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device: {device!r} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def plate_layout(value: torch.Tensor, plate_dim: int, batch_ndim: int) -> torch.Tensor:
    """``(n, *site_shape)`` → the shape a site has when ``n`` copies of it run under a plate at
    ``plate_dim``: size-1 dims are inserted between the plate dim and the site's own
    ``batch_ndim`` batch dims (Pyro aligns batch dims from the right)."""
    pad = -plate_dim - 1 - batch_ndim
    return value.reshape((value.shape[0],) + (1,) * max(pad, 0) + tuple(value.shape[1:]))


def _chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, chunk]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def _random_sites(trace) -> list[dict]:
    """Sample sites of a trace, without plates' index sites, deterministic sites or ours."""
    return [s for s in trace.nodes.values()
            if s["type"] == "sample" and not s["name"].startswith("_ib_")
            and not isinstance(s["fn"], _Subsample)
            and not s["infer"].get("_deterministic", False)]


_TRIALS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("ib_trial_runs", default=None)


@contextlib.contextmanager
def shared_trial_runs():
    """Within this context a model's trial run (:func:`trial_trace`) happens once per model and
    arguments, however many parts of the library ask for it: a simulator that takes minutes a
    call is not called a dozen times for shapes over one sequential run. Entered by the library's
    entry points (fits, sequential runs, MCMC sampling); nested contexts share the outermost one.
    Outside any, every trial run is fresh, so a model that reads globals a user has changed
    between two calls is traced anew."""
    if _TRIALS.get() is not None:
        yield
        return
    token = _TRIALS.set({})
    try:
        yield
    finally:
        _TRIALS.reset(token)


def sharing_trial_runs(fn: Callable) -> Callable:
    """``fn`` run inside :func:`shared_trial_runs`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with shared_trial_runs():
            return fn(*args, **kwargs)

    return wrapper


def trial_trace(model: Callable, model_args=(), model_kwargs=None, seed: int = 0) -> poutine.Trace:
    """The trace of one unbatched run of ``model`` (seeded from ``seed``, the caller's random
    state untouched), used to read its sites' shapes, dtypes and supports. A simulator that
    fails at some parameters gets a few draws (seeds ``seed``, ``seed + 1``, …) before the failure
    is reported, with the parameters of the last try. Shared within :func:`shared_trial_runs`.
    A model that runs another with its latents given (a sequential round's proposal) names that
    one in its ``trial_model`` attribute: the sites are the same, and its trial run stands in."""
    model = getattr(model, "trial_model", model)
    model_args, model_kwargs = tuple(model_args), dict(model_kwargs or {})
    cache = _TRIALS.get()
    key = (id(model), tuple(map(id, model_args)), tuple((k, id(v)) for k, v in sorted(model_kwargs.items())), seed)
    if cache is not None and key in cache:
        return cache[key][0]
    # The trial run only reads shapes; it is not part of the results, so a simulator that fails
    # for some parameters gets a few draws before its failure is reported.
    for attempt in range(_TRIAL_ATTEMPTS):
        tracer = poutine.trace(model)
        try:
            with seeded(seed + attempt, torch.device("cpu")):
                trace = tracer.get_trace(*model_args, **model_kwargs)
            break
        except Exception as e:  # user code: say it was the trial run, and with which parameters
            if attempt + 1 < _TRIAL_ATTEMPTS and not isinstance(e, SimulatorOutputError):
                continue  # it may fail at some parameters only; a broken contract fails at all
            values = {s["name"]: torch.as_tensor(s["value"]).detach().reshape(1, -1)
                      for s in _random_sites(tracer.msngr.trace) if s.get("value") is not None}
            kind = SimulatorOutputError if isinstance(e, SimulatorOutputError) else SimulationError
            raise kind(
                f"the model failed in {attempt + 1} trial run(s) (single unbatched simulations, used to read "
                f"the sites' shapes), last with {_first_line(e)}\nparameters: "
                f"{_latent_ranges(values, list(values))}") from e
    if cache is not None:  # the entry holds the model and its arguments, so their ids stay theirs
        cache[key] = (trace, model, model_args, model_kwargs)
    return trace


def model_sites(model: Callable, observed: Sequence[str], model_args=(), model_kwargs=None,
                seed: int = 0) -> tuple[list[SiteInfo], int]:
    """Trace one unbatched run of ``model`` (:func:`trial_trace`) and describe its random sites.

    Returns ``(sites, outer_dim)``: the latent and observed sites (sites given ``obs=`` in
    the model itself are data, not simulations, and are left out), and the plate dimension
    free for a batch of simulations. Raises ``ValueError`` if an ``observed`` name is not a
    site of the model, listing the sites it has.
    """
    trace = trial_trace(model, model_args, model_kwargs, seed)
    sites, names, used = [], [], 0
    for s in _random_sites(trace):
        names.append(s["name"])
        if s["is_observed"]:
            continue
        fn = s["fn"]
        event_dim = len(getattr(fn, "event_shape", ()))
        value = torch.as_tensor(s["value"])
        batch_ndim = value.dim() - event_dim
        plates = [-f.dim for f in s["cond_indep_stack"] if f.vectorized and f.dim is not None]
        used = max([used, batch_ndim] + plates)
        sites.append(SiteInfo(s["name"], tuple(value.shape), str(value.dtype).removeprefix("torch."),
                              s["name"] in observed, batch_ndim,
                              tuple(f.name for f in sorted((f for f in s["cond_indep_stack"]
                                                            if f.vectorized and f.dim is not None), key=lambda f: f.dim))))
    missing = [o for o in observed if o not in names]
    if missing:
        raise ValueError(f"observed: {missing} {'is not a site' if len(missing) == 1 else 'are not sites'} "
                         f"of the model; its sample sites are {names}")
    conditioned = [o for o in observed if o in names and o not in {s.name for s in sites}]
    if conditioned:
        raise ValueError(f"observed: sites {conditioned} are already conditioned with obs= inside the model; "
                         "remove obs= so they can be simulated")
    return sites, -(used + 1)


def _latent_ranges(values: Mapping[str, torch.Tensor], latent: Sequence[str], limit: int = 8) -> str:
    parts = []
    for name in latent:
        v = values.get(name)
        if v is None or v.numel() == 0 or not v.is_floating_point():
            continue
        flat = v.reshape(v.shape[0], -1) if v.dim() else v.reshape(1, 1)
        lo, hi = flat.min(0).values, flat.max(0).values
        shown = [f"[{a:.3g}, {b:.3g}]" for a, b in zip(lo[:limit].tolist(), hi[:limit].tolist())]
        more = "" if flat.shape[1] <= limit else f" … ({flat.shape[1]} components)"
        parts.append(f"{name} ∈ {' × '.join(shown)}{more}")
    return "; ".join(parts) or "(no continuous latents)"


@dataclass(frozen=True)
class _ChunkJob:
    """Everything a worker needs for one chunk; picklable when the model is."""

    model: Callable
    model_args: tuple
    model_kwargs: dict
    sites: tuple[SiteInfo, ...]
    outer_dim: int
    chunk: int
    start: int
    size: int
    seed: int
    device: str
    retries: int = 0  # whole-chunk attempts after the first, before isolating failures
    planned: int | None = None  # simulations of the whole run (see planned_simulations)


_MAX_ISOLATION_CALLS = 256
_FAILED = "__failed__"


def _simulate_chunk(job: _ChunkJob) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """One chunk for :func:`simulate`: retried, then bisected on failure.

    Returns ``(values, failures)``: the simulations that ran (with their global ``__index__``),
    and for each simulation that failed on its own ``{"index", "parameters", "error"}``.
    """
    for attempt in range(job.retries + 1):
        try:
            return _run_chunk(job), []
        except SimulatorOutputError:
            raise
        except SimulationError as e:
            error, given = e, getattr(e, "latents", None)
    if not given:  # nothing to hold fixed (it failed before any latent was drawn): all of it failed
        cause = error.__cause__ if error.__cause__ is not None else error
        return _empty_values(job), [{"index": i, "parameters": {}, "error": _first_line(cause)}
                                    for i in range(job.start, job.start + job.size)]
    return _isolate(job, given, error)


def _isolate(job: _ChunkJob, given: dict[str, torch.Tensor], error: SimulationError):
    """Bisect a failing chunk with its latents ``given`` fixed; sub-runs are seeded from
    ``(chunk seed, first row, size)``, so the outcome is deterministic for a given seed."""
    sites = {s.name: s for s in job.sites}
    returns = [s for s in job.sites if s.name not in given]
    kept: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
    failures: list[dict] = []
    calls = 0

    def attempt(rows: torch.Tensor) -> None:
        nonlocal calls
        calls += 1
        sub_seed = int(np.random.SeedSequence([job.seed, int(rows[0]), len(rows)]).generate_state(2, np.uint32)
                       .view(np.uint64)[0] >> 1)
        try:
            if calls > _MAX_ISOLATION_CALLS:
                raise SimulationError(f"not isolated: more than {_MAX_ISOLATION_CALLS} bisection runs")
            out = run_given(job.model, {k: v[rows] for k, v in given.items()}, returns, job.outer_dim,
                            model_args=job.model_args, model_kwargs=job.model_kwargs, seed=sub_seed,
                            device=torch.device(job.device), latent_info=sites)
            kept.append((rows, {k: v.cpu() for k, v in out.items()}))
        except SimulatorOutputError:
            raise
        except SimulationError as e:
            if len(rows) == 1 or calls > _MAX_ISOLATION_CALLS:
                cause = e.__cause__ if e.__cause__ is not None else e
                for r in rows.tolist():
                    failures.append({"index": job.start + r,
                                     "parameters": {k: v[r].tolist() for k, v in given.items()},
                                     "error": _first_line(cause)})
                return
            half = len(rows) // 2
            attempt(rows[:half])
            attempt(rows[half:])

    attempt(torch.arange(job.size))
    rows = torch.cat([r for r, _ in kept]) if kept else torch.empty(0, dtype=torch.int64)
    order = rows.argsort()
    values = {}
    for s in job.sites:
        part = given[s.name] if s.name in given else None
        if part is not None:
            values[s.name] = part[rows[order]]
        else:
            values[s.name] = (torch.cat([o[s.name] for _, o in kept]) if kept
                              else torch.empty((0,) + s.shape, dtype=getattr(torch, s.dtype)))[order]
    values[_INDEX] = job.start + rows[order]
    return values, sorted(failures, key=lambda f: f["index"])


# Pyro's effect-handler stack and torch's default generator are process-global: two chunks
# run by threads of one process (a ThreadPoolExecutor, a Dask worker with several threads)
# would see each other's plates and seeds. One chunk at a time per process, then.
_PROCESS_LOCK = threading.RLock()


def _run_chunk(job: _ChunkJob) -> dict[str, torch.Tensor]:
    """Simulate one chunk; returns CPU tensors ``(size, *site_shape)`` plus the index."""
    with _PROCESS_LOCK:
        return _run_chunk_locked(job)


def device_context(device: torch.device):
    """A context making ``device`` the default for tensors the model creates: every run of a
    user's model on a device goes through it (its priors' ``torch.zeros(3)`` land there). When it already is
    (CPU, as a rule) no context is entered: torch's device mode intercepts every torch call, which
    nearly doubled the time of loop-heavy simulators (the Lotka–Volterra MJP: 28 s → 51 s)."""
    return contextlib.nullcontext() if torch.empty(()).device == device else device


def _run_chunk_locked(job: _ChunkJob) -> dict[str, torch.Tensor]:
    device = torch.device(job.device)
    tracer = poutine.trace(job.model)
    token = _PLANNED.set(job.planned if job.planned is not None else job.size)
    try:
        with seeded(job.seed, device), device_context(device), \
                pyro.plate(_OUTER_PLATE, job.size, dim=job.outer_dim):
            trace = tracer.get_trace(*job.model_args, **job.model_kwargs)
    except SimulatorOutputError as e:  # a broken contract: a bug, never isolated
        raise SimulatorOutputError(f"chunk {job.chunk} (simulations {job.start}..{job.start + job.size - 1}): "
                                   f"{_first_line(e)}") from e
    except Exception as e:  # the simulator is user code: say where it failed, keep the cause
        partial = {n: s["value"].detach().reshape(job.size, -1).cpu()
                   for n, s in tracer.msngr.trace.nodes.items()
                   if s in _random_sites(tracer.msngr.trace) and isinstance(s.get("value"), torch.Tensor)
                   and s["value"].numel() % max(job.size, 1) == 0}
        latent = [s.name for s in job.sites if not s.observed]
        err = SimulationError(
            f"the model failed in chunk {job.chunk} (simulations {job.start}..{job.start + job.size - 1}, "
            f"chunk seed {job.seed}) with {type(e).__name__}: {e}\n"
            f"parameters in that chunk: {_latent_ranges(partial, latent)}")
        # the latents drawn before the failure, complete for every simulation: held fixed to
        # isolate the failing simulations (see _isolate)
        err.latents = {n: partial[n].reshape((job.size,) + s.shape) for s in job.sites
                       for n in [s.name] if not s.observed and n in partial
                       and partial[n].numel() == job.size * math.prod(s.shape)}
        raise err from e
    finally:
        _PLANNED.reset(token)
    out = {}
    for site in job.sites:
        value = trace.nodes[site.name]["value"]
        want = (job.size,) + site.shape
        if value.numel() != math.prod(want):
            raise SimulatorOutputError(
                f"site '{site.name}' has shape {tuple(value.shape)} under a plate of {job.size} simulations, "
                f"which cannot hold {job.size} copies of its single-run shape {site.shape}; does its "
                "simulator ignore the batch?")
        if str(value.dtype).removeprefix("torch.") != site.dtype:
            raise SimulatorOutputError(
                f"site '{site.name}' has dtype {value.dtype} in chunk {job.chunk}, but {site.dtype} in the trial run; "
                "a simulator must return one dtype whatever its parameters")
        out[site.name] = value.detach().reshape(want).cpu()
    out[_INDEX] = torch.arange(job.start, job.start + job.size, dtype=torch.int64)
    return out


class _Store:
    """A directory of chunk files plus a manifest; chunks are written atomically."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest

    @classmethod
    def open(cls, path, manifest: dict, seed_given: bool) -> "_Store":
        path = Path(path)
        mpath = path / "manifest.json"
        if path.exists() and not path.is_dir():
            raise ValueError(f"store: {str(path)!r} exists and is not a directory")
        if mpath.exists():
            try:
                old = json.loads(mpath.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise StoreMismatchError(f"store: {mpath} is unreadable: {e}") from e
            if old.get("kind") != _STORE_KIND or old.get("format_version", 0) > _STORE_VERSION:
                raise StoreMismatchError(f"store: {mpath} is not an implicitbayes simulation store of a supported version")
            if not seed_given:
                manifest["seed"] = old["seed"]
            diffs = [f"{k}: store has {old.get(k)!r}, asked {manifest[k]!r}"
                     for k in ("seed", "batch_size", "observed", "sites", "model", "device") if old.get(k) != manifest[k]]
            if diffs:
                raise StoreMismatchError(f"store {str(path)!r} was written with other settings; use another "
                                         "directory or the same settings:\n  " + "\n  ".join(diffs))
        elif path.exists() and any(path.iterdir()):
            raise ValueError(f"store: {str(path)!r} is a non-empty directory that is not a simulation store; "
                             "give a new or empty directory")
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob(".*.tmp"):  # left by a writer killed mid-write; never a finished chunk
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        atomic_write_text(mpath, json.dumps(manifest, indent=1))
        return cls(path, manifest)

    def chunk_path(self, k: int) -> Path:
        return self.path / f"chunk-{k:07d}.safetensors"

    def load(self, job: _ChunkJob) -> tuple[dict[str, torch.Tensor], list[dict]] | None:
        p = self.chunk_path(job.chunk)
        if not p.exists():
            return None
        tensors, meta = load_tensors(p, kind=_CHUNK_KIND, max_version=_STORE_VERSION)
        if (meta.get("start"), meta.get("size"), meta.get("seed")) != (job.start, job.size, job.seed):
            return None  # planned differently (e.g. num_simulations grew): simulate it again
        missing = [s.name for s in job.sites if s.name not in tensors] + ([] if _INDEX in tensors else [_INDEX])
        if missing:
            from .errors import FormatError

            raise FormatError(f"{p}: chunk file lacks the tensors {missing}")
        return tensors, list(meta.get("failures", []))

    def save(self, job: _ChunkJob, values: dict[str, torch.Tensor], failures: list[dict]) -> None:
        save_tensors(self.chunk_path(job.chunk), values, kind=_CHUNK_KIND, version=_STORE_VERSION,
                     meta={"start": job.start, "size": job.size, "seed": job.seed, "failures": failures})


def _empty_values(job: _ChunkJob) -> dict[str, torch.Tensor]:
    out = {s.name: torch.empty((0,) + s.shape, dtype=getattr(torch, s.dtype)) for s in job.sites}
    out[_INDEX] = torch.empty(0, dtype=torch.int64)
    return out


def _first_line(e: BaseException) -> str:
    """``Type: message`` without the trace-shape table Pyro appends to errors inside a model."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "[" + ", ".join(_fmt(x) for x in v) + "]" if isinstance(v, list) else str(v)


def _describe_failures(failures: Sequence[dict], limit: int = 5) -> str:
    lines = [f"  simulation {f['index']}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in f["parameters"].items())
             + f" ({f['error']})" for f in failures[:limit]]
    if len(failures) > limit:
        lines.append(f"  … and {len(failures) - limit} more")
    return "\n".join(lines)


class _Assembler:
    """Puts chunks together in order, dropping simulations with NaN/inf values: in memory, or
    (``directory`` given) appended to one raw file per site and returned memory-mapped, so the
    result of a store of any size costs one chunk of memory to build and none to hold."""

    def __init__(self, sites: Sequence[SiteInfo], latent: Sequence[str], directory: Path | None = None,
                 num_simulations: int = 0):
        self.sites, self.latent, self.directory = list(sites), list(latent), directory
        self.names = [s.name for s in self.sites] + [_INDEX]
        self.n_rows = self.n_bad = 0
        self._parts: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        self._bad: dict[str, list[torch.Tensor]] = {n: [] for n in self.latent}
        self.reused = False
        if directory is None:
            return
        from .simulation_set import MAPPED_MANIFEST, open_mapped

        self._manifest = {"num_simulations": num_simulations,
                          "sites": {s.name: [list(s.shape), s.dtype] for s in self.sites}}
        done = directory / MAPPED_MANIFEST
        if done.exists():
            try:
                old = json.loads(done.read_text())
                if {k: old.get(k) for k in self._manifest} == self._manifest:
                    self._mapped = open_mapped(directory)
                    self.n_rows, self.n_bad = old["n_rows"], old["n_bad"]
                    self._bad = {n: [torch.as_tensor(v)] for n, v in old.get("bad_latents", {}).items()}
                    self.reused = True
                    return
            except (OSError, ValueError, KeyError):
                pass  # unreadable or stale: rebuild it from the chunks
        self._tmp = Path(tempfile.mkdtemp(prefix=".set-", suffix=".tmp", dir=directory.parent))
        self._files = {n: open(self._tmp / f"{n}.bin", "wb") for n in self.names}

    def add(self, values: Mapping[str, torch.Tensor]) -> None:
        index = values[_INDEX]
        finite = torch.ones(index.shape[0], dtype=torch.bool)
        for s in self.sites:
            v = values[s.name]
            if v.is_floating_point():
                finite &= torch.isfinite(v.reshape(v.shape[0], -1)).all(1)
        self.n_rows += int(index.shape[0])
        if not finite.all():
            self.n_bad += int((~finite).sum())
            for n in self.latent:
                self._bad[n].append(values[n][~finite])
        for n in self.names:
            kept = values[n][finite]
            if self.directory is None:
                self._parts[n].append(kept)
            else:
                self._files[n].write(kept.contiguous().numpy().tobytes())

    def bad_latents(self) -> dict[str, torch.Tensor]:
        return {n: torch.cat(v) for n, v in self._bad.items() if v}

    def finish(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if self.directory is None:
            values = {n: torch.cat(p) for n, p in self._parts.items()}
        elif self.reused:
            values = dict(self._mapped)
        else:
            from .simulation_set import MAPPED_MANIFEST, open_mapped

            for f in self._files.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
            kept = self.n_rows - self.n_bad
            shapes = {**{s.name: [kept, *s.shape] for s in self.sites}, _INDEX: [kept]}
            dtypes = {**{s.name: s.dtype for s in self.sites}, _INDEX: "int64"}
            manifest = {**self._manifest, "n_rows": self.n_rows, "n_bad": self.n_bad,
                        "arrays": {n: {"shape": shapes[n], "dtype": dtypes[n]} for n in self.names},
                        "bad_latents": {n: v.tolist() for n, v in self.bad_latents().items()}}
            atomic_write_text(self._tmp / MAPPED_MANIFEST, json.dumps(manifest))
            if self.directory.exists():  # a stale one: swap the new one in
                old = self.directory.with_name(f".old-{self.directory.name}-{os.getpid()}.tmp")
                os.replace(self.directory, old)
                os.replace(self._tmp, self.directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self._tmp, self.directory)
            values = dict(open_mapped(self.directory))
        index = values.pop(_INDEX)
        return values, index


def run_given(model: Callable, given: Mapping[str, torch.Tensor], returns: Sequence[SiteInfo], outer_dim: int, *,
              model_args: tuple = (), model_kwargs: Mapping[str, Any] | None = None, seed: int = 0,
              device: torch.device = torch.device("cpu"), latent_info: Mapping[str, SiteInfo] | None = None
              ) -> dict[str, torch.Tensor]:
    """Run ``model`` once, vectorized over ``n`` copies, with the sites in ``given``
    (``{site: (n, *shape)}``) fixed; the other sites are drawn from the model. Returns
    ``{site: (n, *shape)}`` on ``device`` for each of ``returns`` (NaN/inf included). The sites'
    layout comes from :func:`model_sites` (``latent_info`` describes the given sites)."""
    info = {s.name: s for s in (latent_info.values() if latent_info is not None else returns)}
    sizes = {v.shape[0] for v in given.values()}
    if len(sizes) != 1:
        raise ValueError(f"latents: every site needs the same leading dimension, got {sorted(sizes)}")
    n = sizes.pop()
    for name, v in given.items():
        if tuple(v.shape[1:]) != info[name].shape:
            raise ValueError(f"latents: site '{name}' must have shape (n, {info[name].shape}), got {tuple(v.shape)}")
    data = {k: plate_layout(torch.as_tensor(v, device=device), outer_dim, info[k].batch_ndim) for k, v in given.items()}
    job = _ChunkJob(poutine.condition(model, data=data), tuple(model_args), dict(model_kwargs or {}),
                    tuple(returns), outer_dim, 0, 0, n, seed, str(device))
    out = _run_chunk(job)
    return {s.name: out[s.name].to(device) for s in returns}


def trace_given(model: Callable, given: Mapping[str, torch.Tensor], info: Mapping[str, SiteInfo], outer_dim: int, *,
                model_args: tuple = (), model_kwargs: Mapping[str, Any] | None = None,
                device: torch.device = torch.device("cpu")) -> poutine.Trace:
    """The trace of one run of ``model`` vectorized over ``n`` copies (the outer plate at
    ``outer_dim``, as :func:`simulate` runs it), every site in ``given`` (``{site: (n, *shape)}``)
    fixed to its values and described by ``info`` (from :func:`model_sites`). With every random
    site given, no simulator runs: the trace shows what each site's distribution was built from
    (e.g. the parameters an ``ib.Implicit`` passes its simulator)."""
    n = {v.shape[0] for v in given.values()}
    if len(n) != 1:
        raise ValueError(f"given: every site needs the same leading dimension, got {sorted(n)}")
    data = {k: plate_layout(torch.as_tensor(v, device=device), outer_dim, info[k].batch_ndim) for k, v in given.items()}
    with _PROCESS_LOCK, device_context(device), pyro.plate(_OUTER_PLATE, n.pop(), dim=outer_dim):
        return poutine.trace(poutine.condition(model, data=data)).get_trace(*tuple(model_args),
                                                                             **dict(model_kwargs or {}))


def simulate_at(model: Callable, latents: Mapping[str, torch.Tensor], *, observed: str | Sequence[str],
                model_args: tuple = (), model_kwargs: Mapping[str, Any] | None = None, seed: int = 0,
                device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Simulate the observed sites at given latents ``{site: (n, *shape)}`` in one vectorized call.

    Every latent site of the model must be given. Returns ``{observed site: (n, *shape)}`` on
    ``device``, NaN/inf included (the caller decides what to do with them).
    """
    observed = [observed] if isinstance(observed, str) else list(observed)
    dev = resolve_device(device)
    sites, outer_dim = model_sites(model, observed, model_args, model_kwargs)
    latent = {s.name: s for s in sites if not s.observed}
    if set(latents) != set(latent):
        raise ValueError(f"latents: expected values for exactly {sorted(latent)}, got {sorted(latents)}")
    return run_given(model, latents, [s for s in sites if s.observed], outer_dim, model_args=model_args,
                     model_kwargs=model_kwargs, seed=seed, device=dev, latent_info=latent)


def simulate(
    model: Callable,
    num_simulations: int,
    *,
    observed: str | Sequence[str],
    model_args: tuple = (),
    model_kwargs: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    device: str | torch.device | None = None,
    executor: cf.Executor | None = None,
    store: str | os.PathLike | None = None,
    retries: int = 0,
    on_error: str = "raise",
    progress: bool = True,
) -> SimulationSet:
    """Simulate ``num_simulations`` joint draws ``(latents, observed)`` from a Pyro model.

    Args:
        model: a Pyro model; its data sites are usually ``ib.Implicit``.
        num_simulations: how many simulations (``> 0``).
        observed: the data site name(s); every other random site is a latent.
        model_args, model_kwargs: passed to ``model``.
        batch_size: simulations per chunk (one vectorized model call); default
            ``min(num_simulations, 10_000)``. Results depend on it (and on the seed).
        seed: integer seed; ``None`` draws one (recorded in ``SimulationSet.meta``).
        device: where the model runs (``torch.device`` context) and the result lives.
        executor: any ``concurrent.futures.Executor`` (e.g. a ``ProcessPoolExecutor`` or a
            Dask ``Client.get_executor()``) to run chunks in parallel; the model must be
            picklable for it. ``None`` runs in this process. Threads of one process run one
            chunk at a time (Pyro's handler stack is process-global): parallelism comes from
            processes.
        store: directory written chunk by chunk; running again with the same store resumes
            (only missing chunks are simulated).
        retries: how often a chunk whose simulator raised is tried again (same seed) before
            its failing simulations are isolated by bisection and ``on_error`` applies. A chunk
            lost by the executor (a worker killed) is resubmitted up to ``max(retries, 3)`` times.
        on_error: ``"raise"`` (default) raises :class:`SimulationError` naming each failing
            simulation with its parameters; ``"drop"`` drops only those simulations (the rest of
            their chunk is kept) and counts them in ``num_invalid``.
        progress: show a tqdm progress bar.

    Returns:
        A :class:`SimulationSet` with ``(n_valid, *site_shape)`` tensors on ``device``.
    """
    num_simulations = integer("num_simulations", num_simulations)
    batch_size = integer("batch_size", batch_size, none=True) or min(num_simulations, DEFAULT_BATCH_SIZE)
    if isinstance(observed, str):
        observed = [observed]
    observed = list(observed) if observed is not None else []
    if not observed or not all(isinstance(o, str) for o in observed):
        raise ValueError(f"observed: expected a site name or a list of site names, got {observed!r}")
    seed = integer("seed", seed, minimum=0, none=True)
    if on_error not in ("raise", "drop"):
        raise ValueError(f"on_error: expected 'raise' or 'drop', got {on_error!r}")
    retries = integer("retries", retries, minimum=0)
    if executor is not None and not isinstance(executor, cf.Executor):
        raise TypeError(f"executor: expected a concurrent.futures.Executor, got {type(executor).__name__}")
    if not callable(model):
        raise TypeError(f"model: expected a callable Pyro model, got {type(model).__name__}")
    dev = resolve_device(device)
    model_args, model_kwargs = tuple(model_args), dict(model_kwargs or {})

    sites, outer_dim = model_sites(model, observed, model_args, model_kwargs)
    seed_given = seed is not None
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**62))
    model_name = f"{getattr(model, '__module__', '?')}.{getattr(model, '__qualname__', type(model).__name__)}"
    manifest = {"kind": _STORE_KIND, "format_version": _STORE_VERSION, "seed": int(seed), "batch_size": batch_size,
                "num_simulations": num_simulations, "observed": observed, "model": model_name, "device": dev.type,
                "sites": {s.name: [list(s.shape), s.dtype] for s in sites}}
    st = _Store.open(store, manifest, seed_given) if store is not None else None
    if st is not None:
        seed = st.manifest["seed"]

    jobs = []
    for k, start in enumerate(range(0, num_simulations, batch_size)):
        size = min(batch_size, num_simulations - start)
        jobs.append(_ChunkJob(model, model_args, model_kwargs, tuple(sites), outer_dim, k, start, size,
                              _chunk_seed(seed, k), str(dev), retries))

    from tqdm.auto import tqdm

    results: dict[int, dict[str, torch.Tensor]] = {}
    failures: list[dict] = []
    bar = tqdm(total=num_simulations, desc="simulating", unit="sim", disable=not progress)

    def finish(job, values, chunk_failures):
        if chunk_failures and on_error == "raise":
            raise SimulationError(
                f"{len(chunk_failures)} simulation(s) of chunk {job.chunk} (simulations {job.start}.."
                f"{job.start + job.size - 1}) failed on their own (after {retries} "
                f"retries of the chunk); pass on_error='drop' to drop them:\n{_describe_failures(chunk_failures)}")
        failures.extend(chunk_failures)
        if st is not None:
            st.save(job, values, chunk_failures)  # read back, in order, when assembling
        else:
            results[job.chunk] = values
        bar.update(job.size)

    try:
        todo = []
        for job in jobs:
            cached = st.load(job) if st is not None else None
            if cached is None:
                todo.append(job)
            else:
                failures.extend(cached[1])
                bar.update(job.size)
        planned = sum(job.size for job in todo)
        todo = [dataclasses.replace(job, planned=planned) for job in todo]
        if executor is None:
            for job in todo:
                finish(job, *_simulate_chunk(job))
        else:
            # the model's own failures are retried inside the task; these retries are for the
            # executor failing (a worker killed, a lost connection): same job, same seed
            resubmits = {job.chunk: 0 for job in todo}
            pending = {executor.submit(_simulate_chunk, job): job for job in todo}
            while pending:
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    job = pending.pop(fut)
                    try:
                        values, chunk_failures = fut.result()
                    except SimulationError:
                        raise
                    except Exception as e:  # the worker died or the task was lost
                        resubmits[job.chunk] += 1
                        if resubmits[job.chunk] <= max(retries, 3):
                            pending[executor.submit(_simulate_chunk, job)] = job
                            continue
                        error = SimulationError(
                            f"chunk {job.chunk} (simulations {job.start}..{job.start + job.size - 1}) failed in the "
                            f"executor {resubmits[job.chunk]} times: {type(e).__name__}: {e}")
                        if on_error == "raise":
                            raise error from e
                        values, chunk_failures = _empty_values(job), [
                            {"index": i, "parameters": {}, "error": str(error)} for i in range(job.start, job.start + job.size)]
                    finish(job, values, chunk_failures)
    finally:
        bar.close()

    latent = [s.name for s in sites if not s.observed]
    if st is None:
        assembler = _Assembler(sites, latent)
        for k in range(len(jobs)):
            assembler.add(results.pop(k))
    else:  # chunk by chunk from the store into memory-mapped files: one chunk in memory at a time
        assembler = _Assembler(sites, latent, directory=st.path / "set", num_simulations=num_simulations)
        if not assembler.reused:
            for job in jobs:
                assembler.add(st.load(job)[0])
    values, index = assembler.finish()
    n_failed = num_simulations - assembler.n_rows
    if n_failed:
        warnings.warn(f"simulate: dropped {n_failed} failing simulation(s) (on_error='drop'):\n"
                      + _describe_failures(failures), stacklevel=2)
    n_bad = assembler.n_bad
    if n_bad:
        ranges = _latent_ranges(assembler.bad_latents(), latent)
        msg = (f"{n_bad} of {num_simulations} simulations produced NaN/inf outputs; parameters of "
               f"those: {ranges}")
        if n_bad + n_failed > num_simulations / 2:
            raise SimulationError(msg + ". More than half are invalid: check the simulator and the prior.")
        warnings.warn(f"simulate: dropped {msg}", stacklevel=2)
    if n_failed > num_simulations / 2:
        raise SimulationError(f"{n_failed} of {num_simulations} simulations failed; more than half")
    meta = {"seed": int(seed), "batch_size": batch_size, "model": model_name, "device": dev.type,
            "num_requested": num_simulations, "failed_indices": sorted(f["index"] for f in failures)}
    if st is not None:
        meta["store"] = str(st.path)
    return SimulationSet({n: v.to(dev) for n, v in values.items()},
                         latent_names=latent, observed_names=[s.name for s in sites if s.observed],
                         num_invalid=n_bad + n_failed, index=index, meta=meta)
