"""Kernels compiled ahead of time and kept on disk (implicitbayes.kernels)."""

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
