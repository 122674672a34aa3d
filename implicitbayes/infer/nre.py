r"""Neural ratio estimation with Pyro's MCMC (Hermans, Begy & Louppe 2020; Durkan et al. 2020).

A classifier d(θ, y) separates joint pairs (θ_i, y_i) ~ p(θ, y) (label 1) from marginal pairs
(θ_j, y_i) ~ p(θ) p(y) (label 0, θ shuffled within the batch). With the logistic loss its logit
converges to

    r*(θ, y) = log p(θ, y) / (p(θ) p(y)) = log p(y | θ) − log p(y),

so p(θ | y) ∝ p(θ) exp r*(θ, y). Sampling runs Pyro's NUTS on the original model, whose observed
implicit sites get the log-density r(θ, y_obs) through :class:`~implicitbayes.handlers.RatioLikelihood`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..checks import integer
from ..handlers import replace_likelihood
from ..nn import Critic
from ..seeding import seeded
from ..space import ParameterSpace
from ..simulate import sharing_trial_runs
from .data import split_observed
from .mcmc import (MCMCDiagnostics, PriorDraws, SampledByNUTS, SliceResume, batched_log_joint, mcmc_options,
                   without_observed)
from .method import NeuralMethod, network_builder
from .objectives import RatioCriticLoss
from .posterior import NeuralConfig, NeuralPosterior, build_network, neural_config_fields, register_posterior
from .training import TrainConfig, train

__all__ = ["NRE", "NREPosterior", "NREConfig"]


@dataclass
class NREConfig(NeuralConfig):
    """The classifier of an :class:`NREPosterior` and its MCMC settings."""

    classifier: str  # "mlp" (Critic of the sizes below) or "custom" (a build callable)
    hidden: int
    layers: int
    num_chains: int
    warmup: int
    sampler: str = "nuts"  # the MCMC kernel: "nuts" (Pyro's) or "slice" (vectorized over chains)


@register_posterior
class NREPosterior(SampledByNUTS, NeuralPosterior):
    """p(θ) exp r(θ, y), sampled with NUTS on the model; ``log_ratio`` exposes r."""

    method = "nre"
    Config = NREConfig

    def __init__(self, space: ParameterSpace, observed, x_shapes, config: NREConfig,
                 embedding: nn.Module | None = None, model: Callable | None = None,
                 classifier: Callable[[int, int], nn.Module] | None = None):
        super().__init__(space, observed, x_shapes, config, embedding)
        d, e = space.unconstrained_dim, self.context.out_features
        self.classifier = build_network("classifier", config.classifier == "custom", classifier,
                                        lambda: Critic(d, e, config.hidden, config.layers), d, e)
        self.model, self.model_args, self.model_kwargs = model, (), {}
        self.mcmc = MCMCDiagnostics()

    def log_ratio(self, theta: Mapping[str, torch.Tensor], observed: Any = None) -> torch.Tensor:
        """r(θ, y) for latents ``{site: (n, *shape)}``: ``(n,)``, differentiable in θ."""
        return self._log_ratio(theta, self._observation(observed))

    def _log_ratio(self, theta: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        u = self.space.to_unconstrained({k: torch.as_tensor(v, device=self.device) for k, v in theta.items()})
        return self.classifier(self.context(x).expand(u.shape[0], -1), self.theta_standardize(u))

    @sharing_trial_runs
    def sample(self, num_samples: int, observed: Any = None, *, seed: int | None = None, num_chains: int | None = None,
               warmup_steps: int | None = None, sampler: str | None = None,
               resume: SliceResume | None = None) -> dict[str, torch.Tensor]:
        """MCMC on the model with the learned likelihood: ``sampler`` "nuts" (``num_chains``
        chains one after another) or "slice" (all chains at once), ``warmup_steps`` each;
        defaults from the fit; ``resume`` as for :meth:`NLEPosterior.sample`. ``self.chains``
        keeps the draws by chain and ``self.diagnostics()`` their R-hat, effective sizes and divergences."""
        return super().sample(num_samples, observed, seed=seed, num_chains=num_chains, warmup_steps=warmup_steps,
                              sampler=sampler, resume=resume)

    def _draw(self, x, num_samples, seed, num_chains=None, warmup_steps=None, sampler=None, resume=None):
        self._require_model()
        values = {k: v[0] for k, v in split_observed(x, self.observed, self.x_shapes).items()}

        def log_ratio(latents, observed_now):
            return self.log_ratio({k: v[None] for k, v in latents.items()}, observed_now)[0]

        conditioned = replace_likelihood(self.model, log_ratio, values, self.space.names)
        prior = PriorDraws(self.model, self.observed, self.model_args, self.model_kwargs)
        prior_only = batched_log_joint(without_observed(self.model, self.observed), prior)
        return self._nuts(conditioned, num_samples, seed, num_chains, warmup_steps, what="NRE", prior=prior,
                          log_likelihood=lambda latents: self._log_ratio(latents, x).cpu(), sampler=sampler,
                          log_joint=lambda latents: prior_only(latents) + self._log_ratio(latents, x).cpu(),
                          resume=resume)


class NRE(NeuralMethod):
    """Neural ratio estimation; sampling by MCMC (NUTS or slice) on the model (module docstring).

    Options: ``hidden``, ``layers`` of the classifier, or a build callable
    ``classifier(theta_features, context_features)`` returning a module ``(context, θ) -> r``
    in its place (e.g. ``partial(ib.nn.Critic, kind="projection")``; pass it again to
    ``ib.load``), ``embedding`` of the observation,
    ``sampler`` ("nuts" or "slice", as for :class:`~implicitbayes.NLE`) with its ``num_chains``
    and ``warmup``, ``training`` (a :class:`~implicitbayes.TrainConfig`
    or a mapping of fields changing ``NRE.TRAINING``), ``device``.
    """

    TRAINING = TrainConfig(batch_size=256, lr=1e-3, max_steps=20_000, patience=20)

    def __init__(self, model: Callable, *, observed: str | Sequence[str], model_args: tuple = (),
                 model_kwargs: Mapping | None = None, hidden: int = 128, layers: int = 3,
                 classifier: Callable[[int, int], nn.Module] | None = None, sampler: str = "nuts",
                 num_chains: int | None = None, warmup: int | None = None, embedding: nn.Module | None = None,
                 training: TrainConfig | Mapping | None = None,
                 device: str | torch.device | None = None):
        super().__init__(model, observed=observed, model_args=model_args, model_kwargs=model_kwargs,
                         embedding=embedding, training=training, device=device)
        self.hidden, self.layers = integer("hidden", hidden), integer("layers", layers)
        self.sampler, self.num_chains, self.warmup = mcmc_options(sampler, num_chains, warmup)
        self.classifier = network_builder("classifier", classifier, {"hidden": (hidden, 128), "layers": (layers, 3)})

    @sharing_trial_runs
    def fit(self, data, *, max_steps: int | None = None, time_budget: float | None = None, seed: int | None = None,
            progress: bool = True, checkpoint=None, init: NREPosterior | None = None) -> NREPosterior:
        """Train on a SimulationSet; returns an :class:`NREPosterior` (sampled by NUTS). ``init``:
        start from that posterior's weights, standardisations and configuration."""
        prep, seed, loop = self._begin(data, max_steps, time_budget, seed)
        config = init.config if init is not None else NREConfig(**neural_config_fields(prep.x.shape[1:], self.embedding),
                           classifier="mlp" if self.classifier is None else "custom", hidden=self.hidden,
                           layers=self.layers, num_chains=self.num_chains, warmup=self.warmup,
                           sampler=self.sampler)
        with seeded(seed, self.device):
            post = NREPosterior(prep.space, prep.observed, prep.x_shapes, config, self.embedding, self.model,
                                self.classifier)
            post = post.to(self.device)
            post.model_args, post.model_kwargs = self.model_args, self.model_kwargs
            x = prep.x_on(self.device)
            u_s = post.fit_standardizers(prep.x, prep.u.to(self.device))
            if init is not None:
                self._warm_start(post, init)
                u_s = post.theta_standardize(prep.u.to(self.device))
            critic_loss = RatioCriticLoss(post.classifier)

            def loss(idx, g):  # joint pairs against pairs with θ shuffled within the batch (marginals)
                c = post.context(x[idx])
                shuffled = u_s[idx][torch.randperm(len(idx), generator=g, device=g.device)]
                return critic_loss((c, u_s[idx]), (c, shuffled))

            def step(idx, g):
                return {"logistic": loss(idx, g)}

            val_g = torch.Generator()

            def validate(idx):
                val_g.manual_seed(seed + 1)
                return float(loss(idx, val_g))

            post.training_summary = train({"posterior": post}, step, validate, len(x), loop, seed=seed,
                                          progress=progress, checkpoint=checkpoint, desc="NRE")
        return post
