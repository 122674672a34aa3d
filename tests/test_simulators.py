"""The simulator zoo: registry, task objects, and each simulator against its definition.

sbibm tasks that run without Julia are compared with sbibm's own simulator (two-sample KS on
every coordinate and on 8 fixed random projections, n = 2000 each, p > 1e-3 after Bonferroni).
The ODE tasks, which sbibm solves in Julia, are checked against sbibm's stored observations.
"""

import math

import numpy as np
import pytest
import scipy.stats
import torch

import implicitbayes as ib
import simulators
from simulators.sbibm_tasks import SIR, GaussianLinear, LotkaVolterraODE

DESIGN_NAMES = ["two_moons", "gaussian_linear", "gaussian_linear_uniform", "slcp", "gaussian_mixture",
                "bernoulli_glm", "sir", "g_and_k", "lotka_volterra_sde", "lotka_volterra_mjp",
                "lotka_volterra_ode", "hierarchical_gaussian", "lotka_volterra_population", "hare_lynx"]
SBIBM_NO_JULIA = ["two_moons", "gaussian_linear", "gaussian_linear_uniform", "slcp", "gaussian_mixture",
                  "bernoulli_glm"]
SBIBM_FILES = SBIBM_NO_JULIA + ["sir", "lotka_volterra_ode"]
FLAT_FAST = ["two_moons", "gaussian_linear", "gaussian_linear_uniform", "slcp", "gaussian_mixture",
             "bernoulli_glm", "sir", "g_and_k", "lotka_volterra_sde", "lotka_volterra_ode"]


def sliced_ks_pvalue(a: torch.Tensor, b: torch.Tensor, num_projections: int = 8) -> float:
    """Smallest Bonferroni-corrected KS p-value over coordinates and random projections."""
    a, b = a.double().reshape(len(a), -1), b.double().reshape(len(b), -1)
    dirs = torch.randn(a.shape[1], num_projections, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pa, pb = torch.cat([a, a @ dirs], 1), torch.cat([b, b @ dirs], 1)
    ps = [scipy.stats.ks_2samp(pa[:, j].numpy(), pb[:, j].numpy()).pvalue for j in range(pa.shape[1])]
    return min(1.0, min(ps) * len(ps))


# -- registry ------------------------------------------------------------------------------
def test_every_design_name_is_registered():
    assert set(DESIGN_NAMES) <= set(simulators.names())


def test_entry_points_are_installed_for_every_simulator():
    from importlib.metadata import entry_points

    found = {ep.name for ep in entry_points(group=simulators.ENTRY_POINT_GROUP)}
    assert set(DESIGN_NAMES) <= found


def test_unknown_name_suggests_the_close_ones():
    with pytest.raises(ValueError, match="did you mean 'two_moons'"):
        simulators.get("two_moon")


@pytest.mark.parametrize("name", FLAT_FAST)
def test_task_object(name):
    task = simulators.get(name)
    theta = task.prior.sample((64,))
    assert theta.shape == (64, task.theta_dim)
    x = task.simulate(theta, seed=3)
    assert x.shape == (64,) + tuple(task.x_shape) and torch.isfinite(x).all()
    assert torch.equal(x, task.simulate(theta, seed=3))
    assert task.observed == ("x",) and task.num_observations == 10
    assert task.observation(1).shape == tuple(task.x_shape)
    assert task.true_parameters(1).shape == (task.theta_dim,)
    ref = task.reference_samples(1)
    if name in SBIBM_FILES:
        assert ref.shape == (10_000, task.theta_dim) and torch.isfinite(ref).all()
    data = ib.simulate(task.model, 32, observed=task.observed, seed=0, progress=False)
    assert data["theta"].shape == (32, task.theta_dim) and data["x"].shape == (32,) + tuple(task.x_shape)
    with pytest.raises(ValueError, match="observation number"):
        task.observation(11)
    with pytest.raises(ValueError, match=r"theta must have shape"):
        task.simulate(torch.zeros(3, task.theta_dim + 1))


@pytest.mark.parametrize("name", SBIBM_NO_JULIA)
def test_simulator_matches_sbibms_own(name):
    import sbibm  # installed by the test set-up (`make test`): a missing sbibm fails here, it is not skipped
    ours = simulators.get(name)
    theirs = sbibm.get_task(name).get_simulator()
    for k in (1, 2):
        theta = ours.true_parameters(k).expand(2000, -1).contiguous()
        torch.manual_seed(k)
        x_theirs = theirs(theta)
        x_ours = ours.simulate(theta, seed=100 + k)
        p = sliced_ks_pvalue(x_ours, x_theirs)
        assert p > 1e-3, f"{name} at true parameters {k}: sliced KS p = {p:.2g}"


def test_sbibm_observations_lie_on_our_two_moons_crescent():
    """Each stored observation lies on the thin crescent our simulator draws at its true θ:
    among 20 000 simulations the nearest is within 0.005 (radial sd 0.01, arc spacing ~2e-5);
    a mirrored or shifted crescent would put it ~0.1 away."""
    task = simulators.get("two_moons")
    for k in range(1, 11):
        sims = task.simulate(task.true_parameters(k).expand(20_000, 2).contiguous(), seed=k)
        assert (sims - task.observation(k)).norm(dim=1).min() < 0.005


def test_gaussian_linear_reference_matches_the_analytic_posterior():
    task = GaussianLinear()
    for k in (1, 2, 3):
        ref = task.reference_samples(k).double()
        post = task.posterior(task.observation(k).double())
        se = post.base_dist.scale / math.sqrt(len(ref))
        assert ((ref.mean(0) - post.base_dist.loc).abs() < 5 * se).all()
        assert ((ref.std(0) / post.base_dist.scale - 1).abs() < 0.05).all()


def test_bernoulli_glm_design_matrix_is_sbibms():
    from simulators.base import sbibm_file

    theirs = torch.load(sbibm_file("bernoulli_glm", "design_matrix.pt"), weights_only=True)
    ours = simulators.get("bernoulli_glm").design_matrix
    assert torch.equal(ours, theirs)


def test_bernoulli_glm_summaries_are_sbibms_conv1d():
    """sbibm's summaries (spike count and conv1d STA) equal our y @ X for any spike train."""
    from simulators.base import sbibm_file

    stimulus = torch.load(sbibm_file("bernoulli_glm", "stimulus_I.pt"), weights_only=True)
    task = simulators.get("bernoulli_glm")
    y = (torch.rand(20, 100, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    sta = torch.nn.functional.conv1d(y[:, None], stimulus.reshape(1, 1, -1), padding=8)[:, 0, -9:]
    assert torch.allclose(y @ task.design_matrix, torch.cat([y.sum(1, keepdim=True), sta], 1), atol=1e-5)


def test_lotka_volterra_ode_is_consistent_with_sbibms_observations():
    """sbibm's observations are LogNormal(log u(θ), 0.1) at their true θ: pooled over the 10
    observations (200 values) the log-residual sd must be 0.1 within 15 % and the mean ≈ 0."""
    task = LotkaVolterraODE()
    theta = torch.stack([task.true_parameters(k) for k in range(1, 11)])
    x = torch.stack([task.observation(k) for k in range(1, 11)]).double()
    res = x.log() - task.solve(theta).clamp(1e-10, 1e4).log()
    assert abs(res.std().item() - 0.1) < 0.015 and abs(res.mean().item()) < 0.03


def test_lotka_volterra_ode_solution_is_converged():
    task = LotkaVolterraODE()
    theta = task.prior.sample((200,))
    coarse = task.solve(theta)
    task.step_size = 0.0025
    assert torch.allclose(task.solve(theta), coarse, rtol=1e-4, atol=1e-6)


def test_sir_is_consistent_with_sbibms_observations():
    """Pearson χ² of the stored binomial counts against our solution at the true parameters,
    over the points with expected count ≥ 5 (sbibm's Julia solver differs slightly in the far
    tails, where counts are 0–2): p-value > 1e-3."""
    task = SIR()
    theta = torch.stack([task.true_parameters(k) for k in range(1, 11)])
    x = torch.stack([task.observation(k) for k in range(1, 11)]).double()
    p = task.solve(theta).clamp(0, 1)
    mean = task.total_count * p
    keep = mean >= 5
    chi2 = (((x - mean) ** 2) / (mean * (1 - p)))[keep].sum().item()
    dof = int(keep.sum())
    assert dof >= 20
    assert scipy.stats.chi2.sf(chi2, dof) > 1e-3


def test_g_and_k_with_g_and_k_zero_is_gaussian():
    task = simulators.get("g_and_k", summary="octiles", num_draws=20_000)
    x = task.simulate(torch.tensor([[1.0, 2.0, 0.0, 0.0]]), seed=0)[0]
    expected = 1.0 + 2.0 * torch.tensor(scipy.stats.norm.ppf(np.arange(1, 8) / 8), dtype=torch.float32)
    assert torch.allclose(x, expected, atol=0.06)


def test_g_and_k_robust_summaries():
    task = simulators.get("g_and_k")
    s = task.simulate(torch.tensor([[3.0, 1.0, 0.0, 0.0]]).expand(200, 4), seed=1)
    # Gaussian: median A, octile spread 2·0.674·B, zero skewness measure, kurtosis measure 1.23
    assert abs(s[:, 0].mean() - 3.0) < 0.02 and abs(s[:, 1].mean() - 1.349) < 0.02
    assert abs(s[:, 2].mean()) < 0.02 and abs(s[:, 3].mean() - 1.2331) < 0.02
    with pytest.raises(ValueError, match="summary"):
        simulators.get("g_and_k", summary="quartiles")


def test_missing_sbibm_files_give_an_install_hint(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sbibm" else real(name, *a))
    task = simulators.get("two_moons")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps sbibm==1\.1\.0"):
        task.observation(1)
    assert task.simulate(task.prior.sample((3,)), seed=0).shape == (3, 2)  # simulating needs no files
