"""Building ``libgms_kernels.so`` from ``kernels.cu`` with nvcc.

The library holds machine code for every architecture from sm_75 to sm_90 that the installed
nvcc can target (sm_70 too where nvcc still supports it, as CUDA 12 does), plus compute_90 PTX
that the driver compiles for newer GPUs at load time. The CUDA runtime is linked statically and
cuBLAS is opened at run time, so the build needs nothing but nvcc.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Final

from gpu_matrix_service.native import build_atomically, run_tool

log = logging.getLogger(__name__)

SOURCE: Final = Path(__file__).resolve().parent / "kernels.cu"
LIBRARY_NAME: Final = "libgms_kernels.so"
OLDEST_ARCH: Final = 70
NEWEST_ARCH: Final = 90
NVCC_FLAGS: Final = (
    "-O3",
    "-std=c++17",
    "-shared",
    "-Xcompiler",
    "-fPIC,-fvisibility=hidden",
    # Keep the static CUDA runtime's symbols private: only gms_* is exported.
    "-Xlinker",
    "--exclude-libs=ALL",
    # Compile the architectures in parallel.
    "--threads",
    "0",
)


class BuildError(RuntimeError):
    """nvcc is missing or failed; the message carries its output."""


def find_nvcc() -> str | None:
    """The nvcc on PATH, else the toolkit's usual place, else None."""
    found = shutil.which("nvcc")
    if found is None and os.access("/usr/local/cuda/bin/nvcc", os.X_OK):
        found = "/usr/local/cuda/bin/nvcc"
    return found


def source_digest() -> str:
    """A short hash of ``kernels.cu``: names a build of exactly this source."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def select_archs(listed: list[str]) -> list[int]:
    """The architectures to build for, from ``nvcc --list-gpu-arch`` lines (``compute_90``...).

    Every plain architecture from 70 (CUDA 12 still has it, CUDA 13 does not) to 90.
    """
    numbers = {int(m.group(1)) for line in listed if (m := re.fullmatch(r"compute_(\d+)", line))}
    return sorted(n for n in numbers if OLDEST_ARCH <= n <= NEWEST_ARCH)


def supported_archs(nvcc: str) -> list[int]:
    """The architectures :func:`select_archs` picks from what ``nvcc`` lists."""
    listing = run_tool([nvcc, "--list-gpu-arch"], BuildError).split()
    archs = select_archs(listing)
    if not archs:
        raise BuildError(f"{nvcc} supports none of sm_{OLDEST_ARCH}..sm_{NEWEST_ARCH}: {listing}")
    return archs


def gencode_flags(archs: list[int]) -> list[str]:
    """``-gencode`` flags: machine code for each arch, and PTX of the newest for later GPUs."""
    flags = []
    for arch in archs[:-1]:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    newest = archs[-1]
    flags += ["-gencode", f"arch=compute_{newest},code=[sm_{newest},compute_{newest}]"]
    return flags


def nvcc_command(nvcc: str, output: Path, archs: list[int]) -> list[str]:
    """The full nvcc command line that builds ``output`` from ``kernels.cu``."""
    return [nvcc, *NVCC_FLAGS, *gencode_flags(archs), "-o", str(output), str(SOURCE), "-ldl"]


def _parse_arch(arch: str) -> int:
    match = re.fullmatch(r"(?:sm_|compute_)?(\d+)", arch.strip())
    if match is None:
        raise BuildError(f"not a GPU architecture: {arch!r} (use e.g. sm_90 or 90)")
    return int(match.group(1))


def build_kernels(
    output_dir: Path | None = None, nvcc: str | None = None, archs: list[str] | None = None
) -> Path:
    """Compile ``kernels.cu`` into ``output_dir/libgms_kernels.so`` and return its path.

    ``output_dir`` defaults to the package directory (where the backend looks first); ``nvcc``
    to the one on PATH; ``archs`` (``sm_90``, ``90``...) to every supported one from sm_75 to
    sm_90. The library replaces any earlier one atomically, so a running service that loads it
    never sees half a file.
    """
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found on PATH or in /usr/local/cuda/bin")
    numbers = sorted({_parse_arch(a) for a in archs}) if archs else supported_archs(nvcc)
    output_dir = Path(output_dir) if output_dir is not None else SOURCE.parent
    target = output_dir / LIBRARY_NAME
    log.info("building %s for sm_%s", target, ",".join(map(str, numbers)))
    return build_atomically(
        target, lambda partial: nvcc_command(nvcc, partial, numbers), BuildError
    )
