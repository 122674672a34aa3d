"""Hierarchical implicit models: shapes, local latents, and the exact reference posterior."""

import numpy as np
import scipy.stats
import torch

import implicitbayes as ib
import simulators


def test_hierarchical_gaussian_sites_and_shapes():
    task = simulators.get("hierarchical_gaussian")
    data = ib.simulate(task.model, 200, observed="x", seed=0, progress=False)
    assert data.latent_names == ("mu", "tau", "theta")
    assert data.site_shapes == {"mu": (), "tau": (), "theta": (8,), "x": (8, 5)}
    # x_nj − θ_n ~ N(0, 1): pooled over 8000 values
    assert abs((data["x"] - data["theta"][..., None]).std().item() - 1.0) < 0.03
    assert task.observation(1).shape == (8, 5)
    assert set(task.true_parameters(1)) == {"mu", "tau", "theta"}


def test_hierarchical_gaussian_reference_posterior_is_calibrated():
    """Simulation-based calibration of the exact sampler: for 300 datasets from the model, the
    rank of the true μ, τ and θ_1 among 99 posterior draws is uniform (χ² over 10 bins, p > 1e-3)."""
    task = simulators.get("hierarchical_gaussian")
    data = ib.simulate(task.model, 300, observed="x", seed=1, progress=False)
    ranks = {"mu": [], "tau": [], "theta": []}
    for i in range(300):
        post = task.posterior_samples(data["x"][i], num_samples=99, seed=i)
        ranks["mu"].append(int((post["mu"] < data["mu"][i]).sum()))
        ranks["tau"].append(int((post["tau"] < data["tau"][i]).sum()))
        ranks["theta"].append(int((post["theta"][:, 0] < data["theta"][i, 0]).sum()))
    for name, r in ranks.items():
        counts = np.bincount(np.asarray(r) // 10, minlength=10)
        assert scipy.stats.chisquare(counts).pvalue > 1e-3, (name, counts)


def test_reference_sampler_detects_a_wrong_posterior():
    """The calibration check above can fail: a posterior for the wrong data (shifted by 1) is caught."""
    task = simulators.get("hierarchical_gaussian")
    data = ib.simulate(task.model, 300, observed="x", seed=1, progress=False)
    r = [int((task.posterior_samples(data["x"][i] + 1.0, 99, seed=i)["mu"] < data["mu"][i]).sum()) for i in range(300)]
    assert scipy.stats.chisquare(np.bincount(np.asarray(r) // 10, minlength=10)).pvalue < 1e-3


def test_lotka_volterra_population():
    task = simulators.get("lotka_volterra_population", num_systems=4)
    data = ib.simulate(task.model, 50, observed="x", seed=0, progress=False)
    assert data.site_shapes == {"mu": (4,), "sigma": (4,), "log_theta": (4, 4), "x": (4, 9)}
    assert torch.isfinite(data["x"]).all()
    truth = task.true_parameters(1)
    assert torch.allclose(truth["mu"], torch.tensor([0.01, 0.5, 1.0, 0.01]).log())
    assert task.observation(1).shape == (4, 9)
