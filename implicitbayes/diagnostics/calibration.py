r"""Calibration of a posterior over many simulated datasets.

Both checks draw (θ_i, x_i) ~ p(θ) p(x | θ) from the model (``ib.simulate``), then posterior
draws given each x_i. An amortized posterior (NPE, ImplicitVI, NRE) is trained once and reused;
a method fitted to one observation (ABC, LFVI) is passed as a *function* ``x ↦ posterior``.

* ``sbc`` — simulation-based calibration (Talts et al. 2018): the rank of θ_i among L posterior
  draws is uniform on {0..L} for every coordinate when q(θ | x) = p(θ | x) on average over x.
  Uniformity is tested by a χ² test on ``bins`` equal bins per coordinate; the result holds the
  ranks, the p-values, and a Bonferroni-corrected minimum.
* ``expected_coverage`` — for each credibility level α, the fraction of datasets whose true θ
  lies inside the posterior's α region. ``kind="tarp"`` (Lemos et al. 2023): regions are balls
  around a random reference point, coverage sample-based and valid in any dimension;
  ``kind="marginal"``: central intervals per coordinate, averaged. A calibrated posterior lies
  on the diagonal; under it is over-confident, over it under-confident.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from scipy import stats

from ..checks import integer

__all__ = ["sbc", "SBCResult", "expected_coverage", "CoverageResult", "calibration_draws"]


def _posterior_for(posterior_or_fit: Any) -> Callable[[Any], Any]:
    from ..infer.posterior import Posterior

    if isinstance(posterior_or_fit, Posterior):
        return lambda x: posterior_or_fit
    if callable(posterior_or_fit):
        return posterior_or_fit
    raise TypeError("posterior: expected a fitted posterior (amortized) or a function observation -> posterior, "
                    f"got {type(posterior_or_fit).__name__}")


def calibration_draws(posterior: Any, model: Callable, *, observed: str | Sequence[str], num_datasets: int = 200,
                      num_samples: int = 100, model_args: tuple = (), model_kwargs: Mapping | None = None,
                      seed: int = 0, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(theta (n, d), draws (n, L, d), coordinate names)``: true latents of ``num_datasets``
    simulations and ``num_samples`` posterior draws given each, flattened in site order."""
    integer("num_datasets", num_datasets, minimum=2)
    integer("num_samples", num_samples, minimum=2)
    from tqdm.auto import tqdm

    from ..simulate import simulate

    from ..infer.posterior import Posterior

    fit_for = _posterior_for(posterior)
    observed = [observed] if isinstance(observed, str) else list(observed)
    data = simulate(model, num_datasets, observed=observed, model_args=model_args, model_kwargs=model_kwargs,
                    seed=seed, progress=False)
    names = list(data.latent_names)
    thetas = [torch.cat([data[n][i].reshape(-1).float() for n in names]) for i in range(len(data))]
    draws = []
    if isinstance(posterior, Posterior):  # amortized: one trained posterior, datasets in batches
        for start in tqdm(range(0, len(data), 64), desc="calibration", disable=not progress, leave=False):
            rows = {o: data[o][start:start + 64] for o in observed}
            d = posterior.sample_batch(num_samples, rows, seed=seed + 1 + start)
            b = next(iter(d.values())).shape[0]
            draws.extend(torch.cat([d[n].reshape(b, num_samples, -1).float().cpu() for n in names], 2))
    else:
        for i in tqdm(range(len(data)), desc="calibration", disable=not progress, leave=False):
            x = {o: data[o][i] for o in observed}
            d = fit_for(x).sample(num_samples, x, seed=seed + 1 + i)
            draws.append(torch.cat([d[n].reshape(num_samples, -1).float().cpu() for n in names], 1))
    sizes = {n: int(np.prod(data[n].shape[1:])) for n in names}
    coords = [n if sizes[n] == 1 else f"{n}[{j}]" for n in names for j in range(sizes[n])]
    return torch.stack(thetas), torch.stack(draws), coords


@dataclass
class SBCResult:
    """Ranks ``(num_datasets, d)`` in 0..num_samples, per-coordinate χ² p-values, and the
    Bonferroni-corrected smallest one (``p_value``); ``passed`` at level ``alpha``."""

    ranks: np.ndarray
    num_samples: int
    names: list[str]
    p_values: np.ndarray
    bins: int
    alpha: float = 0.01
    extra: dict = field(default_factory=dict)

    @property
    def p_value(self) -> float:
        return float(min(1.0, self.p_values.min() * len(self.p_values)))

    @property
    def passed(self) -> bool:
        return self.p_value >= self.alpha

    def plot(self, kind: str = "ecdf", ax=None):
        from .plots import plot_sbc

        return plot_sbc(self, kind=kind, ax=ax)


def sbc_ranks(theta: torch.Tensor, draws: torch.Tensor, bins: int = 10, alpha: float = 0.01,
              names: Sequence[str] | None = None) -> SBCResult:
    """SBC from given true values ``(n, d)`` and posterior draws ``(n, L, d)`` (ties broken at random)."""
    n, num, d = draws.shape
    g = torch.Generator().manual_seed(0)
    less = (draws < theta[:, None]).sum(1)
    ties = (draws == theta[:, None]).sum(1)
    ranks = (less + (torch.rand(less.shape, generator=g) * (ties + 1)).floor().long()).numpy()
    if not 2 <= bins <= num + 1:
        raise ValueError(f"bins: expected 2..{num + 1} for {num} draws per dataset, got {bins}")
    edges = np.linspace(0, num + 1, bins + 1)
    p = []
    for j in range(d):
        counts, _ = np.histogram(ranks[:, j], bins=edges)
        expected = n * np.diff(edges) / (num + 1)
        p.append(stats.chisquare(counts, expected * counts.sum() / expected.sum()).pvalue)
    return SBCResult(ranks, num, list(names or [f"theta[{j}]" for j in range(d)]), np.array(p), bins, alpha)


def sbc(posterior: Any, model: Callable, *, observed: str | Sequence[str], num_datasets: int = 200,
        num_samples: int = 99, bins: int = 10, alpha: float = 0.01, model_args: tuple = (),
        model_kwargs: Mapping | None = None, seed: int = 0, progress: bool = True) -> SBCResult:
    """Simulation-based calibration of ``posterior`` on datasets simulated from ``model``."""
    theta, draws, names = calibration_draws(posterior, model, observed=observed, num_datasets=num_datasets,
                                            num_samples=num_samples, model_args=model_args,
                                            model_kwargs=model_kwargs, seed=seed, progress=progress)
    return sbc_ranks(theta, draws, bins, alpha, names)


@dataclass
class CoverageResult:
    """Nominal levels ``alpha`` and the measured ``coverage`` at each, with a binomial standard
    error; ``max_gap`` is the largest |coverage − α|."""

    alpha: np.ndarray
    coverage: np.ndarray
    num_datasets: int
    kind: str

    @property
    def standard_error(self) -> np.ndarray:
        return np.sqrt(np.clip(self.alpha * (1 - self.alpha), 1e-12, None) / self.num_datasets)

    @property
    def max_gap(self) -> float:
        return float(np.abs(self.coverage - self.alpha).max())

    def plot(self, ax=None):
        from .plots import plot_coverage

        return plot_coverage(self, ax=ax)


def coverage_from_draws(theta: torch.Tensor, draws: torch.Tensor, *, kind: str = "tarp",
                        levels: int = 50, seed: int = 0) -> CoverageResult:
    """Expected coverage from true values ``(n, d)`` and posterior draws ``(n, L, d)``."""
    if kind not in ("tarp", "marginal"):
        raise ValueError(f"kind: expected 'tarp' or 'marginal', got {kind!r}")
    integer("levels", levels, minimum=2)
    alpha = np.linspace(0, 1, levels + 1)
    n = theta.shape[0]
    if kind == "tarp":
        # standardise by the true values' spread (the prior), pick reference points uniformly
        # in their bounding box, and compare distances to them
        loc, scale = theta.mean(0), theta.std(0).clamp_min(1e-12)
        t, s = (theta - loc) / scale, (draws - loc) / scale
        g = torch.Generator().manual_seed(seed)
        lo, hi = t.min(0).values, t.max(0).values
        ref = lo + (hi - lo) * torch.rand(t.shape, generator=g)
        d_true = (t - ref).norm(dim=-1)
        d_draw = (s - ref[:, None]).norm(dim=-1)
        f = (d_draw < d_true[:, None]).float().mean(1).numpy()  # credibility of the ball reaching θ_i
        coverage = np.array([(f < a).mean() for a in alpha])
    else:
        # rank-based: θ_i inside the central α interval of coordinate j
        q = (draws < theta[:, None]).float().mean(1).numpy()  # (n, d)
        coverage = np.array([(np.abs(q - 0.5) < a / 2).mean() for a in alpha])
    return CoverageResult(alpha, coverage, n, kind)


def expected_coverage(posterior: Any, model: Callable, *, observed: str | Sequence[str], num_datasets: int = 200,
                      num_samples: int = 200, kind: str = "tarp", levels: int = 50, model_args: tuple = (),
                      model_kwargs: Mapping | None = None, seed: int = 0, progress: bool = True) -> CoverageResult:
    """Expected coverage of ``posterior``'s credible regions on datasets simulated from ``model``."""
    theta, draws, _ = calibration_draws(posterior, model, observed=observed, num_datasets=num_datasets,
                                        num_samples=num_samples, model_args=model_args, model_kwargs=model_kwargs,
                                        seed=seed, progress=progress)
    return coverage_from_draws(theta, draws, kind=kind, levels=levels, seed=seed)
