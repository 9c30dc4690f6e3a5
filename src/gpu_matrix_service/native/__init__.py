"""Native code loaded through ctypes (the upload reader here, the CUDA library in
``backends/cuda``), and where such libraries are built when the package has none."""

from __future__ import annotations

from pathlib import Path


def user_cache_dir() -> Path:
    """Where a library built at start-up goes: ``~/.cache/gpu-matrix-service``."""
    return Path.home() / ".cache" / "gpu-matrix-service"
