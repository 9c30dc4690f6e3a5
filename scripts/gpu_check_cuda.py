"""On a GPU machine: one request of each kind through the cuda backend, with its phase timings
(pinned, pageable and non-contiguous inputs; exact and TF32 matmul), for docs/cuda-backend.md."""

from __future__ import annotations

import statistics
import time

import numpy as np

from gpu_matrix_service.backends.base import RunOptions
from gpu_matrix_service.backends.cuda.backend import CudaBackend
from gpu_matrix_service.ops import OPS
from gpu_matrix_service.settings import Settings


def timed(
    backend: CudaBackend,
    op: str,
    a: np.ndarray,
    b: np.ndarray,
    options: RunOptions | None = None,
    runs: int = 10,
) -> str:
    """Median phase times and wall time of ``runs`` requests after one warm-up, in ms."""
    options = options or RunOptions()
    backend.run(OPS[op], a, b, options)
    samples, walls = [], []
    for _ in range(runs):
        start = time.perf_counter()
        samples.append(backend.run(OPS[op], a, b, options).timings)
        walls.append(time.perf_counter() - start)
    phases = {k: statistics.median(s[k] for s in samples) * 1e3 for k in samples[0]}
    phases["wall"] = statistics.median(walls) * 1e3
    return " ".join(f"{k}={v:.3f}ms" for k, v in phases.items())


def main() -> None:
    backend = CudaBackend(Settings(_env_file=None, backend="cuda"))
    rng = np.random.default_rng(0)
    print(backend.devices())
    for n in (1024, 4096):
        pinned = [backend.empty_host((n, n), np.float32) for _ in range(2)]
        for p in pinned:
            p[...] = rng.standard_normal((n, n))
        pageable = [np.array(p) for p in pinned]
        print(f"add f32 {n}^2 pinned    ", timed(backend, "add", *pinned))
        print(f"add f32 {n}^2 pageable  ", timed(backend, "add", *pageable))
        print(f"add f32 {n}^2 strided   ", timed(backend, "add", pageable[0].T, pageable[1].T))
    for n in (4096, 8192):
        pinned = [backend.empty_host((n, n), np.float32) for _ in range(2)]
        for p in pinned:
            p[...] = rng.standard_normal((n, n))
        print(f"matmul f32 {n}^2 exact  ", timed(backend, "matmul", *pinned, runs=5))
        print(f"matmul f32 {n}^2 tf32   ", timed(backend, "matmul", *pinned, RunOptions(True), 5))
    print(backend.memory_usage())
    backend.close()


if __name__ == "__main__":
    main()
