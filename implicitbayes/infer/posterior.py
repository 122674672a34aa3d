"""The fitted posterior every method returns: ``sample`` (validated and seeded here, drawn by
the subclass), ``sample_batch``, ``as_guide`` for Pyro, ``save`` and ``ib.load`` (safetensors
weights and a typed configuration as JSON), ``to(device)``."""

from __future__ import annotations

import inspect
import os
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Callable, ClassVar, Mapping, Sequence

import pyro
import pyro.distributions as dist
import pyro.poutine.runtime as pyro_runtime
import torch
from torch import nn

from ..checks import integer
from ..errors import FormatError
from ..io import load_tensors, save_tensors
from ..nn import ContextNet, Standardize
from ..seeding import resolve_seed
from ..simulate import plate_layout
from ..space import ParameterSpace
from .data import observation_rows, observation_tensor

__all__ = ["PosteriorConfig", "NeuralConfig", "Posterior", "NeuralPosterior", "register_posterior", "load",
           "FORMAT_VERSION", "build_network"]

_KIND = "implicitbayes.Posterior"
#: Version 2: typed configurations (``Posterior.Config``). Version-1 files are refused (load_).
FORMAT_VERSION = 2
_POSTERIORS: dict[str, type] = {}


@dataclass
class PosteriorConfig:
    """A posterior's settings, as saved with it: every field is written, and read back strictly."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> "PosteriorConfig":
        names = {f.name for f in fields(cls)}
        optional = {f.name for f in fields(cls) if f.default is not MISSING}  # added later, with a default
        missing, unknown = sorted(names - optional - set(values)), sorted(set(values) - names)
        if missing or unknown:
            raise FormatError(f"{cls.__name__}: the saved configuration lacks {missing} / has unknown {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass
class NeuralConfig(PosteriorConfig):
    """What every neural posterior saves: the shape of its input and whether e(y) is custom."""

    x_shape: tuple[int, ...]
    custom_embedding: bool


def _guide_plate() -> tuple[int, int] | None:
    frames = [f for f in pyro_runtime.get_plates() if f.vectorized and f.dim is not None]
    if not frames:
        return None
    if len(frames) > 1:
        raise ValueError("as_guide: the guide runs inside several plates; it expects at most the one "
                         "Predictive puts around it")
    return frames[0].size, frames[0].dim


class Posterior(nn.Module):
    """Base class of the fitted posteriors. A subclass implements ``_draw``; ``sample`` checks
    the arguments and resolves the seed once for all of them."""

    method = "posterior"
    Config: ClassVar[type] = PosteriorConfig

    def __init__(self, space: ParameterSpace, observed: Sequence[str], x_shapes: Mapping[str, Sequence[int]],
                 config: PosteriorConfig):
        super().__init__()
        if not isinstance(config, self.Config):
            raise TypeError(f"config: expected a {self.Config.__name__}, got {type(config).__name__}")
        self.space = space
        self.observed = tuple(observed)
        self.x_shapes = {k: tuple(v) for k, v in x_shapes.items()}
        self.config = config
        self.default_observed = None
        self.training_summary: dict = {}
        self.model, self.model_args, self.model_kwargs = None, (), {}

    def attach_model(self, model: Callable, model_args=(), model_kwargs=None) -> "Posterior":
        """Remember the model (in memory, not saved) for posterior predictive simulation;
        ``fit`` does this, ``ib.load(path, model=...)`` too."""
        self.model, self.model_args, self.model_kwargs = model, tuple(model_args), dict(model_kwargs or {})
        return self

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def _observation(self, observed) -> torch.Tensor:
        """The observation to condition on, checked: ``(1, *x_shape)``."""
        if observed is None:
            observed = self.default_observed
        return observation_tensor(observed, self.observed, self.x_shapes, self.device, torch.get_default_dtype())

    def _draw(self, x: torch.Tensor, num_samples: int, seed: int, **options) -> dict[str, torch.Tensor]:
        """``num_samples`` draws at the checked observation ``x``, from ``seed``: ``{site: (n, *shape)}``."""
        raise NotImplementedError

    def sample(self, num_samples: int, observed: Any = None, *, seed: int | None = None,
               **options) -> dict[str, torch.Tensor]:
        """``num_samples`` posterior draws given ``observed``: ``{latent site: (num_samples, *shape)}``.
        ``options`` are the sampler's own (see the subclass)."""
        num_samples = integer("num_samples", num_samples)
        x = self._observation(observed)
        return self._draw(x, num_samples, resolve_seed(seed), **options)

    def _observation_rows(self, observations: Any) -> dict[str, torch.Tensor]:
        return observation_rows(observations, self.observed, self.x_shapes, self.device, torch.get_default_dtype())

    @torch.no_grad()
    def sample_batch(self, num_samples: int, observations: Any, *, seed: int | None = None) -> dict[str, torch.Tensor]:
        """``num_samples`` draws for each of B observations: ``{latent site: (B, num_samples, *shape)}``.
        Amortized posteriors with a batched sampler (NPE) draw for all rows in one call; the
        others go row by row (row i seeded from ``seed + i``)."""
        integer("num_samples", num_samples)
        rows = self._observation_rows(observations)
        b = next(iter(rows.values())).shape[0]
        base = resolve_seed(seed)
        out = [self.sample(num_samples, {n: v[i] for n, v in rows.items()}, seed=base + i) for i in range(b)]
        return {k: torch.stack([o[k] for o in out]) for k in out[0]}

    def set_default_observed(self, observed: Any) -> "Posterior":
        """Observation used when ``sample``/``as_guide`` are called without one."""
        self._observation(observed)  # validate now
        self.default_observed = observed
        return self

    def as_guide(self, observed: Any = None) -> Callable:
        """A Pyro guide drawing the latents from this posterior at ``observed``.

        Works with ``pyro.infer.Predictive(model, guide=posterior.as_guide(x), num_samples=n)``:
        inside Predictive's plate it draws one batch of ``n``.
        """
        x_obs = observed if observed is not None else self.default_observed
        self._observation(x_obs)

        def guide(*args, **kwargs):
            plate = _guide_plate()
            n = 1 if plate is None else plate[0]
            draws = self.sample(n, x_obs)
            for site in self.space.sites:
                value = draws[site.name]
                if plate is None:
                    value = value[0]
                else:
                    value = plate_layout(value, plate[1], len(site.shape) - site.event_dim)
                pyro.sample(site.name, dist.Delta(value, event_dim=site.event_dim))
            return draws

        return guide

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write weights (safetensors) and configuration (JSON) to ``path``; read with ``ib.load``."""
        save_tensors(path, self.state_dict(), kind=_KIND, version=FORMAT_VERSION, meta={
            "class": type(self).__name__, "space": self.space.to_json(), "observed": list(self.observed),
            "x_shapes": {k: list(v) for k, v in self.x_shapes.items()}, "config": self.config.to_json(),
            "training": _without_history(self.training_summary)})


def _without_history(summary: Mapping) -> dict:
    """The training summary without its per-validation histories (kept in memory for plots)."""
    return {k: _without_history(v) if isinstance(v, Mapping) else v for k, v in summary.items() if k != "history"}


def register_posterior(cls: type) -> type:
    """Make a Posterior subclass loadable by ``ib.load`` (by its class name)."""
    _POSTERIORS[cls.__name__] = cls
    return cls


def load(path: str | os.PathLike, device: str | torch.device | None = None, **modules: Any) -> Posterior:
    """Load a posterior written by ``.save``. What JSON cannot hold is passed again: a custom
    embedding network (``ib.load(path, embedding=MyNet())``) and the model (``model=...``,
    with ``model_args`` / ``model_kwargs``) that NRE's MCMC runs on and posterior predictive
    checks simulate through.

    Files of format version 1 (untyped configurations) are refused with a ``FormatError``:
    fit the posterior again."""
    tensors, meta = load_tensors(path, kind=_KIND, max_version=FORMAT_VERSION)
    if meta.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{path}: a posterior of format version {meta.get('format_version')!r}, written before "
                          f"the typed configurations of version {FORMAT_VERSION}; this implicitbayes cannot read it "
                          "back: fit the posterior again (its simulations can be reused)")
    cls = _POSTERIORS.get(meta.get("class"))
    if cls is None:
        raise FormatError(f"{path}: unknown posterior class {meta.get('class')!r}")
    model = modules.pop("model", None)
    model_args, model_kwargs = modules.pop("model_args", ()), modules.pop("model_kwargs", None)
    if model is not None and "model" in inspect.signature(cls).parameters:
        modules["model"] = model
    config = cls.Config.from_json(meta["config"])
    try:
        space = ParameterSpace.from_json(meta["space"])
        post = cls(space, meta["observed"], meta["x_shapes"], config, **modules)
        post.load_state_dict(tensors)
    except (KeyError, RuntimeError, ValueError) as e:
        raise FormatError(f"{path}: cannot rebuild the {meta.get('class')}: {type(e).__name__}: {e}") from e
    post.training_summary = meta.get("training", {})
    if model is not None:
        post.attach_model(model, model_args, model_kwargs)
    return post.to(device) if device is not None else post


class NeuralPosterior(Posterior):
    """A posterior with the shared input side: e(y) (standardise + embed) and θ standardised in
    unconstrained coordinates. Subclasses implement ``_sample_unconstrained``."""

    Config = NeuralConfig

    def __init__(self, space: ParameterSpace, observed, x_shapes, config: NeuralConfig,
                 embedding: nn.Module | None = None):
        super().__init__(space, observed, x_shapes, config)
        if config.custom_embedding and embedding is None:
            raise TypeError("this posterior was trained with a custom embedding network: pass it to "
                            "ib.load(path, embedding=...) (same architecture; the weights are in the file)")
        self.context = ContextNet(config.x_shape, embedding)
        self.theta_standardize = Standardize((space.unconstrained_dim,), log=False, robust=False)

    def _observation(self, observed) -> torch.Tensor:
        x = super()._observation(observed)
        bad = self.context.standardize.use_log & (x[0] <= 0)
        if bad.any():
            where = [tuple(i) if len(i) > 1 else int(i[0]) for i in bad.nonzero().tolist()]
            raise ValueError(f"observed: entries {where[:10]} are ≤ 0, but every training simulation was strictly "
                             "positive there (those features are standardised in log space); this observation is "
                             "outside what the simulator produced")
        return x

    def fit_standardizers(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Fit both standardisations on the training data; returns standardised ``u``."""
        self.context.fit(x)
        self.theta_standardize.fit(u)
        return self.theta_standardize(u)

    def _sample_unconstrained(self, x: torch.Tensor, num_samples: int, generator: torch.Generator,
                              **options) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def _draw(self, x, num_samples, seed, **options):
        g = torch.Generator(device=self.device).manual_seed(seed)
        return self.space.to_constrained(self._sample_unconstrained(x, num_samples, g, **options))


def build_network(name: str, custom: bool, builder: Callable[..., nn.Module] | None,
                  default: Callable[[], nn.Module], *sizes: int) -> nn.Module:
    """A posterior's network: ``builder(*sizes)`` where it was trained with a build callable
    (which ``ib.load`` must then be given again as ``name=``), else ``default()``."""
    if not custom:
        return default()
    if builder is None:
        raise TypeError(f"this posterior was trained with a custom {name}: pass its build callable to "
                        f"ib.load(path, {name}=...) (the same one; the weights are in the file)")
    network = builder(*sizes)
    if not isinstance(network, nn.Module):
        raise TypeError(f"{name}: the build callable returned {type(network).__name__} for sizes {sizes}; "
                        "expected a torch.nn.Module")
    return network


def neural_config_fields(x_shape: Sequence[int], embedding: nn.Module | None) -> dict:
    """The :class:`NeuralConfig` fields of a fit on data of shape ``(n, *x_shape)``."""
    return {"x_shape": tuple(int(v) for v in x_shape), "custom_embedding": embedding is not None}

