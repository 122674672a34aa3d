"""Two-sample metrics: C2ST in sbibm's protocol, and MMD.

``c2st`` follows sbibm 1.1.0 (``sbibm.metrics.c2st``) exactly in design: z-score both samples by
the first one's mean and sd, an MLP classifier with two ReLU layers of 10·d units trained by
Adam (lr 1e-3, minibatches of 200, L2 penalty 1e-4, stopping when the epoch's training loss has
not improved by 1e-4 for 10 epochs, at most 10 000 epochs — scikit-learn's MLPClassifier
defaults), 5-fold shuffled cross-validation, mean held-out accuracy. The five folds train as one
batched network in torch, which is several times faster than scikit-learn on a few cores;
``tests/test_diagnostics.py`` checks agreement with sbibm's own implementation.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..checks import integer
from ..losses import median_bandwidth, mmd2

__all__ = ["c2st", "mmd"]


def _as_2d(a, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).detach().to("cpu", torch.float32)
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2 or t.shape[0] < 10:
        raise ValueError(f"{name}: expected samples of shape (n >= 10, d), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return t


def c2st(a, b, *, seed: int = 1, n_folds: int = 5, z_score: bool = True, max_epochs: int = 10_000) -> float:
    """Classifier two-sample test accuracy between samples ``a (n, d)`` and ``b (m, d)``:
    0.5 when a classifier cannot tell them apart, 1.0 when it always can."""
    x, y = _as_2d(a, "a"), _as_2d(b, "b")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"a, b: different dimensions {x.shape[1]} and {y.shape[1]}")
    integer("n_folds", n_folds, minimum=2)
    if z_score:
        loc, scale = x.mean(0), x.std(0)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        x, y = (x - loc) / scale, (y - loc) / scale
    data = torch.cat([x, y])
    target = torch.cat([torch.zeros(len(x)), torch.ones(len(y))])
    n, d = data.shape
    g = torch.Generator().manual_seed(seed)
    folds = torch.randperm(n, generator=g).chunk(n_folds)
    k, h = n_folds, 10 * d
    train_idx = [torch.cat([f for j, f in enumerate(folds) if j != i]) for i in range(k)]
    n_train = min(len(t) for t in train_idx)
    train_idx = torch.stack([t[:n_train] for t in train_idx])  # (k, n_train); equal sizes to batch the folds

    def init(fan_in, fan_out):  # Glorot-uniform for ReLU layers, as scikit-learn
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w = (torch.rand((k, fan_in, fan_out), generator=g) * 2 - 1) * bound
        return w.requires_grad_(), torch.zeros((k, 1, fan_out), requires_grad=True)

    params = [*init(d, h), *init(h, h), *init(h, 1)]
    opt = torch.optim.Adam(params, lr=1e-3, eps=1e-8)

    def logits(inp, p):
        w1, b1, w2, b2, w3, b3 = p
        z = torch.relu(torch.baddbmm(b1, inp, w1))
        z = torch.relu(torch.baddbmm(b2, z, w2))
        return torch.baddbmm(b3, z, w3).squeeze(-1)

    batch = min(200, n_train)
    best = torch.full((k,), math.inf)
    stall = torch.zeros(k, dtype=torch.long)
    done = torch.zeros(k, dtype=torch.bool)
    frozen = [p.detach().clone() for p in params]
    for _ in range(max_epochs):
        perm = torch.stack([torch.randperm(n_train, generator=g) for _ in range(k)])
        total = torch.zeros(k)
        for start in range(0, n_train, batch):
            idx = torch.gather(train_idx, 1, perm[:, start:start + batch])
            out = logits(data[idx], params)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(out, target[idx], reduction="none").mean(1)
            l2 = sum((w**2).sum((1, 2)) for w in params[0::2]) * (0.5 * 1e-4 / idx.shape[1])
            opt.zero_grad(set_to_none=True)
            (loss + l2).sum().backward()
            opt.step()
            total += (loss + l2).detach() * idx.shape[1]
        epoch_loss = total / n_train
        improved = epoch_loss < best - 1e-4
        stall = torch.where(improved, torch.zeros_like(stall), stall + 1)
        best = torch.minimum(best, epoch_loss)
        newly = (stall > 10) & ~done
        for i in newly.nonzero().flatten().tolist():  # keep a stopped fold's weights
            for f, p in zip(frozen, params):
                f[i] = p.detach()[i]
        done |= newly
        if done.all():
            break
    else:
        for i in (~done).nonzero().flatten().tolist():
            for f, p in zip(frozen, params):
                f[i] = p.detach()[i]
    with torch.no_grad():
        accs = []
        for i, f in enumerate(folds):
            p = [q[i:i + 1] for q in frozen]
            pred = logits(data[f][None], p)[0] > 0
            accs.append(float((pred == target[f].bool()).float().mean()))
    return float(np.mean(accs))


def mmd(a, b, *, bandwidth: float | None = None, unbiased: bool = True) -> float:
    """Squared maximum mean discrepancy with a Gaussian kernel (median heuristic by default,
    on the pooled sample); unbiased, so near 0 (possibly slightly negative) for equal laws."""
    x, y = _as_2d(a, "a"), _as_2d(b, "b")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"a, b: different dimensions {x.shape[1]} and {y.shape[1]}")
    bw = torch.tensor([float(bandwidth)]) if bandwidth is not None else median_bandwidth(x[:2000], y[:2000])[None]
    return float(mmd2(x, y, bandwidths=bw, unbiased=unbiased))
