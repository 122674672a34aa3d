"""End-to-end accuracy on sbibm tasks and calibration of the signature method: long, marked
``slow`` (``make test PYTEST_ARGS=--runslow``; the README lists their durations).

Each sbibm test reproduces one held-out cell of the grid (``benchmarks/sbibm_suite.py``: 10³
simulations of seed 1, observations 6–10, training seed 1) with the method's defaults and scores
it with our ``c2st`` (which agrees with sbibm's to ±0.01, ``test_diagnostics.py``). The threshold
is the grid's C2ST for that cell (``benchmarks/results/sbibm_suite.json``) plus 0.02: the run is the
same computation, so only the classifier's differences and a changed default move it — a change
that costs accuracy fails here.
"""

import pytest
import torch

import implicitbayes as ib
import simulators
from exact import correlated_model, sliced_errors
from implicitbayes.diagnostics import c2st, expected_coverage, sbc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

# (method, task) → the grid's mean C2ST over observations 6–10 at 10³ simulations of seed 1
GRID = {
    ("implicit_vi", "two_moons"): 0.716,
    ("npe", "two_moons"): 0.687,
    ("implicit_vi", "slcp"): 0.971,
    ("npe", "slcp"): 0.951,
    ("implicit_vi", "sir"): 0.622,
    ("npe", "sir"): 0.710,
}
MARGIN = 0.02


@pytest.mark.parametrize("method, task_name", sorted(GRID))
def test_end_to_end_accuracy_on_an_sbibm_task(method, task_name):
    task = simulators.get(task_name)
    data = ib.simulate(task.model, 1000, observed="x", seed=1, progress=False)
    cls = {"implicit_vi": ib.ImplicitVI, "npe": ib.NPE}[method]
    post = cls(task.model, observed="x").fit(data, seed=1, progress=False)
    scores = [c2st(task.reference_samples(k), post.sample(10_000, task.observation(k), seed=1)["theta"].reshape(10_000, -1))
              for k in range(6, 11)]
    mean = sum(scores) / len(scores)
    assert mean <= GRID[method, task_name] + MARGIN, (scores, mean)


def test_implicit_vi_is_calibrated():
    """SBC and expected coverage of ImplicitVI at its defaults on the correlated Gaussian model
    (tests/exact.py; 4 000 simulations): ranks of 300 fresh true θ among 99 draws uniform (χ²,
    Bonferroni over coordinates, α = 0.01), and TARP coverage within 0.1 of the diagonal (the
    binomial sd at 300 datasets is ≤ 0.029)."""
    data = ib.simulate(correlated_model, 4000, observed="x", seed=0, progress=False)
    post = ib.ImplicitVI(correlated_model, observed="x").fit(data, seed=0, progress=False)
    ranks = sbc(post, correlated_model, observed="x", num_datasets=300, num_samples=99, seed=5, progress=False)
    assert ranks.passed, ranks.p_value
    coverage = expected_coverage(post, correlated_model, observed="x", num_datasets=300, num_samples=200, seed=6,
                                 progress=False)
    assert coverage.max_gap < 0.1, coverage.max_gap
    assert torch.isfinite(torch.as_tensor(coverage.coverage)).all()


@pytest.fixture(scope="module")
def lfvi_hierarchical():
    """LFVI with its defaults on hierarchical_gaussian, observation 2: 10 000 draws and the
    exact posterior's (quadrature)."""
    task = simulators.get("hierarchical_gaussian")
    post = ib.LFVI(task.model, observed="x").fit(observation=task.observation(2), seed=0, progress=False)
    return post.sample(10_000, seed=1), task.reference_samples(2)


def test_lfvi_at_its_defaults_matches_the_exact_global_posterior(lfvi_hierarchical):
    """(μ, τ) within w1 0.15 exact sd along the coordinates and the diagonal (tests/exact.py; on this
    posterior a 0.3-sd shift scores 0.32, a 1.5× variance 0.19). Measured: 0.030 (0.10 with the
    implicit local sampler, ``local="implicit"``)."""
    draws, ref = lfvi_hierarchical
    pair = lambda d: torch.stack([d["mu"], d["tau"]], -1)  # noqa: E731
    errors = sliced_errors(pair(draws), pair(ref))
    assert errors["w1"] < 0.15, errors


def test_lfvi_at_its_defaults_matches_the_exact_local_marginals(lfvi_hierarchical):
    """Each local θ_n's marginal within w1 0.15 exact sd — the check a 0.3-sd shift (0.31) and a
    1.5× variance (0.20) fail. Measured: 0.035 with the default local flow; the implicit local
    sampler (``local="implicit"``) fails it at 0.17 (benchmarks/results/lfvi_hierarchical.md)."""
    draws, ref = lfvi_hierarchical
    errors = sliced_errors(draws["theta"], ref["theta"], diagonals=False)
    assert errors["w1"] < 0.15, errors
