"""The g-and-k distribution (Haynes et al. 1997; Drovandi & Pettitt 2011), a classic ABC test.

Defined by its quantile function, Q(z; A, B, g, k) = A + B·(1 + c·tanh(g·z/2))·(1 + z²)^k·z,
z ~ N(0, 1), c = 0.8; sampling is easy, the density is not available in closed form. sbibm 1.1.0
has no g-and-k task, so this follows the literature: prior U(0, 10)^4, θ* = (3, 1, 2, 0.5),
``num_draws`` = 1000 i.i.d. draws per dataset, reduced to Drovandi & Pettitt's robust summaries
from the octiles E1..E7: (E4, E6 − E2, (E6 + E2 − 2E4)/(E6 − E2), (E7 − E5 + E3 − E1)/(E6 − E2)).
``summary="octiles"`` gives the 7 octiles, ``"raw"`` the sorted draws.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch

from implicitbayes.checks import integer

from .base import Task

__all__ = ["GAndK", "g_and_k_quantile"]


def g_and_k_quantile(z: torch.Tensor, theta: torch.Tensor, c: float = 0.8) -> torch.Tensor:
    """Q(z; θ) for ``z (n, m)`` and ``theta (n, 4)`` = (A, B, g, k)."""
    a, b, g, k = (theta[:, i:i + 1] for i in range(4))
    return a + b * (1 + c * torch.tanh(g * z / 2)) * (1 + z**2) ** k * z


class GAndK(Task):
    name = "g_and_k"
    description = "g-and-k distribution, 4 parameters, robust quantile summaries of 1000 draws"
    theta_dim = 4
    true_theta = (3.0, 1.0, 2.0, 0.5)

    def __init__(self, summary: str = "robust", num_draws: int = 1000):
        if summary not in ("robust", "octiles", "raw"):
            raise ValueError(f"summary: expected 'robust', 'octiles' or 'raw', got {summary!r}")
        integer("num_draws", num_draws, minimum=8)
        self.summary, self.num_draws = summary, num_draws
        self.x_shape = {"robust": (4,), "octiles": (7,), "raw": (num_draws,)}[summary]

    @property
    def prior(self):
        return dist.Uniform(torch.zeros(4), 10 * torch.ones(4)).to_event(1)

    def _simulate(self, theta, g):
        z = torch.randn((theta.shape[0], self.num_draws), generator=g, device=theta.device, dtype=theta.dtype)
        draws = g_and_k_quantile(z, theta)
        if self.summary == "raw":
            return draws.sort(-1).values
        probs = torch.arange(1, 8, dtype=theta.dtype, device=theta.device) / 8
        e = torch.quantile(draws, probs, dim=-1).T  # (n, 7)
        if self.summary == "octiles":
            return e
        spread = e[:, 5] - e[:, 1]
        return torch.stack([e[:, 3], spread, (e[:, 5] + e[:, 1] - 2 * e[:, 3]) / spread,
                            (e[:, 6] - e[:, 4] + e[:, 2] - e[:, 0]) / spread], dim=1)

    def _true_parameters(self, k):
        if k == 1:
            return torch.tensor(self.true_theta)
        return 10 * torch.rand(4, generator=torch.Generator().manual_seed(7000 + k))
