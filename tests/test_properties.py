"""Property-based tests (hypothesis): ``Implicit`` and ``simulate`` over batch shapes, event
shapes, nested plates, numbers of simulations and batch sizes.

The simulator is deterministic, x = 2θ + 1 broadcast over extra event dims, so every
simulation's x can be checked against its own θ: a misaligned plate, a transposed batch or a
mixed-up chunk shows up as a mismatch.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

import implicitbayes as ib  # noqa: E402

small = st.integers(min_value=1, max_value=3)
shapes = st.lists(small, min_size=0, max_size=2).map(tuple)


def expected_x(theta: torch.Tensor, extra: tuple) -> torch.Tensor:
    return (2 * theta + 1).reshape(theta.shape + (1,) * len(extra)).expand(theta.shape + extra)


def make_model(plates: tuple, theta_event: tuple, extra: tuple):
    def simulator(t):
        return expected_x(t, extra).clone()

    def model():
        stack = [pyro.plate(f"p{i}", size, dim=-(len(plates) - i)) for i, size in enumerate(plates)]
        for p in stack:
            p.__enter__()
        try:
            prior = dist.Normal(torch.zeros(theta_event), 1.0).to_event(len(theta_event))
            theta = pyro.sample("theta", prior)
            return pyro.sample("x", ib.Implicit(simulator, theta, event_shape=theta_event + extra))
        finally:
            for p in reversed(stack):
                p.__exit__(None, None, None)
    return model


@settings(max_examples=80, deadline=None)
@given(plates=shapes, theta_event=shapes, extra=shapes, sample_shape=shapes)
def test_implicit_sample_shape_and_values(plates, theta_event, extra, sample_shape):
    theta = torch.randn(plates + theta_event)
    d = ib.Implicit(lambda t: expected_x(t, extra).clone(), theta, event_shape=theta_event + extra,
                    batch_shape=plates, param_event_dims=len(theta_event))
    x = d.sample(sample_shape)
    assert x.shape == sample_shape + plates + theta_event + extra
    assert torch.equal(x, expected_x(theta, extra).expand(x.shape))
    with pytest.raises(ib.IntractableLikelihoodError):
        d.log_prob(x)


@settings(max_examples=60, deadline=None)
@given(plates=shapes, theta_event=shapes, extra=shapes, n=st.integers(1, 7), batch_size=st.integers(1, 5),
       seed=st.integers(0, 2**31))
def test_simulate_aligns_every_simulation(plates, theta_event, extra, n, batch_size, seed):
    model = make_model(plates, theta_event, extra)
    data = ib.simulate(model, n, observed="x", seed=seed, batch_size=batch_size, progress=False)
    assert len(data) == n and torch.equal(data.index, torch.arange(n))
    assert data["theta"].shape == (n,) + plates + theta_event
    assert data["x"].shape == (n,) + plates + theta_event + extra
    assert torch.equal(data["x"], expected_x(data["theta"], extra))
    # the result depends on seed and batch size only: again, and via a thread pool
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(2) as pool:
        again = ib.simulate(model, n, observed="x", seed=seed, batch_size=batch_size, executor=pool, progress=False)
    assert torch.equal(again["theta"], data["theta"]) and torch.equal(again["x"], data["x"])


@settings(max_examples=40, deadline=None)
@given(plates=shapes, theta_event=shapes, n=st.integers(2, 6))
def test_simulate_at_uses_the_given_latents(plates, theta_event, n):
    model = make_model(plates, theta_event, ())
    theta = torch.randn((n,) + plates + theta_event)
    from implicitbayes.simulate import simulate_at

    out = simulate_at(model, {"theta": theta}, observed="x")
    assert torch.equal(out["x"], expected_x(theta, ()))
