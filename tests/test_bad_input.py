"""The bad-input catalogue of docs/bad_input.md: one case per row, each checking the error type
and the words of its message. The first test keeps the table and the cases in step."""

import json
import math
import re
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

import implicitbayes as ib
from tests.models import gaussian_model, raising_model

ROOT = Path(__file__).resolve().parents[1]


def _model(simulator, prior=None, event_shape=(2,)):
    def model():
        theta = pyro.sample("theta", prior if prior is not None else dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1))
        return pyro.sample("x", ib.Implicit(simulator, theta, event_shape=event_shape))
    return model


def _simulate(model, **kw):
    return lambda: ib.simulate(model, 20, observed="x", seed=0, progress=False, **kw)


def _dtype_by_parameter(theta):  # float32 for the single trial run, float64 for a batch
    return theta.double() if theta.shape[0] > 1 else theta.clone()


def _ignores_batch(theta):
    return theta[:1].clone()


def _posterior():
    data = ib.simulate(gaussian_model, 300, observed="x", seed=0, progress=False)
    return ib.NPE(gaussian_model, observed="x").fit(data, max_steps=5, seed=0, progress=False)


def _nle_posterior():
    data = ib.simulate(gaussian_model, 300, observed="x", seed=0, progress=False)
    return ib.NLE(gaussian_model, observed="x").fit(data, max_steps=5, seed=0, progress=False)


def _normal_observed_model():
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    return pyro.sample("x", dist.Normal(theta, 1.0).to_event(1))


def _empty_region_prior():
    from implicitbayes.infer.sequential import Region, TruncatedPrior

    empty = Region(lambda latents: torch.zeros(len(latents["theta"]), dtype=torch.bool), "empty", 0.0)
    return TruncatedPrior(gaussian_model, ["x"], empty)


def _other_model_data():
    def other():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        return pyro.sample("x", ib.Implicit(lambda t: torch.stack([t, t], -1), a, event_shape=(2,)))
    data = ib.simulate(other, 50, observed="x", seed=0, progress=False)
    return lambda: ib.NPE(gaussian_model, observed="x").fit(data, max_steps=2, progress=False)


def _empty_data():
    data = ib.simulate(gaussian_model, 10, observed="x", seed=0, progress=False)
    empty = data.subset(torch.zeros(10, dtype=torch.bool))
    return lambda: ib.NPE(gaussian_model, observed="x").fit(empty, max_steps=2, progress=False)


def _store_other_settings(tmp_path):
    ib.simulate(gaussian_model, 40, observed="x", seed=1, batch_size=10, store=tmp_path / "s", progress=False)
    return lambda: ib.simulate(gaussian_model, 40, observed="x", seed=1, batch_size=20, store=tmp_path / "s",
                               progress=False)


def _store_foreign_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    return lambda: ib.simulate(gaussian_model, 10, observed="x", seed=0, store=tmp_path, progress=False)


def _old_version_file(tmp_path):
    from safetensors.torch import load_file, safe_open

    from implicitbayes.io import save_tensors

    _posterior().save(tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as fh:
        meta = json.loads(fh.metadata()["implicitbayes"])
    save_tensors(tmp_path / "old.safetensors", load_file(str(tmp_path / "new.safetensors")), kind=meta["kind"],
                 version=1, meta={k: v for k, v in meta.items() if k not in ("kind", "format_version", "checksum")})
    return lambda: ib.load(tmp_path / "old.safetensors")


def _corrupt_file(tmp_path):
    data = ib.simulate(gaussian_model, 10, observed="x", seed=0, progress=False)
    data.save(tmp_path / "d.safetensors")
    raw = (tmp_path / "d.safetensors").read_bytes()
    (tmp_path / "d.safetensors").write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    return lambda: ib.SimulationSet.load(tmp_path / "d.safetensors")


def _cli_run(*argv, data=None):
    """``implicitbayes run ARGV`` (with ``data`` saved as ``--data``): raises SystemExit with the
    exit status and the error printed, and checks that nothing was written."""
    import contextlib
    import io

    import numpy as np

    from implicitbayes.cli import main

    def factory(tmp_path):
        def run():
            extra = []
            if data is not None:
                np.save(tmp_path / "data.npy", np.asarray(data))
                extra = ["--data", str(tmp_path / "data.npy")]
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(["run", *argv, *extra, "--quiet", "--out", str(tmp_path / "out")])
            assert not (tmp_path / "out").exists()
            raise SystemExit(f"{code}: {err.getvalue()}")
        return run
    return factory


def _cli_foreign_dir(tmp_path):
    from implicitbayes.cli import main

    (tmp_path / "notes.txt").write_text("mine")

    def run():
        code = main(["run", "gaussian_linear", "--method", "npe", "-n", "100", "--max-steps", "5", "--quiet",
                     "--out", str(tmp_path)])
        assert (tmp_path / "notes.txt").read_text() == "mine"
        raise SystemExit(code)
    return run


# id: (factory(tmp_path) -> callable that must fail, exception type, regex of the message)
CASES = {
    "sim-shape": (lambda t: _simulate(_model(lambda th: torch.cat([th, th[:, :1]], 1))), ib.SimulatorOutputError,
                  r"returned event shape \(3,\), expected event_shape=\(2,\).*\nparameters: theta ∈"),
    "sim-not-tensor": (lambda t: _simulate(_model(lambda th: th.numpy())), ib.SimulatorOutputError,
                       r"returned ndarray, expected a torch.Tensor"),
    "sim-dtype": (lambda t: _simulate(_model(lambda th: th.to(torch.complex64))), ib.SimulatorOutputError,
                  r"returned dtype torch.complex64; expected real floating point values or integer counts"),
    "sim-dtype-changes": (lambda t: _simulate(_model(_dtype_by_parameter)), ib.SimulatorOutputError,
                          r"site 'x' has dtype torch.float64 in chunk 0, but float32 in the trial run"),
    "sim-device": (lambda t: _simulate(_model(lambda th: torch.empty(th.shape, device="meta"))), ib.SimulatorOutputError,
                   r"returned a tensor on meta, but its parameters are on cpu"),
    "sim-ignores-batch": (lambda t: _simulate(_model(_ignores_batch)), ib.SimulatorOutputError,
                          r"returned shape \(1, 2\) for a batch of 20 parameter sets; a vectorized simulator must return"),
    "sim-raises": (lambda t: lambda: ib.simulate(raising_model, 400, observed="x", seed=0, batch_size=100,
                                                 progress=False), ib.SimulationError,
                   r"simulation \d+: theta=\[0\.9\d*, -?\d\.\d+\] \(RuntimeError: simulator exploded\)"),
    "obs-nan": (lambda t: lambda: _posterior().sample(10, torch.tensor([0.0, float("nan")])), ValueError,
                r"observed: site 'x' contains NaN or inf"),
    "obs-shape": (lambda t: lambda: _posterior().sample(10, torch.zeros(3)), ValueError,
                  r"observed: site 'x' must have shape \(2,\), got \(3,\)"),
    "obs-site-names": (lambda t: lambda: _posterior().sample(10, {"y": torch.zeros(2)}), ValueError,
                       r"observed: expected the sites \['x'\], got \['y'\]"),
    "prior-discrete": (lambda t: (lambda m: lambda: ib.NPE(m, observed="x").fit(
        ib.simulate(m, 50, observed="x", seed=0, progress=False), max_steps=2, progress=False))(
        _model(lambda th: th.float(), prior=dist.Bernoulli(0.5 * torch.ones(2)).to_event(1))),
        ValueError, r"site 'theta' is discrete"),
    "observed-misspelled": (lambda t: lambda: ib.simulate(gaussian_model, 10, observed="y", progress=False), ValueError,
                            r"observed: \['y'\] is not a site of the model; its sample sites are \['theta', 'x'\]"),
    "num-simulations": (lambda t: lambda: ib.simulate(gaussian_model, 0, observed="x", progress=False), ValueError,
                        r"num_simulations: expected a positive integer, got 0"),
    "batch-size": (lambda t: _simulate(gaussian_model, batch_size=0), ValueError,
                   r"batch_size: expected a positive integer or None, got 0"),
    "loop-plateau": (lambda t: lambda: ib.ImplicitVI(gaussian_model, observed="x", training={"plateau": 0}),
                     ValueError, r"plateau: expected a positive integer or None, got 0"),
    "training-unknown": (lambda t: lambda: ib.NPE(gaussian_model, observed="x", training={"learning_rate": 1e-4}),
                         ValueError, r"training: unknown loop settings \['learning_rate'\]; TrainConfig has \[.*'lr'"),
    "loop-compile": (lambda t: lambda: ib.NPE(gaussian_model, observed="x", training={"compile": "yes"}),
                     ValueError, r"compile: expected True, False or 'auto', got 'yes'"),
    "training-type": (lambda t: lambda: ib.NPE(gaussian_model, observed="x", training=5), TypeError,
                      r"training: expected an ib.TrainConfig, a mapping of its fields or None, got int"),
    "correction": (lambda t: lambda: ib.ImplicitVI(gaussian_model, observed="x", correction="SIR"),
                   ValueError, r"correction: expected one of 'sir', None, got 'SIR'"),
    "noise-skip": (lambda t: lambda: ib.ImplicitVI(gaussian_model, observed="x", noise_skip="no"),
                   ValueError, r"noise_skip: expected True, False or None .*, got 'no'"),
    "family": (lambda t: lambda: ib.ImplicitVI(gaussian_model, observed="x", family="flow-matching"),
               ValueError, r"family: expected one of 'energy_score', 'flow_matching', 'score', 'consistency', got 'flow-matching'"),
    "family-noise": (lambda t: lambda: ib.ImplicitVI(gaussian_model, observed="x", family="flow_matching",
                                                     noise_features=4),
                     ValueError, r"noise_features: a continuous-time generator's noise is the latent's own dimension"),
    "affine-first": (lambda t: lambda: ib.NPE(gaussian_model, observed="x", affine_first="yes"),
                     ValueError, r"affine_first: expected True or False, got 'yes'"),
    "flow-callable-options": (lambda t: lambda: ib.NPE(gaussian_model, observed="x", flow=lambda d, c: None,
                                                        hidden_features=(64, 64)), ValueError,
                              r"flow: a build callable is used as it is, so \['hidden_features'\] cannot apply to it"),
    "builder-not-module": (lambda t: lambda: ib.NPE(gaussian_model, observed="x", flow=lambda d, c: "nsf").fit(
        ib.simulate(gaussian_model, 50, observed="x", seed=0, progress=False), max_steps=2, progress=False),
        TypeError, r"flow: the build callable returned str for sizes \(2, 2\); expected a torch.nn.Module"),
    "spline-init": (lambda t: lambda: ib.NPE(gaussian_model, observed="x", flow="maf", spline_init=1e-3),
                    ValueError, r"spline_init: only flow='nsf' has spline conditioners, got flow='maf'"),
    "linear-residual": (lambda t: lambda: ib.NPE(gaussian_model, observed="x", linear_residual="yes"),
                        ValueError, r"linear_residual: expected True, False or 'auto', got 'yes'"),
    "linear-residual-few": (lambda t: lambda: ib.NPE(gaussian_model, observed="x", linear_residual=True).fit(
        ib.simulate(gaussian_model, 20, observed="x", seed=0, progress=False), max_steps=2, progress=False),
        ValueError, r"linear_residual=True: 20 training rows for a regression on 2 observation numbers; it needs "
                    r"at least 30"),
    "loop-ema": (lambda t: lambda: ib.LFVI(gaussian_model, observed="x", training={"ema": 1.0}), ValueError,
                 r"ema: expected a decay in \(0, 1\) or None, got 1.0"),
    "lfvi-prior-steps": (lambda t: lambda: ib.LFVI(gaussian_model, observed="x", prior_steps=-1), ValueError,
                         r"prior_steps: expected a non-negative integer, got -1"),
    "num-samples": (lambda t: lambda: _posterior().sample(0, torch.zeros(2)), ValueError,
                    r"num_samples: expected a positive integer, got 0"),
    "device-unknown": (lambda t: _simulate(gaussian_model, device="tpu9"), ValueError, r"device: 'tpu9' is not a device"),
    "device-cuda-absent": (lambda t: _simulate(gaussian_model, device="cuda"), ValueError,
                           r"device: 'cuda' was asked for but CUDA is not available on this machine"),
    "data-other-model": (lambda t: _other_model_data(), ValueError, r"it was simulated from another model"),
    "data-empty": (lambda t: _empty_data(), ValueError, r"data: the SimulationSet is empty"),
    "data-not-a-set": (lambda t: lambda: ib.NPE(gaussian_model, observed="x").fit(
        {"theta": torch.zeros(5, 2), "x": torch.zeros(5, 2)}), TypeError,
        r"data: expected an ib.SimulationSet \(from ib.simulate\), got dict"),
    "store-other-settings": (_store_other_settings, ib.StoreMismatchError, r"batch_size: store has 10, asked 20"),
    "store-foreign-dir": (_store_foreign_dir, ValueError, r"is a non-empty directory that is not a simulation store"),
    "file-corrupt": (_corrupt_file, ib.FormatError, r"d\.safetensors: corrupt file"),
    "file-old-version": (_old_version_file, ib.FormatError,
                         r"old\.safetensors: a posterior of format version 1, written before the typed configurations "
                         r"of version 2; .* fit the posterior again"),
    "cli-foreign-dir": (_cli_foreign_dir, SystemExit, r"^2$"),
    "cli-model-missing": (_cli_run("tests/models.py:no_model", data=[0.0, 0.0]), SystemExit,
                          r"^2: .*TARGET: 'tests/models.py' has no function 'no_model'"),
    "cli-not-a-model": (_cli_run("tests/models.py:normal_simulator", data=[0.0, 0.0]), SystemExit,
                        r"^2: .*TARGET: running 'tests/models.py:normal_simulator' as a Pyro model without arguments "
                        r"failed"),
    "cli-data-shape": (_cli_run("tests/models.py:normal_model", data=[0.0, 0.0, 0.0]), SystemExit,
                       r"^2: .*holds 3 numbers \(shape \(3,\)\), but the observed site 'x' has shape \(2,\)"),
    "cli-data-nan": (_cli_run("tests/models.py:normal_model", data=[0.0, float("nan")]), SystemExit,
                     r"^2: .*contains NaN or inf"),
    "cli-option": (_cli_run("gaussian_linear", "--method-option", "flow"), SystemExit,
                   r"^2: .*--method-option: expected KEY=VALUE, got 'flow'"),
    "nle-not-implicit": (lambda t: lambda: ib.NLE(_normal_observed_model, observed="x").fit(
        ib.simulate(_normal_observed_model, 50, observed="x", seed=0, progress=False), max_steps=2, progress=False),
        TypeError, r"observed: site 'x' is a Normal, not an ib.Implicit"),
    "nle-several-sites": (lambda t: lambda: ib.NLE(gaussian_model, observed=["x", "theta"]), ValueError,
                          r"observed: NLE learns the likelihood of one implicit site, got \['x', 'theta'\]"),
    "seq-rounds": (lambda t: lambda: ib.sequential(ib.NPE(gaussian_model, observed="x"), observation=torch.zeros(2),
                                                   num_simulations=100, rounds=0), ValueError,
                   r"rounds: expected a positive integer, got 0"),
    "seq-too-few": (lambda t: lambda: ib.sequential(ib.NPE(gaussian_model, observed="x"), observation=torch.zeros(2),
                                                    num_simulations=3, rounds=5), ValueError,
                    r"num_simulations: 3 simulations cannot be split over 5 rounds; give at least one per round"),
    "seq-abc": (lambda t: lambda: ib.sequential(ib.ABC(gaussian_model, observed="x"), observation=torch.zeros(2),
                                                num_simulations=100), TypeError,
                r"method: ABC does not run in rounds here; its own sequential scheme is SMC-ABC"),
    "seq-proposal": (lambda t: lambda: ib.sequential(ib.NPE(gaussian_model, observed="x"), observation=torch.zeros(2),
                                                     num_simulations=100, proposal="prior"), ValueError,
                     r"proposal: expected one of 'auto', 'truncated', 'posterior', got 'prior'"),
    "seq-proposal-npe": (lambda t: lambda: ib.sequential(ib.NPE(gaussian_model, observed="x"),
                                                         observation=torch.zeros(2), num_simulations=100,
                                                         proposal="posterior"), ValueError,
                         r"proposal: 'posterior' needs a method that learns the likelihood \(ib.NLE\)"),
    "seq-warm-start": (lambda t: lambda: ib.sequential(ib.NPE(gaussian_model, observed="x"), observation=torch.zeros(2),
                                                       num_simulations=100, warm_start="yes"), ValueError,
                       r"warm_start: expected True, False or 'auto', got 'yes'"),
    "seq-zero-mass": (lambda t: lambda: _empty_region_prior(), ValueError,
                      r"the posterior's region \(empty\) has numerically zero prior mass: none of 20000 prior draws"),
    "nle-obs-draw-shape": (lambda t: lambda: _nle_posterior().sample(10, torch.zeros(3)), ValueError,
                           r"observed: site 'x' has shape \(3,\); its draws have shape \(2,\)"),
    "mcmc-sampler": (lambda t: lambda: ib.NLE(gaussian_model, observed="x", sampler="hmc"), ValueError,
                     r"sampler: expected one of 'nuts', 'slice', got 'hmc'"),
    "mcmc-resume-nuts": (lambda t: lambda: _nle_posterior().sample(10, torch.zeros(2), sampler="nuts", resume=_resume(
        torch.zeros(4))), ValueError, r"resume: only the slice sampler resumes from a population; got sampler='nuts'"),
    "mcmc-resume-weights": (lambda t: lambda: _resume(torch.full((4,), -math.inf)), ValueError,
                            r"resume: no log-weight is finite, so no draw can start a chain"),
    "mcmc-resume-shape": (lambda t: lambda: _resume(torch.zeros(3)), ValueError,
                          r"resume: expected one log-weight per draw, got log_weights of shape \(3,\) for draws of "
                          r"lengths \{'theta': 4\}"),
    "train-rising-patience": (lambda t: lambda: ib.TrainConfig(rising_patience=2), ValueError,
                              r"rising_patience: expected an integer >= 3 or None, got 2"),
    "mcmc-sampler-draw": (lambda t: lambda: _nle_posterior().sample(10, torch.zeros(2), sampler="Slice"), ValueError,
                          r"sampler: expected one of 'nuts', 'slice', got 'Slice'"),
}


def _resume(log_weights):
    from implicitbayes.infer.mcmc import SliceResume

    return SliceResume({"theta": torch.zeros(4, 2)}, log_weights, (torch.eye(2), torch.ones(2)))


def test_catalogue_and_cases_match():
    table = (ROOT / "docs" / "bad_input.md").read_text()
    ids = re.findall(r"^\| `([a-z0-9-]+)` \|", table, flags=re.M)
    assert len(ids) == len(set(ids)) and set(ids) == set(CASES), (sorted(set(ids) ^ set(CASES)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_its_error(case, tmp_path, capsys):
    if case == "device-cuda-absent" and torch.cuda.is_available():
        pytest.skip("checks the no-CUDA message")
    factory, exc, pattern = CASES[case]
    call = factory(tmp_path)
    with pytest.raises(exc) as info:
        call()
    assert re.search(pattern, str(info.value)), f"{case}: {info.value}"
    if case == "cli-foreign-dir":
        assert "is not empty and is not an implicitbayes run directory" in capsys.readouterr().err
