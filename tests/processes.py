"""Run a Python script in a child process and ``kill -9`` it once a condition holds."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def kill_9_when(script: str, ready: Callable[[], bool], timeout: float = 600) -> None:
    """Start ``python -c script`` (with the repository on its path), wait until ``ready()``,
    then SIGKILL it. Fails if the child ends first or ``ready()`` never holds within ``timeout``
    seconds (generous: a loaded CI machine runs the child several times slower)."""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.time() + timeout
        while not ready():
            assert proc.poll() is None, "the child process ended before it could be killed"
            assert time.time() < deadline, "the condition to kill the child never held"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
