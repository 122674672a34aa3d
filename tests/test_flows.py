"""Every conditional flow through the same checks (one table, as zuko does).

Per kind, with and without the affine first layer (``affine_first``, NPE's default), and NSF with
splines started at the identity (``spline_init``, NPE's default): invertibility (≤ 1e-4), log|det J| against the autograd Jacobian, then a fit of the
conditional Gaussian θ | c ~ N(A c + b, Σ) in 2-D (600 steps on 4000 pairs) to
KL(p ‖ q) < 0.05 on held-out pairs, and normalisation of the fitted density (grid integral
over [−7, 7]² at two contexts within 2 % of 1).
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F

from implicitbayes.nn import (FLOWS, FlowDistribution, LinearResidual, build_flow, draw, flow_log_prob, inverted_layers,
                              short_softmax, widened)

A = torch.tensor([[1.0], [-0.5]])
B = torch.tensor([0.5, -0.3])
L = torch.tensor([[0.6, 0.0], [0.4, 0.5]])  # Σ = L Lᵀ: correlated, det ≠ 1


def target(c):
    return dist.MultivariateNormal(c @ A.T + B, scale_tril=L)


def pairs(n, seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, 1, generator=g)
    theta = c @ A.T + B + torch.randn(n, 2, generator=g) @ L.T
    return c, theta


@pytest.mark.parametrize("kind, affine_first, spline_init",
                         [(k, a, None) for k in FLOWS for a in (False, True)] + [("nsf", True, 1e-3)])
def test_invertibility_and_log_det(kind, affine_first, spline_init):
    torch.manual_seed(0)
    flow = build_flow(kind, 3, 2, hidden_features=(32, 32), affine_first=affine_first,
                      spline_init=spline_init).double()
    flow(torch.randn(64, 2, dtype=torch.float64)).log_prob(torch.randn(64, 3, dtype=torch.float64))  # init ActNorm
    c = torch.randn(16, 2, dtype=torch.float64)
    x = torch.randn(16, 3, dtype=torch.float64)
    t = flow.transform(c)
    z = t(x)
    assert (t.inv(z) - x).abs().max() <= 1e-4
    ladj = t.log_abs_det_jacobian(x, z)
    for i in range(4):
        ti = flow.transform(c[i:i + 1])
        jac = torch.autograd.functional.jacobian(lambda v: ti(v[None])[0], x[i])
        assert torch.allclose(ladj[i], torch.linalg.slogdet(jac).logabsdet, atol=1e-6)


@pytest.mark.parametrize("kind, affine_first", [(k, False) for k in FLOWS] + [("nsf", True)])
def test_flow_log_prob_is_the_flows_density_to_the_bit(kind, affine_first):
    """What a training step evaluates (NPE's and NLE's loss): the density of ``flow(c)``, and of
    it under the linear residual's transform, the same numbers bit for bit (the pinned fits
    depend on it), and the same gradients."""
    torch.manual_seed(0)
    flow = build_flow(kind, 4, 3, hidden_features=(32, 32), affine_first=affine_first)
    flow(torch.randn(64, 3)).log_prob(torch.randn(64, 4))  # init ActNorm
    for p in flow.parameters():  # away from the identity that some layers start at
        p.data += 0.1 * torch.randn_like(p)
    c, u = torch.randn(50, 3), torch.randn(50, 4)
    residual = LinearResidual(3, 4)
    residual.fit(torch.randn(500, 3), torch.randn(500, 4) + torch.randn(500, 3) @ torch.randn(3, 4))
    for outer in ((), (residual.transform(c),)):
        want = torch.distributions.TransformedDistribution(flow(c), list(outer)).log_prob(u) if outer \
            else flow(c).log_prob(u)
        got = flow_log_prob(flow, u, c, outer)
        assert got.shape == (50,) and torch.equal(got, want)
        grads = [torch.autograd.grad(v.sum(), list(flow.parameters()), allow_unused=True) for v in (want, got)]
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("kind, affine_first", [(k, False) for k in FLOWS] + [("nsf", True), ("maf", True)])
def test_draw_gives_the_flows_own_draws(kind, affine_first):
    """``draw`` inverts masked autoregressive layers computing only what each pass settles: the
    draws of ``q.sample`` to rounding, for every flow, a batch of contexts, a transform on top,
    and a layer that settles several coordinates per pass."""
    torch.manual_seed(0)
    flow = build_flow(kind, 5, 3, hidden_features=(32, 32), affine_first=affine_first)
    for p in flow.parameters():  # away from the identity that some layers start at
        p.data += 0.1 * torch.randn_like(p)
    c = torch.randn(4, 3)
    q = flow(c)
    torch.manual_seed(1)
    want = q.sample((200,))
    torch.manual_seed(1)
    got = draw(q, (200,))
    assert got.shape == want.shape == (200, 4, 5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    shifted = torch.distributions.TransformedDistribution(q, [torch.distributions.AffineTransform(1.0, 2.0)])
    torch.manual_seed(1)
    torch.testing.assert_close(draw(shifted, (200,)), 1.0 + 2.0 * want, rtol=1e-4, atol=1e-4)


def test_draw_inverts_a_layer_that_settles_several_coordinates_per_pass():
    import zuko

    torch.manual_seed(0)
    layer = zuko.flows.MaskedAutoregressiveTransform(6, 2, passes=2, hidden_features=(16,))
    for p in layer.parameters():
        p.data += 0.1 * torch.randn_like(p)
    flow = zuko.flows.Flow([layer], zuko.flows.UnconditionalDistribution(zuko.distributions.DiagNormal,
                                                                         torch.zeros(6), torch.ones(6), buffer=True))
    q = flow(torch.randn(2))
    torch.manual_seed(3)
    want = q.sample((100,))
    torch.manual_seed(3)
    torch.testing.assert_close(draw(q, (100,)), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind, affine_first, spline_init",
                         [(k, False, None) for k in FLOWS] + [("nsf", True, None), ("nsf", True, 1e-3)])
def test_fits_a_conditional_gaussian_and_is_normalised(kind, affine_first, spline_init):
    torch.manual_seed(1)
    flow = build_flow(kind, 2, 1, hidden_features=(64, 64), affine_first=affine_first,
                      spline_init=spline_init)
    c, theta = pairs(4000, 0)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 600)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        idx = torch.randint(0, 4000, (256,), generator=g)
        loss = -flow(c[idx]).log_prob(theta[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    flow.eval()
    c_test, theta_test = pairs(4000, 1)
    with torch.no_grad():
        kl = (target(c_test).log_prob(theta_test) - flow(c_test).log_prob(theta_test)).mean().item()
        grid = torch.linspace(-7, 7, 281)
        xx, yy = torch.meshgrid(grid, grid, indexing="ij")
        pts = torch.stack([xx.flatten(), yy.flatten()], 1)
        cell = (grid[1] - grid[0]) ** 2
        masses = [(flow(torch.full((len(pts), 1), ci)).log_prob(pts).exp().sum() * cell).item() for ci in (-1.0, 0.8)]
    assert kl < 0.05, (kind, kl)
    assert all(abs(m - 1) < 0.02 for m in masses), (kind, masses)


def test_the_affine_first_layer_comes_first_and_leaves_the_rest_as_built():
    torch.manual_seed(0)
    plain = build_flow("nsf", 3, 2, hidden_features=(16,))
    torch.manual_seed(0)
    layered = build_flow("nsf", 3, 2, hidden_features=(16,), affine_first=True)
    first, *rest = layered.transform.transforms
    assert len(rest) == len(plain.transform.transforms)
    # the data side: θ passes the affine layer before the splines
    c, x = torch.randn(8, 2), torch.randn(8, 3)
    chained = plain.transform(c)(first(c)(x))
    assert torch.equal(layered.transform(c)(x), chained)
    for a, b in zip(rest, plain.transform.transforms):  # same initial weights as without the layer
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_spline_init_starts_every_spline_at_the_identity_and_leaves_the_rest_as_built():
    torch.manual_seed(0)
    plain = build_flow("nsf", 3, 2, hidden_features=(16, 16), affine_first=True)
    torch.manual_seed(0)
    started = build_flow("nsf", 3, 2, hidden_features=(16, 16), affine_first=True, spline_init=1e-7)
    first, *splines = started.transform.transforms
    c, x = torch.randn(32, 2), 3 * torch.randn(32, 3)
    # each spline is the identity up to O(1e-7), whatever the context ...
    for layer in splines:
        assert (layer(c)(x) - x).abs().max() < 1e-5
        assert layer.hyper[-1].weight.abs().max() <= 1e-7 and layer.hyper[-1].bias.abs().max() <= 1e-7
    # ... where PyTorch's default initialisation bends θ at random
    assert max((layer(c)(x) - x).abs().max() for layer in plain.transform.transforms[1:]) > 0.01
    # every other weight, the affine first layer's included, is as built without the option
    for (name, a), b in zip(plain.state_dict().items(), started.state_dict().values()):
        if name.startswith("transform.transforms.0.") or not name.endswith((f"hyper.{len(first.hyper) - 1}.weight",
                                                                           f"hyper.{len(first.hyper) - 1}.bias")):
            assert torch.equal(a, b), name


def test_short_softmax_matches_softmax_on_short_rows_and_leaves_every_other_call_alone():
    torch.manual_seed(0)
    a = 4 * torch.randn(500, 10, 8)
    a[0, 0] = torch.tensor([-math.inf] + [0.0] * 7)  # a bin of zero width
    with short_softmax():
        fast = F.softmax(a, dim=-1)
        other_dim = F.softmax(a, dim=1)
        wide = F.softmax(torch.randn(4, 100), -1)
        as_double = F.softmax(a, -1, dtype=torch.float64)
    ref = F.softmax(a, dim=-1)
    assert fast.dtype == a.dtype and (fast - ref).abs().max() < 1e-6 and fast[0, 0, 0] == 0
    assert torch.allclose(fast.sum(-1), torch.ones(500, 10))
    assert torch.equal(other_dim, F.softmax(a, dim=1)) and as_double.dtype == torch.float64
    assert wide.shape == (4, 100)
    # a spline flow draws the same values to rounding
    flow = build_flow("nsf", 4, 2, hidden_features=(16, 16), spline_init=None)
    c = torch.randn(1, 2)
    with torch.no_grad():
        torch.manual_seed(1)
        slow = flow(c).sample((2000,))
        torch.manual_seed(1)
        with short_softmax():
            quick = flow(c).sample((2000,))
    assert (quick - slow).abs().max() < 1e-4


def test_pyro_adapter():
    flow = build_flow("nsf", 2, 1, hidden_features=(16,))
    c = torch.randn(5, 1)
    d = FlowDistribution(flow(c))
    assert d.batch_shape == (5,) and d.event_shape == (2,) and d.has_rsample

    def model():
        with pyro.plate("rows", 5):
            return pyro.sample("theta", d)

    trace = pyro.poutine.trace(model).get_trace()
    value = trace.nodes["theta"]["value"]
    assert value.shape == (5, 2)
    assert torch.allclose(trace.log_prob_sum(), flow(c).log_prob(value).sum())
    draw = d.rsample()
    draw.sum().backward()  # gradients reach the flow's parameters
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.parameters())
    assert d.expand((3, 5)).sample().shape == (3, 5, 2)


def test_bad_flow_arguments():
    with pytest.raises(ValueError, match="kind"):
        build_flow("planar", 2)
    with pytest.raises(ValueError, match="features"):
        build_flow("maf", 0)
    with pytest.raises(ValueError, match="affine_first: expected True or False, got 'no'"):
        build_flow("nsf", 2, affine_first="no")
    for bad in (0, -1e-3, True, "small", math.inf):
        with pytest.raises(ValueError, match=f"spline_init: expected a positive number or None, got {bad!r}"):
            build_flow("nsf", 2, spline_init=bad)
    with pytest.raises(ValueError, match="spline_init: only the spline flow 'nsf'.*kind='realnvp'"):
        build_flow("realnvp", 2, spline_init=1e-3)


def test_a_widened_flow_is_a_normalised_density_with_wider_tails_that_its_draws_follow():
    """``widened(q, s)`` has the flow's transforms on a base spread s times: its draws follow its
    log_prob (importance weights q/g average to 1 over g's draws), and its spread is wider. None
    for a distribution that is not a flow on a diagonal-normal base."""
    torch.manual_seed(0)
    flow = build_flow("nsf", 3, 2, transforms=3, hidden_features=(16, 16))
    with torch.no_grad():  # a flow far from the identity
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    q = flow(torch.tensor([[0.5, -1.0]]))
    g = widened(q, 2.0)
    v = draw(q, (5,))[:, 0]
    assert torch.allclose(widened(q, 1.0).log_prob(v), q.log_prob(v))
    with torch.no_grad():
        u = draw(g, (200_000,))[:, 0]
        weights = (q.log_prob(u) - g.log_prob(u)).exp()
        assert abs(float(weights.mean()) - 1) < 0.02, float(weights.mean())
        assert (u.std(0) > 1.3 * draw(q, (200_000,))[:, 0].std(0)).all()
    assert widened(torch.distributions.Normal(0.0, 1.0), 2.0) is None


def test_inverted_layers_keep_the_density_of_their_own_draws():
    """The inverted flow is a flow: the log-density its one-pass draw reports is the density its
    D-pass evaluation gives at that draw; anything but a zuko Flow is refused by name."""
    torch.manual_seed(0)
    flow = inverted_layers(build_flow("nsf", 3, 2, transforms=2, hidden_features=(16,), affine_first=True))
    c = torch.randn(5, 2)
    q = flow(c)
    eps = torch.randn(5, 3)
    z, ladj = q.transform.inv.call_and_ladj(eps)
    assert torch.allclose(q.base.log_prob(eps) - ladj, q.log_prob(z), atol=1e-4)
    with pytest.raises(TypeError, match="flow: expected a zuko Flow"):
        inverted_layers(torch.nn.Linear(2, 2))
