r"""Conditional VAE posterior q(θ | y) = ∫ p(θ | y, h) p(h | y) dh (Sohn et al. 2015).

Encoder q(h | θ, y), conditional prior p(h | y) and decoder p(θ | y, h) are diagonal Gaussians
whose parameters come from MLPs on the embedded observation c = e(y). Training maximises the
importance-weighted bound (Burda et al. 2016)

    L_K = E[ log (1/K) Σ_k p(θ | c, h_k) p(h_k | c) / q(h_k | θ, c) ],  h_k ~ q(· | θ, c),

which is the ELBO for K = 1 and tightens towards log q(θ | c) as K grows. ``objective="rws"``
trains by reweighted wake-sleep instead (Bornschein & Bengio 2015): the decoder and prior on
L_K with the encoder's draws held fixed, the encoder on the wake-phase loss
−Σ_k w̃_k log q(h_k | θ, c) with self-normalised weights w̃ — no reparameterised gradient
through h, so it also works for discrete or non-reparameterisable h. Sampling θ needs only
the prior and decoder.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Independent, Normal

__all__ = ["ConditionalVAE"]


def _mlp(i: int, o: int, hidden: int, layers: int) -> nn.Sequential:
    mods, w = [], i
    for _ in range(layers):
        mods += [nn.Linear(w, hidden), nn.SiLU()]
        w = hidden
    return nn.Sequential(*mods, nn.Linear(w, o))


def _gaussian(params: torch.Tensor) -> Independent:
    loc, log_scale = params.chunk(2, dim=-1)
    return Independent(Normal(loc, nn.functional.softplus(log_scale) + 1e-4), 1)


class ConditionalVAE(nn.Module):
    """``loss(theta (n, d), context (n, c), K) -> scalar``; ``sample(context, m) -> (n, m, d)``."""

    def __init__(self, theta_features: int, context_features: int, latent_features: int = 8,
                 hidden: int = 128, layers: int = 2):
        super().__init__()
        self.theta_features, self.latent_features = theta_features, latent_features
        self.encoder = _mlp(theta_features + context_features, 2 * latent_features, hidden, layers)
        self.prior = _mlp(context_features, 2 * latent_features, hidden, layers)
        self.decoder = _mlp(latent_features + context_features, 2 * theta_features, hidden, layers)

    def _log_joint_and_q(self, theta, context, num_particles: int, detach_h: bool):
        """h_k ~ q(h | θ, c) and the terms log p(θ, h_k | c), log q(h_k | θ, c): each ``(K, n)``."""
        q = _gaussian(self.encoder(torch.cat([theta, context], -1)))
        h = q.rsample((num_particles,))  # (K, n, k)
        if detach_h:
            h = h.detach()
        c = context.expand(num_particles, *context.shape)
        log_p = _gaussian(self.prior(context)).log_prob(h) + _gaussian(self.decoder(torch.cat([h, c], -1))).log_prob(theta)
        return log_p, q.log_prob(h)

    def bound(self, theta: torch.Tensor, context: torch.Tensor, num_particles: int = 1) -> torch.Tensor:
        """The importance-weighted bound L_K per row: ``(n,)`` (K = 1: the ELBO)."""
        log_p, log_q = self._log_joint_and_q(theta, context, num_particles, detach_h=False)
        return torch.logsumexp(log_p - log_q, 0) - math.log(num_particles)

    def loss(self, theta: torch.Tensor, context: torch.Tensor, num_particles: int = 1,
             objective: str = "iwae") -> torch.Tensor:
        """Training loss: ``"iwae"`` (−L_K, reparameterised) or ``"rws"`` (reweighted wake-sleep)."""
        if objective == "iwae":
            return -self.bound(theta, context, num_particles).mean()
        if objective != "rws":
            raise ValueError(f"objective: expected 'iwae' or 'rws', got {objective!r}")
        log_p, log_q = self._log_joint_and_q(theta, context, num_particles, detach_h=True)
        # wake phase for the model: L_K with the proposal's density held fixed
        model_loss = -(torch.logsumexp(log_p - log_q.detach(), 0) - math.log(num_particles)).mean()
        # wake phase for the proposal: self-normalised weights, gradient only through log q
        w = torch.softmax((log_p - log_q).detach(), 0)
        proposal_loss = -(w * log_q).sum(0).mean()
        return model_loss + proposal_loss

    @torch.no_grad()
    def sample(self, context: torch.Tensor, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``num_samples`` draws of θ per context row: ``(n, m, theta_features)``."""
        prior = _gaussian(self.prior(context))
        h = prior.base_dist.loc + prior.base_dist.scale * torch.randn(
            (num_samples,) + prior.base_dist.loc.shape, generator=generator, device=context.device, dtype=context.dtype)
        c = context.expand(num_samples, *context.shape)
        dec = _gaussian(self.decoder(torch.cat([h, c], -1))).base_dist
        theta = dec.loc + dec.scale * torch.randn(dec.loc.shape, generator=generator, device=context.device,
                                                  dtype=context.dtype)
        return theta.transpose(0, 1)
