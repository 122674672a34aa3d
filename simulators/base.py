"""The task object every simulator in the zoo is: model, prior, batched simulator, observations."""

from __future__ import annotations

import bz2
import importlib.util
from numbers import Integral
from pathlib import Path
from typing import Mapping

import numpy as np
import pyro
import torch

import implicitbayes as ib
from implicitbayes.checks import integer

__all__ = ["Task", "sbibm_file", "read_csv", "generator_for"]

SBIBM_HINT = "install sbibm's reference files with: pip install --no-deps sbibm==1.1.0"


def generator_for(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A seeded generator on ``device``, or ``None`` to use the global RNG (seeded by ``ib.simulate``)."""
    if seed is None:
        return None
    integer("seed", seed, minimum=0, none=True)
    return torch.Generator(device=device).manual_seed(int(seed))


def sbibm_file(task: str, *parts: str) -> Path:
    """Path of a file shipped in the sbibm wheel (``sbibm/tasks/<task>/files/...``), not importing sbibm."""
    spec = importlib.util.find_spec("sbibm")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"sbibm is not installed, so task '{task}' has no stored observations or "
                                f"reference posteriors; {SBIBM_HINT}")
    path = Path(spec.submodule_search_locations[0], "tasks", task, "files", *parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed sbibm; {SBIBM_HINT}")
    return path


def read_csv(path: Path) -> torch.Tensor:
    """sbibm's csv (header line, then rows; ``.csv.bz2`` compressed) as a float32 tensor ``(rows, cols)``."""
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt") as fh:
        return torch.from_numpy(np.loadtxt(fh, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2))


class Task:
    """A simulator with its prior, observed data and (where known) reference posteriors.

    Subclasses set ``name``, ``description``, ``theta_dim``, ``x_shape`` and implement
    ``prior`` (a distribution over the flat parameter vector ``theta``) and ``_simulate``.
    The Pyro model is ``theta ~ prior; x ~ ib.Implicit(simulate, theta)``; hierarchical tasks
    override ``model``.
    """

    name: str = ""
    description: str = ""
    theta_dim: int = 0
    x_shape: tuple[int, ...] = ()
    observed: tuple[str, ...] = ("x",)
    num_observations: int = 10
    sbibm_name: str | None = None  # where its observations live in the sbibm wheel

    @property
    def prior(self) -> pyro.distributions.Distribution:
        """The prior of ``theta``, built on the current default device."""
        raise NotImplementedError

    def _simulate(self, theta: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def simulate(self, theta: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """Batched simulator: ``theta (n, theta_dim)`` → ``x (n, *x_shape)`` on ``theta``'s device."""
        theta = torch.as_tensor(theta)
        if theta.dim() != 2 or theta.shape[1] != self.theta_dim:
            raise ValueError(f"{self.name}.simulate: theta must have shape (n, {self.theta_dim}), "
                             f"got {tuple(theta.shape)}")
        if not theta.is_floating_point():
            theta = theta.to(torch.get_default_dtype())
        return self._simulate(theta, generator_for(seed, theta.device))

    def model(self):
        """The Pyro model: ``theta`` latent, ``x`` simulated."""
        theta = pyro.sample("theta", self.prior)
        return pyro.sample("x", ib.Implicit(self.simulate, theta, event_shape=self.x_shape))

    # -- observations and references ----------------------------------------------------
    def _check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, Integral) or not 1 <= k <= self.num_observations:
            raise ValueError(f"{self.name}: observation number must be an integer in 1..{self.num_observations}, got {k!r}")
        return int(k)

    def true_parameters(self, k: int) -> torch.Tensor | Mapping[str, torch.Tensor]:
        """Parameters that generated observation ``k``: ``(theta_dim,)``."""
        k = self._check_k(k)
        if self.sbibm_name:
            return read_csv(sbibm_file(self.sbibm_name, f"num_observation_{k}", "true_parameters.csv"))[0]
        return self._true_parameters(k)

    def _true_parameters(self, k: int):
        raise NotImplementedError

    def observation(self, k: int) -> torch.Tensor:
        """Observed data ``k``: shape ``x_shape`` (sbibm's stored one, or simulated at a fixed seed)."""
        k = self._check_k(k)
        if self.sbibm_name:
            return read_csv(sbibm_file(self.sbibm_name, f"num_observation_{k}", "observation.csv"))[0].reshape(self.x_shape)
        return self.simulate(self.true_parameters(k)[None], seed=1_000_000 + k)[0]

    def reference_samples(self, k: int) -> torch.Tensor | None:
        """Reference posterior draws for observation ``k`` ``(10000, theta_dim)``, or ``None`` if unknown."""
        k = self._check_k(k)
        if self.sbibm_name:
            return read_csv(sbibm_file(self.sbibm_name, f"num_observation_{k}", "reference_posterior_samples.csv.bz2"))
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} '{self.name}': {self.description}>"
