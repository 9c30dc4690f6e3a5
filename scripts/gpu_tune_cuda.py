"""On a GPU machine: spread of the float32 4096^2 add over 40 runs for several chunk sizes,
where the zero-copy kernel stops paying (host time of one small add through each path), and
where pinned blocks start paying for small requests' host arrays (PAGEABLE_HOST_BYTES)."""

from __future__ import annotations

import time

import numpy as np

import gpu_matrix_service.backends.cuda.backend as cuda_backend
from gpu_matrix_service.backends.base import RunOptions
from gpu_matrix_service.ops import OPS
from gpu_matrix_service.settings import Settings

MiB = 1024 * 1024


def zero_copy_crossover(backend: cuda_backend.CudaBackend) -> None:
    """Median host time of ``backend.run`` (what the caller's thread waits) per path and size."""
    rng, default = np.random.default_rng(1), cuda_backend.ZERO_COPY_BYTES
    print("float32 add, per operand | zero copy p50 | pipeline p50 (us, host clock)")
    for kib in (16, 64, 128, 256, 512, 1024, 4096):
        count = kib * 1024 // 4
        sets = [[backend.empty_host((count,), np.float32) for _ in range(2)] for _ in range(4)]
        for a, b in sets:
            a[...], b[...] = rng.standard_normal((2, count))
        medians = []
        for limit in (1 << 62, 0):
            cuda_backend.ZERO_COPY_BYTES = limit
            seconds = []
            for i in range(400):
                a, b = sets[i % len(sets)]
                start = time.perf_counter()
                result = backend.run(OPS["add"], a, b, RunOptions())
                seconds.append(time.perf_counter() - start)
                if i == 0:
                    np.testing.assert_array_equal(result.array, a + b)
            medians.append(float(np.median(seconds[50:])) * 1e6)
        print(f"{kib:6d} KiB | {medians[0]:9.1f} | {medians[1]:9.1f}")
    cuda_backend.ZERO_COPY_BYTES = default


def host_memory_crossover(backend: cuda_backend.CudaBackend) -> None:
    """Median host time of a small request's host work on the backend: two operands made by
    ``empty_host`` and filled (as decoding fills them), the add, the arrays dropped; with every
    array a pinned block against every array plain memory (which the kernel reaches through
    its staging buffers)."""
    rng, pool = np.random.default_rng(2), backend._host_pool
    default = pool._pageable_bytes
    print("float32 add, per operand | pinned p50 | plain p50 (us: fill two, add, drop)")
    for kib in (4, 16, 32, 64, 128, 256):
        count = kib * 1024 // 4
        sources = rng.standard_normal((2, count)).astype(np.float32)
        medians = []
        for limit in (0, 1 << 62):
            pool._pageable_bytes = limit
            seconds = []
            for i in range(2000):
                start = time.perf_counter()
                a, b = (backend.empty_host((count,), np.float32) for _ in range(2))
                a[...], b[...] = sources
                result = backend.run(OPS["add"], a, b, RunOptions())
                if i == 0:
                    np.testing.assert_array_equal(result.array, sources[0] + sources[1])
                del a, b, result
                seconds.append(time.perf_counter() - start)
            medians.append(float(np.median(seconds[200:])) * 1e6)
        print(f"{kib:6d} KiB | {medians[0]:9.1f} | {medians[1]:9.1f}")
    pool._pageable_bytes = default


def main() -> None:
    backend = cuda_backend.CudaBackend(Settings(_env_file=None, backend="cuda"))
    host_memory_crossover(backend)
    backend._host_pool._pageable_bytes = 0  # the paths below on pinned operands, as before
    zero_copy_crossover(backend)
    a, b = (backend.empty_host((4096, 4096), np.float32) for _ in range(2))
    a[...], b[...] = np.random.default_rng(0).standard_normal((2, 4096, 4096))
    for chunk_mib, pieces in ((2, 32), (4, 16), (8, 8), (16, 4), (32, 2)):
        cuda_backend.MAX_CHUNK_BYTES = chunk_mib * MiB
        cuda_backend.PIPELINE_CHUNKS = pieces
        for _ in range(5):
            backend.run(OPS["add"], a, b, RunOptions())
        totals = np.array(
            [backend.run(OPS["add"], a, b, RunOptions()).timings["total"] for _ in range(40)]
        )
        q = np.percentile(totals * 1e3, [10, 50, 90])
        print(f"chunk {chunk_mib:2d} MiB: p10 {q[0]:.3f} p50 {q[1]:.3f} p90 {q[2]:.3f} ms")
    backend.close()


if __name__ == "__main__":
    main()
