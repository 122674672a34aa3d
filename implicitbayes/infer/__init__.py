"""Inference methods, one module each, sharing one training loop (``training.py``), the posterior
base (``posterior.py``), the objectives (``objectives.py``) and critic-corrected resampling
(``sir.py``)."""

from .abc import ABC, ABCPosterior
from .implicit_vi import ImplicitPosterior, ImplicitVI
from .lfvi import LFVI, LFVIPosterior
from .nle import NLE, NLEPosterior
from .npe import NPE, NPEPosterior
from .nre import NRE, NREPosterior
from .posterior import Posterior, load
from .sequential import sequential
from .training import TrainConfig

__all__ = ["Posterior", "load", "ImplicitVI", "ImplicitPosterior", "NPE", "NPEPosterior", "NRE", "NREPosterior", "NLE", "NLEPosterior",
           "ABC", "ABCPosterior", "LFVI", "LFVIPosterior", "TrainConfig", "sequential"]
