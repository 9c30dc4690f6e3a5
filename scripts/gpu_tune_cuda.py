"""On a GPU machine: spread of the float32 4096^2 add over 40 runs for several chunk sizes."""

from __future__ import annotations

import numpy as np

import gpu_matrix_service.backends.cuda.backend as cuda_backend
from gpu_matrix_service.backends.base import RunOptions
from gpu_matrix_service.ops import OPS
from gpu_matrix_service.settings import Settings

MiB = 1024 * 1024


def main() -> None:
    backend = cuda_backend.CudaBackend(Settings(_env_file=None, backend="cuda"))
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
