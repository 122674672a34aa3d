r"""Approximate Bayesian computation: rejection ABC and adaptive SMC-ABC (the baseline Tran et
al. 2017 compare with on Lotka–Volterra). Not amortised: the observation is given to ``fit``.

Distances are Euclidean between summaries s(y) standardised by the median absolute deviation of
the prior-predictive summaries. Rejection keeps the ``quantile`` fraction of simulations nearest
to s(y_obs). SMC-ABC (Beaumont et al. 2009; adaptive tolerances as in Del Moral et al. 2012):
population t has tolerance ε_t = the ``alpha``-quantile of population t−1's distances; particles
are resampled by weight, moved by a Gaussian kernel with twice the weighted covariance in
unconstrained coordinates, simulated, and kept if d ≤ ε_t, with importance weights

    w_i ∝ π_u(u_i) / Σ_j w_j^{(t−1)} K(u_i | u_j),

π_u being the prior density in unconstrained coordinates (Jacobian included). It stops when a
population's acceptance rate falls below ``min_acceptance``, after ``max_steps`` populations,
or when ``num_simulations`` simulations are spent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import pyro
import pyro.poutine as poutine
import torch

from ..checks import choice, integer, number
from ..seeding import fresh_seed, resolve_seed, seeded
from ..simulate import device_context, model_sites, plate_layout, sharing_trial_runs, simulate, simulate_at
from ..space import ParameterSpace
from .data import join_observed, observed_values
from .method import Method
from .posterior import Posterior, PosteriorConfig, register_posterior

__all__ = ["ABC", "ABCPosterior", "ABCConfig"]


@dataclass
class ABCConfig(PosteriorConfig):
    """The size of an :class:`ABCPosterior`'s particle set and the algorithm that made it."""

    num_particles: int
    x_numel: int
    algorithm: str


@register_posterior
class ABCPosterior(Posterior):
    """Weighted particles for one observation; ``sample`` resamples them."""

    method = "abc"
    Config = ABCConfig

    def __init__(self, space: ParameterSpace, observed, x_shapes, config: ABCConfig):
        super().__init__(space, observed, x_shapes, config)
        n = config.num_particles
        self.register_buffer("particles", torch.zeros(n, space.unconstrained_dim))
        self.register_buffer("weights", torch.full((n,), 1.0 / n))
        self.register_buffer("observation", torch.zeros(config.x_numel))
        self.history: list[dict] = []

    def _observation(self, observed):
        if observed is None:
            return self.observation[None]
        x = super()._observation(observed)
        if not torch.allclose(x.reshape(-1), self.observation):
            raise ValueError("observed: ABC is not amortised; this posterior was fitted to another observation "
                             "(fit again with the new one)")
        return x

    @torch.no_grad()
    def _draw(self, x, num_samples, seed):
        g = torch.Generator(device=self.device).manual_seed(seed)
        idx = torch.multinomial(self.weights, num_samples, replacement=True, generator=g)
        return self.space.to_constrained(self.particles[idx])

    @property
    def effective_sample_size(self) -> float:
        return float(1.0 / (self.weights**2).sum())


class ABC(Method):
    """Rejection ABC (``algorithm="rejection"``, on given simulations) or SMC-ABC (default).

    Options: ``summary`` (a function ``(n, *x_shape) -> (n, k)``; default: the flattened data),
    ``num_particles``, ``alpha`` (tolerance quantile per population), ``quantile`` (rejection's
    acceptance fraction), ``num_simulations`` (SMC budget), ``min_acceptance``, ``batch_size``
    (simulations per call of the simulator), ``device``.
    """

    def __init__(self, model: Callable, *, observed: str | Sequence[str], model_args: tuple = (),
                 model_kwargs: Mapping | None = None, algorithm: str = "smc",
                 summary: Callable[[torch.Tensor], torch.Tensor] | None = None, num_particles: int = 1000,
                 alpha: float = 0.5, quantile: float = 0.01, num_simulations: int = 100_000,
                 min_acceptance: float = 0.01, batch_size: int = 10_000, device: str | torch.device | None = None):
        super().__init__(model, observed=observed, model_args=model_args, model_kwargs=model_kwargs, device=device)
        self.algorithm = choice("algorithm", algorithm, ("smc", "rejection"))
        if summary is not None and not callable(summary):
            raise TypeError("summary: expected a function (n, *x_shape) -> (n, k) or None, got "
                            f"{type(summary).__name__}")
        self.summary = summary
        self.num_particles = integer("num_particles", num_particles, minimum=2)
        self.alpha = number("alpha", alpha, low=0.0, high=1.0)
        self.quantile = number("quantile", quantile, low=0.0, high=1.0, closed=True, what="a fraction in (0, 1]")
        if self.quantile == 0:
            raise ValueError(f"quantile: expected a fraction in (0, 1], got {quantile!r}")
        self.num_simulations = integer("num_simulations", num_simulations)
        self.min_acceptance = number("min_acceptance", min_acceptance, low=0.0, high=1.0)
        self.batch_size = integer("batch_size", batch_size)

    # -- pieces -------------------------------------------------------------------------
    def _summaries(self, x: torch.Tensor) -> torch.Tensor:
        s = self.summary(x) if self.summary is not None else x.reshape(x.shape[0], -1)
        return s.to(torch.get_default_dtype())

    def _log_prior_u(self, space: ParameterSpace, u: torch.Tensor) -> torch.Tensor:
        """log π_u(u) = log π(θ(u)) + log|dθ/du|, batched: ``(n,)``."""
        values = space.to_constrained(u)
        sites, outer_dim = model_sites(self.model, self.observed, self.model_args, self.model_kwargs)
        info = {s.name: s for s in sites}
        data = {k: plate_layout(v, outer_dim, info[k].batch_ndim) for k, v in values.items()}
        with device_context(u.device), pyro.plate("_ib_simulations", u.shape[0], dim=outer_dim):
            trace = poutine.trace(poutine.block(poutine.condition(self.model, data=data),
                                                hide=list(self.observed))).get_trace(*self.model_args, **self.model_kwargs)
        total = torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)
        for name in space.names:
            site = trace.nodes[name]
            total = total + site["fn"].log_prob(site["value"]).reshape(u.shape[0], -1).sum(1)
        return total + space.log_abs_det_jacobian(u)

    @sharing_trial_runs
    def fit(self, data=None, *, observation: Any, max_steps: int | None = None, time_budget: float | None = None,
            seed: int | None = None, progress: bool = True, checkpoint=None) -> ABCPosterior:
        """Fit to ``observation``. Rejection needs ``data`` (a SimulationSet); SMC simulates
        itself (and uses ``data`` as its first population when given)."""
        integer("max_steps", max_steps, none=True)
        number("time_budget", time_budget, none=True, what="a positive number of seconds")
        if checkpoint is not None:
            raise ValueError("checkpoint: ABC keeps no training state to resume; use ib.simulate(store=...) "
                             "for the simulations")
        seed = resolve_seed(seed)
        if self.algorithm == "rejection" and data is None:
            raise ValueError("data: rejection ABC needs a SimulationSet (from ib.simulate)")
        if data is None:
            data = simulate(self.model, self.num_particles * 4, observed=self.observed, model_args=self.model_args,
                            model_kwargs=self.model_kwargs, seed=seed, device=self.device, progress=progress)
        prep = self._prepare(data)
        x_obs = observed_values(observation, prep.observed, prep.x_shapes, self.device, torch.get_default_dtype())
        x_obs_flat = join_observed({k: v[None] for k, v in x_obs.items()}, prep.observed)
        s_data = self._summaries(prep.x.to(self.device))
        s_obs = self._summaries(x_obs_flat)
        med = s_data.median(0).values
        scale = (s_data - med).abs().median(0).values * 1.4826
        scale = torch.where(scale > 0, scale, s_data.std(0))
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))

        def distance(s):
            return ((s - s_obs) / scale).norm(dim=1)

        u = prep.u.to(self.device)
        d = distance(s_data)
        config = ABCConfig(num_particles=self.num_particles, x_numel=int(x_obs_flat.numel()), algorithm=self.algorithm)
        used, history = len(data), []
        if self.algorithm == "rejection":
            keep = max(1, int(round(self.quantile * len(d))))
            config.num_particles = keep
            eps, order = d.sort()
            post = ABCPosterior(prep.space, prep.observed, prep.x_shapes, config).to(self.device)
            post.particles.copy_(u[order[:keep]])
            post.weights.fill_(1.0 / keep)
            history.append({"epsilon": float(eps[keep - 1]), "simulations": used, "accepted": keep})
        else:
            post = self._smc(prep, u, d, distance, config, seed, used, history, max_steps, time_budget, progress)
        post.observation.copy_(x_obs_flat.reshape(-1))
        post.history = history
        post.training_summary = {"simulations": history[-1]["simulations"], "populations": len(history),
                                 "epsilon": history[-1]["epsilon"]}
        return post.attach_model(self.model, self.model_args, self.model_kwargs)

    def _smc(self, prep, u, d, distance, config, seed, used, history, max_steps, time_budget, progress):
        from tqdm.auto import tqdm

        n = self.num_particles
        order = d.argsort()[:n]
        particles, dist_now = u[order], d[order]
        weights = torch.full((n,), 1.0 / n, device=u.device)
        history.append({"epsilon": float(dist_now.max()), "simulations": used, "accepted": n, "acceptance": 1.0})
        t0, g = time.perf_counter(), torch.Generator(device=u.device).manual_seed(seed)
        bar = tqdm(desc="SMC-ABC", disable=not progress, leave=False)
        with seeded(seed, self.device):
            for t in range(1, (max_steps or 10_000) + 1):
                eps = torch.quantile(dist_now, self.alpha)
                mean = (weights[:, None] * particles).sum(0)
                centred = particles - mean
                cov = 2 * (weights[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0)
                cov = cov + 1e-9 * torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                kernel = torch.distributions.MultivariateNormal(torch.zeros_like(mean), covariance_matrix=cov)
                new_u, new_d, proposed = [], [], 0
                while sum(len(v) for v in new_u) < n:
                    m = min(self.batch_size, self.num_simulations - used)
                    if m <= 0:
                        break
                    idx = torch.multinomial(weights, m, replacement=True, generator=g)
                    cand = particles[idx] + torch.randn(m, cov.shape[0], generator=g, device=u.device) @ torch.linalg.cholesky(cov).T
                    latents = prep.space.to_constrained(cand)
                    finite_prior = torch.isfinite(self._log_prior_u(prep.space, cand))
                    x = simulate_at(self.model, latents, observed=prep.observed, model_args=self.model_args,
                                    model_kwargs=self.model_kwargs, seed=fresh_seed(g),
                                    device=self.device)
                    xs = join_observed(x, prep.observed)
                    dd = distance(self._summaries(xs))
                    ok = finite_prior & torch.isfinite(dd) & (dd <= eps)
                    used += m
                    proposed += m
                    new_u.append(cand[ok])
                    new_d.append(dd[ok])
                    bar.set_postfix({"eps": f"{float(eps):.3g}", "sims": used})
                accepted = torch.cat(new_u)[:n]
                if len(accepted) < n:
                    break  # budget spent mid-population: keep the previous, complete population
                acceptance = n / proposed
                log_prior = self._log_prior_u(prep.space, accepted)
                log_k = kernel.log_prob(accepted[:, None, :] - particles[None, :, :])  # (n_new, n_old)
                log_w = log_prior - torch.logsumexp(log_k + weights.log()[None, :], dim=1)
                particles, dist_now = accepted, torch.cat(new_d)[:n]
                weights = torch.softmax(log_w, 0)
                history.append({"epsilon": float(eps), "simulations": used, "accepted": n, "acceptance": acceptance,
                                "ess": float(1 / (weights**2).sum())})
                bar.update(1)
                if acceptance < self.min_acceptance or used >= self.num_simulations:
                    break
                if time_budget is not None and time.perf_counter() - t0 > time_budget:
                    break
        bar.close()
        post = ABCPosterior(prep.space, prep.observed, prep.x_shapes, config).to(self.device)
        post.particles.copy_(particles)
        post.weights.copy_(weights)
        return post.attach_model(self.model, self.model_args, self.model_kwargs)
