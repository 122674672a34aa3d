"""Saving and loading without pickle: safetensors for tensors, JSON for everything else.

Every file written here is a safetensors file whose header metadata holds one JSON document
under the key ``"implicitbayes"`` with ``{"kind": ..., "format_version": ..., ...}``. Loading
checks both, so a foreign, corrupt or future file fails with a message naming the file. Writes
go to a temporary file in the same directory and are renamed into place, so a crash (even
``kill -9``) leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import FormatError

__all__ = ["save_tensors", "load_tensors", "atomic_write_text", "unlink_stale_temporaries", "FORMAT_KEY"]

FORMAT_KEY = "implicitbayes"


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file + rename)."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    _atomic_replace(Path(path), write)


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """BLAKE2b of the tensors' names, dtypes, shapes and bytes: safetensors has no checksum of
    its own, and a flipped byte in the data would otherwise load as a wrong number."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        v = tensors[name]
        h.update(f"{name}|{v.dtype}|{tuple(v.shape)}|".encode())
        if v.numel():
            h.update(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if v.dtype != torch.bool
                     else v.contiguous().numpy().tobytes())
    return h.hexdigest()


def unlink_stale_temporaries(path: str | os.PathLike) -> None:
    """Remove temporary files a writer of ``path`` left when it was killed mid-write."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], *, kind: str, version: int,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Atomically write ``tensors`` (moved to CPU, made contiguous) and JSON ``meta``, with a
    checksum of the tensors that :func:`load_tensors` verifies."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {"kind": kind, "format_version": version, **(meta or {}), "checksum": _digest(cpu)}
    _atomic_replace(Path(path), lambda tmp: save_file(cpu, tmp, metadata={FORMAT_KEY: json.dumps(header)}))


def load_tensors(
    path: str | os.PathLike, *, kind: str, max_version: int, device: str | torch.device | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`, checking its kind and format version.

    Returns ``(tensors, meta)``. Raises :class:`FormatError` naming the file on anything wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(FORMAT_KEY)
        tensors = load_file(str(path), device=str(device) if device is not None else "cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FormatError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    if raw is None:
        raise FormatError(f"{path}: a safetensors file, but not one written by implicitbayes (no '{FORMAT_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: corrupt implicitbayes metadata: {e}") from e
    if meta.get("kind") != kind:
        raise FormatError(f"{path}: holds a {meta.get('kind')!r}, expected a {kind!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > max_version or version < 1:
        raise FormatError(
            f"{path}: format version {version!r} is not supported by this implicitbayes "
            f"(reads versions 1..{max_version}); upgrade implicitbayes"
        )
    checksum = meta.pop("checksum", None)
    if checksum is not None and checksum != _digest({k: v.cpu() for k, v in tensors.items()}):
        raise FormatError(f"{path}: corrupt file: its tensors do not match the checksum written with them")
    return tensors, meta
