"""The sbibm benchmark tasks (Lueckmann et al. 2021), re-implemented batched in torch.

Definitions follow sbibm 1.1.0's ``sbibm/tasks/*/task.py`` exactly (priors, simulators, the
subsampling of the ODE tasks); observations, true parameters and 10 000 reference posterior
draws are read from the files in sbibm's wheel. sbibm solves its ODEs in Julia, which is not
available here: SIR and Lotka–Volterra are solved with torchdiffeq (fixed-step RK4) instead.
"""

from __future__ import annotations

import math

import numpy as np
import pyro.distributions as dist
import torch
from torchdiffeq import odeint

from .base import Task

__all__ = ["TwoMoons", "GaussianLinear", "GaussianLinearUniform", "SLCP", "GaussianMixture",
           "BernoulliGLM", "SIR", "LotkaVolterraODE"]


def _uniform_box(bound: float, dim: int) -> dist.Distribution:
    return dist.Uniform(-bound * torch.ones(dim), bound * torch.ones(dim)).to_event(1)


def _randn(shape, like: torch.Tensor, g) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=like.device, dtype=like.dtype)


def _rand(shape, like: torch.Tensor, g) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=like.device, dtype=like.dtype)


class TwoMoons(Task):
    name = "two_moons"
    sbibm_name = "two_moons"
    description = "two crescent-shaped posterior modes in 2-D (sbibm)"
    theta_dim, x_shape = 2, (2,)

    @property
    def prior(self):
        return _uniform_box(1.0, 2)

    def _simulate(self, theta, g):
        n = theta.shape[0]
        a = (_rand((n,), theta, g) - 0.5) * math.pi  # U(-pi/2, pi/2)
        r = 0.1 + 0.01 * _randn((n,), theta, g)
        p = torch.stack([torch.cos(a) * r + 0.25, torch.sin(a) * r], dim=1)
        c = s = math.sqrt(0.5)  # rotation by -pi/4: cos = sqrt(1/2), sin = -sqrt(1/2)
        z0 = c * theta[:, 0] + s * theta[:, 1]
        z1 = -s * theta[:, 0] + c * theta[:, 1]
        return p + torch.stack([-z0.abs(), z1], dim=1)


class _GaussianLinearSimulator(Task):
    """x ~ N(theta, 0.1 I_10) (sbibm's "scale" is a variance)."""

    theta_dim, x_shape = 10, (10,)
    simulator_var = 0.1

    def _simulate(self, theta, g):
        return theta + math.sqrt(self.simulator_var) * _randn(theta.shape, theta, g)


class GaussianLinear(_GaussianLinearSimulator):
    """theta ~ N(0, 0.1 I_10), x ~ N(theta, 0.1 I_10); the posterior is Gaussian."""

    name = "gaussian_linear"
    sbibm_name = "gaussian_linear"
    description = "10-D Gaussian mean with a Gaussian prior; analytic posterior (sbibm)"
    prior_var = 0.1

    @property
    def prior(self):
        return dist.Normal(torch.zeros(10), math.sqrt(self.prior_var) * torch.ones(10)).to_event(1)

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """The exact posterior p(theta | x) for one observation ``x (10,)``."""
        var = 1.0 / (1.0 / self.prior_var + 1.0 / self.simulator_var)
        return dist.Normal(var / self.simulator_var * x, math.sqrt(var) * torch.ones_like(x)).to_event(1)


class GaussianLinearUniform(_GaussianLinearSimulator):
    """theta ~ U(-1, 1)^10, x ~ N(theta, 0.1 I_10); the posterior is a truncated Gaussian."""

    name = "gaussian_linear_uniform"
    sbibm_name = "gaussian_linear_uniform"
    description = "10-D Gaussian mean with a uniform prior on [-1, 1]^10 (sbibm)"

    @property
    def prior(self):
        return _uniform_box(1.0, 10)


class SLCP(Task):
    """Simple likelihood, complex posterior: 4 draws of a 2-D Gaussian with 5 parameters."""

    name = "slcp"
    sbibm_name = "slcp"
    description = "simple likelihood, complex (4-mode) posterior, 5 parameters (sbibm)"
    theta_dim, x_shape = 5, (8,)

    @property
    def prior(self):
        return _uniform_box(3.0, 5)

    def _simulate(self, theta, g):
        n = theta.shape[0]
        m = theta[:, :2]
        s1, s2 = theta[:, 2] ** 2, theta[:, 3] ** 2
        rho = torch.tanh(theta[:, 4])
        cov = torch.empty(n, 2, 2, dtype=theta.dtype, device=theta.device)
        cov[:, 0, 0] = s1**2 + 1e-6
        cov[:, 0, 1] = cov[:, 1, 0] = rho * s1 * s2
        cov[:, 1, 1] = s2**2 + 1e-6
        chol = torch.linalg.cholesky(cov)
        eps = _randn((n, 4, 2), theta, g)
        x = m[:, None, :] + torch.einsum("nij,nkj->nki", chol, eps)
        return x.reshape(n, 8)


class GaussianMixture(Task):
    name = "gaussian_mixture"
    sbibm_name = "gaussian_mixture"
    description = "mixture of a broad and a narrow Gaussian around theta, 2-D (sbibm)"
    theta_dim, x_shape = 2, (2,)

    @property
    def prior(self):
        return _uniform_box(10.0, 2)

    def _simulate(self, theta, g):
        n = theta.shape[0]
        scale = torch.where(_rand((n, 1), theta, g) < 0.5, 1.0, 0.1)
        return theta + scale * _randn(theta.shape, theta, g)


class BernoulliGLM(Task):
    """Bernoulli GLM with a 9-tap filter on white-noise input; 10 sufficient statistics.

    The design matrix is rebuilt exactly as sbibm builds it (white noise with
    ``np.random.RandomState(42)``, 100 steps); a test checks it against sbibm's stored file.
    """

    name = "bernoulli_glm"
    sbibm_name = "bernoulli_glm"
    description = "Bernoulli GLM, 10 parameters, sufficient statistics (sbibm)"
    theta_dim, x_shape = 10, (10,)

    def __init__(self):
        stimulus = torch.from_numpy(np.random.RandomState(42).randn(100).astype(np.float32))
        design = torch.zeros(100, 9)
        for j in range(9):
            design[j:, j] = stimulus[: 100 - j]
        self.design_matrix = torch.cat([torch.ones(100, 1), design], dim=1)  # (100, 10)
        m = 9
        d = torch.diag(torch.ones(m)) - torch.diag(torch.ones(m - 1), -1)
        f = d @ d + torch.diag(torch.arange(m, dtype=torch.float32) / m) ** 0.5
        precision = torch.zeros(10, 10)
        precision[0, 0] = 0.5
        precision[1:, 1:] = f.T @ f
        self.prior_precision = precision

    @property
    def prior(self):
        return dist.MultivariateNormal(torch.zeros(10), precision_matrix=self.prior_precision.to(torch.zeros(()).device))

    def _simulate(self, theta, g):
        design = self.design_matrix.to(theta.device, theta.dtype)
        p = torch.sigmoid(theta @ design.T)  # (n, 100)
        spikes = (_rand(p.shape, theta, g) < p).to(theta.dtype)
        # spike count and spike-triggered averages: sbibm's conv1d(..., padding=8)[-9:] equals y @ X
        return spikes @ design


class _ODETask(Task):
    """Shared plumbing for the ODE tasks: a batched fixed-step RK4 solve with torchdiffeq."""

    step_size: float = 0.01

    def _solve(self, rhs, u0: torch.Tensor, t_end: float, saveat: float) -> torch.Tensor:
        t = torch.arange(0, round(t_end / saveat) + 1, dtype=u0.dtype, device=u0.device) * saveat
        return odeint(rhs, u0, t, method="rk4", options={"step_size": self.step_size})  # (T, n, d)


class SIR(_ODETask):
    """SIR epidemic; beta, gamma ~ LogNormal; 10 binomial counts of infected (sbibm)."""

    name = "sir"
    sbibm_name = "sir"
    description = "SIR epidemic ODE, 2 parameters, 10 binomial counts of infected (sbibm)"
    theta_dim, x_shape = 2, (10,)
    population, days, total_count = 1_000_000.0, 160.0, 1000
    step_size = 0.05

    @property
    def prior(self):
        return dist.LogNormal(torch.tensor([math.log(0.4), math.log(0.125)]), torch.tensor([0.5, 0.2])).to_event(1)

    def solve(self, theta: torch.Tensor) -> torch.Tensor:
        """Noise-free infected fraction I/N on days 0, 17, ..., 153: ``(n, 10)``, float64."""
        n = theta.shape[0]
        beta, gamma = theta[:, :1].double(), theta[:, 1:].double()
        N = self.population

        def rhs(t, u):
            s, i = u[:, :1], u[:, 1:2]
            infection = beta * s * i / N
            recovery = gamma * i
            return torch.cat([-infection, infection - recovery, recovery], dim=1)

        u0 = torch.tensor([[N - 1.0, 1.0, 0.0]], dtype=torch.float64, device=theta.device).expand(n, 3)
        u = self._solve(rhs, u0, self.days, 1.0)  # (161, n, 3)
        return u[::17, :, 1].T / N  # days 0, 17, ..., 153

    def _simulate(self, theta, g):
        p = self.solve(theta).clamp(0.0, 1.0).to(theta.dtype)
        count = torch.full_like(p, float(self.total_count))
        return torch.binomial(count, p, generator=g)


class LotkaVolterraODE(_ODETask):
    """sbibm's Lotka–Volterra: deterministic ODE with log-normal observation noise.

    dx/dt = αx − βxy, dy/dt = −γy + δxy, u0 = (30, 1), solved on [0, 20] saved every 0.1,
    every 21st point kept (10 per species, x then y), x_obs ~ LogNormal(log u, 0.1).
    """

    name = "lotka_volterra_ode"
    sbibm_name = "lotka_volterra"
    description = "sbibm's Lotka–Volterra ODE with log-normal noise, 4 parameters, 20 values"
    theta_dim, x_shape = 4, (20,)
    step_size = 0.005

    @property
    def prior(self):
        return dist.LogNormal(torch.tensor([-0.125, -3.0, -0.125, -3.0]), 0.5 * torch.ones(4)).to_event(1)

    def solve(self, theta: torch.Tensor) -> torch.Tensor:
        """Noise-free populations at the 10 kept times: ``(n, 20)`` (x then y)."""
        a, b, c, d = (theta[:, i:i + 1].double() for i in range(4))

        def rhs(t, u):
            x, y = u[:, :1], u[:, 1:]
            return torch.cat([a * x - b * x * y, -c * y + d * x * y], dim=1)

        u0 = torch.tensor([[30.0, 1.0]], dtype=torch.float64, device=theta.device).expand(theta.shape[0], 2)
        u = self._solve(rhs, u0, 20.0, 0.1)[::21]  # (10, n, 2)
        return u.permute(1, 2, 0).reshape(theta.shape[0], 20)

    def _simulate(self, theta, g):
        u = self.solve(theta).clamp(1e-10, 1e4).log().to(theta.dtype)
        return torch.exp(u + 0.1 * _randn(u.shape, theta, g))
