"""Time limits for the many requests of one event loop, with one timer per slot of time.

``asyncio.timeout`` schedules and cancels a timer per use: about 6 us on uvloop, and more on
asyncio's own loop, whose heap keeps the cancelled timers (15 us of a 64x64 request's time in
process on the 2-core CPU machine, ``docs/benchmarks.md``). Every request's upload (and its
wait for a worker thread) is limited this way, yet all of them share one limit in seconds, so
:class:`Deadlines` files each watched request under the slot of time its limit ends in and
keeps one timer per slot: entering and leaving a watch is a set insertion and removal.

A watched task still inside its watch when its slot's timer fires is cancelled, and the watch
turns that cancellation into :class:`TimeoutError`, as ``asyncio.timeout`` does (the same
``cancel``/``uncancel`` bookkeeping, so an outside cancellation still propagates). The limit
is kept to within one slot: a watch may end up to ``slot_seconds`` after its limit, never
before. An infinite limit watches nothing, as ``asyncio.timeout(inf)`` never fires.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from types import TracebackType
from typing import Final

# 50 ms: far finer than any limit a person sets in seconds, and at most 20 timers a second.
SLOT_SECONDS: Final = 0.05


class Deadlines:
    """Watches tasks on the running loop, cancelling those still watched ``seconds`` after
    they entered (within ``slot_seconds`` later)."""

    def __init__(self, seconds: float, slot_seconds: float = SLOT_SECONDS) -> None:
        self.seconds = seconds
        self.slot_seconds = slot_seconds
        # Per loop (tests and benchmarks run several): each loop's slots and their timers.
        self._slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, set[Watch]]]
        self._slots = weakref.WeakKeyDictionary()

    def watch(self) -> Watch:
        """A context manager (plain ``with``, inside a coroutine) that limits the current task's
        time inside it; :class:`TimeoutError` when the limit passes."""
        return Watch(self)

    def _file(self, watch: Watch, loop: asyncio.AbstractEventLoop) -> set[Watch] | None:
        if not math.isfinite(self.seconds):  # no limit (inf): nothing to watch
            return None
        slots = self._slots.get(loop)
        if slots is None:
            slots = self._slots[loop] = {}
        slot = math.ceil((loop.time() + self.seconds) / self.slot_seconds)
        members = slots.get(slot)
        if members is None:
            members = slots[slot] = set()
            loop.call_at(slot * self.slot_seconds, _expire, slots, slot)
        members.add(watch)
        return members

    def watched(self) -> int:
        """How many watches are open, on every loop (for tests and shutdown logs)."""
        return sum(len(m) for slots in self._slots.values() for m in slots.values())


def _expire(slots: dict[int, set[Watch]], slot: int) -> None:
    for watch in slots.pop(slot, ()):
        watch.expire()


class Watch:
    """One task's time inside a :meth:`Deadlines.watch` block."""

    __slots__ = ("_cancelling", "_deadlines", "_members", "_task", "expired")

    def __init__(self, deadlines: Deadlines) -> None:
        self._deadlines = deadlines
        self._task: asyncio.Task[object] | None = None
        self._members: set[Watch] | None = None
        self._cancelling = 0
        self.expired = False

    def __enter__(self) -> Watch:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Deadlines.watch() is for use inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._members = self._deadlines._file(self, task.get_loop())
        return self

    def expire(self) -> None:
        """The limit passed: cancel the task (its watch raises :class:`TimeoutError`)."""
        if self._task is not None and not self.expired:
            self.expired = True
            self._task.cancel()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._members is not None:
            self._members.discard(self)
        task, self._task = self._task, None
        if (
            self.expired
            and task is not None
            and task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc
