"""Named latent sites ⇄ flat vectors, and constrained ⇄ unconstrained coordinates.

Every method works on one flat vector of latents per simulation. ``ParameterSpace`` fixes the
order (model order), the shapes, and for each site the bijection ``biject_to(support)`` from
unconstrained space onto the site's support, so a network can output any real vector and always
land inside the prior's support (a bounded prior never yields out-of-support draws).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch.distributions import Transform, biject_to, constraints

from .simulate import _random_sites, trial_trace

__all__ = ["ParameterSpace", "SiteSpace", "constraint_to_json", "constraint_from_json"]


def _bound(v) -> float | list:
    t = torch.as_tensor(v)
    return t.item() if t.dim() == 0 else t.tolist()


def constraint_to_json(c: constraints.Constraint, site: str = "?") -> dict:
    """Describe a support as JSON: real, positive, nonnegative, unit_interval, interval,
    greater_than(_eq), less_than, simplex, and ``independent`` wrappings of these."""
    if isinstance(c, constraints.independent):
        return {"type": "independent", "base": constraint_to_json(c.base_constraint, site),
                "reinterpreted_batch_ndims": c.reinterpreted_batch_ndims}
    named = {id(constraints.real): "real", id(constraints.positive): "positive", id(constraints.nonnegative): "nonnegative",
             id(constraints.unit_interval): "unit_interval", id(constraints.simplex): "simplex",
             id(constraints.real_vector): "real_vector"}
    if id(c) in named:
        return {"type": named[id(c)]}
    if isinstance(c, constraints.interval) or type(c).__name__ == "_Interval":
        return {"type": "interval", "lower": _bound(c.lower_bound), "upper": _bound(c.upper_bound)}
    if type(c).__name__ == "_GreaterThanEq":
        return {"type": "greater_than_eq", "lower": _bound(c.lower_bound)}
    if type(c).__name__ == "_GreaterThan":
        return {"type": "greater_than", "lower": _bound(c.lower_bound)}
    if type(c).__name__ == "_LessThan":
        return {"type": "less_than", "upper": _bound(c.upper_bound)}
    raise ValueError(f"site '{site}': cannot save a posterior over support {c!r}; supported: real, positive, "
                     "nonnegative, unit_interval, interval, greater_than, less_than, simplex, independent")


def constraint_from_json(spec: dict) -> constraints.Constraint:
    t = spec.get("type")
    simple = {"real": constraints.real, "positive": constraints.positive, "nonnegative": constraints.nonnegative,
              "unit_interval": constraints.unit_interval, "simplex": constraints.simplex,
              "real_vector": constraints.real_vector}
    if t in simple:
        return simple[t]
    if t == "independent":
        return constraints.independent(constraint_from_json(spec["base"]), spec["reinterpreted_batch_ndims"])
    if t == "interval":
        return constraints.interval(torch.tensor(spec["lower"]), torch.tensor(spec["upper"]))
    if t == "greater_than":
        return constraints.greater_than(torch.tensor(spec["lower"]))
    if t == "greater_than_eq":
        return constraints.greater_than_eq(torch.tensor(spec["lower"]))
    if t == "less_than":
        return constraints.less_than(torch.tensor(spec["upper"]))
    raise ValueError(f"unknown support description {spec!r}")


@dataclass
class SiteSpace:
    """One latent site: its shape, support and bijection from unconstrained space."""

    name: str
    shape: tuple[int, ...]
    support: constraints.Constraint
    transform: Transform
    event_dim: int = 0  # event dims of the site's distribution (the rest are plate/batch dims)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def unconstrained_shape(self) -> tuple[int, ...]:
        return tuple(self.transform.inverse_shape(torch.Size(self.shape)))

    @property
    def unconstrained_numel(self) -> int:
        return math.prod(self.unconstrained_shape)


class ParameterSpace:
    """The latent sites of a model as one flat vector.

    ``flatten({name: (n, *shape)}) -> (n, dim)`` and back; ``to_unconstrained`` /
    ``to_constrained`` map between the support and ``R^dim_unconstrained`` (dimensions can
    differ, e.g. a simplex of size K has K-1 unconstrained coordinates).
    """

    def __init__(self, sites: Sequence[SiteSpace]):
        if not sites:
            raise ValueError("ParameterSpace: the model has no latent sites to infer")
        self.sites = list(sites)
        self.names = tuple(s.name for s in self.sites)

    @classmethod
    def from_model(cls, model: Callable, latent_names: Sequence[str], model_args=(), model_kwargs=None,
                   seed: int = 0) -> "ParameterSpace":
        """Trace one run of ``model`` (its trial run, :func:`~implicitbayes.simulate.trial_trace`) and
        take shape and support of each of ``latent_names``."""
        trace = trial_trace(model, model_args, model_kwargs, seed)
        by_name = {s["name"]: s for s in _random_sites(trace)}
        missing = [n for n in latent_names if n not in by_name]
        if missing:
            raise ValueError(f"latent sites {missing} are not in the model; its sites are {list(by_name)}")
        out = []
        for name in latent_names:
            s = by_name[name]
            fn = s["fn"]
            support = fn.support
            if support.is_discrete:
                raise ValueError(f"site '{name}' is discrete (support {support}); flat continuous spaces need "
                                 "continuous latents")
            try:
                transform = biject_to(support)
            except NotImplementedError as e:
                raise ValueError(f"site '{name}': no bijection onto its support {support}: {e}") from e
            out.append(SiteSpace(name, tuple(torch.as_tensor(s["value"]).shape), support, transform,
                                 len(getattr(fn, "event_shape", ()))))
        return cls(out)

    # -- persistence (JSON, no pickle) ----------------------------------------------------
    def to_json(self) -> list[dict]:
        """A JSON-able description; raises ``ValueError`` for a support it cannot describe."""
        return [{"name": s.name, "shape": list(s.shape), "event_dim": s.event_dim,
                 "support": constraint_to_json(s.support, s.name)} for s in self.sites]

    @classmethod
    def from_json(cls, spec: list[dict]) -> "ParameterSpace":
        sites = []
        for item in spec:
            support = constraint_from_json(item["support"])
            sites.append(SiteSpace(item["name"], tuple(item["shape"]), support, biject_to(support), item["event_dim"]))
        return cls(sites)

    @property
    def dim(self) -> int:
        """Length of the flat constrained vector."""
        return sum(s.numel for s in self.sites)

    @property
    def unconstrained_dim(self) -> int:
        """Length of the flat unconstrained vector."""
        return sum(s.unconstrained_numel for s in self.sites)

    def _check(self, values: Mapping[str, torch.Tensor]) -> int:
        missing = [n for n in self.names if n not in values]
        if missing:
            raise ValueError(f"values lack the latent sites {missing}; expected {list(self.names)}")
        ns = set()
        for s in self.sites:
            v = values[s.name]
            if tuple(v.shape[1:]) != s.shape:
                raise ValueError(f"site '{s.name}': expected shape (n, {', '.join(map(str, s.shape))}), got {tuple(v.shape)}")
            ns.add(v.shape[0])
        if len(ns) != 1:
            raise ValueError(f"sites have different leading dimensions {sorted(ns)}")
        return ns.pop()

    def flatten(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``{name: (n, *shape)}`` → ``(n, dim)`` in site order."""
        n = self._check(values)
        return torch.cat([values[s.name].reshape(n, -1).to(torch.get_default_dtype()
                          if not values[s.name].is_floating_point() else values[s.name].dtype)
                          for s in self.sites], dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(n, dim)`` → ``{name: (n, *shape)}``."""
        if flat.dim() != 2 or flat.shape[-1] != self.dim:
            raise ValueError(f"expected a flat tensor of shape (n, {self.dim}), got {tuple(flat.shape)}")
        out, i = {}, 0
        for s in self.sites:
            out[s.name] = flat[:, i:i + s.numel].reshape((flat.shape[0],) + s.shape)
            i += s.numel
        return out

    def to_unconstrained(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``{name: (n, *shape)}`` in the support → ``(n, unconstrained_dim)``."""
        n = self._check(values)
        return torch.cat([s.transform.inv(values[s.name]).reshape(n, -1) for s in self.sites], dim=-1)

    def to_constrained(self, flat_u: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(n, unconstrained_dim)`` → ``{name: (n, *shape)}`` inside each support."""
        if flat_u.dim() != 2 or flat_u.shape[-1] != self.unconstrained_dim:
            raise ValueError(f"expected shape (n, {self.unconstrained_dim}), got {tuple(flat_u.shape)}")
        out, i = {}, 0
        for s in self.sites:
            k = s.unconstrained_numel
            u = flat_u[:, i:i + k].reshape((flat_u.shape[0],) + s.unconstrained_shape)
            out[s.name] = s.transform(u)
            i += k
        return out

    def log_abs_det_jacobian(self, flat_u: torch.Tensor) -> torch.Tensor:
        """``log |d constrained / d unconstrained|`` per row: ``(n,)``."""
        total, i = torch.zeros(flat_u.shape[0], dtype=flat_u.dtype, device=flat_u.device), 0
        for s in self.sites:
            k = s.unconstrained_numel
            u = flat_u[:, i:i + k].reshape((flat_u.shape[0],) + s.unconstrained_shape)
            ladj = s.transform.log_abs_det_jacobian(u, s.transform(u))
            total = total + ladj.reshape(flat_u.shape[0], -1).sum(-1)
            i += k
        return total
