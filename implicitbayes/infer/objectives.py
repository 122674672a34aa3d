r"""The training objectives of the neural methods, one class each, so that each can be read and
tested apart from the loop that minimises it. Every objective returns one loss per row; a
training step takes the mean over its minibatch and validation the mean over the held-out rows.

- :class:`NPELoss` — −log q_φ(u | e(y)), maximum likelihood of a conditional density.
- :class:`RatioCriticLoss` — E_p softplus(−r) + E_q softplus(r), the logistic loss that makes a
  critic r a log density-ratio estimator, r* = log p/q: NRE's classifier (p the joint, q the
  product of marginals), ImplicitVI's correction critic (p the joint, q the generator's joint)
  and LFVI's critic all minimise it.
- :class:`EnergyScoreLoss` — the energy score of m generator draws per observation (a proper
  scoring rule, Gneiting & Raftery 2007; Pacchiardi & Dutta 2022), ImplicitVI's generator loss.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..losses import RATIO_LOSSES, energy_score, ratio_loss

__all__ = ["NPELoss", "RatioCriticLoss", "EnergyScoreLoss"]


class NPELoss:
    """−log q(u | x) per row, for a posterior with ``standardized_log_prob(u, x)`` (NPE's flow; NLE's, with
    the draw and the parameters in each other's roles)."""

    def __init__(self, posterior):
        self.posterior = posterior

    def __call__(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``x (n, *x_shape)``, standardised ``u (n, d)`` → ``(n,)``."""
        return -self.posterior.standardized_log_prob(u, x)


class RatioCriticLoss:
    """The loss of a critic r between inputs from p (label 1) and from q (label 0).

    ``critic(*inputs)`` returns r for any leading shape; ``loss`` names a consistent ratio loss
    of :data:`implicitbayes.losses.RATIO_LOSSES` (``"logistic"``, the default of every method:
    E_p softplus(−r) + E_q softplus(r), minimised by r = log p/q)."""

    def __init__(self, critic: Callable[..., torch.Tensor], loss: str = "logistic"):
        self.critic, self.loss = critic, ratio_loss(loss)
        if not self.loss.consistent:
            raise ValueError(f"loss: {loss!r} does not estimate a density ratio; expected one of "
                             f"{sorted(k for k, v in RATIO_LOSSES.items() if v.consistent)}")

    def __call__(self, positive: Sequence, negative: Sequence) -> torch.Tensor:
        """The loss on ``critic(*positive)`` (from p) and ``critic(*negative)`` (from q): a scalar."""
        return self.loss.loss(self.critic(*positive).reshape(-1), self.critic(*negative).reshape(-1))


class EnergyScoreLoss:
    """ES_m(q_w(· | y), θ) = (2/m) Σ_j ‖θ_j − θ‖ − 1/(m(m−1)) Σ_{j≠k} ‖θ_j − θ_k‖ per row, for
    ``m`` generator draws θ_j = f_w(e(y), z_j); minimised in expectation by q_w(· | y) = p(· | y)."""

    def __init__(self, posterior, num_draws: int):
        self.posterior, self.num_draws = posterior, num_draws

    def __call__(self, x: torch.Tensor, u: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``x (n, *x_shape)``, standardised ``u (n, d)`` → ``(n,)``."""
        draws = self.posterior.draw_standardized(self.posterior.context(x), self.num_draws, generator)
        return energy_score(draws, u)
