r"""Score-function (REINFORCE) gradients with control variates, for discrete or
non-differentiable sampling paths (Williams 1992, Mnih & Gregor 2014).

For a cost f(z) with z ~ p_φ(z), ∇_φ E[f(z)] = E[(f(z) − b) ∇_φ log p_φ(z)] + E[∇_φ f(z)] for any
baseline b that does not depend on z. :func:`score_function_surrogate` returns a scalar whose
gradient is that estimator; the baseline can be a constant, a running average
(:class:`MovingAverageBaseline`) or an input-dependent network (:class:`LearnedBaseline`,
trained on the squared residual (f − b)², the variance-minimising choice within its family), and
the leave-one-out average of the other samples is a baseline that needs no training
(``leave_one_out_baseline``, for several draws of z per input).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["score_function_surrogate", "LearnedBaseline", "MovingAverageBaseline", "leave_one_out_baseline"]


def score_function_surrogate(log_prob: torch.Tensor, cost: torch.Tensor,
                             baseline: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean over draws of ``log_prob · (cost − baseline)`` (weights detached) ``+ cost``.

    Its gradient is the REINFORCE estimate of ∇E[cost], including the pathwise part when the
    cost itself depends on the parameters. ``log_prob``, ``cost`` and ``baseline`` broadcast.
    """
    b = 0.0 if baseline is None else baseline
    advantage = (cost - b).detach()
    return (log_prob * advantage).mean() + cost.mean()


def leave_one_out_baseline(cost: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """For K ≥ 2 draws along ``dim``: each draw's baseline is the mean cost of the other K − 1."""
    k = cost.shape[dim]
    if k < 2:
        raise ValueError("leave_one_out_baseline: needs at least 2 draws along dim")
    return (cost.sum(dim, keepdim=True) - cost) / (k - 1)


class MovingAverageBaseline(nn.Module):
    """Exponential moving average of the cost (a scalar baseline)."""

    def __init__(self, decay: float = 0.9):
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"decay: expected in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("value", torch.zeros(()))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def forward(self, cost: torch.Tensor) -> torch.Tensor:
        """The baseline for this batch (before updating with it)."""
        b = self.value.clone()
        with torch.no_grad():
            m = cost.detach().mean()
            self.value.copy_(torch.where(self.started, self.decay * self.value + (1 - self.decay) * m, m))
            self.started.fill_(True)
        return b


class LearnedBaseline(nn.Module):
    """Input-dependent baseline b(x): ``forward(x) -> (n,)``; add :meth:`loss` to the objective."""

    def __init__(self, in_features: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def loss(self, x: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
        """Squared residual (f − b(x))², which trains b towards E[f | x]."""
        return ((cost.detach() - self(x)) ** 2).mean()
