"""The core of a request: decode operands, check them, run the op on a backend, off the loop.

:class:`ComputeService` owns the chosen backend, the CPU backend it falls back to, and the
worker threads that run decoding and computation so the event loop keeps answering
``/health`` and ``/metrics`` while a large matmul runs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from gpu_matrix_service.admission import Admission, Ticket
from gpu_matrix_service.array_stream import ArrayStream
from gpu_matrix_service.arrays import MAX_HEADER_BYTES as MAX_NPY_HEADER_BYTES
from gpu_matrix_service.arrays import ArrayLimits, decode_array
from gpu_matrix_service.backends.base import Backend, LaunchingBackend, Result, RunOptions
from gpu_matrix_service.backends.cpu import CpuBackend
from gpu_matrix_service.backends.registry import select_backend
from gpu_matrix_service.deadlines import Deadlines
from gpu_matrix_service.errors import (
    ComputeTimeout,
    DeviceOutOfMemory,
    PayloadTooLarge,
    ServiceError,
)
from gpu_matrix_service.multipart_splitter import MAX_HEADER_BYTES
from gpu_matrix_service.native.whole_body import load_whole_body_layout
from gpu_matrix_service.ops import Op, plan
from gpu_matrix_service.settings import Settings
from gpu_matrix_service.uploads import whole_body_reader
from gpu_matrix_service.zip_records import LaidOutNpyDecoder, decode_in_one_piece

log = logging.getLogger(__name__)


# Work small enough to run on the event loop itself: operands and result together at most
# this many bytes, and for matmul at most this many multiply-adds.
TINY_BYTES = 512 * 1024
TINY_MATMUL_MACS = 1 << 22
# Tiny work that held the loop longer than this (a GPU shared with other processes, whose
# wait CUDA spends spinning) stops running there for INLINE_PAUSE_SECONDS: worker threads take
# it meanwhile. Held is the loop thread's CPU time (two system calls, about 1.5 us): the OS
# running another process meanwhile would delay a worker thread as much, and is no reason to
# pay the hop to one for a second. Blocking waits do not count either: the GIL back after the
# C call, the context's mutex, or a CUDA schedule that blocks instead of spinning.
INLINE_BUDGET_SECONDS = 0.002
INLINE_PAUSE_SECONDS = 1.0


def is_tiny(op: Op, a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``op(a, b)`` is cheaper to compute in place than to hand to a worker thread."""
    if op.elementwise:
        return a.nbytes + b.nbytes + max(a.nbytes, b.nbytes) <= TINY_BYTES
    if a.ndim != 2 or b.ndim != 2:
        return True  # a shape error, raised at once
    (m, k), n = a.shape, b.shape[1]
    out_bytes = m * n * max(a.itemsize, b.itemsize)
    return a.nbytes + b.nbytes + out_bytes <= TINY_BYTES and m * k * n <= TINY_MATMUL_MACS


@dataclass(frozen=True)
class NamedBytes:
    """One uploaded operand: the field name it came in (for error messages) and its bytes."""

    name: str
    data: bytes | bytearray | memoryview


class ComputeService:
    """Runs operations for the API on the configured backend, with the CPU as fallback."""

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        self.settings = settings
        self.skipped_backends: list[str] = []
        if backend is None:
            backend, self.skipped_backends = select_backend(settings)
        self.backend = backend
        self.cpu = backend if backend.device_kind == "CPU" else CpuBackend(settings)
        self.limits = ArrayLimits(
            max_bytes=settings.max_array_bytes,
            max_elements=settings.max_array_elements,
            max_dims=settings.max_array_dims,
            verify_stored_crc=settings.verify_stored_crc,
        )
        self._executor = ThreadPoolExecutor(
            max_workers=settings.compute_threads, thread_name_prefix="gms-compute"
        )
        # CRCs and boundary searches of large uploads while they arrive (array_checks.py).
        self._upload_pool = (
            ThreadPoolExecutor(settings.upload_threads, thread_name_prefix="gms-upload")
            if settings.upload_threads
            else None
        )
        self.admission = Admission(settings.compute_threads + settings.max_queued)
        # The upload of a small body that arrived whole, read natively when it can be.
        self.read_whole_body = whole_body_reader(
            self.decode_in_one_piece,
            load_whole_body_layout(MAX_HEADER_BYTES, MAX_NPY_HEADER_BYTES)
            if settings.native_uploads
            else None,
            LaidOutNpyDecoder(self.limits, self._allocate),
            self.limits.verify_stored_crc,
        )
        # The limits on an upload's arrival and on a computation's wait, for every request.
        self.upload_deadlines = Deadlines(settings.upload_timeout_seconds)
        self.compute_deadlines = Deadlines(settings.compute_timeout_seconds)
        self._running: set[Future[Result]] = set()
        self._inline_paused_until = 0.0  # time.monotonic() seconds
        self._launcher, self._loop = (
            self._watch_launches(backend) if settings.launch_tiny else (None, None)
        )

    @staticmethod
    def _watch_launches(
        backend: Backend,
    ) -> tuple[LaunchingBackend | None, asyncio.AbstractEventLoop | None]:
        """The backend as a launcher, and the loop watching its completions: the running
        loop, where the service is built (the app's lifespan). Built outside a loop (batch
        jobs, the command line), the service only computes synchronously."""
        if not isinstance(backend, LaunchingBackend):
            return None, None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None, None
        for fd in backend.completion_fds():
            loop.add_reader(fd, backend.finish_launched, fd)
        return backend, loop

    def admit(self) -> Ticket:
        """Hold a place for one request (503 when full) until its computation finishes:
        ``with service.admit() as ticket:``."""
        return self.admission.enter()

    def open_stream(self, name: str, most_bytes: int) -> ArrayStream:
        """A decoder for one uploaded file of at most ``most_bytes``, writing into the
        backend's host memory."""
        return ArrayStream(name, self.limits, self._allocate, most_bytes, self._upload_pool)

    def decode_in_one_piece(self, name: str, data: memoryview) -> np.ndarray | None:
        """A whole uploaded file's array in the backend's host memory, when numpy's own
        layout makes that a few steps; None leaves it to :meth:`open_stream`'s decoder."""
        return decode_in_one_piece(data, name=name, limits=self.limits, allocate=self._allocate)

    async def compute(
        self, op: Op, a: np.ndarray, b: np.ndarray, options: RunOptions, ticket: Ticket
    ) -> Result:
        """Compute ``op(a, b)`` on a worker thread, keeping ``ticket`` until it is done; tiny
        work on an idle device is launched from the event loop (a backend that launches) or
        computed at once on it.

        :class:`ComputeTimeout` (504) when waiting and computing take longer than
        ``compute_timeout_seconds``.
        """
        if is_tiny(op, a, b) and time.monotonic() >= self._inline_paused_until:
            # A hop to a worker thread and back costs more than tiny work: 0.1-0.3 ms, more
            # while the worker's Python waits for the GIL the loop holds. On a GPU only when
            # a device has nothing in flight: one busy with a matmul would hold the loop.
            checked_a, checked_b, backend = self._checked(op, a, b)  # once for both ways
            if self._launcher is not None:
                launched = self._launch(op, checked_a, checked_b, backend, ticket)
                if launched is not None:
                    return await self._within_timeout(op, launched)
            result = self._run_inline(op, checked_a, checked_b, backend, options)
            if result is not None:
                return result
            # Every device busy: a worker computes the operands checked here.
            run = functools.partial(self._run_checked, op, checked_a, checked_b, backend, options)
        else:
            run = functools.partial(self.run_arrays, op, a, b, options)
        future = self._executor.submit(run)
        ticket.handed_to_worker = True
        self._running.add(future)
        future.add_done_callback(self._running.discard)
        future.add_done_callback(lambda _: ticket.release())
        return await self._within_timeout(op, asyncio.wrap_future(future))

    async def _within_timeout(self, op: Op, result: Awaitable[Result]) -> Result:
        try:
            with self.compute_deadlines.watch():
                return await result
        except TimeoutError:
            raise ComputeTimeout(
                f"{op.name} did not finish within {self.compute_deadlines.seconds:g} s "
                "(GMS_COMPUTE_TIMEOUT_SECONDS)"
            ) from None

    def _launch(
        self, op: Op, a: np.ndarray, b: np.ndarray, backend: Backend, ticket: Ticket
    ) -> asyncio.Future[Result] | None:
        """Launch tiny ``op(a, b)`` (checked operands, for ``backend``) on the backend and
        return the future of its result, or None when the backend does not launch this work
        now. The launched job keeps ``ticket`` until it has finished, as a worker thread's
        computation does."""
        launcher = self._launcher
        if launcher is None or backend is not self.backend:
            return None
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()

        def done(outcome: Result | ServiceError) -> None:
            ticket.release()
            if future.done():  # it timed out
                return
            if isinstance(outcome, ServiceError):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        start = time.thread_time()
        try:
            if not launcher.launch_if_idle(op, a, b, done):
                return None
        finally:
            self._pause_inline_if_held(op, start)
        ticket.handed_to_worker = True
        return future

    def compute_sync(
        self, op: Op, a: NamedBytes, b: NamedBytes, options: RunOptions
    ) -> tuple[Result, float]:
        """Decode two whole files and compute, blocking (batch jobs, the command line).

        Returns the result and the decode seconds.
        """
        start = time.perf_counter()
        left = decode_array(a.data, name=a.name, limits=self.limits, allocate=self._allocate)
        right = decode_array(b.data, name=b.name, limits=self.limits, allocate=self._allocate)
        decode_seconds = time.perf_counter() - start
        return self.run_arrays(op, left, right, options), decode_seconds

    def run_arrays(self, op: Op, a: np.ndarray, b: np.ndarray, options: RunOptions) -> Result:
        """Check ``a`` and ``b`` for ``op``, promote them, and compute on the best backend."""
        return self._run_checked(op, *self._checked(op, a, b), options)

    def _run_checked(
        self, op: Op, a: np.ndarray, b: np.ndarray, backend: Backend, options: RunOptions
    ) -> Result:
        result = self._run_on(op, a, b, backend, options, only_if_idle=False)
        assert result is not None  # None only for only_if_idle
        return result

    def _run_inline(
        self, op: Op, a: np.ndarray, b: np.ndarray, backend: Backend, options: RunOptions
    ) -> Result | None:
        """:meth:`run_arrays` of checked operands on ``backend`` if a device is idle (None if
        not); pauses inline work when it held the caller longer than
        ``INLINE_BUDGET_SECONDS``."""
        start = time.thread_time()
        try:
            return self._run_on(op, a, b, backend, options, only_if_idle=True)
        finally:
            self._pause_inline_if_held(op, start)

    def _pause_inline_if_held(self, op: Op, start: float) -> None:
        if (held := time.thread_time() - start) > INLINE_BUDGET_SECONDS:
            self._inline_paused_until = time.monotonic() + INLINE_PAUSE_SECONDS
            log.info("tiny %s held the event loop %.1f ms (CPU time); worker threads take "
                     "tiny work for %g s", op.name, held * 1e3, INLINE_PAUSE_SECONDS)  # fmt: skip

    def _checked(
        self, op: Op, a: np.ndarray, b: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, Backend]:
        """``a`` and ``b`` checked for ``op`` and promoted to the result dtype, and the
        backend that computes them (the CPU one where the device has nothing to do)."""
        checked = plan(op, a, b)
        self._check_matmul_work(op, a, b, checked.dtype)
        elements = math.prod(checked.shape)
        if elements > self.limits.max_elements:
            # Small operands can ask for a huge product: (n, 1) @ (1, n).
            raise PayloadTooLarge(
                f"the result would have {elements} elements {list(checked.shape)}; the limit "
                f"is {self.limits.max_elements}"
            )
        a = a.astype(checked.dtype, copy=False)
        b = b.astype(checked.dtype, copy=False)
        backend = self.backend
        if a.size == 0 or b.size == 0 or not backend.supports(op, checked.dtype):
            # Nothing for a device to do, or a dtype its kernels lack: NumPy answers.
            backend = self.cpu
        return a, b, backend

    def _run_on(
        self,
        op: Op,
        a: np.ndarray,
        b: np.ndarray,
        backend: Backend,
        options: RunOptions,
        *,
        only_if_idle: bool,
    ) -> Result | None:
        try:
            if only_if_idle:
                return backend.run_if_idle(op, a, b, options)
            return backend.run(op, a, b, options)
        except DeviceOutOfMemory:
            if self.settings.fallback != "cpu" or backend is self.cpu:
                raise
            log.warning(
                "%s out of memory for %s %s, %s; computing on the CPU",
                backend.name,
                op.name,
                list(a.shape),
                list(b.shape),
            )
            return self.cpu.run(op, a, b, options)

    def _check_matmul_work(self, op: Op, a: np.ndarray, b: np.ndarray, dtype: np.dtype) -> None:
        if op.elementwise or a.ndim != 2 or b.ndim != 2:
            return
        macs = a.shape[0] * a.shape[1] * b.shape[1]
        limit = self.settings.max_matmul_macs
        if dtype.kind not in "fc":  # NumPy's integer matmul has no BLAS: hundreds of times slower
            limit //= 256
        if macs > limit:
            raise PayloadTooLarge(
                f"matmul {list(a.shape)} @ {list(b.shape)} is {macs} multiply-adds; the limit "
                f"for {dtype} is {limit} (GMS_MAX_MATMUL_MACS)"
            )

    def _allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return self.backend.empty_host(shape, dtype)

    def close(self) -> None:
        """Drop queued computations, wait for running ones (``shutdown_timeout_seconds`` at
        most), then release the backend's devices."""
        if self._launcher is not None and self._loop is not None:
            for fd in self._launcher.completion_fds():
                self._loop.remove_reader(fd)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._upload_pool is not None:  # its jobs read pinned memory: done before it goes
            self._upload_pool.shutdown(wait=True)
        _, still_running = wait(list(self._running), self.settings.shutdown_timeout_seconds)
        if still_running:
            # Freeing device memory under a running kernel could crash; the process is
            # exiting, and the driver frees everything then.
            log.warning("%d computations still running at shutdown; leaving the GPU memory "
                        "to the process exit", len(still_running))  # fmt: skip
            return
        self.backend.close()
        if self.cpu is not self.backend:
            self.cpu.close()
