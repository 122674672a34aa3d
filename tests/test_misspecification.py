"""ib.diagnostics.misspecification: calibrated under the model, and it flags data the model
cannot produce (a shift, inflated noise)."""

import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch

import implicitbayes as ib

TRIALS = 10


def trials_simulator(theta):
    """TRIALS noisy copies of θ: (n, TRIALS, 2)."""
    return theta[:, None, :] + 0.5 * torch.randn(theta.shape[0], TRIALS, 2)


def trials_model():
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    return pyro.sample("x", ib.Implicit(trials_simulator, theta, event_shape=(TRIALS, 2)))


@pytest.fixture(scope="module")
def fitted():
    train = ib.simulate(trials_model, 3000, observed="x", seed=0, progress=False)
    post = ib.NPE(trials_model, observed="x").fit(train, max_steps=800, seed=0, progress=False)
    fresh = ib.simulate(trials_model, 2200, observed="x", seed=1, progress=False)
    return post, fresh


def test_p_values_are_uniform_for_data_from_the_model(fitted):
    post, fresh = fitted
    data = ib.simulate(trials_model, 100, observed="x", seed=2, progress=False)["x"]
    p = torch.tensor([ib.diagnostics.misspecification(post, {"x": x}, fresh)["p_value"] for x in data])
    assert scipy.stats.kstest(p.numpy(), "uniform").pvalue > 0.01, p
    assert (p < 0.05).float().mean() < 0.15


def test_it_flags_a_shifted_observation_and_inflated_noise(fitted):
    post, fresh = fitted
    g = torch.Generator().manual_seed(5)
    theta = torch.randn(20, 2, generator=g)
    clean = theta[:, None, :] + 0.5 * torch.randn(20, TRIALS, 2, generator=g)
    shifted = clean + torch.tensor([0.0, 5.0])  # every trial: θ₂ 5 prior sd out
    noisy = theta[:, None, :] + 1.5 * torch.randn(20, TRIALS, 2, generator=g)  # three times the model's noise

    def p(x):
        return torch.tensor([ib.diagnostics.misspecification(post, {"x": v}, fresh)["p_value"] for v in x])

    assert (p(shifted) < 0.01).all()
    assert (p(noisy) < 0.01).float().mean() >= 0.6
    assert (p(clean) < 0.01).float().mean() <= 0.1  # the same parameters without the defect pass


def test_result_and_bad_input(fitted):
    post, fresh = fitted
    r = ib.diagnostics.misspecification(post, {"x": fresh["x"][0]}, fresh, num_reference=500, num_null=300)
    assert set(r) >= {"statistic", "p_value", "null", "bandwidth"} and r["null"].shape == (300,)
    assert 1 / 301 <= r["p_value"] <= 1
    with pytest.raises(ValueError, match="needs num_reference \\+ num_null = 3000 distinct ones"):
        ib.diagnostics.misspecification(post, {"x": fresh["x"][0]}, fresh, num_reference=2000, num_null=1000)
    with pytest.raises(TypeError, match="expected an ib.SimulationSet"):
        ib.diagnostics.misspecification(post, {"x": fresh["x"][0]}, {"x": fresh["x"]})
    with pytest.raises(ValueError, match=r"observed: site 'x' must have shape \(10, 2\), got \(5, 2\)"):
        ib.diagnostics.misspecification(post, {"x": fresh["x"][0, :5]}, fresh)
    abc = ib.ABC(trials_model, observed="x", num_particles=50, num_simulations=500).fit(
        observation={"x": fresh["x"][0]}, seed=0, progress=False)
    with pytest.raises(TypeError, match="ABCPosterior has no summary space"):
        ib.diagnostics.misspecification(abc, {"x": fresh["x"][0]}, fresh)


def test_nle_compares_in_its_standardised_data():
    """NLE's network reads θ, not the data; its standardisation of the data is the summary space."""
    fresh = ib.simulate(trials_model, 2200, observed="x", seed=1, progress=False)
    nle = ib.NLE(trials_model, observed="x").fit(fresh, max_steps=2, progress=False)  # the standardisation is fitted
    data = ib.simulate(trials_model, 100, observed="x", seed=2, progress=False)["x"]
    p = torch.tensor([ib.diagnostics.misspecification(nle, {"x": x}, fresh)["p_value"] for x in data])
    assert scipy.stats.kstest(p.numpy(), "uniform").pvalue > 0.01, p
    shifted = data[:20] + torch.tensor([0.0, 5.0])
    assert all(ib.diagnostics.misspecification(nle, {"x": x}, fresh)["p_value"] < 0.01 for x in shifted)


def plate_model(num_trials=TRIALS):
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("trials", num_trials):
        return pyro.sample("x", ib.Implicit(lambda t: t + 0.5 * torch.randn_like(t), theta, event_shape=(2,),
                                            param_event_dims=1))


def test_nle_observation_of_another_plate_size_than_the_simulations_is_refused():
    """NLE takes any number of trials (the plate), but the test compares like with like."""
    sims = ib.simulate(plate_model, 100, observed="x", seed=0, progress=False)
    nle = ib.NLE(plate_model, observed="x").fit(sims, max_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"observation: shape \(3, 2\), but the simulations' observed values have "
                                         r"shape \(10, 2\)"):
        ib.diagnostics.misspecification(nle, {"x": torch.zeros(3, 2)}, sims, num_reference=50, num_null=50)
