"""Matplotlib figures for the diagnostics (imported on use). Each returns the figure."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["plot_sbc", "plot_coverage", "plot_ppc_series", "plot_training", "plot_pair"]


def _axes(ax, n: int = 1, width: float = 3.2, height: float = 2.8):
    import matplotlib.pyplot as plt

    if ax is not None:
        axes = np.atleast_1d(ax)
        return axes[0].figure, axes
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, axes[0]


def plot_sbc(result, kind: str = "ecdf", ax=None, max_panels: int = 8):
    """SBC ranks per coordinate: ``kind="ecdf"`` — ECDF of the normalised ranks minus the
    uniform CDF, with a pointwise 99 % band; ``kind="hist"`` — rank histogram with a 99 % band."""
    if kind not in ("ecdf", "hist"):
        raise ValueError(f"kind: expected 'ecdf' or 'hist', got {kind!r}")
    from scipy import stats

    d = min(result.ranks.shape[1], max_panels)
    fig, axes = _axes(ax, d)
    n, L = result.ranks.shape[0], result.num_samples
    for j in range(d):
        a = axes[j]
        r = result.ranks[:, j]
        if kind == "ecdf":
            z = np.linspace(0, 1, 201)
            ecdf = np.array([(r / (L + 1) <= zz).mean() for zz in z])
            band = stats.norm.ppf(0.995) * np.sqrt(z * (1 - z) / n)
            a.fill_between(z, -band, band, color="0.85", label="99 % band")
            a.plot(z, ecdf - z, color="C0")
            a.set_xlabel("normalised rank")
            if j == 0:
                a.set_ylabel("ECDF − uniform")
        else:
            edges = np.linspace(0, L + 1, result.bins + 1)
            counts, _ = np.histogram(r, bins=edges)
            expected = n / result.bins
            lo, hi = stats.binom.ppf([0.005, 0.995], n, 1 / result.bins)
            a.axhspan(lo, hi, color="0.85")
            a.axhline(expected, color="0.5", lw=1)
            a.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="C0", alpha=0.8)
            a.set_xlabel("rank")
        a.set_title(f"{result.names[j]}  p = {result.p_values[j]:.2g}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_coverage(result, ax=None):
    """Expected coverage against the nominal level, with a ±2 se binomial band on the diagonal."""
    fig, axes = _axes(ax, 1, 3.4, 3.4)
    a = axes[0]
    se = result.standard_error
    a.fill_between(result.alpha, result.alpha - 2 * se, result.alpha + 2 * se, color="0.85")
    a.plot([0, 1], [0, 1], color="0.4", lw=1, ls="--")
    a.plot(result.alpha, result.coverage, color="C1")
    a.set_xlabel("credibility level")
    a.set_ylabel("expected coverage")
    a.set_title(f"{result.kind} ({result.num_datasets} datasets)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_ppc_series(observed, predictive, times: Sequence[float] | None = None,
                    names: Sequence[str] | None = None, ax=None):
    """Observed series ``(C, T)`` over posterior predictive bands from ``(n, C, T)``: 5–95 %
    and 25–75 % bands and the median, one panel per channel (e.g. prey, predator)."""
    obs = np.asarray(observed, dtype=float)
    pred = np.asarray(predictive, dtype=float)
    if obs.ndim == 1:
        obs, pred = obs[None], pred[:, None]
    if pred.ndim != 3 or pred.shape[1:] != obs.shape:
        raise ValueError(f"predictive: expected shape (n, {', '.join(map(str, obs.shape))}), got {pred.shape}")
    t = np.arange(obs.shape[1]) if times is None else np.asarray(times)
    fig, axes = _axes(ax, obs.shape[0], 4.2, 2.8)
    for c in range(obs.shape[0]):
        a = axes[c]
        q = np.nanquantile(pred[:, c], [0.05, 0.25, 0.5, 0.75, 0.95], axis=0)
        a.fill_between(t, q[0], q[4], color="C0", alpha=0.2, label="5–95 %")
        a.fill_between(t, q[1], q[3], color="C0", alpha=0.35, label="25–75 %")
        a.plot(t, q[2], color="C0", lw=1, label="median")
        a.plot(t, obs[c], color="k", lw=1.2, label="observed")
        a.set_title(names[c] if names else f"channel {c}", fontsize=9)
        a.set_xlabel("time")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_training(summary, ax=None):
    """Training curves from a posterior's ``training_summary`` (or a training history list):
    every recorded loss and the validation criterion against the step."""
    stages = {"": summary} if isinstance(summary, list) else (
        {"": summary["history"]} if "history" in summary else
        {k: v["history"] for k, v in summary.items() if isinstance(v, dict) and "history" in v})
    stages = {k: v for k, v in stages.items() if v}
    if not stages:
        raise ValueError("summary: no training history (it is not saved with the posterior; plot right after fit)")
    fig, axes = _axes(ax, len(stages), 4.0, 2.8)
    for a, (stage, hist) in zip(axes, stages.items()):
        steps = [h["step"] for h in hist]
        for key in hist[0]:
            if key == "step":
                continue
            a.plot(steps, [h[key] for h in hist], label=key)
        a.set_xlabel("step")
        a.set_title(stage or "training", fontsize=9)
        a.legend(fontsize=7)
    fig.tight_layout()
    return fig


def flat_coordinates(values, names: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """``{site: (n, *shape)}`` → ``(n, d)`` and coordinate labels ``site`` / ``site[i]``."""
    names = list(names or values)
    cols, labels = [], []
    for name in names:
        v = np.asarray(values[name], dtype=float)
        v = v.reshape(v.shape[0], -1)
        cols.append(v)
        labels += [name] if v.shape[1] == 1 else [f"{name}[{i}]" for i in range(v.shape[1])]
    return np.concatenate(cols, 1), labels


def plot_pair(draws, truth=None, names: Sequence[str] | None = None, max_dims: int = 8, log: bool = False):
    """Corner plot of posterior draws ``{site: (n, *shape)}`` (first ``max_dims`` coordinates),
    histograms on the diagonal, the true values (``{site: shape}``) as red lines."""
    import matplotlib.pyplot as plt

    x, labels = flat_coordinates(draws, names)
    x, labels = x[:, :max_dims], labels[:max_dims]
    t = None
    if truth is not None:
        t, _ = flat_coordinates({k: np.asarray(truth[k], dtype=float)[None] for k in (names or draws)}, names)
        t = t[0, :max_dims]
    if log:
        x = np.log(x)
        t = None if t is None else np.log(t)
        labels = [f"log {lab}" for lab in labels]
    d = x.shape[1]
    fig, axes = plt.subplots(d, d, figsize=(1.9 * d + 1, 1.9 * d + 1), squeeze=False)
    for i in range(d):
        for j in range(d):
            a = axes[i, j]
            if j > i:
                a.axis("off")
                continue
            if i == j:
                a.hist(x[:, i], bins=40, color="C0", alpha=0.8)
                if t is not None:
                    a.axvline(t[i], color="C3")
                a.set_yticks([])
            else:
                a.plot(x[:, j], x[:, i], ".", ms=1, alpha=0.3, color="C0")
                if t is not None:
                    a.plot(t[j], t[i], "+", color="C3", ms=10, mew=2)
            if i == d - 1:
                a.set_xlabel(labels[j], fontsize=8)
            if j == 0 and i > 0:
                a.set_ylabel(labels[i], fontsize=8)
            a.tick_params(labelsize=6)
    fig.tight_layout()
    return fig
