"""The Numba CUDA backend (``GMS_BACKEND=numba``): kernels written in Python, on every GPU.

Each request goes to the least busy device (fewest requests in flight). Per device the backend
owns *lanes* (a few CUDA streams and timing events, one lane per request in flight) and a cache
of device buffers, so steady traffic allocates nothing: ``cuMemAlloc``/``cuMemFree`` cost
milliseconds and ``cuMemFree`` synchronises the whole device. Host operands and results live in
a pool of page-locked (pinned) buffers shared by all devices: :meth:`NumbaBackend.empty_host`
hands them to the decoder, so copies run at full PCIe speed and asynchronously. Large
elementwise ops are split into chunks issued round-robin on the lane's streams, so the
host-to-device copy of one chunk overlaps the kernel and the device-to-host copy of earlier ones.

Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the same code runs on a simulated
device, which is how CI covers the kernels without a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from typing import Final

import numpy as np
from numba import cuda
from numba.cuda.core.errors import NumbaPerformanceWarning

from gpu_matrix_service.backends import numba_kernels as kernels
from gpu_matrix_service.backends.base import (
    BackendUnavailable,
    DeviceInfo,
    DeviceKind,
    Result,
    RunOptions,
    run_while_first,
    take_device,
)
from gpu_matrix_service.backends.numba_devices import SIMULATED, MiB, NumbaGpu, NumbaLane
from gpu_matrix_service.backends.numba_memory import (
    CUDA_ERRORS,
    size_class,
)
from gpu_matrix_service.backends.pinned import PinnedArrayPool
from gpu_matrix_service.errors import BackendFailure, DeviceOutOfMemory, UnsupportedDType
from gpu_matrix_service.ops import Op, get_op
from gpu_matrix_service.settings import Settings

log = logging.getLogger(__name__)

# Small requests launch small grids by design; numba would warn once per new grid size (its
# message starts with a terminal colour code, hence the leading wildcard).
warnings.filterwarnings("ignore", message=".*Grid size", category=NumbaPerformanceWarning)

# Free pinned host buffers kept for reuse, in bytes; beyond this, returned buffers are freed.
PINNED_KEEP_BYTES: Final = 2048 * MiB
# The simulator swaps module globals while a kernel runs, so its launches cannot overlap.
_SIMULATOR_SERIAL: Final = threading.Lock() if SIMULATED else contextlib.nullcontext()


# numba-cuda 0.30's exit handlers segfault in a process that opened contexts on two or more
# GPUs (docs/backends.md): the GPUs this process's Numba backends have used.
_ORDINALS_WITH_CONTEXTS: set[int] = set()


def exits_crash_at_interpreter_exit() -> bool:
    """Whether this process used numba on several GPUs, so that its exit handlers will crash."""
    return len(_ORDINALS_WITH_CONTEXTS) > 1


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether a CUDA error is ``CUDA_ERROR_OUT_OF_MEMORY`` (a ``CudaAPIError`` from numba)."""
    code = getattr(exc, "code", None)
    return "OUT_OF_MEMORY" in str(getattr(code, "name", "")) or "OUT_OF_MEMORY" in str(exc)


class NumbaBackend:
    """Computes on every visible GPU (or ``settings.devices``) with Numba CUDA kernels.

    The constructor probes each device for real: it runs every kernel once on tiny operands
    (which also compiles them, so no request pays for compilation) and checks the answers. A
    device that fails is left out with a warning; :class:`BackendUnavailable` when none passes.
    ``tuning`` overrides launch geometry and chunking (tests use it to force small chunks).
    """

    name = "numba"
    device_kind: DeviceKind = "GPU"

    def __init__(self, settings: Settings, tuning: kernels.Tuning | None = None) -> None:
        self._tuning = tuning or (kernels.SIMULATOR_TUNING if SIMULATED else kernels.DEVICE_TUNING)
        self._lock = threading.Lock()
        self._closed = False
        ordinals = _visible_ordinals(settings)
        _ORDINALS_WITH_CONTEXTS.update(ordinals)
        self._pinned = PinnedArrayPool(
            self._pin,
            lambda _memory: None,  # numba unpins the memory when it collects the array
            size_class=size_class,
            max_cached_bytes=PINNED_KEEP_BYTES,
            pin_errors=CUDA_ERRORS,
        )
        self._home = ordinals[0]  # the context pinned host memory is allocated in (portable)
        self._gpus: list[NumbaGpu] = []
        failures: list[str] = []
        for ordinal in ordinals:
            try:
                gpu = NumbaGpu(ordinal, self._tuning)
                self._self_test(gpu)
            except Exception as exc:  # any failure here only means this device cannot serve
                failures.append(f"cuda:{ordinal}: {type(exc).__name__}: {exc}")
                log.warning("numba: leaving out cuda:%d, its probe failed: %s", ordinal, exc)
                continue
            self._gpus.append(gpu)
        if not self._gpus:
            self._pinned.close()
            raise BackendUnavailable("numba: no device passed the probe: " + "; ".join(failures))
        self._home = self._gpus[0].ordinal

    def devices(self) -> list[DeviceInfo]:
        """The GPUs requests are spread over, by CUDA ordinal."""
        return [DeviceInfo(index=g.ordinal, name=g.name, kind="GPU") for g in self._gpus]

    def supports(self, op: Op, dtype: np.dtype) -> bool:
        """add/subtract/multiply over float32, float64, int32, int64; matmul over floats."""
        if op.name in kernels.ELEMENTWISE_KERNELS:
            return np.dtype(dtype) in kernels.ELEMENTWISE_DTYPES
        return op.name == "matmul" and np.dtype(dtype) in kernels.MATMUL_DTYPES

    def empty_host(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised array in pooled pinned host memory, for the decoder to fill."""
        return self._pinned.empty(tuple(shape), np.dtype(dtype))

    def run(self, op: Op, a: np.ndarray, b: np.ndarray, options: RunOptions) -> Result:
        """Compute ``op(a, b)`` on the least busy GPU. Timings (seconds): ``h2d``, ``kernel``
        and ``d2h`` are device time spent in each phase (they overlap when a large elementwise
        op is pipelined, so their sum can exceed ``total``); ``total`` is the wall time from the
        first copy issued to the result on the host."""
        self._check_dtype(op, a, b)
        gpu = self._acquire()
        assert gpu is not None  # None only for idle_only
        return self._run_counted(gpu, op, a, b, after_first=True)

    def run_if_idle(
        self, op: Op, a: np.ndarray, b: np.ndarray, options: RunOptions
    ) -> Result | None:
        """:meth:`run` on a GPU with no request in flight, or None when every one is busy
        (or on out of memory: a worker's :meth:`run` frees the cache and retries). A
        request that takes the device meanwhile waits for this one (``NumbaGpu.first``)."""
        self._check_dtype(op, a, b)
        return run_while_first(
            self._acquire(idle_only=True),
            lambda gpu: self._run_counted(gpu, op, a, b, retry=False),
        )

    def _check_dtype(self, op: Op, a: np.ndarray, b: np.ndarray) -> None:
        if not self.supports(op, a.dtype) or a.dtype != b.dtype:
            raise UnsupportedDType(f"the numba backend does not compute {op.name} on {a.dtype}")

    def _run_counted(
        self, gpu: NumbaGpu, op: Op, a: np.ndarray, b: np.ndarray,
        *, after_first: bool = False, retry: bool = True,
    ) -> Result:  # fmt: skip
        try:
            if after_first:
                with gpu.first:
                    pass
            with cuda.gpus[gpu.ordinal]:
                return self._run_on(gpu, op, a, b, retry)
        finally:
            with self._lock:
                gpu.in_flight -= 1

    def close(self) -> None:
        """Free the cached device buffers, lanes and pinned host buffers of every device."""
        with self._lock:
            self._closed = True
        for gpu in self._gpus:
            gpu.close()
        self._pinned.close()

    # -- device choice and error mapping ------------------------------------------------------

    def _acquire(self, idle_only: bool = False) -> NumbaGpu | None:
        """The least busy device, marked busy until the request ends. With ``idle_only``, of
        those with nothing in flight, its ``first`` lock taken; else None."""
        with self._lock:
            if self._closed:
                raise BackendFailure("the numba backend is shut down")
            return take_device(self._gpus, idle_only)

    def _run_on(
        self, gpu: NumbaGpu, op: Op, a: np.ndarray, b: np.ndarray, retry: bool = True
    ) -> Result:
        """:meth:`_compute`, with CUDA errors mapped; on out-of-memory the device's cache is
        freed and (with ``retry``) the request tried once more before
        :class:`DeviceOutOfMemory`."""
        for attempt in (1, 2):
            try:
                return self._compute(gpu, op, a, b)
            except CUDA_ERRORS as exc:
                if not is_out_of_memory(exc):
                    raise BackendFailure(f"numba on {gpu.label}: CUDA error: {exc}") from exc
                if not retry:
                    raise DeviceOutOfMemory(f"{op.name} ran out of memory on {gpu.label}") from exc
                gpu.trim()
                if attempt == 2:
                    free, total = cuda.current_context().get_memory_info()
                    raise DeviceOutOfMemory(
                        f"{op.name} of {list(a.shape)} and {list(b.shape)} {a.dtype} does not "
                        f"fit on {gpu.label}: {free / MiB:.0f} MiB free of {total / MiB:.0f} MiB"
                    ) from exc
                log.info("numba: out of memory on %s, cache freed, retrying", gpu.label)
        raise AssertionError("unreachable")

    # -- the computations ------------------------------------------------------------------

    def _compute(self, gpu: NumbaGpu, op: Op, a: np.ndarray, b: np.ndarray) -> Result:
        with _SIMULATOR_SERIAL, gpu.lane() as lane:
            if op.name == "matmul":
                out, timings = self._matmul(gpu, lane, a, b)
            else:
                out, timings = self._elementwise(gpu, lane, op, a, b)
        return Result(
            array=out, device="GPU", device_name=gpu.label, backend=self.name, timings=timings
        )

    def _elementwise(
        self, gpu: NumbaGpu, lane: NumbaLane, op: Op, a: np.ndarray, b: np.ndarray
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Chunks issued round-robin over the lane's streams. Each chunk's upload waits for
        the previous upload and its download for the previous download, so each engine works
        on one copy at a time and the recorded intervals are copy time, not queueing."""
        kernel = kernels.ELEMENTWISE_KERNELS[op.name]
        a_flat = np.ascontiguousarray(a).reshape(-1)
        b_flat = np.ascontiguousarray(b).reshape(-1)
        n, dtype = a_flat.size, a_flat.dtype
        out = self._pinned.empty(a.shape, dtype)
        out_flat = out.reshape(-1)
        d_a, d_b, d_out = (lane.device_array((n,), dtype) for _ in range(3))
        bounds = kernels.chunk_bounds(n, dtype.itemsize, self._tuning)
        marks, streams, tpb = lane.marks, lane.streams, self._tuning.threads_per_block
        start = time.perf_counter()
        for c, (lo, hi) in enumerate(bounds):
            stream = streams[c % len(streams)]
            up, up_done, done, down, down_done = marks[5 * c : 5 * c + 5]
            if c:
                marks[5 * c - 4].wait(stream)  # the previous chunk's upload
            up.record(stream)
            a_part, b_part, out_part = d_a[lo:hi], d_b[lo:hi], d_out[lo:hi]
            a_part.copy_to_device(a_flat[lo:hi], stream=stream)
            b_part.copy_to_device(b_flat[lo:hi], stream=stream)
            up_done.record(stream)
            blocks = kernels.elementwise_blocks(hi - lo, self._tuning, gpu.sm_count)
            kernel[blocks, tpb, stream](a_part, b_part, out_part)
            done.record(stream)
            if c:
                marks[5 * c - 1].wait(stream)  # the previous chunk's download
            down.record(stream)
            out_part.copy_to_host(out_flat[lo:hi], stream=stream)
            down_done.record(stream)
        lane.synchronize()
        total = time.perf_counter() - start
        timings = {"h2d": 0.0, "kernel": 0.0, "d2h": 0.0}
        for c in range(len(bounds)):
            up, up_done, done, down, down_done = marks[5 * c : 5 * c + 5]
            timings["h2d"] += up.seconds_until(up_done)
            timings["kernel"] += up_done.seconds_until(done)
            timings["d2h"] += down.seconds_until(down_done)
        timings["total"] = total
        return out, timings

    def _matmul(
        self, gpu: NumbaGpu, lane: NumbaLane, a: np.ndarray, b: np.ndarray
    ) -> tuple[np.ndarray, dict[str, float]]:
        """One stream: upload both operands, the tiled kernel, download the product."""
        (m, k), n = a.shape, b.shape[1]
        dtype = a.dtype
        out = self._pinned.empty((m, n), dtype)
        if k == 0:
            out[...] = 0  # an empty sum; no kernel for zero-size tiles
            return out, {"h2d": 0.0, "kernel": 0.0, "d2h": 0.0, "total": 0.0}
        d_a = lane.device_array((m, k), dtype)
        d_b = lane.device_array((k, n), dtype)
        d_out = lane.device_array((m, n), dtype)
        stream = lane.streams[0]
        up, up_done, done, down_done = lane.marks[:4]
        tile = self._tuning.matmul
        grid, block = kernels.matmul_launch(m, n, tile)
        kernel = kernels.matmul_kernel(dtype, tile)
        start = time.perf_counter()
        up.record(stream)
        d_a.copy_to_device(np.ascontiguousarray(a), stream=stream)
        d_b.copy_to_device(np.ascontiguousarray(b), stream=stream)
        up_done.record(stream)
        kernel[grid, block, stream](d_a, d_b, d_out, m, k, n)
        done.record(stream)
        d_out.copy_to_host(out, stream=stream)
        down_done.record(stream)
        stream.synchronize()
        total = time.perf_counter() - start
        return out, {
            "h2d": up.seconds_until(up_done),
            "kernel": up_done.seconds_until(done),
            "d2h": done.seconds_until(down_done),
            "total": total,
        }

    # -- start-up ---------------------------------------------------------------------------

    def _pin(self, nbytes: int) -> tuple[int, np.ndarray]:
        # Portable: the buffer counts as pinned in every device's context, not just this one.
        with cuda.gpus[self._home]:
            memory = cuda.current_context().memhostalloc(nbytes, portable=True)
        block = np.ndarray((nbytes,), dtype=np.uint8, buffer=memory)
        return block.ctypes.data, block

    def _self_test(self, gpu: NumbaGpu) -> None:
        """Run every kernel once on small operands on ``gpu`` and compare with NumPy."""
        rng = np.random.default_rng(7)
        for dtype in sorted(kernels.ELEMENTWISE_DTYPES, key=str):
            a = rng.integers(-100, 100, size=(3, 37)).astype(dtype)
            b = rng.integers(-100, 100, size=(3, 37)).astype(dtype)
            for op_name in ("add", "subtract", "multiply"):
                self._check(gpu, get_op(op_name), a, b)
            if dtype in kernels.MATMUL_DTYPES:
                self._check(gpu, get_op("matmul"), a, b.T.copy())

    def _check(self, gpu: NumbaGpu, op: Op, a: np.ndarray, b: np.ndarray) -> None:
        with cuda.gpus[gpu.ordinal]:
            got = self._compute(gpu, op, a, b).array
        if not np.array_equal(got, op.reference(a, b)):
            raise BackendUnavailable(f"{op.name} on {a.dtype} gave a wrong answer on {gpu.label}")


def _visible_ordinals(settings: Settings) -> list[int]:
    """The CUDA ordinals to use: ``settings.devices`` or every visible GPU; checks CUDA works."""
    if not cuda.is_available():
        reason = " ".join(str(cuda.cuda_error() or "no usable driver").split())
        raise BackendUnavailable(f"numba: CUDA is not available ({reason})")
    try:
        count = len(cuda.gpus)
    except CUDA_ERRORS as exc:
        raise BackendUnavailable(f"numba: cannot list CUDA devices: {exc}") from exc
    ordinals = list(range(count)) if settings.devices is None else list(settings.devices)
    unknown = [o for o in ordinals if not 0 <= o < count]
    if unknown or not ordinals:
        raise BackendUnavailable(
            f"numba: devices {unknown or ordinals} not among the {count} visible GPU(s)"
        )
    return ordinals
