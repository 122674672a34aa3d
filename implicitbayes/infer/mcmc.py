"""Pyro NUTS on a model whose implicit sites carry a learned log-density — the sampler of the
methods that learn a likelihood (:mod:`~implicitbayes.infer.nle`) or a likelihood ratio
(:mod:`~implicitbayes.infer.nre`) rather than the posterior itself.

Chains run one after another (Pyro's parallel chains need a picklable model), each seeded from
the one seed of the call. Their health is reported, not hidden: split R-hat and effective sample
size per site and the number of divergent transitions per chain are kept on the posterior
(``posterior.diagnostics()``) and a warning names the site and the numbers when R-hat exceeds
``RHAT_WARN`` or a chain diverged.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Mapping, Sequence

import pyro
import torch

from ..checks import integer
from ..seeding import seeded

__all__ = ["run_nuts", "MCMCDiagnostics", "SampledByNUTS", "RHAT_WARN"]

RHAT_WARN = 1.05  # split R-hat above which the draws are flagged


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
             model_kwargs: Mapping | None = None, what: str = "NUTS", progress: bool = False) -> dict[str, torch.Tensor]:
    """``num_samples`` draws of the sites ``names`` by NUTS on ``model`` (already carrying its
    learned log-density and observed values), pooled over ``num_chains`` chains of
    ``warmup_steps`` warm-up steps each; the draws by chain and the diagnostics go to ``record``.
    ``progress``: Pyro's progress bar for each chain."""
    chains, warmup = integer("num_chains", num_chains), integer("warmup_steps", warmup_steps)
    per_chain = -(-integer("num_samples", num_samples) // chains)
    runs, divergences = [], []
    with seeded(seed, device):
        for _ in range(chains):
            mcmc = pyro.infer.MCMC(pyro.infer.NUTS(model), num_samples=per_chain, warmup_steps=warmup,
                                   disable_progbar=not progress)
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
        warnings.warn(f"{what}: {'; '.join(problems)}. The chains may not have mixed: draw again with more "
                      "warmup_steps or num_chains, and check posterior.diagnostics()", RuntimeWarning, stacklevel=3)


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
              warmup_steps: int | None, *, what: str, model_args: tuple | None = None,
              model_kwargs: Mapping | None = None) -> dict[str, torch.Tensor]:
        chains = integer("num_chains", num_chains, none=True) or self.config.num_chains
        warmup = integer("warmup_steps", warmup_steps, none=True) or self.config.warmup
        with frozen(self):
                return run_nuts(conditioned, self.space.names, num_samples, num_chains=chains, warmup_steps=warmup,
                            seed=seed, device=self.device, record=self.mcmc,
                            model_args=self.model_args if model_args is None else model_args,
                            model_kwargs=self.model_kwargs if model_kwargs is None else model_kwargs, what=what)
