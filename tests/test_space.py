"""ParameterSpace: flat vectors, supports and Jacobians of the constrained ⇄ unconstrained maps."""

import pyro
import pyro.distributions as dist
import pytest
import torch

import implicitbayes as ib


def mixed_model():
    a = pyro.sample("a", dist.Uniform(-2.0, 3.0))
    pyro.sample("b", ib.LogUniform(torch.full((3,), 0.01), torch.full((3,), 5.0)).to_event(1))
    pyro.sample("c", dist.HalfNormal(torch.ones(2)).to_event(1))
    pyro.sample("d", dist.Dirichlet(torch.ones(4)))
    with pyro.plate("groups", 3):
        e = pyro.sample("e", dist.Normal(a, 1.0))
        return pyro.sample("x", ib.Implicit(lambda t: t + torch.randn_like(t), e, event_shape=()))


@pytest.fixture
def space():
    return ib.ParameterSpace.from_model(mixed_model, ["a", "b", "c", "d", "e"])


def test_dimensions(space):
    assert space.names == ("a", "b", "c", "d", "e")
    assert space.dim == 1 + 3 + 2 + 4 + 3
    assert space.unconstrained_dim == 1 + 3 + 2 + 3 + 3  # the 4-simplex has 3 free coordinates


def test_flatten_round_trip(space):
    data = ib.simulate(mixed_model, 50, observed="x", seed=0, progress=False)
    values = {n: data[n] for n in space.names}
    flat = space.flatten(values)
    assert flat.shape == (50, space.dim)
    back = space.unflatten(flat)
    assert all(torch.equal(back[n], values[n]) for n in space.names)
    u = space.to_unconstrained(values)
    again = space.to_constrained(u)
    assert all(torch.allclose(again[n], values[n], atol=1e-4, rtol=1e-4) for n in space.names)


def test_any_unconstrained_vector_lands_in_the_supports(space):
    u = 4 * torch.randn(2000, space.unconstrained_dim, generator=torch.Generator().manual_seed(0))
    v = space.to_constrained(u)
    assert ((v["a"] >= -2) & (v["a"] <= 3)).all()
    assert ((v["b"] >= 0.01) & (v["b"] <= 5.0)).all()
    assert (v["c"] > 0).all()
    assert torch.allclose(v["d"].sum(-1), torch.ones(2000), atol=1e-5) and (v["d"] >= 0).all()


def test_log_abs_det_jacobian_matches_autograd():
    def model():
        pyro.sample("a", dist.Uniform(-2.0, 3.0))
        pyro.sample("b", ib.LogUniform(torch.full((2,), 0.1), torch.full((2,), 5.0)).to_event(1))
        pyro.sample("c", dist.HalfNormal(1.0))

    space = ib.ParameterSpace.from_model(model, ["a", "b", "c"])
    u = torch.randn(1, space.unconstrained_dim, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda z: space.flatten(space.to_constrained(z[None]))[0], u[0])
    expected = torch.linalg.slogdet(jac).logabsdet
    assert torch.allclose(space.log_abs_det_jacobian(u)[0], expected, atol=1e-6)


def test_bad_inputs(space):
    with pytest.raises(ValueError, match="lack the latent sites"):
        space.flatten({"a": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"expected a flat tensor of shape \(n, 13\)"):
        space.unflatten(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="not in the model"):
        ib.ParameterSpace.from_model(mixed_model, ["zz"])


def test_discrete_latent_is_refused():
    def model():
        pyro.sample("k", dist.Categorical(torch.ones(3)))

    with pytest.raises(ValueError, match="discrete"):
        ib.ParameterSpace.from_model(model, ["k"])


def test_log_uniform_prior():
    d = ib.LogUniform(torch.tensor(0.01), torch.tensor(100.0))
    x = d.sample((20000,))
    assert x.min() >= 0.01 and x.max() <= 100.0
    # log10 x ~ U(-2, 2): mean 0, sd 4/sqrt(12) = 1.155 (se of mean ≈ 0.008)
    assert abs(x.log10().mean().item()) < 0.04 and abs(x.log10().std().item() - 1.1547) < 0.03
    assert torch.allclose(d.log_prob(torch.tensor(1.0)), -torch.log(torch.tensor(1.0)) - torch.log(torch.tensor(4 * 2.302585)), atol=1e-4)
    assert d.expand((3,)).sample().shape == (3,)
