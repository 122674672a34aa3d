"""Pyro effect handlers for implicit models.

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

__all__ = ["RatioLikelihood", "replace_likelihood"]


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
