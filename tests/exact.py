"""Models with exact posteriors, and measures of how far a method's draws are from them that a
wrong posterior cannot pass (module-level so process pools can pickle the models).

- ``correlated_model``: θ ~ N(0, I₃), x = Aθ + 0.5ε. Its posterior N(m(x), Σ) has correlations
  of ±0.67–0.71, so a method that gets the marginals right and the dependence wrong fails.
- ``bimodal_model``: θ ~ N(0, I₂), x₁ = θ₁² + 0.2ε₁, x₂ = θ₁ + θ₂ + 0.5ε₂. Two modes at
  θ₁ ≈ ±√x₁ with unequal mass (the prior on θ₂ = x₂ − θ₁ favours one), each tilted; exact draws
  by a 801² grid.

Measures (both computed per observation, averaged over observations by the tests):

- :func:`gaussian_errors` — ``shift``: the largest |mean error| over coordinates, in posterior
  sd; ``spread``: the largest |log eigenvalue| of the draws' covariance whitened by the exact one.
  A 0.3-sd shift of one coordinate gives shift 0.3, a 1.5× variance in any direction spread
  log 1.5 = 0.41, the right marginals with the correlations dropped spread 1.25.
- :func:`sliced_errors` — ``w1``: the largest 1-Wasserstein distance between the draws and the
  exact draws along the coordinates and the pairwise diagonals, in units of the exact sd along
  each direction; ``mode``: the error in the mass of θ₀ > 0. A 0.3-sd shift gives w1 ≥ 0.29, a
  1.5× variance about the mean 0.18–0.2, one mode dropped a mode error of at least the smaller
  mode's mass.
"""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import scipy.stats
import torch

import implicitbayes as ib

A = torch.tensor([[1.0, 0.8, 0.0], [0.0, 1.0, -0.8], [0.6, 0.0, 1.0]])
NOISE = 0.5
COV = torch.linalg.inv(torch.eye(3) + A.T @ A / NOISE**2)


def correlated_simulator(theta):
    return theta @ A.to(theta.device).T + NOISE * torch.randn_like(theta)  # runs on any device


def correlated_model():
    theta = pyro.sample("theta", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    return pyro.sample("x", ib.Implicit(correlated_simulator, theta, event_shape=(3,)))


def correlated_posterior(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of p(θ | x) for ``correlated_model``."""
    return COV @ A.T @ x / NOISE**2, COV


BIMODAL_NOISE = (0.2, 0.5)


def bimodal_simulator(theta):
    x1 = theta[:, 0] ** 2 + BIMODAL_NOISE[0] * torch.randn_like(theta[:, 0])
    x2 = theta[:, 0] + theta[:, 1] + BIMODAL_NOISE[1] * torch.randn_like(theta[:, 0])
    return torch.stack([x1, x2], -1)


def bimodal_model():
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    return pyro.sample("x", ib.Implicit(bimodal_simulator, theta, event_shape=(2,)))


def bimodal_posterior_samples(x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` exact draws of p(θ | x) for ``bimodal_model``: a cell of a 801 × 801 grid over
    [−4, 4]² by its probability, then uniformly within it."""
    grid = torch.linspace(-4, 4, 801, dtype=torch.float64)
    t1, t2 = torch.meshgrid(grid, grid, indexing="ij")
    s1, s2 = BIMODAL_NOISE
    x = x.double()
    log_p = (-0.5 * (t1**2 + t2**2) - 0.5 * ((x[0] - t1**2) / s1) ** 2 - 0.5 * ((x[1] - t1 - t2) / s2) ** 2).flatten()
    g = torch.Generator().manual_seed(seed)
    cell = torch.multinomial((log_p - log_p.max()).exp(), n, replacement=True, generator=g)
    jitter = (torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5) * (grid[1] - grid[0])
    return (torch.stack([t1.flatten()[cell], t2.flatten()[cell]], -1) + jitter).float()


def gaussian_errors(draws: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> dict[str, float]:
    draws, mean, cov = draws.double(), mean.double(), cov.double()
    shift = ((draws.mean(0) - mean).abs() / cov.diag().sqrt()).max()
    chol = torch.linalg.cholesky(cov)
    white = torch.linalg.solve_triangular(chol, (draws - mean).T, upper=False)
    spread = torch.linalg.eigvalsh(torch.cov(white)).log().abs().max()
    return {"shift": float(shift), "spread": float(spread)}


def directions(d: int) -> torch.Tensor:
    """The coordinates and the unit diagonals (e_i ± e_j)/√2 of R^d."""
    eye = torch.eye(d)
    pairs = [(eye[i] + s * eye[j]) / math.sqrt(2) for i, j in itertools.combinations(range(d), 2) for s in (1, -1)]
    return torch.stack([*eye, *pairs])


def sliced_errors(draws: torch.Tensor, exact: torch.Tensor, diagonals: bool = True) -> dict[str, float]:
    dirs = directions(exact.shape[1]) if diagonals else torch.eye(exact.shape[1])
    a, b = (draws.double() @ dirs.T.double()).numpy(), (exact.double() @ dirs.T.double()).numpy()
    w1 = max(scipy.stats.wasserstein_distance(a[:, j], b[:, j]) / b[:, j].std() for j in range(len(dirs)))
    mode = abs(float((draws[:, 0] > 0).double().mean() - (exact[:, 0] > 0).double().mean()))
    return {"w1": float(w1), "mode": mode}


def average(errors: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(e[k] for e in errors) / len(errors) for k in errors[0]}
