"""What the Numba CUDA backend keeps per device: its lanes (streams, timing marks and device
buffers of one request in flight), its cache of device buffers and its requests in flight.

Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) a :class:`Mark` reads the host
clock instead of a CUDA event, since every simulated call completes before it returns.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator
from typing import Any, Final

import numpy as np
from numba import cuda

from gpu_matrix_service.backends import numba_kernels as kernels
from gpu_matrix_service.backends.numba_memory import CUDA_ERRORS, DeviceBuffers

MiB: Final = 1 << 20
# Share of a device's memory its cache of free buffers may hold between requests.
DEVICE_KEEP_FRACTION: Final = 0.25
SIMULATED: Final[bool] = bool(cuda.config.ENABLE_CUDASIM)


class Mark:
    """A point on a stream's timeline: a CUDA event on a GPU; the host clock under the
    simulator, where every call completes before it returns."""

    __slots__ = ("event", "time")

    def __init__(self) -> None:
        self.event = None if SIMULATED else cuda.event(timing=True)
        self.time = 0.0

    def record(self, stream: Any) -> None:
        if self.event is None:
            self.time = time.perf_counter()
        else:
            self.event.record(stream)

    def wait(self, stream: Any) -> None:
        """Make later work on ``stream`` wait until this mark is reached."""
        if self.event is not None:
            self.event.wait(stream)

    def seconds_until(self, later: Mark) -> float:
        if self.event is None or later.event is None:
            return later.time - self.time
        return self.event.elapsed_time(later.event) / 1e3


class NumbaLane:
    """The streams, timing marks and device buffers of one request in flight on one device."""

    def __init__(self, tuning: kernels.Tuning, buffers: DeviceBuffers) -> None:
        self.streams = [cuda.stream() for _ in range(tuning.streams)]
        self.marks = [Mark() for _ in range(5 * tuning.max_chunks)]
        self.taken: list[Any] = []
        self._buffers = buffers

    def device_array(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """A C-ordered device array from the device's cache, held until the request ends."""
        nbytes = math.prod(shape) * dtype.itemsize
        raw = self._buffers.take(nbytes)
        self.taken.append(raw)
        return raw[:nbytes].view(dtype).reshape(shape)

    def synchronize(self) -> None:
        """Wait until every copy and kernel queued on this lane has finished."""
        for stream in self.streams:
            stream.synchronize()

    def settle(self) -> bool:
        """After an error: wait for queued work; False if the device cannot (context broken)."""
        try:
            self.synchronize()
        except CUDA_ERRORS:
            return False
        return True


class NumbaGpu:
    """One device the backend computes on: its lanes, buffers and requests in flight."""

    def __init__(self, ordinal: int, tuning: kernels.Tuning) -> None:
        device = cuda.gpus[ordinal]
        raw_name = "Numba CUDA simulator" if SIMULATED else device.name
        self.ordinal = ordinal
        self.name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        self.label = f"{self.name} (cuda:{ordinal})"
        self.sm_count = 1 if SIMULATED else int(device.MULTIPROCESSOR_COUNT)
        with cuda.gpus[ordinal]:
            total = cuda.current_context().get_memory_info().total
        keep = int(total * DEVICE_KEEP_FRACTION) if math.isfinite(total) else 256 * MiB
        self.buffers = DeviceBuffers(keep)
        self.in_flight = 0
        self.served = 0
        # Held while a request runs at once on its caller's thread (run_if_idle, the event
        # loop): requests that take the device meanwhile wait for it before launching work
        # that the caller's kernels would queue behind.
        self.first = threading.Lock()
        self._tuning = tuning
        self._lanes: list[NumbaLane] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def lane(self) -> Iterator[NumbaLane]:
        """A lane for one request (enter in the device's context). Its buffers go back to the
        cache once its work is done; after an error that leaves the device unable to finish
        that work, the lane and its buffers are dropped instead of reused."""
        with self._lock:
            lane = self._lanes.pop() if self._lanes else None
        lane = lane or NumbaLane(self._tuning, self.buffers)
        finished = False
        try:
            yield lane
            finished = True
        finally:
            if finished or lane.settle():
                self.buffers.give_back(lane.taken)
                with self._lock:
                    self._lanes.append(lane)
            lane.taken = []

    def trim(self) -> None:
        """Free the cached buffers and flush numba's pending frees (call in the context)."""
        with self._lock:
            self.buffers.clear()
            deallocations = getattr(cuda.current_context(), "deallocations", None)
            if deallocations is not None:
                deallocations.clear()

    def close(self) -> None:
        with cuda.gpus[self.ordinal]:
            with self._lock:
                self._lanes.clear()
            self.trim()
