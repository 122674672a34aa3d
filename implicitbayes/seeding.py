"""Seeds: every random computation of the library draws from a seed the caller can give, and
never changes the global random state behind the caller's back."""

from __future__ import annotations

import random

import numpy as np
import torch

from .checks import integer

__all__ = ["seeded", "resolve_seed", "fresh_seed"]


def fresh_seed(generator: torch.Generator | None = None) -> int:
    """A new seed in [0, 2⁶²) from ``generator`` (or torch's global generator)."""
    device = generator.device if generator is not None else None  # a CUDA generator draws on its device
    return int(torch.randint(0, 2**62, (), generator=generator, device=device))


def resolve_seed(seed: int | None) -> int:
    """``seed`` checked (a non-negative integer), or a fresh one for None."""
    return fresh_seed() if seed is None else integer("seed", seed, minimum=0, none=True)


class seeded:
    """A context in which torch (CPU, and ``device`` if it is a CUDA device), numpy and
    ``random`` are seeded from ``seed``; their states are restored on exit.

    ``with seeded(0): ...`` makes code that draws from the global generators (network
    initialisation, Pyro's samplers) reproducible without changing the caller's random state.
    """

    def __init__(self, seed: int, device: torch.device | str | None = None):
        self.seed, self.device = seed, torch.device(device if device is not None else "cpu")

    def __enter__(self) -> "seeded":
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        self._fork = torch.random.fork_rng(devices=cuda)
        self._fork.__enter__()
        self._np, self._py = np.random.get_state(), random.getstate()
        state = np.random.SeedSequence(self.seed).generate_state(3, np.uint32)
        torch.manual_seed(int(state[0]) << 32 | int(state[1]))
        np.random.seed(int(state[2]))
        random.seed(int(state[2]))
        return self

    def __exit__(self, *exc):
        np.random.set_state(self._np)
        random.setstate(self._py)
        return self._fork.__exit__(*exc)
