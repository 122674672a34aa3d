"""MCMC on a model whose implicit sites carry a learned log-density — the samplers of the
methods that learn a likelihood (:mod:`~implicitbayes.infer.nle`) or a likelihood ratio
(:mod:`~implicitbayes.infer.nre`) rather than the posterior itself.

Two kernels. Pyro's NUTS: chains run one after another (Pyro's parallel chains need a picklable
model), each seeded from the one seed of the call. Vectorized slice sampling
(:func:`slice_sample`; Neal 2003, with stepping out and shrinkage, as sbi's
``slice_np_vectorized``): every chain advances at once, so one evaluation of the model's batched
log-density (the user's model traced under a plate of candidates, :func:`batched_log_joint`)
serves all of them, and many short chains cost little more than a few long ones; it needs no
gradient and no step size, works in the unconstrained coordinates with the transforms'
log-Jacobian added, and adapts its bracket widths during warm-up. Its sweeps start along the
coordinates and turn, during warm-up, to the principal axes of the chains' own spread (factor
slice sampling, Tibbits et al. 2014), so a strongly correlated posterior — an ODE's rates and
initial state — is crossed in a few sweeps rather than crawled along. On slcp's four-mode
posterior 20 chains cover the modes where NUTS's two cannot, in a fraction of the time
(``benchmarks/results/sequential.md``); NUTS remains the kernel for many parameters.

A slice run may instead resume from a weighted population (:class:`SliceResume`): draws of a
nearby posterior with log-weights that carry them to this one (importance resampling), and the
axes and widths that run found. Its chains start at resampled members and warm up for
``RESUME_WARMUP_FRACTION`` of the warm-up — resample-move, as in sequential Monte Carlo. The
rounds of :func:`~implicitbayes.sequential` use it: each round's learned likelihood moves the
posterior a little, and the previous round's pool, reweighted by the ratio of the two learned
likelihoods, is already spread over it in the right proportions (modes included), where a cold
start resamples from prior draws and spends the whole warm-up finding the posterior's axes.

Each chain starts at a point resampled from ``INIT_CANDIDATES`` prior draws (the slice sampler:
``SLICE_INIT_CANDIDATES``) weighted by the learned likelihood (sampling-importance-resampling,
sbi's "resample" initialisation): a multimodal posterior gets chains in its modes in proportion to their mass,
where Pyro's default start (uniform in (−2, 2) unconstrained) leaves chains stranded in whatever
basin is nearest. Their health is reported, not hidden: split R-hat and effective sample
size per site and the number of divergent transitions per chain are kept on the posterior
(``posterior.diagnostics()``) and a warning names the site and the numbers when R-hat exceeds
``RHAT_WARN`` or a chain diverged.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide.initialization import init_to_value

from ..checks import choice, integer
from ..seeding import seeded
from ..simulate import device_context, model_sites, plate_layout

__all__ = ["run_nuts", "MCMCDiagnostics", "SampledByNUTS", "RHAT_WARN", "PriorDraws", "batched_log_joint",
           "without_observed", "resampled_inits", "slice_sample", "mcmc_options", "SAMPLERS", "SliceResume"]

RHAT_WARN = 1.05  # split R-hat above which the draws are flagged
INIT_CANDIDATES = 10_000  # prior draws a chain's starting point is resampled from
SAMPLERS = ("nuts", "slice")
MIN_DRAWS_FOR_RHAT = 4  # per chain: split R-hat halves each chain
DEFAULT_CHAINS = {"nuts": 2, "slice": 20}
DEFAULT_WARMUP = {"nuts": 300, "slice": 100}
_CANDIDATES = "_ib_candidates"


# ----------------------------------------------------------------------------- the model at many latents
class PriorDraws:
    """Draws of the latents from the model's own prior, vectorized, without simulating: the
    model runs under a plate of candidates with its observed sites given placeholder values.
    Used inside a model run as well, so it hides itself from the enclosing handlers and puts its
    plate one dimension left of the simulation plate."""

    def __init__(self, model: Callable, observed, model_args=(), model_kwargs=None):
        self.model, self.observed = model, list(observed)
        self.model_args, self.model_kwargs = tuple(model_args), dict(model_kwargs or {})
        sites, self.outer_dim = model_sites(model, self.observed, self.model_args, self.model_kwargs)
        self.info = {s.name: s for s in sites}
        self.latent = [s.name for s in sites if not s.observed]

    def __call__(self, m: int) -> dict[str, torch.Tensor]:
        dim = self.outer_dim - 1
        placeholders = {o: plate_layout(torch.zeros((m,) + self.info[o].shape), dim, self.info[o].batch_ndim)
                        for o in self.observed}
        with poutine.block(), pyro.plate(_CANDIDATES, m, dim=dim):
            trace = poutine.trace(poutine.condition(self.model, data=placeholders)).get_trace(
                *self.model_args, **self.model_kwargs)
        return {k: trace.nodes[k]["value"].detach().reshape((m,) + self.info[k].shape) for k in self.latent}


def _rows_log_prob(trace, m: int) -> torch.Tensor:
    """Σ of every sample site's log-density per candidate, from a trace under the candidate plate."""
    total = torch.zeros(m)
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or name.startswith("_ib_") or site["infer"].get("_deterministic", False):
            continue
        lp = site["fn"].log_prob(site["value"])
        total = total + lp.reshape(m, -1).sum(1) if lp.numel() % m == 0 and lp.numel() >= m else total + lp.sum()
    return total

def batched_log_joint(model: Callable, prior: PriorDraws) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """log of ``model``'s joint density at given latents (its observed sites handled by ``model``
    itself, e.g. with a learned likelihood), one number per row."""

    def log_joint(latents):
        m = len(next(iter(latents.values())))
        dim = prior.outer_dim - 1
        laid = {k: plate_layout(v, dim, prior.info[k].batch_ndim) for k, v in latents.items()}
        with poutine.block(), pyro.plate(_CANDIDATES, m, dim=dim):
            trace = poutine.trace(poutine.condition(model, data=laid)).get_trace(*prior.model_args, **prior.model_kwargs)
        return _rows_log_prob(trace, m)

    return log_joint


def without_observed(model: Callable, observed) -> Callable:
    """``model`` whose observed sites contribute nothing (the prior part of the joint)."""
    from ..handlers import replace_likelihood

    return replace_likelihood(model, lambda latents, obs: torch.zeros(()), {o: torch.zeros(()) for o in observed}, [])


def resampled_inits(prior: PriorDraws, log_weight: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
                    num_chains: int, candidates: int = INIT_CANDIDATES) -> list[dict[str, torch.Tensor]] | None:
    """One starting point per chain, each resampled from ``candidates`` prior draws with weights
    ∝ exp ``log_weight`` (the learned log-likelihood): ``[{site: value}]``, or None (with a
    warning) when no candidate has a finite weight. Uses the global RNG (seed it)."""
    with torch.no_grad():
        draws = prior(candidates)
        w = torch.cat([log_weight({k: v[i] for k, v in draws.items()})
                       for i in torch.arange(candidates).split(4096)]).double()
    w = torch.where(torch.isfinite(w), w, torch.full_like(w, -math.inf))
    if not torch.isfinite(w).any():
        warnings.warn(f"MCMC initialisation: the learned likelihood is not finite at any of {candidates} prior draws; "
                      "the chains start at Pyro's default points", RuntimeWarning, stacklevel=3)
        return None
    pick = torch.multinomial(torch.softmax(w, 0), num_chains, replacement=True)
    return [{k: v[i] for k, v in draws.items()} for i in pick.tolist()]


def mcmc_options(sampler: str, num_chains: int | None, warmup: int | None) -> tuple[str, int, int]:
    """A method's MCMC options checked, with the sampler's defaults for the chains and warm-up
    left as None."""
    sampler = choice("sampler", sampler, SAMPLERS)
    chains = integer("num_chains", num_chains, none=True) or DEFAULT_CHAINS[sampler]
    return sampler, chains, integer("warmup", warmup, none=True) or DEFAULT_WARMUP[sampler]


class MCMCDiagnostics:
    """What the last NUTS run of a posterior left: the draws by chain and their diagnostics."""

    def __init__(self):
        self.chains: dict[str, torch.Tensor] = {}
        self.divergences: list[int] = []
        # the slice sampler's directions (dim, dim) and widths (dim,) after warm-up (None after NUTS)
        self.axes: tuple[torch.Tensor, torch.Tensor] | None = None

    def record(self, chains: Mapping[str, torch.Tensor], divergences: Sequence[int],
               axes: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.chains, self.divergences, self.axes = dict(chains), [int(d) for d in divergences], axes

    @property
    def draws_per_chain(self) -> int:
        return int(next(iter(self.chains.values())).shape[1]) if self.chains else 0

    def summary(self) -> dict:
        """``{site: {"r_hat", "n_eff"}}`` (split R-hat and effective sample size per coordinate;
        NaN with fewer than 4 draws per chain) plus ``"divergences"``: the divergent transitions of
        each chain after warm-up."""
        if not self.chains:
            raise ValueError("diagnostics: call sample() first")
        from pyro.infer.mcmc.util import diagnostics

        if self.draws_per_chain < MIN_DRAWS_FOR_RHAT:  # Pyro's split R-hat needs two halves of two draws
            nan = {k: torch.full(v.shape[2:], float("nan")) for k, v in self.chains.items()}
            out = {k: {"n_eff": v, "r_hat": v.clone()} for k, v in nan.items()}
        else:
            out = dict(diagnostics(self.chains, group_by_chain=True))
        out["divergences"] = list(self.divergences)
        return out


def run_nuts(model: Callable, names: Sequence[str], num_samples: int, *, num_chains: int, warmup_steps: int,
             seed: int, device: torch.device, record: MCMCDiagnostics, model_args: tuple = (),
             model_kwargs: Mapping | None = None, what: str = "NUTS", progress: bool = False,
             inits: Callable[[int], Sequence[Mapping[str, torch.Tensor]] | None] | None = None) -> dict[str, torch.Tensor]:
    """``num_samples`` draws of the sites ``names`` by NUTS on ``model`` (already carrying its
    learned log-density and observed values), pooled over ``num_chains`` chains of
    ``warmup_steps`` warm-up steps each; the draws by chain and the diagnostics go to ``record``.
    ``progress``: Pyro's progress bar for each chain. ``inits(num_chains)``: a starting point
    ``{site: value}`` per chain (called under the run's seed), or None for Pyro's default."""
    chains, warmup = integer("num_chains", num_chains), integer("warmup_steps", warmup_steps)
    per_chain = -(-integer("num_samples", num_samples) // chains)
    runs, divergences = [], []
    with seeded(seed, device), device_context(device):
        starts = inits(chains) if inits is not None else None
        for c in range(chains):
            kernel = pyro.infer.NUTS(model) if starts is None else \
                pyro.infer.NUTS(model, init_strategy=init_to_value(values=starts[c]))
            mcmc = pyro.infer.MCMC(kernel, num_samples=per_chain, warmup_steps=warmup, disable_progbar=not progress)
            mcmc.run(*tuple(model_args), **dict(model_kwargs or {}))
            runs.append(mcmc.get_samples())
            divergences.append(len(mcmc.diagnostics().get("divergences", {}).get("chain 0", [])))
    record.record({k: torch.stack([r[k] for r in runs]) for k in names}, divergences)
    _warn_if_unhealthy(record, what)
    return {k: v.reshape((-1,) + v.shape[2:])[:num_samples] for k, v in record.chains.items()}


def _warn_if_unhealthy(record: MCMCDiagnostics, what: str) -> None:
    problems = []
    if len(record.divergences) > 0 and sum(record.divergences):
        problems.append(f"{sum(record.divergences)} divergent transitions (per chain {record.divergences})")
    if len(next(iter(record.chains.values()))) > 1 and record.draws_per_chain < MIN_DRAWS_FOR_RHAT:
        warnings.warn(f"{what}: {record.draws_per_chain} draws per chain, too few for split R-hat (it needs "
                      f"{MIN_DRAWS_FOR_RHAT}): convergence is not checked; draw more, or run fewer chains "
                      "(num_chains)", RuntimeWarning, stacklevel=3)
    elif len(next(iter(record.chains.values()))) > 1:  # R-hat needs two chains
        summary = record.summary()
        for name in record.chains:
            r_hat = torch.as_tensor(summary[name]["r_hat"])
            worst = float(r_hat.nan_to_num(nan=1.0).max())
            if worst > RHAT_WARN:
                problems.append(f"site '{name}' has split R-hat {worst:.3f} > {RHAT_WARN}")
    if problems:
        warnings.warn(f"{what}: {'; '.join(problems)}. The chains may not have mixed (draw again with more "
                      "warmup_steps), or they sit in separate modes of a multimodal posterior, each started in "
                      "one: check posterior.diagnostics() and posterior.chains", RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------- vectorized slice sampling
SLICE_DRAWS_PER_CHAIN = 100  # more draws than chains × this get more chains (unless num_chains is given)
# The slice sampler's chains take their shares of the modes from the resampled starts (no chain
# crosses between far modes), so these are resampled from more prior draws than NUTS's two chains
# need: a narrow posterior gets few distinct candidates from 10⁴ prior draws, and its modes' shares
# come out of those few
SLICE_INIT_CANDIDATES = 100_000
SLICE_STEPS_OUT = 20  # stepping-out steps per side and coordinate at most
SLICE_SHRINKS = 60  # shrinkage steps per coordinate at most (the bracket halves about each time)
# Warm-up is cut into this many parts; after each but the last the slice directions turn to the
# principal axes of the states seen in it (factor slice sampling, Tibbits et al. 2014): a
# coordinate-wise sweep crawls along a strongly correlated posterior (the Lotka–Volterra rates),
# one along its principal axes does not. The directions are fixed after warm-up.
SLICE_ROTATIONS = 4


# A resumed run (SliceResume) warms up for this fraction of the warm-up: its chains start on the
# posterior, spread in proportion to it, and along axes already found
RESUME_WARMUP_FRACTION = 0.25


@dataclass
class SliceResume:
    """A weighted population to resume slice sampling from: ``draws`` ``{site: (m, *shape)}``
    (draws of a nearby posterior, e.g. the previous round's), ``log_weights`` ``(m,)`` that carry
    them to the posterior now sampled (the log-ratio of the two unnormalised densities at each
    draw), and the ``axes`` (directions, widths) of the run that made them. The chains start at
    members resampled ∝ exp ``log_weights``."""

    draws: Mapping[str, torch.Tensor]
    log_weights: torch.Tensor
    axes: tuple[torch.Tensor, torch.Tensor]

    def __post_init__(self):
        sizes = {k: len(v) for k, v in self.draws.items()}
        if not sizes or self.log_weights.dim() != 1 or set(sizes.values()) != {len(self.log_weights)}:
            raise ValueError(f"resume: expected one log-weight per draw, got log_weights of shape "
                             f"{tuple(self.log_weights.shape)} for draws of lengths {sizes}")
        if not bool(torch.isfinite(self.log_weights).any()):
            raise ValueError("resume: no log-weight is finite, so no draw can start a chain "
                             "(the new posterior gives every draw of the population zero density)")

    def effective_size(self) -> float:
        """Kish's effective sample size of the weights: how many draws they amount to."""
        w = torch.softmax(_finite_or_minus_inf(self.log_weights.double()), 0)
        return float(1 / w.square().sum()) if bool(torch.isfinite(w).all()) else 0.0

    def starts(self, chains: int) -> list[dict[str, torch.Tensor]]:
        """``chains`` members resampled ∝ exp ``log_weights`` (the global RNG: seed it)."""
        w = torch.softmax(_finite_or_minus_inf(self.log_weights.double()), 0)
        pick = torch.multinomial(w, chains, replacement=True).tolist()
        return [{k: v[i] for k, v in self.draws.items()} for i in pick]


def _finite_or_minus_inf(values: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(values), torch.full_like(values, -math.inf), values)


def _slice_sweep(u: torch.Tensor, lp: torch.Tensor, log_density: Callable[[torch.Tensor], torch.Tensor],
                 directions: torch.Tensor, widths: torch.Tensor, tune: bool) -> None:
    """One sweep of slice sampling with stepping out and shrinkage (Neal 2003, §4) along each
    column of ``directions`` (``(dim, dim)``, the coordinate axes or the warm-up's principal
    axes) in random order, every chain (row of ``u``) at once; ``u`` and ``lp`` are updated in
    place. ``tune``: move each width halfway towards half the mean bracket the stepping out
    found (so that it settles near the slice's own width)."""
    chains, dim = u.shape
    for j in torch.randperm(dim).tolist():
        e = directions[:, j]
        log_y = lp - torch.empty_like(lp).exponential_()
        # the slice along u + t e, in t; the current point is t = 0
        left = -widths[j] * torch.rand_like(lp)
        right = left + widths[j]
        budget_left = torch.floor(SLICE_STEPS_OUT * torch.rand_like(lp))
        budget_right = SLICE_STEPS_OUT - 1 - budget_left
        for _ in range(SLICE_STEPS_OUT):
            out_l, out_r = budget_left > 0, budget_right > 0
            if not (out_l.any() or out_r.any()):
                break
            il, ir = out_l.nonzero().squeeze(1), out_r.nonzero().squeeze(1)
            probe = torch.cat([u[il], u[ir]]) + torch.cat([left[il], right[ir]])[:, None] * e
            value = log_density(probe)
            beyond_l, beyond_r = value[:len(il)] > log_y[il], value[len(il):] > log_y[ir]
            left[il] = torch.where(beyond_l, left[il] - widths[j], left[il])
            right[ir] = torch.where(beyond_r, right[ir] + widths[j], right[ir])
            budget_left[il] = torch.where(beyond_l, budget_left[il] - 1, torch.zeros_like(budget_left[il]))
            budget_right[ir] = torch.where(beyond_r, budget_right[ir] - 1, torch.zeros_like(budget_right[ir]))
        if tune:
            widths[j] = 0.5 * widths[j] + 0.5 * (right - left).mean() / 2
        moving = torch.ones(chains, dtype=torch.bool, device=u.device)
        for _ in range(SLICE_SHRINKS):
            idx = moving.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            t = left[idx] + (right[idx] - left[idx]) * torch.rand(len(idx), dtype=u.dtype, device=u.device)
            probe = u[idx] + t[:, None] * e
            value = log_density(probe)
            inside = value > log_y[idx]
            take = idx[inside]
            u[take], lp[take] = probe[inside], value[inside]
            # an accepted chain's bracket is not used again; a rejected one shrinks towards t = 0
            left[idx] = torch.where(~inside & (t < 0), t, left[idx])
            right[idx] = torch.where(~inside & (t >= 0), t, right[idx])
            moving[take] = False
        # a chain still moving after SLICE_SHRINKS halvings keeps its point (the bracket has shrunk onto it)


def _principal_axes(states: torch.Tensor, directions: torch.Tensor, widths: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The slice directions and widths from warm-up states ``(chains, sweeps, dim)``: the
    eigenvectors of the covariance within chains (pooled around each chain's own mean, so that
    chains in separate modes do not turn an axis towards the gap between them), each width two
    standard deviations along its axis (the tuning goes on from there). ``directions`` and
    ``widths`` are kept when the covariance is degenerate (chains that have not moved)."""
    chains, sweeps, dim = states.shape
    centred = (states - states.mean(1, keepdim=True)).reshape(-1, dim).double()
    cov = centred.T @ centred / max(chains * (sweeps - 1), 1)
    eigenvalues, vectors = torch.linalg.eigh(cov)
    if not bool(torch.isfinite(eigenvalues).all()) or float(eigenvalues.min()) <= 1e-12 * float(eigenvalues.max()):
        return directions, widths
    return vectors.to(directions), 2 * eigenvalues.sqrt().to(widths)


def slice_sample(log_density: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], space, starts: Sequence[Mapping],
                 num_samples: int, *, warmup_steps: int, seed: int, device: torch.device, record: MCMCDiagnostics,
                 what: str = "slice sampling", progress: bool = False,
                 axes: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``num_samples`` draws of the latents of ``space`` by coordinate-wise slice sampling in its
    unconstrained coordinates, one chain per start in ``starts`` (``[{site: value}]``), all
    chains advanced together so that each step evaluates ``log_density`` (latents
    ``{site: (m, *shape)}`` → ``(m,)``, the unnormalised log posterior) once for all of them.
    ``warmup_steps`` sweeps are discarded while the bracket widths adapt; the draws by chain go
    to ``record`` (R-hat and effective sizes as for NUTS; no divergences exist), with the axes
    the sweeps ended on. ``axes``: the directions (columns) and widths to start from (another
    run's, :class:`SliceResume`); else the coordinates, widths 1."""
    chains = len(starts)
    per_chain = -(-integer("num_samples", num_samples) // chains)
    warmup = integer("warmup_steps", warmup_steps, minimum=0)
    dtype = torch.get_default_dtype()

    def log_target(u):
        with torch.no_grad():
            values = log_density(space.to_constrained(u)).to(u) + space.log_abs_det_jacobian(u)
        return _finite_or_minus_inf(values)

    with seeded(seed, device), device_context(device):
        u = space.to_unconstrained({k: torch.stack([torch.as_tensor(s[k]) for s in starts]).to(device, dtype)
                                    for k in space.names})
        lp = log_target(u)
        if not torch.isfinite(lp).any():
            raise ValueError(f"{what}: the posterior's log-density is not finite at any of the {chains} starting points")
        dim = u.shape[1]
        if axes is None:
            widths = torch.ones(dim, dtype=dtype, device=device)
            directions = torch.eye(dim, dtype=dtype, device=device)
        else:
            directions, widths = (a.to(device, dtype).clone() for a in axes)
            if directions.shape != (dim, dim) or widths.shape != (dim,):
                raise ValueError(f"axes: expected directions ({dim}, {dim}) and widths ({dim},) for the "
                                 f"{dim} unconstrained coordinates, got {tuple(directions.shape)} and {tuple(widths.shape)}")
        # each part of the warm-up at least 4 sweeps long, else the coordinates throughout
        rotate_at = {warmup * k // SLICE_ROTATIONS for k in range(1, SLICE_ROTATIONS)} if warmup >= 4 * SLICE_ROTATIONS \
            else set()
        kept, seen = [], []
        from tqdm.auto import tqdm

        for sweep in tqdm(range(warmup + per_chain), desc=what, disable=not progress, leave=False):
            if sweep in rotate_at and dim > 1:
                directions, widths = _principal_axes(torch.stack(seen, 1), directions, widths)
                seen = []
            _slice_sweep(u, lp, log_target, directions, widths, tune=sweep < warmup)
            (seen if sweep < warmup else kept).append(u.clone())
        draws = torch.stack(kept, 1)  # (chains, per_chain, dim)
        values = space.to_constrained(draws.reshape(-1, draws.shape[-1]))
    record.record({k: v.reshape((chains, per_chain) + v.shape[1:]) for k, v in values.items()}, [0] * chains,
                  axes=(directions.cpu(), widths.cpu()))
    _warn_if_unhealthy(record, what)
    return {k: v.reshape((-1,) + v.shape[2:])[:num_samples] for k, v in record.chains.items()}


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """``module``'s weights without gradients for the block (NUTS differentiates in θ only:
    no backward pass into the network's weights), restored afterwards."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)


class SampledByNUTS:
    """Mixin of the posteriors drawn by NUTS on the model: ``chains`` (the last run's draws,
    ``{site: (chains, draws, *shape)}``), ``diagnostics()`` and the shared run. The class sets
    ``self.mcmc = MCMCDiagnostics()`` and has ``config.num_chains`` / ``config.warmup``."""

    @property
    def chains(self) -> dict[str, torch.Tensor]:
        return self.mcmc.chains

    def diagnostics(self) -> dict:
        """Of the last ``sample`` run: split R-hat and effective sample size per site, and the
        divergent transitions of each chain (``"divergences"``)."""
        return self.mcmc.summary()

    def _require_model(self) -> None:
        if self.model is None:
            raise ValueError(f"this {type(self).__name__} has no model to run MCMC on (loaded from a file?): "
                             "pass ib.load(path, model=...) or call posterior.attach_model(model)")

    def _nuts(self, conditioned: Callable, num_samples: int, seed: int, num_chains: int | None,
              warmup_steps: int | None, *, what: str, log_likelihood: Callable | None = None,
              log_joint: Callable | None = None, sampler: str | None = None,
              prior: PriorDraws | None = None, model_args: tuple | None = None,
              model_kwargs: Mapping | None = None, resume: SliceResume | None = None) -> dict[str, torch.Tensor]:
        """MCMC on ``conditioned``: NUTS, or vectorized slice sampling on ``log_joint`` (latents
        ``{site: (m, *shape)}`` → ``(m,)``, the same unnormalised log posterior, batched).
        ``log_likelihood(latents) -> (m,)``, the learned log-likelihood at a batch of latents,
        resamples the chains' starting points from draws of ``prior`` (default: the model's,
        under these arguments). ``resume`` (slice only): start from that weighted population
        instead, with ``RESUME_WARMUP_FRACTION`` of the warm-up unless ``warmup_steps`` is given."""
        sampler = choice("sampler", sampler, SAMPLERS) if sampler is not None else self.config.sampler
        if resume is not None and sampler != "slice":
            raise ValueError(f"resume: only the slice sampler resumes from a population; got sampler={sampler!r}")
        fitted = sampler == self.config.sampler  # the fit's chains and warm-up are for its own sampler
        chains = integer("num_chains", num_chains, none=True) or (
            self.config.num_chains if fitted else DEFAULT_CHAINS[sampler])
        warmup = integer("warmup_steps", warmup_steps, none=True) or (
            self.config.warmup if fitted else DEFAULT_WARMUP[sampler])
        if resume is not None and warmup_steps is None:
            warmup = max(1, round(RESUME_WARMUP_FRACTION * warmup))
        args = self.model_args if model_args is None else model_args
        kwargs = self.model_kwargs if model_kwargs is None else model_kwargs
        prior = prior or PriorDraws(self.model, self.observed, args, kwargs)
        inits = None
        if log_likelihood is not None:
            inits = functools.partial(resampled_inits, prior, log_likelihood)
        with frozen(self):
            if sampler == "slice":
                if num_chains is None:  # chains are nearly free when advanced together: keep them short
                    chains = max(chains, -(-num_samples // SLICE_DRAWS_PER_CHAIN))
                with seeded(seed, self.device):
                    starts = resume.starts(chains) if resume is not None else \
                        inits(chains, SLICE_INIT_CANDIDATES) if inits is not None else None
                if starts is None:
                    with seeded(seed, self.device):
                        draws = prior(chains)
                    starts = [{k: v[i] for k, v in draws.items()} for i in range(chains)]
                return slice_sample(log_joint, self.space, starts, num_samples, warmup_steps=warmup,
                                    seed=seed, device=self.device, record=self.mcmc, what=f"{what} (slice)",
                                    axes=None if resume is None else resume.axes)
            return run_nuts(conditioned, self.space.names, num_samples, num_chains=chains, warmup_steps=warmup,
                            seed=seed, device=self.device, record=self.mcmc, model_args=args, model_kwargs=kwargs,
                            what=what, inits=inits)
