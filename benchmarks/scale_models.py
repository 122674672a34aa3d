"""A model with wide observations for benchmarks/scale.py (module-level, so Dask and process
pools can pickle it): θ ∈ R³, x = A θ + noise with a fixed A of ``width`` rows."""

import pyro
import pyro.distributions as dist
import torch

import implicitbayes as ib

_A: dict[int, torch.Tensor] = {}


def _projection(width: int) -> torch.Tensor:
    if width not in _A:
        _A[width] = torch.randn(width, 3, generator=torch.Generator().manual_seed(width)) / 3**0.5
    return _A[width]


def wide_simulator(theta: torch.Tensor, width: int) -> torch.Tensor:
    return theta @ _projection(width).T + 0.5 * torch.randn(theta.shape[0], width)


def wide_model(width: int = 2_000):
    theta = pyro.sample("theta", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    return pyro.sample("x", ib.Implicit(lambda t: wide_simulator(t, width), theta, event_shape=(width,)))


def small_simulator(theta: torch.Tensor) -> torch.Tensor:
    return theta + 0.1 * torch.randn_like(theta)


def small_model():
    """θ ∈ R², x = θ + noise: 24 bytes per simulation, so the set itself dominates memory at 10⁷."""
    theta = pyro.sample("theta", dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1))
    return pyro.sample("x", ib.Implicit(small_simulator, theta, event_shape=(2,)))
