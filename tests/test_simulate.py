"""ib.simulate and ib.SimulationSet: seeding, executors, invalid outputs, errors, store, files."""

import concurrent.futures as cf
import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import implicitbayes as ib
from tests.processes import kill_9_when
from tests.models import (flaky_model, gaussian_model, hierarchical_model, mostly_invalid_model, numpy_model,
                          partly_invalid_model, raising_model)

ROOT = Path(__file__).resolve().parents[1]


def same(a: ib.SimulationSet, b: ib.SimulationSet) -> bool:
    return (a.latent_names == b.latent_names and a.observed_names == b.observed_names
            and torch.equal(a.index, b.index) and all(torch.equal(a[n], b[n]) for n in a.keys()))


def test_shapes_names_and_joint_distribution():
    data = ib.simulate(gaussian_model, 4000, observed="x", seed=0, progress=False)
    assert len(data) == 4000 and data.latent_names == ("theta",) and data.observed_names == ("x",)
    assert data["theta"].shape == (4000, 2) and data["x"].shape == (4000, 2)
    resid = data["x"] - data["theta"]
    # x | theta ~ N(theta, 0.1^2): residual sd 0.1 within 5 % (n = 8000 values, se 0.8 %)
    assert abs(resid.std().item() - 0.1) < 0.005
    assert data["theta"].min() >= -1 and data["theta"].max() <= 1
    assert torch.equal(data.index, torch.arange(4000))


def test_same_seed_same_result_and_global_rng_untouched():
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    a = ib.simulate(gaussian_model, 500, observed="x", seed=11, batch_size=128, progress=False)
    after = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    b = ib.simulate(gaussian_model, 500, observed="x", seed=11, batch_size=128, progress=False)
    c = ib.simulate(gaussian_model, 500, observed="x", seed=12, batch_size=128, progress=False)
    assert same(a, b) and not torch.equal(a["x"], c["x"])
    assert a.meta["seed"] == 11 and a.meta["batch_size"] == 128


def test_seed_none_is_recorded_and_reproducible():
    a = ib.simulate(gaussian_model, 100, observed="x", progress=False)
    b = ib.simulate(gaussian_model, 100, observed="x", seed=a.meta["seed"], progress=False)
    assert same(a, b)


def test_numpy_simulator_is_seeded_too():
    a = ib.simulate(numpy_model, 50, observed="x", seed=3, batch_size=20, progress=False)
    b = ib.simulate(numpy_model, 50, observed="x", seed=3, batch_size=20, progress=False)
    assert same(a, b)


def test_trial_runs_are_shared_only_inside_one_call():
    """Inside ``shared_trial_runs`` (what fits, sequential runs and MCMC enter) a model is traced
    for its shapes once; outside, every call traces anew, so a model that reads a global the user
    changed between two calls is seen as it is now."""
    from implicitbayes.simulate import model_sites, shared_trial_runs

    size = [2]

    def model():
        theta = pyro.sample("theta", dist.Normal(torch.zeros(size[0]), 1.0).to_event(1))
        return pyro.sample("x", ib.Implicit(lambda t: t + 1, theta, event_shape=(size[0],)))

    shape = lambda: {s.name: s.shape for s in model_sites(model, ["x"])[0]}  # noqa: E731
    assert shape() == {"theta": (2,), "x": (2,)}
    size[0] = 3
    assert shape() == {"theta": (3,), "x": (3,)}
    with shared_trial_runs():
        assert shape() == {"theta": (3,), "x": (3,)}
        size[0] = 4
        assert shape() == {"theta": (3,), "x": (3,)}  # shared: traced once in the context
    assert shape() == {"theta": (4,), "x": (4,)}


def test_hierarchical_model_with_latent_implicit_site():
    data = ib.simulate(hierarchical_model, 300, observed="x", seed=0, progress=False)
    assert data.latent_names == ("mu", "z") and data.site_shapes == {"mu": (), "z": (4,), "x": (4, 3)}
    # z_n | mu ~ N(mu, 1): var(z - mu) = 1 (n = 1200 values: se ≈ 0.04)
    assert abs((data["z"] - data["mu"][:, None]).var().item() - 1.0) < 0.15


def test_process_pool_gives_the_local_result():
    local = ib.simulate(gaussian_model, 1000, observed="x", seed=5, batch_size=100, progress=False)
    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        remote = ib.simulate(gaussian_model, 1000, observed="x", seed=5, batch_size=100, executor=pool,
                             progress=False)
    assert same(local, remote)


def test_dask_local_cluster_gives_the_local_result():
    distributed = pytest.importorskip("dask.distributed")
    local = ib.simulate(gaussian_model, 600, observed="x", seed=8, batch_size=100, progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        remote = ib.simulate(gaussian_model, 600, observed="x", seed=8, batch_size=100,
                             executor=client.get_executor(), progress=False)
    assert same(local, remote)


def test_dask_worker_killed_mid_run_gives_the_undisturbed_result():
    distributed = pytest.importorskip("dask.distributed")
    import threading

    from tests.models import sleepy_model

    local = ib.simulate(sleepy_model, 400, observed="x", seed=13, batch_size=10, progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        pids = client.run(os.getpid)  # {worker address: pid}
        victim = next(iter(pids.values()))
        killed = threading.Event()

        def kill_soon():  # 40 chunks of 0.1 s on 2 workers: about 2 s; kill one worker at 0.6 s
            time.sleep(0.6)
            os.kill(victim, signal.SIGKILL)
            killed.set()

        threading.Thread(target=kill_soon, daemon=True).start()
        t0 = time.perf_counter()
        remote = ib.simulate(sleepy_model, 400, observed="x", seed=13, batch_size=10,
                             executor=client.get_executor(), progress=False)
        assert killed.is_set() and time.perf_counter() - t0 > 0.6, "the run ended before the worker was killed"
        assert victim not in client.run(os.getpid).values()  # the nanny restarted it: a new process
    assert same(local, remote) and remote.num_invalid == 0


def test_invalid_outputs_are_dropped_counted_and_reported():
    with pytest.warns(UserWarning, match=r"NaN/inf outputs; parameters of those: theta ∈ \[0\.6"):
        data = ib.simulate(partly_invalid_model, 2000, observed="x", seed=1, progress=False)
    # P(theta_0 > 0.6) = 0.2 under U(-1, 1): about 400 of 2000 dropped
    assert 300 < data.num_invalid < 500 and len(data) + data.num_invalid == 2000
    assert torch.isfinite(data["x"]).all() and (data["theta"][:, 0] <= 0.6).all()
    kept = set(data.index.tolist())
    assert len(kept) == len(data) and kept <= set(range(2000))


def test_mostly_invalid_is_an_error():
    with pytest.raises(ib.SimulationError, match="More than half"):
        ib.simulate(mostly_invalid_model, 500, observed="x", seed=0, progress=False)


def test_on_error_drop_drops_exactly_the_failing_simulations():
    # raising_simulator fails a whole call if any theta_0 > 0.9 (P = 5 % per simulation): the
    # bisection keeps the rest of each failing chunk and drops only those simulations
    with pytest.warns(UserWarning, match=r"dropped \d+ failing simulation\(s\).*\n  simulation \d+: theta=\[0\.9"):
        data = ib.simulate(raising_model, 400, observed="x", seed=0, batch_size=100, on_error="drop",
                           retries=1, progress=False)
    failed = data.meta["failed_indices"]
    assert 5 <= len(failed) <= 40 and data.num_invalid == len(failed)
    assert (data["theta"][:, 0] <= 0.9).all()
    # never a lost or duplicated simulation: kept and failed indices partition range(400)
    kept = data.index.tolist()
    assert len(set(kept)) == len(kept) and set(kept).isdisjoint(failed)
    assert sorted(kept + failed) == list(range(400))
    # gaussian_model draws its latents exactly like raising_model: the same seed gives the same
    # theta for every index, so the dropped ones are exactly those with theta_0 > 0.9
    reference = ib.simulate(gaussian_model, 400, observed="x", seed=0, batch_size=100, progress=False)
    assert torch.equal(reference["theta"][data.index], data["theta"])
    assert failed == (reference["theta"][:, 0] > 0.9).nonzero().flatten().tolist()


def test_failing_simulations_are_named_with_their_parameters():
    with pytest.raises(ib.SimulationError, match=r"failed on their own.*\n  simulation \d+: theta=\[0\.9\d+, "
                                                  r"-?\d\.\d+\] \(RuntimeError: simulator exploded\)"):
        ib.simulate(raising_model, 400, observed="x", seed=0, batch_size=100, progress=False)


def test_retries_absorb_transient_failures_exactly():
    undisturbed = ib.simulate(gaussian_model, 300, observed="x", seed=6, batch_size=50, progress=False)
    # without retries the bisection re-runs a failed chunk under a sub-seed: complete, not identical
    rerun = ib.simulate(flaky_model, 300, observed="x", seed=6, batch_size=50, progress=False)
    assert len(rerun) == 300 and rerun.num_invalid == 0 and not torch.equal(rerun["x"], undisturbed["x"])
    retried = ib.simulate(flaky_model, 300, observed="x", seed=6, batch_size=50, retries=1, progress=False)
    assert same(undisturbed, retried) and retried.num_invalid == 0


def test_failures_survive_resumption_from_a_store(tmp_path):
    kw = dict(observed="x", seed=0, batch_size=100, on_error="drop", progress=False)
    with pytest.warns(UserWarning, match="failing simulation"):
        first = ib.simulate(raising_model, 400, store=tmp_path / "s", **kw)
    with pytest.warns(UserWarning, match="failing simulation"):
        resumed = ib.simulate(raising_model, 400, store=tmp_path / "s", **kw)
    assert same(first, resumed) and resumed.num_invalid == first.num_invalid > 0
    assert resumed.meta["failed_indices"] == first.meta["failed_indices"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_simulations=0), "num_simulations"),
    (dict(num_simulations=-3), "num_simulations"),
    (dict(num_simulations=2.5), "num_simulations"),
    (dict(batch_size=0), "batch_size"),
    (dict(observed="y"), r"observed: \['y'\] is not a site of the model; its sample sites are \['theta', 'x'\]"),
    (dict(observed=[]), "observed"),
    (dict(device="tpu9"), "device"),
    (dict(seed=-1), "seed"),
    (dict(on_error="ignore"), "on_error"),
    (dict(retries=-1), "retries"),
])
def test_bad_arguments_fail_early(kwargs, match):
    args = dict(num_simulations=10, observed="x", progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ib.simulate(gaussian_model, **args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_absent_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        ib.simulate(gaussian_model, 10, observed="x", device="cuda", progress=False)


def test_executor_must_be_an_executor():
    with pytest.raises(TypeError, match="executor"):
        ib.simulate(gaussian_model, 10, observed="x", executor=object(), progress=False)


def test_observed_site_conditioned_in_the_model_is_an_error():
    conditioned = pyro.condition(gaussian_model, data={"x": torch.zeros(2)})
    with pytest.raises(ValueError, match="already conditioned"):
        ib.simulate(conditioned, 10, observed="x", progress=False)


@pytest.mark.gpu
def test_simulate_on_gpu():
    data = ib.simulate(gaussian_model, 1000, observed="x", seed=0, device="cuda", progress=False)
    assert data["x"].device.type == "cuda"
    again = ib.simulate(gaussian_model, 1000, observed="x", seed=0, device="cuda", progress=False)
    assert torch.equal(data["x"], again["x"])


# -- store -------------------------------------------------------------------------------
def test_store_resumes_missing_chunks_exactly(tmp_path):
    full = ib.simulate(gaussian_model, 300, observed="x", seed=4, batch_size=40, progress=False)
    store = tmp_path / "store"
    first = ib.simulate(gaussian_model, 300, observed="x", seed=4, batch_size=40, store=store, progress=False)
    assert same(full, first)
    chunks = sorted(store.glob("chunk-*.safetensors"))
    assert len(chunks) == 8
    for p in chunks[2:5]:
        p.unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in chunks[:2]}
    resumed = ib.simulate(gaussian_model, 300, observed="x", seed=4, batch_size=40, store=store, progress=False)
    assert same(full, resumed)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # kept chunks were not redone


def test_store_grows_and_takes_its_seed(tmp_path):
    store = tmp_path / "s"
    ib.simulate(gaussian_model, 100, observed="x", seed=9, batch_size=30, store=store, progress=False)
    grown = ib.simulate(gaussian_model, 200, observed="x", batch_size=30, store=store, progress=False)
    assert same(grown, ib.simulate(gaussian_model, 200, observed="x", seed=9, batch_size=30, progress=False))


def test_store_with_other_settings_is_refused(tmp_path):
    store = tmp_path / "s"
    ib.simulate(gaussian_model, 50, observed="x", seed=1, batch_size=10, store=store, progress=False)
    with pytest.raises(ib.StoreMismatchError, match="batch_size: store has 10, asked 20"):
        ib.simulate(gaussian_model, 50, observed="x", seed=1, batch_size=20, store=store, progress=False)
    with pytest.raises(ib.StoreMismatchError, match="seed"):
        ib.simulate(gaussian_model, 50, observed="x", seed=2, batch_size=10, store=store, progress=False)


def test_store_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a simulation store"):
        ib.simulate(gaussian_model, 10, observed="x", seed=0, store=tmp_path, progress=False)


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_result(tmp_path):
    store = tmp_path / "store"
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import implicitbayes as ib; "
              "from tests.models import sleepy_model; "
              f"ib.simulate(sleepy_model, 200, observed='x', seed=21, batch_size=10, store={str(store)!r}, progress=False)")
    kill_9_when(script, lambda: len(list(store.glob("chunk-*.safetensors"))) >= 5, timeout=120)
    written = len(list(store.glob("chunk-*.safetensors")))
    assert 5 <= written < 20, "kill came too late to test resumption"
    resumed = ib.simulate(sleepy_model_local(), 200, observed="x", seed=21, batch_size=10, store=store, progress=False)
    reference = ib.simulate(sleepy_model_local(), 200, observed="x", seed=21, batch_size=10, progress=False)
    assert same(resumed, reference)
    assert not list(store.glob(".*.tmp")), "stale temporary files left in the store"


def sleepy_model_local():
    from tests.models import sleepy_model

    return sleepy_model


# -- SimulationSet ------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    data = ib.simulate(hierarchical_model, 50, observed="x", seed=0, progress=False)
    data.save(tmp_path / "d.safetensors")
    back = ib.SimulationSet.load(tmp_path / "d.safetensors")
    assert same(data, back) and back.meta == data.meta and back.num_invalid == data.num_invalid


def test_loading_corrupt_truncated_or_foreign_files_is_a_clear_error(tmp_path):
    data = ib.simulate(gaussian_model, 20, observed="x", seed=0, progress=False)
    good = tmp_path / "good.safetensors"
    data.save(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ib.FormatError, match="truncated.safetensors"):
        ib.SimulationSet.load(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x80\x04not a safetensors file at all")
    with pytest.raises(ib.FormatError, match="garbage.safetensors"):
        ib.SimulationSet.load(garbage)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(ib.FormatError, match="not one written by implicitbayes"):
        ib.SimulationSet.load(foreign)
    with pytest.raises(FileNotFoundError):
        ib.SimulationSet.load(tmp_path / "missing.safetensors")


def test_extend_subset_to():
    a = ib.simulate(gaussian_model, 30, observed="x", seed=0, progress=False)
    b = ib.simulate(gaussian_model, 20, observed="x", seed=1, progress=False)
    n = len(a)
    a.extend(b)
    assert len(a) == n + 20 and torch.equal(a["x"][n:], b["x"])
    sub = a.subset(torch.arange(5))
    assert len(sub) == 5 and torch.equal(sub["theta"], a["theta"][:5])
    assert a.to("cpu")["x"].device.type == "cpu"
    other = ib.simulate(hierarchical_model, 5, observed="x", seed=0, progress=False)
    with pytest.raises(ValueError, match="sites differ"):
        a.extend(other)
    with pytest.raises(KeyError, match="sites: "):
        a["nope"]


# -- a store's result is memory-mapped -------------------------------------------------------
def test_store_result_is_memory_mapped_and_equal_to_the_in_memory_one(tmp_path):
    kw = dict(observed="x", seed=2, batch_size=64, progress=False)
    with pytest.warns(UserWarning, match="NaN/inf"):
        plain = ib.simulate(partly_invalid_model, 500, **kw)
    with pytest.warns(UserWarning, match="NaN/inf"):
        stored = ib.simulate(partly_invalid_model, 500, store=tmp_path / "s", **kw)
    assert stored.is_memory_mapped and not plain.is_memory_mapped
    assert same(plain, stored) and stored.num_invalid == plain.num_invalid
    # opened again, without simulating: the same set, memory-mapped, with its provenance
    opened = ib.SimulationSet.load(tmp_path / "s")
    assert opened.is_memory_mapped and same(plain, opened) and opened.num_invalid == plain.num_invalid
    assert opened.meta["seed"] == 2 and opened.meta["store"] == str(tmp_path / "s")
    # copies are ordinary tensors
    assert not opened.subset(torch.arange(10)).is_memory_mapped


def test_store_set_is_rebuilt_when_the_store_grows_and_checked_on_open(tmp_path):
    kw = dict(observed="x", seed=2, batch_size=64, progress=False)
    ib.simulate(gaussian_model, 200, store=tmp_path / "s", **kw)
    grown = ib.simulate(gaussian_model, 300, store=tmp_path / "s", **kw)
    reference = ib.simulate(gaussian_model, 300, **kw)
    assert same(grown, reference)
    del grown  # it maps the file damaged below
    raw = tmp_path / "s" / "set" / "x.bin"
    raw.write_bytes(raw.read_bytes()[:-8])
    with pytest.raises(ib.FormatError, match=r"x\.bin: expected 2400 bytes .* found 2392"):
        ib.SimulationSet.load(tmp_path / "s")
    # simulate(store=...) does not trust a damaged set either: it rebuilds it from the chunks
    with pytest.raises(ib.FormatError):
        ib.SimulationSet.load(tmp_path / "s")
    again = ib.simulate(gaussian_model, 300, store=tmp_path / "s", **kw)
    assert same(reference, again)
    with pytest.raises(ib.FormatError, match="not a complete simulation store"):
        ib.SimulationSet.load(tmp_path)


def test_training_on_a_memory_mapped_set_equals_training_in_memory(tmp_path):
    kw = dict(observed="x", seed=3, progress=False)
    plain = ib.simulate(gaussian_model, 1500, **kw)
    mapped = ib.simulate(gaussian_model, 1500, store=tmp_path / "s", **kw)
    x = torch.tensor([0.3, -0.2])
    for method in (ib.NPE, ib.ImplicitVI):
        a = method(gaussian_model, observed="x").fit(plain, max_steps=60, seed=0, progress=False)
        b = method(gaussian_model, observed="x").fit(mapped, max_steps=60, seed=0, progress=False)
        assert torch.equal(a.sample(200, x, seed=1)["theta"], b.sample(200, x, seed=1)["theta"]), method.__name__


def test_a_simulator_sees_the_size_of_the_whole_run(tmp_path):
    """``planned_simulations`` tells a simulator with a one-off cost how many simulations the
    run has left in all, not the chunk: every chunk of a 300-run sees 300; resumed from a
    store with 3 chunks of 40 missing, 120; outside a run, None."""
    from implicitbayes.simulate import planned_simulations

    seen = []

    def model():
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        seen.append(planned_simulations())
        return pyro.sample("x", ib.Implicit(lambda t: t + 1.0, theta, event_shape=()))

    store = tmp_path / "store"
    ib.simulate(model, 300, observed="x", seed=4, batch_size=40, store=store, progress=False)
    assert seen[-8:] == [300] * 8  # the trial run before the chunks sees no plan
    for p in sorted(store.glob("chunk-*.safetensors"))[2:5]:
        p.unlink()
    seen.clear()
    ib.simulate(model, 300, observed="x", seed=4, batch_size=40, store=store, progress=False)
    assert seen[-3:] == [120] * 3
    assert planned_simulations() is None
