"""Pyro NUTS on a model whose implicit sites carry a learned log-density — the sampler of the
methods that learn a likelihood (:mod:`~implicitbayes.infer.nle`) or a likelihood ratio
(:mod:`~implicitbayes.infer.nre`) rather than the posterior itself.

Chains run one after another (Pyro's parallel chains need a picklable model), each seeded from
the one seed of the call. Each chain starts at a point resampled from ``INIT_CANDIDATES`` prior
draws weighted by the learned likelihood (sampling-importance-resampling, sbi's "resample"
initialisation): a multimodal posterior gets chains in its modes in proportion to their mass,
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
from typing import Callable, Mapping, Sequence

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide.initialization import init_to_value

from ..checks import integer
from ..seeding import seeded
from ..simulate import device_context, model_sites, plate_layout

__all__ = ["run_nuts", "MCMCDiagnostics", "SampledByNUTS", "RHAT_WARN", "PriorDraws", "batched_log_joint",
           "without_observed", "resampled_inits"]

RHAT_WARN = 1.05  # split R-hat above which the draws are flagged
INIT_CANDIDATES = 10_000  # prior draws a chain's starting point is resampled from
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



class MCMCDiagnostics:
    """What the last NUTS run of a posterior left: the draws by chain and their diagnostics."""

    def __init__(self):
        self.chains: dict[str, torch.Tensor] = {}
        self.divergences: list[int] = []

    def record(self, chains: Mapping[str, torch.Tensor], divergences: Sequence[int]) -> None:
        self.chains, self.divergences = dict(chains), [int(d) for d in divergences]

    def summary(self) -> dict:
        """``{site: {"r_hat", "n_eff"}}`` (split R-hat and effective sample size per coordinate)
        plus ``"divergences"``: the divergent transitions of each chain after warm-up."""
        if not self.chains:
            raise ValueError("diagnostics: call sample() first")
        from pyro.infer.mcmc.util import diagnostics

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
    if len(next(iter(record.chains.values()))) > 1:  # R-hat needs two chains
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
              prior: PriorDraws | None = None, model_args: tuple | None = None,
              model_kwargs: Mapping | None = None) -> dict[str, torch.Tensor]:
        """NUTS on ``conditioned``. ``log_likelihood(latents {site: (m, *shape)}) -> (m,)``, the
        learned log-likelihood at a batch of latents, resamples the chains' starting points from
        draws of ``prior`` (default: the model's, under these arguments)."""
        chains = integer("num_chains", num_chains, none=True) or self.config.num_chains
        warmup = integer("warmup_steps", warmup_steps, none=True) or self.config.warmup
        args = self.model_args if model_args is None else model_args
        kwargs = self.model_kwargs if model_kwargs is None else model_kwargs
        inits = None
        if log_likelihood is not None:
            prior = prior or PriorDraws(self.model, self.observed, args, kwargs)
            inits = functools.partial(resampled_inits, prior, log_likelihood)
        with frozen(self):
            return run_nuts(conditioned, self.space.names, num_samples, num_chains=chains, warmup_steps=warmup,
                            seed=seed, device=self.device, record=self.mcmc, model_args=args, model_kwargs=kwargs,
                            what=what, inits=inits)
