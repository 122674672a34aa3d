r"""Divergences, density-ratio losses and scoring rules.

**Ratio losses.** A critic outputs ``v(x)``; each loss below takes its values on samples of
P (``v_p``) and of Q (``v_q``) and is minimised by ``v = log p/q`` (up to the stated
transformation), so a trained critic *is* a log-ratio estimator (Goodfellow et al. 2014; Nguyen et al. 2010; Sugiyama et al. 2012):

* logistic (Jensen–Shannon, the GAN loss): E_P softplus(−v) + E_Q softplus(v).
* f-divergence variational bounds (Nguyen et al. 2010, f-GAN): D_f(P‖Q) ≥ E_P[T] − E_Q[f*(T)]
  with equality at T = f′(p/q); we set T = f′(e^v), so the bound is tight at v = log p/q.
  KL: f(u) = u log u, T = 1 + v, f*(T) = e^v. Reverse KL: f(u) = −log u, T = −e^{−v},
  f*(T) = v − 1. Pearson χ²: f(u) = (u − 1)², T = 2(e^v − 1), f*(T) = e^{2v} − 1. Squared
  Hellinger: f(u) = (√u − 1)², T = 1 − e^{−v/2}, f*(T) = e^{v/2} − 1. JS: f(u) = u log u −
  (1 + u) log((1 + u)/2), T = log 2 − softplus(−v), f*(T) = softplus(v) − log 2.
* Bregman density-ratio fitting (Sugiyama et al. 2012; b-GAN): LSIF, ½E_Q[w²] − E_P[w] with
  w = e^v ≥ 0 (the Pearson χ² bound up to an affine map, as the logistic loss is the JS one); uLSIF, the same with an unconstrained w = v (then log p/q = log w where w > 0);
  KLIEP, max E_P[log w] s.t. E_Q[w] = 1, i.e. −E_P[v] + log E_Q[e^v] (v is identified up to a
  constant: log p/q = v − log E_Q e^v).
* hinge: E_P relu(1 − v) + E_Q relu(1 + v). Its minimiser is sign(log p/q): a classifier,
  *not* a consistent ratio estimator (the SVM loss of a GAN critic; Lim & Ye 2017).

**Wasserstein critics** (not ratios): W1(P, Q) = sup_{‖c‖_L ≤ 1} E_P c − E_Q c, with the
Lipschitz constraint by weight clipping, gradient penalty (Gulrajani et al. 2017) or spectral
normalisation (``nn.utils.parametrizations.spectral_norm`` in :class:`~implicitbayes.nn.Critic`).

**Kernel and scoring rules.** MMD² with a mixture of RBF kernels (optionally on learned
features), the energy score and kernel score (proper scoring rules for a sample of m draws per
observation, Pacchiardi & Dutta 2022), and the energy distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "RatioLoss", "RATIO_LOSSES", "ratio_loss", "F_DIVERGENCES", "f_divergence_bound", "logistic_loss",
    "hinge_loss", "lsif_loss", "ulsif_loss", "kliep_loss", "wasserstein_loss", "gradient_penalty",
    "clip_weights", "contrastive_loss", "mmd2", "median_bandwidth", "energy_score", "kernel_score", "energy_distance",
]

LOG2 = math.log(2.0)


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean()


# -- f-divergences ----------------------------------------------------------------------
#: name → (T(v), f*(T(v))), both written in v for stability
F_DIVERGENCES: dict[str, tuple[Callable, Callable]] = {
    "kl": (lambda v: 1 + v, lambda v: v.exp()),
    "reverse_kl": (lambda v: -(-v).exp(), lambda v: v - 1),
    "pearson": (lambda v: 2 * v.expm1(), lambda v: (2 * v).expm1()),
    "hellinger": (lambda v: -(-v / 2).expm1(), lambda v: (v / 2).expm1()),
    "js": (lambda v: LOG2 - F.softplus(-v), lambda v: F.softplus(v) - LOG2),
}


def f_divergence_bound(v_p: torch.Tensor, v_q: torch.Tensor, divergence: str) -> torch.Tensor:
    """Variational lower bound E_P[T] − E_Q[f*(T)] on D_f(P‖Q), tight at ``v = log p/q``."""
    try:
        t, conj = F_DIVERGENCES[divergence]
    except KeyError:
        raise ValueError(f"divergence: expected one of {sorted(F_DIVERGENCES)}, got {divergence!r}") from None
    return _mean(t(v_p)) - _mean(conj(v_q))


def logistic_loss(v_p: torch.Tensor, v_q: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with P labelled 1, E_P softplus(−v) + E_Q softplus(v) = 2 log 2 − JS bound."""
    return 2 * LOG2 - f_divergence_bound(v_p, v_q, "js")


def hinge_loss(v_p: torch.Tensor, v_q: torch.Tensor) -> torch.Tensor:
    return _mean(F.relu(1 - v_p)) + _mean(F.relu(1 + v_q))


def lsif_loss(v_p: torch.Tensor, v_q: torch.Tensor) -> torch.Tensor:
    """½E_Q[w²] − E_P[w] with w = e^v (non-negative ratio model) = −(Pearson χ² bound + 1)/2."""
    return -(f_divergence_bound(v_p, v_q, "pearson") + 1) / 2


def ulsif_loss(w_p: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """½E_Q[w²] − E_P[w] with the critic output as the ratio itself (unconstrained)."""
    return 0.5 * _mean(w_q**2) - _mean(w_p)


def kliep_loss(v_p: torch.Tensor, v_q: torch.Tensor) -> torch.Tensor:
    """−E_P[v] + log E_Q[e^v] (normalisation E_Q w = 1 built in; Donsker–Varadhan form)."""
    return -_mean(v_p) + torch.logsumexp(v_q.reshape(-1), 0) - math.log(v_q.numel())


def contrastive_loss(v_p: torch.Tensor, v_q: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of picking the P draw among 1 + K candidates that share a condition.

    ``v_p`` (n,) scores the P draw of row i and ``v_q`` (n, K) K draws from Q for the same row;
    the loss is E[log Σ_{j=0..K} e^{v_j} − v_0] (InfoNCE; NRE-C of Miller et al. 2022 with its
    class weight γ = 0). Its minimiser is v = log p/q + c(row): the log-ratio up to a constant per
    row, which is exactly what resampling among a row's candidates needs.
    """
    if v_q.dim() != 2 or v_q.shape[0] != v_p.shape[0]:
        raise ValueError(f"v_q: expected shape ({v_p.shape[0]}, K), got {tuple(v_q.shape)}")
    return (torch.logsumexp(torch.cat([v_p[:, None], v_q], 1), 1) - v_p).mean()


@dataclass(frozen=True)
class RatioLoss:
    """A critic loss and how to read the log-ratio log p/q off the critic's output."""

    name: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    consistent: bool = True  # minimiser is (a known transform of) the true log-ratio

    def log_ratio(self, v: torch.Tensor, v_q: torch.Tensor | None = None) -> torch.Tensor:
        """Log-ratio estimate from critic outputs ``v``; KLIEP needs outputs on Q samples to normalise."""
        if self.name == "ulsif":
            return v.clamp_min(torch.finfo(v.dtype).tiny).log()  # w ≤ 0 means "ratio ≈ 0"
        if self.name == "kliep":
            if v_q is None:
                raise ValueError("kliep: log_ratio needs v_q (critic outputs on Q samples) to normalise")
            return v - (torch.logsumexp(v_q.reshape(-1), 0) - math.log(v_q.numel()))
        return v


RATIO_LOSSES: dict[str, RatioLoss] = {
    "logistic": RatioLoss("logistic", logistic_loss),
    **{f"f-{name}": RatioLoss(f"f-{name}", (lambda n: lambda vp, vq: -f_divergence_bound(vp, vq, n))(name))
       for name in F_DIVERGENCES},
    "lsif": RatioLoss("lsif", lsif_loss),
    "ulsif": RatioLoss("ulsif", ulsif_loss),
    "kliep": RatioLoss("kliep", kliep_loss),
    "hinge": RatioLoss("hinge", hinge_loss, consistent=False),
}


def ratio_loss(name: str) -> RatioLoss:
    """Look up a ratio loss by name (``RATIO_LOSSES``), with a clear error for unknown names."""
    try:
        return RATIO_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown ratio loss {name!r}; expected one of {sorted(RATIO_LOSSES)}") from None


# -- Wasserstein --------------------------------------------------------------------------
def wasserstein_loss(c_p: torch.Tensor, c_q: torch.Tensor) -> torch.Tensor:
    """−(E_P c − E_Q c): minimising it makes E_P c − E_Q c a W1 estimate for a 1-Lipschitz c."""
    return -(_mean(c_p) - _mean(c_q))


def gradient_penalty(critic: Callable[..., torch.Tensor], x_p: torch.Tensor, x_q: torch.Tensor, *args,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """E[(‖∇_x c(x̂)‖ − 1)²] at x̂ = εx_p + (1 − ε)x_q, ε ~ U(0, 1) per row (WGAN-GP).

    ``critic(x̂, *args)`` is called with the extra arguments (e.g. a context) unchanged.
    """
    eps = torch.rand((x_p.shape[0],) + (1,) * (x_p.dim() - 1), generator=generator, device=x_p.device, dtype=x_p.dtype)
    x_hat = (eps * x_p + (1 - eps) * x_q).detach().requires_grad_(True)
    out = critic(x_hat, *args)
    (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    return ((grad.reshape(grad.shape[0], -1).norm(dim=1) - 1) ** 2).mean()


@torch.no_grad()
def clip_weights(module: torch.nn.Module, bound: float = 0.01) -> None:
    """Clamp every parameter of ``module`` to [−bound, bound] (the original WGAN constraint)."""
    for p in module.parameters():
        p.clamp_(-bound, bound)


# -- kernels and scoring rules ------------------------------------------------------------
def median_bandwidth(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Median pairwise Euclidean distance of the pooled sample (the median heuristic)."""
    z = x if y is None else torch.cat([x, y])
    d = torch.cdist(z, z)
    off = d[~torch.eye(len(z), dtype=torch.bool, device=z.device)]
    return off.median().clamp_min(1e-12)


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths: torch.Tensor | None = None, unbiased: bool = True,
         features: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Squared MMD between samples ``x (n, d)`` and ``y (m, d)`` with k = mean_b exp(−‖a − b‖²/(2b²)).

    Bandwidths default to the median heuristic times (0.5, 1, 2); ``features`` maps both
    samples first (a learned kernel). Unbiased (U-statistic) by default: zero in expectation
    when the distributions are equal, and can then be slightly negative.
    """
    if features is not None:
        x, y = features(x), features(y)
    if bandwidths is None:
        with torch.no_grad():
            bandwidths = median_bandwidth(x, y) * torch.tensor([0.5, 1.0, 2.0], device=x.device, dtype=x.dtype)
    bandwidths = torch.as_tensor(bandwidths, device=x.device, dtype=x.dtype).reshape(-1, 1, 1)

    def k(a, b):
        return torch.exp(-torch.cdist(a, b).pow(2)[None] / (2 * bandwidths**2)).mean(0)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    n, m = len(x), len(y)
    if unbiased:
        if n < 2 or m < 2:
            raise ValueError("mmd2: the unbiased estimator needs at least 2 samples on each side")
        sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    else:
        sxx, syy = kxx.mean(), kyy.mean()
    return sxx + syy - 2 * kxy.mean()


def _pairwise_mean(samples: torch.Tensor, kernel: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    m = samples.shape[-2]
    d = torch.cdist(samples, samples)
    return (kernel(d).sum((-1, -2)) - kernel(torch.zeros((), device=d.device, dtype=d.dtype)) * m) / (m * (m - 1))


def energy_score(samples: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """Energy score of draws ``samples (n, m, d)`` for observations ``observed (n, d)``: ``(n,)``.

    (2/m) Σ_j ‖θ_j − θ‖ − 1/(m(m−1)) Σ_{j≠k} ‖θ_j − θ_k‖, an unbiased estimate of twice
    the energy score E‖X − θ‖ − ½E‖X − X′‖ (strictly proper; lower is better).
    """
    if samples.dim() != 3 or observed.shape != (samples.shape[0], samples.shape[2]) or samples.shape[1] < 2:
        raise ValueError(f"energy_score: expected samples (n, m >= 2, d) and observed (n, d), got "
                         f"{tuple(samples.shape)} and {tuple(observed.shape)}")
    first = (samples - observed[:, None]).norm(dim=-1).mean(-1)
    return 2 * first - _pairwise_mean(samples, lambda d: d)


def kernel_score(samples: torch.Tensor, observed: torch.Tensor, bandwidth: float | torch.Tensor | None = None) -> torch.Tensor:
    """Gaussian kernel score: E k(X, X′) − 2 E k(X, θ) with unbiased pairwise term: ``(n,)``.

    The bandwidth defaults to the median heuristic over all draws (no gradient through it).
    """
    if samples.dim() != 3 or observed.shape != (samples.shape[0], samples.shape[2]) or samples.shape[1] < 2:
        raise ValueError(f"kernel_score: expected samples (n, m >= 2, d) and observed (n, d), got "
                         f"{tuple(samples.shape)} and {tuple(observed.shape)}")
    if bandwidth is None:
        with torch.no_grad():
            flat = samples.reshape(-1, samples.shape[-1])
            bandwidth = median_bandwidth(flat[torch.randperm(len(flat), device=flat.device)[:1000]])
    k = lambda d: torch.exp(-d**2 / (2 * bandwidth**2))  # noqa: E731
    return _pairwise_mean(samples, k) - 2 * k((samples - observed[:, None]).norm(dim=-1)).mean(-1)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased energy distance 2E‖X − Y‖ − E‖X − X′‖ − E‖Y − Y′‖ (zero in expectation iff P = Q)."""
    return 2 * torch.cdist(x, y).mean() - _pairwise_mean(x[None], lambda d: d)[0] - _pairwise_mean(y[None], lambda d: d)[0]
