"""What every benchmark row records and how rows are stored: the commit and code trees the
numbers depend on, package versions, a hash of the simulations, and a results file that several
processes can append to at once (an exclusive lock around each read-modify-write)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import platform
import shlex
import subprocess
import sys
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def code_state(*scripts: str) -> dict:
    """The commit and the trees of ``implicitbayes/`` and ``simulators/``; ``dirty`` if either
    folder or one of ``scripts`` has uncommitted changes (such rows are never reused)."""
    dirty = bool(git("status", "--porcelain", "--", "implicitbayes", "simulators", *scripts))
    return {"commit": git("rev-parse", "HEAD"), "implicitbayes_tree": git("rev-parse", "HEAD:implicitbayes"),
            "simulators_tree": git("rev-parse", "HEAD:simulators"), "dirty": dirty}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "sbi", "sbibm", "pyro-ppl", "zuko", "implicitbayes"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def tensors_hash(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def key(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


@contextmanager
def locked_results(path: Path):
    """Read-modify-write of a results file ``{"runs": [...]}`` under an exclusive lock."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.exists() else {"runs": []}
        yield results
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(path)


def store(path: Path, identity, row: dict) -> None:
    """Add ``row``, replacing any row with the same ``identity(row)``."""
    with locked_results(path) as results:
        results["runs"] = [r for r in results["runs"] if identity(r) != identity(row)] + [row]


def parse_range(text: str) -> list[int]:
    """``"1-5,8"`` → ``[1, 2, 3, 4, 5, 8]``."""
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def add_store_arguments(parser) -> None:
    """The options every resumable benchmark shares: where results go, a table-only run, and
    running with uncommitted changes."""
    parser.add_argument("--allow-dirty", action="store_true",
                        help="run with uncommitted library changes (rows marked dirty, never reused)")
    parser.add_argument("--table", action="store_true", help="only rewrite the markdown table from the JSON")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))


def command_line(script: str) -> str:
    """The command a row records: this run's arguments less ``--out`` (where the results went is
    not part of how they were made)."""
    args, kept = sys.argv[1:], []
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            kept.append(a)
    return f"OMP_NUM_THREADS=1 python {script} " + " ".join(map(shell_word, kept))


def shell_word(word: str) -> str:
    """``word`` quoted for a POSIX shell as a reader would type it: in double quotes where it holds
    single quotes and nothing a shell expands inside double quotes, else as ``shlex.quote`` does."""
    quoted = shlex.quote(word)
    if quoted != word and "'" in word and not set(word) & set('"$`\\!'):
        return f'"{word}"'
    return quoted


def produced_by(script: str, commands) -> list[str]:
    """The opening lines of a results table: the script and the commands its rows ran (each in the
    readable quoting of ``shell_word``; rows stored before it keep their words, only the quoting
    changes)."""
    readable = {" ".join(map(shell_word, shlex.split(c))) for c in commands}
    return [f"Produced by `{script}` (its docstring gives the protocol); the commands:", "",
            *[f"    {c}" for c in sorted(readable)], ""]


def results_path(args, name: str) -> Path:
    """``<--out>/<name>.json``, the folder created."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{name}.json"


def run_and_tabulate(args, name: str, run, write_table) -> None:
    """A resumable benchmark's main: ``run(args, path)`` unless ``--table``, then the markdown
    rewritten from every row of ``<--out>/<name>.json`` by ``write_table(results, md_path)``."""
    path = results_path(args, name)
    if not args.table:
        run(args, path)
    with locked_results(path) as results:
        write_table(results, path.with_suffix(".md"))


def committed_code_state(args, *scripts: str) -> dict:
    """:func:`code_state`, refusing uncommitted changes unless ``--allow-dirty``."""
    code = code_state(*scripts)
    if code["dirty"] and not args.allow_dirty:
        raise SystemExit("implicitbayes/, simulators/ or the benchmark has uncommitted changes: commit first "
                         "(rows record the commit), or pass --allow-dirty for rows that are never reused")
    return code
