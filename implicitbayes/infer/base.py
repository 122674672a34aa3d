"""What every method shares: reading a SimulationSet against the model, the observation
checks, and the posterior object (``sample``, ``as_guide``, ``save``/``ib.load``, ``to``)."""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import pyro
import pyro.distributions as dist
import pyro.poutine.runtime as pyro_runtime
import torch
from torch import nn

from ..errors import FormatError
from ..io import load_tensors, save_tensors
from ..simulate import _Seeded, model_sites, plate_layout
from ..simulation_set import SimulationSet
from ..nn.embeddings import row_blocks
from ..space import ParameterSpace

__all__ = ["Prepared", "Rows", "prepare", "Posterior", "load", "register_posterior", "observation_tensor", "observed_values"]

_KIND = "implicitbayes.Posterior"
_VERSION = 1
_POSTERIORS: dict[str, type] = {}


@dataclass
class Prepared:
    """Simulations as the networks see them: unconstrained latents and observed data."""

    space: ParameterSpace
    observed: tuple[str, ...]
    x_shapes: dict[str, tuple[int, ...]]
    u: torch.Tensor  # (n, unconstrained_dim)
    x: torch.Tensor  # (n, *x_shape): the one observed site, or all observed sites flattened
    mapped: bool = False  # x is memory-mapped from a store: gathered per minibatch, never whole

    def x_on(self, device: torch.device) -> "torch.Tensor | Rows":
        """``x`` for training on ``device``: the tensor moved there, or for a memory-mapped set
        a :class:`Rows` view that reads and moves only the rows each minibatch indexes."""
        return Rows(self.x, device, self.u.dtype) if self.mapped else self.x.to(device)


class Rows:
    """Rows of a (memory-mapped) CPU tensor, gathered and moved to ``device`` per index."""

    def __init__(self, data: torch.Tensor, device: torch.device, dtype: torch.dtype):
        self.data, self.device, self.dtype = data, torch.device(device), dtype

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu()
        return self.data[idx].to(device=self.device, dtype=self.dtype)


def _x_from(values: Mapping[str, torch.Tensor], observed: Sequence[str]) -> torch.Tensor:
    if len(observed) == 1:
        return values[observed[0]]
    n = values[observed[0]].shape[0]
    return torch.cat([values[o].reshape(n, -1) for o in observed], 1)


def prepare(model: Callable, observed: Sequence[str], model_args, model_kwargs, data: Any) -> Prepared:
    """Check ``data`` against ``model`` and turn it into tensors for training."""
    if not isinstance(data, SimulationSet):
        raise TypeError(f"data: expected an ib.SimulationSet (from ib.simulate), got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("data: the SimulationSet is empty")
    sites, _ = model_sites(model, observed, model_args, model_kwargs)
    latent = [s.name for s in sites if not s.observed]
    shapes = {s.name: s.shape for s in sites}
    if set(data.observed_names) != set(observed) or set(data.latent_names) != set(latent):
        raise ValueError(f"data: this SimulationSet has latent {list(data.latent_names)} / observed "
                         f"{list(data.observed_names)}, but the model has latent {latent} / observed {list(observed)}: "
                         "it was simulated from another model")
    wrong = {n: (data.site_shapes[n], shapes[n]) for n in shapes if data.site_shapes[n] != shapes[n]}
    if wrong:
        raise ValueError(f"data: site shapes differ from the model's (data, model): {wrong}; simulated from another model?")
    space = ParameterSpace.from_model(model, latent, model_args, model_kwargs)
    u = space.to_unconstrained({n: data[n] for n in latent})
    bad = ~torch.isfinite(u).all(1)
    if bad.any():
        raise ValueError(f"data: {int(bad.sum())} simulations have latents on the boundary of their support "
                         "(infinite in unconstrained coordinates); drop them with data.subset(...)")
    x = _x_from({o: data[o] for o in observed}, observed)
    mapped = data.is_memory_mapped and len(observed) == 1
    if not all(bool(torch.isfinite(block).all()) for block in row_blocks(x)):
        raise ValueError("data: observed values contain NaN/inf; ib.simulate drops those, was the set edited?")
    return Prepared(space, tuple(observed), {o: shapes[o] for o in observed}, u, x if mapped else x.to(u.dtype),
                    mapped)


def observation_tensor(observed: Any, names: Sequence[str], shapes: Mapping[str, tuple[int, ...]],
                       device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One observation as ``(1, *x_shape)``, from a tensor (one observed site) or ``{site: tensor}``."""
    values = observed_values(observed, names, shapes, device, dtype)
    return _x_from({n: v[None] for n, v in values.items()}, names)


def observed_values(observed: Any, names: Sequence[str], shapes: Mapping[str, tuple[int, ...]],
                    device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One observation as validated ``{site: tensor of the site's shape}``."""
    if observed is None:
        raise ValueError("observed: give the observation to condition on (a tensor, or {site: tensor})")
    if not isinstance(observed, Mapping):
        if len(names) != 1:
            raise ValueError(f"observed: the model has several observed sites {list(names)}; pass a dict")
        observed = {names[0]: observed}
    missing = [n for n in names if n not in observed]
    extra = [n for n in observed if n not in names]
    if missing or extra:
        raise ValueError(f"observed: expected the sites {list(names)}, got {list(observed)}")
    values = {}
    for n in names:
        v = torch.as_tensor(observed[n], dtype=dtype, device=device)
        if tuple(v.shape) != tuple(shapes[n]):
            raise ValueError(f"observed: site '{n}' must have shape {tuple(shapes[n])}, got {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise ValueError(f"observed: site '{n}' contains NaN or inf")
        values[n] = v
    return values


def _guide_plate() -> tuple[int, int] | None:
    frames = [f for f in pyro_runtime.get_plates() if f.vectorized and f.dim is not None]
    if not frames:
        return None
    if len(frames) > 1:
        raise ValueError("as_guide: the guide runs inside several plates; it expects at most the one "
                         "Predictive puts around it")
    return frames[0].size, frames[0].dim


class Posterior(nn.Module):
    """Base class of the fitted posteriors. Subclasses implement ``_sample_unconstrained``."""

    method = "posterior"

    def __init__(self, space: ParameterSpace, observed: Sequence[str], x_shapes: Mapping[str, Sequence[int]],
                 config: Mapping[str, Any]):
        super().__init__()
        self.space = space
        self.observed = tuple(observed)
        self.x_shapes = {k: tuple(v) for k, v in x_shapes.items()}
        self.config = dict(config)
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
        if observed is None:
            observed = self.default_observed
        return observation_tensor(observed, self.observed, self.x_shapes, self.device, torch.get_default_dtype())

    def _sample_unconstrained(self, x: torch.Tensor, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, num_samples: int, observed: Any = None, *, seed: int | None = None) -> dict[str, torch.Tensor]:
        """``num_samples`` posterior draws given ``observed``: ``{latent site: (num_samples, *shape)}``."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples: expected a positive integer, got {num_samples!r}")
        x = self._observation(observed)
        g = torch.Generator(device=self.device)
        g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ())))
        u = self._sample_unconstrained(x, num_samples, g)
        return self.space.to_constrained(u)

    def _observation_rows(self, observations: Any) -> dict[str, torch.Tensor]:
        """Many observations ``{site: (B, *shape)}`` (or one tensor for one observed site), checked."""
        if not isinstance(observations, Mapping):
            if len(self.observed) != 1:
                raise ValueError(f"observations: the model has several observed sites {list(self.observed)}; pass a dict")
            observations = {self.observed[0]: observations}
        if set(observations) != set(self.observed):
            raise ValueError(f"observations: expected the sites {list(self.observed)}, got {list(observations)}")
        rows = {}
        for n in self.observed:
            v = torch.as_tensor(observations[n], dtype=torch.get_default_dtype(), device=self.device)
            if tuple(v.shape[1:]) != tuple(self.x_shapes[n]) or v.dim() != len(self.x_shapes[n]) + 1:
                raise ValueError(f"observations: site '{n}' must have shape (B, {', '.join(map(str, self.x_shapes[n]))}), "
                                 f"got {tuple(v.shape)}")
            if not torch.isfinite(v).all():
                bad = (~torch.isfinite(v.reshape(len(v), -1))).any(1).nonzero().flatten().tolist()
                raise ValueError(f"observations: site '{n}' has NaN or inf in rows {bad[:10]}")
            rows[n] = v
        sizes = {v.shape[0] for v in rows.values()}
        if len(sizes) != 1:
            raise ValueError(f"observations: the sites have different numbers of rows {sorted(sizes)}")
        return rows

    @torch.no_grad()
    def sample_batch(self, num_samples: int, observations: Any, *, seed: int | None = None) -> dict[str, torch.Tensor]:
        """``num_samples`` draws for each of B observations: ``{latent site: (B, num_samples, *shape)}``.
        Amortized posteriors with a batched sampler (NPE) draw for all rows in one call; the
        others go row by row (each row seeded from ``seed``)."""
        rows = self._observation_rows(observations)
        b = next(iter(rows.values())).shape[0]
        base = seed if seed is not None else int(torch.randint(0, 2**62, ()))
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
        save_tensors(path, self.state_dict(), kind=_KIND, version=_VERSION, meta={
            "class": type(self).__name__, "space": self.space.to_json(), "observed": list(self.observed),
            "x_shapes": {k: list(v) for k, v in self.x_shapes.items()}, "config": self.config,
            "training": _without_history(self.training_summary)})


def _without_history(summary: Mapping) -> dict:
    """The training summary without its per-validation histories (kept in memory for plots)."""
    return {k: _without_history(v) if isinstance(v, Mapping) else v for k, v in summary.items() if k != "history"}


def register_posterior(cls: type) -> type:
    _POSTERIORS[cls.__name__] = cls
    return cls


def load(path: str | os.PathLike, device: str | torch.device | None = None, **modules: Any) -> Posterior:
    """Load a posterior written by ``.save``. What JSON cannot hold is passed again: a custom
    embedding network (``ib.load(path, embedding=MyNet())``) and the model (``model=...``,
    with ``model_args`` / ``model_kwargs``) that NRE's MCMC runs on and posterior predictive
    checks simulate through."""
    tensors, meta = load_tensors(path, kind=_KIND, max_version=_VERSION)
    cls = _POSTERIORS.get(meta.get("class"))
    if cls is None:
        raise FormatError(f"{path}: unknown posterior class {meta.get('class')!r}")
    model = modules.pop("model", None)
    model_args, model_kwargs = modules.pop("model_args", ()), modules.pop("model_kwargs", None)
    if model is not None and "model" in inspect.signature(cls).parameters:
        modules["model"] = model
    try:
        space = ParameterSpace.from_json(meta["space"])
        post = cls(space, meta["observed"], meta["x_shapes"], meta["config"], **modules)
        post.load_state_dict(tensors)
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise FormatError(f"{path}: cannot rebuild the {meta.get('class')}: {type(e).__name__}: {e}") from e
    post.training_summary = meta.get("training", {})
    if model is not None:
        post.attach_model(model, model_args, model_kwargs)
    return post.to(device) if device is not None else post


class ContextNet(nn.Module):
    """e(y): standardise the observation (log space for positive features), then embed it.

    ``embedding`` is any module mapping ``(n, *x_shape)`` to ``(n, k)`` with an
    ``out_features`` attribute; the default flattens. A custom embedding is saved with the
    posterior's weights but must be passed again to ``ib.load``.
    """

    def __init__(self, x_shape: Sequence[int], embedding: nn.Module | None = None):
        super().__init__()
        from ..nn import Flatten, Standardize

        self.standardize = Standardize(tuple(x_shape))
        self.embedding = embedding if embedding is not None else Flatten(tuple(x_shape))
        if not hasattr(self.embedding, "out_features"):
            raise TypeError("embedding: the module needs an out_features attribute (its output width)")
        self.out_features = int(self.embedding.out_features)

    @property
    def custom(self) -> bool:
        from ..nn import Flatten

        return not isinstance(self.embedding, Flatten)

    def fit(self, x: torch.Tensor) -> "ContextNet":
        self.standardize.fit(x)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.standardize(x))


def check_embedding_for_load(config: Mapping[str, Any], embedding: nn.Module | None) -> None:
    if config.get("custom_embedding") and embedding is None:
        raise TypeError("this posterior was trained with a custom embedding network: pass it to "
                        "ib.load(path, embedding=...) (same architecture; the weights are in the file)")


def resolve_seed(seed: int | None) -> int:
    if seed is None:
        return int(torch.randint(0, 2**62, ()).item())
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer or None, got {seed!r}")
    return seed


def check_fit_args(max_steps, time_budget) -> None:
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps <= 0):
        raise ValueError(f"max_steps: expected a positive integer or None, got {max_steps!r}")
    if time_budget is not None and not (isinstance(time_budget, (int, float)) and time_budget > 0):
        raise ValueError(f"time_budget: expected a positive number of seconds or None, got {time_budget!r}")


class NeuralPosterior(Posterior):
    """A posterior with the shared input side: e(y) (standardise + embed) and θ standardised in
    unconstrained coordinates."""

    def __init__(self, space: ParameterSpace, observed, x_shapes, config: Mapping[str, Any],
                 embedding: nn.Module | None = None):
        super().__init__(space, observed, x_shapes, config)
        check_embedding_for_load(config, embedding)
        from ..nn import Standardize

        self.context = ContextNet(config["x_shape"], embedding)
        self.theta_standardize = Standardize((space.unconstrained_dim,), log=False, robust=False)
        self.residual = None  # saves from before linear_residual have no key: θ itself was modelled
        if config.get("linear_residual", False):
            from ..nn import LinearResidual

            self.residual = LinearResidual(math.prod(config["x_shape"]), space.unconstrained_dim)

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

    def regressors(self, x: torch.Tensor) -> torch.Tensor:
        """The linear residual's regressors: the standardised observation, flattened, ``(n, prod(x_shape))``."""
        return torch.cat([self.context.standardize(x[i]).flatten(1) for i in torch.arange(len(x)).split(4096)])

    @torch.no_grad()
    def fit_residual(self, x: torch.Tensor, u_s: torch.Tensor, auto: bool = False) -> dict | None:
        """Fit the linear residual (``linear_residual``), if there is one, on at most
        ``LinearResidual.FIT_ROWS`` evenly spread rows of the standardised ``u_s``.

        With ``auto`` the residual is kept only where it looks Gaussian on those rows — every
        coordinate's skewness within ±``RESIDUAL_MAX_SKEW`` and excess kurtosis within
        ±``RESIDUAL_MAX_EXCESS_KURTOSIS`` — and dropped otherwise (``config["linear_residual"]``
        becomes False). A homoscedastic linear-Gaussian relation gives Gaussian residuals; a
        nonlinear or heteroscedastic one gives skewed or heavy-tailed ones (scale mixtures have
        positive excess kurtosis), which standardised by one σ put outliers in the flow's tails
        (npe_ablation.md, session 15). Returns the decision and the moments, or None without a
        residual."""
        if self.residual is None:
            return None
        rows = torch.arange(0, len(x), -(-len(x) // self.residual.FIT_ROWS))
        s, u = self.regressors(x[rows.to(x.device)]), u_s[rows.to(u_s.device)]
        self.residual.fit(s, u)
        skew, kurt = self.residual.shape_moments(s, u)
        gaussian = bool((skew.abs() <= self.RESIDUAL_MAX_SKEW).all() and
                        (kurt.abs() <= self.RESIDUAL_MAX_EXCESS_KURTOSIS).all())
        keep = gaussian or not auto
        if not keep:
            self.residual = None
            self.config["linear_residual"] = False
        return {"on": keep, "gaussian": gaussian, "skewness": [round(float(v), 4) for v in skew],
                "excess_kurtosis": [round(float(v), 4) for v in kurt]}

    RESIDUAL_MAX_SKEW = 0.5  # linear_residual="auto": the residuals' largest |skewness| kept
    RESIDUAL_MAX_EXCESS_KURTOSIS = 1.0  # ... and largest |excess kurtosis|


class Method:
    """Constructor plumbing and the ``fit`` preamble shared by the amortised methods."""

    def __init__(self, model: Callable, observed: str | Sequence[str], model_args, model_kwargs,
                 embedding: nn.Module | None, loop: "TrainConfig", device):
        from ..simulate import resolve_device

        if not callable(model):
            raise TypeError(f"model: expected a callable Pyro model, got {type(model).__name__}")
        self.model, self.model_args, self.model_kwargs = model, tuple(model_args), dict(model_kwargs or {})
        self.observed = [observed] if isinstance(observed, str) else list(observed)
        self.embedding, self.loop = embedding, loop
        self.device = resolve_device(device)

    def _begin(self, data, max_steps, time_budget, seed):
        """Validate the fit arguments and the data; returns ``(prepared, seed, loop settings)``."""
        check_fit_args(max_steps, time_budget)
        seed = resolve_seed(seed)
        prep = prepare(self.model, self.observed, self.model_args, self.model_kwargs, data)
        return prep, seed, self._settings(self.loop, max_steps, time_budget)

    @staticmethod
    def _settings(loop: "TrainConfig", max_steps, time_budget) -> "TrainConfig":
        """A fresh copy of ``loop`` with this fit's ``max_steps`` / ``time_budget``."""
        from .training import TrainConfig

        settings = TrainConfig(**{**loop.__dict__, "history": []})
        if max_steps is not None:
            settings.max_steps = max_steps
        settings.time_budget = time_budget
        return settings

    LINEAR_MAX_FEATURES = 2048  # the regression's normal equations are (features + 1)² numbers
    LINEAR_ROWS_PER_FEATURE = 10  # at least this many simulations per regression coefficient

    @staticmethod
    def _check_linear_residual(value) -> None:
        if not (isinstance(value, bool) or value == "auto"):
            raise ValueError(f"linear_residual: expected True, False or 'auto', got {value!r}")

    def _resolve_linear_residual(self, x_shape) -> bool:
        """Whether to fit the linear residual on data of shape ``(n, *x_shape)``: "auto" fits it
        where the regression is well determined (and ``NeuralPosterior.fit_residual`` keeps it
        where its residuals look Gaussian); True raises where it is not well determined."""
        n, width = x_shape[0], math.prod(x_shape[1:])
        enough = n >= self.LINEAR_ROWS_PER_FEATURE * (width + 1)
        if self.linear_residual == "auto":
            return width <= self.LINEAR_MAX_FEATURES and enough
        if self.linear_residual and width > self.LINEAR_MAX_FEATURES:
            raise ValueError(f"linear_residual=True: the observation has {width} numbers, more than the "
                             f"{self.LINEAR_MAX_FEATURES} the regression takes; use linear_residual=False or 'auto'")
        if self.linear_residual and not enough:
            raise ValueError(f"linear_residual=True: {n} simulations for a regression on {width} observation "
                             f"numbers; it needs at least {self.LINEAR_ROWS_PER_FEATURE * (width + 1)} "
                             f"({self.LINEAR_ROWS_PER_FEATURE} per coefficient). Use linear_residual=False or 'auto'")
        return bool(self.linear_residual)

    def _config(self, prep: Prepared, **extra) -> dict:
        return {"x_shape": list(prep.x.shape[1:]), "custom_embedding": self.embedding is not None, **extra}
