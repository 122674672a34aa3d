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
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

__all__ = ["cache_dir", "AOTKernel"]

#: rows of a call's tensors on which a loaded package is checked against the eager kernel
CHECK_ROWS = 64


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
        fn: the kernel; tensors in, a tuple of tensors out; traceable by ``torch.export``;
            pure (its outputs a function of its inputs: a loaded package is checked against it).
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
        torch without AOTInductor packaging, a build that crashed), warns once and returns ``fn``
        itself; a failed build is not tried again by later processes until its ``.failed`` note
        beside the package is deleted (a new torch version tries afresh)."""
        device, dtype = example[0].device, example[0].dtype
        path = self.path(device, dtype, constants)
        fn = self._loaded.get(str(path))
        if fn is None:
            try:
                if not path.is_file():
                    failed = _failed_note(path)
                    if failed.is_file():
                        raise RuntimeError(f"its build failed on this machine before ({failed.read_text().strip()}); "
                                           f"delete {failed} to try again")
                    self._build(path, example, constants)
                fn = self._load(path, device)
                self._check(fn, example, constants, path)
            except Exception as e:  # a missing toolchain or an old torch: eager, said once
                warnings.warn(f"{self.name}: the compiled kernel is unavailable ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); running eagerly",
                              stacklevel=3)
                fn = _eager(self.fn, constants)
            self._loaded[str(path)] = fn
        return fn

    def _check(self, compiled: Callable, example: Sequence[torch.Tensor], constants: Mapping, path: Path) -> None:
        """The package against ``fn`` on the first rows of the call's own tensors, once per
        process: one that disagrees (a miscompile, or a package damaged on disk; one built while
        another build ran on the machine was seen to return zeros) is removed and refused."""
        rows = tuple(t[:CHECK_ROWS] for t in example)
        got, want = compiled(*rows), self.fn(*rows, **constants)
        bad = [i for i, (g, w) in enumerate(zip(got, want)) if g.shape != w.shape
               or not torch.allclose(g.double(), w.double(), rtol=1e-3, atol=1e-3, equal_nan=True)]
        if bad or len(got) != len(want):
            path.unlink(missing_ok=True)
            raise RuntimeError(f"the package {path.name} disagrees with the eager kernel (outputs {bad}); it was "
                               "removed, and the next process builds it again")

    def _build(self, path: Path, example: Sequence[torch.Tensor], constants: Mapping) -> None:
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if path.is_file():  # built by another process meanwhile
                return
            sys.stderr.write(f"{self.name}: building the compiled kernel for {example[0].device} "
                             f"(once per machine and torch version; ≈ 25 s) into {path.parent}\n")
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")
            try:
                if getattr(self.fn, "__module__", "__main__") == "__main__" or "<locals>" in self.fn.__qualname__:
                    _export_and_package(self.fn, constants, example, tmp)  # not importable: built here
                else:
                    self._build_in_child(example, constants, tmp)
                os.replace(tmp, path)
            except Exception as e:
                _failed_note(path).write_text(f"{type(e).__name__}: {str(e).strip()[:500]}\n")
                raise
            finally:
                tmp.unlink(missing_ok=True)

    def _build_in_child(self, example: Sequence[torch.Tensor], constants: Mapping, tmp: Path) -> None:
        """Build, load and run the package once in a separate Python process: a compiler or
        runtime that crashes (a segfault in AOTInductor's build for one torch and GPU was seen)
        takes that process down, not the caller's, whose kernel then runs eagerly."""
        spec = {"module": self.fn.__module__, "qualname": self.fn.__qualname__, "constants": dict(constants),
                "example": [[list(t.shape), str(t.dtype).removeprefix("torch."), str(t.device)] for t in example],
                "out": str(tmp)}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        done = subprocess.run([sys.executable, "-c", "import sys, json; from implicitbayes.kernels import "
                               "_build_from_spec; _build_from_spec(json.loads(sys.argv[1]))", json.dumps(spec)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0 or not tmp.is_file():
            how = (f"crashed with signal {-done.returncode}" if done.returncode < 0
                   else f"exited with status {done.returncode}")
            last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no message"
            raise RuntimeError(f"the build process {how} ({last})")

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


def _failed_note(path: Path) -> Path:
    return path.with_name(path.name + ".failed")


def _export_and_package(fn: Callable, constants: Mapping, example: Sequence[torch.Tensor], out: Path) -> None:
    from torch import _inductor

    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():  # the compiler stack's own deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.export.export(_Bound(fn, constants), tuple(example),
                                      dynamic_shapes=(tuple({0: batch} for _ in example),))
        _inductor.aoti_compile_and_package(program, package_path=str(out))


def _build_from_spec(spec: Mapping) -> None:
    """The build process (``AOTKernel._build_in_child``): the kernel function by its module and
    name, example tensors of the given shapes, dtypes and device; the package is loaded and run
    once before the process exits 0."""
    import importlib

    fn = importlib.import_module(spec["module"])
    for part in spec["qualname"].split("."):
        fn = getattr(fn, part)
    example = tuple(torch.ones(shape, dtype=getattr(torch, dtype), device=device)
                    for shape, dtype, device in spec["example"])
    out = Path(spec["out"])
    _export_and_package(fn, spec["constants"], example, out)
    AOTKernel._load(out, example[0].device)(*example)
    if example[0].device.type == "cuda":
        torch.cuda.synchronize()


def _eager(fn: Callable, constants: Mapping) -> Callable:
    constants = dict(constants)
    return lambda *tensors: fn(*tensors, **constants)
