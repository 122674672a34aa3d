"""What every method shares: the model and its observed sites, the device, the fit arguments;
the neural methods add an embedding network and the training loop's settings."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, Sequence

from torch import nn

from ..seeding import resolve_seed
from ..simulate import resolve_device
from .data import Prepared, prepare
from .training import TrainConfig, resolve_training

__all__ = ["Method", "NeuralMethod", "network_builder"]


class Method:
    """``Method(model, *, observed, model_args=(), model_kwargs=None, device=None)``: the Pyro
    model, the names of its observed (simulator) sites, and where to compute."""

    def __init__(self, model: Callable, *, observed: str | Sequence[str], model_args: tuple = (),
                 model_kwargs: Mapping | None = None, device=None):
        if not callable(model):
            raise TypeError(f"model: expected a callable Pyro model, got {type(model).__name__}")
        self.model, self.model_args, self.model_kwargs = model, tuple(model_args), dict(model_kwargs or {})
        self.observed = [observed] if isinstance(observed, str) else list(observed)
        if not self.observed or not all(isinstance(o, str) for o in self.observed):
            raise ValueError(f"observed: expected a site name or a list of site names, got {observed!r}")
        self.device = resolve_device(device)

    def _prepare(self, data: Any) -> Prepared:
        return prepare(self.model, self.observed, self.model_args, self.model_kwargs, data)


class NeuralMethod(Method):
    """A method trained by the shared loop: adds ``embedding`` (a network on the standardised
    observation) and ``training`` (a :class:`TrainConfig`, or a mapping of fields changing the
    method's ``TRAINING`` defaults)."""

    TRAINING: ClassVar[TrainConfig] = TrainConfig()

    def __init__(self, model: Callable, *, observed: str | Sequence[str], model_args: tuple = (),
                 model_kwargs: Mapping | None = None, embedding: nn.Module | None = None,
                 training: TrainConfig | Mapping | None = None, device=None):
        super().__init__(model, observed=observed, model_args=model_args, model_kwargs=model_kwargs, device=device)
        if embedding is not None and not isinstance(embedding, nn.Module):
            raise TypeError(f"embedding: expected an nn.Module or None, got {type(embedding).__name__}")
        self.embedding = embedding
        self.training = resolve_training(self.TRAINING, training)

    @staticmethod
    def _warm_start(post, init) -> None:
        """Start ``post`` from ``init`` (a posterior this method fitted before, e.g. the previous
        round of ``ib.sequential``): its weights, standardisations and configuration."""
        if init is None:
            return
        if type(init) is not type(post) or init.space.names != post.space.names or init.x_shapes != post.x_shapes:
            raise ValueError(f"init: expected a {type(post).__name__} of this model (latents {list(post.space.names)}, "
                             f"observed {post.x_shapes}), got a {type(init).__name__} of latents "
                             f"{list(getattr(getattr(init, 'space', None), 'names', []))}")
        post.load_state_dict(init.state_dict())

    def _begin(self, data, max_steps, time_budget, seed) -> tuple[Prepared, int, TrainConfig]:
        """Validate the fit arguments and the data; returns ``(prepared, seed, loop settings)``."""
        loop = self.training.with_fit(max_steps, time_budget)
        seed = resolve_seed(seed)
        return self._prepare(data), seed, loop


def network_builder(name: str, builder: Any, settings: Mapping[str, tuple[Any, Any]]) -> Callable | None:
    """``builder`` if it is a build callable for the network ``name`` (None for the default
    network). A build callable is used as it is, so ``settings`` of the default network
    (``{option: (value, default)}``) given beside it are refused rather than ignored."""
    if builder is None:
        return None
    if not callable(builder):
        raise TypeError(f"{name}: expected a build callable or None, got {type(builder).__name__}")
    changed = [k for k, (value, default) in settings.items() if value != default]
    if changed:
        raise ValueError(f"{name}: a build callable is used as it is, so {changed} cannot apply to it; "
                         "build those into the callable")
    return builder
