"""Behaviour every GPU backend owes, checked alike for cuda and numba (on a GPU, and numba's
under the CUDA simulator too), and the test data the GPU test modules share."""

from __future__ import annotations

import gc
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from gpu_matrix_service.backends.base import Backend, Result, RunOptions
from gpu_matrix_service.ops import get_op


def check_run_if_idle(
    backend: Backend,
    monkeypatch: pytest.MonkeyPatch,
    a: np.ndarray,
    b: np.ndarray,
    *,
    hold: str,
    busy_op: str,
    again_op: str,
) -> list[Result]:
    """``run_if_idle`` computes ``a + b`` on an idle GPU, declines (None) while a ``busy_op``
    request is in flight on every GPU (each held in the backend's method ``hold``), and
    computes ``again_op`` once they end. Returns the busy requests' results."""
    idle = backend.run_if_idle(get_op("add"), a, b, RunOptions())
    assert idle is not None and idle.device == "GPU"
    np.testing.assert_array_equal(idle.array, a + b)

    started, release = threading.Semaphore(0), threading.Event()
    method = getattr(backend, hold)

    def held(*args):
        started.release()
        assert release.wait(20)
        return method(*args)

    monkeypatch.setattr(backend, hold, held)
    devices = len(backend.devices())
    with ThreadPoolExecutor(devices) as pool:
        busy = [pool.submit(backend.run, get_op(busy_op), a, b, RunOptions())
                for _ in range(devices)]  # fmt: skip
        for _ in busy:  # a request in flight on every GPU (the least busy one each time)
            assert started.acquire(timeout=20)
        try:
            assert backend.run_if_idle(get_op("add"), a, b, RunOptions()) is None
        finally:
            release.set()
        results = [future.result() for future in busy]
    monkeypatch.setattr(backend, hold, method)
    again = backend.run_if_idle(get_op(again_op), a, b, RunOptions())
    assert again is not None
    np.testing.assert_array_equal(again.array, getattr(np, again_op)(a, b))
    return results


def random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Random values over the dtype's range (floats: normal, times 100)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return (rng.standard_normal(shape) * 100).astype(dtype)
    info = np.iinfo(dtype)  # the full range: sums and products wrap around, as in NumPy
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def poison_pinned_pool(backend: Backend, shape: tuple[int, ...], dtype) -> None:
    """Leave a pinned block full of garbage in the pool, where the next result may land."""
    junk = backend.empty_host(shape, dtype)
    junk.view(np.uint8)[...] = 0xFF
    del junk
    gc.collect()
