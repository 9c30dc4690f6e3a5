"""Ordered work off the event loop, for large uploads while they arrive.

A :class:`Lane` runs its jobs one after another, in the order they were put, on a thread of a
shared pool, and keeps the first error for its owner to raise. A large array being uploaded
has one (see :mod:`gpu_matrix_service.array_checks`): as each block of its destination
(pinned memory on a GPU backend) fills, the lane runs the zip member's CRC over it and scans
it for the multipart boundary. zlib-ng's CRC and libc's ``memmem`` release the GIL, so the
event loop goes on receiving meanwhile; on the event loop these two passes cost about as much
as receiving the body itself (``docs/benchmarks.md``). The copy into the destination stays on
the loop: done off it, one chunk at a time, each copy would wait for the GIL again.
"""

from __future__ import annotations

import ctypes
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np


class Lane:
    """Jobs run in order on ``pool``, one at a time; after an error the rest are skipped,
    and the error waits for the owner's :meth:`raise_error` (on the owner's thread).

    The pool must run what it was given: shut down with ``cancel_futures=True`` while a lane
    waits, it would leave the lane busy for good (``ComputeService.close`` waits instead).
    """

    def __init__(self, pool: Executor) -> None:
        self._pool = pool
        self._jobs: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._running = False
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._failed = False
        self._abandoned = False

    def put(self, job: Callable[[], None]) -> None:
        """Run ``job`` after the jobs put before it."""
        with self._lock:
            self._jobs.append(job)
            if self._running:
                return
            self._running = True
            self._idle.clear()
        try:
            self._pool.submit(self._drain)
        except RuntimeError:  # the pool is shut down (the service is stopping): run it here
            self._drain()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._running = False
                    self._idle.set()
                    return
                job = self._jobs.popleft()
            if self._failed or self._abandoned:
                continue
            try:
                job()
            except BaseException as exc:  # raised by raise_error, not lost on this thread
                # Without its traceback: the frames would hold the job's buffers (pinned
                # memory) and this lane in a cycle until the garbage collector runs.
                self._error, self._failed = exc.with_traceback(None), True

    @property
    def busy(self) -> bool:
        """Whether jobs are queued or running."""
        return not self._idle.is_set()

    def wait(self) -> None:
        """Block until every job put so far has run (or was skipped)."""
        self._idle.wait()

    def abandon(self) -> None:
        """Skip the jobs not yet started (the request failed; their work is not wanted)."""
        self._abandoned = True

    def raise_error(self) -> None:
        """Raise the first error a job raised, if any (once: the lane lets go of it, so its
        new traceback does not tie the lane's buffers into a cycle)."""
        error, self._error = self._error, None
        if error is None:
            return
        try:
            raise error
        finally:
            del error  # not a local of the frame its traceback holds: no cycle either


def _libc_memmem() -> Callable[..., int | None] | None:
    try:
        memmem = ctypes.CDLL(None).memmem
    except (OSError, AttributeError):  # no libc symbols to look up: bytes.find instead
        return None
    memmem.restype = ctypes.c_void_p
    memmem.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t)
    return memmem


# ctypes releases the GIL around the call; bytes.find would hold it (and as fast: 4-6 GB/s).
_MEMMEM = _libc_memmem()


def contains(data: memoryview, needle: bytes) -> bool:
    """Whether ``needle`` occurs in the bytes of ``data`` (a contiguous byte view), searched
    without holding the GIL where libc has ``memmem``."""
    if not needle or len(data) < len(needle):
        return not needle
    if _MEMMEM is None:
        return needle in data.tobytes()
    address = np.frombuffer(data, np.uint8).ctypes.data
    return _MEMMEM(address, len(data), needle, len(needle)) is not None
