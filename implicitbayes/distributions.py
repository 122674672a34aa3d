"""``Implicit``: a sample-only Pyro distribution wrapping a batched simulator.

A simulator is a function ``simulator(*params) -> x`` whose every argument has one leading
batch dimension, ``params[i]`` of shape ``(batch, *param_event_shape_i)``, and which returns
``x`` of shape ``(batch, *event_shape)``. ``Implicit`` takes its batch shape from the enclosing
``pyro.plate`` contexts (as every Pyro site does), flattens the batch for the simulator and
restores it afterwards, so the same simulator serves one draw, a plate of draws, or the outer
plate that :func:`implicitbayes.simulate` puts around the whole model.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Sequence

import pyro.distributions as dist
import pyro.poutine.runtime as pyro_runtime
import torch
from torch.distributions import constraints

from .errors import LIKELIHOOD_FREE_METHODS, IntractableLikelihoodError, SimulatorOutputError

__all__ = ["Implicit", "LogUniform", "implicit_of"]


def _plate_batch_shape() -> torch.Size:
    """Batch shape implied by the active ``pyro.plate`` contexts (``()`` outside any)."""
    frames = [f for f in pyro_runtime.get_plates() if f.vectorized and f.dim is not None]
    if not frames:
        return torch.Size()
    ndim = max(-f.dim for f in frames)
    shape = [1] * ndim
    for f in frames:
        shape[ndim + f.dim] = f.size
    return torch.Size(shape)


def _align(i: int, p: torch.Tensor, batch_shape: torch.Size, param_event_dims) -> torch.Tensor:
    """View ``p`` as ``lead + event`` with ``lead`` of length ``len(batch_shape)`` broadcastable to it."""
    nb = len(batch_shape)
    if param_event_dims is None:
        event_dims = max(p.dim() - nb, 0)
    else:
        event_dims = param_event_dims if isinstance(param_event_dims, int) else param_event_dims[i]
        if not isinstance(event_dims, int) or not 0 <= event_dims <= p.dim():
            raise ValueError(f"Implicit: param_event_dims for parameter {i} must be an int in 0..{p.dim()}, "
                             f"got {event_dims!r}")
    lead_ndim = p.dim() - event_dims
    if lead_ndim < nb:
        p = p.reshape((1,) * (nb - lead_ndim) + tuple(p.shape))
    lead = p.shape[:p.dim() - event_dims]
    try:
        ok = len(lead) == nb and torch.broadcast_shapes(lead, batch_shape) == batch_shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"Implicit: parameter {i} has shape {tuple(p.shape)}, whose batch dimensions {tuple(lead)} do not "
            f"broadcast to the batch shape {tuple(batch_shape)} of the enclosing plates; sample it inside "
            "the same plates, give param_event_dims, or close over constants in the simulator")
    return p


def _site_name(distribution: "Implicit") -> str | None:
    """Name of the Pyro site whose ``fn`` is ``distribution``, found in the caller's frames.

    Pyro computes log-densities in ``Trace.compute_log_prob`` with the site dict in a local
    variable; looking it up lets the error say which site is implicit.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            site = frame.f_locals.get("site")
            if isinstance(site, dict) and site.get("fn") is distribution:
                return site.get("name")
            frame = frame.f_back
    finally:
        del frame
    return None


class Implicit(dist.TorchDistribution):
    """A distribution known only through a simulator: ``sample`` works, ``log_prob`` raises.

    Args:
        simulator: batched simulator ``simulator(*params) -> (batch, *event_shape)``; each
            parameter arrives with a single leading batch dimension. With
            ``vectorized=False`` it is called once per batch element with unbatched
            parameters and must return ``event_shape``.
        *params: tensors of shape ``batch_shape + param_event_shape``; their leading
            dimensions must broadcast to the batch shape of the site (the enclosing plates).
        event_shape: shape of one simulator output. Required unless it can be learnt from
            one probe simulation (which costs a simulator call every time the distribution
            is built); give it.
        vectorized: whether ``simulator`` handles a batch in one call.
        batch_shape: override the batch shape (default: taken from the enclosing plates).
        param_event_dims: number of event (non-batch) dimensions of each parameter (an int
            for all, or one per parameter). Given, parameters broadcast against the batch
            shape right-aligned, as Pyro's do; needed only to pass a global vector into a
            plate (e.g. ``mu`` of shape ``(d,)`` for every group). Default: a parameter's
            leading dimensions are its batch dimensions, and one with fewer dimensions than
            the batch shape is left-padded (a global scalar inside a plate).

    Example:
        >>> theta = pyro.sample("theta", dist.Uniform(-1, 1).expand([2]).to_event(1))
        >>> x = pyro.sample("x", Implicit(simulator, theta, event_shape=(2,)))
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(
        self,
        simulator: Callable[..., torch.Tensor],
        *params: torch.Tensor,
        event_shape: Sequence[int] | None = None,
        vectorized: bool = True,
        batch_shape: Sequence[int] | None = None,
        param_event_dims: int | Sequence[int] | None = None,
        validate_args: bool | None = None,
    ):
        if not callable(simulator):
            raise TypeError(f"Implicit: simulator must be callable, got {type(simulator).__name__}")
        if not isinstance(vectorized, bool):
            raise TypeError(f"Implicit: vectorized must be a bool, got {vectorized!r}")
        params = tuple(torch.as_tensor(p) for p in params)
        batch_shape = _plate_batch_shape() if batch_shape is None else torch.Size(batch_shape)
        params = tuple(_align(i, p, batch_shape, param_event_dims) for i, p in enumerate(params))
        self.simulator = simulator
        self.params = params
        self.vectorized = vectorized
        self._param_event_shapes = tuple(p.shape[len(batch_shape):] for p in params)
        if event_shape is None:
            event_shape = self._probe_event_shape(batch_shape)
        event_shape = torch.Size(event_shape)
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    def _probe_event_shape(self, batch_shape: torch.Size) -> torch.Size:
        one = tuple(p.reshape(-1, *e)[:1] if p.numel() else p for p, e in
                    zip(self._expanded_params(batch_shape), self._param_event_shapes))
        out = self._call(one, 1)
        return out.shape[1:]

    def _expanded_params(self, batch_shape: torch.Size) -> tuple[torch.Tensor, ...]:
        return tuple(p.expand(batch_shape + e) for p, e in zip(self.params, self._param_event_shapes))

    @property
    def support(self):
        return constraints.real

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        new = self._get_checked_instance(Implicit, _instance)
        new.simulator = self.simulator
        new.vectorized = self.vectorized
        new._param_event_shapes = self._param_event_shapes
        old = len(self.batch_shape)
        new.params = tuple(
            p.reshape((1,) * (len(batch_shape) - old) + tuple(p.shape)).expand(batch_shape + e)
            if len(batch_shape) >= old else p.expand(batch_shape + e)
            for p, e in zip(self.params, self._param_event_shapes)
        )
        super(Implicit, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _call(self, flat_params: tuple[torch.Tensor, ...], n: int) -> torch.Tensor:
        name = getattr(self.simulator, "__qualname__", repr(self.simulator))
        if self.vectorized:
            out = self.simulator(*flat_params)
            if not isinstance(out, torch.Tensor):
                raise SimulatorOutputError(f"Implicit: simulator {name} returned {type(out).__name__}, expected a torch.Tensor")
            if out.dim() == 0 or out.shape[0] != n:
                raise SimulatorOutputError(
                    f"Implicit: simulator {name} returned shape {tuple(out.shape)} for a batch of "
                    f"{n} parameter sets; a vectorized simulator must return (batch, *event_shape) = "
                    f"({n}, ...). If it handles one parameter set at a time, pass vectorized=False"
                )
            return out
        # numpy code returns float64 whatever it is given: keep the model in the parameters' dtype
        dtype = next((p.dtype for p in flat_params if p.is_floating_point()), torch.get_default_dtype())
        device = flat_params[0].device if flat_params else None
        outs = []
        for i in range(n):
            o = torch.as_tensor(self.simulator(*(p[i] for p in flat_params)), device=device)
            outs.append(o.to(dtype) if o.is_floating_point() else o)
        if not outs:
            return torch.empty((0,) + tuple(getattr(self, "event_shape", ())))
        shapes = {tuple(o.shape) for o in outs}
        if len(shapes) != 1:
            raise SimulatorOutputError(f"Implicit: simulator {name} returned outputs of differing shapes {sorted(shapes)}")
        return torch.stack(outs)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Simulate: ``(*sample_shape, *batch_shape, *event_shape)``."""
        sample_shape = torch.Size(sample_shape)
        shape = sample_shape + self.batch_shape
        n = math.prod(shape)
        flat = tuple(
            p.expand(shape + e).reshape((n,) + tuple(e))
            for p, e in zip(self.params, self._param_event_shapes)
        )
        out = self._call(flat, n)
        name = getattr(self.simulator, "__qualname__", repr(self.simulator))
        if tuple(out.shape[1:]) != tuple(self.event_shape):
            raise SimulatorOutputError(
                f"Implicit: simulator {name} returned event shape {tuple(out.shape[1:])}, "
                f"expected event_shape={tuple(self.event_shape)}"
            )
        if out.is_complex() or not (out.is_floating_point() or out.dtype in _COUNT_DTYPES):
            raise SimulatorOutputError(f"Implicit: simulator {name} returned dtype {out.dtype}; expected real floating point "
                            "values or integer counts")
        devices = {p.device for p in flat if isinstance(p, torch.Tensor)}
        if devices and out.device not in devices:
            raise SimulatorOutputError(f"Implicit: simulator {name} returned a tensor on {out.device}, but its parameters are "
                             f"on {', '.join(sorted(map(str, devices)))}; return the output on the parameters' device")
        return out.reshape(shape + self.event_shape)

    def log_prob(self, value):
        site = _site_name(self)
        where = f"site '{site}'" if site else "this site"
        raise IntractableLikelihoodError(
            f"The likelihood of {where} is implicit: ib.Implicit can simulate but has no "
            f"log-density. Use a likelihood-free method on simulations instead: "
            f"{', '.join(LIKELIHOOD_FREE_METHODS)} (NRE replaces the site's log-density by a "
            "learned log-ratio, so Pyro's MCMC can run on the model)."
        )


def implicit_of(fn: Any, site: str) -> tuple[Implicit, int]:
    """The ``ib.Implicit`` at a site (itself, or inside ``.to_event``) and the number of batch
    dims reinterpreted as event dims around it; a ``TypeError`` naming the site otherwise."""
    reinterpreted = 0
    while isinstance(fn, dist.Independent):
        reinterpreted += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    if not isinstance(fn, Implicit):
        raise TypeError(f"observed: site '{site}' is a {type(fn).__name__}, not an ib.Implicit; a learned "
                        "likelihood replaces the log-density of an implicit (simulator) site")
    return fn, reinterpreted


_COUNT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class LogUniform(dist.TransformedDistribution):
    """``log X ~ Uniform(log low, log high)``, with support the interval ``[low, high]``.

    (``exp`` of a uniform would report the support ``positive``; a bounded support lets
    ``ParameterSpace`` map networks' outputs into the prior's range.)
    """

    arg_constraints = {"low": constraints.positive, "high": constraints.positive}

    def __init__(self, low, high, validate_args=None):
        self.low, self.high = torch.as_tensor(low), torch.as_tensor(high)
        base = dist.Uniform(self.low.log(), self.high.log(), validate_args=validate_args)
        super().__init__(base, [dist.transforms.ExpTransform()], validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return constraints.interval(self.low, self.high)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(LogUniform, _instance)
        batch_shape = torch.Size(batch_shape)
        new.low, new.high = self.low.expand(batch_shape), self.high.expand(batch_shape)
        return super().expand(batch_shape, _instance=new)
