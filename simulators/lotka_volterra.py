"""Stochastic Lotka–Volterra predator–prey models: Markov jump process and its diffusion (CLE).

X predators, Y prey; four reactions with hazards (Papamakarios & Murray 2016, Tran et al. 2017)

    h1 = θ1·X·Y  (X → X+1),   h2 = θ2·X  (X → X−1),
    h3 = θ3·Y    (Y → Y+1),   h4 = θ4·X·Y  (Y → Y−1).

X0 = 50, Y0 = 100, recorded every 0.2 on [0, 30] (151 points per species); prior
log θ ~ U(−5, 2)^4, θ* = (0.01, 0.5, 1, 0.01).

SDE (chemical Langevin equation, Itô), Euler–Maruyama with step ``dt``:

    dX = (h1 − h2) dt + √h1 dW1 − √h2 dW2,   dY = (h3 − h4) dt + √h3 dW3 − √h4 dW4.

Since W1, W2 enter only X and W3, W4 only Y, √h1 dW1 − √h2 dW2 has the law of √(h1+h2) dB1:
we draw two normals per step instead of four (same process in law). The normals come from a
counter-based generator fused into the step kernel (see ``_splitmix64``), compiled ahead of
time and kept on disk (``implicitbayes.kernels``; benchmarks/simulate_lv.py measures it
against torchsde).

Policies, identical for both simulators:

* **Extinction** — 0 is absorbing: a step that would make a population negative sets it to
  0, and the hazards that involve it vanish from then on.
* **Blow-up** — under the wide prior many parameter sets explode (prey without predators
  grows like e^{θ3 t}; Euler steps overflow). A path whose population exceeds
  ``max_population`` (or becomes non-finite) is *stopped*: with ``on_blowup="freeze"``
  (default) every later record holds the last state, clamped to ``max_population``, so the
  output stays finite and still says "this parameter set explodes"; with ``on_blowup="nan"``
  the later records are NaN, so ``ib.simulate`` drops and counts those simulations.
* **Event cap (MJP)** — a path stops after ``max_events`` reactions (default 10^5, far above
  the ≈ 10^4 at θ*); its later records follow ``on_blowup`` as well.

Summaries (``output="summaries"``, 9 values): mean of X and Y, log(variance + 1) of X and Y
(finite for constant series), autocorrelations at lags 1 and 2 of X, then of Y, and the
cross-correlation of X and Y (correlations of a constant series are 0). They are normalised by
the mean and SD of a pilot run of 1 000 prior simulations of the SDE (fixed seed, its own
generator) from which blown-up runs are left out, as Papamakarios & Murray reject over-long
simulations: the few that explode would otherwise set the scale for all others. The MJP uses
the same SDE pilot (an exact pilot run under the wide prior takes about a minute), so both
simulators' summaries are on one scale and directly comparable.
"""

from __future__ import annotations

import math

import torch

import implicitbayes as ib
from implicitbayes.checks import integer
from implicitbayes.kernels import AOTKernel
from implicitbayes.simulate import planned_simulations, resolve_device

from .base import Task, generator_for

__all__ = ["lv_sde", "build_kernel", "lv_mjp", "lv_summaries", "LotkaVolterraSDE", "LotkaVolterraMJP", "THETA_STAR"]

THETA_STAR = (0.01, 0.5, 1.0, 0.01)


def _check_theta(theta: torch.Tensor) -> None:
    if theta.dim() != 2 or theta.shape[1] != 4:
        raise ValueError(f"theta: expected shape (n, 4), got {tuple(theta.shape)}")
    if not torch.isfinite(theta).all() or (theta < 0).any():
        raise ValueError("theta: Lotka–Volterra rates must be finite and non-negative")


def _initial_state(x0, n: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(predators, prey) at time 0 as two ``(n,)`` tensors, from a pair or an ``(n, 2)`` tensor."""
    if isinstance(x0, torch.Tensor) and x0.dim() == 2:
        if x0.shape != (n, 2):
            raise ValueError(f"x0: expected a pair or a tensor of shape ({n}, 2), got shape {tuple(x0.shape)}")
        start = x0.to(device=device, dtype=dtype)
    else:
        start = torch.as_tensor([float(v) for v in x0], device=device, dtype=dtype)
        if start.shape != (2,):
            raise ValueError(f"x0: expected a pair or a tensor of shape ({n}, 2), got {x0!r}")
        start = start.expand(n, 2)
    if not torch.isfinite(start).all() or (start < 0).any():
        raise ValueError("x0: initial populations must be finite and non-negative")
    return start[:, 0].contiguous(), start[:, 1].contiguous()


def _grid(t_end: float, record_every: float, dt: float) -> tuple[int, int]:
    n_rec = round(t_end / record_every)
    per = round(record_every / dt)
    if n_rec <= 0 or abs(n_rec * record_every - t_end) > 1e-9 * t_end:
        raise ValueError(f"T={t_end} must be a positive multiple of record_every={record_every}")
    if per <= 0 or abs(per * dt - record_every) > 1e-9 * record_every:
        raise ValueError(f"record_every={record_every} must be a positive multiple of dt={dt}")
    return n_rec + 1, per


def _check_policy(on_blowup: str, max_population: float) -> None:
    if on_blowup not in ("freeze", "nan"):
        raise ValueError(f"on_blowup: expected 'freeze' or 'nan', got {on_blowup!r}")
    if not max_population > 0:
        raise ValueError(f"max_population: expected a positive number, got {max_population!r}")


# -- noise: a counter-based generator that the compiled kernel can fuse -----------------
# SplitMix64 (Steele, Lea & Flood 2014) of key + counter·γ, with counter = path·steps + step:
# each path's noise depends only on the key, its index and the step (not on the batch it is
# simulated in), and eager and compiled kernels draw the same numbers. Arithmetic is on int64
# with two's-complement wrap-around; logical shifts are arithmetic shifts with a mask.
_M64 = 1 << 64


def _wrap64(v: int) -> int:
    return (v + (1 << 63)) % _M64 - (1 << 63)


_GOLDEN = _wrap64(0x9E3779B97F4A7C15)
_MIX1 = _wrap64(0xBF58476D1CE4E5B9)
_MIX2 = _wrap64(0x94D049BB133111EB)
_U24 = 1.0 / (1 << 24)


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _MIX1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _MIX2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def _normal_pair(bits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent N(0, 1) from one 64-bit word: Box–Muller on two 24-bit uniforms in (0, 1)
    (so |z| < 5.9; the tail beyond has probability 4e-9)."""
    u1 = (((bits >> 40) & 0xFFFFFF).to(dtype) + 0.5) * _U24
    u2 = (((bits >> 16) & 0xFFFFFF).to(dtype) + 0.5) * _U24
    r = (-2.0 * u1.log()).sqrt()
    angle = (2 * math.pi) * u2
    return r * torch.cos(angle), r * torch.sin(angle)


def _em_interval(x, y, t1, t2, t3, t4, counter, per: int, cap: float):
    """``per`` Euler–Maruyama steps of the CLE for all paths; ``t_i = θ_i·dt`` and ``counter``
    ``(n,)`` int64 (key + (path·steps + first step)·γ). Returns the new ``(x, y)`` and whether
    each path is past ``cap`` or non-finite (the blow-up test, fused into the same kernel)."""
    for k in range(per):
        n1, n2 = _normal_pair(_splitmix64(counter + _wrap64(k * _GOLDEN)), x.dtype)
        xy = x * y
        a, b, c, d = t1 * xy, t2 * x, t3 * y, t4 * xy
        x = (x + (a - b) + (a + b).sqrt() * n1).clamp_min(0.0)
        y = (y + (c - d) + (c + d).sqrt() * n2).clamp_min(0.0)
    blown = ~(x <= cap) | ~(y <= cap)  # NaN compares False: caught here too
    return x, y, blown


#: the interval kernel compiled ahead of time and kept on disk (implicitbayes.kernels)
KERNEL = AOTKernel(_em_interval, name="lv_sde", sources=(_splitmix64, _normal_pair, _em_interval))
#: under backend="auto", a kernel not built yet is built (≈ 25 s on one core, once per machine)
#: for runs of at least this many path-steps, where the build pays for itself in the same run
AUTO_BUILD_PATH_STEPS = 2e9  # ≈ 670 000 simulations at dt 0.01, T 30


def _kernel(backend: str, work: float, example: tuple, constants: dict):
    """The eager kernel or the compiled one. ``auto``: the compiled one if this process has it,
    or its package is on disk (loading costs milliseconds), or ``work`` (path-steps of the
    whole run) is large enough to pay for building it."""
    eager = backend == "eager" or (
        backend == "auto" and KERNEL.loaded(example[0].device, example[0].dtype, constants) is None
        and not KERNEL.built(example[0].device, example[0].dtype, constants) and work < AUTO_BUILD_PATH_STEPS)
    if eager:
        return lambda *tensors: _em_interval(*tensors, **constants)
    return KERNEL.get(example, constants)


def build_kernel(*, dt: float = 0.01, record_every: float = 0.2, max_population: float = 1e5,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Build (once per machine, ≈ 25 s) and keep the compiled kernel for these settings, so
    that every later ``lv_sde`` call with them runs it. Returns the package's path, or ``None``
    where it cannot be built (a warning says why; ``lv_sde`` then runs eagerly). ``make venv``
    builds the defaults'."""
    _check_policy("freeze", max_population)
    _, per = _grid(record_every, record_every, dt)
    x = torch.ones(2, device=resolve_device(device), dtype=dtype)
    constants = {"per": per, "cap": float(max_population)}
    KERNEL.get((x, x, x, x, x, x, torch.zeros(2, device=device, dtype=torch.int64)), constants)
    path = KERNEL.path(x.device, dtype, constants)
    return path if path.is_file() else None


def lv_sde(
    theta: torch.Tensor, *, x0: tuple[float, float] | torch.Tensor = (50.0, 100.0), dt: float = 0.01,
    T: float = 30.0, record_every: float = 0.2, max_population: float = 1e5, on_blowup: str = "freeze",
    generator: torch.Generator | None = None, backend: str = "auto",
) -> torch.Tensor:
    """Batched Euler–Maruyama for the Lotka–Volterra CLE.

    Args:
        theta: ``(n, 4)`` reaction rates. x0: initial (predators, prey), one pair for every
            path or an ``(n, 2)`` tensor of them (finite, non-negative).
        dt, T, record_every: step, horizon and recording interval (multiples of each other).
        max_population, on_blowup: blow-up policy (module docstring).
        generator: torch generator the per-call noise key is drawn from (``None``: global RNG).
        backend: ``"eager"``, ``"compile"`` (``record_every / dt`` steps and their noise
            fused into one kernel compiled ahead of time by AOTInductor, built once per
            machine, ≈ 25 s, and kept in :func:`implicitbayes.kernels.cache_dir`) or
            ``"auto"`` (the compiled kernel where it is built already, or where the run —
            this call, or the whole ``ib.simulate`` run it is a chunk of — has at least
            ``AUTO_BUILD_PATH_STEPS`` path-steps). Both draw the same noise; their floats
            differ by rounding only.

    Returns:
        ``(n, 2, T / record_every + 1)`` populations (predators, prey) at the record times,
        on ``theta``'s device. Memory is O(n × records): steps and noise are never stored.
    """
    _check_theta(theta)
    _check_policy(on_blowup, max_population)
    if backend not in ("auto", "eager", "compile"):
        raise ValueError(f"backend: expected 'auto', 'eager' or 'compile', got {backend!r}")
    n_rec, per = _grid(T, record_every, dt)
    n, dev, dtype = theta.shape[0], theta.device, theta.dtype
    steps = (n_rec - 1) * per
    t1, t2, t3, t4 = (theta[:, i].contiguous() * dt for i in range(4))
    key = int(torch.randint(-(1 << 63), (1 << 63) - 1, (1,), generator=generator, device=dev, dtype=torch.int64))
    counter = torch.arange(n, device=dev, dtype=torch.int64) * _wrap64(steps * _GOLDEN) + key
    x, y = _initial_state(x0, n, dtype, dev)
    records = torch.empty(n_rec, 2, n, dtype=dtype, device=dev)  # contiguous writes; transposed once
    records[0, 0], records[0, 1] = x, y
    stopped = torch.zeros(n, dtype=torch.bool, device=dev)
    frozen = torch.zeros(2, n, dtype=dtype, device=dev)
    planned = max(n, planned_simulations() or 0)  # ib.simulate runs chunks of one larger run
    kernel = _kernel(backend, float(planned) * steps, (x, y, t1, t2, t3, t4, counter),
                     {"per": per, "cap": float(max_population)})
    any_stopped = False
    step_block = _wrap64(per * _GOLDEN)
    for r in range(1, n_rec):
        x, y, blown = kernel(x, y, t1, t2, t3, t4, counter)
        counter = counter + step_block
        if any_stopped or bool(blown.any()):
            newly = blown & ~stopped
            if bool(newly.any()):
                state = torch.stack([x[newly], y[newly]])
                frozen[:, newly] = torch.nan_to_num(state, nan=max_population,
                                                    posinf=max_population).clamp(0, max_population)
                stopped |= newly
                any_stopped = True
            x = torch.where(stopped, frozen[0], x)
            y = torch.where(stopped, frozen[1], y)
        records[r, 0], records[r, 1] = x, y
    out = records.permute(2, 1, 0).contiguous()
    if on_blowup == "nan" and stopped.any():
        _nan_after_stop(out, stopped, frozen)
    return out


def _nan_after_stop(out: torch.Tensor, stopped: torch.Tensor, frozen: torch.Tensor) -> None:
    """Replace the frozen tail of stopped paths by NaN (``on_blowup="nan"``)."""
    held = (out == frozen.T[:, :, None]).all(1) & stopped[:, None]
    # the tail is the run of records equal to the frozen state that reaches the last record
    tail = held.flip(-1).cumprod(-1).flip(-1).bool()
    out.masked_fill_(tail[:, None, :], float("nan"))


_STOICH = ((1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0))


def _gamma(shape: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gamma(shape, 1) draws for ``shape >= 1`` (Marsaglia & Tsang 2000), honouring ``generator``."""
    d = shape - 1.0 / 3.0
    c = 1.0 / (9.0 * d).sqrt()
    out = torch.empty_like(shape)
    todo = torch.ones_like(shape, dtype=torch.bool)
    while todo.any():
        z = torch.randn(shape.shape, generator=generator, device=shape.device, dtype=shape.dtype)
        u = torch.rand(shape.shape, generator=generator, device=shape.device, dtype=shape.dtype)
        v = (1 + c * z) ** 3
        ok = todo & (v > 0) & (u.log() < 0.5 * z**2 + d - d * v + d * v.clamp_min(1e-300).log())
        out = torch.where(ok, d * v, out)
        todo &= ~ok
    return out


def _finish_single_species(state, rate_birth_prey, rate_death_pred, dt, cap, generator):
    """Exact transition over ``dt`` once a species is extinct.

    Predators extinct: prey is a Yule (pure birth) process, Y(t+dt) − Y(t) ~ NegBin(Y(t),
    e^{−θ3·dt}) drawn as Poisson(Gamma(Y) · (e^{θ3·dt} − 1)). Prey extinct: predators die
    independently, X(t+dt) ~ Binomial(X(t), e^{−θ2·dt}). Both extinct: nothing happens.
    """
    x, y = state[:, 0], state[:, 1]
    grow = (x == 0) & (y > 0)
    mean_factor = torch.expm1(rate_birth_prey * dt).clamp(max=1e30)
    g = _gamma(torch.where(grow, y, torch.ones_like(y)), generator)
    births = torch.poisson((g * mean_factor).clamp(max=4 * cap), generator=generator)
    y_new = torch.where(grow, y + births, y)
    survive = torch.exp(-rate_death_pred * dt)
    x_new = torch.where((y == 0) & (x > 0), torch.binomial(x, survive, generator=generator), x)
    return torch.stack([x_new, y_new], 1)


def lv_mjp(
    theta: torch.Tensor, *, x0: tuple[float, float] = (50.0, 100.0), T: float = 30.0, record_every: float = 0.2,
    max_events: int = 100_000, max_population: float = 1e5, on_blowup: str = "freeze",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Exact Gillespie simulation, batched across parameter sets.

    Each iteration fires one reaction in every *active* path: both species alive, below
    ``max_population``, before ``T``, fewer than ``max_events`` reactions. A path that leaves
    the active set is dropped from the loop's tensors, so the long tail of iterations (a few
    fast-reacting paths run to 10^4–10^5 events while most finish within 10^3) costs per path
    left, not per path in the batch. Once a species is extinct the other follows a pure birth
    or pure death process whose transitions are known in closed form: such paths are completed
    exactly, record by record, all together after the loop.

    Returns:
        ``(n, 2, T / record_every + 1)`` populations at the record times.
    """
    _check_theta(theta)
    _check_policy(on_blowup, max_population)
    integer("max_events", max_events)
    n_rec, _ = _grid(T, record_every, record_every)
    n, dev = theta.shape[0], theta.device
    f64 = dict(dtype=torch.float64, device=dev)
    stoich = torch.tensor(_STOICH, **f64)
    out = torch.empty(n, 2, n_rec, **f64)
    capped = torch.zeros(n, dtype=torch.bool, device=dev)
    # the active set, compacted: global index, rates, state, time, next record to write
    idx, th = torch.arange(n, device=dev), theta.double()
    state, t = torch.tensor(x0, **f64).expand(n, 2).clone(), torch.zeros(n, **f64)
    next_rec = torch.zeros(n, dtype=torch.long, device=dev)
    single_parts = []  # (global index, state, time, first record) of paths that lost a species
    events = 0
    while idx.numel():
        x, y = state[:, 0], state[:, 1]
        single = (x == 0) | (y == 0)
        stop = single | (state > max_population).any(1)
        if events >= max_events:
            capped[idx[~stop]] = True
            stop = torch.ones_like(stop)
        if single.any():
            single_parts.append((idx[single], state[single], t[single], next_rec[single]))
        h = torch.stack([th[:, 0] * x * y, th[:, 1] * x, th[:, 2] * y, th[:, 3] * x * y], 1)
        h0 = h.sum(1)
        u = torch.rand((idx.numel(), 2), generator=generator, **f64)
        t_next = torch.where(stop, torch.full_like(t, math.inf), t - torch.log1p(-u[:, 0]) / h0)
        # every record time in [t, t_next) sees the current state (single-species paths: completed later)
        last = torch.clamp(torch.floor(t_next / record_every).nan_to_num(posinf=n_rec) + 1, max=n_rec).long()
        last = torch.where(single, next_rec, last)
        while True:
            fill = next_rec < last
            if not fill.any():
                break
            out[idx[fill], :, next_rec[fill]] = state[fill]
            next_rec = next_rec + fill
        keep = ~stop & (next_rec < n_rec)
        if not keep.all():
            idx, th, state, t, next_rec, h, h0, u, t_next = (
                v[keep] for v in (idx, th, state, t, next_rec, h, h0, u, t_next))
        reaction = torch.searchsorted(h.cumsum(1), (u[:, 1] * h0)[:, None]).squeeze(1).clamp(max=3)
        state = (state + stoich[reaction]).clamp_min(0.0)
        t = t_next
        events += 1
    if single_parts:
        _complete_single_species(out, *(torch.cat(p) for p in zip(*single_parts)), theta.double(), record_every,
                                 max_population, generator)
    stopped = capped | (out > max_population).any(1).any(1)
    if stopped.any():
        out = torch.where(stopped[:, None, None], out.clamp(max=max_population), out)
        if on_blowup == "nan":
            _nan_after_stop(out, stopped, out[:, :, -1].T)
    return out.to(theta.dtype)


def _complete_single_species(out, idx, state, t, first, th, record_every, cap, generator):
    """Fill records ``first..`` of paths ``idx`` (one species extinct at ``state``, time ``t``) exactly."""
    th, cur, tcur = th[idx], state.clone(), t.clone()
    for r in range(int(first.min()), out.shape[-1]):
        due = first <= r
        t_r = r * record_every
        new = _finish_single_species(cur, th[:, 2], th[:, 1], (t_r - tcur).clamp_min(0.0), cap, generator)
        new = torch.where(due[:, None], new, cur)
        out[idx[due], :, r] = new[due]
        cur, tcur = new, torch.where(due, torch.full_like(tcur, t_r), tcur)


def lv_summaries(series: torch.Tensor) -> torch.Tensor:
    """The 9 summaries of ``series (n, 2, T)`` (module docstring), un-normalised: ``(n, 9)``."""
    n, _, length = series.shape
    mean = series.mean(-1)
    var = series.var(-1, unbiased=False)
    sd = var.sqrt()
    z = torch.where(sd[..., None] > 0, (series - mean[..., None]) / sd.clamp_min(1e-30)[..., None],
                    torch.zeros_like(series))
    ac1 = (z[..., :-1] * z[..., 1:]).sum(-1) / (length - 1)
    ac2 = (z[..., :-2] * z[..., 2:]).sum(-1) / (length - 1)
    cc = (z[:, 0] * z[:, 1]).sum(-1) / (length - 1)
    return torch.stack([mean[:, 0], mean[:, 1], (var[:, 0] + 1).log(), (var[:, 1] + 1).log(),
                        ac1[:, 0], ac2[:, 0], ac1[:, 1], ac2[:, 1], cc], dim=1)


class _LotkaVolterra(Task):
    theta_dim = 4
    _engine = None  # lv_sde or lv_mjp

    def __init__(self, output: str = "summaries", normalize: bool = True, max_population: float = 1e5,
                 on_blowup: str = "freeze", T: float = 30.0, record_every: float = 0.2,
                 x0: tuple[float, float] = (50.0, 100.0), pilot_size: int = 1000, **engine_options):
        """Options: ``output`` "summaries" (9) or "raw" ``(2, records)``; ``normalize`` the
        summaries by the pilot run; blow-up policy, horizon, recording and initial state as in
        the module docstring; ``engine_options`` go to the simulator (``dt`` for the SDE,
        ``max_events`` for the MJP)."""
        if output not in ("summaries", "raw"):
            raise ValueError(f"output: expected 'summaries' or 'raw', got {output!r}")
        _check_policy(on_blowup, max_population)
        self.output, self.normalize = output, bool(normalize)
        self.options = dict(max_population=max_population, on_blowup=on_blowup, T=T, record_every=record_every,
                            x0=tuple(x0), **engine_options)
        n_rec, _ = _grid(T, record_every, record_every)
        self.x_shape = (9,) if output == "summaries" else (2, n_rec)
        self.summary_loc = self.summary_scale = None
        if output == "summaries" and self.normalize:
            g = torch.Generator().manual_seed(20171204)  # own generator: the global RNG is untouched
            theta = torch.exp(-5.0 + 7.0 * torch.rand((pilot_size, 4), generator=g))
            pilot = {k: v for k, v in self.options.items() if k != "max_events"}
            pilot["on_blowup"] = "nan"  # blown-up pilot runs come out NaN: left out
            s = lv_summaries(lv_sde(theta, generator=g, **pilot))
            s = s[torch.isfinite(s).all(1)]
            sd = s.std(0)
            self.summary_loc, self.summary_scale = s.mean(0), torch.where(sd > 0, sd, torch.ones_like(sd))

    @property
    def prior(self):
        """log θ ~ U(−5, 2)^4; support the interval (e^−5, e^2)^4."""
        return ib.LogUniform(torch.full((4,), math.exp(-5.0)), torch.full((4,), math.exp(2.0))).to_event(1)

    def _simulate(self, theta, g):
        series = type(self)._engine(theta, generator=g, **self.options)
        if self.output == "raw":
            return series
        s = lv_summaries(series)
        if self.normalize:
            s = (s - self.summary_loc.to(s)) / self.summary_scale.to(s)
        return s

    def trajectories(self, theta, seed=None) -> torch.Tensor:
        """The series behind the summaries: ``theta (n, 4)`` → ``(n, 2, records)`` (predators X, prey Y);
        with the same seed, the path that ``simulate`` summarises."""
        theta = torch.as_tensor(theta)
        if theta.dim() != 2 or theta.shape[1] != 4:
            raise ValueError(f"{self.name}.trajectories: theta must have shape (n, 4), got {tuple(theta.shape)}")
        return type(self)._engine(theta, generator=generator_for(seed, theta.device), **self.options)

    def observed_trajectory(self, k: int) -> torch.Tensor:
        """The series of observation ``k``: ``(2, records)``."""
        k = self._check_k(k)
        return self.trajectories(self.true_parameters(k)[None], seed=1_000_000 + k)[0]

    @property
    def record_times(self) -> torch.Tensor:
        n, _ = _grid(self.options["T"], self.options["record_every"], self.options["record_every"])
        return torch.arange(n) * self.options["record_every"]

    def _true_parameters(self, k):
        if k == 1:
            return torch.tensor(THETA_STAR)
        g = torch.Generator().manual_seed(4242 + k)
        return torch.tensor(THETA_STAR) * torch.exp(0.2 * torch.randn(4, generator=g))


class LotkaVolterraSDE(_LotkaVolterra):
    """Lotka–Volterra chemical Langevin equation (Euler–Maruyama); observation 1 is at θ*,
    observations 2–10 at θ* perturbed by log-normal factors (sd 0.2, fixed seeds)."""

    name = "lotka_volterra_sde"
    description = "predator–prey SDE (chemical Langevin equation), 4 log-uniform rates, 9 summaries"
    _engine = staticmethod(lv_sde)


class LotkaVolterraMJP(_LotkaVolterra):
    """Lotka–Volterra Markov jump process (exact Gillespie); observations as for the SDE."""

    name = "lotka_volterra_mjp"
    description = "predator–prey Markov jump process (Gillespie), 4 log-uniform rates, 9 summaries"
    _engine = staticmethod(lv_mjp)
