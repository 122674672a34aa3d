r"""Critic-corrected sampling: sampling-importance-resampling (SIR) by a log density-ratio.

Given a proposal q(θ | y) that can only be sampled and a critic r(y, θ) ≈ log p(θ | y)/q(θ | y),
draw K candidates θ_1 … θ_K ~ q(· | y) and keep θ_I with probability ∝ w_I = exp λ r(y, θ_I).
By exchangeability of the candidates the kept draw has the density

    q_K(θ | y) = q(θ | y) · E_{θ_2..θ_K ~ q}[ K w(θ) / (w(θ) + Σ_{j≥2} w_j) ],

which tends to q e^{λr}/Z as K → ∞ (the posterior for λ = 1 and an exact r). The strength λ is
chosen on pairs (y, θ) ~ p held out from the critic's fit by the log score of q_K itself:

    −E_p[log q_K(θ | y)] + E_p[log q(θ | y)] = −E_p log E[ K w(θ) / (w(θ) + Σ_{j≥2} w_j) ],

estimated with groups of K − 1 proposal draws per y. It needs no density of q and does not trust
r: λ = 0 (the proposal alone) scores 0, and a critic of pure noise scores > 0 at every λ > 0
(Jensen), so an overfit critic is not used; with few candidates a λ above 1 can make up for SIR
moving q only part of the way to q e^{λr}/Z. (Rubin 1988; Smith & Gelfand 1992; for a
discriminator's ratio, Turner et al. 2019 and Azadi et al. 2019.)
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..checks import integer

__all__ = ["CriticResampler"]


class CriticResampler:
    """SIR with ``num_candidates`` K proposal draws per kept draw, weighted by exp(``temperature`` · r)."""

    #: the strengths λ compared by :meth:`select_temperature`
    TEMPERATURES = (3.0, 2.0, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25, 0.0)
    #: activations of at most this many candidates at a time (they stay in cache)
    BLOCK = 4096

    def __init__(self, num_candidates: int, temperature: float = 1.0):
        self.num_candidates = integer("num_candidates", num_candidates)
        self.temperature = float(temperature)

    def sample(self, propose: Callable[[int], torch.Tensor], log_ratio: Callable[[torch.Tensor], torch.Tensor],
               num_samples: int, generator: torch.Generator) -> tuple[torch.Tensor, float | None]:
        """``num_samples`` draws ``(num_samples, d)`` and the mean effective number of candidates per
        draw (out of K; None when no resampling happens).

        ``propose(m)`` returns m proposal draws ``(m, d)`` from ``generator``; ``log_ratio(c)``
        scores candidates ``(n, K, d)`` → ``(n, K)``."""
        k = self.num_candidates
        if k == 1 or self.temperature == 0:
            return propose(num_samples), None
        out, ess = [], []
        for chunk in torch.arange(num_samples).split(max(1, self.BLOCK // k)):
            n = len(chunk)
            cand = propose(n * k).reshape(n, k, -1)
            w = torch.softmax(self.temperature * log_ratio(cand), 1)  # (n, K)
            pick = torch.multinomial(w, 1, generator=generator).squeeze(1)
            out.append(cand[torch.arange(n), pick])
            ess.append(1.0 / (w**2).sum(1))
        return torch.cat(out), float(torch.cat(ess).mean())

    @classmethod
    def select_temperature(cls, r_true: torch.Tensor, r_proposal: torch.Tensor,
                           num_candidates: int) -> dict[float, float]:
        """Held-out log score of SIR with ``num_candidates`` K for each λ in ``TEMPERATURES`` (the
        module docstring; lower is better, λ = 0 scores 0).

        ``r_true (n,)``: r at held-out pairs (y_i, θ_i) ~ p; ``r_proposal (n, G, K − 1)``: r at G
        groups of K − 1 proposal draws for each y_i."""
        k = num_candidates
        if k == 1:  # one candidate: SIR returns it whatever λ is
            return {lam: 0.0 for lam in cls.TEMPERATURES}
        groups = r_proposal.shape[1]
        scores = {}
        for lam in cls.TEMPERATURES:
            if lam == 0:  # uniform weights: the draw is the proposal's
                scores[lam] = 0.0
                continue
            own = (lam * r_true)[:, None, None].expand(-1, groups, 1)
            log_share = math.log(k) + own[..., 0] - torch.logsumexp(torch.cat([own, lam * r_proposal], -1), -1)
            scores[lam] = float(-(torch.logsumexp(log_share, 1) - math.log(groups)).mean())
        return scores
