"""Hierarchical implicit models with local latents (Tran, Ranganath & Blei 2017).

Global latents shared by N groups or systems, local latents per group inside a ``pyro.plate``,
and implicit observations per group. Their sites are the ordinary Pyro sites a user writes;
``true_parameters(k)`` and ``reference_samples(k)`` are dicts keyed by site name.
"""

from __future__ import annotations


import numpy as np
import pyro
import pyro.distributions as dist
import torch

import implicitbayes as ib
from implicitbayes.checks import integer

from .base import Task, generator_for
from .lotka_volterra import THETA_STAR, LotkaVolterraSDE

__all__ = ["HierarchicalGaussian", "LotkaVolterraPopulation"]


class HierarchicalGaussian(Task):
    """Eight-schools-like normal hierarchy with an implicit observation site.

    μ ~ N(0, 1), τ ~ HalfNormal(1); for n = 1..N: θ_n ~ N(μ, τ²),
    x_n = θ_n + σ·ε_n, ε_n ~ N(0, I_m) through ``ib.Implicit`` (σ = 1, m = 5).

    Reference posterior, exact up to a 1-D quadrature: with x̄_n the group means and
    s² = σ²/m, p(τ | x) ∝ p(τ) · N(x̄; 0, 1·11ᵀ + (τ² + s²) I) on a fine grid of τ (inverse-CDF
    sampling), then μ | τ, x and θ_n | μ, τ, x are Gaussian.
    """

    name = "hierarchical_gaussian"
    description = "normal hierarchy: global mu, tau; N local means; implicit Gaussian observations"
    observed = ("x",)

    def __init__(self, num_groups: int = 8, num_obs: int = 5, noise: float = 1.0):
        integer("num_groups", num_groups)
        integer("num_obs", num_obs)
        if not noise > 0:
            raise ValueError(f"noise: expected a positive number, got {noise!r}")
        self.num_groups, self.num_obs, self.noise = num_groups, num_obs, float(noise)
        self.x_shape = (num_groups, num_obs)
        self.theta_dim = 2 + num_groups

    def simulate(self, theta, seed=None):
        """Observations of groups: ``theta (n,)`` local means → ``x (n, num_obs)``."""
        theta = torch.as_tensor(theta)
        g = generator_for(seed, theta.device)
        return theta[:, None] + self.noise * torch.randn((theta.shape[0], self.num_obs), generator=g,
                                                        device=theta.device, dtype=theta.dtype)

    def prior(self, groups=None):
        """The latents' model: ``mu`` (), ``tau`` (), ``theta`` (num_groups,)."""
        groups = pyro.plate("groups", self.num_groups) if groups is None else groups
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0), 1.0))
        tau = pyro.sample("tau", dist.HalfNormal(torch.tensor(1.0)))
        with groups:
            theta = pyro.sample("theta", dist.Normal(mu, tau))
        return mu, tau, theta

    def model(self):
        groups = pyro.plate("groups", self.num_groups)
        mu, tau, theta = self.prior(groups)
        with groups:
            return pyro.sample("x", ib.Implicit(self.simulate, theta, event_shape=(self.num_obs,)))

    def _true_parameters(self, k):
        g = torch.Generator().manual_seed(9000 + k)
        mu = torch.randn((), generator=g)
        tau = torch.randn((), generator=g).abs()
        theta = mu + tau * torch.randn(self.num_groups, generator=g)
        return {"mu": mu, "tau": tau, "theta": theta}

    def observation(self, k):
        k = self._check_k(k)
        return self.simulate(self.true_parameters(k)["theta"], seed=1_000_000 + k)

    def reference_samples(self, k, num_samples: int = 10_000, seed: int = 0):
        """Exact posterior draws for observation ``k``: ``{"mu": (S,), "tau": (S,), "theta": (S, N)}``."""
        return self.posterior_samples(self.observation(k), num_samples, seed)

    def posterior_samples(self, x: torch.Tensor, num_samples: int = 10_000, seed: int = 0):
        """Exact posterior draws given data ``x (num_groups, num_obs)``."""
        x = torch.as_tensor(x, dtype=torch.float64)
        if tuple(x.shape) != self.x_shape:
            raise ValueError(f"x: expected shape {self.x_shape}, got {tuple(x.shape)}")
        xbar = x.mean(-1).numpy()
        s2 = self.noise**2 / self.num_obs
        n = self.num_groups
        taus = np.linspace(1e-6, 8.0, 20_001)
        v = taus**2 + s2  # marginal: xbar_n = mu + e_n, e_n ~ N(0, v), mu ~ N(0, 1)
        prec_mu = 1.0 + n / v
        mean_mu = (xbar.sum() / v) / prec_mu
        log_marg = (-0.5 * n * np.log(2 * np.pi * v) - 0.5 * ((xbar**2).sum() / v)
                    + 0.5 * prec_mu * mean_mu**2 - 0.5 * np.log(prec_mu))
        log_post = log_marg + np.log(2 / np.pi) / 2 - taus**2 / 2  # HalfNormal(1) prior
        w = np.exp(log_post - log_post.max())
        cdf = np.concatenate([[0.0], np.cumsum((w[1:] + w[:-1]) / 2)])
        cdf /= cdf[-1]
        rng = np.random.default_rng(seed)
        tau = np.interp(rng.random(num_samples), cdf, taus)
        v = tau**2 + s2
        prec_mu = 1.0 + n / v
        mu = (xbar.sum() / v) / prec_mu + rng.standard_normal(num_samples) / np.sqrt(prec_mu)
        prec_th = 1.0 / tau[:, None] ** 2 + 1.0 / s2
        mean_th = (mu[:, None] / tau[:, None] ** 2 + xbar[None] / s2) / prec_th
        theta = mean_th + rng.standard_normal((num_samples, n)) / np.sqrt(prec_th)
        f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        return {"mu": f(mu), "tau": f(tau), "theta": f(theta)}


class LotkaVolterraPopulation(Task):
    """A population of N predator–prey systems with log-normally varying rates.

    μ ~ N(log θ*, 0.5² I₄), σ ~ HalfNormal(0.3)^4 (per rate); for n = 1..N:
    log θ_n ~ N(μ, diag σ²), x_n = LV-SDE summaries(θ_n) through ``ib.Implicit``.
    True values: μ = log θ*, σ = 0.1 (observation 1); others at fixed seeds near them.
    """

    name = "lotka_volterra_population"
    description = "N Lotka–Volterra SDE systems with a log-normal population of rates (hierarchical)"
    observed = ("x",)
    theta_dim = 4

    def __init__(self, num_systems: int = 10, **lv_options):
        integer("num_systems", num_systems)
        self.num_systems = num_systems
        self.lv = LotkaVolterraSDE(**lv_options)
        self.x_shape = (num_systems,) + self.lv.x_shape

    def simulate(self, theta, seed=None):
        """One system per row: ``log_theta (n, 4)`` → ``x (n, *lv_x_shape)``."""
        return self.lv.simulate(torch.as_tensor(theta).exp(), seed=seed)

    def prior(self, systems=None):
        """The latents' model: ``mu`` (4,), ``sigma`` (4,), ``log_theta`` (num_systems, 4)."""
        systems = pyro.plate("systems", self.num_systems) if systems is None else systems
        mu = pyro.sample("mu", dist.Normal(torch.tensor(THETA_STAR).log(), 0.5).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfNormal(0.3 * torch.ones(4)).to_event(1))
        with systems:
            log_theta = pyro.sample("log_theta", dist.Normal(mu, sigma).to_event(1))
        return mu, sigma, log_theta

    def model(self):
        systems = pyro.plate("systems", self.num_systems)
        _, _, log_theta = self.prior(systems)
        with systems:
            return pyro.sample("x", ib.Implicit(self.simulate, log_theta, event_shape=self.lv.x_shape))

    def _true_parameters(self, k):
        g = torch.Generator().manual_seed(9100 + k)
        mu = torch.tensor(THETA_STAR).log() + (0 if k == 1 else 0.2 * torch.randn(4, generator=g))
        sigma = torch.full((4,), 0.1)
        log_theta = mu + sigma * torch.randn(self.num_systems, 4, generator=g)
        return {"mu": mu, "sigma": sigma, "log_theta": log_theta}

    def observation(self, k):
        k = self._check_k(k)
        return self.simulate(self.true_parameters(k)["log_theta"], seed=1_000_000 + k)

    def reference_samples(self, k):
        return None
