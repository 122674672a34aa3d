"""Pyro effect handlers for implicit models.

``LearnedLikelihood`` gives observed implicit sites a learned log-density of each draw
(NLE's flow q(x | η), evaluated at the parameters η the site hands its simulator): inside plates
it contributes one factor per draw, as any Pyro likelihood does.

``RatioLikelihood`` replaces the log-density of the observed implicit sites by a learned
log-ratio r(θ, x) ≈ log p(x | θ) − log p(x): the model then has a tractable unnormalised
posterior p(θ) exp r(θ, x), so stock Pyro inference (``pyro.infer.NUTS`` / ``MCMC``) runs on
the *original* model (Hermans et al. 2020's amortised ratio estimation, with Pyro's samplers).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger

from .distributions import implicit_of

__all__ = ["RatioLikelihood", "replace_likelihood", "LearnedLikelihood", "learned_likelihood"]


class _FixedLogProb(dist.TorchDistribution):
    """Stands in for an observed site: ``log_prob`` returns a given log-factor, whatever the value."""

    arg_constraints: dict = {}

    def __init__(self, log_factor: torch.Tensor, event_shape):
        self.log_factor = log_factor
        super().__init__(log_factor.shape, torch.Size(event_shape), validate_args=False)

    @property
    def support(self):
        return dist.constraints.real

    def log_prob(self, value):
        return self.log_factor

    def sample(self, sample_shape=torch.Size()):
        raise NotImplementedError("an observed site with a learned log-ratio cannot be sampled")


class RatioLikelihood(Messenger):
    """At the observed sites, use ``log_ratio(latents, observed)`` as the log-likelihood.

    Args:
        log_ratio: ``f({latent site: value}, {observed site: value}) -> scalar tensor``,
            differentiable in the latents.
        observed: ``{site: value}`` of the data to condition on.
        latent_names: the latent sites ``log_ratio`` needs; they must be sampled before the
            first observed site (the usual model order).
    """

    def __init__(self, log_ratio: Callable, observed: Mapping[str, torch.Tensor], latent_names: Sequence[str]):
        super().__init__()
        self.log_ratio, self.observed, self.latent_names = log_ratio, dict(observed), tuple(latent_names)
        self._latents: dict[str, torch.Tensor] = {}
        self._done = False

    def __enter__(self):
        self._latents, self._done = {}, False
        return super().__enter__()

    def _pyro_sample(self, msg):
        name = msg["name"]
        if name not in self.observed:
            return
        value = torch.as_tensor(self.observed[name])
        if not self._done:
            missing = [n for n in self.latent_names if n not in self._latents]
            if missing:
                raise ValueError(f"RatioLikelihood: observed site '{name}' comes before the latent sites {missing}; "
                                 "the learned ratio needs every latent first")
            log_factor = self.log_ratio(dict(self._latents), self.observed)
            self._done = True
        else:
            log_factor = torch.zeros(())  # the joint ratio was added at the first observed site
        batch = log_factor.shape
        msg["fn"] = _FixedLogProb(log_factor, value.shape[len(batch):])
        msg["value"] = value
        msg["is_observed"] = True

    def _pyro_post_sample(self, msg):
        if msg["name"] in self.latent_names:
            self._latents[msg["name"]] = msg["value"]


def replace_likelihood(model: Callable, log_ratio: Callable, observed: Mapping[str, torch.Tensor],
                       latent_names: Sequence[str]) -> Callable:
    """``model`` with its observed sites' log-density replaced by ``log_ratio`` (see RatioLikelihood)."""

    def wrapped(*args, **kwargs):
        with RatioLikelihood(log_ratio, observed, latent_names):
            return model(*args, **kwargs)

    return wrapped


class _LearnedSite(dist.TorchDistribution):
    """An implicit site's distribution with a learned log-density: the shapes of the
    ``ib.Implicit`` it stands for, ``log_prob(value) = log_density(value, implicit, site)``."""

    arg_constraints: dict = {}

    def __init__(self, implicit, log_density: Callable, site: str):
        self.implicit, self.log_density, self.site = implicit, log_density, site
        super().__init__(implicit.batch_shape, implicit.event_shape, validate_args=False)

    @property
    def support(self):
        return dist.constraints.real

    def log_prob(self, value):
        return self.log_density(value, self.implicit, self.site)

    def sample(self, sample_shape=torch.Size()):
        raise NotImplementedError(f"site '{self.site}' is observed with a learned likelihood; it is not simulated here")


class LearnedLikelihood(Messenger):
    """At each observed implicit site, use a learned log-density of its draws.

    Args:
        log_density: ``f(value, implicit, site) -> tensor of implicit.batch_shape``: the
            log-density of each draw of the ``ib.Implicit`` ``implicit`` at ``value``,
            differentiable in the Implicit's parameters.
        observed: ``{site: value}``; each site must be an ``ib.Implicit`` (or one inside
            ``.to_event``) whose batch and event shapes ``value`` has (or broadcasts to).
    """

    def __init__(self, log_density: Callable, observed: Mapping[str, torch.Tensor]):
        super().__init__()
        self.log_density, self.observed = log_density, dict(observed)

    def _pyro_sample(self, msg):
        name = msg["name"]
        if name not in self.observed:
            return
        implicit, reinterpreted = implicit_of(msg["fn"], name)
        value = self.observed[name]
        shape = implicit.batch_shape + implicit.event_shape
        try:
            fits = torch.broadcast_shapes(value.shape, shape) == shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"observed: site '{name}' has shape {tuple(shape)} in this run of the model "
                             f"(plates {tuple(implicit.batch_shape)}, draws {tuple(implicit.event_shape)}), "
                             f"got a value of shape {tuple(value.shape)}")
        value = value.expand(shape)  # the same data under plates the model is run in (e.g. batches of θ)
        fn = _LearnedSite(implicit, self.log_density, name)
        msg["fn"] = fn.to_event(reinterpreted) if reinterpreted else fn
        msg["value"] = value
        msg["is_observed"] = True


def learned_likelihood(model: Callable, log_density: Callable, observed: Mapping[str, torch.Tensor]) -> Callable:
    """``model`` with the sites in ``observed`` given their values and a learned log-density
    (see :class:`LearnedLikelihood`)."""

    def wrapped(*args, **kwargs):
        with LearnedLikelihood(log_density, observed):
            return model(*args, **kwargs)

    return wrapped
