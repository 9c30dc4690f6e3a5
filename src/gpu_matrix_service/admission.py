"""Admission control: how many requests may be in progress at once, and their places.

A place is taken before a request's body is read and given back when its computation has
really finished (not when it timed out), so neither slow uploads nor abandoned computations
can pile up more work than the compute threads and the queue were sized for.
"""

from __future__ import annotations

import threading

from gpu_matrix_service.errors import ServiceOverloaded


class Admission:
    """Counts requests from admission until their computation has really finished.

    At most ``limit`` (compute threads + queue) are admitted; the next is refused at once with
    503 and ``Retry-After``, before its body is read. A computation that outlives its timeout
    keeps its place until its thread is done, so timeouts cannot pile work up.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()

    def enter(self) -> Ticket:
        """Admit one request, or raise :class:`ServiceOverloaded`. The ticket is a context
        manager that gives the place back on exit unless a worker thread took it over."""
        with self._lock:
            if self.active >= self.limit:
                raise ServiceOverloaded(
                    f"too many requests in progress ({self.limit}); retry shortly",
                    retry_after_seconds=1,
                )
            self.active += 1
        return Ticket(self)


class Ticket:
    """One admitted request's place; released exactly once, from any thread."""

    __slots__ = ("_admission", "_released", "handed_to_worker")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._released = False
        # Set when a worker thread computes for the request: the place is then given back
        # when the computation really ends, which may be after the request timed out.
        self.handed_to_worker = False

    def release(self) -> None:
        """Give the place back (idempotent)."""
        admission = self._admission
        with admission._lock:  # one lock for both: a ticket is released once per request
            if self._released:
                return
            self._released = True
            admission.active -= 1

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.handed_to_worker:
            self.release()
