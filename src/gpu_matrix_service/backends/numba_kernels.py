"""The Numba CUDA kernels of the numba backend, and the launch geometry they run with.

Elementwise kernels are grid-stride loops over flat 1-D views, so one launch shape covers any
array size and any number of dimensions. Matmul is a shared-memory tiled kernel in which each
thread accumulates a small square of outputs in registers; tiles at the matrix edges are
zero-padded, so any ``m``, ``k``, ``n`` works. The same code runs on a GPU and under Numba's CUDA
simulator (``NUMBA_ENABLE_CUDASIM=1``), where :data:`SIMULATOR_TUNING` keeps blocks tiny because
every simulated thread is a Python thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, Final

import numpy as np
from numba import cuda

# What the kernels compute; every other dtype is the CPU backend's job.
ELEMENTWISE_DTYPES: Final = frozenset(
    np.dtype(t) for t in (np.float32, np.float64, np.int32, np.int64)
)
MATMUL_DTYPES: Final = frozenset(np.dtype(t) for t in (np.float32, np.float64))

# Most blocks a launch may ask for along grid y (the CUDA limit); matmul loops over more tiles.
_MAX_GRID_Y: Final = 65535


@dataclass(frozen=True)
class MatmulTile:
    """Matmul blocking: a block of ``threads`` x ``threads`` threads computes a square tile of
    ``threads * per_thread`` rows and columns, stepping through ``k`` ``depth`` at a time."""

    threads: int
    per_thread: int
    depth: int

    @property
    def size(self) -> int:
        """Rows (and columns) of the output tile one block computes."""
        return self.threads * self.per_thread


@dataclass(frozen=True)
class Tuning:
    """Launch geometry and pipelining of the numba backend.

    ``chunk_bytes``: bytes of one operand per pipeline chunk of an elementwise op (larger
    arrays are split so copies in both directions overlap the kernels); ``max_chunks`` caps the
    chunk count (larger chunks beyond it); ``streams``: CUDA streams per in-flight request.
    """

    threads_per_block: int
    blocks_per_sm: int
    chunk_bytes: int
    max_chunks: int
    streams: int
    matmul: MatmulTile


# 256 threads x 8 blocks fills an SM's 2048 threads; a 64x64 matmul tile with 4x4 outputs per
# thread reuses each shared-memory load four times (16 FMAs per 8 loads). 16 MiB chunks keep
# each copy long (~0.3 ms at 54 GB/s) next to the ~0.1 ms Python needs to issue a chunk.
DEVICE_TUNING: Final = Tuning(
    threads_per_block=256,
    blocks_per_sm=8,
    chunk_bytes=16 << 20,
    max_chunks=8,
    streams=4,
    matmul=MatmulTile(threads=16, per_thread=4, depth=16),
)
# The simulator runs each thread as a Python thread: tiny blocks and a small grid, so the
# grid-stride loops and the edge handling of the tiles are exercised on small arrays.
SIMULATOR_TUNING: Final = Tuning(
    threads_per_block=32,
    blocks_per_sm=2,
    chunk_bytes=1 << 20,
    max_chunks=8,
    streams=2,
    matmul=MatmulTile(threads=4, per_thread=4, depth=8),
)


@cuda.jit
def add_kernel(a: Any, b: Any, out: Any) -> None:
    """``out[i] = a[i] + b[i]`` over flat arrays, grid-stride."""
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = a[i] + b[i]


@cuda.jit
def subtract_kernel(a: Any, b: Any, out: Any) -> None:
    """``out[i] = a[i] - b[i]`` over flat arrays, grid-stride."""
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = a[i] - b[i]


@cuda.jit
def multiply_kernel(a: Any, b: Any, out: Any) -> None:
    """``out[i] = a[i] * b[i]`` over flat arrays, grid-stride."""
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = a[i] * b[i]


ELEMENTWISE_KERNELS: Final[dict[str, Any]] = {
    "add": add_kernel,
    "subtract": subtract_kernel,
    "multiply": multiply_kernel,
}


def elementwise_blocks(n: int, tuning: Tuning, sm_count: int) -> int:
    """Blocks for an elementwise launch over ``n`` elements: enough to fill every SM once,
    fewer when ``n`` is small (the grid-stride loop covers the rest)."""
    return max(1, min(math.ceil(n / tuning.threads_per_block), sm_count * tuning.blocks_per_sm))


def matmul_launch(m: int, n: int, tile: MatmulTile) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(grid, block)`` for an ``(m, k) @ (k, n)`` product: x walks row tiles, y column tiles
    (capped at the CUDA limit; the kernel loops over any column tiles beyond it)."""
    grid = (math.ceil(m / tile.size), min(math.ceil(n / tile.size), _MAX_GRID_Y))
    return grid, (tile.threads, tile.threads)


def chunk_bounds(n: int, itemsize: int, tuning: Tuning) -> list[tuple[int, int]]:
    """``[lo, hi)`` element ranges splitting ``n`` into pipeline chunks of about
    ``tuning.chunk_bytes`` each, at most ``tuning.max_chunks`` of them."""
    chunks = min(tuning.max_chunks, max(1, math.ceil(n * itemsize / tuning.chunk_bytes)))
    step = math.ceil(n / chunks)
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


@cache
def matmul_kernel(dtype: np.dtype, tile: MatmulTile) -> Callable[..., Any]:
    """The tiled matmul kernel for ``dtype`` (float32 or float64) and ``tile``, built once.

    Call as ``kernel[grid, block, stream](a, b, out, m, k, n)`` with C-ordered ``(m, k)``,
    ``(k, n)`` and ``(m, n)`` device arrays and the launch from :func:`matmul_launch`.
    Accumulation is in ``dtype`` itself, as NumPy's float32 matmul does.
    """
    return _build_matmul_kernel(cuda.float32 if dtype == np.float32 else cuda.float64, tile)


def _build_matmul_kernel(element: Any, tile: MatmulTile) -> Callable[..., Any]:
    threads, per_thread, depth, size = tile.threads, tile.per_thread, tile.depth, tile.size
    block_threads = threads * threads
    # Each thread stages this many elements of each operand tile into shared memory per step.
    loads = size * depth // block_threads
    if loads * block_threads != size * depth:
        raise ValueError(f"tile {tile} does not split evenly over its {block_threads} threads")

    @cuda.jit
    def matmul(a, b, out, m, k, n):  # noqa: ANN001 (Numba infers the types)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * threads + tx
        row0 = cuda.blockIdx.x * size
        a_tile = cuda.shared.array((size, depth), element)
        b_tile = cuda.shared.array((depth, size), element)
        acc = cuda.local.array((per_thread, per_thread), element)
        a_reg = cuda.local.array(per_thread, element)
        b_reg = cuda.local.array(per_thread, element)
        for col_tile in range(cuda.blockIdx.y, (n + size - 1) // size, cuda.gridDim.y):
            col0 = col_tile * size
            for i in range(per_thread):
                for j in range(per_thread):
                    acc[i, j] = 0
            for k0 in range(0, k, depth):
                # Consecutive threads read consecutive columns: coalesced global loads.
                for step in range(loads):
                    idx = tid + step * block_threads
                    r = idx // depth
                    c = idx % depth
                    if row0 + r < m and k0 + c < k:
                        a_tile[r, c] = a[row0 + r, k0 + c]
                    else:
                        a_tile[r, c] = 0
                    r = idx // size
                    c = idx % size
                    if k0 + r < k and col0 + c < n:
                        b_tile[r, c] = b[k0 + r, col0 + c]
                    else:
                        b_tile[r, c] = 0
                cuda.syncthreads()
                for kk in range(depth):
                    # Rows ty, ty+threads, ... and columns tx, tx+threads, ...: a warp reads
                    # one or two broadcast rows of a_tile and consecutive words of b_tile.
                    for i in range(per_thread):
                        a_reg[i] = a_tile[ty + i * threads, kk]
                    for j in range(per_thread):
                        b_reg[j] = b_tile[kk, tx + j * threads]
                    for i in range(per_thread):
                        for j in range(per_thread):
                            acc[i, j] += a_reg[i] * b_reg[j]
                cuda.syncthreads()
            for i in range(per_thread):
                r = row0 + ty + i * threads
                for j in range(per_thread):
                    c = col0 + tx + j * threads
                    if r < m and c < n:
                        out[r, c] = acc[i, j]

    return matmul
