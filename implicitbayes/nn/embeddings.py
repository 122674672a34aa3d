"""Summary networks e(y): standardisation, residual MLP, causal dilated convolutions, GRU, DeepSets.

Every embedding is an ``nn.Module`` with ``forward(y) -> (n, out_features)`` and an
``out_features`` attribute; an embedding can be shared by a generator and a critic (pass the
same module) or kept separate.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..checks import flag_or_auto

__all__ = ["Standardize", "ContextNet", "LinearResidual", "ResidualMLP", "CausalConvEmbedding", "GRUEmbedding", "DeepSets", "Flatten"]


def row_blocks(x: torch.Tensor, max_elements: int = 2**24):
    """``x`` split along its first dimension into blocks of at most ``max_elements`` numbers
    (at least one row each): full passes over a memory-mapped set in bounded memory."""
    per_row = max(1, math.prod(x.shape[1:]))
    return x.split(max(1, max_elements // per_row))


class Standardize(nn.Module):
    """z-scoring fitted from data, saved with the model (buffers).

    ``log="auto"`` (default) standardises in log space every feature that is strictly positive
    in the fitting data: positive, heavy-tailed outputs (populations, concentrations) are
    near-Gaussian on the log scale, where a network learns far better. ``robust="auto"``
    (default) then detects features whose sd exceeds 3× their robust spread (IQR / 1.349; for a
    feature with a mass point at its median, that of the other values) — a mass point with far
    outliers, e.g. a simulator summary that is constant for most parameters and explodes for a
    few — and maps them by asinh((y − median) / spread) before z-scoring, so that the bulk is
    not squeezed to a point by the outliers. Every step is invertible (:meth:`inverse`).
    Constant features get scale 1. ``forward`` works on ``(n, *shape)`` and keeps the shape.
    """

    def __init__(self, shape: Sequence[int], log: bool | str = "auto", robust: bool | str = "auto"):
        super().__init__()
        flag_or_auto("log", log)
        flag_or_auto("robust", robust)
        self.shape = tuple(shape)
        self.log_mode, self.robust_mode = log, robust
        self.register_buffer("loc", torch.zeros(self.shape))
        self.register_buffer("scale", torch.ones(self.shape))
        self.register_buffer("use_log", torch.zeros(self.shape, dtype=torch.bool))
        self.register_buffer("use_asinh", torch.zeros(self.shape, dtype=torch.bool))
        self.register_buffer("center", torch.zeros(self.shape))
        self.register_buffer("spread", torch.ones(self.shape))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # files written before the robust step have no asinh buffers: they used none
        for name, default in (("use_asinh", torch.zeros(self.shape, dtype=torch.bool)),
                              ("center", torch.zeros(self.shape)), ("spread", torch.ones(self.shape))):
            state_dict.setdefault(prefix + name, default)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    FIT_ROWS = 100_000  # rows the location and scale are estimated from (all rows when fewer)
    FIT_ELEMENTS = 2**23  # ... and at most this many numbers (wide observations)

    @torch.no_grad()
    def fit(self, data: torch.Tensor) -> "Standardize":
        """Fit on ``data (n, *shape)`` (any device; memory-mapped is fine); raises on non-finite
        values or a wrong shape. Positivity and finiteness are checked on every row; location
        and scale come from at most ``FIT_ROWS`` evenly spread rows."""
        data = torch.as_tensor(data)
        if tuple(data.shape[1:]) != self.shape or data.shape[0] < 2:
            raise ValueError(f"Standardize.fit: expected data of shape (n >= 2, {self.shape}), got {tuple(data.shape)}")
        # finiteness and positivity are properties of every row (a later observation is checked
        # against them): read in blocks, so a memory-mapped set is never loaded whole
        finite, positive = True, torch.ones(self.shape, dtype=torch.bool, device=self.loc.device)
        for block in row_blocks(data):
            block = block.to(device=self.loc.device, dtype=self.loc.dtype)
            finite = finite and bool(torch.isfinite(block).all())
            positive &= (block > 0).all(0)
        if not finite:
            raise ValueError("Standardize.fit: data contains NaN or inf")
        rows = min(self.FIT_ROWS, max(1_000, self.FIT_ELEMENTS // max(1, math.prod(self.shape))))
        if data.shape[0] > rows:  # location and scale from evenly spread rows
            data = data[:: -(-data.shape[0] // rows)]
        data = data.to(device=self.loc.device, dtype=self.loc.dtype)
        if self.log_mode == "auto":
            use_log = positive
        else:
            use_log = torch.full(self.shape, bool(self.log_mode), device=data.device)
            if self.log_mode and not positive.all():
                raise ValueError("Standardize.fit: log=True needs strictly positive data")
        z = torch.where(use_log, data.clamp_min(1e-30).log(), data)
        flat = z.reshape(z.shape[0], -1)
        q = torch.quantile(flat[:100_000], torch.tensor([0.25, 0.5, 0.75], dtype=flat.dtype, device=flat.device), dim=0)
        spread = (q[2] - q[0]) / 1.349
        for j in (spread == 0).nonzero().flatten().tolist():  # a mass point: the spread of the rest
            rest = flat[:100_000, j][flat[:100_000, j] != q[1, j]]
            if len(rest) >= 2:
                rq = torch.quantile(rest, torch.tensor([0.25, 0.75], dtype=flat.dtype, device=flat.device))
                spread[j] = (rq[1] - rq[0]) / 1.349 if rq[1] > rq[0] else (rest - q[1, j]).abs().median()
        spread = spread.reshape(self.shape)
        center = q[1].reshape(self.shape)
        if self.robust_mode == "auto":
            use_asinh = (spread > 0) & (z.std(0) > 3 * spread)
        else:
            use_asinh = torch.full(self.shape, bool(self.robust_mode), device=data.device) & (spread > 0)
        spread = torch.where(spread > 0, spread, torch.ones_like(spread))
        z = torch.where(use_asinh, torch.asinh((z - center) / spread), z)
        sd = z.std(0)
        self.loc.copy_(z.mean(0))
        self.scale.copy_(torch.where(sd > 0, sd, torch.ones_like(sd)))
        self.use_log.copy_(use_log)
        self.use_asinh.copy_(use_asinh)
        self.center.copy_(center)
        self.spread.copy_(spread)
        self.fitted.fill_(True)
        return self

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        z = torch.where(self.use_log, y.clamp_min(1e-30).log(), y)
        z = torch.where(self.use_asinh, torch.asinh((z - self.center) / self.spread), z)
        return (z - self.loc) / self.scale

    def log_abs_det_jacobian(self, y: torch.Tensor) -> torch.Tensor:
        """log |d forward(y) / dy| element by element, ``(n, *shape)``: a density of the
        standardised values becomes one of ``y`` by adding its sum over the features."""
        z = torch.where(self.use_log, y.clamp_min(1e-30).log(), y)
        log_d = -torch.where(self.use_log, z, torch.zeros_like(z)) - self.scale.log()
        a = (z - self.center) / self.spread
        return log_d + torch.where(self.use_asinh, -self.spread.log() - 0.5 * torch.log1p(a * a), torch.zeros_like(a))

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`forward`."""
        y = z * self.scale + self.loc
        y = torch.where(self.use_asinh, torch.sinh(y) * self.spread + self.center, y)
        return torch.where(self.use_log, y.exp(), y)


class LinearResidual(nn.Module):
    """θ standardised given y: u ↦ (u − A s − b) / σ, with s the standardised observation
    (flattened), A, b the least-squares regression of u on s and σ the residuals' sd per
    coordinate — fitted from data and saved as buffers, like :class:`Standardize`.

    z-scoring θ by its prior spread leaves a conditional density estimator to learn both where
    the posterior sits, which moves with y, and its shape; the linear part of where it sits is a
    least-squares problem with a closed-form answer. Removing it first leaves the network the
    residual, whose location is zero wherever E[θ | y] is linear in s (NPE on gaussian_linear,
    ``benchmarks/results/npe_ablation.md``: posterior means from 0.4–0.57 sd off the exact ones
    to 0.14–0.18). ``transform(s)`` is the map back, r ↦ A s + b + σ r, as a
    ``torch.distributions.AffineTransform`` on the last dimension.
    """

    FIT_ROWS = 100_000  # rows the regression is fitted on (evenly spread; all when fewer)
    RIDGE = 1e-6  # added to the diagonal of the features' second-moment matrix (unit-variance features)
    SCALE_FLOOR = 1e-3  # residual sd floor, in the units of u (a coordinate that y determines linearly)

    def __init__(self, in_features: int, features: int):
        super().__init__()
        self.in_features, self.features = int(in_features), int(features)
        self.register_buffer("weight", torch.zeros(self.in_features, self.features))
        self.register_buffer("bias", torch.zeros(self.features))
        self.register_buffer("scale", torch.ones(self.features))

    @torch.no_grad()
    def fit(self, s: torch.Tensor, u: torch.Tensor) -> "LinearResidual":
        """Fit on ``s (n, in_features)`` and ``u (n, features)``, every row given (the caller picks
        at most ``FIT_ROWS`` of a large set); the normal equations are accumulated in float64 over
        blocks of rows."""
        if s.dim() != 2 or u.dim() != 2 or s.shape[0] != u.shape[0] or s.shape[1] != self.in_features \
                or u.shape[1] != self.features or s.shape[0] < 2:
            raise ValueError(f"LinearResidual.fit: expected s (n >= 2, {self.in_features}) and u (n, {self.features}), "
                             f"got {tuple(s.shape)} and {tuple(u.shape)}")
        if not (torch.isfinite(s).all() and torch.isfinite(u).all()):
            raise ValueError("LinearResidual.fit: data contains NaN or inf")
        k = self.in_features + 1
        gram = torch.zeros(k, k, dtype=torch.float64, device=s.device)
        cross = torch.zeros(k, self.features, dtype=torch.float64, device=s.device)
        for i in torch.arange(len(s), device=s.device).split(max(1, 2**22 // k)):
            f = torch.cat([s[i].double(), torch.ones(len(i), 1, dtype=torch.float64, device=s.device)], 1)
            gram += f.T @ f
            cross += f.T @ u[i].double()
        gram.diagonal()[:-1] += self.RIDGE * len(s)
        solution = torch.linalg.solve(gram, cross).to(self.weight.dtype)
        self.weight.copy_(solution[:-1])
        self.bias.copy_(solution[-1])
        self.scale.copy_((u - self.loc(s)).std(0).clamp_min(self.SCALE_FLOOR))
        return self

    MAX_SKEW = 0.5  # looks Gaussian: every coordinate's residual |skewness| at most this ...
    MAX_EXCESS_KURTOSIS = 1.0  # ... and |excess kurtosis| at most this

    @torch.no_grad()
    def fit_checked(self, s: torch.Tensor, u: torch.Tensor) -> dict:
        """Fit on at most ``FIT_ROWS`` evenly spread rows of ``s`` and ``u`` and report whether the
        residuals look Gaussian (|skewness| ≤ ``MAX_SKEW`` and |excess kurtosis| ≤
        ``MAX_EXCESS_KURTOSIS`` on every coordinate, as a homoscedastic linear-Gaussian relation
        makes them): ``{"gaussian", "skewness", "excess_kurtosis"}``."""
        rows = torch.arange(0, len(s), -(-len(s) // self.FIT_ROWS))
        s, u = s[rows.to(s.device)], u[rows.to(u.device)]
        self.fit(s, u)
        skew, kurt = self.shape_moments(s, u)
        gaussian = bool((skew.abs() <= self.MAX_SKEW).all() and (kurt.abs() <= self.MAX_EXCESS_KURTOSIS).all())
        return {"gaussian": gaussian, "skewness": [round(float(v), 4) for v in skew],
                "excess_kurtosis": [round(float(v), 4) for v in kurt]}

    def forward(self, s: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The standardised residual (u − A s − b) / σ."""
        return (u - self.loc(s)) / self.scale

    @torch.no_grad()
    def shape_moments(self, s: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residuals' skewness and excess kurtosis per coordinate on ``s``, ``u`` (both 0 for
        a Gaussian), each ``(features,)``, computed in float64. A coordinate whose residuals are
        all equal (y determines it exactly; its σ is floored) gets 0 for both, not 0/0."""
        r = self(s, u).double()
        c = r - r.mean(0)
        sd = c.pow(2).mean(0).sqrt()
        z = torch.where(sd > 0, c / torch.where(sd > 0, sd, 1.0), 0.0)
        return z.pow(3).mean(0), torch.where(sd > 0, z.pow(4).mean(0) - 3.0, 0.0)

    def loc(self, s: torch.Tensor) -> torch.Tensor:
        """A s + b: the linear regression's prediction of u, ``(n, features)``."""
        return s @ self.weight + self.bias

    def transform(self, s: torch.Tensor) -> torch.distributions.AffineTransform:
        """The map from the standardised residual back to u at observations ``s (n, in_features)``."""
        return torch.distributions.AffineTransform(self.loc(s), self.scale, event_dim=1)


class Flatten(nn.Module):
    """``(n, *shape)`` → ``(n, prod(shape))``: the identity embedding for vector data."""

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(shape)
        self.out_features = math.prod(self.shape)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(y.shape[0], self.out_features)


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, activation: type[nn.Module], dropout: float):
        super().__init__()
        self.net = nn.Sequential(activation(), nn.Linear(width, width), activation(), nn.Dropout(dropout),
                                 nn.Linear(width, width))
        nn.init.zeros_(self.net[-1].weight)  # each block starts as the identity
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, h):
        return h + self.net(h)


class ResidualMLP(nn.Module):
    """``(n, in_features)`` → ``(n, out_features)`` through ``blocks`` pre-activation residual blocks."""

    def __init__(self, in_features: int, out_features: int, hidden: int = 128, blocks: int = 2,
                 activation: type[nn.Module] = nn.SiLU, dropout: float = 0.0):
        super().__init__()
        self.out_features = out_features
        self.net = nn.Sequential(nn.Linear(in_features, hidden),
                                 *[_ResidualBlock(hidden, activation, dropout) for _ in range(blocks)],
                                 activation(), nn.Linear(hidden, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CausalConvEmbedding(nn.Module):
    """WaveNet-style stack for multichannel time series ``(n, channels, time)`` → ``(n, out)``.

    Dilated causal 1-D convolutions (dilations 1, 2, 4, …) with gated activations
    tanh(a)·σ(b), residual and skip connections; the skips are pooled over time (mean and
    last step) and mapped to ``out_features``. The receptive field is
    ``1 + (kernel_size − 1)·(2^layers − 1)`` steps.
    """

    def __init__(self, channels: int, out_features: int, hidden: int = 32, layers: int = 6, kernel_size: int = 2):
        super().__init__()
        self.out_features = out_features
        self.kernel_size = kernel_size
        self.inp = nn.Conv1d(channels, hidden, 1)
        self.dilations = [2**i for i in range(layers)]
        self.filters = nn.ModuleList(nn.Conv1d(hidden, 2 * hidden, kernel_size, dilation=d) for d in self.dilations)
        self.residuals = nn.ModuleList(nn.Conv1d(hidden, hidden, 1) for _ in self.dilations)
        self.skips = nn.ModuleList(nn.Conv1d(hidden, hidden, 1) for _ in self.dilations)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, out_features))

    def sequence_features(self, y: torch.Tensor) -> torch.Tensor:
        """Summed skip connections per time step, ``(n, hidden, time)``; step t sees y[..., :t+1] only."""
        if y.dim() != 3:
            raise ValueError(f"CausalConvEmbedding: expected (n, channels, time), got {tuple(y.shape)}")
        h = self.inp(y)
        skip = 0
        for d, conv, res, sk in zip(self.dilations, self.filters, self.residuals, self.skips):
            a, b = conv(nn.functional.pad(h, ((self.kernel_size - 1) * d, 0))).chunk(2, dim=1)
            g = torch.tanh(a) * torch.sigmoid(b)
            h = h + res(g)
            skip = skip + sk(g)
        return skip

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        skip = self.sequence_features(y)
        return self.out(torch.cat([skip.mean(-1), skip[..., -1]], dim=1))


class GRUEmbedding(nn.Module):
    """GRU over a multichannel time series ``(n, channels, time)``; the last hidden state → ``(n, out)``."""

    def __init__(self, channels: int, out_features: int, hidden: int = 64, layers: int = 1):
        super().__init__()
        self.out_features = out_features
        self.gru = nn.GRU(channels, hidden, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden, out_features)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if y.dim() != 3:
            raise ValueError(f"GRUEmbedding: expected (n, channels, time), got {tuple(y.shape)}")
        _, h = self.gru(y.transpose(1, 2))
        return self.out(h[-1])


class DeepSets(nn.Module):
    """Permutation-invariant embedding of exchangeable sets ``(n, set_size, features)`` → ``(n, out)``.

    ρ(pool_i φ(x_i)) with ``pool`` the mean (default), sum, or mean and max concatenated
    (Zaheer et al. 2017). The mean keeps the output scale independent of the set size.
    """

    def __init__(self, features: int, out_features: int, hidden: int = 64, pool: str = "mean"):
        super().__init__()
        if pool not in ("mean", "sum", "mean+max"):
            raise ValueError(f"pool: expected 'mean', 'sum' or 'mean+max', got {pool!r}")
        self.out_features, self.pool = out_features, pool
        self.phi = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        width = 2 * hidden if pool == "mean+max" else hidden
        self.rho = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, out_features))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if y.dim() != 3:
            raise ValueError(f"DeepSets: expected (n, set_size, features), got {tuple(y.shape)}")
        h = self.phi(y)
        if self.pool == "mean":
            pooled = h.mean(1)
        elif self.pool == "sum":
            pooled = h.sum(1)
        else:
            pooled = torch.cat([h.mean(1), h.max(1).values], dim=1)
        return self.rho(pooled)


class ContextNet(nn.Module):
    """e(y): standardise the observation (log space for positive features), then embed it.

    ``embedding`` is any module mapping ``(n, *x_shape)`` to ``(n, k)`` with an
    ``out_features`` attribute; the default flattens. A custom embedding is saved with the
    posterior's weights but must be passed again to ``ib.load``.
    """

    def __init__(self, x_shape: Sequence[int], embedding: nn.Module | None = None):
        super().__init__()
        self.standardize = Standardize(tuple(x_shape))
        self.embedding = embedding if embedding is not None else Flatten(tuple(x_shape))
        if not hasattr(self.embedding, "out_features"):
            raise TypeError("embedding: the module needs an out_features attribute (its output width)")
        self.out_features = int(self.embedding.out_features)

    def fit(self, x: torch.Tensor) -> "ContextNet":
        self.standardize.fit(x)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.standardize(x))
