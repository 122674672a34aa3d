"""The implicitbayes command: list, simulate (resumable), demo; errors as messages."""

import subprocess
import sys

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
