"""Exceptions raised by implicitbayes, so callers can catch exactly what went wrong."""

from __future__ import annotations

#: Methods that only need samples from an implicit site, named in error messages.
LIKELIHOOD_FREE_METHODS = ("ib.ImplicitVI", "ib.LFVI", "ib.NPE", "ib.NRE", "ib.ABC")


class IntractableLikelihoodError(NotImplementedError):
    """``log_prob`` was asked of an implicit (sample-only) distribution.

    Subclasses ``NotImplementedError`` on purpose: Pyro rewraps ``ValueError`` raised inside
    ``log_prob`` into a generic message, which would hide this one.
    """


class SimulationError(RuntimeError):
    """A simulator failed, or produced too many invalid (NaN/inf) outputs."""


class SimulatorOutputError(SimulationError, ValueError, TypeError):
    """A simulator broke its contract: output of the wrong type, shape, dtype or device, or
    one output for a whole batch. A bug in the simulator rather than a failure at some
    parameters, so it is never retried, bisected or dropped. (Also a ``ValueError`` and a
    ``TypeError``, the types these checks raised before.)"""


class FormatError(ValueError):
    """A file is not an implicitbayes file, is corrupt, or has an unsupported format version."""


class StoreMismatchError(ValueError):
    """A simulation store on disk was written with different settings than the ones requested."""


class TrainingError(RuntimeError):
    """Training produced a non-finite loss; the best weights so far have been restored."""
