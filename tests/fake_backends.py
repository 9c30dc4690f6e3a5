"""Backends that stand in for a GPU one in API tests, failing where a test says."""

from __future__ import annotations

import contextlib
import os

from gpu_matrix_service.backends.base import DeviceInfo, Result, RunOptions
from gpu_matrix_service.backends.cpu import CpuBackend


class FailingBackend(CpuBackend):
    """A GPU backend whose next calls fail the way CUDA can, simulated at the boundary."""

    name = "fake-gpu"
    device_kind = "GPU"

    def __init__(self, failures: list[Exception]) -> None:
        super().__init__()
        self.failures = failures

    def devices(self):
        return [DeviceInfo(0, "Fake GPU (cuda:0)", "GPU")]

    def run(self, op, a, b, options):
        if self.failures:
            raise self.failures.pop(0)
        result = super().run(op, a, b, options)
        return Result(result.array, "GPU", "Fake GPU (cuda:0)", self.name, result.timings)


class LaunchingFakeBackend(CpuBackend):
    """A GPU backend that launches tiny work as the CUDA C one does: each job is computed
    with NumPy when launched and reported through an eventfd, at once or, with ``hold``,
    when the test calls :meth:`finish_held` (on the app's event loop)."""

    name = "fake-gpu"
    device_kind = "GPU"

    def __init__(self, *, hold: bool = False, decline: bool = False, failure=None) -> None:
        super().__init__()
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.hold, self.decline, self.failure = hold, decline, failure
        self.ready: list[tuple] = []
        self.held: list[tuple] = []
        self.launches = self.inline_runs = self.worker_runs = 0

    def devices(self):
        return [DeviceInfo(0, "Fake GPU (cuda:0)", "GPU")]

    def launch_if_idle(self, op, a, b, done):
        if self.decline:
            return False
        if self.failure is not None:
            raise self.failure
        self.launches += 1
        out = super().run(op, a, b, RunOptions())
        result = Result(out.array, "GPU", "Fake GPU (cuda:0)", self.name, out.timings)
        if self.hold:
            self.held.append((done, result))
        else:
            self.ready.append((done, result))
            os.eventfd_write(self.fd, 1)
        return True

    def finish_held(self, error=None) -> None:
        """Report the held jobs: done, or failed with ``error`` (a device error)."""
        self.ready += [(done, error or result) for done, result in self.held]
        self.held = []
        os.eventfd_write(self.fd, 1)

    def completion_fds(self):
        return [self.fd]

    def finish_launched(self, fd):
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)
        ready, self.ready = self.ready, []
        for done, result in ready:
            done(result)

    def run_if_idle(self, op, a, b, options):
        self.inline_runs += 1
        return super().run_if_idle(op, a, b, options)

    def run(self, op, a, b, options):
        self.worker_runs += 1
        return super().run(op, a, b, options)

    def close(self):
        os.close(self.fd)
