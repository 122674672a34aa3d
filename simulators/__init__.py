"""The model zoo: simulators as Pyro models built on ``ib.Implicit``, registered by entry point.

``simulators.get(name, **options)`` returns a task object (``.model``, ``.observed``,
``.prior``, ``.simulate(theta, seed=None)``, ``.observation(k)``, ``.true_parameters(k)``,
``.reference_samples(k)``); ``simulators.names()`` lists what is registered. Third-party
packages add their own under the entry-point group ``implicitbayes.simulators``.
"""

from __future__ import annotations

import difflib
from importlib import import_module
from importlib.metadata import entry_points

from .base import Task

__all__ = ["get", "names", "description", "Task", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "implicitbayes.simulators"

# The zoo shipped here; used when the distribution's entry points are not installed
# (e.g. running from a source tree), and merged with third-party entry points otherwise.
_BUILTIN = {
    "two_moons": "simulators.sbibm_tasks:TwoMoons",
    "gaussian_linear": "simulators.sbibm_tasks:GaussianLinear",
    "gaussian_linear_uniform": "simulators.sbibm_tasks:GaussianLinearUniform",
    "slcp": "simulators.sbibm_tasks:SLCP",
    "gaussian_mixture": "simulators.sbibm_tasks:GaussianMixture",
    "bernoulli_glm": "simulators.sbibm_tasks:BernoulliGLM",
    "sir": "simulators.sbibm_tasks:SIR",
    "g_and_k": "simulators.g_and_k:GAndK",
    "lotka_volterra_sde": "simulators.lotka_volterra:LotkaVolterraSDE",
    "lotka_volterra_mjp": "simulators.lotka_volterra:LotkaVolterraMJP",
    "lotka_volterra_ode": "simulators.sbibm_tasks:LotkaVolterraODE",
    "hierarchical_gaussian": "simulators.hierarchical:HierarchicalGaussian",
    "lotka_volterra_population": "simulators.hierarchical:LotkaVolterraPopulation",
    "hare_lynx": "simulators.hare_lynx:HareLynx",
    "hare_lynx_sde": "simulators.hare_lynx:HareLynxSDE",
}


def _registry() -> dict[str, str]:
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return {**_BUILTIN, **found}


def names() -> list[str]:
    """Names of every registered simulator, sorted."""
    return sorted(_registry())


def _load(target: str):
    module, _, attr = target.partition(":")
    obj = import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def description(name: str) -> str:
    """One-line description of ``name``, without building the task."""
    return _load(_check(name)[name]).description


def _check(name: str) -> dict[str, str]:
    registry = _registry()
    if name not in registry:
        close = difflib.get_close_matches(str(name), registry, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown simulator {name!r}{hint} Known: {', '.join(sorted(registry))}")
    return registry


def get(name: str, **options) -> Task:
    """Build the simulator task ``name`` with ``options`` passed to its constructor."""
    return _load(_check(name)[name])(**options)
