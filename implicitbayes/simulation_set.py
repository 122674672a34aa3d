"""``SimulationSet``: named simulations with a leading simulation dimension."""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

import torch

from .io import load_tensors, save_tensors

__all__ = ["SimulationSet", "open_mapped", "MAPPED_MANIFEST"]

_KIND = "implicitbayes.SimulationSet"
_VERSION = 1
_INDEX = "__index__"
MAPPED_MANIFEST = "set.json"


def open_mapped(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The arrays of a store's assembled set (``<store>/set``), memory-mapped read-only from
    their raw files: pages are read when rows are indexed, so a set larger than memory can be
    trained on in minibatches. Raises ``FormatError`` naming the file on a missing, truncated
    or inconsistent one."""
    import json
    from pathlib import Path

    import numpy as np

    from .errors import FormatError

    directory = Path(directory)
    mpath = directory / MAPPED_MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
        arrays = manifest["arrays"]
    except (OSError, ValueError, KeyError) as e:
        raise FormatError(f"{mpath}: not a readable assembled simulation set: {e}") from e
    out = {}
    for name, spec in arrays.items():
        path = directory / f"{name}.bin"
        dtype = np.dtype(spec["dtype"])
        shape = tuple(spec["shape"])
        want = dtype.itemsize * int(np.prod(shape))
        size = path.stat().st_size if path.exists() else -1
        if size != want:
            raise FormatError(f"{path}: expected {want} bytes for {name} {shape} {dtype}, found "
                              f"{'no file' if size < 0 else size}; truncated or from another run")
        if want == 0:
            out[name] = torch.empty(shape, dtype=getattr(torch, spec["dtype"]))
            continue
        # copy-on-write: writable for torch (no warning), and nothing is ever written back
        out[name] = torch.from_numpy(np.memmap(path, dtype=dtype, mode="c", shape=shape))
        out[name]._ib_memory_mapped = True  # what SimulationSet.is_memory_mapped reads; copies lack it
    return out


def _is_mapped(v: torch.Tensor) -> bool:
    return bool(getattr(v, "_ib_memory_mapped", False))


class SimulationSet:
    """Simulations of a model: one tensor per Pyro site, each ``(num_simulations, *site_shape)``.

    Attributes:
        latent_names: the latent sites (what is inferred), in model order.
        observed_names: the data sites (what is conditioned on).
        num_invalid: simulations dropped because an output was NaN/inf or a chunk failed.
        index: ``(num_simulations,)`` int64, the global index of each simulation in the run
            that made it (simulation ``i`` was drawn from seed and chunk of index ``i``).
        meta: JSON-able provenance (seed, batch size, model name, ...).
    """

    def __init__(
        self,
        values: Mapping[str, torch.Tensor],
        *,
        latent_names: Sequence[str],
        observed_names: Sequence[str],
        num_invalid: int = 0,
        index: torch.Tensor | None = None,
        meta: Mapping | None = None,
    ):
        self.latent_names = tuple(latent_names)
        self.observed_names = tuple(observed_names)
        missing = [n for n in self.latent_names + self.observed_names if n not in values]
        if missing:
            raise ValueError(f"SimulationSet: values lack the sites {missing}; got {sorted(values)}")
        overlap = set(self.latent_names) & set(self.observed_names)
        if overlap:
            raise ValueError(f"SimulationSet: sites {sorted(overlap)} are both latent and observed")
        lengths = {name: v.shape[0] if v.dim() else None for name, v in values.items()}
        if len(set(lengths.values())) > 1 or None in lengths.values():
            raise ValueError(f"SimulationSet: every site needs the same leading simulation dimension, got {lengths}")
        self._values = {n: values[n] for n in self.latent_names + self.observed_names}
        n = next(iter(lengths.values())) if lengths else 0
        self.index = torch.arange(n) if index is None else torch.as_tensor(index, dtype=torch.int64)
        if self.index.shape != (n,):
            raise ValueError(f"SimulationSet: index must have shape ({n},), got {tuple(self.index.shape)}")
        if int(num_invalid) < 0:
            raise ValueError(f"SimulationSet: num_invalid must be >= 0, got {num_invalid}")
        self.num_invalid = int(num_invalid)
        self.meta = dict(meta or {})

    # -- container protocol -------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._values[name]
        except KeyError:
            raise KeyError(f"SimulationSet has no site {name!r}; sites: {list(self._values)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def keys(self) -> Iterable[str]:
        return self._values.keys()

    @property
    def site_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of one simulation of each site."""
        return {n: tuple(v.shape[1:]) for n, v in self._values.items()}

    @property
    def device(self) -> torch.device:
        return next(iter(self._values.values())).device if self._values else torch.device("cpu")

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}: {s}" for n, s in self.site_shapes.items())
        return (f"SimulationSet({len(self)} simulations; latent {list(self.latent_names)}, "
                f"observed {list(self.observed_names)}; {shapes}; {self.num_invalid} invalid dropped)")

    # -- transformations ----------------------------------------------------------------
    def _like(self, values, index, num_invalid=None) -> "SimulationSet":
        return SimulationSet(values, latent_names=self.latent_names, observed_names=self.observed_names,
                             num_invalid=self.num_invalid if num_invalid is None else num_invalid,
                             index=index, meta=self.meta)

    def to(self, device: str | torch.device) -> "SimulationSet":
        """A copy with every tensor on ``device``."""
        return self._like({n: v.to(device) for n, v in self._values.items()}, self.index)

    def subset(self, indices: torch.Tensor | slice | Sequence[int]) -> "SimulationSet":
        """The simulations at ``indices`` (positions, a boolean mask or a slice)."""
        if not isinstance(indices, slice):
            indices = torch.as_tensor(indices)
            if indices.dtype != torch.bool:
                indices = indices.long()
        return self._like({n: v[indices.to(v.device) if isinstance(indices, torch.Tensor) else indices]
                           for n, v in self._values.items()}, self.index[indices])

    def extend(self, other: "SimulationSet") -> "SimulationSet":
        """Append the simulations of ``other`` (same sites and shapes) in place; returns self."""
        if not isinstance(other, SimulationSet):
            raise TypeError(f"extend: other must be a SimulationSet, got {type(other).__name__}")
        if (other.latent_names, other.observed_names) != (self.latent_names, self.observed_names):
            raise ValueError(
                f"extend: sites differ: latent {other.latent_names} / observed {other.observed_names}, "
                f"expected latent {self.latent_names} / observed {self.observed_names}")
        if other.site_shapes != self.site_shapes:
            raise ValueError(f"extend: site shapes differ: {other.site_shapes}, expected {self.site_shapes}")
        self._values = {n: torch.cat([v, other[n].to(v.device)]) for n, v in self._values.items()}
        self.index = torch.cat([self.index, other.index])
        self.num_invalid += other.num_invalid
        return self

    # -- persistence --------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` (safetensors with JSON metadata; no pickle)."""
        tensors = dict(self._values)
        tensors[_INDEX] = self.index
        save_tensors(path, tensors, kind=_KIND, version=_VERSION, meta={
            "latent_names": list(self.latent_names), "observed_names": list(self.observed_names),
            "num_invalid": self.num_invalid, "meta": self.meta})

    @property
    def is_memory_mapped(self) -> bool:
        """Whether the tensors are memory-mapped from a store (rows are read from disk when indexed)."""
        return any(_is_mapped(v) for v in self._values.values())

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> "SimulationSet":
        """Read a file written by :meth:`save`, or open a simulation store (the directory given
        to ``ib.simulate(store=...)``) memory-mapped; raises ``FormatError`` naming the file if
        it is not one."""
        from pathlib import Path

        from .errors import FormatError

        if Path(path).is_dir():
            return cls._open_store(Path(path), device)

        tensors, header = load_tensors(path, kind=_KIND, max_version=_VERSION, device=device)
        try:
            index = tensors.pop(_INDEX)
            return cls(tensors, latent_names=header["latent_names"], observed_names=header["observed_names"],
                       num_invalid=header["num_invalid"], index=index.cpu(), meta=header.get("meta"))
        except (KeyError, ValueError) as e:
            raise FormatError(f"{path}: inconsistent SimulationSet file: {e}") from e

    @classmethod
    def _open_store(cls, path, device) -> "SimulationSet":
        import json

        from .errors import FormatError

        try:
            store = json.loads((path / "manifest.json").read_text())
            assembled = json.loads((path / "set" / MAPPED_MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise FormatError(f"{path}: not a complete simulation store (run ib.simulate with store= to finish it): "
                              f"{e}") from e
        values = open_mapped(path / "set")
        index = values.pop(_INDEX)
        observed = list(store["observed"])
        latent = [n for n in store["sites"] if n not in observed]
        n_req = assembled["num_simulations"]
        meta = {"seed": store["seed"], "batch_size": store["batch_size"], "model": store["model"],
                "device": store["device"], "num_requested": n_req, "store": str(path)}
        data = cls(values, latent_names=latent, observed_names=observed,
                   num_invalid=n_req - assembled["n_rows"] + assembled["n_bad"], index=index, meta=meta)
        return data.to(device) if device is not None else data
