"""Inference methods, one module each, sharing one training loop (``training.py``)."""

from .abc import ABC, ABCPosterior
from .base import Posterior, load
from .implicit_vi import ImplicitPosterior, ImplicitVI
from .lfvi import LFVI, LFVIPosterior
from .npe import NPE, NPEPosterior
from .nre import NRE, NREPosterior
from .training import TrainingError

__all__ = ["Posterior", "load", "ImplicitVI", "ImplicitPosterior", "NPE", "NPEPosterior", "NRE", "NREPosterior",
           "ABC", "ABCPosterior", "LFVI", "LFVIPosterior", "TrainingError"]
