"""Diagnostics: two-sample metrics, calibration (SBC, expected coverage), posterior predictive
checks, the ImplicitVI critic's estimate of its own error, ArviZ conversion and plots. ArviZ and matplotlib are imported only when used."""

from .calibration import CoverageResult, SBCResult, coverage_from_draws, expected_coverage, sbc, sbc_ranks
from .critic import critic_divergence
from .inference_data import ppc, to_inference_data
from .metrics import c2st, mmd
from .misspecification import misspecification
from .plots import plot_coverage, plot_pair, plot_ppc_series, plot_sbc, plot_training

__all__ = ["c2st", "mmd", "misspecification", "critic_divergence", "sbc", "sbc_ranks", "SBCResult", "expected_coverage", "coverage_from_draws",
           "CoverageResult", "ppc", "to_inference_data", "plot_sbc", "plot_coverage", "plot_ppc_series",
           "plot_training", "plot_pair"]
