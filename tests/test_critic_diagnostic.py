"""ib.diagnostics.critic_divergence: the ImplicitVI critic's estimate of how far the posterior is
from the truth agrees with the C2ST against exact draws, where the generator is badly off and
where it is close; and it refuses posteriors without a critic."""

import pytest
import torch

import implicitbayes as ib
from tests.exact import correlated_model, correlated_posterior

OBSERVATIONS = ([0.0, 0.0, 0.0], [2.0, -1.0, 1.0])
N = 4000
CRITIC = {"max_steps": 600}  # the critic's validation loss is flat by then on this model (≈ 25 s)


@pytest.fixture(scope="module")
def data():
    return ib.simulate(correlated_model, 3000, observed="x", seed=0, progress=False)


@pytest.fixture(scope="module")
def undertrained(data):
    """40 generator steps: its draws are far from the posterior (true C2ST ≈ 0.85–0.9); the critic
    is trained to convergence against it."""
    return ib.ImplicitVI(correlated_model, observed="x", training={"max_steps": 40},
                         critic_training=CRITIC).fit(data, seed=0, progress=False)


@pytest.fixture(scope="module")
def trained(data):
    return ib.ImplicitVI(correlated_model, observed="x", training={"max_steps": 300},
                         critic_training=CRITIC).fit(data, seed=0, progress=False)


def true_c2st(post, x, correction):
    m, cov = correlated_posterior(x)
    exact = torch.distributions.MultivariateNormal(m, cov).sample((N,))
    draws = post.sample(N, {"x": x}, seed=1, correction=correction)["theta"]
    return ib.diagnostics.c2st(draws, exact)


@pytest.mark.parametrize("xv", OBSERVATIONS)
def test_the_implied_c2st_matches_the_true_one_for_a_poor_generator(undertrained, xv):
    torch.manual_seed(0)
    x = torch.tensor(xv)
    d = ib.diagnostics.critic_divergence(undertrained, {"x": x}, num_samples=N)
    generator, corrected = true_c2st(undertrained, x, None), true_c2st(undertrained, x, "default")
    assert generator > 0.8, generator  # the premise: a poor generator
    assert abs(d["implied_c2st_generator"] - generator) < 0.1, (d, generator)
    # the corrected draws' estimate is optimistic where few candidates carry the weight (the critic
    # is least sure there), but it still flags them
    assert 0.58 < d["implied_c2st"] < corrected + 0.05, (d, corrected)
    # the correction is seen to help, and the KL of a poor generator is large
    assert d["implied_c2st"] < d["implied_c2st_generator"]
    assert d["kl_q_p"] > 1.0 and d["ess_fraction"] < 0.2, d


def test_a_close_posterior_is_reported_close(trained, undertrained):
    torch.manual_seed(0)
    x = torch.tensor(OBSERVATIONS[0])
    good = ib.diagnostics.critic_divergence(trained, {"x": x}, num_samples=N)
    bad = ib.diagnostics.critic_divergence(undertrained, {"x": x}, num_samples=N)
    truth = true_c2st(trained, x, None)
    assert truth < 0.6, truth  # the premise
    assert good["implied_c2st_generator"] < 0.6 and abs(good["implied_c2st_generator"] - truth) < 0.05, (good, truth)
    assert good["ess_fraction"] > 0.7 and good["kl_q_p"] < 0.2, good
    assert good["implied_c2st_generator"] < bad["implied_c2st_generator"] - 0.2
    # a fixed seed gives the same estimate
    assert ib.diagnostics.critic_divergence(trained, {"x": x}, num_samples=N) == good


def test_posteriors_without_a_critic_and_bad_sizes_are_refused(data, undertrained):
    npe = ib.NPE(correlated_model, observed="x").fit(data, max_steps=5, seed=0, progress=False)
    with pytest.raises(TypeError, match="no ratio critic"):
        ib.diagnostics.critic_divergence(npe, {"x": torch.zeros(3)})
    plain = ib.ImplicitVI(correlated_model, observed="x", correction=None).fit(data, max_steps=5, seed=0,
                                                                               progress=False)
    with pytest.raises(ValueError, match="correction=None"):
        ib.diagnostics.critic_divergence(plain, {"x": torch.zeros(3)})
    with pytest.raises(ValueError, match="num_samples"):
        ib.diagnostics.critic_divergence(undertrained, {"x": torch.zeros(3)}, num_samples=10)
    with pytest.raises(ValueError, match="x"):
        ib.diagnostics.critic_divergence(undertrained, {"x": torch.zeros(4)})
