"""Simulations and observations as the networks see them: a SimulationSet checked against the
model and turned into tensors (latents in unconstrained coordinates), and one observation or a
batch of observations checked against the observed sites."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..nn.embeddings import row_blocks
from ..simulate import model_sites, sharing_trial_runs
from ..simulation_set import SimulationSet
from ..space import ParameterSpace

__all__ = ["Prepared", "Rows", "prepare", "join_observed", "split_observed", "observation_tensor", "observed_values",
           "observation_rows"]


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


def join_observed(values: Mapping[str, torch.Tensor], observed: Sequence[str]) -> torch.Tensor:
    """``{site: (n, *shape)}`` → the networks' input ``(n, *x_shape)``: the one observed site as
    it is, or several flattened and concatenated in the order of ``observed``."""
    if len(observed) == 1:
        return values[observed[0]]
    n = values[observed[0]].shape[0]
    return torch.cat([values[o].reshape(n, -1) for o in observed], 1)


def split_observed(x: torch.Tensor, observed: Sequence[str],
                   shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`join_observed`: ``(n, *x_shape)`` → ``{site: (n, *shape)}``."""
    if len(observed) == 1:
        return {observed[0]: x}
    out, start = {}, 0
    for o in observed:
        width = int(torch.Size(shapes[o]).numel())
        out[o] = x[:, start:start + width].reshape((x.shape[0],) + tuple(shapes[o]))
        start += width
    return out


@sharing_trial_runs
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
    x = join_observed({o: data[o] for o in observed}, observed)
    mapped = data.is_memory_mapped and len(observed) == 1
    if not all(bool(torch.isfinite(block).all()) for block in row_blocks(x)):
        raise ValueError("data: observed values contain NaN/inf; ib.simulate drops those, was the set edited?")
    return Prepared(space, tuple(observed), {o: shapes[o] for o in observed}, u, x if mapped else x.to(u.dtype),
                    mapped)


def observation_tensor(observed: Any, names: Sequence[str], shapes: Mapping[str, tuple[int, ...]],
                       device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One observation as ``(1, *x_shape)``, from a tensor (one observed site) or ``{site: tensor}``."""
    values = observed_values(observed, names, shapes, device, dtype)
    return join_observed({n: v[None] for n, v in values.items()}, names)


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


def observation_rows(observations: Any, names: Sequence[str], shapes: Mapping[str, tuple[int, ...]],
                     device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Many observations ``{site: (B, *shape)}`` (or one tensor for one observed site), checked."""
    if not isinstance(observations, Mapping):
        if len(names) != 1:
            raise ValueError(f"observations: the model has several observed sites {list(names)}; pass a dict")
        observations = {names[0]: observations}
    if set(observations) != set(names):
        raise ValueError(f"observations: expected the sites {list(names)}, got {list(observations)}")
    rows = {}
    for n in names:
        v = torch.as_tensor(observations[n], dtype=dtype, device=device)
        if tuple(v.shape[1:]) != tuple(shapes[n]) or v.dim() != len(shapes[n]) + 1:
            raise ValueError(f"observations: site '{n}' must have shape (B, {', '.join(map(str, shapes[n]))}), "
                             f"got {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            bad = (~torch.isfinite(v.reshape(len(v), -1))).any(1).nonzero().flatten().tolist()
            raise ValueError(f"observations: site '{n}' has NaN or inf in rows {bad[:10]}")
        rows[n] = v
    sizes = {v.shape[0] for v in rows.values()}
    if len(sizes) != 1:
        raise ValueError(f"observations: the sites have different numbers of rows {sorted(sizes)}")
    return rows
