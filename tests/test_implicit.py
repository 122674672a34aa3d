"""ib.Implicit: shapes under plates, looping simulators, errors, and Pyro integration."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicitbayes as ib
from tests.models import gaussian_model, hierarchical_model, numpy_model


def shift(theta):
    return theta + 1.0


def test_sample_outside_plates_is_one_draw():
    d = ib.Implicit(shift, torch.zeros(2), event_shape=(2,))
    assert d.batch_shape == () and d.event_shape == (2,)
    assert torch.equal(d.sample(), torch.ones(2))
    assert d.sample((5,)).shape == (5, 2)


def test_batch_shape_comes_from_nested_plates():
    with pyro.plate("outer", 3, dim=-2), pyro.plate("inner", 4, dim=-1):
        theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        x = pyro.sample("x", ib.Implicit(shift, theta, event_shape=(2,)))
    assert theta.shape == (3, 4, 2) and x.shape == (3, 4, 2)
    assert torch.allclose(x, theta + 1)


def test_global_scalar_parameter_broadcasts_into_a_plate():
    with pyro.plate("groups", 5):
        x = pyro.sample("x", ib.Implicit(lambda m: m[:, None] * torch.ones(1, 3), torch.tensor(2.0), event_shape=(3,)))
    assert x.shape == (5, 3) and torch.all(x == 2.0)


def test_param_event_dims_broadcast_a_global_vector_into_a_plate():
    mu = torch.tensor([1.0, 2.0])
    with pyro.plate("groups", 4):
        x = pyro.sample("x", ib.Implicit(shift, mu, event_shape=(2,), param_event_dims=1))
    assert x.shape == (4, 2) and torch.equal(x, (mu + 1).expand(4, 2))
    with pytest.raises(ValueError, match="do not broadcast"), pyro.plate("groups", 4):
        ib.Implicit(shift, torch.zeros(3, 2), event_shape=(2,), param_event_dims=1)


def test_vectorized_false_loops_over_a_numpy_simulator():
    with pyro.plate("n", 7):
        theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        x = pyro.sample("x", ib.Implicit(lambda t: np.asarray(t) * 2.0, theta, event_shape=(2,), vectorized=False))
    assert x.shape == (7, 2)
    assert x.dtype == theta.dtype and torch.allclose(x, 2 * theta)


def test_event_shape_is_probed_when_not_given():
    d = ib.Implicit(lambda t: torch.stack([t, t], -1), torch.zeros(3), batch_shape=(3,))
    assert d.event_shape == (2,) and d.sample().shape == (3, 2)


def test_expand_adds_batch_dimensions():
    d = ib.Implicit(shift, torch.zeros(2), event_shape=(2,)).expand((4,))
    assert d.batch_shape == (4,) and d.sample().shape == (4, 2)


def test_log_prob_raises_naming_the_site_and_the_methods():
    conditioned = pyro.condition(gaussian_model, data={"x": torch.zeros(2)})
    trace = pyro.poutine.trace(conditioned).get_trace()
    with pytest.raises(ib.IntractableLikelihoodError, match="site 'x'") as info:
        trace.log_prob_sum()
    for method in ("ImplicitVI", "NPE", "NRE", "ABC", "LFVI"):
        assert method in str(info.value)


def test_log_prob_raises_under_svi():
    guide = pyro.infer.autoguide.AutoNormal(pyro.condition(gaussian_model, data={"x": torch.zeros(2)}))
    svi = pyro.infer.SVI(pyro.condition(gaussian_model, data={"x": torch.zeros(2)}), guide,
                         pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO())
    with pytest.raises(ib.IntractableLikelihoodError, match="implicit"):
        svi.step()


def test_simulator_ignoring_the_batch_is_an_error():
    with pytest.raises(ValueError, match="vectorized=False"), pyro.plate("n", 5):
        pyro.sample("x", ib.Implicit(lambda t: t[0], torch.zeros(5, 2), event_shape=(2,)))


def test_wrong_event_shape_is_an_error():
    with pytest.raises(ValueError, match=r"expected event_shape=\(3,\)"):
        ib.Implicit(shift, torch.zeros(2), event_shape=(3,)).sample()


def test_non_tensor_output_is_an_error():
    with pytest.raises(TypeError, match="torch.Tensor"):
        ib.Implicit(lambda t: [1, 2], torch.zeros(2), event_shape=(2,)).sample()


def test_parameter_not_matching_the_plates_is_an_error():
    with pytest.raises(ValueError, match="parameter 0"), pyro.plate("n", 5):
        ib.Implicit(shift, torch.zeros(3, 2), event_shape=(2,))


def test_bad_simulator_and_flag():
    with pytest.raises(TypeError, match="callable"):
        ib.Implicit("not a function", torch.zeros(2))
    with pytest.raises(TypeError, match="vectorized"):
        ib.Implicit(shift, torch.zeros(2), vectorized="yes")


def test_latent_implicit_site_in_a_hierarchical_model():
    trace = pyro.poutine.trace(hierarchical_model).get_trace()
    assert trace.nodes["z"]["value"].shape == (4,)
    assert trace.nodes["x"]["value"].shape == (4, 3)


def test_vectorized_false_model_simulates():
    x = pyro.poutine.trace(numpy_model).get_trace().nodes["x"]["value"]
    assert x.shape == (3,)


@settings(max_examples=25, deadline=None)
@given(
    plate_sizes=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    param_event=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    out_event=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    sample_shape=st.lists(st.integers(1, 3), min_size=0, max_size=2),
)
def test_shapes_property(plate_sizes, param_event, out_event, sample_shape):
    """For any nesting of plates, parameter and output event shapes, sample() is
    ``sample_shape + plate batch shape + event_shape`` and the simulator sees one flat batch."""
    calls = []

    def sim(p):
        calls.append(p.shape)
        return p.reshape(p.shape[0], -1).sum(-1).reshape((p.shape[0],) + (1,) * len(out_event)).expand(
            (p.shape[0],) + tuple(out_event))

    batch = tuple(plate_sizes)
    from contextlib import ExitStack

    with ExitStack() as stack:
        for i, size in enumerate(plate_sizes):
            stack.enter_context(pyro.plate(f"p{i}", size, dim=-(len(plate_sizes) - i)))
        param = torch.randn(batch + tuple(param_event))
        d = ib.Implicit(sim, param, event_shape=tuple(out_event))
        x = d.sample(tuple(sample_shape))
    assert d.batch_shape == batch
    assert x.shape == tuple(sample_shape) + batch + tuple(out_event)
    n = int(np.prod(tuple(sample_shape) + batch))
    assert calls[-1] == (n,) + tuple(param_event)
    expected = param.reshape(batch + (-1,)).sum(-1)
    flat = x.reshape(tuple(sample_shape) + batch + (-1,))[..., 0] if out_event else x
    assert torch.allclose(flat, expected.expand(flat.shape), atol=1e-5)
