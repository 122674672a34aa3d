"""Tensor kernels compiled once and kept: AOTInductor packages in an on-disk cache.

A simulator's inner step (a pure function of tensors whose first dimension is the batch) is
exported with ``torch.export``, compiled by AOTInductor into a ``.pt2`` package and stored
under :func:`cache_dir`, keyed by the torch version, the source of the functions it is made
of, the device, the dtype and the constants baked into it. Building takes tens of seconds on
one core, once per key; a later process loads the package in milliseconds, so the compiled
path costs nothing at the first call of a run. Builds by concurrent processes are serialised
by a file lock (the second one finds the package built).

``torch.compile`` in each process would recompile (a cold compile ≈ 25 s) or read Inductor's
cache (a warm one still ≈ 3 s of tracing): too much for the chunks that ``ib.simulate`` runs.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

__all__ = ["cache_dir", "AOTKernel"]


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$IMPLICITBAYES_CACHE/kernels``, else
    ``$XDG_CACHE_HOME/implicitbayes/kernels``, else ``~/.cache/implicitbayes/kernels``."""
    root = os.environ.get("IMPLICITBAYES_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "implicitbayes")
    return Path(root) / "kernels"


class _Bound(torch.nn.Module):
    """``fn(*tensors, **constants)`` as a module, for ``torch.export``."""

    def __init__(self, fn: Callable, constants: Mapping):
        super().__init__()
        self.fn, self.constants = fn, dict(constants)

    def forward(self, *tensors):
        return self.fn(*tensors, **self.constants)


class AOTKernel:
    """``fn(*tensors, **constants)`` compiled ahead of time, one package per device, dtype and
    constants, every tensor argument dynamic in its first (batch) dimension.

    Args:
        fn: the kernel; tensors in, a tuple of tensors out; traceable by ``torch.export``.
        name: file-name prefix of its packages.
        sources: the functions ``fn`` is made of (``fn`` itself included): their source text
            is part of the key, so editing any of them builds a new package.
    """

    def __init__(self, fn: Callable, *, name: str, sources: Sequence[Callable]):
        self.fn, self.name = fn, name
        self._source = hashlib.sha256("".join(inspect.getsource(f) for f in sources).encode()).hexdigest()
        self._loaded: dict[str, Callable] = {}

    def path(self, device: torch.device, dtype: torch.dtype, constants: Mapping) -> Path:
        dev = torch.device(device)
        text = "|".join([torch.__version__, self._source, str(dev), str(dtype),
                         repr(sorted((k, repr(v)) for k, v in constants.items()))])
        digest = hashlib.sha256(text.encode()).hexdigest()[:20]
        return cache_dir() / f"{self.name}-{dev.type}-{str(dtype).removeprefix('torch.')}-{digest}.pt2"

    def loaded(self, device, dtype, constants: Mapping) -> Callable | None:
        """The kernel if this process has it already (built, loaded or found unavailable)."""
        return self._loaded.get(str(self.path(device, dtype, constants)))

    def built(self, device, dtype, constants: Mapping) -> bool:
        """Whether the package is on disk (loading it costs milliseconds)."""
        return self.path(device, dtype, constants).is_file()

    def get(self, example: Sequence[torch.Tensor], constants: Mapping) -> Callable:
        """The compiled kernel for the device and dtype of ``example`` (tensors as ``fn`` takes
        them): loaded, or built first. Where it cannot be built or loaded (no C++ compiler, a
        torch without AOTInductor packaging), warns once and returns ``fn`` itself."""
        device, dtype = example[0].device, example[0].dtype
        path = self.path(device, dtype, constants)
        fn = self._loaded.get(str(path))
        if fn is None:
            try:
                if not path.is_file():
                    self._build(path, example, constants)
                fn = self._load(path, device)
            except Exception as e:  # a missing toolchain or an old torch: eager, said once
                warnings.warn(f"{self.name}: the compiled kernel is unavailable ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); running eagerly",
                              stacklevel=3)
                fn = _eager(self.fn, constants)
            self._loaded[str(path)] = fn
        return fn

    def _build(self, path: Path, example: Sequence[torch.Tensor], constants: Mapping) -> None:
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if path.is_file():  # built by another process meanwhile
                return
            from torch import _inductor

            sys.stderr.write(f"{self.name}: building the compiled kernel for {example[0].device} "
                             f"(once per machine and torch version; ≈ 25 s) into {path.parent}\n")
            batch = torch.export.Dim("batch", min=1)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")
            try:
                with warnings.catch_warnings():  # the compiler stack's own deprecation notices
                    warnings.simplefilter("ignore", DeprecationWarning)
                    warnings.simplefilter("ignore", FutureWarning)
                    program = torch.export.export(_Bound(self.fn, constants), tuple(example),
                                                  dynamic_shapes=(tuple({0: batch} for _ in example),))
                    _inductor.aoti_compile_and_package(program, package_path=str(tmp))
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

    @staticmethod
    def _load(path: Path, device: torch.device) -> Callable:
        index = -1 if device.type == "cpu" else (device.index if device.index is not None
                                                  else torch.cuda.current_device())
        try:  # the package's runner directly: no import of the compiler stack (≈ 1.5 s)
            runner = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, index)
            return lambda *tensors: tuple(runner.run(list(tensors)))
        except (AttributeError, TypeError):  # another torch's signature: the public loader
            from torch import _inductor

            model = _inductor.aoti_load_package(str(path))
            return lambda *tensors: tuple(model(*tensors))


def _eager(fn: Callable, constants: Mapping) -> Callable:
    constants = dict(constants)
    return lambda *tensors: fn(*tensors, **constants)
