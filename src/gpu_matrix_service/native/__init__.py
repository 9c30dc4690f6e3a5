"""Native code loaded through ctypes (the upload reader here, the CUDA library in
``backends/cuda``), and how such libraries are built: with a compiler, into the package or
the user cache."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path


def user_cache_dir() -> Path:
    """Where a library built at start-up goes: ``~/.cache/gpu-matrix-service``."""
    return Path.home() / ".cache" / "gpu-matrix-service"


def run_tool(command: list[str], error: type[Exception]) -> str:
    """Run a compiler (or its query), return its standard output; ``error`` with its
    standard error when it cannot run or fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise error(f"cannot run {command[0]}: {exc}") from exc
    if done.returncode != 0:
        raise error(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


def build_atomically(
    target: Path, command: Callable[[Path], list[str]], error: type[Exception]
) -> Path:
    """Run ``command(partial)``, which writes a library to ``partial`` in a scratch directory
    beside ``target``, then move it onto ``target`` in one step, so a running service that
    loads it never sees half a file; ``error`` as for :func:`run_tool`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as scratch:
        partial = Path(scratch) / target.name
        run_tool(command(partial), error)
        os.replace(partial, target)
    return target
