"""Files and crashes: every loader refuses truncated, corrupted and foreign files with an error
naming the file, never executes code on load, and a ``kill -9`` in the middle of a write leaves
the previous file readable and resumable."""

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import implicitbayes as ib
from tests.models import gaussian_model
from tests.processes import kill_9_when

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this touches a marker file: proof that a loader executed code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _good_files(tmp: Path) -> dict[str, Path]:
    data = ib.simulate(gaussian_model, 200, observed="x", seed=0, progress=False)
    data.save(tmp / "set.safetensors")
    ib.NPE(gaussian_model, observed="x", training={"validate_every": 10}).fit(
        data, max_steps=20, seed=0, progress=False, checkpoint=tmp / "ckpt.safetensors").save(tmp / "post.safetensors")
    ib.simulate(gaussian_model, 40, observed="x", seed=0, batch_size=20, store=tmp / "store", progress=False)
    return {"set": tmp / "set.safetensors", "posterior": tmp / "post.safetensors",
            "checkpoint": tmp / "ckpt.safetensors", "chunk": tmp / "store" / "chunk-0000000.safetensors"}


def _load(kind: str, path: Path, tmp: Path):
    """Hand ``path`` to the loader of ``kind`` the way a user would reach it."""
    if kind == "set":
        return ib.SimulationSet.load(path)
    if kind == "posterior":
        return ib.load(path)
    if kind == "checkpoint":
        data = ib.simulate(gaussian_model, 200, observed="x", seed=0, progress=False)
        return ib.NPE(gaussian_model, observed="x", training={"validate_every": 10}).fit(
            data, max_steps=30, seed=0, progress=False, checkpoint=path)
    if kind == "chunk":  # the store resumes by reading its chunk files
        chunk = tmp / "store" / "chunk-0000000.safetensors"
        if path != chunk:
            chunk.write_bytes(path.read_bytes())
        return ib.simulate(gaussian_model, 40, observed="x", seed=0, batch_size=20, store=tmp / "store", progress=False)
    raise AssertionError(kind)


def _corrupt(how: str, good: Path, other: Path, tmp: Path) -> tuple[Path, str]:
    """A bad copy of ``good`` and the phrase its error must contain."""
    raw = good.read_bytes()
    bad = tmp / f"bad-{how}.safetensors"
    if how == "truncated":
        bad.write_bytes(raw[: len(raw) // 2])
        return bad, "truncated or corrupt"
    if how == "flipped_byte":  # the last byte belongs to the tensor data, not the header
        bad.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))
        return bad, "do not match the checksum"
    if how == "empty":
        bad.write_bytes(b"")
        return bad, "truncated or corrupt"
    if how == "pickle":
        bad.write_bytes(pickle.dumps(_Payload(tmp / "EXECUTED")))
        return bad, "truncated or corrupt"
    if how == "foreign_safetensors":
        save_file({"weight": torch.zeros(3)}, str(bad))
        return bad, "not one written by implicitbayes"
    if how == "other_kind":  # an implicitbayes file of another kind
        bad.write_bytes(other.read_bytes())
        return bad, "expected a"
    raise AssertionError(how)


KINDS = ["set", "posterior", "checkpoint", "chunk"]
HOWS = ["truncated", "flipped_byte", "empty", "pickle", "foreign_safetensors", "other_kind"]


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    return _good_files(tmp_path_factory.mktemp("good"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", HOWS)
def test_every_loader_refuses_bad_files_by_name(kind, how, good_files, tmp_path):
    shutil.copytree(good_files["chunk"].parent, tmp_path / "store")
    other = good_files["posterior" if kind != "posterior" else "set"]
    bad, phrase = _corrupt(how, good_files[kind], other, tmp_path)
    if kind == "chunk":
        target = tmp_path / "store" / "chunk-0000000.safetensors"
        target.write_bytes(bad.read_bytes())
        bad = target
    with pytest.raises(ib.FormatError) as info:
        _load(kind, bad, tmp_path)
    assert str(bad) in str(info.value) and phrase in str(info.value)
    assert not (tmp_path / "EXECUTED").exists(), "a loader executed code from the file"


def test_corrupt_store_manifest_is_named(tmp_path):
    ib.simulate(gaussian_model, 40, observed="x", seed=0, batch_size=20, store=tmp_path / "s", progress=False)
    (tmp_path / "s" / "manifest.json").write_text('{"kind": "implicitbayes.Simul')
    with pytest.raises(ib.StoreMismatchError, match=r"manifest\.json is unreadable"):
        ib.simulate(gaussian_model, 40, observed="x", seed=0, batch_size=20, store=tmp_path / "s", progress=False)


def test_no_unsafe_deserialisation_in_the_library():
    """The library never unpickles: no pickle import, and torch.load only with weights_only=True."""
    offenders = []
    for f in (ROOT / "implicitbayes").rglob("*.py"):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if "import pickle" in code or "pickle.load" in code or "dill" in code or (
                    "torch.load(" in code and "weights_only=True" not in code):
                offenders.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, offenders


# -- kill -9 in the middle of a write ---------------------------------------------------------
_SLOW_WRITER = """
import sys, time
import implicitbayes.io as io
real = io.save_file
calls = [0]
def slow_save(tensors, path, metadata=None):
    calls[0] += 1
    if calls[0] == {nth}:  # write half of this file, then hang: the parent kills us here
        real(tensors, path, metadata=metadata)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        open({flag!r}, "w").write("writing")
        time.sleep(600)
    return real(tensors, path, metadata=metadata)
io.save_file = slow_save
"""


def _run_until_killed_mid_write(tmp_path: Path, nth: int, body: str) -> None:
    flag = tmp_path / "mid-write"
    kill_9_when(_SLOW_WRITER.format(nth=nth, flag=str(flag)) + body, flag.exists)


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    ckpt = tmp_path / "ckpt.safetensors"
    setup = ("import implicitbayes as ib\nfrom tests.models import gaussian_model\n"
             "data = ib.simulate(gaussian_model, 500, observed='x', seed=1, progress=False)\n"
             "method = ib.NPE(gaussian_model, observed='x', training={'validate_every': 10, 'patience': 1000})\n")
    # writes at steps 10, 20, 30: killed while writing the third (step 30)
    _run_until_killed_mid_write(tmp_path, 3, setup + f"method.fit(data, max_steps=60, seed=3, progress=False, "
                                                     f"checkpoint={str(ckpt)!r})\n")
    from implicitbayes.io import load_tensors

    _, meta = load_tensors(ckpt, kind="implicitbayes.Checkpoint", max_version=1)
    assert meta["step"] == 20, "the last complete checkpoint is the one before the killed write"
    assert list(tmp_path.glob(".ckpt.safetensors.*.tmp")), "the killed writer should have left its temporary"
    data = ib.simulate(gaussian_model, 500, observed="x", seed=1, progress=False)
    method = ib.NPE(gaussian_model, observed="x", training={"validate_every": 10, "patience": 1000})
    resumed = method.fit(data, max_steps=60, seed=3, progress=False, checkpoint=ckpt)
    assert not list(tmp_path.glob(".ckpt.safetensors.*.tmp")), "stale temporary not cleaned on resume"
    assert [h["step"] for h in resumed.training_summary["history"]] == [10, 20, 30, 40, 50, 60]
    straight = method.fit(data, max_steps=60, seed=3, progress=False)
    x = torch.tensor([0.2, -0.3])
    assert torch.equal(resumed.sample(100, x, seed=0)["theta"], straight.sample(100, x, seed=0)["theta"])


def test_kill_9_during_a_chunk_write_keeps_the_store_resumable(tmp_path):
    store = tmp_path / "store"
    body = ("import implicitbayes as ib\nfrom tests.models import gaussian_model\n"
            f"ib.simulate(gaussian_model, 200, observed='x', seed=5, batch_size=20, store={str(store)!r}, "
            "progress=False)\n")
    _run_until_killed_mid_write(tmp_path, 4, body)  # chunks 0-2 written, killed writing chunk 3
    assert sorted(p.name for p in store.glob("chunk-*.safetensors")) == [f"chunk-{k:07d}.safetensors" for k in range(3)]
    resumed = ib.simulate(gaussian_model, 200, observed="x", seed=5, batch_size=20, store=store, progress=False)
    straight = ib.simulate(gaussian_model, 200, observed="x", seed=5, batch_size=20, progress=False)
    assert torch.equal(resumed["x"], straight["x"]) and torch.equal(resumed.index, straight.index)
    assert not list(store.glob(".*.tmp"))
