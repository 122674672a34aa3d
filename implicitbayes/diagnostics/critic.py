r"""How far is the posterior from the truth at this observation? The ImplicitVI critic's own answer.

An ImplicitVI posterior carries a critic trained to r(y, θ) ≈ log p(θ | y)/q_w(θ | y), the log
ratio between the true posterior and its generator. At one observation y, draws θ_1 … θ_n from
q_w and their weights w_i = e^{r_i} / mean_j e^{r_j} (self-normalised, so that E_q w = 1 as an
exact ratio has) estimate, with no further simulation or training:

- KL(q ‖ p) = −E_q log w,  KL(p ‖ q) = E_q[w log w];
- the total variation TV(p, q) = ½ E_q |w − 1|, and with it the accuracy of the *best possible*
  classifier between equal samples of p and q, ½ + ½ TV — the number a C2ST estimates with a
  trained classifier (and reference draws a user does not have);
- the same for the critic-corrected draws: SIR with K candidates and strength λ draws from
  q_K = q · ρ with ρ(θ) = E[K w(θ)^λ / (w(θ)^λ + Σ_{j<K} w_j^λ)] (``infer.sir``), so
  TV(p, q_K) = ½ E_q |w − ρ|, ρ estimated with groups of K − 1 of the other draws;
- the importance-sampling effective sample size (Σ w)² / (n Σ w²): near 1 the generator already
  matches, near 0 the correction has little to resample from.

This is what L-C2ST (Linhart et al. 2023) gets from a classifier trained for the purpose; here the
classifier is the critic, trained anyway. It is an estimate by the critic, so it cannot see errors
the critic shares with the generator (mass neither puts anywhere), and it reads low where the
critic is under-fitted: a large value is a warning to trust, a small one a reassurance to check
(``benchmarks/results/critic_diagnostic.md`` measures how well it ranks observations by their
true C2ST).
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import integer

__all__ = ["critic_divergence"]


@torch.no_grad()
def critic_divergence(posterior, observed: Any = None, *, num_samples: int = 10_000, seed: int = 0) -> dict:
    """The critic's estimate of the distance between the posterior and the truth at ``observed``
    (the mapping ``posterior.sample`` takes; the default observation when omitted), from
    ``num_samples`` generator draws (module docstring).

    Returns ``{"implied_c2st", "implied_c2st_generator", "tv", "tv_generator", "kl_q_p",
    "kl_p_q", "ess_fraction", "num_samples", "num_candidates", "temperature"}``: ``implied_c2st``
    (0.5 = indistinguishable from the truth, 1 = disjoint) and ``tv`` are for the draws
    ``posterior.sample`` returns (critic-corrected), the ``_generator`` ones and the KLs for the
    generator alone."""
    if not hasattr(posterior, "log_ratio") or not hasattr(posterior, "draw_standardized"):
        raise TypeError(f"posterior: a {type(posterior).__name__} has no ratio critic; critic_divergence works "
                        "for ImplicitVI posteriors (ib.ImplicitVI(...).fit)")
    if posterior.config.correction is None:
        raise ValueError("posterior: trained with correction=None, so it has no trained critic; "
                         "train with correction='sir' (the default) to use critic_divergence")
    n = integer("num_samples", num_samples, minimum=100)
    integer("seed", seed, minimum=0)
    x = posterior._observation(observed)
    g = torch.Generator(device=posterior.device).manual_seed(int(seed))
    c = posterior.context(x)  # (1, e)
    frame = posterior.critic_frame(c)
    r = torch.cat([posterior.log_ratio(c.expand(len(u), -1), u, (frame[0].expand(len(u), -1),
                                                                   frame[1].expand(len(u), -1)))
                   for u in posterior.draw_standardized(c, n, g)[0].split(4096)]).double()
    log_w = r - torch.logsumexp(r, 0) + torch.log(torch.tensor(float(n), dtype=r.dtype))  # mean w = 1
    w = log_w.exp()
    k, lam = posterior.config.num_candidates, float(posterior.config.temperature)
    rho = _sir_density_ratio(log_w, k, lam, g)
    tv, tv_gen = 0.5 * float((w - rho).abs().mean()), 0.5 * float((w - 1).abs().mean())
    return {"implied_c2st": 0.5 + 0.5 * tv, "implied_c2st_generator": 0.5 + 0.5 * tv_gen, "tv": tv,
            "tv_generator": tv_gen, "kl_q_p": float(-log_w.mean()), "kl_p_q": float((w * log_w).mean()),
            "ess_fraction": float(w.sum() ** 2 / (n * (w**2).sum())), "num_samples": n, "num_candidates": k,
            "temperature": lam}


def _sir_density_ratio(log_w: torch.Tensor, k: int, lam: float, g: torch.Generator, groups: int = 16) -> torch.Tensor:
    """q_K/q at each draw: E[K w_i^λ / (w_i^λ + Σ_{j<K} w_j^λ)] over ``groups`` random groups of
    K − 1 other draws (``infer.sir``); 1 everywhere when SIR does not resample."""
    if k == 1 or lam == 0:
        return torch.ones_like(log_w)
    n = len(log_w)
    a = lam * log_w
    others = a[torch.randint(n, (n, groups, k - 1), generator=g, device=log_w.device)]  # (n, G, K-1)
    log_rest = torch.logsumexp(others, -1)  # (n, G)
    log_rho = torch.log(torch.tensor(float(k), dtype=a.dtype)) + a[:, None] - torch.logaddexp(a[:, None], log_rest)
    return log_rho.exp().mean(1)
