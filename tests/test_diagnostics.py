"""Diagnostics: C2ST against sbibm's implementation, MMD, SBC and expected coverage that pass a
calibrated posterior and fail an over-confident and an under-confident one, ArviZ conversion, a
PPC that tells the posterior predictive from the prior predictive, and plots."""

import importlib.util
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

import implicitbayes as ib
import simulators
from implicitbayes.diagnostics import (c2st, coverage_from_draws, expected_coverage, mmd, plot_coverage,
                                       plot_ppc_series, plot_sbc, plot_training, ppc, sbc)
from implicitbayes.diagnostics.inference_data import _dims

matplotlib.use("Agg")

TASK = simulators.get("gaussian_linear")


def _sbibm_c2st():
    spec = importlib.util.find_spec("sbibm")
    # both are installed by the test set-up (`make test`): missing, the comparison fails rather than skips
    assert spec is not None and importlib.util.find_spec("sklearn") is not None, \
        "sbibm and scikit-learn are needed for the comparison: pip install --no-deps sbibm==1.1.0 scikit-learn"
    path = Path(spec.submodule_search_locations[0], "metrics", "c2st.py")
    module_spec = importlib.util.spec_from_file_location("_sbibm_c2st", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.c2st


@pytest.mark.parametrize("shift", [0.0, 0.4, 1.5])
def test_c2st_agrees_with_sbibm(shift):
    # same pairs of sample sets; the two implementations differ in initialisation and batch
    # order only, so they agree within the accuracy's noise (sd ≈ 0.01 at n = 2 × 2000)
    g = torch.Generator().manual_seed(int(shift * 10))
    a = torch.randn(2000, 3, generator=g)
    b = torch.randn(2000, 3, generator=g) + torch.tensor([shift, 0.0, 0.0])
    ours, theirs = c2st(a, b), float(_sbibm_c2st()(a, b))
    assert abs(ours - theirs) < 0.035, (ours, theirs)
    if shift == 0:
        assert abs(ours - 0.5) < 0.04
    if shift == 1.5:
        assert ours > 0.7


def test_c2st_and_mmd_bad_input():
    with pytest.raises(ValueError, match="different dimensions"):
        c2st(torch.zeros(20, 2), torch.zeros(20, 3))
    with pytest.raises(ValueError, match="NaN"):
        mmd(torch.full((20, 2), float("nan")), torch.zeros(20, 2))


def test_mmd_is_near_zero_for_equal_laws_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, 2, generator=g), torch.randn(1000, 2, generator=g)
    same, shifted = mmd(a, b), mmd(a, b + 0.5)
    assert abs(same) < 0.005 and shifted > 0.03


class Analytic:
    """gaussian_linear's exact posterior N(x/2, 0.05 I); ``scale`` < 1 makes it over-confident,
    > 1 under-confident."""

    model, model_args, model_kwargs, observed, device = TASK.model, (), {}, ("x",), "cpu"

    def __init__(self, scale=1.0):
        self.scale = scale

    def sample(self, n, x, seed=None):
        x = x["x"] if isinstance(x, dict) else x
        post = TASK.posterior(x)
        g = torch.Generator().manual_seed(seed or 0)
        loc, sd = post.base_dist.loc, post.base_dist.scale * self.scale
        return {"theta": loc + sd * torch.randn((n, 10), generator=g)}


def test_sbc_passes_the_exact_posterior_and_fails_an_overconfident_and_an_underconfident_one():
    good = sbc(lambda x: Analytic(), TASK.model, observed="x", num_datasets=300, num_samples=99, progress=False)
    assert good.ranks.shape == (300, 10) and good.names[0] == "theta[0]"
    assert good.passed and good.p_value > 0.01
    for scale in (0.6, 1.5):  # too narrow: ranks pile at the ends; too wide: in the middle
        bad = sbc(lambda x: Analytic(scale), TASK.model, observed="x", num_datasets=300, num_samples=99, progress=False)
        assert not bad.passed and bad.p_value < 1e-6, (scale, bad.p_value)
        middle = float(((bad.ranks >= 25) & (bad.ranks < 75)).mean())
        assert (middle < 0.4) if scale < 1 else (middle > 0.6), (scale, middle)  # 0.5 when calibrated
    for kind in ("ecdf", "hist"):
        assert plot_sbc(good, kind=kind).axes


@pytest.mark.parametrize("kind", ["tarp", "marginal"])
def test_expected_coverage_is_diagonal_only_when_calibrated(kind):
    good = expected_coverage(lambda x: Analytic(), TASK.model, observed="x", num_datasets=300, num_samples=200,
                             kind=kind, progress=False)
    # the binomial sd at n = 300 is ≤ 0.029; a calibrated curve stays within about 3 sd
    assert good.max_gap < 0.09, good.max_gap
    for scale in (0.6, 1.5):
        bad = expected_coverage(lambda x: Analytic(scale), TASK.model, observed="x", num_datasets=300,
                                num_samples=200, kind=kind, progress=False)
        assert bad.max_gap > 0.15, (scale, bad.max_gap)
        mid = np.searchsorted(bad.alpha, 0.5)
        # over-confident: under the diagonal; under-confident: above it
        assert (bad.coverage[mid] < 0.4) if scale < 1 else (bad.coverage[mid] > 0.6), (scale, bad.coverage[mid])
    assert plot_coverage(good).axes


def test_coverage_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        coverage_from_draws(torch.zeros(5, 1), torch.zeros(5, 4, 1), kind="hpd")
    with pytest.raises(ValueError, match="levels"):
        coverage_from_draws(torch.zeros(5, 1), torch.zeros(5, 4, 1), levels=0)


@pytest.fixture(scope="module")
def npe():
    data = ib.simulate(TASK.model, 1000, observed="x", seed=0, progress=False)
    return ib.NPE(TASK.model, observed="x").fit(data, max_steps=300, seed=0, progress=False)


def test_to_inference_data_groups_and_arviz_functions(npe, tmp_path):
    import arviz as az

    x = TASK.observation(1)
    idata = ib.to_inference_data(npe, {"x": x}, num_samples=200)
    assert set(idata.groups()) >= {"posterior", "posterior_predictive", "observed_data", "prior", "prior_predictive"}
    assert idata.posterior["theta"].shape == (1, 200, 10)
    assert idata.posterior_predictive["x"].shape == (1, 200, 10)
    assert np.allclose(idata.observed_data["x"].values, x.numpy())
    assert "theta_dim_0" in idata.posterior["theta"].dims
    summary = az.summary(idata, kind="stats")
    assert len(summary) == 10
    az.plot_posterior(idata, var_names=["theta"], coords={"theta_dim_0": [0]})
    az.plot_ppc(idata, num_pp_samples=20)
    az.plot_pair(idata, var_names=["theta"], coords={"theta_dim_0": [0, 1]})
    idata.to_netcdf(str(tmp_path / "idata.nc"))
    assert az.from_netcdf(str(tmp_path / "idata.nc")).posterior["theta"].shape == (1, 200, 10)
    # a posterior loaded from disk has no model: a clear error, or pass it
    npe.save(tmp_path / "npe")
    back = ib.load(tmp_path / "npe")
    with pytest.raises(ValueError, match="model"):
        ib.to_inference_data(back, {"x": x})
    assert "posterior_predictive" in ib.to_inference_data(back, {"x": x}, model=TASK.model, num_samples=10).groups()


def test_dims_are_named_after_plates():
    task = simulators.get("hierarchical_gaussian")
    dims = _dims(task.model, ["x"], (), {})
    assert dims["theta"] == ["groups"] and dims["x"] == ["groups", "x_dim_1"] and dims["mu"] == []


class PriorDraws(Analytic):
    """The wrong answer a PPC must catch: the prior in place of the posterior."""

    def sample(self, n, x, seed=None):
        import pyro

        pyro.set_rng_seed(seed or 0)
        return {"theta": pyro.infer.Predictive(TASK.model, num_samples=n)()["theta"]}


def test_ppc_and_plots(npe):
    x = TASK.observation(1)
    # the exact posterior predictive is N(x/2, (0.05 + 0.1) I); the prior predictive N(0, 0.2 I)
    # has the same order of spread, so the check is on where the predictive sits: observation 1
    # has |x/2| up to 0.52, 0.1 is 3 posterior-predictive sd over √1000 plus the fit's error
    exact_mean, exact_sd = x / 2, (0.05 + 0.1) ** 0.5

    def errors(pred):
        return float((pred["x"].mean(0) - exact_mean).abs().max()), float((pred["x"].std(0) / exact_sd - 1).abs().max())

    pred = ppc(npe, {"x": x}, num_samples=1000)
    assert pred["theta"].shape == (1000, 10) and pred["x"].shape == (1000, 10)
    mean_error, sd_error = errors(pred)
    assert mean_error < 0.1 and sd_error < 0.2, (mean_error, sd_error)
    assert errors(ppc(Analytic(), {"x": x}, num_samples=1000))[0] < 0.05
    assert errors(ppc(PriorDraws(), {"x": x}, num_samples=1000))[0] > 0.3
    fig = plot_ppc_series(x[None], pred["x"][:, None], names=["x"])
    assert len(fig.axes) == 1
    with pytest.raises(ValueError, match="predictive"):
        plot_ppc_series(x[None], pred["x"])
    assert plot_training(npe.training_summary).axes


def test_sample_batch_draws_all_rows_at_once(npe):
    data = ib.simulate(TASK.model, 5, observed="x", seed=9, progress=False)
    batch = npe.sample_batch(2000, data["x"], seed=0)["theta"]
    assert batch.shape == (5, 2000, 10)
    for i in range(5):
        single = npe.sample(2000, data["x"][i], seed=i)["theta"]
        # same posterior, independent draws: means agree within ~5 standard errors (sd ≈ 0.22)
        assert (batch[i].mean(0) - single.mean(0)).abs().max() < 0.04
    with pytest.raises(ValueError, match=r"\(B, 10\)"):
        npe.sample_batch(10, torch.zeros(3, 4))
    nan_rows = torch.zeros(3, 10)
    nan_rows[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf in rows \[1\]"):
        npe.sample_batch(10, nan_rows)
    # the batched path is what SBC uses for a trained posterior
    result = sbc(npe, TASK.model, observed="x", num_datasets=70, num_samples=49, progress=False)
    assert result.ranks.shape == (70, 10) and result.ranks.min() >= 0 and result.ranks.max() <= 49


def test_default_sample_batch_is_row_by_row():
    # the base implementation stacks per-row draws seeded seed + i (ImplicitVI, NRE, ...):
    # checked on a minimal stand-in whose sample() is the exact posterior
    from implicitbayes.infer.posterior import Posterior

    post = Analytic()

    class Stub:
        observed = ("x",)
        x_shapes = {"x": (10,)}
        device = torch.device("cpu")
        _observation_rows = Posterior._observation_rows

        def sample(self, n, x, seed=None):
            return post.sample(n, x, seed=seed)

    rows = torch.randn(3, 10)
    out = Posterior.sample_batch.__wrapped__(Stub(), 7, rows, seed=5)["theta"]
    assert out.shape == (3, 7, 10)
    assert torch.equal(out[2], post.sample(7, rows[2], seed=7)["theta"])
