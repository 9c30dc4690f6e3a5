"""The CUDA C backend: our own kernels and cuBLAS, driven through ctypes, on every visible GPU.

Per request, operands stream to the least busy device in chunks over three streams (copy in,
compute, copy out) so transfers in both directions and the kernel overlap; device buffers come
from a per-device pool and host buffers from a pinned pool, so steady-state requests allocate
nothing. ``docs/cuda-backend.md`` has the design and the measurements.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from gpu_matrix_service.backends.base import (
    BackendUnavailable,
    DeviceInfo,
    DeviceKind,
    Result,
    RunOptions,
    run_while_first,
    take_device,
)
from gpu_matrix_service.backends.cuda import binding
from gpu_matrix_service.backends.cuda.binding import KernelLibrary
from gpu_matrix_service.backends.cuda.pools import DevicePool, PinnedHostPool
from gpu_matrix_service.backends.pinned import in_pinned_block
from gpu_matrix_service.errors import (
    BackendFailure,
    DeviceOutOfMemory,
    ServiceError,
    UnsupportedDType,
)
from gpu_matrix_service.ops import OPS, Op
from gpu_matrix_service.settings import Settings

log = logging.getLogger(__name__)

MiB: Final = 1024 * 1024
ELEMENTWISE_DTYPES: Final = frozenset(binding.DTYPE_CODES)
MATMUL_DTYPES: Final = frozenset({np.dtype(np.float32), np.dtype(np.float64)})
# Elementwise chunks: about 8 per operand so copies in and out overlap, but at least 1 MiB
# (per-copy overhead) and at most 16 MiB (the pipeline's fill and drain cost one chunk each).
PIPELINE_CHUNKS: Final = 8
MIN_CHUNK_BYTES: Final = 1 * MiB
MAX_CHUNK_BYTES: Final = 16 * MiB
MAX_SLOTS: Final = 3
# Operands of at most this many bytes skip the pipeline: one kernel reads them from pinned host
# memory and writes the result there (zero copy), without copies, events or stream hand-offs.
# A float32 add on an H200 machine took 31 against 72 us at 16 KiB per operand, 86 against 127
# at 1 MiB and 256 against 279 at 4 MiB (host clock, scripts/gpu_tune_cuda.py, 2026-12-03).
ZERO_COPY_BYTES: Final = 1 * MiB
# Host arrays of at most this many bytes are plain (pageable) memory, not pinned blocks: the
# zero-copy kernel reaches them through its context's pinned staging buffers at a memcpy's
# cost, where lending a pinned block and taking it back costs about 3 us, three times for a
# small request (operands and result). Not when tiny work is launched (GMS_LAUNCH_TINY): a
# launched kernel reads pinned blocks only.
PAGEABLE_HOST_BYTES: Final = 32 * 1024
# Matmul row blocks: up to 4 (the product of block j overlaps copies of j-1 and j+1), each at
# least 1024 rows so that cuBLAS still runs at full rate.
MATMUL_MIN_BLOCK_ROWS: Final = 1024
MATMUL_MAX_BLOCKS: Final = 4


@dataclass(frozen=True)
class ChunkPlan:
    """How an elementwise request is cut: elements per chunk, slots (chunks in flight)."""

    chunk_elems: int
    slots: int


def plan_chunks(count: int, itemsize: int) -> ChunkPlan:
    """The chunking of ``count`` elements of ``itemsize`` bytes for the copy/kernel pipeline."""
    wanted = -(-count * itemsize // PIPELINE_CHUNKS)
    chunk_bytes = min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, wanted))
    chunk_elems = min(count, max(1, chunk_bytes // itemsize))
    chunks = -(-count // chunk_elems)
    return ChunkPlan(chunk_elems, min(MAX_SLOTS, chunks))


def plan_matmul_block_rows(m: int) -> int:
    """Rows of A (and C) per pipelined cuBLAS call for an ``m``-row product."""
    blocks = max(1, min(MATMUL_MAX_BLOCKS, m // MATMUL_MIN_BLOCK_ROWS))
    return -(-m // blocks)


@dataclass(eq=False)
class GpuDevice:
    """One GPU in use: its context (streams, events, cuBLAS handle), pool and load."""

    ordinal: int
    name: str
    total_bytes: int
    context: int
    pool: DevicePool
    in_flight: int = field(default=0)
    served: int = field(default=0)
    # Held while a request runs at once on its caller's thread (run_if_idle, the event loop):
    # requests that take the device meanwhile wait for it before their own GPU work, so they
    # cannot reach the context's lock first and keep the caller waiting for a matmul.
    first: threading.Lock = field(default_factory=threading.Lock)

    @property
    def label(self) -> str:
        """The name requests report, e.g. ``NVIDIA H100 80GB HBM3 (cuda:0)``."""
        return f"{self.name} (cuda:{self.ordinal})"


@dataclass(frozen=True)
class LaunchedJob:
    """A launched elementwise job: where it runs, the arrays the GPU still uses (kept alive
    until it has finished) and whom to tell."""

    device: GpuDevice
    out: np.ndarray
    operands: tuple[np.ndarray, np.ndarray]
    done: Callable[[Result | ServiceError], None]


class CudaBackend:
    """Computes add/subtract/multiply (float32/64, int32/64) with our CUDA kernels and
    float32/64 matmul with cuBLAS, on all visible GPUs or those ``settings.devices`` names."""

    name = "cuda"
    device_kind: DeviceKind = "GPU"

    def __init__(self, settings: Settings) -> None:
        self._devices: list[GpuDevice] = []
        self._lock = threading.Lock()
        self._has_cublas = False
        # Launched jobs (launch_if_idle) until finish_launched reports them; the event loop's.
        self._launched: dict[int, LaunchedJob] = {}
        self._job_ids = itertools.count(1)
        self._by_fd: dict[int, GpuDevice] = {}
        try:
            self._library = KernelLibrary(binding.locate_library(settings.kernel_lib))
            self._host_pool = PinnedHostPool(
                self._library, pageable_bytes=0 if settings.launch_tiny else PAGEABLE_HOST_BYTES
            )
            self._start(settings.devices)
        except BackendUnavailable:
            self.close()
            raise
        except ServiceError as exc:
            self.close()
            raise BackendUnavailable(f"cuda: {exc.detail}") from exc

    def _start(self, wanted: list[int] | None) -> None:
        try:
            runtime, driver = self._library.runtime_versions()
            count = self._library.device_count()
        except BackendFailure as exc:
            raise BackendUnavailable(f"cuda: no usable CUDA driver or GPU: {exc.detail}") from exc
        if count == 0:
            raise BackendUnavailable("cuda: the CUDA driver sees no GPU")
        ordinals = list(dict.fromkeys(wanted)) if wanted else list(range(count))
        unknown = [o for o in ordinals if not 0 <= o < count]
        if unknown:
            raise BackendUnavailable(f"cuda: no GPU {unknown}; this machine has {count}")
        cublas = binding.load_cublas(self._library, runtime // 1000)
        for ordinal in ordinals:
            self._devices.append(self._open_device(ordinal))
        self._by_fd = {self._library.notify_fd(d.context): d for d in self._devices}
        self._has_cublas = cublas is not None and all(
            self._library.context_has_cublas(d.context) for d in self._devices
        )
        for device in self._devices:
            self._probe(device)
        log.info(
            "cuda backend on %s (runtime %d, driver %d, cuBLAS %s, %s)",
            ", ".join(d.label for d in self._devices),
            runtime,
            driver,
            f"{cublas[1]} from {cublas[0]}" if cublas else "missing",
            self._library.path,
        )

    def _open_device(self, ordinal: int) -> GpuDevice:
        props = self._library.device_info(ordinal)
        context = self._library.context_create(ordinal)
        pool = DevicePool(self._library, ordinal)
        return GpuDevice(ordinal, props.name, props.total_bytes, context, pool)

    def _probe(self, device: GpuDevice) -> None:
        a = np.array([1.5, -2.0, 3.25], dtype=np.float32)
        b = np.array([10.0, 20.0, -30.5], dtype=np.float32)
        got = self._elementwise(device, OPS["add"], a, b).array
        if not np.array_equal(got, a + b):
            raise BackendUnavailable(f"cuda: {device.label} computed {a} + {b} = {got}")

    def devices(self) -> list[DeviceInfo]:
        """The GPUs in use, by CUDA ordinal."""
        return [DeviceInfo(d.ordinal, d.name, "GPU") for d in self._devices]

    def supports(self, op: Op, dtype: np.dtype) -> bool:
        """Elementwise ops over float32/64 and int32/64; matmul over float32/64 (cuBLAS)."""
        dtype = np.dtype(dtype)
        if op.elementwise:
            return dtype in ELEMENTWISE_DTYPES
        return self._has_cublas and dtype in MATMUL_DTYPES

    def empty_host(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A pinned host array from the pool, which it goes back to when collected; plain
        memory for at most ``PAGEABLE_HOST_BYTES`` (unless tiny work is launched)."""
        return self._host_pool.empty(shape, dtype)

    def run(self, op: Op, a: np.ndarray, b: np.ndarray, options: RunOptions) -> Result:
        """``op(a, b)`` on the least busy GPU; timings ``h2d``, ``kernel``, ``d2h``, ``total``
        in seconds (phases overlap, so they may add up to more than ``total``)."""
        self._check_dtype(op, a, b)
        device = self._take_device()
        assert device is not None  # None only for idle_only
        return self._run_on(device, op, a, b, options, after_first=True)

    def run_if_idle(
        self, op: Op, a: np.ndarray, b: np.ndarray, options: RunOptions
    ) -> Result | None:
        """:meth:`run` on a GPU with no request in flight, or None when every one is busy.
        A device's requests run one at a time (its context's lock), so a busy one could
        keep the caller waiting for a whole matmul; one that takes the device while this
        runs waits for it (``GpuDevice.first``). Out of memory gives None: a worker's
        :meth:`run` frees the cache and retries."""
        self._check_dtype(op, a, b)
        return run_while_first(
            self._take_device(idle_only=True),
            lambda device: self._run_on(device, op, a, b, options, retry=False),
        )

    def launch_if_idle(
        self, op: Op, a: np.ndarray, b: np.ndarray, done: Callable[[Result | ServiceError], None]
    ) -> bool:
        """Start elementwise ``op(a, b)`` on a GPU with no request in flight and return at once
        (False, nothing started: not elementwise, over ``ZERO_COPY_BYTES``, operands not in
        pinned blocks, every device busy, or out of memory). The kernel reads and writes
        pinned host memory itself; :meth:`finish_launched` calls ``done(result)`` once it has
        finished, or ``done(error)`` if it met a device error. Timings: ``kernel`` and
        ``total`` from the launch to the end of the kernel (host clock, waiting behind
        earlier launched jobs included), ``h2d`` and ``d2h`` 0."""
        if not op.elementwise or a.size == 0 or a.nbytes > ZERO_COPY_BYTES:
            return False
        if not (in_pinned_block(a) and in_pinned_block(b)):
            return False
        self._check_dtype(op, a, b)
        with self._lock:
            if not self._devices:
                raise BackendFailure("the cuda backend is closed")
            # Like run_if_idle: a request that takes the device meanwhile waits for `first`,
            # so it cannot hold the context's lock with a matmul while this launches.
            device = take_device(self._devices, idle_only=True)
        if device is None:
            return False
        try:
            out = self.empty_host(a.shape, a.dtype)
            if not in_pinned_block(out):
                return False
            job = next(self._job_ids)
            try:
                self._library.elementwise_launch(device.context, op.name, a, b, out, job)
            except DeviceOutOfMemory:
                return False  # as run_if_idle: a worker's run frees the cache and retries
            self._launched[job] = LaunchedJob(device, out, (a, b), done)
            return True
        finally:
            device.first.release()
            with self._lock:
                device.in_flight -= 1

    def completion_fds(self) -> list[int]:
        """File descriptors that turn readable when launched jobs have finished (one per
        device); :meth:`finish_launched` with the one that did."""
        return list(self._by_fd)

    def finish_launched(self, fd: int) -> None:
        """Report the finished jobs of the device behind ``fd`` to their ``done``."""
        device = self._by_fd.get(fd)
        if device is None:
            return
        with contextlib.suppress(BlockingIOError):  # a wake with nothing new
            os.eventfd_read(fd)  # resets the count; the queue below is what counts
        for job, seconds, status in self._library.take_completions(device.context):
            launched = self._launched.pop(job, None)
            if launched is None:  # never ours: the others must still be reported
                log.error("%s reported an unknown launched job %d", device.label, job)
                continue
            outcome: Result | ServiceError
            if status == 0:
                timings = {"h2d": 0.0, "kernel": seconds, "d2h": 0.0, "total": seconds}
                outcome = self._result(device, launched.out, timings)
            else:
                outcome = self._library.launch_error(status)
                log.error("%s: %s", device.label, outcome.detail)
            try:
                launched.done(outcome)
            except Exception:  # one caller's bug must not lose the rest of the batch
                log.exception("reporting launched job %d failed", job)

    def launched_jobs(self) -> int:
        """Launched jobs not yet reported."""
        return len(self._launched)

    def _check_dtype(self, op: Op, a: np.ndarray, b: np.ndarray) -> None:
        if not (self.supports(op, a.dtype) and a.dtype == b.dtype):
            raise UnsupportedDType(f"the cuda backend does not compute {op.name} over {a.dtype}")

    def _run_on(
        self, device: GpuDevice, op: Op, a: np.ndarray, b: np.ndarray, options: RunOptions,
        *, after_first: bool = False, retry: bool = True,
    ) -> Result:  # fmt: skip
        """The request on ``device`` (already counted in flight): after the request holding
        ``device.first`` with ``after_first``, trimming the pool and retrying once on
        out-of-memory with ``retry``."""
        try:
            if after_first:
                with device.first:
                    pass
            if retry:
                return self._retry_after_trim(
                    device, lambda: self._attempt(device, op, a, b, options)
                )
            return self._attempt(device, op, a, b, options)
        finally:
            with self._lock:
                device.in_flight -= 1

    def _attempt(
        self, device: GpuDevice, op: Op, a: np.ndarray, b: np.ndarray, options: RunOptions
    ) -> Result:
        if op.elementwise:
            return self._elementwise(device, op, a, b)
        return self._matmul(device, a, b, options)

    def _take_device(self, idle_only: bool = False) -> GpuDevice | None:
        """The least busy device, counted in flight until the caller's request ends. With
        ``idle_only``, of those with nothing in flight, its ``first`` lock taken; else None."""
        with self._lock:
            if not self._devices:
                raise BackendFailure("the cuda backend is closed")
            return take_device(self._devices, idle_only)

    def _retry_after_trim(self, device: GpuDevice, attempt: Callable[[], Result]) -> Result:
        try:
            return attempt()
        except DeviceOutOfMemory as exc:
            freed = device.pool.trim()
            log.warning("%s: %s; freed %d cached bytes, retrying", device.label, exc, freed)
        return attempt()

    def _host_operand(self, x: np.ndarray) -> np.ndarray:
        """``x`` itself when C-contiguous, else a pinned C-contiguous copy (one pass)."""
        if x.flags.c_contiguous:
            return x
        copy = self.empty_host(x.shape, x.dtype)
        np.copyto(copy, x)
        return copy

    def _elementwise(self, device: GpuDevice, op: Op, a: np.ndarray, b: np.ndarray) -> Result:
        if a.size == 0:
            return self._result(device, np.empty(a.shape, a.dtype), _no_time())
        a, b = self._host_operand(a), self._host_operand(b)
        if a.nbytes <= ZERO_COPY_BYTES:
            out = self.empty_host(a.shape, a.dtype)
            timings = self._library.elementwise_zero_copy(device.context, op.name, a, b, out)
            return self._result(device, out, timings)
        plan = plan_chunks(a.size, a.itemsize)
        sizes = [plan.chunk_elems * a.itemsize] * (2 * plan.slots)
        with device.pool.lease(sizes) as buffers:
            out = self.empty_host(a.shape, a.dtype)
            timings = self._library.elementwise(
                device.context, op.name, a, b, out, plan.chunk_elems, buffers
            )
        return self._result(device, out, timings)

    def _matmul(
        self, device: GpuDevice, a: np.ndarray, b: np.ndarray, options: RunOptions
    ) -> Result:
        (m, k), n = a.shape, b.shape[1]
        if m * k * n == 0:
            return self._result(device, np.zeros((m, n), a.dtype), _no_time())
        a, b = self._host_operand(a), self._host_operand(b)
        sizes = [m * k * a.itemsize, k * n * a.itemsize, m * n * a.itemsize]
        # Device memory first: a product too large for the GPU fails before pinning its result.
        with device.pool.lease(sizes) as buffers:
            out = self.empty_host((m, n), a.dtype)
            block_rows = plan_matmul_block_rows(m)
            timings = self._library.matmul(
                device.context, a, b, out, options.allow_tf32, block_rows, buffers
            )
        return self._result(device, out, timings)

    def _result(self, device: GpuDevice, out: np.ndarray, timings: dict[str, float]) -> Result:
        return Result(out, "GPU", device.label, self.name, timings)

    def memory_usage(self) -> dict[str, int]:
        """Pool bytes: device (cached and in use, all GPUs) and pinned host (cached, lent)."""
        pinned_cached, pinned_lent = self._host_pool.stats()
        return {
            "device_cached_bytes": sum(d.pool.cached_bytes() for d in self._devices),
            "device_in_use_bytes": sum(d.pool.in_use_bytes() for d in self._devices),
            "pinned_cached_bytes": pinned_cached,
            "pinned_lent_bytes": pinned_lent,
        }

    def close(self) -> None:
        """Destroy each device's context and free its pool, then unpin cached host memory."""
        with self._lock:
            devices, self._devices = self._devices, []
        self._by_fd = {}
        for device in devices:
            try:
                self._library.context_destroy(device.context)
                device.pool.close()
            except ServiceError as exc:
                log.warning("closing %s: %s", device.label, exc.detail)
        self._launched.clear()  # their kernels are done: destroying a context waits for them
        host_pool = getattr(self, "_host_pool", None)
        if host_pool is not None:
            host_pool.close()


def _no_time() -> dict[str, float]:
    return {"h2d": 0.0, "kernel": 0.0, "d2h": 0.0, "total": 0.0}
