"""NRE with NUTS (and slice sampling) through the ratio handler, and ABC (rejection, SMC), on a 2-D Gaussian model
with a known posterior: θ ~ N(0, I), x | θ ~ N(θ, 0.5² I) ⇒ θ | x ~ N(0.8 x, 0.2 I)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import implicitbayes as ib
from implicitbayes.handlers import replace_likelihood

X = torch.tensor([0.6, -0.4])
POST_MEAN, POST_SD = 0.8 * X, math.sqrt(0.2)


def simulator(theta):
    return theta + 0.5 * torch.randn_like(theta)


def model():
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    return pyro.sample("x", ib.Implicit(simulator, theta, event_shape=(2,)))


def check(draws, mean_tol=0.15, sd_tol=0.2):
    assert ((draws.mean(0) - POST_MEAN).abs() < mean_tol).all(), draws.mean(0)
    assert ((draws.std(0) / POST_SD - 1).abs() < sd_tol).all(), draws.std(0)


@pytest.fixture(scope="module")
def data():
    return ib.simulate(model, 4000, observed="x", seed=0, progress=False)


def test_ratio_handler_with_the_exact_ratio_gives_the_exact_posterior():
    """With the true log-ratio log N(x; θ, 0.25) − log N(x; 0, 1.25), NUTS on the handled model
    samples the analytic posterior: the handler itself is exact."""
    def exact_ratio(latents, observed):
        th = latents["theta"]
        return (dist.Normal(th, 0.5).log_prob(observed["x"]).sum(-1)
                - dist.Normal(0.0, math.sqrt(1.25)).log_prob(observed["x"]).sum(-1))

    handled = replace_likelihood(model, exact_ratio, {"x": X}, ["theta"])
    torch.manual_seed(0)
    mcmc = pyro.infer.MCMC(pyro.infer.NUTS(handled), num_samples=1500, warmup_steps=300, disable_progbar=True)
    mcmc.run()
    check(mcmc.get_samples()["theta"], mean_tol=0.08, sd_tol=0.1)


def test_nre_with_nuts_matches_the_posterior(data):
    post = ib.NRE(model, observed="x", num_chains=2, warmup=200).fit(data, seed=0, progress=False)
    draws = post.sample(1000, X, seed=1)["theta"]
    assert draws.shape == (1000, 2)
    check(draws)
    assert post.chains["theta"].shape == (2, 500, 2)
    assert post.diagnostics()["theta"]["r_hat"].max() < 1.05
    slice_draws = post.sample(1000, X, seed=1, sampler="slice")["theta"]  # the same posterior, another kernel
    check(slice_draws)
    assert post.chains["theta"].shape == (20, 50, 2) and post.diagnostics()["theta"]["r_hat"].max() < 1.05


def test_rejection_abc(data):
    post = ib.ABC(model, observed="x", algorithm="rejection", quantile=0.05).fit(data, observation=X, progress=False)
    draws = post.sample(2000, seed=0)["theta"]
    check(draws, sd_tol=0.3)  # a finite tolerance widens the posterior a little
    assert post.training_summary["simulations"] == 4000


def test_smc_abc_tightens_the_tolerance_and_matches_the_posterior():
    post = ib.ABC(model, observed="x", num_particles=500, num_simulations=30_000, batch_size=2000).fit(
        observation=X, seed=0, progress=False)
    eps = [h["epsilon"] for h in post.history]
    assert len(eps) >= 3 and all(b < a for a, b in zip(eps, eps[1:]))
    check(post.sample(2000, seed=0)["theta"], sd_tol=0.25)
    with pytest.raises(ValueError, match="not amortised"):
        post.sample(10, X + 1)


def test_abc_argument_errors(data):
    with pytest.raises(ValueError, match="algorithm"):
        ib.ABC(model, observed="x", algorithm="mcmc")
    with pytest.raises(ValueError, match="needs a SimulationSet"):
        ib.ABC(model, observed="x", algorithm="rejection").fit(observation=X)
    with pytest.raises(ValueError, match="shape"):
        ib.ABC(model, observed="x", algorithm="rejection").fit(data, observation=torch.zeros(3))
