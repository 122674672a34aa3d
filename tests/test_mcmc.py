"""The samplers of NLE and NRE. Where the chains start: resampled from prior draws weighted by the
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

from exact import gaussian_errors
from implicitbayes.infer import mcmc
from implicitbayes.infer.mcmc import (MCMCDiagnostics, PriorDraws, batched_log_joint, resampled_inits, run_nuts,
                                      slice_sample)
from implicitbayes.space import ParameterSpace

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


# ----------------------------------------------------------------------------- vectorized slice sampling
def _slice_draws(model, x_obs, n, seed, starts=None, chains=20, warmup=100, axes=None):
    prior = PriorDraws(model, ["x"])
    log_joint = batched_log_joint(pyro.poutine.condition(model, data={"x": x_obs}), prior)
    space = ParameterSpace.from_model(model, prior.latent)
    record = MCMCDiagnostics()
    if starts is None:
        torch.manual_seed(seed)
        starts = [{k: v[i] for k, v in prior(chains).items()} for i in range(chains)]
    draws = slice_sample(log_joint, space, starts, n, warmup_steps=warmup, seed=seed, device=torch.device("cpu"),
                         record=record, axes=axes)
    return draws, record


def positive_model():
    """log θ ~ N(0, 1), x ~ N(log θ, 0.5²): log θ | x ~ N(0.8 x, 0.2) exactly."""
    theta = pyro.sample("theta", dist.LogNormal(0.0, 1.0))
    return pyro.sample("x", dist.Normal(theta.log(), 0.5))


def ridge_model():
    """θ ~ N(0, I₂), x ~ N(θ₁ + θ₂, 0.5²): a posterior correlation of −0.8."""
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    return pyro.sample("x", dist.Normal(theta.sum(-1), 0.5))


def test_slice_sampling_gives_the_exact_posterior_through_a_constraint():
    """In the unconstrained coordinates the sampler must add the transform's log-Jacobian:
    without it log θ's posterior mean moves by its variance (0.2), 0.45 sd, and fails."""
    draws, record = _slice_draws(positive_model, torch.tensor(1.0), 2000, seed=0)
    log_theta = draws["theta"].log().double()
    shift, spread = abs(float(log_theta.mean()) - 0.8) / 0.2**0.5, abs(math.log(float(log_theta.var()) / 0.2))
    assert shift < 0.15 and spread < 0.15, (shift, spread)
    assert record.chains["theta"].shape == (20, 100) and record.summary()["divergences"] == [0] * 20


def test_too_few_draws_per_chain_for_r_hat_are_said_not_hidden():
    """50 draws on 20 chains leave 3 a chain, too few for split R-hat: the draws come back, the
    diagnostics give NaN and a warning says convergence was not checked (not Pyro's assertion)."""
    with pytest.warns(RuntimeWarning, match="3 draws per chain, too few for split R-hat"):
        draws, record = _slice_draws(positive_model, torch.tensor(1.0), 50, seed=0, warmup=10)
    assert draws["theta"].shape == (50,)
    summary = record.summary()
    assert summary["theta"]["r_hat"].isnan().all() and summary["divergences"] == [0] * 20


def test_slice_sampling_gives_the_exact_correlated_posterior():
    """A 1.5× variance scores spread 0.41, a 0.3-sd shift 0.3, a missed correlation ≥ 0.7."""
    a, x = torch.ones(2), torch.tensor(1.2)
    precision = torch.eye(2) + torch.outer(a, a) / 0.25
    covariance = torch.linalg.inv(precision)
    draws, record = _slice_draws(ridge_model, x, 2000, seed=1)
    errors = gaussian_errors(draws["theta"], covariance @ a * x / 0.25, covariance)
    assert errors["shift"] < 0.2 and errors["spread"] < 0.2, errors
    assert float(torch.as_tensor(record.summary()["theta"]["r_hat"]).max()) < 1.05


def narrow_ridge_model():
    """θ ~ N(0, I₄), x ~ N(Σθ, 0.05²): the posterior is 40 times narrower across the ridge
    Σθ = x than along it (the correlated rates of an ODE model look like this)."""
    theta = pyro.sample("theta", dist.Normal(torch.zeros(4), 1.0).to_event(1))
    return pyro.sample("x", dist.Normal(theta.sum(-1), 0.05))


@pytest.mark.filterwarnings("ignore:slice sampling")  # the unrotated chains have not mixed: that is the point
@pytest.mark.parametrize("rotate", [True, False])
def test_slice_sampling_turns_to_the_principal_axes_of_a_narrow_ridge(rotate, monkeypatch):
    """Coordinate-wise slice steps are as short as the ridge is narrow, so 100 sweeps leave the
    chains where they started along it (shift 0.95, spread 0.7, R-hat 5.8 measured); the sweeps
    along the warm-up's principal axes cross the ridge in a few steps (shift 0.03, spread 0.06)."""
    if not rotate:
        monkeypatch.setattr(mcmc, "SLICE_ROTATIONS", 1)
    a, x = torch.ones(4), torch.tensor(1.0)
    covariance = torch.linalg.inv(torch.eye(4) + torch.outer(a, a) / 0.05**2)
    draws, record = _slice_draws(narrow_ridge_model, x, 2000, seed=3)
    errors = gaussian_errors(draws["theta"], covariance @ a * x / 0.05**2, covariance)
    r_hat = float(torch.as_tensor(record.summary()["theta"]["r_hat"]).max())
    if rotate:
        assert errors["shift"] < 0.2 and errors["spread"] < 0.2 and r_hat < 1.05, (errors, r_hat)
    else:  # the defect the rotation guards against
        assert errors["shift"] > 0.5 and r_hat > 1.5, (errors, r_hat)


@pytest.mark.filterwarnings("ignore:slice sampling")  # chains in separate modes: R-hat is large by design
def test_slice_chains_share_the_modes_as_the_posterior_does():
    torch.manual_seed(2)
    starts = resampled_inits(PriorDraws(model, ["x"]), log_likelihood, 40)
    draws, _ = _slice_draws(model, torch.tensor(X_OBS), 40 * 25, seed=2, starts=starts, warmup=20)
    theta = draws["theta"]
    assert ((theta.abs() - X_OBS).abs() < 5 * NOISE).all()  # nothing between or beyond the modes
    assert float((theta > 0).float().mean()) == pytest.approx(P_POSITIVE, abs=0.15)  # 40 chains: binomial sd 0.06


@pytest.mark.filterwarnings("ignore:slice sampling")  # chains in separate modes: R-hat is large by design
@pytest.mark.parametrize("weighted", [True, False])
def test_a_resumed_slice_run_carries_a_population_to_the_new_posterior(weighted):
    """Resample-move (``SliceResume``): a population of an old posterior with both modes at 50/50,
    weighted by new over old density, starts chains that share the modes as the new posterior
    does (p₊ ≈ 0.82) after a quarter of the warm-up, along the old run's axes. Unweighted, the
    chains keep the old 50/50 split — they never cross between modes — and the test shows it."""
    gen = torch.Generator().manual_seed(3)
    sign = torch.where(torch.rand(4000, generator=gen) < 0.5, -1.0, 1.0)
    old = sign * X_OBS + NOISE * torch.randn(4000, generator=gen)
    old_log = torch.logsumexp(torch.stack([dist.Normal(m, NOISE).log_prob(old) for m in (X_OBS, -X_OBS)]), 0) - math.log(2)
    new_log = dist.Normal(1.0, 2.0).log_prob(old) + log_likelihood({"theta": old})
    resume = mcmc.SliceResume({"theta": old}, new_log - old_log if weighted else torch.zeros(4000),
                              (torch.eye(1), torch.tensor([2 * NOISE])))
    assert resume.effective_size() > (1000 if weighted else 3999)
    torch.manual_seed(4)
    starts = resume.starts(80)
    draws, record = _slice_draws(model, torch.tensor(X_OBS), 80 * 25, seed=4, starts=starts, axes=resume.axes,
                                 warmup=round(mcmc.RESUME_WARMUP_FRACTION * mcmc.DEFAULT_WARMUP["slice"]))
    theta = draws["theta"]
    share = float((theta > 0).float().mean())
    assert ((theta.abs() - X_OBS).abs() < 5 * NOISE).all()
    # within the positive mode: the exact mode is N(≈ 3, ≈ 0.2²) (its prior slope moves it by 0.005)
    positive = theta[theta > 0]
    assert abs(float(positive.mean()) - X_OBS) < 0.05 and abs(float(positive.std()) / NOISE - 1) < 0.15
    if weighted:  # 80 chains: binomial sd 0.043
        assert share == pytest.approx(P_POSITIVE, abs=0.13)
    else:
        assert abs(share - 0.5) < 0.13 and abs(share - P_POSITIVE) > 0.13
