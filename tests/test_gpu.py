"""Every method on a GPU (``device="cuda"``): simulations made there feed a fit there, the
parameters and draws stay there, the draws match the exact posterior with the tolerances the
CPU tests use, a GPU fit saved is loaded on the CPU with the same density, and the guide and
the diagnostics take a GPU posterior.

Marked ``gpu``: skipped where CUDA is not available (CI has none). On a GPU machine run
``pytest -m gpu`` or ``python benchmarks/gpu.py --tests``, which records the outcome.
The fits are short where the method's own CPU tests check its accuracy at its defaults:
here the device path is under test, and a draw made with a tensor left on the wrong device,
or from a generator of the other device, fails the bounds below as surely as a crash.
"""

import pyro
import pytest
import torch

import implicitbayes as ib
from exact import average, correlated_model, correlated_posterior, gaussian_errors
from models import hierarchical_model, normal_model

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
SHIFT, SPREAD = 0.22, 0.3  # tests/test_accuracy.py's checks for fits at the defaults
LOOSE_SHIFT, LOOSE_SPREAD = 0.5, 0.6  # short fits and short chains: still far from the prior's 2–3 / 1.5


@pytest.fixture(scope="module")
def observations():
    return ib.simulate(correlated_model, 3, observed="x", seed=99, progress=False)["x"]


@pytest.fixture(scope="module")
def data():
    return ib.simulate(correlated_model, 4000, observed="x", seed=0, device=DEVICE, progress=False)


def errors(post, observations, n=20_000, **options) -> dict[str, float]:
    """Shift and spread of the draws against the exact posterior, averaged over the observations
    (given as CPU tensors, as a user holds them); every draw must come back on the GPU."""
    out = []
    for x in observations:
        draws = post.sample(n, x, seed=1, **options)["theta"]
        assert draws.device.type == "cuda" and torch.isfinite(draws).all()
        out.append(gaussian_errors(draws.cpu(), *correlated_posterior(x)))
    return average(out)


def on_gpu(module: torch.nn.Module) -> bool:
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(t.device.type == "cuda" for t in tensors)


def test_simulations_are_made_on_the_gpu(data):
    assert data["x"].device.type == "cuda" and data["theta"].device.type == "cuda"
    again = ib.simulate(correlated_model, 4000, observed="x", seed=0, device=DEVICE, progress=False)
    assert torch.equal(data["x"], again["x"])


@pytest.fixture(scope="module")
def fits(data):
    cache = {}

    def fit(name):
        if name not in cache:
            method = {"NPE": lambda: ib.NPE(correlated_model, observed="x", device=DEVICE),
                      "ImplicitVI": lambda: ib.ImplicitVI(correlated_model, observed="x", device=DEVICE)}[name]()
            cache[name] = method.fit(data, seed=0, progress=False)
        return cache[name]

    return fit


@pytest.mark.parametrize("name", ["NPE", "ImplicitVI"])
def test_a_gpu_fit_at_the_defaults_matches_the_exact_posterior(fits, observations, name):
    post = fits(name)
    assert on_gpu(post)
    e = errors(post, observations)
    assert e["shift"] < SHIFT and e["spread"] < SPREAD, e


@pytest.mark.parametrize("family, steps", [("flow_matching", 1000), ("score", 1000), ("consistency", 3000)])
def test_continuous_time_families_train_and_sample_on_the_gpu(data, observations, family, steps):
    post = ib.ImplicitVI(correlated_model, observed="x", family=family, device=DEVICE).fit(
        data, max_steps=steps, seed=0, progress=False)
    assert on_gpu(post)
    for correction in ("default", None):
        e = errors(post, observations[:2], n=4000, correction=correction)
        assert e["shift"] < LOOSE_SHIFT and e["spread"] < LOOSE_SPREAD, (correction, e)


@pytest.mark.parametrize("name", ["NRE", "NLE"])
def test_nuts_on_a_learned_ratio_or_likelihood_runs_on_the_gpu(data, observations, name):
    post = getattr(ib, name)(correlated_model, observed="x", device=DEVICE).fit(data, max_steps=600, seed=0,
                                                                                progress=False)
    assert on_gpu(post)
    e = errors(post, observations[:1], n=400, num_chains=2, warmup_steps=200)
    assert e["shift"] < LOOSE_SHIFT and e["spread"] < LOOSE_SPREAD, e
    assert post.diagnostics() is not None


def test_abc_simulates_and_selects_on_the_gpu(observations):
    out = []
    for x in observations:
        post = ib.ABC(correlated_model, observed="x", device=DEVICE).fit(observation=x, seed=0, progress=False)
        draws = post.sample(20_000, seed=1)["theta"]
        assert draws.device.type == "cuda"
        out.append(gaussian_errors(draws.cpu(), *correlated_posterior(x)))
    e = average(out)
    assert e["shift"] < SHIFT and e["spread"] < SPREAD, e


@pytest.mark.parametrize("local", ["implicit", "flow"])
def test_lfvi_fits_a_hierarchical_model_on_the_gpu(local):
    x = 0.3 + 0.1 * torch.arange(12.0).reshape(4, 3) / 12
    post = ib.LFVI(hierarchical_model, observed="x", num_particles=8, local=local, device=DEVICE).fit(
        observation=x, max_steps=300, seed=0, progress=False)
    assert on_gpu(post)
    draws = post.sample(2000, seed=1)
    assert draws["mu"].device.type == "cuda" and draws["z"].shape == (2000, 4)
    assert torch.isfinite(draws["mu"]).all() and torch.isfinite(draws["z"]).all()
    # the groups' data sit at 0.3–0.4: the global and local draws move there from the prior's 0
    assert 0.0 < float(draws["mu"].mean()) < 0.6 and 0.1 < float(draws["z"].mean()) < 0.6


def test_sequential_rounds_simulate_and_train_on_the_gpu():
    x = torch.tensor([0.4, -0.3])
    npe = ib.NPE(normal_model, observed="x", device=DEVICE, training={"patience": 20})
    post = ib.sequential(npe, observation={"x": x}, num_simulations=2000, rounds=2, seed=0, progress=False)
    assert [r["simulations"] for r in post.rounds] == [1000, 1000] and 0 < post.rounds[1]["prior_mass"] < 1
    draws = post.sample(20_000, seed=1)["theta"]
    assert draws.device.type == "cuda"
    e = gaussian_errors(draws.cpu(), 0.8 * x, 0.2 * torch.eye(2))
    assert e["shift"] < SHIFT and e["spread"] < SPREAD, e


@pytest.mark.parametrize("name", ["NPE", "ImplicitVI"])
def test_a_gpu_fit_saved_is_loaded_on_the_cpu(fits, observations, tmp_path, name):
    post = fits(name)
    post.save(tmp_path / name)
    back = ib.load(tmp_path / name, device="cpu")
    assert all(t.device.type == "cpu" for t in [*back.parameters(), *back.buffers()])
    x = observations[0]
    if name == "NPE":  # the same density on both devices
        theta = {"theta": correlated_posterior(x)[0] + 0.3 * torch.randn(50, 3, generator=torch.Generator().manual_seed(0))}
        gpu = post.log_prob({"theta": theta["theta"].to(DEVICE)}, x).cpu()
        assert torch.allclose(back.log_prob(theta, x), gpu, atol=1e-3), (back.log_prob(theta, x) - gpu).abs().max()
    draws = back.sample(20_000, x, seed=1)["theta"]
    assert draws.device.type == "cpu"
    e = gaussian_errors(draws, *correlated_posterior(x))
    assert e["shift"] < SHIFT and e["spread"] < SPREAD, e


def test_the_guide_and_the_diagnostics_take_a_gpu_posterior(fits, observations):
    post = fits("ImplicitVI")
    x = observations[0]
    trace = pyro.poutine.trace(post.as_guide(x)).get_trace()
    assert trace.nodes["theta"]["value"].device.type == "cuda"
    with pyro.plate("draws", 100, dim=-1):
        batched = pyro.poutine.trace(post.as_guide(x)).get_trace()
    assert batched.nodes["theta"]["value"].shape == (100, 3)
    # the critic's own estimate of the distance to the truth: near 0.5 for a fit at the defaults
    divergence = ib.diagnostics.critic_divergence(post, x, num_samples=4000)
    assert 0.5 <= divergence["implied_c2st"] < 0.6, divergence
    # ArviZ: the posterior predictive simulates through the user's model (its prior on the CPU)
    idata = ib.diagnostics.to_inference_data(post, x, num_samples=500, model=correlated_model)
    assert idata.posterior["theta"].shape[:2] == (1, 500) and idata.posterior_predictive["x"].shape[:2] == (1, 500)
