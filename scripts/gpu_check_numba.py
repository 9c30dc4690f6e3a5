"""Check and time the numba backend on a GPU machine: start-up, elementwise and matmul.

Run by ``scripts/gpu_check_numba.sh`` after the gpu tests (``python3 scripts/gpu_check_numba.py
[N]``, default N=4096); prints a table of medians in seconds
and effective bandwidth / FLOP rate. Not part of the test suite.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from dataclasses import replace

import numpy as np
from numba import cuda

from gpu_matrix_service.backends import numba_kernels
from gpu_matrix_service.backends.base import RunOptions
from gpu_matrix_service.backends.numba_cuda import NumbaBackend
from gpu_matrix_service.ops import get_op
from gpu_matrix_service.settings import Settings

OPTS = RunOptions()


def filled(be: NumbaBackend, shape: tuple[int, ...], dtype: type, seed: int) -> np.ndarray:
    host = be.empty_host(shape, np.dtype(dtype))
    host[...] = np.random.default_rng(seed).standard_normal(shape)
    return host


def bench(
    be: NumbaBackend, op_name: str, a: np.ndarray, b: np.ndarray, reps: int
) -> tuple[dict[str, float], np.ndarray]:
    op = get_op(op_name)
    for _ in range(3):
        be.run(op, a, b, OPTS)
    rows, walls = [], []
    for _ in range(reps):
        t = time.perf_counter()
        r = be.run(op, a, b, OPTS)
        walls.append(time.perf_counter() - t)
        rows.append(r.timings)
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    med["wall"] = statistics.median(walls)
    return med, r.array


def line(
    label: str, med: dict[str, float], nbytes: int | None = None, flops: int | None = None
) -> None:
    extra = ""
    if nbytes:
        extra = f" | {nbytes / med['total'] / 1e9:6.1f} GB/s end-to-end"
        extra += f", kernel {nbytes / med['kernel'] / 1e9:7.1f} GB/s"
    if flops:
        extra = f" | kernel {flops / med['kernel'] / 1e12:6.2f} TFLOP/s"
    print(
        f"{label:34s} total {med['total'] * 1e3:8.3f} ms  wall {med['wall'] * 1e3:8.3f}  "
        f"h2d {med['h2d'] * 1e3:7.3f}  kernel {med['kernel'] * 1e3:7.3f}  "
        f"d2h {med['d2h'] * 1e3:7.3f}{extra}",
        flush=True,
    )


def main(n: int) -> None:
    t = time.perf_counter()
    be = NumbaBackend(Settings())
    print(f"start-up (probe + compile all kernels): {time.perf_counter() - t:.2f} s")
    print("devices:", be.devices())
    for dtype in (np.float32, np.float64):
        a, b = filled(be, (n, n), dtype, 1), filled(be, (n, n), dtype, 2)
        nbytes = 3 * a.nbytes
        for op_name in ("add", "multiply"):
            med, out = bench(be, op_name, a, b, 20)
            assert np.array_equal(out, get_op(op_name).reference(a, b))
            line(f"{op_name} {n}x{n} {np.dtype(dtype).name} pinned", med, nbytes)
    a, b = filled(be, (n, n), np.float32, 1), filled(be, (n, n), np.float32, 2)
    med, _ = bench(be, "add", np.array(a), np.array(b), 10)
    line(f"add {n}x{n} float32 pageable in", med, 3 * a.nbytes)
    serial = NumbaBackend(Settings(), tuning=replace(numba_kernels.DEVICE_TUNING, max_chunks=1))
    med, _ = bench(serial, "add", a, b, 20)
    line(f"add {n}x{n} float32 one chunk", med, 3 * a.nbytes)
    serial.close()
    for dtype in (np.float32, np.float64):
        a, b = filled(be, (n, n), dtype, 3), filled(be, (n, n), dtype, 4)
        med, out = bench(be, "matmul", a, b, 5)
        exact = a.astype(np.float64) @ b.astype(np.float64)
        rel = np.linalg.norm(out - exact) / np.linalg.norm(exact)
        line(f"matmul {n}^3 {np.dtype(dtype).name} (rel err {rel:.1e})", med, flops=2 * n**3)
        kernel = numba_kernels.matmul_kernel(np.dtype(dtype), numba_kernels.DEVICE_TUNING.matmul)
        if cuda.config.ENABLE_CUDASIM:
            continue
        with cuda.gpus[0]:
            print(
                f"  matmul {np.dtype(dtype).name}: registers/thread "
                f"{list(kernel.get_regs_per_thread().values())}, local bytes/thread "
                f"{list(kernel.get_local_mem_per_thread().values())}, shared bytes "
                f"{list(kernel.get_shared_mem_per_block().values())}"
            )
    a, b = filled(be, (n, n), np.float32, 5), filled(be, (n, n), np.float32, 6)
    threads_sharing_one_gpu(be, a, b)
    python_runs_while_waiting_for_the_gpu(be, n)
    chunking_sweep(a, b)
    be.close()
    with cuda.gpus[0]:
        print("free after close (MiB):", cuda.current_context().get_memory_info()[0] / 2**20)


def threads_sharing_one_gpu(be: NumbaBackend, a: np.ndarray, b: np.ndarray) -> None:
    """Throughput of 1, 2, 4 threads each running 10 adds, as the service's compute threads."""
    op = get_op("add")

    def worker() -> None:
        for _ in range(10):
            be.run(op, a, b, OPTS)

    for count in (1, 2, 4):
        threads = [threading.Thread(target=worker) for _ in range(count)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        print(
            f"{count} thread(s) x 10 add {a.shape} float32: {10 * count / wall:6.1f} req/s, "
            f"{10 * count * 3 * a.nbytes / wall / 1e9:5.1f} GB/s moved"
        )


def python_runs_while_waiting_for_the_gpu(be: NumbaBackend, n: int) -> None:
    """Whether a thread waiting on the GPU lets others run Python (the GIL is released)."""
    a, b = filled(be, (n, n), np.float32, 7), filled(be, (n, n), np.float32, 8)
    counts = []
    for busy in (False, True):
        stop = threading.Event()
        count = [0]

        def spin(stop: threading.Event = stop, count: list[int] = count) -> None:
            while not stop.is_set():
                count[0] += 1

        th = threading.Thread(target=spin)
        th.start()
        t = time.perf_counter()
        if busy:
            for _ in range(5):
                be.run(get_op("matmul"), a, b, OPTS)
        else:
            time.sleep(0.06)
        elapsed = time.perf_counter() - t
        stop.set()
        th.join()
        counts.append(count[0] / elapsed)
    print(f"python spin rate while a matmul waits: {counts[1] / counts[0]:.2f} of idle rate")


def chunking_sweep(a: np.ndarray, b: np.ndarray) -> None:
    """Median total of an add over chunk sizes and stream counts."""
    for chunk_mib in (4, 8, 16, 32):
        for streams in (2, 4):
            tuning = replace(
                numba_kernels.DEVICE_TUNING,
                chunk_bytes=chunk_mib << 20,
                max_chunks=16,
                streams=streams,
            )
            be = NumbaBackend(Settings(), tuning=tuning)
            med, _ = bench(be, "add", a, b, 20)
            line(f"add chunk {chunk_mib} MiB, {streams} streams", med, 3 * a.nbytes)
            be.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4096)
