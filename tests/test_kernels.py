"""Kernels compiled ahead of time and kept on disk (implicitbayes.kernels)."""

import os
import signal
import warnings

import pytest
import torch

from implicitbayes.kernels import AOTKernel, cache_dir


def _affine(x, y, *, scale: float):
    return x * scale + y.sin(), (x - y).abs()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IMPLICITBAYES_CACHE", str(tmp_path))
    return tmp_path / "kernels"


def test_a_kernel_is_built_once_and_loaded_from_disk_by_a_fresh_instance(cache, monkeypatch):
    assert cache_dir() == cache
    kernel = AOTKernel(_affine, name="affine", sources=(_affine,))
    x, y = torch.randn(5), torch.randn(5)
    assert not kernel.built(x.device, x.dtype, {"scale": 2.0})
    out = kernel.get((x, y), {"scale": 2.0})(x, y)
    assert kernel.built(x.device, x.dtype, {"scale": 2.0})
    for got, want in zip(out, _affine(x, y, scale=2.0)):
        torch.testing.assert_close(got, want)

    # a new instance (as in a new process) finds the package: loads it without building
    fresh = AOTKernel(_affine, name="affine", sources=(_affine,))
    monkeypatch.setattr(AOTKernel, "_build", lambda *a: pytest.fail("built again"))
    assert fresh.loaded(x.device, x.dtype, {"scale": 2.0}) is None
    big_x, big_y = torch.randn(1000), torch.randn(1000)  # any batch size: one package
    got = fresh.get((big_x, big_y), {"scale": 2.0})(big_x, big_y)
    torch.testing.assert_close(got[0], _affine(big_x, big_y, scale=2.0)[0])
    # other constants are another package
    assert fresh.path(x.device, x.dtype, {"scale": 3.0}) != fresh.path(x.device, x.dtype, {"scale": 2.0})
    assert not fresh.built(x.device, x.dtype, {"scale": 3.0})


def test_a_kernel_that_cannot_be_built_runs_eagerly_and_says_so_once(cache, monkeypatch):
    def no_compiler(*args):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(AOTKernel, "_build", no_compiler)
    kernel = AOTKernel(_affine, name="affine", sources=(_affine,))
    x, y = torch.randn(4), torch.randn(4)
    with pytest.warns(UserWarning, match="affine: the compiled kernel is unavailable.*no C\\+\\+ compiler"):
        fn = kernel.get((x, y), {"scale": 2.0})
    torch.testing.assert_close(fn(x, y)[0], x * 2.0 + y.sin())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernel.get((x, y), {"scale": 2.0})  # decided once per process: no second warning
    assert not kernel.built(x.device, x.dtype, {"scale": 2.0})


def _crashes_when_built(x, y, *, scale: float):
    """Segfaults in any process but the test's own (the build process), as a broken compiler would."""
    if os.environ.get("IB_TEST_PARENT_PID") not in (None, str(os.getpid())):
        os.kill(os.getpid(), signal.SIGSEGV)
    return x * scale + y.sin(), (x - y).abs()


def test_a_build_that_crashes_its_process_leaves_the_caller_running_eagerly(cache, monkeypatch):
    monkeypatch.setenv("IB_TEST_PARENT_PID", str(os.getpid()))
    kernel = AOTKernel(_crashes_when_built, name="crash", sources=(_crashes_when_built,))
    x, y = torch.randn(4), torch.randn(4)
    with pytest.warns(UserWarning, match="crash: the compiled kernel is unavailable.*crashed with signal 11"):
        fn = kernel.get((x, y), {"scale": 2.0})
    torch.testing.assert_close(fn(x, y)[0], x * 2.0 + y.sin())
    assert not kernel.built(x.device, x.dtype, {"scale": 2.0}) and not list(cache.glob("*.tmp.pt2"))
    # a later process does not pay for the failed build again (it took two minutes on one GPU)
    monkeypatch.setattr(AOTKernel, "_build_in_child", lambda *a: pytest.fail("built again"))
    with pytest.warns(UserWarning, match="build failed on this machine before.*crashed with signal 11.*delete"):
        AOTKernel(_crashes_when_built, name="crash", sources=(_crashes_when_built,)).get((x, y), {"scale": 2.0})


def test_a_package_that_disagrees_with_the_eager_kernel_is_removed_and_refused(cache):
    # the package built for scale 3 put where scale 2's belongs: a wrong kernel on disk
    kernel = AOTKernel(_affine, name="affine", sources=(_affine,))
    x, y = torch.randn(5), torch.randn(5)
    kernel.get((x, y), {"scale": 3.0})
    right, wrong = kernel.path(x.device, x.dtype, {"scale": 2.0}), kernel.path(x.device, x.dtype, {"scale": 3.0})
    right.write_bytes(wrong.read_bytes())
    fresh = AOTKernel(_affine, name="affine", sources=(_affine,))
    with pytest.warns(UserWarning, match="affine: the compiled kernel is unavailable.*disagrees with the eager kernel"):
        fn = fresh.get((x, y), {"scale": 2.0})
    torch.testing.assert_close(fn(x, y)[0], x * 2.0 + y.sin())
    assert not right.exists() and wrong.exists()
