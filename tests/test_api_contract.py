"""The public API exactly as ../shared/DESIGN.md writes it (names, signatures, return shapes)."""

import inspect

import pyro
import pyro.distributions as dist
import torch

import implicitbayes as ib


def my_batched_simulator(theta):
    return theta + 0.1 * torch.randn_like(theta)


def model():
    theta = pyro.sample("theta", dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1))
    return pyro.sample("x", ib.Implicit(my_batched_simulator, theta, event_shape=(2,)))


def test_design_snippet_runs_as_written():
    data = ib.simulate(model, num_simulations=2_000, observed="x", seed=0, progress=False)
    assert isinstance(data, ib.SimulationSet)
    x_obs = torch.tensor([0.3, -0.2])
    for method in (ib.ImplicitVI, ib.NPE):
        posterior = method(model, observed="x").fit(data, max_steps=200, seed=0, progress=False)
        draws = posterior.sample(1000, {"x": x_obs})
        assert set(draws) == {"theta"} and draws["theta"].shape == (1000, 2)
        assert draws["theta"].abs().max() <= 1


def test_signatures():
    sim = inspect.signature(ib.simulate)
    assert list(sim.parameters) == ["model", "num_simulations", "observed", "model_args", "model_kwargs", "batch_size",
                                    "seed", "device", "executor", "store", "retries", "on_error", "progress"]
    assert sim.parameters["on_error"].default == "raise" and sim.parameters["retries"].default == 0
    imp = inspect.signature(ib.Implicit)
    assert list(imp.parameters)[:4] == ["simulator", "params", "event_shape", "vectorized"]
    for method in (ib.ImplicitVI, ib.NPE, ib.NRE, ib.NLE):
        params = inspect.signature(method).parameters
        assert list(params)[:4] == ["model", "observed", "model_args", "model_kwargs"]
        fit = inspect.signature(method.fit).parameters
        assert list(fit)[:7] == ["self", "data", "max_steps", "time_budget", "seed", "progress", "checkpoint"]
    for method in (ib.LFVI, ib.ABC):  # fitted to one observation: fit(data=None, *, observation, ...)
        params = inspect.signature(method).parameters
        assert list(params)[:4] == ["model", "observed", "model_args", "model_kwargs"]
        fit = inspect.signature(method.fit).parameters
        assert list(fit)[:2] == ["self", "data"] and fit["data"].default is None
        assert {"observation", "max_steps", "time_budget", "seed", "progress", "checkpoint"} <= set(fit)
    seq = inspect.signature(ib.sequential).parameters
    assert list(seq)[:7] == ["method", "observation", "num_simulations", "rounds", "seed", "store", "progress"]
    assert seq["rounds"].default == 5 and seq["progress"].default is True and seq["seed"].default is None
    tid = inspect.signature(ib.to_inference_data).parameters
    assert list(tid)[:2] == ["posterior", "observed"] and tid["num_samples"].default == 1000
    assert tid["posterior_predictive"].default is True and tid["num_samples"].kind is inspect.Parameter.KEYWORD_ONLY
    for name in ("c2st", "mmd", "sbc", "expected_coverage", "ppc", "misspecification"):
        assert callable(getattr(ib.diagnostics, name))
    assert list(inspect.signature(ib.diagnostics.misspecification).parameters)[:3] == ["posterior", "observation", "data"]
    for name in ("latent_names", "observed_names", "num_invalid"):
        assert hasattr(ib.simulate(model, 5, observed="x", seed=0, progress=False), name)
    assert callable(ib.SimulationSet.load) and callable(ib.load)
