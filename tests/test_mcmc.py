"""Where the NUTS chains of NLE and NRE start: resampled from prior draws weighted by the
likelihood, so a multimodal posterior gets chains in each mode in proportion to its mass.

The model: θ ~ N(1, 2²), x | θ ~ N(|θ|, 0.2²), observed x = 3. The posterior has two modes at
θ ≈ ±3, far apart for NUTS (15 likelihood sd), and the prior gives the positive one the mass
p₊ = 1 / (1 + exp(−(16 − 4) / 8)) ≈ 0.818 (both modes have the same likelihood; the prior
densities at ±3 differ by exp(12 / 8)). Pyro's default start (uniform in (−2, 2)) sends a chain to
the nearer mode, so its chains split about 50/50 whatever the masses are.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from implicitbayes.infer.mcmc import MCMCDiagnostics, PriorDraws, resampled_inits, run_nuts

X_OBS, NOISE = 3.0, 0.2
P_POSITIVE = 1 / (1 + math.exp(-12 / 8))


def model():
    theta = pyro.sample("theta", dist.Normal(1.0, 2.0))
    return pyro.sample("x", dist.Normal(theta.abs(), NOISE))


def log_likelihood(latents):
    return dist.Normal(latents["theta"].abs(), NOISE).log_prob(torch.tensor(X_OBS))


def test_starting_points_are_resampled_in_proportion_to_the_posterior():
    torch.manual_seed(0)
    starts = resampled_inits(PriorDraws(model, ["x"]), log_likelihood, 400)
    theta = torch.stack([s["theta"] for s in starts])
    assert theta.shape == (400,)
    assert ((theta.abs() - X_OBS).abs() < 4 * NOISE).all()  # every start in a mode
    assert (theta > 0).float().mean() == pytest.approx(P_POSITIVE, abs=0.06)  # 3 binomial sd


@pytest.mark.filterwarnings("ignore:NUTS")  # chains in separate modes: R-hat is large by design
@pytest.mark.parametrize("resample", [True, False])
def test_nuts_chains_share_the_modes_as_the_posterior_does(resample):
    conditioned = pyro.poutine.condition(model, data={"x": torch.tensor(X_OBS)})
    inits = (lambda n: resampled_inits(PriorDraws(model, ["x"]), log_likelihood, n)) if resample else None
    draws = run_nuts(conditioned, ["theta"], 24 * 20, num_chains=24, warmup_steps=40, seed=1,
                     device=torch.device("cpu"), record=MCMCDiagnostics(), inits=inits)["theta"]
    share = float((draws > 0).float().mean())
    if resample:  # 24 chains: binomial sd 0.08
        assert share == pytest.approx(P_POSITIVE, abs=0.17)
    else:  # the defect the resampling guards against: chains split by where they started
        assert abs(share - P_POSITIVE) > 0.17
