r"""Conditional normalizing flows q(θ | c), built on zuko, plus the layers zuko lacks.

zuko supplies MAF, NSF (neural spline flow), NICE and RealNVP. Added here as zuko-compatible
lazy transforms (``zuko.lazy.LazyTransform``, whose ``forward(c)`` returns a
``torch.distributions.Transform`` from data to noise):

* :class:`ActNorm` — per-feature affine z = (x − b)·e^{−s} with data-dependent initialisation
  (b, s from the first training batch: zero mean, unit variance at that layer; Kingma &
  Dhariwal 2018).
* :class:`LULinear` — invertible 1×1 convolution / linear layer W = P·L·(U + diag(σ·e^{ŝ})) with a
  fixed permutation P, unit-lower L, strictly upper U and a sign σ fixed at initialisation, so
  the determinant never crosses zero; log|det W| = Σ ŝ (Glow).
* IAF orientation — MADE layers inverted (``zuko.lazy.LazyInverse``): sampling is one network
  pass, density evaluation needs D passes (Kingma et al. 2016), the mirror image of MAF.

:func:`build_flow` assembles any of ``FLOWS``; :class:`FlowDistribution` makes the distribution
of a flow at a context a Pyro distribution (``sample``, ``rsample``, ``log_prob``, ``support``).
:func:`short_softmax` speeds up drawing from spline flows on CPU; :func:`flow_log_prob` is the
density a training step evaluates, in a form ``torch.compile`` traces as one graph.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import pyro.distributions as dist
import torch
import torch.nn.functional as F
import zuko
from torch import nn
from torch.distributions import Transform, constraints
from torch.overrides import TorchFunctionMode
from zuko.distributions import DiagNormal
from torch.distributions.utils import _sum_rightmost
from zuko.lazy import Flow, LazyComposedTransform, LazyInverse, LazyTransform, UnconditionalDistribution
from zuko.nn import MaskedLinear
from zuko.transforms import AutoregressiveTransform, ComposedTransform, LULinearTransform, PermutationTransform
from zuko.utils import broadcast, unpack

from ..checks import flag, number

__all__ = ["FLOWS", "build_flow", "ActNorm", "LULinear", "FlowDistribution", "short_softmax", "draw", "flow_log_prob",
           "inverted_layers"]

FLOWS = ("maf", "iaf", "nsf", "nice", "realnvp", "glow")


class short_softmax(TorchFunctionMode):
    """Within ``with short_softmax():``, ``F.softmax`` over a short last dimension of a CPU tensor
    (at most ``MAX_WIDTH`` entries) is computed as exp(a − max a) / Σ exp(a − max a); every other
    call runs as usual.

    PyTorch's CPU softmax kernel vectorises along the last dimension, so rows as short as a
    spline's bins (8) leave it mostly idle: on (10 000, 10, 8) logits it took 14.4 ms against
    2.7 ms for the composite (torch 2.13, one thread). zuko's spline layers take a softmax of
    their bin widths and heights at every conditioner pass, and an autoregressive flow makes
    dim θ passes per layer to draw, so sampling spends about half its time there (10 000 NPE
    draws on bernoulli_glm, 10-D: 2.37 s → 1.25 s; ``benchmarks/results/sampling_time.md``).
    The values agree with ``F.softmax``'s to rounding (≤ 2·10⁻⁷), not bit for bit, so training
    keeps ``F.softmax`` and only drawing uses this.
    """

    MAX_WIDTH = 64

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.softmax and args:
            a = args[0]
            dim = kwargs["dim"] if "dim" in kwargs else (args[1] if len(args) > 1 else None)
            if (isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.dim() > 0 and a.is_floating_point()
                    and 0 < a.shape[-1] <= self.MAX_WIDTH and dim in (-1, a.dim() - 1)
                    and kwargs.get("dtype") is None and len(args) <= 2):
                e = torch.exp(a - a.amax(-1, keepdim=True))
                return e / e.sum(-1, keepdim=True)
        return func(*args, **kwargs)


def flow_log_prob(flow: nn.Module, value: torch.Tensor, context: torch.Tensor,
                  outer: Sequence[Transform] = ()) -> torch.Tensor:
    """``TransformedDistribution(flow(context), outer).log_prob(value)`` (``flow(context)`` alone
    without ``outer``): the same operations in the same order, so the same numbers to the bit,
    without building zuko's composed transform — whose construction ``torch.compile`` cannot trace,
    so that a compiled training step would break into a graph per layer. A flow that is not a zuko
    ``Flow`` of lazy transforms is evaluated as ``flow(context)``."""
    if outer:  # as TransformedDistribution.log_prob: back through the outer transforms, then the flow
        if any(t.domain.event_dim != 1 or t.codomain.event_dim != 1 for t in outer):
            return torch.distributions.TransformedDistribution(flow(context), list(outer)).log_prob(value)
        y, log_prob = value, 0.0
        for t in reversed(outer):
            x = t.inv(y)
            log_prob = log_prob - t.log_abs_det_jacobian(x, y)
            y = x
        return log_prob + flow_log_prob(flow, y, context)
    lazy = getattr(flow, "transform", None)
    if not isinstance(flow, Flow) or not isinstance(lazy, LazyComposedTransform):
        return flow(context).log_prob(value)
    transforms = [t(context) for t in lazy.transforms]
    event_dim = 0  # as ComposedTransform: its domain's and codomain's event dimensions
    for t in reversed(transforms):
        event_dim = t.domain.event_dim + max(event_dim - t.codomain.event_dim, 0)
    codomain_dim = event_dim + sum(t.codomain.event_dim - t.domain.event_dim for t in transforms)
    z, acc = value, 0
    for t in transforms:  # as ComposedTransform.call_and_ladj
        z, ladj = t.call_and_ladj(z)
        acc = acc + _sum_rightmost(ladj, event_dim - t.domain.event_dim)
        event_dim += t.codomain.event_dim - t.domain.event_dim
    base = flow.base(context)  # as Flow.forward and NormalizingFlow
    if context is not None:
        base = base.expand(context.shape[:-1])
    reinterpreted = codomain_dim - len(base.event_shape)
    if reinterpreted > 0:
        base = torch.distributions.Independent(base, reinterpreted)
    return base.log_prob(z) + _sum_rightmost(acc, max(-reinterpreted, 0))


def draw(q: torch.distributions.Distribution, sample_shape=torch.Size()) -> torch.Tensor:
    """``q.sample(sample_shape)`` for a zuko flow (or a ``TransformedDistribution`` over one),
    the same draws to rounding, with masked autoregressive layers inverted by
    :func:`_invert_masked`: D passes as zuko makes, each computing only the coordinates it
    determines."""
    with torch.no_grad():
        if isinstance(q, torch.distributions.TransformedDistribution):
            y = draw(q.base_dist, sample_shape)
            for t in q.transforms:
                y = t(y)
            return y
        if isinstance(q, zuko.distributions.NormalizingFlow):
            z = q.base.rsample(sample_shape) if q.base.has_rsample else q.base.sample(sample_shape)
            return _invert(q.transform, z)
        return q.sample(sample_shape)


def widened(q: torch.distributions.Distribution, scale: float) -> torch.distributions.Distribution | None:
    """``q`` — a zuko flow on a diagonal-normal base, or a ``TransformedDistribution`` over one —
    with its base's spread multiplied by ``scale`` (the same transforms): a flow of the same shape
    with wider tails, which :func:`draw` samples and ``log_prob`` evaluates. None for any other
    distribution."""
    if isinstance(q, torch.distributions.TransformedDistribution):
        inner = widened(q.base_dist, scale)
        return None if inner is None else torch.distributions.TransformedDistribution(inner, q.transforms)
    if isinstance(q, zuko.distributions.NormalizingFlow) and isinstance(q.base, DiagNormal):
        base = q.base.base_dist
        return zuko.distributions.NormalizingFlow(q.transform, DiagNormal(base.loc, base.scale * scale))
    return None


def _invert(t: Transform, y: torch.Tensor) -> torch.Tensor:
    if isinstance(t, ComposedTransform):
        for u in reversed(t.transforms):
            y = _invert(u, y)
        return y
    meta = getattr(t, "meta", None)
    layer = getattr(getattr(meta, "func", None), "__self__", None)
    if (isinstance(t, AutoregressiveTransform) and isinstance(meta, partial) and len(meta.args) == 1
            and isinstance(layer, zuko.flows.MaskedAutoregressiveTransform) and layer.order is not None
            and isinstance(layer.hyper[-1], MaskedLinear)):
        return _invert_masked(layer, meta.args[0], y)
    return t.inv(y)


def _invert_masked(layer, c: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """The inverse of a masked autoregressive layer given context ``c``.

    zuko inverts by ``passes`` fixed-point passes x ← f(· | x)⁻¹(y), each evaluating the whole
    conditioner and every coordinate's transform. Pass p only settles the coordinates of order
    p (their parameters depend on coordinates of lower order only, settled before), so here it
    computes the conditioner's output rows of those coordinates and inverts only them: the
    same values (to rounding) for a tenth of the output layer and of the spline work at D = 10.
    """
    *hidden, last = layer.hyper
    weight, bias = last.mask * last.weight, last.bias
    x = torch.zeros_like(y)
    for p in range(layer.passes):
        idx = (layer.order == p).nonzero().flatten().to(y.device)
        if idx.numel() == 0:
            continue
        inputs = x if c is None else torch.cat(broadcast(x, c, ignore=1), dim=-1)
        rows = (idx[:, None] * layer.total + torch.arange(layer.total, device=y.device)).flatten()
        for module in hidden:
            inputs = module(inputs)
        phi = F.linear(inputs, weight[rows], None if bias is None else bias[rows])
        phi = unpack(phi.unflatten(-1, (idx.numel(), layer.total)), layer.shapes)
        x = x.index_copy(-1, idx, layer.univariate(*phi).inv(y.index_select(-1, idx)))
    return x


class _ActNormTransform(Transform):
    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, module: "ActNorm"):
        super().__init__()
        self.module = module

    def _call(self, x):
        m = self.module
        if not bool(m.initialized) and m.training:
            m.initialize(x)
        return (x - m.loc) * torch.exp(-m.log_scale)

    def _inverse(self, z):
        return z * torch.exp(self.module.log_scale) + self.module.loc

    def log_abs_det_jacobian(self, x, z):
        return (-self.module.log_scale).sum().expand(x.shape[:-1])


class ActNorm(LazyTransform):
    """Per-feature affine layer with data-dependent initialisation (identity until it sees data)."""

    def __init__(self, features: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(features))
        self.log_scale = nn.Parameter(torch.zeros(features))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] < 2:
            return
        self.loc.copy_(flat.mean(0))
        self.log_scale.copy_(flat.std(0).clamp_min(1e-6).log())
        self.initialized.fill_(True)

    def forward(self, c: torch.Tensor | None = None) -> Transform:
        return _ActNormTransform(self)


class LULinear(LazyTransform):
    """Invertible linear layer x ↦ L U (P x), initialised so that the whole map is a rotation.

    L is lower triangular with diagonal σ·e^ŝ (σ fixed signs), U unit upper triangular, P a
    fixed permutation: log|det| = Σ ŝ, and the determinant never crosses zero in training.
    """

    def __init__(self, features: int, generator: torch.Generator | None = None):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(features, features, generator=generator, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)  # q = p·lower·upper, lower unit-triangular
        d = upper.diagonal()
        self.register_buffer("order", p.argmax(1))
        self.register_buffer("sign", torch.sign(d).float())
        self.lower = nn.Parameter(torch.tril(lower * d[None, :], -1).float())
        self.log_diag = nn.Parameter(d.abs().log().float())
        self.upper = nn.Parameter(torch.triu(upper / d[:, None], 1).float())

    def forward(self, c: torch.Tensor | None = None) -> Transform:
        packed = (torch.tril(self.lower, -1) + torch.diag(self.sign * self.log_diag.exp())
                  + torch.triu(self.upper, 1))
        return ComposedTransform(PermutationTransform(self.order), LULinearTransform(packed))


def _standard_normal(features: int) -> UnconditionalDistribution:
    return UnconditionalDistribution(DiagNormal, torch.zeros(features), torch.ones(features), buffer=True)


def build_flow(kind: str, features: int, context: int = 0, transforms: int | None = None,
               hidden_features: Sequence[int] = (128, 128), *, affine_first: bool = False,
               spline_init: float | None = None, **kwargs) -> Flow:
    """A conditional flow q(θ | c) of ``kind`` in ``FLOWS``; ``flow(c)`` is a torch distribution.

    ``transforms`` defaults to 5 (NSF, MAF, IAF, Glow) or 6 (NICE, RealNVP couplings, which
    each update half of the features). ``hidden_features`` and ``kwargs`` go to the
    conditioner networks (zuko's MLP). ``affine_first`` puts a conditional affine
    autoregressive layer (MAF's) on the data side, before the ``transforms``: it moves and
    scales θ given c — the posterior's location and spread, sequentially in θ — so that the
    layers after it (splines, bounded to [−5, 5] for NSF) shape an already centred residual.
    ``spline_init`` (NSF only) draws the output layer of each spline conditioner, weights and
    biases, from U(−a, a) with a = ``spline_init`` instead of PyTorch's default (±1/√h, h its
    last hidden width): every spline then starts as the identity up to O(a) whatever the
    context, and learns its shape from there at the full rate.
    """
    if kind not in FLOWS:
        raise ValueError(f"kind: expected one of {FLOWS}, got {kind!r}")
    if features < 1:
        raise ValueError(f"features: expected >= 1, got {features}")
    flag("affine_first", affine_first)
    hidden_features = tuple(hidden_features)
    if number("spline_init", spline_init, none=True) is not None and kind != "nsf":
        raise ValueError(f"spline_init: only the spline flow 'nsf' has spline conditioners, got kind={kind!r}")
    flow = _build_flow(kind, features, context, transforms, hidden_features, **kwargs)
    splines = list(flow.transform.transforms)
    if affine_first:
        first = zuko.flows.MaskedAutoregressiveTransform(features, context, hidden_features=hidden_features)
        flow = Flow([first, *splines], flow.base)
    if spline_init is not None:
        with torch.no_grad():
            for layer in splines:
                nn.init.uniform_(layer.hyper[-1].weight, -spline_init, spline_init)
                nn.init.uniform_(layer.hyper[-1].bias, -spline_init, spline_init)
    return flow


def inverted_layers(flow: Flow) -> Flow:
    """``flow`` with every layer inverted (``zuko.lazy.LazyInverse``), in the same order from the
    data side: the same family of distributions, with the costs swapped. For autoregressive
    layers (MAF, NSF) a draw becomes one pass of each network and a density D passes — the IAF
    orientation, for a flow that is sampled with gradients far more often than it is evaluated."""
    if not isinstance(flow, Flow):
        raise TypeError(f"flow: expected a zuko Flow (e.g. from build_flow), got {type(flow).__name__}")
    return Flow([LazyInverse(t) for t in flow.transform.transforms], flow.base)


def _build_flow(kind: str, features: int, context: int, transforms: int | None,
                hidden_features: tuple[int, ...], **kwargs) -> Flow:
    if kind == "maf":
        return zuko.flows.MAF(features, context, transforms=transforms or 5, hidden_features=hidden_features, **kwargs)
    if kind == "nsf":
        return zuko.flows.NSF(features, context, transforms=transforms or 5, hidden_features=hidden_features, **kwargs)
    if kind == "realnvp":
        return zuko.flows.RealNVP(features, context, transforms=transforms or 6, hidden_features=hidden_features, **kwargs)
    if kind == "nice":
        # additive couplings preserve volume; NICE's final diagonal rescaling (Dinh et al. 2014, 3.3)
        flow = zuko.flows.NICE(features, context, transforms=transforms or 6, hidden_features=hidden_features, **kwargs)
        return Flow([*flow.transform.transforms, ActNorm(features)], flow.base)
    if kind == "iaf":
        steps = transforms or 5
        layers = [zuko.flows.MaskedAutoregressiveTransform(
            features, context, order=torch.arange(features) if i % 2 == 0 else torch.arange(features).flip(0),
            hidden_features=hidden_features, **kwargs) for i in range(steps)]
        return inverted_layers(Flow(layers, _standard_normal(features)))
    # glow: (actnorm, invertible linear, affine coupling) × steps
    steps = transforms or 5
    layers = []
    for i in range(steps):
        layers.append(ActNorm(features))
        if features > 1:
            layers.append(LULinear(features))
        mask = (torch.arange(features) + i) % 2 == 1
        layers.append(zuko.flows.GeneralCouplingTransform(features, context, mask=mask if features > 1 else None,
                                                          hidden_features=hidden_features, **kwargs))
    return Flow(layers, _standard_normal(features))


class FlowDistribution(dist.TorchDistribution):
    """A Pyro distribution view of ``flow(c)`` (any torch distribution with ``rsample``).

    ``support`` defaults to the real vectors; wrap in ``dist.TransformedDistribution`` with a
    ParameterSpace's bijections for a constrained one.
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, base: torch.distributions.Distribution, support=constraints.real_vector,
                 validate_args: bool | None = None):
        self.base = base
        self._support = support
        super().__init__(base.batch_shape, base.event_shape, validate_args=validate_args)

    @property
    def support(self):
        return self._support

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return self.base.rsample(sample_shape)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.base.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.base.log_prob(value)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        return dist.ExpandedDistribution(self, batch_shape)
