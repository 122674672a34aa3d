r"""Implicit generators θ = f_w(e(y), z), z ~ N(0, I): conditional samplers with no density.

The network outputs a point in the unconstrained space of the latents; a
:class:`~implicitbayes.ParameterSpace` maps it onto each site's support (so a bounded prior
never yields out-of-support draws). Noise enters at the input (``"concat"``), multiplicatively
at every hidden layer as in GATSBI, h ← h + (W_l z) ⊙ h (``"multiplicative"``), or both.
"""

from __future__ import annotations

import torch
from torch import nn

from ..space import ParameterSpace

__all__ = ["ImplicitGenerator"]


class ImplicitGenerator(nn.Module):
    """Conditional implicit sampler: ``forward(context (n, c), noise (n, m, k)) -> (n, m, D_u)``.

    Args:
        context_features: size of the embedded observation e(y).
        theta_features: size of the *unconstrained* latent vector (``space.unconstrained_dim``).
        noise_features: size of z (default: ``max(theta_features, 2)``).
        hidden, layers: width and depth of the MLP.
        noise_injection: ``"concat"``, ``"multiplicative"`` or ``"both"``.
        noise_skip: add a linear path from the noise to the output, θ = g(c, z) + A z. A
            Gaussian with a shape shared across contexts is then exactly representable by the
            linear part (A pooled over every context), and the MLP g learns the departures
            from it. A starts at zero.
        space: optional ParameterSpace; :meth:`sample` then returns constrained flat vectors.
    """

    def __init__(self, context_features: int, theta_features: int, noise_features: int | None = None,
                 hidden: int = 256, layers: int = 4, noise_injection: str = "concat",
                 space: ParameterSpace | None = None, activation: type[nn.Module] = nn.SiLU, noise_skip: bool = False):
        super().__init__()
        if noise_injection not in ("concat", "multiplicative", "both"):
            raise ValueError(f"noise_injection: expected 'concat', 'multiplicative' or 'both', got {noise_injection!r}")
        if not isinstance(noise_skip, bool):
            raise ValueError(f"noise_skip: expected True or False, got {noise_skip!r}")
        if space is not None and space.unconstrained_dim != theta_features:
            raise ValueError(f"theta_features={theta_features} but the space has {space.unconstrained_dim} "
                             "unconstrained dimensions")
        self.context_features, self.theta_features = context_features, theta_features
        self.noise_features = noise_features or max(theta_features, 2)
        self.noise_injection, self.space = noise_injection, space
        concat = noise_injection in ("concat", "both")
        self.inp = nn.Linear(context_features + (self.noise_features if concat else 0), hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers - 1))
        self.inject = (nn.ModuleList(nn.Linear(self.noise_features, hidden, bias=False) for _ in range(layers))
                       if noise_injection in ("multiplicative", "both") else None)
        self.act = activation()
        self.out = nn.Linear(hidden, theta_features)
        self.skip = nn.Linear(self.noise_features, theta_features, bias=False) if noise_skip else None
        if self.skip is not None:  # starts as the MLP alone; A grows where the data ask for it
            nn.init.zeros_(self.skip.weight)

    def forward(self, context: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Unconstrained draws ``(n, m, theta_features)`` for ``m`` noise vectors per context row."""
        if noise.dim() != 3 or noise.shape[0] != context.shape[0] or noise.shape[-1] != self.noise_features:
            raise ValueError(f"noise: expected shape ({context.shape[0]}, m, {self.noise_features}), got {tuple(noise.shape)}")
        c = context[:, None].expand(-1, noise.shape[1], -1)
        h = self.inp(torch.cat([c, noise], -1) if self.noise_injection != "multiplicative" else c)
        for i, layer in enumerate([None, *self.hidden]):
            if layer is not None:
                h = layer(h)
            if self.inject is not None:
                h = h + self.inject[i](noise) * h
            h = self.act(h)
        return self.out(h) if self.skip is None else self.out(h) + self.skip(noise)

    def sample(self, context: torch.Tensor, num_samples: int, generator: torch.Generator | None = None,
               constrained: bool = True) -> torch.Tensor:
        """``num_samples`` draws per context row, in one batched call: ``(n, m, D)``.

        With a ``space`` and ``constrained=True`` the draws are mapped onto the latents'
        supports (``D = space.dim``); otherwise they are unconstrained (``D = theta_features``).
        """
        noise = torch.randn((context.shape[0], num_samples, self.noise_features), generator=generator,
                            device=context.device, dtype=context.dtype)
        u = self(context, noise)
        if self.space is None or not constrained:
            return u
        n, m = u.shape[:2]
        return self.space.flatten(self.space.to_constrained(u.reshape(n * m, -1))).reshape(n, m, -1)
