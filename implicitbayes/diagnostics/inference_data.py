"""Posteriors as ArviZ ``InferenceData``, and posterior predictive simulation.

Dimensions are named after the model: a site's batch dimensions after the ``pyro.plate``s it
sits in, other dimensions ``<site>_dim_<k>`` (ArviZ's own convention).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..checks import integer
from ..simulate import model_sites, simulate, simulate_at

__all__ = ["to_inference_data", "ppc"]


def _model_of(posterior, model):
    model = model if model is not None else getattr(posterior, "model", None)
    if model is None:
        raise ValueError("model: this posterior does not hold its model (it was loaded from a file?); pass "
                         "model=... (or load it with ib.load(path, model=...))")
    return model


def ppc(posterior, observed: Any = None, *, model: Callable | None = None, num_samples: int = 200,
        seed: int = 0, model_args: tuple | None = None, model_kwargs: Mapping | None = None) -> dict[str, torch.Tensor]:
    """Posterior predictive draws: latents from ``posterior`` given ``observed``, observations
    simulated through the model at them. Returns ``{site: (num_samples, *shape)}`` for the
    latent and the observed sites (non-finite simulations included, as the model produced them)."""
    model = _model_of(posterior, model)
    args = posterior.model_args if model_args is None else tuple(model_args)
    kwargs = posterior.model_kwargs if model_kwargs is None else dict(model_kwargs)
    draws = posterior.sample(num_samples, observed, seed=seed)
    sims = simulate_at(model, draws, observed=list(posterior.observed), model_args=args, model_kwargs=kwargs,
                       seed=seed, device=posterior.device)
    return {**{k: v.cpu() for k, v in draws.items()}, **{k: v.cpu() for k, v in sims.items()}}


def _dims(model, observed, args, kwargs) -> dict[str, list[str]]:
    sites, _ = model_sites(model, list(observed), args, kwargs)
    out = {}
    for s in sites:
        names = list(s.plates) if len(s.plates) == s.batch_ndim else [f"{s.name}_dim_{k}" for k in range(s.batch_ndim)]
        names += [f"{s.name}_dim_{k}" for k in range(s.batch_ndim, len(s.shape))]
        out[s.name] = names
    return out


def to_inference_data(posterior, observed: Any = None, *, num_samples: int = 1000, posterior_predictive: bool = True,
                      prior: bool = True, model: Callable | None = None, seed: int = 0,
                      model_args: tuple | None = None, model_kwargs: Mapping | None = None):
    """``arviz.InferenceData`` with groups ``posterior`` (draws given ``observed``),
    ``posterior_predictive`` (simulated through the model at those draws), ``observed_data``,
    and ``prior`` / ``prior_predictive`` (``num_samples`` simulations from the model).

    NRE's MCMC chains keep their chain dimension; other methods give one chain.
    """
    import arviz as az

    from ..infer.data import observed_values

    integer("num_samples", num_samples)
    if observed is None:
        observed = posterior.default_observed
    needs_model = posterior_predictive or prior
    model = _model_of(posterior, model) if needs_model else (model or getattr(posterior, "model", None))
    args = posterior.model_args if model_args is None else tuple(model_args)
    kwargs = posterior.model_kwargs if model_kwargs is None else dict(model_kwargs)
    obs_names = list(posterior.observed)
    draws = posterior.sample(num_samples, observed, seed=seed)
    chains = getattr(posterior, "chains", None)
    if chains:  # NRE: every MCMC draw, by chain
        draws = {k: v.reshape((-1,) + tuple(v.shape[2:])) for k, v in chains.items()}
        num_chains = next(iter(chains.values())).shape[0]

    def by_chain(name, value):
        value = value.detach().cpu().numpy()
        if chains:
            return value.reshape((num_chains, -1) + value.shape[1:])
        return value[None]

    post_group = {k: by_chain(k, v) for k, v in draws.items()}
    groups: dict[str, Any] = {"posterior": post_group}
    dims = _dims(model, obs_names, args, kwargs) if model is not None else {}
    obs_values = None
    if observed is not None or getattr(posterior, "observation", None) is None:
        obs_values = observed_values(observed, obs_names, posterior.x_shapes, torch.device("cpu"),
                                     torch.get_default_dtype())
    else:  # fitted to one dataset (ABC, LFVI): its own observation
        flat = posterior.observation.cpu()
        obs_values = {obs_names[0]: flat.reshape(posterior.x_shapes[obs_names[0]])} if len(obs_names) == 1 else None
    if obs_values is not None:
        groups["observed_data"] = {k: v.numpy() for k, v in obs_values.items()}
    if posterior_predictive:
        sims = simulate_at(model, draws, observed=obs_names, model_args=args, model_kwargs=kwargs, seed=seed,
                           device=posterior.device)
        groups["posterior_predictive"] = {k: by_chain(k, v) for k, v in sims.items()}
    if prior:
        data = simulate(model, num_samples, observed=obs_names, model_args=args, model_kwargs=kwargs,
                        seed=seed + 1, progress=False)
        groups["prior"] = {k: data[k].numpy()[None] for k in data.latent_names}
        groups["prior_predictive"] = {k: data[k].numpy()[None] for k in data.observed_names}
    return az.from_dict(**groups, dims={k: v for k, v in dims.items()})
