"""Lotka–Volterra SDE and MJP: grid, policies (extinction, blow-up, event cap), exactness."""

import math
import warnings

import pytest
import torch

import implicitbayes as ib
import simulators
from simulators.lotka_volterra import THETA_STAR, lv_mjp, lv_sde, lv_summaries

STAR = torch.tensor(THETA_STAR)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_sde_grid_and_reproducibility():
    out = lv_sde(STAR.expand(10, 4), generator=gen(0))
    assert out.shape == (10, 2, 151)
    assert torch.equal(out[:, :, 0], torch.tensor([50.0, 100.0]).expand(10, 2))
    assert torch.equal(out, lv_sde(STAR.expand(10, 4), generator=gen(0)))
    assert lv_sde(STAR.expand(3, 4), T=2.0, record_every=0.5, dt=0.05).shape == (3, 2, 5)


def test_sde_starts_each_path_where_x0_says():
    """A pair starts every path there; an (n, 2) tensor one per path (the same noise either way)."""
    starts = torch.tensor([[50.0, 100.0], [5.0, 30.0], [0.0, 10.0]])
    out = lv_sde(STAR.expand(3, 4), x0=starts, T=2.0, generator=gen(0))
    assert torch.equal(out[:, :, 0], starts)
    assert torch.equal(out[0], lv_sde(STAR.expand(3, 4), T=2.0, generator=gen(0))[0])
    assert (out[2, 0] == 0).all()  # no predators at the start: none ever
    with pytest.raises(ValueError, match=r"x0: expected a pair or a tensor of shape \(3, 2\)"):
        lv_sde(STAR.expand(3, 4), x0=starts[:2])
    with pytest.raises(ValueError, match="x0: initial populations"):
        lv_sde(STAR.expand(3, 4), x0=-starts)


@pytest.mark.parametrize("bad, match", [
    (dict(T=1.0, record_every=0.3), "multiple of record_every"),
    (dict(dt=0.03), "multiple of dt"),
    (dict(on_blowup="clip"), "on_blowup"),
    (dict(max_population=-1.0), "max_population"),
])
def test_sde_rejects_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        lv_sde(STAR.expand(2, 4), **bad)


def test_rates_must_be_valid():
    with pytest.raises(ValueError, match="non-negative"):
        lv_sde(torch.tensor([[0.01, -0.5, 1.0, 0.01]]))
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        lv_mjp(torch.zeros(3))


@pytest.mark.parametrize("engine", [lv_sde, lv_mjp])
def test_extinction_is_absorbing_and_populations_stay_non_negative(engine):
    theta = torch.tensor([[0.01, 3.0, 0.5, 0.05]]).expand(200, 4)  # predators die fast
    out = engine(theta, T=10.0, generator=gen(1))
    assert (out >= 0).all()
    x = out[:, 0]
    extinct = (x == 0).cumsum(-1) > 0
    assert extinct[:, -1].float().mean() > 0.5
    assert (x[extinct] == 0).all(), "a population came back from 0"


@pytest.mark.parametrize("engine", [lv_sde, lv_mjp])
def test_blow_up_freezes_at_max_population_or_marks_nan(engine):
    # no predators, fast prey births: prey grows like 100·e^{7t}, past 1e4 by t ≈ 0.7
    theta = torch.tensor([[0.01, 0.5, 7.0, 0.01]]).expand(50, 4)
    frozen = engine(theta, x0=(0.0, 100.0), T=5.0, max_population=1e4, generator=gen(2))
    assert torch.isfinite(frozen).all() and frozen.max() <= 1e4
    assert (frozen[:, 1, -1] == frozen[:, 1, -10]).all(), "frozen paths must hold their state"
    marked = engine(theta, x0=(0.0, 100.0), T=5.0, max_population=1e4, on_blowup="nan", generator=gen(2))
    assert torch.isnan(marked[:, :, -1]).all() and torch.isfinite(marked[:, :, :3]).all()


def test_nan_policy_is_dropped_and_counted_by_simulate():
    task = simulators.get("lotka_volterra_sde", on_blowup="nan", T=10.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = ib.simulate(task.model, 300, observed="x", seed=0, progress=False)
    assert data.num_invalid > 0 and len(data) + data.num_invalid == 300
    assert any("NaN/inf" in str(w.message) for w in caught)


def test_sde_prior_predictive_is_finite_under_the_default_policy():
    task = simulators.get("lotka_volterra_sde")
    x = task.simulate(task.prior.sample((3000,)), seed=0)
    assert torch.isfinite(x).all()


def test_mjp_event_cap():
    capped = lv_mjp(STAR.expand(20, 4), max_events=500, generator=gen(3))
    # 500 events at ≈ 225 events per unit time: paths stop near t ≈ 2 and hold their state
    assert torch.isfinite(capped).all() and (capped[:, :, -1] == capped[:, :, -40]).all()
    marked = lv_mjp(STAR.expand(20, 4), max_events=500, on_blowup="nan", generator=gen(3))
    assert torch.isnan(marked[:, :, -1]).all() and torch.isfinite(marked[:, :, :5]).all()
    with pytest.raises(ValueError, match="max_events"):
        lv_mjp(STAR.expand(2, 4), max_events=0)


def test_mjp_prey_alone_is_an_exact_yule_process():
    """X = 0: Y(t) has mean Y0·e^{θ3 t} and variance Y0·e^{θ3 t}(e^{θ3 t} − 1) (n = 4000: 5 se)."""
    theta = torch.tensor([[0.01, 0.5, 0.1, 0.01]]).expand(4000, 4)
    y = lv_mjp(theta, x0=(0.0, 10.0), T=10.0, record_every=1.0, generator=gen(4))[:, 1, -1].double()
    e = math.exp(1.0)
    mean, var = 10 * e, 10 * e * (e - 1)
    assert abs(y.mean() - mean) < 5 * math.sqrt(var / 4000)
    assert abs(y.var() / var - 1) < 0.12


def test_mjp_predators_alone_die_binomially():
    """Y = 0: X(t) ~ Binomial(X0, e^{−θ2 t})."""
    theta = torch.tensor([[0.01, 0.2, 1.0, 0.01]]).expand(4000, 4)
    x = lv_mjp(theta, x0=(50.0, 0.0), T=5.0, record_every=1.0, generator=gen(5))[:, 0, -1].double()
    p = math.exp(-1.0)
    assert abs(x.mean() - 50 * p) < 5 * math.sqrt(50 * p * (1 - p) / 4000)
    assert abs(x.var() / (50 * p * (1 - p)) - 1) < 0.12


def test_sde_and_mjp_agree_at_theta_star():
    """The CLE approximates the MJP at these population sizes: means and sds of X and Y at
    t = 1, 2, 5 agree within 4 Monte-Carlo standard errors plus 3 % (approximation error);
    sds within 12 % (n = 1000 paths each)."""
    n = 1000
    sde = lv_sde(STAR.expand(n, 4), T=5.0, generator=gen(6)).double()
    mjp = lv_mjp(STAR.expand(n, 4), T=5.0, generator=gen(7)).double()
    for record in (5, 10, 25):
        for species in (0, 1):
            a, b = sde[:, species, record], mjp[:, species, record]
            se = math.sqrt((a.var() + b.var()) / n)
            assert abs(a.mean() - b.mean()) < 4 * se + 0.03 * b.mean(), (record, species)
            assert abs(a.std() / b.std() - 1) < 0.12, (record, species)


def test_summaries_of_known_series():
    t = torch.arange(151, dtype=torch.float64)
    constant = torch.full((151,), 7.0, dtype=torch.float64)
    wave = 10 + torch.sin(2 * math.pi * t / 20)
    s = lv_summaries(torch.stack([torch.stack([constant, wave])]))[0]
    assert s[0] == 7.0 and s[2] == 0.0 and s[4] == 0.0 and s[5] == 0.0 and s[8] == 0.0
    z = (wave - wave.mean()) / wave.std(unbiased=False)
    assert torch.isclose(s[1], wave.mean()) and torch.isclose(s[3], (wave.var(unbiased=False) + 1).log())
    assert torch.isclose(s[6], (z[:-1] * z[1:]).sum() / 150) and torch.isclose(s[7], (z[:-2] * z[2:]).sum() / 150)


def test_task_outputs_and_normalisation():
    task = simulators.get("lotka_volterra_sde")
    x = task.simulate(task.prior.sample((2000,)), seed=0)
    # normalised by the non-exploding pilot runs: the bulk is O(1)
    assert x.median(0).values.abs().max() < 3
    raw = simulators.get("lotka_volterra_sde", output="raw")
    assert raw.x_shape == (2, 151) and raw.simulate(STAR[None], seed=0).shape == (1, 2, 151)
    assert task.true_parameters(1).tolist() == pytest.approx(list(THETA_STAR))
    mjp = simulators.get("lotka_volterra_mjp")
    assert torch.equal(mjp.summary_loc, task.summary_loc)  # one scale for both simulators
    with pytest.raises(ValueError, match="output"):
        simulators.get("lotka_volterra_sde", output="series")


@pytest.mark.gpu
def test_sde_on_gpu():
    out = lv_sde(STAR.expand(4096, 4).cuda(), generator=torch.Generator("cuda").manual_seed(0))
    assert out.device.type == "cuda" and torch.isfinite(out).all()
    mjp = lv_mjp(STAR.expand(64, 4).cuda(), T=2.0)
    assert mjp.device.type == "cuda"


def test_noise_generator_gives_independent_standard_normals():
    """SplitMix64 counters + Box–Muller: 2·10^6 draws are N(0, 1) by KS (p > 1e-3), with
    mean, variance and kurtosis within 5 se, and no correlation between the pair, between
    consecutive steps or between neighbouring paths (|r| < 5/√n)."""
    import scipy.stats

    from simulators.lotka_volterra import _GOLDEN, _normal_pair, _splitmix64, _wrap64

    paths, steps = 1000, 1000
    counter = (torch.arange(paths, dtype=torch.int64)[:, None] * _wrap64(steps * _GOLDEN)
               + torch.arange(steps, dtype=torch.int64)[None] * _GOLDEN + 987654321)
    z1, z2 = _normal_pair(_splitmix64(counter), torch.float64)
    z = torch.cat([z1.flatten(), z2.flatten()])
    n = z.numel()
    assert scipy.stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    assert abs(z.mean()) < 5 / math.sqrt(n) and abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z**4).mean() - 3) < 5 * math.sqrt(96 / n)
    bound = 5 / math.sqrt(z1.numel())
    for a, b in ((z1, z2), (z1[:, 1:], z1[:, :-1]), (z1[1:], z1[:-1])):
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < bound


def test_a_paths_result_does_not_depend_on_its_batch():
    theta = STAR.expand(20, 4)
    alone = lv_sde(theta[:5], generator=gen(9), backend="eager")
    together = lv_sde(theta, generator=gen(9), backend="eager")
    assert torch.equal(alone, together[:5])


def test_compiled_kernel_draws_the_same_paths_as_eager():
    """The compiled kernel fuses the same arithmetic: paths agree to float rounding over the
    first 2 time units; over the whole horizon, prior draws included (blow-ups, extinctions),
    every record of 99 % of the paths stays within 0.1 % (rounding can flip an extinction)."""
    theta = STAR.expand(256, 4)
    eager = lv_sde(theta, T=2.0, generator=gen(10), backend="eager")
    compiled = lv_sde(theta, T=2.0, generator=gen(10), backend="compile")
    assert torch.allclose(eager, compiled, rtol=1e-3, atol=1e-3)
    prior = torch.exp(-5.0 + 7.0 * torch.rand(512, 4, generator=gen(11)))
    eager, compiled = (lv_sde(prior, generator=gen(12), backend=b) for b in ("eager", "compile"))
    close = ((eager - compiled).abs() <= 1e-3 * (eager.abs() + 1)).flatten(1).all(1)
    assert close.float().mean() >= 0.99
    with pytest.raises(ValueError, match="backend"):
        lv_sde(theta, backend="jit")


def test_auto_runs_the_built_kernel_at_any_size_and_builds_only_for_a_large_run(tmp_path, monkeypatch):
    from simulators.lotka_volterra import AUTO_BUILD_PATH_STEPS, KERNEL, _kernel, build_kernel

    x = torch.ones(3)
    example, constants = (x, x, x, x, x, x, torch.zeros(3, dtype=torch.int64)), {"per": 20, "cap": 1e5}
    assert build_kernel() is not None  # the defaults, as make venv builds them
    monkeypatch.setattr(KERNEL, "_loaded", {})  # a new process: the package on disk, nothing loaded
    assert _kernel("auto", 1.0, example, constants) is KERNEL.get(example, constants)
    assert _kernel("eager", 1e12, example, constants) is not KERNEL.get(example, constants)
    # an empty cache: a small run stays eager and builds nothing; a large one would build
    monkeypatch.setenv("IMPLICITBAYES_CACHE", str(tmp_path))
    monkeypatch.setattr(type(KERNEL), "get", lambda self, *a: "compiled")
    assert _kernel("auto", AUTO_BUILD_PATH_STEPS / 2, example, constants) != "compiled"
    assert not any(tmp_path.rglob("*.pt2"))
    assert _kernel("auto", AUTO_BUILD_PATH_STEPS, example, constants) == "compiled"
