"""implicitbayes: likelihood-free Bayesian inference for Pyro models whose likelihood is a simulator."""

from . import diagnostics
from .diagnostics import to_inference_data
from .distributions import Implicit, LogUniform
from .errors import (FormatError, IntractableLikelihoodError, SimulationError, SimulatorOutputError,
                     StoreMismatchError, TrainingError)
from .infer import ABC, LFVI, NLE, NPE, NRE, ImplicitVI, TrainConfig, load, sequential
from .seeding import seeded
from .simulate import simulate
from .simulation_set import SimulationSet
from .space import ParameterSpace

__version__ = "0.1.0"

__all__ = [
    "Implicit",
    "LogUniform",
    "IntractableLikelihoodError",
    "SimulationError",
    "SimulatorOutputError",
    "FormatError",
    "StoreMismatchError",
    "simulate",
    "SimulationSet",
    "ParameterSpace",
    "ImplicitVI",
    "LFVI",
    "NPE",
    "NRE",
    "NLE",
    "ABC",
    "sequential",
    "TrainingError",
    "TrainConfig",
    "seeded",
    "load",
    "diagnostics",
    "to_inference_data",
]
