r"""Neural likelihood estimation with Pyro's NUTS (Papamakarios, Sterratt & Murray 2019).

A conditional flow q_φ(x | η) learns the density of **one draw** x of the observed implicit site
given η, the parameters that draw's ``ib.Implicit`` hands its simulator, by maximum likelihood on
the simulations:

    max_φ  E_{p(θ) p(x | θ)} [ log q_φ(x | η(θ)) ],

which minimises E_η KL(p(x | η) ‖ q_φ(x | η)). Sampling runs Pyro's NUTS (or, with
``sampler="slice"``, vectorized slice sampling, :mod:`~implicitbayes.infer.mcmc`) on the user's own model
with q_φ in place of the implicit site's missing log-density (an effect handler,
:class:`~implicitbayes.handlers.LearnedLikelihood`), so the posterior is p(θ) Π_i q_φ(x_i | η_i(θ))
up to its normaliser.

Learning the likelihood of one draw, conditioned on what the simulator is given rather than on
the model's latents, is what makes it reusable: a site inside ``pyro.plate("trials", N)`` gets
one factor per trial, so a likelihood trained on single trials serves N = 1, 10, 100 (the plate
multiplies them), and the same learned likelihood can sit inside a larger hierarchical model
whose implicit sites are given other parameters (``posterior.condition(other_model, ...)``).

An ensemble (``ensemble=K``, Lakshminarayanan et al. 2017) trains K flows of the same kind
together, from different initialisations, on the same simulations (the loss is the mean of
their negative log-likelihoods, so each member is fitted as it would be alone) and uses their
mixture q(x | η) = (1/K) Σ_k q_k(x | η) — a density of x again. The members' errors are partly
independent (over the hare–lynx posterior the log-likelihood errors of flows trained on the same
20 000 simulations from different seeds correlate at 0.35–0.42), so the mixture is nearer the
true likelihood than a member is: with three members the posterior it defines is 0.17 reference
sd off at worst, against 0.26–0.34 for one flow (``benchmarks/results/nle_ensemble.md``). An
error that comes from the simulations themselves is shared by every member and stays: in the
sequential hare–lynx run with warm-started rounds the mixture of three left the worst mean 0.44 sd
off, as one flow did.

Both sides are standardised as the other methods do (``implicitbayes.nn.Standardize``: log space
for positive features, the robust asinh step); the log-Jacobian of the data side is added back,
so ``log_likelihood`` is a density of x in its own units. Discrete outputs are modelled as
continuous, as every flow-based likelihood does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch

from ..checks import choice, flag, integer, number
from ..distributions import Implicit, implicit_of
from ..handlers import learned_likelihood
from ..nn import FLOWS, LinearResidual, Standardize, build_flow, flow_log_prob
from ..seeding import resolve_seed, seeded
from ..simulate import model_sites, sharing_trial_runs, trace_given
from ..space import ParameterSpace
from .mcmc import (MCMCDiagnostics, PriorDraws, SampledByNUTS, SliceResume, batched_log_joint, mcmc_options,
                   without_observed)
from .method import NeuralMethod
from .npe import NPE, linear_residual_option, linear_residual_wanted
from .objectives import NPELoss
from .posterior import Posterior, PosteriorConfig, register_posterior
from .training import TrainConfig, train

__all__ = ["NLE", "NLEPosterior", "NLEConfig"]


@dataclass
class NLEConfig(PosteriorConfig):
    """The learned likelihood of an :class:`NLEPosterior` and its MCMC settings."""

    site: str  # the observed implicit site
    trial_shape: tuple[int, ...]  # the shape of one draw of it (the Implicit's event shape)
    param_features: int  # numbers the simulator is given per draw (its parameters, flattened)
    flow: str
    transforms: int
    hidden_features: tuple[int, ...]
    affine_first: bool
    spline_init: float | None
    linear_residual: bool  # the flow models x's residual from its least-squares regression on η
    num_chains: int
    warmup: int
    sampler: str = "nuts"  # the MCMC kernel: "nuts" (Pyro's) or "slice" (vectorized over chains)
    ensemble: int = 1  # flows whose mixture is the learned likelihood


def _param_rows(fn: Implicit) -> torch.Tensor:
    """The parameters of every draw of ``fn``, flattened: ``(prod(batch_shape), features)``."""
    n = math.prod(fn.batch_shape)
    parts = [p.expand(fn.batch_shape + e).reshape(n, -1) for p, e in zip(fn.params, fn._param_event_shapes)]
    if not parts:
        return torch.zeros(n, 0)
    return torch.cat([p if p.is_floating_point() else p.to(torch.get_default_dtype()) for p in parts], 1)


@register_posterior
class NLEPosterior(SampledByNUTS, Posterior):
    """p(θ) Π q(x_i | η_i(θ)) sampled by NUTS on the model; ``log_likelihood`` and ``condition``
    expose the learned likelihood."""

    method = "nle"
    Config = NLEConfig

    def __init__(self, space: ParameterSpace, observed, x_shapes, config: NLEConfig, model: Callable | None = None):
        super().__init__(space, observed, x_shapes, config)
        self.x_standardize = Standardize(config.trial_shape)
        self.param_standardize = Standardize((config.param_features,))
        width = math.prod(config.trial_shape)
        self.residual = LinearResidual(config.param_features, width) if config.linear_residual else None

        def member():
            return build_flow(config.flow, width, config.param_features, transforms=config.transforms,
                              hidden_features=config.hidden_features, affine_first=config.affine_first,
                              spline_init=config.spline_init)

        self.flow = member()
        if config.ensemble > 1:  # a single flow keeps the state-dict keys it always had
            self.members = torch.nn.ModuleList(member() for _ in range(config.ensemble - 1))
        self.mcmc = MCMCDiagnostics()
        if model is not None:
            self.attach_model(model)

    @property
    def flows(self) -> list:
        """The ensemble's flows (one unless ``config.ensemble`` > 1)."""
        return [self.flow, *getattr(self, "members", ())]

    def member_log_probs(self, s: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log q_k(s | η) of each member ``(K, n)`` for standardised, flattened draws ``s`` given
        parameters ``(n, param_features)``: each flow mapped back from the linear regression's
        residual when there is one, in a form a compiled training step traces as one graph
        (``flow_log_prob``, equal to the flow distribution's ``log_prob`` to the bit)."""
        c = self.param_standardize(params)
        outer = () if self.residual is None else (self.residual.transform(c),)
        return torch.stack([flow_log_prob(flow, s, c, outer) for flow in self.flows])

    def standardized_log_prob(self, s: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log q(s | η) ``(n,)``: the members' mixture, log (1/K) Σ_k q_k(s | η)."""
        lp = self.member_log_probs(s, params)
        return lp[0] if len(lp) == 1 else torch.logsumexp(lp, 0) - math.log(len(lp))

    def log_likelihood(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log q(x | η) for draws ``x (n, *trial_shape)`` and parameters ``(n, param_features)``:
        ``(n,)``, a density of x in its own units, differentiable in the parameters."""
        s = self.x_standardize(x)
        jacobian = self.x_standardize.log_abs_det_jacobian(x).reshape(len(x), -1).sum(1)
        return self.standardized_log_prob(s.reshape(len(x), -1), params) + jacobian

    def site_log_density(self, value: torch.Tensor, fn: Implicit, site: str) -> torch.Tensor:
        """The learned log-density of every draw of the implicit ``fn`` at ``value``: its batch shape."""
        trial, width = tuple(fn.event_shape), self.config.param_features
        params = _param_rows(fn).to(self.device)
        if trial != self.config.trial_shape or params.shape[1] != width:
            raise ValueError(f"site '{site}': its draws have shape {trial} and {params.shape[1]} simulator parameters, "
                             f"but the likelihood was learned for draws of shape {self.config.trial_shape} with "
                             f"{width} parameters")
        rows = value.reshape((-1,) + trial).to(device=self.device, dtype=params.dtype)
        return self.log_likelihood(rows, params).reshape(fn.batch_shape)

    def condition(self, model: Callable, observed: Mapping[str, Any]) -> Callable:
        """``model`` with each site in ``observed`` (``{site: value}``, each an ``ib.Implicit`` of
        the learned kind) given its value and the learned log-density: a model stock Pyro
        inference (``pyro.infer.NUTS``) runs on. The sites may sit in plates (one factor per
        draw) and the model may have any other sites (a hierarchical model around them)."""
        values = {}
        for name, v in dict(observed).items():
            values[name] = self._checked_value(name, v)
        return learned_likelihood(model, self.site_log_density, values)

    def _checked_value(self, name: str, value: Any) -> torch.Tensor:
        v = torch.as_tensor(value, dtype=torch.get_default_dtype(), device=self.device)
        if not torch.isfinite(v).all():
            raise ValueError(f"observed: site '{name}' contains NaN or inf")
        trial = self.config.trial_shape
        if v.dim() < len(trial) or tuple(v.shape[v.dim() - len(trial):]) != trial:
            raise ValueError(f"observed: site '{name}' has shape {tuple(v.shape)}; its draws have shape {trial}, "
                             f"so it must end in {trial} (one draw, or draws in plates before it)")
        bad = self.x_standardize.use_log & (v.reshape((-1,) + trial) <= 0).any(0)
        if bad.any():
            raise ValueError(f"observed: site '{name}' has entries ≤ 0 at {bad.nonzero().tolist()[:10]} of a draw, "
                             "where every training simulation was strictly positive (those are modelled in log space)")
        return v

    def _observation(self, observed) -> dict[str, torch.Tensor]:
        """The observation as ``{site: value}``: checked against the learned draw shape, not the
        training run's plate sizes (the model may be run with other arguments)."""
        if observed is None:
            observed = self.default_observed
        if observed is None:
            raise ValueError("observed: give the observation to condition on (a tensor, or {site: tensor})")
        if not isinstance(observed, Mapping):
            observed = {self.config.site: observed}
        if set(observed) != {self.config.site}:
            raise ValueError(f"observed: expected the site {self.config.site!r}, got {sorted(observed)}")
        return {k: self._checked_value(k, v) for k, v in observed.items()}

    @sharing_trial_runs
    def sample(self, num_samples: int, observed: Any = None, *, seed: int | None = None,
               num_chains: int | None = None, warmup_steps: int | None = None, model_args: tuple | None = None,
               model_kwargs: Mapping | None = None, sampler: str | None = None,
               resume: SliceResume | None = None) -> dict[str, torch.Tensor]:
        """MCMC on the model with the learned likelihood at ``observed``: ``sampler`` "nuts" (Pyro's
        NUTS, ``num_chains`` chains one after another) or "slice" (vectorized slice sampling, all
        chains at once: 20, or one per 100 draws when that is more, unless ``num_chains`` is
        given); the fit's choice by default. ``model_args`` /
        ``model_kwargs`` replace the fit's for this run (e.g. ``{"num_trials": 10}`` for ten
        i.i.d. trials of a site inside a plate); the observation must have the site's shape under
        them. ``resume``: slice chains start from that weighted population
        (:class:`~implicitbayes.infer.mcmc.SliceResume`) with a shorter warm-up. ``self.diagnostics()``
        reports R-hat, effective sizes and divergences."""
        num_samples = integer("num_samples", num_samples)
        self._require_model()
        values = self._observation(observed)
        args = self.model_args if model_args is None else tuple(model_args)
        kwargs = self.model_kwargs if model_kwargs is None else dict(model_kwargs)
        sites, _ = model_sites(self.model, list(values), args, kwargs)
        shapes = {s.name: s.shape for s in sites}
        for name, v in values.items():
            if tuple(v.shape) != shapes[name]:
                raise ValueError(f"observed: site '{name}' has shape {shapes[name]} in the model run with "
                                 f"model_args={args}, model_kwargs={kwargs}, got {tuple(v.shape)}")
        prior = PriorDraws(self.model, self.observed, args, kwargs)
        joint = batched_log_joint(self.condition(self.model, values), prior)
        prior_only = batched_log_joint(without_observed(self.model, self.observed), prior)
        return self._nuts(self.condition(self.model, values), num_samples, resolve_seed(seed), num_chains,
                          warmup_steps, what="NLE", model_args=args, model_kwargs=kwargs, sampler=sampler,
                          log_likelihood=lambda latents: joint(latents) - prior_only(latents), prior=prior,
                          log_joint=joint, resume=resume)

    @torch.no_grad()
    def sample_batch(self, num_samples: int, observations: Any, *, seed: int | None = None) -> dict[str, torch.Tensor]:
        """``num_samples`` draws for each of B observations ``{site: (B, *shape)}``, one NUTS run each."""
        integer("num_samples", num_samples)
        rows = observations if isinstance(observations, Mapping) else {self.config.site: observations}
        base = resolve_seed(seed)
        n = len(next(iter(rows.values())))
        out = [self.sample(num_samples, {k: v[i] for k, v in rows.items()}, seed=base + i) for i in range(n)]
        return {k: torch.stack([o[k] for o in out]) for k in out[0]}


class NLE(NeuralMethod):
    """Neural likelihood estimation; sampling by MCMC (NUTS or slice) on the model (module docstring).

    The model has one observed site, an ``ib.Implicit`` (possibly inside plates or
    ``.to_event``). Options: the flow of x given the simulator's parameters — ``flow`` (a name in
    ``implicitbayes.nn.FLOWS``), ``transforms``, ``hidden_features``, ``affine_first``,
    ``spline_init`` as for :class:`~implicitbayes.NPE` (same defaults); ``sampler`` — "nuts"
    (Pyro's NUTS, ``num_chains`` 2 run one after another, ``warmup`` 300) or "slice" (vectorized
    slice sampling, :func:`~implicitbayes.infer.mcmc.slice_sample`: 20 chains advanced together,
    ``warmup`` 100 sweeps along the principal axes it finds; the sampler for multimodal or strongly
    correlated posteriors of a few parameters, and several times faster) — with ``num_chains``
    and ``warmup`` defaulting to the sampler's; ``ensemble`` — K flows trained together from
    different initialisations, the likelihood being their mixture (module docstring; three took
    twice one flow's training time on hare–lynx, and every likelihood evaluation costs K flows);
    ``training`` (a :class:`~implicitbayes.TrainConfig`
    or a mapping of fields changing ``NLE.TRAINING``: NPE's loop without its weight averaging,
    which on hare-lynx left the learned likelihood's error over the reference posterior no
    smaller, ``benchmarks/results/hare_lynx.md``); ``device``.
    """

    TRAINING = replace(NPE.TRAINING, ema=None)
    FIT_ROWS = 65_536  # simulations traced at once to read the simulator's parameters

    def __init__(self, model: Callable, *, observed: str | Sequence[str], model_args: tuple = (),
                 model_kwargs: Mapping | None = None, flow: str = "nsf", transforms: int = 5,
                 hidden_features: Sequence[int] = (50, 50), affine_first: bool | None = None,
                 spline_init: float | str | None = "auto", linear_residual: bool | str = "auto",
                 sampler: str = "nuts", num_chains: int | None = None, warmup: int | None = None,
                 ensemble: int = 1, training: TrainConfig | Mapping | None = None,
                 device: str | torch.device | None = None):
        super().__init__(model, observed=observed, model_args=model_args, model_kwargs=model_kwargs,
                         training=training, device=device)
        if len(self.observed) != 1:
            raise ValueError(f"observed: NLE learns the likelihood of one implicit site, got {self.observed}; "
                             "make the simulator return all outputs from one ib.Implicit site")
        self.flow = choice("flow", flow, FLOWS)
        self.transforms, self.hidden_features = integer("transforms", transforms), tuple(hidden_features)
        self.affine_first = flow == "nsf" if affine_first is None else flag("affine_first", affine_first)
        if spline_init == "auto":
            spline_init = NPE.SPLINE_INIT if flow == "nsf" else None
        elif number("spline_init", spline_init, none=True, what="'auto', a positive number") is not None \
                and flow != "nsf":
            raise ValueError(f"spline_init: only flow='nsf' has spline conditioners, got flow={flow!r}")
        self.spline_init = None if spline_init is None else float(spline_init)
        self.linear_residual = linear_residual_option(linear_residual)
        self.sampler, self.num_chains, self.warmup = mcmc_options(sampler, num_chains, warmup)
        self.ensemble = integer("ensemble", ensemble, minimum=1)

    def _draws(self, data, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """The simulations as single draws of the implicit site: ``(x (N, *trial_shape),
        parameters (N, param_features), trial_shape)``, N = simulations × draws per simulation
        (the site's plates). The parameters are read by running the model with every site given."""
        site = self.observed[0]
        sites, outer_dim = model_sites(self.model, self.observed, self.model_args, self.model_kwargs)
        info = {s.name: s for s in sites}
        xs, ps, trial = [], [], None
        for rows in torch.arange(len(data)).split(self.FIT_ROWS):
            given = {s.name: data[s.name][rows] for s in sites}
            node = trace_given(self.model, given, info, outer_dim, model_args=self.model_args,
                               model_kwargs=self.model_kwargs).nodes[site]
            fn, _ = implicit_of(node["fn"], site)
            trial = tuple(fn.event_shape)
            ps.append(_param_rows(fn).detach())
            xs.append(torch.broadcast_to(node["value"], fn.batch_shape + fn.event_shape).reshape((-1,) + trial))
        x, params = torch.cat(xs).to(dtype), torch.cat(ps).to(dtype)
        if not torch.isfinite(params).all():
            raise ValueError("data: the simulator's parameters are NaN/inf for some simulations")
        return x, params, trial

    @sharing_trial_runs
    def fit(self, data, *, max_steps: int | None = None, time_budget: float | None = None, seed: int | None = None,
            progress: bool = True, checkpoint=None, init: NLEPosterior | None = None) -> NLEPosterior:
        """Train on a SimulationSet; returns an :class:`NLEPosterior` (sampled by NUTS). ``init``:
        start from that posterior's weights, standardisations and configuration."""
        prep, seed, loop = self._begin(data, max_steps, time_budget, seed)
        x, params, trial = self._draws(data, prep.u.dtype)
        config = init.config if init is not None else NLEConfig(site=self.observed[0], trial_shape=trial, param_features=params.shape[1], flow=self.flow,
                           transforms=self.transforms, hidden_features=self.hidden_features,
                           affine_first=self.affine_first, spline_init=self.spline_init,
                           linear_residual=linear_residual_wanted(self.linear_residual, len(x), params.shape[1],
                                                                  "simulator parameters"),
                           num_chains=self.num_chains, warmup=self.warmup, sampler=self.sampler,
                           ensemble=self.ensemble)
        with seeded(seed, self.device):
            post = NLEPosterior(prep.space, prep.observed, prep.x_shapes, config).to(self.device)
            post.x_standardize.fit(x)
            post.param_standardize.fit(params)
            self._warm_start(post, init)
            s = post.x_standardize(x.to(self.device)).reshape(len(x), -1)
            c = params.to(self.device)
            residual = None
            if post.residual is not None and init is None:
                residual = {"on": True, **post.residual.fit_checked(post.param_standardize(c), s)}
                if not residual["gaussian"] and self.linear_residual == "auto":
                    post.residual, residual["on"] = None, False
                    post.config = replace(post.config, linear_residual=False)
            nll = NPELoss(post)  # −log q(s | η): the same maximum likelihood, x and θ in each other's roles

            def step(idx, g):  # each member on its own likelihood; validated as the mixture
                return {"nll": -post.member_log_probs(s[idx], c[idx]).mean()}

            def validate(idx):
                return float(sum(nll(c[i], s[i]).sum() for i in idx.split(4096)) / len(idx))

            post.training_summary = train({"posterior": post}, step, validate, len(x), loop, seed=seed,
                                          progress=progress, checkpoint=checkpoint, desc="NLE", compilable=True)
            post.training_summary["draws"] = len(x)
            if residual is not None:
                post.training_summary["linear_residual"] = residual
        return post.attach_model(self.model, self.model_args, self.model_kwargs)
