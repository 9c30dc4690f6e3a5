"""The ctypes binding of ``libgms_kernels.so``: where it is, its signatures, its status codes.

Every exported C function returns an int status and fills a caller-provided char buffer with
the CUDA or cuBLAS error text; :meth:`KernelLibrary._call` turns a non-zero status into
:class:`~gpu_matrix_service.errors.DeviceOutOfMemory` (CUDA or cuBLAS allocation failure) or
:class:`~gpu_matrix_service.errors.BackendFailure` (anything else), so a failing call raises a
typed error instead of crashing the process. ctypes releases the GIL for the call's duration.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Final

import numpy as np

from gpu_matrix_service.backends.base import BackendUnavailable
from gpu_matrix_service.errors import BackendFailure, DeviceOutOfMemory, ServiceError
from gpu_matrix_service.native import user_cache_dir

log = logging.getLogger(__name__)

ABI_VERSION: Final = 3
LIBRARY_NAME: Final = "libgms_kernels.so"
PACKAGE_DIR: Final = Path(__file__).resolve().parent
ERROR_BUFFER_BYTES: Final = 1024

CUDA_ERROR_MEMORY_ALLOCATION: Final = 2
CUBLAS_STATUS_BASE: Final = 10000
CUBLAS_STATUS_ALLOC_FAILED: Final = 3
OUT_OF_MEMORY_STATUSES: Final = frozenset(
    {CUDA_ERROR_MEMORY_ALLOCATION, CUBLAS_STATUS_BASE + CUBLAS_STATUS_ALLOC_FAILED}
)

# The C side's dtype and op codes (enum Dtype, enum Op in kernels.cu).
DTYPE_CODES: Final[dict[np.dtype, int]] = {
    np.dtype(np.float32): 0,
    np.dtype(np.float64): 1,
    np.dtype(np.int32): 2,
    np.dtype(np.int64): 3,
}
OP_CODES: Final[dict[str, int]] = {"add": 0, "subtract": 1, "multiply": 2}


class CopyKind(IntEnum):
    """What ``gms_bench_copy`` measures."""

    H2D = 0
    D2H = 1
    BOTH = 2
    D2D = 3
    H2D_PAGEABLE = 4
    D2H_PAGEABLE = 5


_int_p = ctypes.POINTER(ctypes.c_int)
_size_p = ctypes.POINTER(ctypes.c_size_t)
_void_pp = ctypes.POINTER(ctypes.c_void_p)
_double_p = ctypes.POINTER(ctypes.c_double)
_ptr = ctypes.c_void_p
_size = ctypes.c_size_t
_int = ctypes.c_int

# Arguments before the trailing (char* err, size_t errlen) every status-returning call takes.
_SIGNATURES: Final[dict[str, list[type]]] = {
    "gms_runtime_info": [_int_p, _int_p],
    "gms_device_count": [_int_p],
    "gms_device_info": [_int, ctypes.c_char_p, _size, _size_p, _int_p, _int_p, _int_p],
    "gms_mem_info": [_int, _size_p, _size_p],
    "gms_device_alloc": [_int, _size, _void_pp],
    "gms_device_free": [_int, _ptr],
    "gms_host_alloc": [_size, _void_pp],
    "gms_host_free": [_ptr],
    "gms_load_cublas": [ctypes.c_char_p, _int_p],
    "gms_context_create": [_int, _void_pp],
    "gms_context_destroy": [_ptr],
    "gms_elementwise": [
        _ptr,
        _int,
        _int,
        _ptr,
        _ptr,
        _ptr,
        _size,
        _size,
        _void_pp,
        _int,
        _double_p,
    ],
    "gms_elementwise_zero_copy": [_ptr, _int, _int, _ptr, _ptr, _ptr, _size, _double_p],
    "gms_elementwise_launch": [_ptr, _int, _int, _ptr, _ptr, _ptr, _size, ctypes.c_uint64],
    "gms_matmul": [_ptr, _int, _int, _ptr, _ptr, _ptr, *[_size] * 4, _ptr, _ptr, _ptr, _double_p],
    "gms_naive_add": [_int, _ptr, _ptr, _ptr, _int, _int, _double_p],
    "gms_bench_copy": [_int, _int, _size, _int, _double_p],
    "gms_bench_gemm": [_int, _int, _int, _int, _int, _double_p],
}
_PLAIN_SIGNATURES: Final[dict[str, list[type]]] = {
    "gms_abi_version": [],
    "gms_context_has_cublas": [_ptr],
    "gms_context_notify_fd": [_ptr],
}
# Return a count (size_t) and a C string, not a status.
_TAKE_COMPLETIONS: Final = "gms_take_completions"
_ERROR_TEXT: Final = "gms_cuda_error_text"
EXPORTED_SYMBOLS: Final = tuple(
    sorted([*_SIGNATURES, *_PLAIN_SIGNATURES, _TAKE_COMPLETIONS, _ERROR_TEXT])
)
# Finished launched jobs taken per call of take_completions (more wait for the next).
COMPLETIONS_PER_TAKE: Final = 256


def status_error(status: int, message: str) -> ServiceError:
    """The typed error for a C status: out of memory (CUDA or cuBLAS) or a backend failure."""
    if status in OUT_OF_MEMORY_STATUSES:
        return DeviceOutOfMemory(f"GPU out of memory: {message}")
    return BackendFailure(f"GPU computation failed: {message}")


@dataclass(frozen=True)
class DeviceProperties:
    """What the runtime says about one device. ``total_bytes`` is its memory in bytes."""

    ordinal: int
    name: str
    total_bytes: int
    sm_count: int
    capability: tuple[int, int]


class KernelLibrary:
    """The loaded CUDA C library: one method per exported function, raising on failure."""

    def __init__(self, path: Path) -> None:
        try:
            self._lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise BackendUnavailable(f"cuda: cannot load {path}: {exc}") from exc
        missing = [name for name in EXPORTED_SYMBOLS if not hasattr(self._lib, name)]
        if missing:
            raise BackendUnavailable(f"cuda: {path} lacks {missing}; rebuild it (build-kernels)")
        for name, args in _SIGNATURES.items():
            function = getattr(self._lib, name)
            function.argtypes = [*args, ctypes.c_char_p, ctypes.c_size_t]
            function.restype = ctypes.c_int
        for name, args in _PLAIN_SIGNATURES.items():
            getattr(self._lib, name).argtypes = args
            getattr(self._lib, name).restype = ctypes.c_int
        take = getattr(self._lib, _TAKE_COMPLETIONS)
        take.argtypes = [_ptr, ctypes.POINTER(ctypes.c_uint64), _double_p, _int_p, _size]
        take.restype = ctypes.c_size_t
        error_text = getattr(self._lib, _ERROR_TEXT)
        error_text.argtypes = [_int]
        error_text.restype = ctypes.c_char_p
        abi = self._lib.gms_abi_version()
        if abi != ABI_VERSION:
            raise BackendUnavailable(
                f"cuda: {path} has ABI {abi}, this package needs {ABI_VERSION}; rebuild it"
            )
        self.path = path

    def _call(self, name: str, *args: object) -> None:
        message = _error_buffer()
        message[0] = b"\0"  # a failure that wrote nothing must not show an older message
        status = getattr(self._lib, name)(*args, message, ERROR_BUFFER_BYTES)
        if status != 0:
            raise status_error(status, message.value.decode(errors="replace"))

    def runtime_versions(self) -> tuple[int, int]:
        """(runtime, driver) CUDA versions as integers, e.g. 13000 for 13.0."""
        runtime, driver = ctypes.c_int(), ctypes.c_int()
        self._call("gms_runtime_info", ctypes.byref(runtime), ctypes.byref(driver))
        return runtime.value, driver.value

    def device_count(self) -> int:
        """How many CUDA devices this process sees."""
        count = ctypes.c_int()
        self._call("gms_device_count", ctypes.byref(count))
        return count.value

    def device_info(self, ordinal: int) -> DeviceProperties:
        """Name, memory and capability of device ``ordinal``."""
        name = ctypes.create_string_buffer(256)
        total, sms, major, minor = ctypes.c_size_t(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        refs = [ctypes.byref(x) for x in (total, sms, major, minor)]
        self._call("gms_device_info", ordinal, name, len(name), *refs)
        return DeviceProperties(
            ordinal, name.value.decode(), total.value, sms.value, (major.value, minor.value)
        )

    def mem_info(self, ordinal: int) -> tuple[int, int]:
        """(free, total) bytes of device ``ordinal``, as the runtime sees them now."""
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self._call("gms_mem_info", ordinal, ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value

    def device_alloc(self, ordinal: int, nbytes: int) -> int:
        """``cudaMalloc(nbytes)`` on device ``ordinal``; the device address."""
        ptr = ctypes.c_void_p()
        self._call("gms_device_alloc", ordinal, nbytes, ctypes.byref(ptr))
        return int(ptr.value or 0)

    def device_free(self, ordinal: int, ptr: int) -> None:
        """``cudaFree`` of an address from :meth:`device_alloc`."""
        self._call("gms_device_free", ordinal, ptr)

    def host_alloc(self, nbytes: int) -> int:
        """``cudaHostAlloc(nbytes, portable)``: page-locked host memory, its address."""
        ptr = ctypes.c_void_p()
        self._call("gms_host_alloc", nbytes, ctypes.byref(ptr))
        return int(ptr.value or 0)

    def host_free(self, ptr: int) -> None:
        """``cudaFreeHost`` of an address from :meth:`host_alloc`."""
        self._call("gms_host_free", ptr)

    def load_cublas(self, path: str) -> int:
        """dlopen cuBLAS at ``path`` (a path or soname); its version, e.g. 130000 for 13.0.0."""
        version = ctypes.c_int()
        self._call("gms_load_cublas", path.encode(), ctypes.byref(version))
        return version.value

    def context_create(self, ordinal: int) -> int:
        """Streams, events, staging buffers and a cuBLAS handle for device ``ordinal``."""
        handle = ctypes.c_void_p()
        self._call("gms_context_create", ordinal, ctypes.byref(handle))
        return int(handle.value or 0)

    def context_destroy(self, handle: int) -> None:
        """Release what :meth:`context_create` made, after any request still running."""
        self._call("gms_context_destroy", handle)

    def context_has_cublas(self, handle: int) -> bool:
        """Whether the context got a cuBLAS handle (cuBLAS was loaded before it was created)."""
        return bool(self._lib.gms_context_has_cublas(handle))

    def elementwise(
        self,
        context: int,
        op: str,
        a: np.ndarray,
        b: np.ndarray,
        out: np.ndarray,
        chunk_elems: int,
        buffers: Sequence[int],
    ) -> dict[str, float]:
        """``out = a op b`` through the chunk pipeline; phase timings in seconds.

        ``a``, ``b`` and ``out`` are C-contiguous with the same size and dtype; ``buffers``
        holds two device buffers of ``chunk_elems`` elements per pipeline slot.
        """
        slots = len(buffers) // 2
        device_buffers = (ctypes.c_void_p * len(buffers))(*buffers)
        timings = (ctypes.c_double * 4)()
        self._call(
            "gms_elementwise",
            context,
            *_elementwise_operands(op, a, b, out),
            chunk_elems,
            device_buffers,
            slots,
            timings,
        )
        return _timings(timings)

    def elementwise_zero_copy(
        self, context: int, op: str, a: np.ndarray, b: np.ndarray, out: np.ndarray
    ) -> dict[str, float]:
        """``out = a op b`` by one kernel that reads and writes the host arrays itself (pinned
        ones in place, others through the context's staging buffers); timings in seconds.

        ``a``, ``b`` and ``out`` are C-contiguous, of one size and dtype, at most 8 MiB each.
        """
        timings = (ctypes.c_double * 4)()
        self._call(
            "gms_elementwise_zero_copy", context, *_elementwise_operands(op, a, b, out), timings
        )
        return _timings(timings)

    def elementwise_launch(
        self, context: int, op: str, a: np.ndarray, b: np.ndarray, out: np.ndarray, job: int
    ) -> None:
        """Start ``out = a op b`` on the context's launch stream and return at once; the job
        is reported by :meth:`take_completions` when it has finished. ``a``, ``b`` and ``out``
        are pinned, 16-byte aligned and C-contiguous, of one size and dtype, at most 8 MiB
        each, and must stay alive and untouched until then."""
        self._call("gms_elementwise_launch", context, *_elementwise_operands(op, a, b, out), job)

    def notify_fd(self, context: int) -> int:
        """The context's eventfd: readable when launched jobs have finished."""
        return int(self._lib.gms_context_notify_fd(context))

    def take_completions(self, context: int) -> list[tuple[int, float, int]]:
        """Finished launched jobs, oldest first: (job, seconds from launch to finish, status:
        0, or the CUDA error it met; :meth:`launch_error` makes that an exception)."""
        found: list[tuple[int, float, int]] = []
        jobs, seconds, statuses = _completion_buffers()
        while True:
            taken = self._lib.gms_take_completions(
                context, jobs, seconds, statuses, COMPLETIONS_PER_TAKE
            )
            found += zip(jobs[:taken], seconds[:taken], statuses[:taken], strict=True)
            if taken < COMPLETIONS_PER_TAKE:
                return found

    def launch_error(self, status: int) -> ServiceError:
        """The typed error of a launched job that finished with CUDA error ``status``."""
        text = self._lib.gms_cuda_error_text(status) or b"unknown error"
        return status_error(status, f"launched kernel: {text.decode(errors='replace')}")

    def matmul(
        self,
        context: int,
        a: np.ndarray,
        b: np.ndarray,
        out: np.ndarray,
        allow_tf32: bool,
        block_rows: int,
        device_buffers: Sequence[int],
    ) -> dict[str, float]:
        """``out = a @ b`` (C-contiguous float32/float64) with cuBLAS; timings in seconds."""
        (m, k), n = a.shape, b.shape[1]
        timings = (ctypes.c_double * 4)()
        self._call(
            "gms_matmul",
            context,
            DTYPE_CODES[a.dtype],
            int(allow_tf32),
            address(a),
            address(b),
            address(out),
            m,
            k,
            n,
            block_rows,
            *device_buffers,
            timings,
        )
        return _timings(timings)

    def naive_add(self, ordinal: int, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> float:
        """The lab's float32 add (cudaMalloc, pageable copies, 16x16 blocks); wall seconds."""
        seconds = ctypes.c_double()
        rows, cols = a.shape
        self._call(
            "gms_naive_add",
            ordinal,
            address(a),
            address(b),
            address(out),
            rows,
            cols,
            ctypes.byref(seconds),
        )
        return seconds.value

    def bench_copy(self, ordinal: int, kind: CopyKind, nbytes: int, iterations: int) -> list[float]:
        """Seconds of each of ``iterations`` copies of ``nbytes`` (after one warm-up)."""
        seconds = (ctypes.c_double * iterations)()
        self._call("gms_bench_copy", ordinal, int(kind), nbytes, iterations, seconds)
        return list(seconds)

    def bench_gemm(
        self, ordinal: int, dtype: np.dtype, allow_tf32: bool, n: int, iterations: int
    ) -> list[float]:
        """Seconds of each of ``iterations`` n x n x n cuBLAS products on device data."""
        seconds = (ctypes.c_double * iterations)()
        code = DTYPE_CODES[np.dtype(dtype)]
        self._call("gms_bench_gemm", ordinal, code, int(allow_tf32), n, iterations, seconds)
        return list(seconds)


def _elementwise_operands(
    op: str, a: np.ndarray, b: np.ndarray, out: np.ndarray
) -> tuple[int, int, int, int, int, int]:
    """What both elementwise entry points take first: op, dtype, a, b, out, element count."""
    return (
        OP_CODES[op],
        DTYPE_CODES[a.dtype],
        address(a),
        address(b),
        address(out),
        a.size,
    )


def address(array: np.ndarray) -> int:
    """The address of a C-contiguous array's first byte. ``array.ctypes.data`` builds a
    helper object (0.9-1.9 us on the H200 hosts, three per call); a ctypes view of the
    buffer takes about a third of that (0.41 against 1.28 us on the CPU machine). Read-only,
    empty or non-contiguous arrays have no such view: ``ctypes.data`` gives theirs."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(array))
    except (TypeError, ValueError):
        return int(array.ctypes.data)


_THREAD_STATE: Final = threading.local()


def _error_buffer() -> ctypes.Array[ctypes.c_char]:
    """This thread's buffer for a call's error text (only read after the call fails)."""
    buffer: ctypes.Array[ctypes.c_char] | None = getattr(_THREAD_STATE, "errors", None)
    if buffer is None:
        buffer = _THREAD_STATE.errors = ctypes.create_string_buffer(ERROR_BUFFER_BYTES)
    return buffer


def _completion_buffers() -> tuple[
    ctypes.Array[ctypes.c_uint64], ctypes.Array[ctypes.c_double], ctypes.Array[ctypes.c_int]
]:
    """This thread's arrays that take_completions fills."""
    buffers = getattr(_THREAD_STATE, "completions", None)
    if buffers is None:
        buffers = _THREAD_STATE.completions = (
            (ctypes.c_uint64 * COMPLETIONS_PER_TAKE)(),
            (ctypes.c_double * COMPLETIONS_PER_TAKE)(),
            (ctypes.c_int * COMPLETIONS_PER_TAKE)(),
        )
    return buffers


def _timings(values: ctypes.Array[ctypes.c_double]) -> dict[str, float]:
    h2d, kernel, d2h, total = values
    return {"h2d": h2d, "kernel": kernel, "d2h": d2h, "total": total}


def locate_library(configured: Path | None) -> Path:
    """The kernel library to load: ``configured`` (``GMS_KERNEL_LIB``), else the package's.

    Without either, and with nvcc on PATH, it is built once into the user cache directory
    (keyed by the source's hash, so an edited source is rebuilt). ``BackendUnavailable`` says
    what is missing otherwise.
    """
    from gpu_matrix_service.backends.cuda import build

    if configured is not None:
        if configured.is_file():
            return configured
        raise BackendUnavailable(f"cuda: kernel library {configured} (GMS_KERNEL_LIB) not found")
    packaged = PACKAGE_DIR / LIBRARY_NAME
    if packaged.is_file():
        return packaged
    cached = user_cache_dir() / build.source_digest() / LIBRARY_NAME
    if cached.is_file():
        return cached
    nvcc = build.find_nvcc()
    if nvcc is None:
        raise BackendUnavailable(
            f"cuda: kernel library {packaged} is not built and nvcc is not on PATH to build "
            "it; run `gpu-matrix-service build-kernels` where nvcc is installed"
        )
    log.warning("cuda: %s missing, building it into %s (takes a minute)", packaged, cached.parent)
    try:
        return build.build_kernels(output_dir=cached.parent, nvcc=nvcc)
    except build.BuildError as exc:
        raise BackendUnavailable(f"cuda: building the kernel library failed: {exc}") from exc


def cublas_candidates(runtime_major: int) -> list[str]:
    """Where cuBLAS may be, best first: sonames the loader resolves, the toolkit, pip wheels.

    The runtime's major version first; cuBLAS carries its own runtime, so the previous major
    works too.
    """
    sonames = [f"libcublas.so.{major}" for major in (runtime_major, runtime_major - 1)]
    candidates = [*sonames, "libcublas.so"]
    toolkit_dirs = ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
    # nvidia-cublas wheels: nvidia/cu13/lib (CUDA 13) or nvidia/cublas/lib (CUDA 12).
    wheel_dirs = sorted(
        {d for entry in sys.path for d in glob.glob(os.path.join(entry, "nvidia", "*", "lib"))}
    )
    for directory in [*toolkit_dirs, *wheel_dirs]:
        candidates += [os.path.join(directory, name) for name in sonames]
    return [c for c in candidates if "/" not in c or os.path.isfile(c)]


def load_cublas(library: KernelLibrary, runtime_major: int) -> tuple[str, int] | None:
    """Open cuBLAS in the kernel library: (where from, version), or None when none loads."""
    reasons = []
    for candidate in cublas_candidates(runtime_major):
        try:
            return candidate, library.load_cublas(candidate)
        except BackendFailure as exc:
            reasons.append(exc.detail)
    log.warning("cuda: cuBLAS not found, matmul will run on the CPU: %s", "; ".join(reasons))
    return None
