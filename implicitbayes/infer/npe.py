r"""Neural posterior estimation (Papamakarios & Murray 2016; Greenberg et al. 2019).

A conditional flow q_φ(u | e(y)) on the latents in unconstrained, standardised coordinates u,
trained by maximum likelihood on the simulations (θ_i, y_i) ~ p(θ) p(y | θ):

    max_φ  E_{p(θ, y)} [ log q_φ(u(θ) | e(y)) ],

which minimises E_y KL(p(θ | y) ‖ q_φ(θ | y)) — the sleep phase of wake–sleep: forward KL,
mass-covering. Mapping θ through ``biject_to`` of each prior's support makes every draw land
inside the support (no rejection step, no leakage), and log q(θ | y) = log q(u | y) − log|dθ/du|.

Optionally (``linear_residual``) u is first regressed on the standardised observation s by least
squares and the flow models the residual (u − A s − b)/σ: where E[θ | y] is linear in y the flow
then starts with the location right. ``"auto"`` keeps the regression only where its residuals
look Gaussian (|skewness| ≤ 0.5 and |excess kurtosis| ≤ 1 on every coordinate), as a
homoscedastic linear-Gaussian relation makes them; elsewhere their heavy tails would hurt the flow.

Defaults — a neural spline flow behind one conditional affine autoregressive layer, its spline
conditioners started at the identity, ``linear_residual="auto"``, the weights validated and kept
as their moving average (``TrainConfig.ema`` = 0.999: at batch 50 the last iterate's validation
loss jitters by ±0.05 nats from epoch to epoch, so its best epoch is a lucky one and a rising
trend hard to tell from the jitter), patience 50 epochs under a cosine learning-rate decay (10
where the validation loss climbs steadily: an overfitting flow, ``TrainConfig.rising_patience``)
— are the settings that won in ``benchmarks/results/npe_ablation.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..checks import choice, flag, flag_or_auto, integer, number
from ..nn import FLOWS, LinearResidual, build_flow, draw, flow_log_prob, short_softmax
from ..seeding import fresh_seed, resolve_seed, seeded
from ..space import ParameterSpace
from ..simulate import sharing_trial_runs
from .data import join_observed
from .method import NeuralMethod, network_builder
from .objectives import NPELoss
from .posterior import NeuralConfig, NeuralPosterior, build_network, neural_config_fields, register_posterior
from .training import TrainConfig, train

__all__ = ["NPE", "NPEPosterior", "NPEConfig", "linear_residual_wanted", "linear_residual_option"]


@dataclass
class NPEConfig(NeuralConfig):
    """The flow of an :class:`NPEPosterior` and whether it models θ's linear residual."""

    flow: str  # a name in implicitbayes.nn.FLOWS, or "custom" for a build callable
    transforms: int
    hidden_features: tuple[int, ...]
    affine_first: bool
    spline_init: float | None
    linear_residual: bool


@register_posterior
class NPEPosterior(NeuralPosterior):
    """A flow posterior: ``sample``, ``sample_batch``, ``log_prob``, ``as_guide``, ``save``."""

    method = "npe"
    Config = NPEConfig

    def __init__(self, space: ParameterSpace, observed, x_shapes, config: NPEConfig,
                 embedding: nn.Module | None = None, flow: Callable[[int, int], nn.Module] | None = None):
        super().__init__(space, observed, x_shapes, config, embedding)
        self.residual = (LinearResidual(math.prod(config.x_shape), space.unconstrained_dim)
                         if config.linear_residual else None)
        d, c = space.unconstrained_dim, self.context.out_features
        self.flow = build_network("flow", config.flow == "custom", flow, lambda: build_flow(
            config.flow, d, c, transforms=config.transforms, hidden_features=config.hidden_features,
            affine_first=config.affine_first, spline_init=config.spline_init), d, c)

    def distribution(self, x: torch.Tensor) -> torch.distributions.Distribution:
        """q(u_standardised | x) for ``x (n, *x_shape)``: the flow, mapped back from the linear
        regression's residual when there is one."""
        s = self.context.standardize(x)
        q = self.flow(self.context.embedding(s))
        if self.residual is None:
            return q
        return torch.distributions.TransformedDistribution(q, [self.residual.transform(s.flatten(1))])

    def standardized_log_prob(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log q(u | x) of standardised latents ``u (n, d)``: ``distribution(x).log_prob(u)``, to
        the bit, in a form a compiled training step traces as one graph (``flow_log_prob``)."""
        s = self.context.standardize(x)
        outer = () if self.residual is None else (self.residual.transform(s.flatten(1)),)
        return flow_log_prob(self.flow, u, self.context.embedding(s), outer)

    def regressors(self, x: torch.Tensor) -> torch.Tensor:
        """The linear residual's regressors: the standardised observation, flattened, ``(n, prod(x_shape))``."""
        return torch.cat([self.context.standardize(x[i]).flatten(1) for i in torch.arange(len(x)).split(4096)])

    @torch.no_grad()
    def fit_residual(self, x: torch.Tensor, u_s: torch.Tensor, auto: bool) -> dict | None:
        """Fit the linear residual, if there is one (``LinearResidual.fit_checked``). With
        ``auto`` it is kept only where its residuals look Gaussian, and dropped otherwise
        (``config.linear_residual`` becomes False). Returns the decision and the moments, or
        None without a residual."""
        if self.residual is None:
            return None
        rows = torch.arange(0, len(x), -(-len(x) // self.residual.FIT_ROWS))
        report = self.residual.fit_checked(self.regressors(x[rows.to(x.device)]), u_s[rows.to(u_s.device)])
        keep = report["gaussian"] or not auto
        if not keep:
            self.residual = None
            self.config = replace(self.config, linear_residual=False)
        return {"on": keep, **report}

    def _sample_unconstrained(self, x, num_samples, generator):
        with seeded(fresh_seed(generator), self.device), short_softmax():
            u_s = draw(self.distribution(x), (num_samples,))[:, 0]
        return self.theta_standardize.inverse(u_s)

    @torch.no_grad()
    def sample_batch(self, num_samples: int, observations: Any, *, seed: int | None = None) -> dict[str, torch.Tensor]:
        """Draws for B observations in one flow call: ``{site: (B, num_samples, *shape)}``."""
        integer("num_samples", num_samples)
        x = join_observed(self._observation_rows(observations), self.observed)
        bad = self.context.standardize.use_log & (x <= 0)
        if bad.any():
            raise ValueError(f"observations: rows {sorted(set(bad.reshape(len(x), -1).any(1).nonzero().flatten().tolist()))[:10]} "
                             "have entries ≤ 0 where every training simulation was strictly positive")
        with seeded(resolve_seed(seed), self.device), short_softmax():
            u_s = draw(self.distribution(x), (num_samples,))  # (n, B, d)
        b = x.shape[0]
        u = self.theta_standardize.inverse(u_s.transpose(0, 1).reshape(b * num_samples, -1))
        return {k: v.reshape((b, num_samples) + tuple(v.shape[1:])) for k, v in self.space.to_constrained(u).items()}

    @torch.no_grad()
    def log_prob(self, theta: Mapping[str, torch.Tensor], observed: Any = None) -> torch.Tensor:
        """log q(θ | observed) in the latents' own (constrained) coordinates: ``(n,)``."""
        x = self._observation(observed)
        u = self.space.to_unconstrained({k: torch.as_tensor(v, device=self.device) for k, v in theta.items()})
        u_s = self.theta_standardize(u)
        log_q = self.distribution(x).log_prob(u_s) - self.theta_standardize.scale.log().sum()
        return log_q - self.space.log_abs_det_jacobian(u)


LINEAR_MAX_FEATURES = 2048  # the regression's normal equations are (features + 1)² numbers
LINEAR_ROWS_PER_FEATURE = 10  # at least this many training rows per regression coefficient


def linear_residual_wanted(option: bool | str, rows: int, width: int, regressors: str) -> bool:
    """Whether to fit a linear residual (``option``: True, False or "auto") on ``rows`` training
    rows with ``width`` regressors (``regressors`` names them in errors): "auto" fits it where
    the regression is well determined (at most ``LINEAR_MAX_FEATURES`` regressors and
    ``LINEAR_ROWS_PER_FEATURE`` rows per coefficient; ``LinearResidual.fit_checked`` then keeps it
    where its residuals look Gaussian); True raises where it is not well determined."""
    enough = rows >= LINEAR_ROWS_PER_FEATURE * (width + 1)
    if option == "auto":
        return width <= LINEAR_MAX_FEATURES and enough
    if option and width > LINEAR_MAX_FEATURES:
        raise ValueError(f"linear_residual=True: the {regressors} has {width} numbers, more than the "
                         f"{LINEAR_MAX_FEATURES} the regression takes; use linear_residual=False or 'auto'")
    if option and not enough:
        raise ValueError(f"linear_residual=True: {rows} training rows for a regression on {width} {regressors} "
                         f"numbers; it needs at least {LINEAR_ROWS_PER_FEATURE * (width + 1)} "
                         f"({LINEAR_ROWS_PER_FEATURE} per coefficient). Use linear_residual=False or 'auto'")
    return bool(option)


def linear_residual_option(value: Any) -> bool | str:
    """``linear_residual`` checked: True, False or "auto"."""
    return flag_or_auto("linear_residual", value)


class NPE(NeuralMethod):
    """Neural posterior estimation with a conditional normalizing flow (module docstring).

    Options: the flow, ``flow`` — a name in ``implicitbayes.nn.FLOWS`` built with ``transforms``,
    ``hidden_features``, ``affine_first`` (a conditional affine autoregressive layer before the
    ``transforms``; None: on) and ``spline_init`` (the spline conditioners' output layers drawn
    from U(±spline_init), so each spline starts as the identity; ``"auto"``: 10⁻³ for ``"nsf"``,
    None for the others) by :func:`implicitbayes.nn.build_flow`, or a build callable
    ``flow(features, context_features)`` returning a zuko-style conditional flow (a module whose
    ``forward(c)`` is a distribution), e.g. ``partial(zuko.flows.NSF, transforms=3)``, used as it
    is (pass it again to ``ib.load``); ``linear_residual`` (True, False
    or ``"auto"``, module docstring; the decision and the residuals' moments are in
    ``training_summary["linear_residual"]``); ``embedding`` of the observation; ``training``, a
    :class:`~implicitbayes.TrainConfig` or a mapping of fields changing ``NPE.TRAINING``; ``device``.
    """

    TRAINING = TrainConfig(batch_size=50, lr=5e-4, max_steps=30_000, patience=50, rising_patience=10, ema=0.999)
    SPLINE_INIT = 1e-3

    def __init__(self, model: Callable, *, observed: str | Sequence[str], model_args: tuple = (),
                 model_kwargs: Mapping | None = None, flow: str | Callable[[int, int], nn.Module] = "nsf",
                 transforms: int = 5, hidden_features: Sequence[int] = (50, 50), affine_first: bool | None = None,
                 spline_init: float | str | None = "auto", linear_residual: bool | str = "auto",
                 embedding: nn.Module | None = None, training: TrainConfig | Mapping | None = None,
                 device: str | torch.device | None = None):
        super().__init__(model, observed=observed, model_args=model_args, model_kwargs=model_kwargs,
                         embedding=embedding, training=training, device=device)
        self.flow_builder = network_builder("flow", flow, {
            "transforms": (transforms, 5), "hidden_features": (tuple(hidden_features), (50, 50)),
            "affine_first": (affine_first, None), "spline_init": (spline_init, "auto")}) if callable(flow) else None
        if self.flow_builder is not None:
            flow, affine_first, spline_init = "custom", False, None
        else:
            choice("flow", flow, FLOWS)
        self.flow = flow
        self.transforms, self.hidden_features = integer("transforms", transforms), tuple(hidden_features)
        self.affine_first = True if affine_first is None else flag("affine_first", affine_first)
        if spline_init == "auto":
            spline_init = self.SPLINE_INIT if flow == "nsf" else None
        else:
            number("spline_init", spline_init, none=True, what="'auto', a positive number")
            if spline_init is not None and flow != "nsf":
                raise ValueError(f"spline_init: only flow='nsf' has spline conditioners, got flow={flow!r}")
        self.spline_init = None if spline_init is None else float(spline_init)
        self.linear_residual = linear_residual_option(linear_residual)

    def _use_residual(self, x_shape) -> bool:
        return linear_residual_wanted(self.linear_residual, x_shape[0], math.prod(x_shape[1:]), "observation")

    @sharing_trial_runs
    def fit(self, data, *, max_steps: int | None = None, time_budget: float | None = None, seed: int | None = None,
            progress: bool = True, checkpoint=None, init: NPEPosterior | None = None) -> NPEPosterior:
        """Train on a SimulationSet; returns an :class:`NPEPosterior`. ``init``: start from that
        posterior's weights, standardisations and configuration (a warm start)."""
        prep, seed, loop = self._begin(data, max_steps, time_budget, seed)
        config = init.config if init is not None else NPEConfig(**neural_config_fields(prep.x.shape[1:], self.embedding), flow=self.flow,
                           transforms=self.transforms, hidden_features=self.hidden_features,
                           affine_first=self.affine_first, spline_init=self.spline_init,
                           linear_residual=self._use_residual(prep.x.shape))
        with seeded(seed, self.device):
            post = NPEPosterior(prep.space, prep.observed, prep.x_shapes, config, self.embedding,
                                self.flow_builder).to(self.device)
            x = prep.x_on(self.device)
            u_s = post.fit_standardizers(prep.x, prep.u.to(self.device))
            residual = post.fit_residual(x, u_s, auto=self.linear_residual == "auto") if init is None else None
            self._warm_start(post, init)
            u_s = post.theta_standardize(prep.u.to(self.device)) if init is not None else u_s
            nll = NPELoss(post)

            def step(idx, g):
                return {"nll": nll(x[idx], u_s[idx]).mean()}

            def validate(idx):
                return float(sum(nll(x[i], u_s[i]).sum() for i in idx.split(4096)) / len(idx))

            post.training_summary = train({"posterior": post}, step, validate, len(x), loop, seed=seed,
                                          progress=progress, checkpoint=checkpoint, desc="NPE", compilable=True)
            if residual is not None:
                post.training_summary["linear_residual"] = residual
        return post.attach_model(self.model, self.model_args, self.model_kwargs)
