"""Embeddings, implicit generator and critic: shapes, invariances, support, devices."""

import pyro
import pyro.distributions as dist
import pytest
import torch

import implicitbayes as ib
from implicitbayes.nn import (CausalConvEmbedding, Critic, DeepSets, Flatten, GRUEmbedding, ImplicitGenerator,
                              LinearResidual, ResidualMLP, Standardize)


def test_standardize_fits_log_space_for_positive_features_and_is_saved():
    g = torch.Generator().manual_seed(0)
    positive = torch.exp(2 + 1.5 * torch.randn(5000, 1, generator=g))  # log-normal, heavy-tailed
    signed = 3 + 2 * torch.randn(5000, 1, generator=g)
    constant = torch.full((5000, 1), 4.0)
    data = torch.cat([positive, signed, constant], 1)
    s = Standardize((3,)).fit(data)
    assert s.use_log.tolist() == [True, False, True]  # strictly positive features, the constant too
    z = s(data)
    assert torch.allclose(z[:, :2].mean(0), torch.zeros(2), atol=1e-4)
    assert torch.allclose(z[:, :2].std(0), torch.ones(2), atol=1e-3) and z[:, 2].abs().max() < 1e-6
    again = Standardize((3,))
    again.load_state_dict(s.state_dict())
    assert torch.equal(again(data), z)
    with pytest.raises(ValueError, match="NaN"):
        Standardize((3,)).fit(torch.full((4, 3), float("nan")))
    with pytest.raises(ValueError, match="shape"):
        Standardize((3,)).fit(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="strictly positive"):
        Standardize((3,), log=True).fit(data - 10)


def test_linear_residual_recovers_a_linear_regression_and_maps_back():
    g = torch.Generator().manual_seed(0)
    n, weight, bias, sd = 20_000, torch.tensor([[1.0, -0.5], [0.0, 2.0], [0.3, 0.0]]), torch.tensor([0.5, -1.0]), \
        torch.tensor([0.2, 1.5])
    s = torch.randn(n, 3, generator=g)
    s[:, 2] = 0.0  # a constant feature (standardised to zero): the ridge keeps the system solvable
    u = s @ weight + bias + sd * torch.randn(n, 2, generator=g)
    lin = LinearResidual(3, 2).fit(s, u)
    # least squares: coefficients within a few standard errors (sd/√n ≈ 0.01), the constant's at zero
    assert torch.allclose(lin.weight[:2], weight[:2], atol=0.05) and lin.weight[2].abs().max() < 1e-6
    assert torch.allclose(lin.bias, bias, atol=0.05) and torch.allclose(lin.scale, sd, rtol=0.03)
    r = lin(s, u)
    assert torch.allclose(r.mean(0), torch.zeros(2), atol=0.02) and torch.allclose(r.std(0), torch.ones(2), atol=0.02)
    back = lin.transform(s)
    assert torch.allclose(back(r), u, atol=1e-4)
    assert torch.allclose(back.log_abs_det_jacobian(r, u), sd.log().sum().expand(n), atol=0.05)
    again = LinearResidual(3, 2)
    again.load_state_dict(lin.state_dict())
    assert torch.equal(again(s, u), r)
    # the residuals' shape: Gaussian here (skewness and excess kurtosis ≈ 0, standard errors
    # √(6/n) ≈ 0.017 and √(24/n) ≈ 0.035); Laplace noise has excess kurtosis 3, exponential skewness 2
    skew, kurt = lin.shape_moments(s, u)
    assert skew.abs().max() < 0.07 and kurt.abs().max() < 0.15
    torch.manual_seed(1)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((n, 1))
    skew, kurt = LinearResidual(3, 1).fit(s, s[:, :1] + laplace).shape_moments(s, s[:, :1] + laplace)
    assert skew.abs().item() < 0.15 and kurt.item() == pytest.approx(3.0, abs=0.6)
    expo = torch.distributions.Exponential(1.0).sample((n, 1))
    skew, _ = LinearResidual(3, 1).fit(s, expo).shape_moments(s, expo)
    assert skew.item() == pytest.approx(2.0, abs=0.3)
    # a constant coordinate: its moments are 0, not NaN (0/0)
    constant = torch.cat([u[:, :1], torch.zeros(n, 1)], 1)
    skew, kurt = LinearResidual(3, 2).fit(s, constant).shape_moments(s, constant)
    assert torch.isfinite(skew).all() and torch.isfinite(kurt).all() and skew[1] == 0 and kurt[1] == 0
    # a coordinate the observation determines exactly: its residual sd is floored, not zero
    exact = LinearResidual(3, 1).fit(s, s[:, :1] * 2)
    assert exact.scale.item() == pytest.approx(LinearResidual.SCALE_FLOOR)
    with pytest.raises(ValueError, match="expected s"):
        LinearResidual(3, 2).fit(s[:, :2], u)
    with pytest.raises(ValueError, match="NaN"):
        LinearResidual(3, 2).fit(s, torch.full_like(u, float("nan")))


def test_embedding_shapes():
    y = torch.randn(7, 2, 151)
    assert CausalConvEmbedding(2, 16)(y).shape == (7, 16)
    assert GRUEmbedding(2, 16)(y).shape == (7, 16)
    assert ResidualMLP(10, 4)(torch.randn(7, 10)).shape == (7, 4)
    assert Flatten((3, 4))(torch.randn(7, 3, 4)).shape == (7, 12)
    assert DeepSets(5, 8)(torch.randn(7, 10, 5)).shape == (7, 8)
    for bad in (CausalConvEmbedding(2, 16), GRUEmbedding(2, 16), DeepSets(2, 8)):
        with pytest.raises(ValueError, match="expected"):
            bad(torch.randn(7, 2))


def test_causal_convolutions_do_not_look_ahead():
    torch.manual_seed(0)
    emb = CausalConvEmbedding(2, 8, layers=5)
    y = torch.randn(1, 2, 60)
    y2 = y.clone()
    y2[..., 40:] += 1.0
    a, b = emb.sequence_features(y), emb.sequence_features(y2)
    assert torch.allclose(a[..., :40], b[..., :40]) and not torch.allclose(a[..., 40:], b[..., 40:])


@pytest.mark.parametrize("pool", ["mean", "sum", "mean+max"])
def test_deepsets_is_permutation_invariant(pool):
    torch.manual_seed(0)
    emb = DeepSets(3, 6, pool=pool)
    x = torch.randn(4, 9, 3)
    assert torch.allclose(emb(x), emb(x[:, torch.randperm(9)]), atol=1e-6)


def bounded_model():
    pyro.sample("a", dist.Uniform(-1.0, 2.0))
    pyro.sample("b", ib.LogUniform(torch.full((2,), 0.1), torch.full((2,), 10.0)).to_event(1))


@pytest.mark.parametrize("injection", ["concat", "multiplicative", "both"])
def test_generator_samples_inside_the_prior_support(injection):
    torch.manual_seed(0)
    space = ib.ParameterSpace.from_model(bounded_model, ["a", "b"])
    gen = ImplicitGenerator(4, space.unconstrained_dim, noise_injection=injection, space=space, hidden=32, layers=3)
    with torch.no_grad():
        for p in gen.out.parameters():
            p.mul_(50.0)  # push outputs far into the tails: the map must still land inside
        draws = gen.sample(torch.randn(6, 4), 500)
    assert draws.shape == (6, 500, 3)
    assert ((draws[..., 0] >= -1) & (draws[..., 0] <= 2)).all()
    assert ((draws[..., 1:] >= 0.1) & (draws[..., 1:] <= 10)).all()
    # the draws depend on the noise: an implicit distribution, not a point
    assert draws.std(1).min() > 0
    u = gen.sample(torch.randn(6, 4), 3, constrained=False)
    assert u.shape == (6, 3, space.unconstrained_dim)


def test_generator_noise_skip_is_a_linear_path_from_noise_to_output():
    # θ = g(c, z) + A z: with the MLP's output layer zeroed, the draws are exactly A z, a Gaussian
    # N(0, A Aᵀ) whatever the context
    torch.manual_seed(0)
    gen = ImplicitGenerator(4, 3, noise_features=6, hidden=16, layers=2, noise_skip=True)
    assert gen.skip.weight.shape == (3, 6) and gen.skip.bias is None
    assert (gen.skip.weight == 0).all()  # starts as the MLP alone
    with torch.no_grad():
        gen.skip.weight.normal_()
        gen.out.weight.zero_()
        gen.out.bias.zero_()
        noise = torch.randn(5, 7, 6)
        torch.testing.assert_close(gen(torch.randn(5, 4), noise), noise @ gen.skip.weight.T)
    assert ImplicitGenerator(4, 3).skip is None  # off by default in the building block
    with pytest.raises(ValueError, match="noise_skip: expected True or False, got 1"):
        ImplicitGenerator(4, 3, noise_skip=1)


def test_generator_errors():
    with pytest.raises(ValueError, match="noise_injection"):
        ImplicitGenerator(2, 2, noise_injection="add")
    gen = ImplicitGenerator(2, 2, noise_features=3)
    with pytest.raises(ValueError, match="noise"):
        gen(torch.randn(4, 2), torch.randn(4, 5, 2))
    space = ib.ParameterSpace.from_model(bounded_model, ["a", "b"])
    with pytest.raises(ValueError, match="unconstrained"):
        ImplicitGenerator(2, 5, space=space)


@pytest.mark.parametrize("kind", ["joint", "projection"])
def test_critic_shapes_and_draws(kind):
    critic = Critic(3, 4, hidden=16, kind=kind)
    c, theta = torch.randn(5, 4), torch.randn(5, 3)
    assert critic(c, theta).shape == (5,)
    many = torch.randn(5, 7, 3)
    out = critic(c, many)
    assert out.shape == (5, 7)
    assert torch.allclose(out[:, 2], critic(c, many[:, 2]), atol=1e-6)


def test_spectral_norm_critic_is_lipschitz():
    torch.manual_seed(0)
    critic = Critic(2, 0, hidden=64, spectral_norm=True, activation=torch.nn.ReLU)
    for _ in range(20):  # power iterations converge during forward passes in training mode
        critic(torch.zeros(8, 0), torch.randn(8, 2))
    critic.eval()
    x = torch.randn(2000, 2, requires_grad=True)
    (grad,) = torch.autograd.grad(critic(torch.zeros(2000, 0), x).sum(), x)
    assert grad.norm(dim=1).max() <= 1.05


def test_blocks_move_with_to():
    emb = Standardize((3,)).fit(torch.rand(10, 3) + 1)
    assert all(b.device.type == "cpu" for b in emb.to("cpu").buffers())


@pytest.mark.gpu
def test_blocks_on_gpu():
    from implicitbayes.nn import build_flow

    gen = ImplicitGenerator(4, 2).cuda()
    assert gen.sample(torch.randn(3, 4, device="cuda"), 5).device.type == "cuda"
    flow = build_flow("nsf", 2, 4).cuda()
    assert flow(torch.randn(3, 4, device="cuda")).sample().device.type == "cuda"
    assert Critic(2, 4).cuda()(torch.randn(3, 4, device="cuda"), torch.randn(3, 2, device="cuda")).shape == (3,)


def test_standardize_spreads_a_mass_point_with_far_outliers():
    # 80 % of a summary at one value, 19 % near it, 1 % a thousand times further: plain z-scoring
    # squeezes the informative 19 % into ±0.05; the robust asinh step keeps them apart
    g = torch.Generator().manual_seed(0)
    bulk = torch.full((8000, 1), -0.06)
    signal = 0.2 * torch.rand(1900, 1, generator=g) - 0.06
    outliers = 300 + torch.rand(100, 1, generator=g)
    gauss = torch.randn(10_000, 1, generator=g)
    data = torch.cat([torch.cat([bulk, signal, outliers]), gauss], 1)
    s = Standardize((2,)).fit(data)
    assert s.use_asinh.tolist() == [True, False]
    z = s(data)
    assert z[8000:9900, 0].std() > 0.3  # the informative part is spread out
    assert torch.allclose(z.mean(0), torch.zeros(2), atol=1e-4) and torch.allclose(z.std(0), torch.ones(2), atol=1e-3)
    assert torch.allclose(s.inverse(z), data, rtol=1e-4, atol=1e-4)
    plain = Standardize((2,), robust=False).fit(data)
    assert plain(data)[8000:9900, 0].std() < 0.05
    legacy = {k: v for k, v in s.state_dict().items() if k not in ("use_asinh", "center", "spread")}
    old = Standardize((2,))
    old.load_state_dict(legacy)  # a file from before the robust step loads, with no asinh
    assert not old.use_asinh.any()
