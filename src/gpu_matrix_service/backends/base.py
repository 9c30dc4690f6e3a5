"""The one small interface every compute backend implements, and what it returns.

A backend owns its devices and their resources (memory pools, streams, library handles) from
construction to :meth:`Backend.close`. Backends never import FastAPI; the API layer never
imports a backend module, only :mod:`gpu_matrix_service.backends.registry`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar, runtime_checkable

import numpy as np

from gpu_matrix_service.errors import DeviceOutOfMemory, ServiceError
from gpu_matrix_service.ops import Op

DeviceKind = Literal["GPU", "CPU"]


@dataclass(frozen=True)
class RunOptions:
    """Per-request choices. ``allow_tf32``: let float32 matmul use TF32 tensor cores (faster,
    about 1e-3 relative error); off by default so float32 results are exact float32."""

    allow_tf32: bool = False


@dataclass(frozen=True)
class DeviceInfo:
    """One device a backend computes on. ``index`` is the CUDA ordinal (-1 for the CPU)."""

    index: int
    name: str
    kind: DeviceKind


@dataclass
class Result:
    """An operation's output and how long each phase took.

    ``timings`` maps phase names to seconds: ``h2d``, ``kernel``, ``d2h`` on a GPU (``compute``
    on the CPU) and always ``total``, the compute time the API reports as ``elapsed_time``.
    """

    array: np.ndarray
    device: DeviceKind
    device_name: str
    backend: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def elapsed_time(self) -> float:
        """Compute time in seconds: transfers plus kernels on a GPU, the NumPy call on a CPU."""
        return self.timings["total"]


@runtime_checkable
class Backend(Protocol):
    """What an operation needs from a compute backend.

    ``run`` receives operands already validated by :func:`gpu_matrix_service.ops.plan` and
    promoted to the result dtype; it returns a :class:`Result` or raises a
    :class:`gpu_matrix_service.errors.ServiceError` (``DeviceOutOfMemory``, ``BackendFailure``,
    ``UnsupportedDType`` for a dtype this backend cannot compute). It is called from worker
    threads, several at once, and must be thread-safe; ``run_if_idle`` from the event loop.
    """

    name: str
    device_kind: DeviceKind

    def devices(self) -> list[DeviceInfo]:
        """The devices this backend computes on, in the order it uses them."""
        ...

    def supports(self, op: Op, dtype: np.dtype) -> bool:
        """Whether ``run`` computes ``op`` over ``dtype`` on the device (else the CPU does)."""
        ...

    def empty_host(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A host array to decode an operand into (pinned staging memory on a GPU backend)."""
        ...

    def run(self, op: Op, a: np.ndarray, b: np.ndarray, options: RunOptions) -> Result:
        """Compute ``op(a, b)``; ``a`` and ``b`` already share the result dtype."""
        ...

    def run_if_idle(
        self, op: Op, a: np.ndarray, b: np.ndarray, options: RunOptions
    ) -> Result | None:
        """``run`` on the calling thread, but only on a device with nothing in flight; None
        when every device is busy. The service calls it on the event loop for tiny operands,
        so it must never wait behind another request's work."""
        ...

    def close(self) -> None:
        """Release every device resource; the backend is not used afterwards."""
        ...


@runtime_checkable
class LaunchingBackend(Protocol):
    """A backend that can also start tiny work without waiting for it (the CUDA C one).

    The service launches on the event loop, which goes on with other requests while the GPU
    works, and watches ``completion_fds()``: when one turns readable it calls
    ``finish_launched(fd)``, which calls each finished job's ``done`` on the loop, with its
    :class:`Result` or the :class:`~gpu_matrix_service.errors.ServiceError` it met.
    """

    def launch_if_idle(
        self, op: Op, a: np.ndarray, b: np.ndarray, done: Callable[[Result | ServiceError], None]
    ) -> bool:
        """Start ``op(a, b)`` (operands checked and promoted as for ``run``) on a device with
        nothing in flight and return True at once; False when it cannot, with nothing
        started. Never waits behind another request's work."""
        ...

    def completion_fds(self) -> list[int]:
        """File descriptors that turn readable when launched work has finished."""
        ...

    def finish_launched(self, fd: int) -> None:
        """Call ``done(result)`` for each launched job finished behind ``fd``."""
        ...


class BackendUnavailable(RuntimeError):
    """Raised by a backend's constructor when its probe fails; the message says why, for logs."""


class DeviceLoad(Protocol):
    """What :func:`least_busy_device` and :func:`take_device` use of a GPU backend's device:
    its load, and ``first``, held while a request runs on it at once (``run_if_idle``)."""

    in_flight: int
    served: int
    first: threading.Lock


LoadT = TypeVar("LoadT", bound=DeviceLoad)


def least_busy_device(devices: Sequence[LoadT]) -> LoadT:
    """The device with the fewest requests in flight; ties go to the one that served fewest,
    so idle devices take turns (both GPU backends place requests this way)."""
    if len(devices) == 1:  # one GPU, nothing to choose: once per small request, kept short
        return devices[0]
    return min(devices, key=lambda device: (device.in_flight, device.served))


def take_device(devices: Sequence[LoadT], idle_only: bool = False) -> LoadT | None:
    """The least busy of ``devices``, counted in flight (the caller holds its backend's lock
    and gives the place back when the request ends). With ``idle_only``, only a device with
    nothing in flight, its ``first`` lock taken for the caller to release; else None."""
    if idle_only:
        devices = [device for device in devices if device.in_flight == 0]
        if not devices:
            return None
    device = least_busy_device(devices)
    if idle_only and not device.first.acquire(blocking=False):
        return None
    device.in_flight += 1
    device.served += 1
    return device


def run_while_first(device: LoadT | None, run: Callable[[LoadT], Result]) -> Result | None:
    """``run(device)`` on a device :func:`take_device` gave with ``idle_only`` (None: none
    was idle), then its ``first`` lock released. Out of memory gives None: freeing the cache
    and retrying is a worker thread's job (the backend's ``run``)."""
    if device is None:
        return None
    try:
        return run(device)
    except DeviceOutOfMemory:
        return None
    finally:
        device.first.release()
