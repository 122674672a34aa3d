"""Critics r(y, θ): networks whose output, trained with a ratio loss, estimates log p/q."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

__all__ = ["Critic"]


def _linear(i: int, o: int, sn: bool) -> nn.Module:
    layer = nn.Linear(i, o)
    return _spectral_norm(layer) if sn else layer


class Critic(nn.Module):
    """A critic on (context, θ) pairs, ``forward(context (n, c), theta (n, [m,] d)) -> (n, [m])``.

    ``kind="joint"``: an MLP on the concatenation [e(y), θ]. ``kind="projection"``:
    ψ(φ(θ)) + ⟨u(e(y)), φ(θ)⟩ (Miyato & Koyama 2018), which makes the dependence on y explicit
    and is easier to train when the context is high-dimensional. ``spectral_norm=True`` wraps
    every linear layer (a Lipschitz critic for Wasserstein losses; use a 1-Lipschitz activation
    such as ``nn.ReLU`` or ``nn.LeakyReLU`` then). ``context_features=0`` gives an
    unconditional critic r(θ) (call it with an empty context ``(n, 0)``).
    A ``theta`` with an extra draws dimension m is scored against its row's context.
    """

    def __init__(self, theta_features: int, context_features: int, hidden: int = 256, layers: int = 3,
                 kind: str = "joint", spectral_norm: bool = False, activation: type[nn.Module] = nn.SiLU):
        super().__init__()
        if kind not in ("joint", "projection"):
            raise ValueError(f"kind: expected 'joint' or 'projection', got {kind!r}")
        if layers < 1:
            raise ValueError(f"layers: expected >= 1, got {layers}")
        self.kind, self.theta_features, self.context_features = kind, theta_features, context_features
        width_in = theta_features + (context_features if kind == "joint" else 0)
        body = [_linear(width_in, hidden, spectral_norm), activation()]
        for _ in range(layers - 1):
            body += [_linear(hidden, hidden, spectral_norm), activation()]
        self.body = nn.Sequential(*body)
        self.head = _linear(hidden, 1, spectral_norm)
        self.project = _linear(context_features, hidden, spectral_norm) if kind == "projection" and context_features else None

    def forward(self, context: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        draws = theta.dim() == 3
        if draws:
            context = context[:, None].expand(-1, theta.shape[1], -1)
        if self.kind == "joint":
            h = self.body(torch.cat([context, theta], dim=-1))
            out = self.head(h).squeeze(-1)
        else:
            h = self.body(theta)
            out = self.head(h).squeeze(-1)
            if self.project is not None:
                out = out + (self.project(context) * h).sum(-1)
        return out
