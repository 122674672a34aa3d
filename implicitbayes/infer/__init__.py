"""Inference methods, one module each, sharing one training loop (``training.py``)."""

from .base import Posterior, load
from .implicit_vi import ImplicitPosterior, ImplicitVI
from .npe import NPE, NPEPosterior
from .training import TrainingError

__all__ = ["Posterior", "load", "ImplicitVI", "ImplicitPosterior", "NPE", "NPEPosterior", "TrainingError"]
