"""The implicitbayes command: list, simulate (resumable), demo; errors as messages."""

import subprocess
import sys

import torch

import implicitbayes as ib
from implicitbayes.cli import main


def test_list_names_every_simulator(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("two_moons", "lotka_volterra_sde", "lotka_volterra_mjp", "hierarchical_gaussian"):
        assert name in out


def test_unknown_simulator_is_a_message_not_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "implicitbayes.cli", "simulate", "two_moon", "-n", "5"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "did you mean 'two_moons'" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_device_is_a_message(capsys, tmp_path):
    assert main(["simulate", "two_moons", "-n", "5", "--device", "quantum", "--out", str(tmp_path)]) == 2
    assert "device" in capsys.readouterr().err


def test_simulate_writes_and_resumes(tmp_path, capsys):
    args = ["simulate", "gaussian_linear", "-n", "300", "--batch-size", "100", "--seed", "3", "--out", str(tmp_path)]
    assert main(args) == 0
    first = ib.SimulationSet.load(tmp_path / "simulations.safetensors")
    assert len(first) == 300 and len(list((tmp_path / "store").glob("chunk-*"))) == 3
    assert main(args) == 0
    again = ib.SimulationSet.load(tmp_path / "simulations.safetensors")
    assert all((first[n] == again[n]).all() for n in first.keys())


def test_simulator_options_are_passed(tmp_path):
    assert main(["simulate", "g_and_k", "-n", "20", "--option", "summary='octiles'", "--out", str(tmp_path)]) == 0
    assert ib.SimulationSet.load(tmp_path / "simulations.safetensors")["x"].shape == (20, 7)


def test_demo_writes_a_plot_and_a_summary(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "-n", "200"]) == 0
    out = capsys.readouterr().out
    assert "path-steps/s" in out and "extinct" in out
    png = tmp_path / "lotka_volterra_sde.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


RUN = ["run", "gaussian_linear", "--method", "npe", "-n", "600", "--max-steps", "60", "--num-samples", "100", "--quiet"]


def test_run_writes_the_analysis_and_resumes(tmp_path, capsys):
    import arviz as az

    out = tmp_path / "run"
    assert main([*RUN, "--out", str(out), "--sbc", "20"]) == 0
    text = capsys.readouterr().out
    assert "theta[9]" in text and "inside the central 95 % intervals" in text and "wall time" in text
    for name in ("posterior.safetensors", "inference_data.nc", "pair.png", "ppc.png", "sbc.png", "coverage.png",
                 "summary.txt", "run.json", "training.png"):
        assert (out / name).stat().st_size > 0, name
    idata = az.from_netcdf(str(out / "inference_data.nc"))
    assert idata.posterior["theta"].shape == (1, 100, 10) and "posterior_predictive" in idata.groups()
    before = ib.load(out / "posterior.safetensors").sample(5, {"x": torch.zeros(10)}, seed=0)["theta"]
    assert main([*RUN, "--out", str(out)]) == 0  # the same run: loads, does not train again
    assert "loading the trained posterior" in capsys.readouterr().out
    after = ib.load(out / "posterior.safetensors").sample(5, {"x": torch.zeros(10)}, seed=0)["theta"]
    assert torch.equal(before, after)
    # other settings in the same directory: refused, then replaced with --force
    assert main([*RUN, "--seed", "1", "--out", str(out)]) == 2
    assert "other settings (seed)" in capsys.readouterr().err
    assert main([*RUN, "--seed", "1", "--out", str(out), "--force"]) == 0


def test_run_with_a_data_file(tmp_path, capsys):
    csv = tmp_path / "obs.csv"
    csv.write_text(",".join(["0.1"] * 10) + "\n")
    assert main([*RUN, "--data", str(csv), "--out", str(tmp_path / "r")]) == 0
    assert "data " in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    bad.write_text("x1,x2,x3\n1,2,3\n")
    assert main([*RUN, "--data", str(bad), "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "holds 3 numbers" in err and "(10,)" in err and "Traceback" not in err


def test_run_errors_are_messages(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main([*RUN, "--out", str(foreign)]) == 2
    assert "not an implicitbayes run directory" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main([*RUN, "--out", str(blocker / "sub")]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["run", "gaussian_linea", "--out", str(tmp_path / "x")]) == 2
    assert "did you mean 'gaussian_linear'" in capsys.readouterr().err
    assert main([*RUN, "--method", "vi", "--out", str(tmp_path / "y")]) == 2
    assert "--method" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*RUN, "--device", "cuda", "--out", str(tmp_path / "z")]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert main([*RUN, "--executor", "dask=tcp://127.0.0.1:9", "--out", str(tmp_path / "w")]) == 2
    assert "no Dask scheduler answers" in capsys.readouterr().err


# -- your own model from the command line -------------------------------------------------------
OWN = ["run", "tests/models.py:normal_model", "--method", "npe", "-n", "2000", "--max-steps", "600", "--quiet",
       "--num-samples", "2000"]


def test_run_your_own_model_from_a_file_with_npy_and_csv_data(tmp_path, capsys):
    """θ ~ N(0, I₂), x ~ N(θ, 0.5² I): the posterior N(0.8 x, 0.2 I) from FILE.py:FUNCTION, the
    observed site found by itself (the model's one ib.Implicit site)."""
    import arviz as az
    import numpy as np

    x = np.array([1.0, -0.5])
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "own"
    assert main([*OWN, "--data", str(tmp_path / "x.npy"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "normal_model" in text and "the observation looks like the model's simulations" in text
    draws = torch.as_tensor(az.from_netcdf(str(out / "inference_data.nc")).posterior["theta"].values).reshape(-1, 2)
    assert torch.allclose(draws.mean(0), 0.8 * torch.as_tensor(x, dtype=torch.float32), atol=0.1)
    assert torch.allclose(draws.std(0), torch.full((2,), 0.2 ** 0.5), rtol=0.2)
    csv = tmp_path / "x.csv"
    csv.write_text("x0,x1\n1.0,-0.5\n")
    assert main([*OWN[:2], "--observed", "x", *OWN[2:], "--data", str(csv), "--out", str(tmp_path / "own2")]) == 0
    assert (tmp_path / "own2" / "posterior.safetensors").exists()
    capsys.readouterr()
    np.save(tmp_path / "far.npy", np.array([9.0, -9.0]))  # 8 sd of the prior predictive out
    assert main([*OWN, "--data", str(tmp_path / "far.npy"), "--out", str(tmp_path / "far")]) == 0
    assert "LIKELY MISSPECIFIED" in capsys.readouterr().out


def test_run_your_own_model_by_module_name(tmp_path):
    np = __import__("numpy")
    np.save(tmp_path / "x.npy", np.zeros(2))
    assert main(["run", "tests.models:normal_model", *OWN[2:], "--max-steps", "50", "--data", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "m")]) == 0


def test_run_your_own_model_bad_input_is_a_message_and_writes_nothing(tmp_path, capsys):
    import numpy as np

    good = tmp_path / "x.npy"
    np.save(good, np.zeros(2))
    nan = tmp_path / "nan.npy"
    np.save(nan, np.array([0.0, np.nan]))
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((3, 2)))
    words = tmp_path / "words.csv"
    words.write_text("a,b\nc,d\n")
    not_a_model = tmp_path / "plain.py"
    not_a_model.write_text("VALUE = 3\n\ndef nothing():\n    return 1\n")
    cases = [
        (["tests/nothere.py:model", "--data", str(good)], "no file 'tests/nothere.py'"),
        (["tests/models.py:nope", "--data", str(good)], "has no function 'nope'"),
        (["no_such_module_xyz:model", "--data", str(good)], "cannot import 'no_such_module_xyz'"),
        ([f"{not_a_model}:VALUE", "--data", str(good)], "not a function"),
        ([f"{not_a_model}:nothing", "--data", str(good)], "draws no pyro.sample sites"),
        (["tests/models.py:normal_simulator", "--data", str(good)], "without arguments failed"),
        (["tests/models.py:normal_model", "--observed", "y", "--data", str(good)], "no sample site 'y'"),
        (["tests/models.py:normal_model"], "pass its data with --data"),
        (["tests/models.py:normal_model", "--data", str(wrong)], "holds 6 numbers (shape (3, 2)), but the observed site 'x' has shape (2,)"),
        (["tests/models.py:normal_model", "--data", str(nan)], "NaN or inf"),
        (["tests/models.py:normal_model", "--data", str(words)], "not a CSV of numbers"),
        (["tests/models.py:normal_model", "--data", str(good), "--observation", "2"], "not allowed with"),
    ]
    for i, (argv, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code = None
        try:
            code = main(["run", *argv, "--quiet", "--out", str(out)])
        except SystemExit as e:  # argparse's own refusals
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
        assert not out.exists(), argv


def test_a_simulator_sets_its_own_run_defaults_and_the_command_line_overrides_them(tmp_path):
    from implicitbayes.cli import _parser, _resolve_run

    args = _parser().parse_args(["run", "hare_lynx"])
    _resolve_run(args)
    assert (args.method, args.simulations, args.rounds, args.num_samples) == ("nle", 20_000, 8, 10_000)
    assert args.method_options == {"sampler": "slice", "flow": "maf", "linear_residual": True}
    args = _parser().parse_args(["run", "hare_lynx", "--method", "npe", "--rounds", "1", "-n", "500"])
    _resolve_run(args)
    assert (args.method, args.simulations, args.rounds) == ("npe", 500, 1)
    args = _parser().parse_args(["run", "gaussian_linear"])
    _resolve_run(args)
    assert (args.method, args.simulations, args.rounds) == ("implicit-vi", 10_000, 1)


def test_a_simulators_method_options_go_with_its_own_method_only(monkeypatch):
    from implicitbayes.cli import _parser, _resolve_run
    from simulators.hare_lynx import HareLynx

    monkeypatch.setattr(HareLynx, "run_defaults", {"method": "nle", "method_options": {"sampler": "slice", "flow": "maf"}})
    for argv, method, options in [
            ([], "nle", {"sampler": "slice", "flow": "maf"}),
            (["--method-option", "flow=nsf"], "nle", {"sampler": "slice", "flow": "nsf"}),  # the command line wins
            (["--method", "nle", "--method-option", "warmup=50"], "nle", {"sampler": "slice", "flow": "maf", "warmup": 50}),
            (["--method", "npe"], "npe", {})]:
        args = _parser().parse_args(["run", "hare_lynx", *argv])
        _resolve_run(args)
        assert (args.method, args.method_options) == (method, options), argv
    assert HareLynx.run_defaults["method_options"] == {"sampler": "slice", "flow": "maf"}  # not consumed


def test_run_on_real_data_in_rounds_compares_with_the_reference(tmp_path, capsys):
    import json

    out = tmp_path / "hl"
    assert main(["run", "hare_lynx", "--method", "npe", "--rounds", "2", "-n", "600", "--num-samples", "500",
                 "--method-option", "training={'max_steps': 40}", "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "round 2: 300 simulations" in text and "against the reference posterior" in text and "sigma_lynx" in text
    record = json.loads((out / "reference.json").read_text())
    assert set(record["parameters"]) == {"alpha", "beta", "gamma", "delta", "u0", "v0", "sigma_hare", "sigma_lynx"}
    assert 0.5 <= record["c2st"] <= 1.0 and (out / "ppc.png").stat().st_size > 0
    assert main(["run", "hare_lynx", "--rounds", "2", "--max-steps", "5", "--out", str(tmp_path / "x")]) == 2
    assert "applies to one fit" in capsys.readouterr().err
