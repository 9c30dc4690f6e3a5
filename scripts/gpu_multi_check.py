"""On a machine with several GPUs: does one service process spread work over all of them?

For each GPU backend: 32 concurrent 4096x4096 float32 matmuls through ComputeService (the
service's own path), once restricted to GPU 0 and once on every GPU. Prints which devices
served, the wall time of each, and the speed-up; checks every answer against NumPy.

    PYTHONPATH=src python3 scripts/gpu_multi_check.py
"""

from __future__ import annotations

import collections
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gpu_matrix_service.backends.base import RunOptions
from gpu_matrix_service.compute import ComputeService
from gpu_matrix_service.ops import get_op
from gpu_matrix_service.settings import Settings

REQUESTS, SIZE = 32, 4096


def run(backend: str, devices: str | None) -> tuple[float, collections.Counter]:
    settings = Settings(backend=backend, devices=devices, compute_threads=16, _env_file=None)
    service = ComputeService(settings)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((SIZE, SIZE), dtype=np.float32)
    b = rng.standard_normal((SIZE, SIZE), dtype=np.float32)
    expected = (a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32)
    matmul, options = get_op("matmul"), RunOptions()
    service.run_arrays(matmul, a, b, options)  # warm-up: pools, handles, kernels
    with ThreadPoolExecutor(16) as pool:
        start = time.perf_counter()
        results = list(pool.map(lambda _: service.run_arrays(matmul, a, b, options),
                                range(REQUESTS)))  # fmt: skip
        wall = time.perf_counter() - start
    for result in results:
        error = np.linalg.norm(result.array - expected) / np.linalg.norm(expected)
        assert error < 1e-5, error
    service.close()
    return wall, collections.Counter(r.device_name for r in results)


def main() -> int:
    status = 0
    for backend in ("cuda", "numba"):
        one, served_one = run(backend, "0")
        every, served_all = run(backend, None)
        print(f"{backend}: GPU 0 only {one:.3f} s {dict(served_one)}")
        print(f"{backend}: every GPU {every:.3f} s {dict(served_all)}")
        print(f"{backend}: speed-up {one / every:.2f}x with {len(served_all)} GPUs")
        if len(served_all) < 2:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
